"""``tiny-imagenet``: Tiny-ImageNet in its own layout, from a zip archive or an extracted folder, at any resolution.

Layout (the official 64x64 download and the 32x32 re-encoding share it; one top folder may wrap it)::

    wnids.txt                                  the 200 WordNet ids, one a line
    words.txt                                  WordNet id <TAB> comma-separated names
    train/<wnid>/images/<wnid>_<k>.JPEG        500 training images per class
    val/images/val_<k>.JPEG                    50 validation images per class
    val/val_annotations.txt                    file <TAB> wnid <TAB> box

The official validation images serve as the **test** split (the official ``test/`` has no labels and
is ignored). Class names are the first name in ``words.txt`` (made unique by appending the WordNet id
where two selected classes share a name); the WordNet ids are the datasets' ``class_ids`` (and
``wnids``). Label ids: the position in ``data.classes`` (default: the sorted ids of ``wnids.txt``);
only the selected classes are decoded. Images are decoded once into a ``uint8`` tensor and resized to
the requested size (bilinear, antialiased) by :func:`duallora.data.base.convert_images`. The split
record holds the archive's sha256 (:func:`archive_sha256`), which ``data.split_sha256`` can pin.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from duallora.backbones import file_sha256
from duallora.data.base import TensorImageDataset
from duallora.data.registry import DataSource, LoadRequest, StandIn, register_class_list, register_source
from duallora.data.selection import resolve_classes
from duallora.data.standins import color
from duallora.data.tiny_imagenet_classes import CONTINUAL_WNIDS, PRETRAIN_WNIDS
from duallora.errors import DataError

#: Named class lists usable as ``data.classes`` (see :mod:`duallora.data.tiny_imagenet_classes`).
CLASS_LISTS: dict[str, tuple[str, ...]] = {
    "tiny-imagenet-pretrain": PRETRAIN_WNIDS,
    "tiny-imagenet-continual": CONTINUAL_WNIDS,
}
for _name, _wnids in CLASS_LISTS.items():
    register_class_list(_name, _wnids)

LAYOUT_HELP = (
    "expected Tiny-ImageNet's layout (a zip or a folder, optionally inside one top folder): "
    "wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt"
)


class _Reader:
    """Reads files of the layout from a zip archive or a folder, relative to the layout's top."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.zip: Optional[zipfile.ZipFile] = None
        if root.is_file():
            try:
                self.zip = zipfile.ZipFile(root)
            except zipfile.BadZipFile as exc:
                raise DataError(f"{root} is not a zip archive ({exc}); {LAYOUT_HELP}") from exc
            names = [n for n in self.zip.namelist() if n.endswith("wnids.txt")]
            tops = sorted({n[: -len("wnids.txt")] for n in names if n.count("/") <= 1})
            if not tops:
                raise DataError(f"{root}: no wnids.txt at its top or inside one top folder; {LAYOUT_HELP}")
            self.prefix = tops[0]
            self.names = [n for n in self.zip.namelist() if n.startswith(self.prefix) and not n.endswith("/")]
        elif root.is_dir():
            top = root
            if not (top / "wnids.txt").is_file():
                subs = [p for p in root.iterdir() if (p / "wnids.txt").is_file()]
                if len(subs) != 1:
                    raise DataError(f"{root}: no wnids.txt at its top or inside one sub-folder; {LAYOUT_HELP}")
                top = subs[0]
            self.top = top
            self.prefix = ""
            self.names = None  # listed per folder on demand
        else:
            raise DataError(f"Tiny-ImageNet root {root} does not exist; pass data.root=PATH (zip or folder)")

    def read(self, rel: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(self.prefix + rel)
            return (self.top / rel).read_bytes()
        except (KeyError, FileNotFoundError) as exc:
            raise DataError(f"{self.root}: missing {rel}; {LAYOUT_HELP}") from exc

    def list(self, folder: str) -> list[str]:
        """Sorted relative file paths directly inside ``folder`` (relative to the layout's top)."""
        if self.zip is not None:
            start = self.prefix + folder.rstrip("/") + "/"
            out = [n[len(self.prefix):] for n in self.names if n.startswith(start) and "/" not in n[len(start):]]
        else:
            d = self.top / folder
            out = [f"{folder.rstrip('/')}/{p.name}" for p in d.iterdir() if p.is_file()] if d.is_dir() else []
        return sorted(out)


def archive_sha256(root: str | Path) -> str:
    """sha256 of a zip archive's bytes, or for a folder of the sorted relative paths and bytes of its files.

    Raises:
        DataError: ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file():
        return file_sha256(root)
    if not root.is_dir():
        raise DataError(f"Tiny-ImageNet root {root} does not exist")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=4)
def _cached_sha256(root: str, mtime_ns: int, size: int) -> str:
    return archive_sha256(root)


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {name}: {exc}") from exc


def _split_files(reader: _Reader, root: str, split: str, index: dict[str, int]) -> list[tuple[str, int]]:
    """``(relative path, label)`` of ``split``'s images of the classes in ``index`` (wnid -> label)."""
    files: list[tuple[str, int]] = []
    if split == "train":
        for w in index:
            listed = [f for f in reader.list(f"train/{w}/images") if f.lower().endswith((".jpeg", ".jpg", ".png"))]
            if not listed:
                raise DataError(f"{root}: no images in train/{w}/images; {LAYOUT_HELP}")
            files += [(f, index[w]) for f in listed]
        return files
    ann = reader.read("val/val_annotations.txt").decode("utf-8")
    for line in ann.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            files.append((f"val/images/{parts[0]}", index[parts[1]]))
    return sorted(files)


@lru_cache(maxsize=4)
def _read_split(root: str, split: str,
                wnids_key: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Decode one split: uint8 ``(N, 3, H, W)`` at the archive's resolution, labels, file names."""
    reader = _Reader(Path(root))
    files = _split_files(reader, root, split, {w: i for i, w in enumerate(wnids_key)})
    if not files:
        raise DataError(f"{root}: no {split} images of the selected classes; {LAYOUT_HELP}")
    arrays = [_decode(reader.read(f), f) for f, _ in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{root}: {split} images differ in size ({sorted(shapes)[:3]}); Tiny-ImageNet's are square")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    return images, labels, tuple(f for f, _ in files)


def class_names(root: str | Path) -> dict[str, str]:
    """WordNet id -> first name in ``words.txt`` for the ids of ``wnids.txt``."""
    reader = _Reader(Path(root))
    wnids = reader.read("wnids.txt").decode("utf-8").split()
    words: dict[str, str] = {}
    for line in reader.read("words.txt").decode("utf-8").splitlines():
        if "\t" in line:
            k, v = line.split("\t", 1)
            words[k] = v.split(",")[0].strip()
    return {w: words.get(w, w) for w in wnids}


def _unique_names(wnids: Sequence[str], names: dict[str, str]) -> list[str]:
    """The names of ``wnids``, with `` (<wnid>)`` appended to a name that two of them share."""
    shown = [names[w] for w in wnids]
    dup = {n for n in shown if shown.count(n) > 1}
    return [f"{n} ({w})" if n in dup else n for n, w in zip(shown, wnids)]


class TinyImageNetDataset(TensorImageDataset):
    """A Tiny-ImageNet split in memory; ``files`` are paths relative to the layout's top, ``wnids`` the classes' ids."""

    @property
    def wnids(self) -> list[str]:
        return list(self.class_ids or [])


def load_tiny_imagenet(
    split: str,
    root: str | Path,
    *,
    classes: Any = None,
    image_size: tuple[int, int] = (32, 32),
    channels: int = 3,
) -> TinyImageNetDataset:
    """Load Tiny-ImageNet's training split or its official validation images (``split="test"``).

    Args:
        split: ``"train"`` (500 images per class) or ``"test"`` (the official ``val/``, 50 per class).
        root: the zip archive or the extracted folder.
        classes: ``data.classes`` (:func:`~duallora.data.selection.resolve_classes`: a named list of
            :data:`CLASS_LISTS`, or WordNet ids, names or label ids); label ``i`` is the ``i``-th
            selected class; None = every class, sorted by WordNet id.
        image_size: ``(H, W)`` of the returned images (any size; 64 px or 32 px archives alike).
        channels: 3 (RGB) or 1 (luminance).

    Returns:
        A :class:`TinyImageNetDataset` (``classes`` = names from ``words.txt``, ``class_ids`` and
        ``wnids`` = the selected ids, ``files`` = relative paths, one per item).

    Raises:
        DataError: missing root, a malformed layout (the message lists the expected one), unreadable
            images, unknown classes.
    """
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    reader = _Reader(Path(root))
    all_wnids = sorted(reader.read("wnids.txt").decode("utf-8").split())
    if not all_wnids:
        raise DataError(f"{root}: wnids.txt is empty; {LAYOUT_HELP}")
    names = class_names(root)
    picked = resolve_classes(classes, _unique_names(all_wnids, names), all_wnids, "'tiny-imagenet'")
    chosen = [all_wnids[i] for i in picked]
    images, labels, files = _read_split(str(Path(root).resolve()), split, tuple(chosen))
    ds = TinyImageNetDataset(images, labels, _unique_names(chosen, names), image_size=tuple(image_size),
                             channels=channels, name="tiny-imagenet", source=str(root))
    ds.class_ids = list(chosen)
    ds.files = list(files)
    return ds


def make_tiny_imagenet(top: Path, wnids: Sequence[str], names: dict[str, str], size: int = 8,
                       train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """A stand-in in the official layout under ``top`` (wnids.txt, words.txt, train/, val/), JPEG images."""
    (top / "train").mkdir(parents=True)
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (top / "words.txt").write_text("\n".join(f"{w}\t{n}" for w, n in names.items()) + "\n")
    lines = []
    for c, w in enumerate(sorted(wnids)):
        d = top / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(train_per_class):
            Image.new("RGB", (size, size), color(c, k)).save(d / f"{w}_{k}.JPEG", quality=95)
        for k in range(val_per_class):
            name = f"val_{len(lines)}.JPEG"
            Image.new("RGB", (size, size), color(c, k)).save(top / "val" / "images" / name, quality=95)
            lines.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}")
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return top


@register_source("tiny-imagenet")
class TinyImageNet(DataSource):
    description = "Tiny-ImageNet (zip or folder in its own layout; val/ as the test split)"
    selects_classes = True
    split_files = True

    def load(self, req: LoadRequest) -> TinyImageNetDataset:
        if req.root is None:
            raise DataError(f"tiny-imagenet needs data.root=PATH, its zip archive or extracted folder; {LAYOUT_HELP}")
        ds = load_tiny_imagenet(req.split, req.root, classes=req.classes, image_size=req.image_size,
                                channels=req.channels)
        st = Path(req.root).stat()
        sha = _cached_sha256(str(Path(req.root).resolve()), st.st_mtime_ns, st.st_size)
        ds.split_info = {
            "kind": "official",
            "name": "Tiny-ImageNet train/ and val/ (val/ as the test split)",
            "files": [{"role": "archive", "path": str(req.root), "sha256": sha}],
            "archive_sha256": sha,
            "label_ids": "position in data.classes (default: the sorted WordNet ids of wnids.txt)",
        }
        return ds

    def standin(self, folder: Path) -> StandIn:
        wnids = ["n00000003", "n00000001", "n00000002", "n00000004"]
        names = {"n00000001": "goldfish, Carassius auratus", "n00000002": "tabby, tabby cat", "n00000003": "bullfrog",
                 "n00000004": "goldfish"}
        make_tiny_imagenet(folder / "tiny-imagenet-200", wnids, names, train_per_class=10, val_per_class=2)
        return StandIn(folder, num_classes=4, train=40, test=8)
