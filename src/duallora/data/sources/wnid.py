"""WordNet-id folders: ``imagenet-r`` (30,000 renditions) and ``imagenet-a`` (7,500 adversarial images), 200 classes.

Split, the first that applies:

1. split lists ``data.split_train`` / ``data.split_test`` (CODA-Prompt's YAML files, or text lists
   such as LAE's ``train_list.txt`` / ``val_list.txt``); label ids are the lists' labels;
2. ``ROOT/train`` and ``ROOT/test`` folders; label ids = sorted WordNet ids;
3. a deterministic stratified split: per class, file names sorted, shuffled with
   ``random.Random(f"{seed}:{class}")`` and the first ``round_half_up(test_fraction * n)`` held out
   (:func:`~duallora.data.splits.split_files`, the rule of ``imagefolder``), recorded as
   ``stratified-80/20 seed S``.

Class names are the WordNet-id folder names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import yaml

from duallora.data.base import IMAGE_EXTENSIONS, is_image
from duallora.data.benchmarks import BenchmarkSource, BenchmarkSpec, Index
from duallora.data.registry import StandIn, register_source
from duallora.data.splits import held_out_count, split_files
from duallora.data.standins import color, png

WNID = re.compile(r"^n\d{8}$")

_IMAGENET_R_LAYOUT = """{name} expects the {title} images ({tar}), one folder per WordNet id, in data.root:
  ROOT/n01443537/<image>.jpg ...   ({classes} folders, {total:,} images; then split per class, seeded)
or a pre-split copy:
  ROOT/train/n01443537/...  and  ROOT/test/n01443537/...
and optionally split lists for the published split (data.split_train=FILE data.split_test=FILE):
  YAML with `data:` (image paths) and `targets:` (labels), CODA-Prompt's format, or text lines
  "<path> <label>" such as LAE's train_list.txt / val_list.txt (used by InfLoRA); paths are resolved
  under ROOT (leading folders such as data/{name}/train/ are dropped until the file is found)."""

_STRATIFIED_RULE = ("per class: relative paths sorted, shuffled with random.Random(f'{seed}:{class}'), the first "
                    "round_half_up(test_fraction * n) to test (at least 1 and at most n - 1)")
_SORTED_IDS = "index of the class folder name in sorted order"


def make_wnid_folders(root: Path, n_classes: int = 4, per_class: int = 5) -> list[str]:
    """A stand-in in Hendrycks' imagenet-r/imagenet-a layout: ROOT/<wnid>/<style>_<i>.png (+ a README)."""
    wnids = [f"n0{c:07d}" for c in range(1, n_classes + 1)]
    for c, w in enumerate(wnids):
        for i in range(per_class):
            png(root / w / f"art_{i}.png", color(c, i))
    (root / "README.txt").write_text("not an image")
    return wnids


def make_coda_yaml(root: Path, wnids: list[str], out: Path, per_class: int = 5) -> tuple[Path, Path]:
    """CODA-Prompt's imagenet-r_train.yaml / _test.yaml for a stand-in: `data:` paths under
    data/imagenet-r/{train,test}/, `targets:` labels that are NOT the sorted-folder order (here reversed)."""
    data: dict[str, list[str]] = {"train": [], "test": []}
    targets: dict[str, list[int]] = {"train": [], "test": []}
    for c, w in enumerate(wnids):
        label = len(wnids) - 1 - c
        for i in range(per_class):
            split = "test" if i == 0 else "train"
            folder = "test" if i % 2 else "train"  # CODA's paths mix both folder names in one list
            data[split].append(f"data/imagenet-r/{folder}/{w}/art_{i}.png")
            targets[split].append(label)
    files = []
    for split in ("train", "test"):
        p = out / f"imagenet-r_{split}.yaml"
        p.write_text(yaml.safe_dump({"data": data[split], "targets": targets[split]}, default_flow_style=False))
        files.append(p)
    return files[0], files[1]


class WnidSource(BenchmarkSource):
    """ImageNet-R/A: WordNet-id class folders, split by lists, folders or the stratified rule."""

    split_lists = True
    uses_test_fraction = True

    def _scan(self, folder: Path) -> dict[str, list[Path]]:
        dirs = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: d.name)
        wnids = [d for d in dirs if WNID.match(d.name)]
        if not wnids:
            shown = ", ".join(d.name for d in dirs[:8]) or "none"
            raise self.layout_error(
                f"{str(folder)!r} has no WordNet-id class folders (nXXXXXXXX); folders found: {shown}")
        out = {}
        for d in wnids:
            files = sorted((p for p in d.rglob("*") if is_image(p)), key=lambda p: p.as_posix())
            if not files:
                raise self.layout_error(
                    f"class folder {str(d)!r} has no images (extensions {' '.join(IMAGE_EXTENSIONS)})")
            out[d.name] = files
        return out

    def _index_folders(self, base: Path) -> Index:
        per = {"train": self._scan(base / "train"), "test": self._scan(base / "test")}
        a, b = set(per["train"]), set(per["test"])
        if a != b:
            raise self.layout_error(f"train/ and test/ hold different classes (only in train: {sorted(a - b)[:5]}, "
                                    f"only in test: {sorted(b - a)[:5]})")
        classes = sorted(a)
        items = {s: [(str(p), i) for i, c in enumerate(classes) for p in per[s][c]] for s in per}
        info = {"kind": "folders", "name": "train/ and test/ folders", "files": [], "label_ids": _SORTED_IDS}
        return Index(classes, items, info, str(base))

    def _index_stratified(self, base: Path, seed: int, test_fraction: float) -> Index:
        per_class = self._scan(base)
        classes = sorted(per_class)
        items: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for i, c in enumerate(classes):
            rel = [p.relative_to(base).as_posix() for p in per_class[c]]
            tr, te = split_files(rel, c, seed=seed, test_fraction=test_fraction)
            items["train"] += [(str(base / f), i) for f in tr]
            items["test"] += [(str(base / f), i) for f in te]
        pct = round(100 * (1 - test_fraction))
        info = {"kind": "stratified", "name": f"stratified-{pct}/{100 - pct} seed {seed}", "files": [],
                "seed": seed, "test_fraction": test_fraction, "rule": _STRATIFIED_RULE, "label_ids": _SORTED_IDS}
        return Index(classes, items, info, str(base))

    def build_index(self, root: Optional[str], split_train: list[str], split_test: list[str], seed: int,
                    test_fraction: float) -> Index:
        base = self.need_root(root)
        if split_train or split_test:
            return self.index_from_given_lists(base, split_train, split_test)
        if (base / "train").is_dir() and (base / "test").is_dir():
            return self._index_folders(base)
        return self._index_stratified(base, seed, test_fraction)

    def standin(self, folder: Path) -> StandIn:
        make_wnid_folders(folder, n_classes=4, per_class=5)
        n_test = held_out_count(5, 0.2)
        return StandIn(folder, num_classes=4, train=4 * (5 - n_test), test=4 * n_test)


@register_source("imagenet-r")
class ImagenetR(WnidSource):
    description = "ImageNet-R (WordNet-id folders; split lists, train/ + test/, or stratified 80/20)"
    spec = BenchmarkSpec(
        "imagenet-r", 200, 24_000, 6_000, 30_000, ("files", "folders"), (5, 10, 20),
        _IMAGENET_R_LAYOUT.format(name="imagenet-r", title="ImageNet-R", tar="Hendrycks et al., imagenet-r.tar",
                                  classes=200, total=30_000),
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
    )


@register_source("imagenet-a")
class ImagenetA(WnidSource):
    description = "ImageNet-A (WordNet-id folders; split lists, train/ + test/, or stratified 80/20)"
    spec = BenchmarkSpec(
        "imagenet-a", 200, None, None, 7_500, (), (10,),
        _IMAGENET_R_LAYOUT.format(name="imagenet-a", title="ImageNet-A", tar="Hendrycks et al., imagenet-a.tar",
                                  classes=200, total=7_500),
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
    )
