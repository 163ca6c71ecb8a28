"""``cub200``: CUB-200-2011, 200 bird species, the official ``train_test_split.txt`` (5,994 / 5,794).

Label ids: class id - 1 (``classes.txt`` order). Class names are the class folder names
(``001.Black_footed_Albatross``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from duallora.data.benchmarks import BenchmarkSource, BenchmarkSpec, Index
from duallora.data.registry import StandIn, register_source
from duallora.data.splits import files_record, resolve_entries
from duallora.data.standins import color, png

_CUB_LAYOUT = """cub200 expects CUB-200-2011 (CUB_200_2011.tgz) in data.root:
  ROOT/CUB_200_2011/images.txt              "<image id> <class folder>/<file>.jpg"
  ROOT/CUB_200_2011/image_class_labels.txt  "<image id> <class id 1..200>"
  ROOT/CUB_200_2011/train_test_split.txt    "<image id> <1 = train, 0 = test>"
  ROOT/CUB_200_2011/classes.txt             "<class id> <class name>"
  ROOT/CUB_200_2011/images/001.Black_footed_Albatross/<file>.jpg ...
(ROOT may also be the CUB_200_2011 folder itself)."""

_TABLES = ("images", "image_class_labels", "train_test_split", "classes")


def _cub_folder(base: Path) -> Optional[Path]:
    for c in (base / "CUB_200_2011", base):
        if (c / "images.txt").is_file():
            return c
    return None


def make_cub(root: Path, n_classes: int = 4, per_class: int = 4) -> Path:
    """A stand-in: CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}."""
    folder = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    img_id = 1
    for c in range(1, n_classes + 1):
        name = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {name}")
        for i in range(per_class):
            rel = f"{name}/Bird_{c}_{i:04d}.png"
            png(folder / "images" / rel, color(c - 1, i))
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c}")
            split.append(f"{img_id} {1 if i % 2 == 0 else 0}")
            img_id += 1
    for name, lines in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                        ("classes", classes)):
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


@register_source("cub200")
class Cub200(BenchmarkSource):
    description = "CUB-200-2011, official train_test_split.txt"
    spec = BenchmarkSpec(
        "cub200", 200, 5_994, 5_794, 11_788, ("official",), (10,), _CUB_LAYOUT,
        "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    )

    def _read_id_table(self, path: Path) -> dict[int, str]:
        if not path.is_file():
            raise self.layout_error(f"{str(path)!r} is missing")
        out: dict[int, str] = {}
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                s = line.strip()
                if not s:
                    continue
                parts = s.split(maxsplit=1)
                try:
                    if len(parts) != 2:
                        raise ValueError
                    out[int(parts[0])] = parts[1]
                except ValueError:
                    raise self.layout_error(f"{str(path)!r}, line {lineno}: {s[:80]!r} is not '<id> <value>'") \
                        from None
        return out

    def build_index(self, root: Optional[str], split_train: list[str], split_test: list[str], seed: int,
                    test_fraction: float) -> Index:
        base = self.need_root(root)
        folder = _cub_folder(base)
        if folder is None:
            raise self.layout_error(f"no images.txt in data.root={str(base)!r} or its CUB_200_2011/ folder")
        images, labels, is_train, class_names = (self._read_id_table(folder / f"{key}.txt") for key in _TABLES)
        if set(images) != set(labels) or set(images) != set(is_train):
            raise self.layout_error("images.txt, image_class_labels.txt and train_test_split.txt list different "
                                    "image ids")
        try:
            class_ids = sorted(class_names)
            rank = {cid: i for i, cid in enumerate(class_ids)}
            label_id = {img: rank[int(labels[img])] for img in images}
            train_flag = {img: int(is_train[img]) for img in images}
        except (KeyError, ValueError) as exc:
            raise self.layout_error(f"image_class_labels.txt or train_test_split.txt holds a bad value ({exc})") \
                from None
        ids = sorted(images)
        paths = resolve_entries(folder / "images", [images[i] for i in ids], "images.txt", self.name, self.spec.layout)
        items: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for img, p in zip(ids, paths):
            items["train" if train_flag[img] == 1 else "test"].append((str(p), label_id[img]))
        files_rec = files_record([("split", folder / "train_test_split.txt"), ("images", folder / "images.txt"),
                                  ("labels", folder / "image_class_labels.txt"), ("classes", folder / "classes.txt")])
        info = {"kind": "official", "name": "CUB-200-2011 train_test_split.txt", "files": files_rec,
                "label_ids": "class id - 1 (classes.txt order)"}
        return Index([class_names[c] for c in class_ids], items, info, str(folder), files=files_rec)

    def standin(self, folder: Path) -> StandIn:
        make_cub(folder, n_classes=4, per_class=4)
        return StandIn(folder, num_classes=4, train=8, test=8)
