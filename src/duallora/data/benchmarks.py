"""What the paper family's benchmarks share: lazy datasets through timm transforms, split records, count checks.

The benchmarks themselves are sources in :mod:`duallora.data.sources` (``cifar100``, ``imagenet-r``,
``imagenet-a``, ``domainnet``, ``cub200``), each a :class:`BenchmarkSource` that builds an
:class:`Index` of both splits (cached per process) from a local ``root``; only ``cifar100`` with no
root may download, with torchvision's own tooling, where the network allows. A missing or malformed
root is a :class:`DataError` that shows the expected layout (the source's ``spec.layout``). Image
and class counts are checked against the real dataset's and a mismatch is a
:class:`DataCountWarning` with the numbers (a subset or another version of the data would not be
comparable with published results).

Large datasets load lazily: a list of files, each image opened with PIL in ``__getitem__`` and turned
into a ``uint8 (C, H, W)`` tensor at the backbone's input size by timm's transform
(:mod:`duallora.data.transforms`); CIFAR-100 (180 MB of 32x32 pixels) is held in memory and resized
per item. Nothing is normalised here: the model normalises with its backbone's mean and std.

The record of every split (``split_info``) names the split used (``kind``, ``name``), the split files
read with their sha256 (``files``), the rule of its label ids, its counts and count mismatches, and
for file lists ``list_sha256``: sha256 of the resolved ``<relative path>\\t<label>`` lines per split.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from duallora.backbones import file_sha256  # noqa: F401 (re-exported: split files are hashed the same way)
from duallora.data.base import ImageDataset, check_image_files, read_pil
from duallora.data.registry import DataSource, LoadRequest, get_source
from duallora.data.splits import files_record, labels_from_lists, list_sha256, read_split_file, resolve_entries
from duallora.data.transforms import (
    TransformConfig,
    build_transform,
    default_transform_config,
    describe_transform,
    to_uint8_chw,
)
from duallora.errors import DataError, DualLoRAWarning


class DataCountWarning(DualLoRAWarning):
    """The data found differs in image or class count from the real benchmark."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the real dataset looks like.

    Attributes:
        name: the ``data.dataset`` name.
        num_classes: classes of the real dataset.
        train, test: images per split of the standard split (None: no fixed split).
        total: all images (train + test).
        per_split_kinds: split kinds to which ``train``/``test`` apply (e.g. not to a stratified split).
        task_layouts: numbers of tasks the papers use (equal classes per task).
        layout: the expected folder layout (shown in errors).
        source: where to get the data.
    """

    name: str
    num_classes: int
    train: Optional[int]
    test: Optional[int]
    total: int
    per_split_kinds: tuple[str, ...]
    task_layouts: tuple[int, ...]
    layout: str
    source: str


def check_counts(name: str, num_classes: int, n_train: int, n_test: int, kind: str, where: str) -> list[str]:
    """Compare with the real dataset's counts (its source's ``spec``); warn (:class:`DataCountWarning`) on a mismatch.

    Returns:
        the mismatches found (also recorded in the split record), empty when all agree.
    """
    spec = get_source(name).spec
    problems = []
    if num_classes != spec.num_classes:
        problems.append(f"{num_classes} classes (expected {spec.num_classes})")
    if n_train + n_test != spec.total:
        problems.append(f"{n_train + n_test:,} images (expected {spec.total:,})")
    if kind in spec.per_split_kinds:
        if spec.train is not None and n_train != spec.train:
            problems.append(f"{n_train:,} train images (expected {spec.train:,})")
        if spec.test is not None and n_test != spec.test:
            problems.append(f"{n_test:,} test images (expected {spec.test:,})")
    if problems:
        warnings.warn(
            f"{name}: found {', '.join(problems)} in {where}; a subset or another version of the "
            "dataset gives results that are not comparable with published numbers",
            DataCountWarning,
            stacklevel=3,
        )
    return problems


# ------------------------------------------------------------------------------------ datasets


class BenchmarkDataset(ImageDataset):
    """A benchmark split: lazy items through a timm transform to ``uint8 (C, H, W)``.

    Attributes (besides :class:`ImageDataset`'s):
        split_info: the split's identity (kind, name, files with sha256, list hashes, counts).
        transform_info: the transform's steps, its settings and whether it augments.
    """

    split_info: dict[str, Any]
    transform_info: dict[str, Any]

    def _setup(self, targets: Sequence[int], classes: Sequence[str], tc: TransformConfig, augment: bool,
               name: str, source: str, split_info: dict[str, Any]) -> None:
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.classes = list(classes)
        self.image_size = tc.image_size
        self.channels = tc.channels
        self.name = name
        self.source = source
        self.split_info = split_info
        self.transform = build_transform(tc, augment=augment)
        self.transform_info = {"augment": augment, "settings": tc.to_dict(),
                               "steps": describe_transform(self.transform)}

    def _pil(self, index: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _stores_items(self) -> bool:
        return True

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        im = self._pil(index)
        out = self.transform(im)
        return to_uint8_chw(out, self.channels, self.image_size, f"{self.name} item {index}"), int(self.targets[index])


class FileListDataset(BenchmarkDataset):
    """Images given by file paths, opened with PIL on access (nothing is held in memory).

    Raises (in ``__getitem__``):
        DataError: an image cannot be read (names the file).
    """

    def __init__(self, files: Sequence[str], targets: Sequence[int], classes: Sequence[str], *,
                 transform: TransformConfig, augment: bool, name: str, source: str,
                 split_info: dict[str, Any]) -> None:
        self.files = [str(f) for f in files]
        self._setup(targets, classes, transform, augment, name, source, split_info)

    def _pil(self, index: int) -> Any:
        return read_pil(self.files[index], self.channels, self.name, "replace the file with an intact copy")


class ArrayImageDataset(BenchmarkDataset):
    """Images held as a ``uint8 (N, H, W, 3)`` array (CIFAR-100), transformed per item."""

    item_attributes = ("images",)

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str], *,
                 transform: TransformConfig, augment: bool, name: str, source: str,
                 split_info: dict[str, Any]) -> None:
        self.images = images
        self._setup(targets, classes, transform, augment, name, source, split_info)

    def _pil(self, index: int) -> Any:
        im = Image.fromarray(self.images[index])
        return im.convert("L") if self.channels == 1 else im


# ------------------------------------------------------------------------------------ indexes


@dataclass
class Index:
    """Both splits of one benchmark, as built once per process (cached)."""

    classes: list[str]
    items: dict[str, Any]  # split -> list[(path, label)] or (images array, labels)
    split_info: dict[str, Any]
    source: str
    arrays: bool = False
    files: list[dict[str, str]] = field(default_factory=list)


class BenchmarkSource(DataSource):
    """A benchmark: :meth:`build_index` reads both splits; :meth:`load` serves one through the timm transform."""

    benchmark = True
    augments = True
    split_files = True
    spec: BenchmarkSpec

    def build_index(self, root: Optional[str], split_train: list[str], split_test: list[str], seed: int,
                    test_fraction: float) -> Index:  # pragma: no cover - abstract
        raise NotImplementedError

    def layout_error(self, problem: str) -> DataError:
        """``"<name>: <problem>"`` followed by the expected layout."""
        return DataError(f"{self.name}: {problem}\n{self.spec.layout}")

    def need_root(self, root: Optional[str]) -> Path:
        """``root`` as an existing folder.

        Raises:
            DataError: no root, or not a folder (with the layout).
        """
        if root is None:
            raise self.layout_error("needs data.root=FOLDER (no default location, no download)")
        base = Path(root).expanduser()
        if not base.is_dir():
            raise self.layout_error(f"data.root={root!r} does not exist or is not a folder")
        return base

    def index_from_given_lists(self, base: Path, split_train: list[str], split_test: list[str]) -> Index:
        """Both splits from the lists given as ``data.split_train`` / ``data.split_test`` (file lists)."""
        label = "split lists " + ", ".join(Path(f).name for f in split_train + split_test)
        return self.index_from_lists(base, split_train, split_test, "files", label)

    def index_from_lists(self, base: Path, train_files: list[str], test_files: list[str], kind: str,
                         label: str) -> Index:
        """Both splits from split list files (labels from the lists, :func:`labels_from_lists`)."""
        per_split: dict[str, list[tuple[Path, int]]] = {}
        for split, files in (("train", train_files), ("test", test_files)):
            entries: list[tuple[str, int]] = []
            for f in files:
                entries += read_split_file(f)
            if not entries:
                raise self.layout_error(f"the {split} split lists {files} hold no images")
            what = " + ".join(Path(f).name for f in files)
            paths = resolve_entries(base, [e for e, _ in entries], what, self.name, self.spec.layout)
            per_split[split] = [(p, lab) for p, (_, lab) in zip(paths, entries)]
        classes, items, rule = labels_from_lists(self.name, per_split)
        files_rec = files_record([("train", Path(f).expanduser()) for f in train_files]
                                 + [("test", Path(f).expanduser()) for f in test_files])
        info = {"kind": kind, "name": label, "files": files_rec, "label_ids": rule}
        return Index(classes, items, info, str(base), files=files_rec)

    def load(self, req: LoadRequest) -> BenchmarkDataset:
        tc = req.transform if req.transform is not None else default_transform_config(req.image_size, req.channels)
        root = None if req.root is None else str(req.root)
        index = _cached_index(self, root, tuple(req.split_train), tuple(req.split_test), int(req.seed),
                              float(req.test_fraction), _stamp([root, *req.split_train, *req.split_test]))
        info = dict(index.split_info)
        if index.arrays:
            images, labels = index.items[req.split]
            return ArrayImageDataset(images, labels, index.classes, transform=tc, augment=req.augment,
                                     name=self.name, source=index.source, split_info=info)
        items = index.items[req.split]
        dataset = FileListDataset([p for p, _ in items], [t for _, t in items], index.classes, transform=tc,
                                  augment=req.augment, name=self.name, source=index.source, split_info=info)
        if req.check_images and dataset.files:
            check_image_files(dataset.files, f"{self.name} ({req.split} split)")
        return dataset


def _stamp(paths: Sequence[Optional[str]]) -> tuple:
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = Path(p).expanduser().stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _cached_index(source: BenchmarkSource, root: Optional[str], split_train: tuple[str, ...],
                  split_test: tuple[str, ...], seed: int, test_fraction: float, stamp: tuple) -> Index:
    index = source.build_index(root, list(split_train), list(split_test), seed, test_fraction)
    n_train = len(index.items["train"][1]) if index.arrays else len(index.items["train"])
    n_test = len(index.items["test"][1]) if index.arrays else len(index.items["test"])
    index.split_info["counts"] = {"train": n_train, "test": n_test, "classes": len(index.classes)}
    if not index.arrays:
        base = Path(index.source)
        index.split_info["list_sha256"] = {s: list_sha256(base, index.items[s]) for s in ("train", "test")}
    index.split_info["count_mismatches"] = check_counts(
        source.name, len(index.classes), n_train, n_test, index.split_info["kind"], index.source
    )
    return index


def clear_cache() -> None:
    """Forget the indexes built so far (they are rebuilt on the next load)."""
    _cached_index.cache_clear()
