"""Tiny-ImageNet in its own layout, from a zip archive or an extracted folder, at any resolution.

Layout (the official 64x64 download and the 32x32 re-encoding share it; one top folder may wrap it)::

    wnids.txt                                  the 200 WordNet ids, one a line
    words.txt                                  WordNet id <TAB> comma-separated names
    train/<wnid>/images/<wnid>_<k>.JPEG        500 training images per class
    val/images/val_<k>.JPEG                    50 validation images per class
    val/val_annotations.txt                    file <TAB> wnid <TAB> box

The official validation images serve as the **test** split (the official ``test/`` has no labels and
is ignored). Class names are the first name in ``words.txt`` (made unique by appending the WordNet id
where two classes share a name). Images are decoded once into a ``uint8`` tensor and resized to the
requested size (bilinear, antialiased) by :func:`duallora.data.datasets.convert_images`.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from duallora.data.tiny_imagenet_classes import CONTINUAL_WNIDS, PRETRAIN_WNIDS
from duallora.errors import DataError

#: Named class lists usable as ``data.classes`` (see :mod:`duallora.data.tiny_imagenet_classes`).
CLASS_LISTS: dict[str, tuple[str, ...]] = {
    "tiny-imagenet-pretrain": PRETRAIN_WNIDS,
    "tiny-imagenet-continual": CONTINUAL_WNIDS,
}

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
    h = hashlib.sha256()
    if root.is_file():
        with open(root, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if not root.is_dir():
        raise DataError(f"Tiny-ImageNet root {root} does not exist")
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def resolve_classes(classes: Optional[Sequence[str] | str], wnids: Sequence[str]) -> list[str]:
    """The WordNet ids selected by ``classes``, in the given order.

    Args:
        classes: None (all of ``wnids``, sorted), a name of :data:`CLASS_LISTS`, or a list of WordNet
            ids.
        wnids: the ids of ``wnids.txt``.

    Raises:
        DataError: an unknown list name, an id not in ``wnids.txt``, or a repeated id.
    """
    if classes is None:
        return sorted(wnids)
    if isinstance(classes, str):
        if classes not in CLASS_LISTS:
            raise DataError(
                f"unknown class list {classes!r}; use one of {', '.join(CLASS_LISTS)} or a list of WordNet ids"
            )
        chosen = list(CLASS_LISTS[classes])
    else:
        chosen = [str(c) for c in classes]
    known = set(wnids)
    missing = [c for c in chosen if c not in known]
    if missing:
        raise DataError(f"classes not in wnids.txt: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if len(set(chosen)) != len(chosen):
        raise DataError("data.classes lists a class twice")
    return chosen


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {name}: {exc}") from exc


@lru_cache(maxsize=4)
def _read_split(root: str, split: str, wnids_key: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Decode one split: uint8 ``(N, 3, H, W)`` at the archive's resolution, labels, file names."""
    reader = _Reader(Path(root))
    index = {w: i for i, w in enumerate(wnids_key)}
    files: list[tuple[str, int]] = []
    if split == "train":
        for w in wnids_key:
            listed = [f for f in reader.list(f"train/{w}/images") if f.lower().endswith((".jpeg", ".jpg", ".png"))]
            if not listed:
                raise DataError(f"{root}: no images in train/{w}/images; {LAYOUT_HELP}")
            files += [(f, index[w]) for f in listed]
    else:
        ann = reader.read("val/val_annotations.txt").decode("utf-8")
        for line in ann.splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] in index:
                files.append((f"val/images/{parts[0]}", index[parts[1]]))
        files.sort()
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


def load_tiny_imagenet(
    split: str,
    root: str | Path,
    *,
    classes: Optional[Sequence[str] | str] = None,
    image_size: tuple[int, int] = (32, 32),
    channels: int = 3,
):
    """Load Tiny-ImageNet's training split or its official validation images (``split="test"``).

    Args:
        split: ``"train"`` (500 images per class) or ``"test"`` (the official ``val/``, 50 per class).
        root: the zip archive or the extracted folder.
        classes: see :func:`resolve_classes`; label ``i`` is the ``i``-th selected class.
        image_size: ``(H, W)`` of the returned images (any size; 64 px or 32 px archives alike).
        channels: 3 (RGB) or 1 (luminance).

    Returns:
        A :class:`~duallora.data.datasets.TensorImageDataset` (``classes`` = names from
        ``words.txt``) with the extra attributes ``wnids`` (selected ids) and ``files`` (relative
        paths, one per item).

    Raises:
        DataError: missing root, a malformed layout (the message lists the expected one), unreadable
            images, unknown classes.
    """
    from duallora.data.datasets import TensorImageDataset

    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    reader = _Reader(Path(root))
    all_wnids = reader.read("wnids.txt").decode("utf-8").split()
    if not all_wnids:
        raise DataError(f"{root}: wnids.txt is empty; {LAYOUT_HELP}")
    chosen = resolve_classes(classes, all_wnids)
    names = class_names(root)
    shown = [names[w] for w in chosen]
    dup = {n for n in shown if shown.count(n) > 1}
    shown = [f"{n} ({w})" if n in dup else n for n, w in zip(shown, chosen)]
    images, labels, files = _read_split(str(Path(root).resolve()), split, tuple(chosen))
    ds = TensorImageDataset(
        images, labels, shown, image_size=tuple(image_size), channels=channels, name="tiny-imagenet",
        source=str(root),
    )
    ds.wnids = list(chosen)
    ds.files = list(files)
    return ds
