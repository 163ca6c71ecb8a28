"""``imagefolder``: images in class folders, read lazily with PIL.

``root`` holds ``train/`` and ``test/`` folders that each hold one folder per class, or directly one
folder per class (then split per class with the seeded, stratified rule of
:func:`~duallora.data.splits.split_files` and ``data.test_fraction``). Label ids: the class folder
names in sorted order. Images are resized to the requested size (bilinear, antialiased); any PIL mode
is converted by :func:`~duallora.data.base.pil_to_8bit` (16-bit images are scaled, not clipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from duallora.data.base import IMAGE_EXTENSIONS, ImageDataset, check_image_files, check_size, is_image, read_pil
from duallora.data.registry import DataSource, LoadRequest, StandIn, register_source
from duallora.data.splits import held_out_count, split_files
from duallora.data.standins import color, png
from duallora.errors import DataError


class ImageFolderDataset(ImageDataset):
    """Images in class folders, read lazily with PIL in ``__getitem__``.

    Args:
        files: image paths, one per item.
        targets: label id of each item.
        classes: class names (sorted folder names), index = label id.
        image_size: ``(H, W)`` the images are resized to (bilinear, antialiased).
        channels: 1 (PIL mode ``L``) or 3 (``RGB``); any mode PIL opens is converted by
            :func:`~duallora.data.base.pil_to_8bit` (16-bit images are scaled, not clipped).

    Raises (in ``__getitem__``):
        DataError: an image cannot be read (names the file).
    """

    def __init__(
        self,
        files: Sequence[Path],
        targets: Sequence[int],
        classes: Sequence[str],
        *,
        image_size: tuple[int, int],
        channels: int,
        source: Optional[str] = None,
    ) -> None:
        self.files = [Path(f) for f in files]
        self.targets = torch.as_tensor(list(targets), dtype=torch.int64)
        self.classes = list(classes)
        self.image_size = check_size(image_size, channels)
        self.channels = channels
        self.name = "imagefolder"
        self.source = source

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms import InterpolationMode  # torchvision is slow to import: only when read
        from torchvision.transforms import functional as TF

        index = int(index)
        im = read_pil(self.files[index], self.channels, "imagefolder", "replace or delete the file")
        if im.size != (self.image_size[1], self.image_size[0]):
            im = TF.resize(im, list(self.image_size), InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(im), int(self.targets[index])

    def _stores_items(self) -> bool:
        return True


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(
        (d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )


def _scan_classes(folder: Path) -> dict[str, list[str]]:
    """``{class name: sorted relative paths of its images}`` for a folder of class folders.

    Raises:
        DataError: no class folders, or a class folder without images.
    """
    dirs = _class_dirs(folder)
    if not dirs:
        raise DataError(
            f"imagefolder: {str(folder)!r} has no class folders; put the images of each class in its "
            "own subfolder (root/CLASS/IMAGE.png), optionally under root/train/ and root/test/"
        )
    out: dict[str, list[str]] = {}
    for d in dirs:
        files = sorted(p.relative_to(folder).as_posix() for p in d.rglob("*") if is_image(p))
        if not files:
            raise DataError(
                f"imagefolder: class folder {str(d)!r} has no images (accepted extensions: "
                f"{' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        out[d.name] = files
    return out


def _presplit_items(root: str, train_dir: Path, test_dir: Path,
                    split: str) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
    """Classes, ``split``'s items and every file of both splits, from ``train/`` and ``test/`` folders."""
    per_split = {"train": _scan_classes(train_dir), "test": _scan_classes(test_dir)}
    a, b = set(per_split["train"]), set(per_split["test"])
    if a != b:
        raise DataError(
            f"imagefolder: train/ and test/ in {root!r} hold different classes "
            f"(only in train: {sorted(a - b)}, only in test: {sorted(b - a)}); "
            "give both the same class folders"
        )
    classes = sorted(a)
    folder = train_dir if split == "train" else test_dir
    files = per_split[split]
    items = [(folder / f, i) for i, c in enumerate(classes) for f in files[c]]
    every_file = [d / f for d, sp in ((train_dir, "train"), (test_dir, "test"))
                  for fs in per_split[sp].values() for f in fs]
    return classes, items, every_file


def _flat_items(base: Path, split: str, seed: int,
                test_fraction: float) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
    """Classes, ``split``'s items and every file, from class folders split by :func:`split_files`."""
    for present, other in ((base / "train", base / "test"), (base / "test", base / "train")):
        if present.is_dir() and _class_dirs(present):
            raise DataError(
                f"imagefolder: {str(present)!r} exists but {str(other)!r} does not; give both "
                "train/ and test/ (each with one folder per class), or put the class folders "
                "directly in data.root to split them by data.test_fraction"
            )
    per_class = _scan_classes(base)
    classes = sorted(per_class)
    items = []
    for i, c in enumerate(classes):
        train_f, test_f = split_files(per_class[c], c, seed=seed, test_fraction=test_fraction)
        items += [(base / f, i) for f in (train_f if split == "train" else test_f)]
    every_file = [base / f for fs in per_class.values() for f in fs]
    return classes, items, every_file


def load_imagefolder(
    split: str,
    root: Optional[str],
    image_size: tuple[int, int],
    channels: int,
    seed: int,
    test_fraction: float,
    check_images: bool = True,
) -> ImageFolderDataset:
    """One split of an image folder (module docstring).

    Raises:
        DataError: no root, a root that is not a folder, no class folders, a class folder without
            images, train/ and test/ with different classes or only one of them, or (``check_images``)
            image files that are empty or unreadable (both splits checked at once).
    """
    if root is None:
        raise DataError(
            "imagefolder needs data.root=FOLDER: a folder with one subfolder per class "
            "(or train/ and test/ folders that each hold one subfolder per class)"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"imagefolder: data.root={root!r} does not exist or is not a folder")
    train_dir, test_dir = base / "train", base / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        classes, items, every_file = _presplit_items(root, train_dir, test_dir, split)
    else:
        classes, items, every_file = _flat_items(base, split, seed, test_fraction)
    if check_images:  # both splits at once, so that every bad file is named in one error
        check_image_files(every_file, "imagefolder")
    return ImageFolderDataset(
        [p for p, _ in items],
        [t for _, t in items],
        classes,
        image_size=image_size,
        channels=channels,
        source=str(base),
    )


def make_class_folders(root: Path, classes: Sequence[str] = ("cat", "dog", "emu"), per_class: int = 5) -> Path:
    """A stand-in: ``root/<class>/<i>.png``, one-colour 8x8 images (colour = class, brightness = item)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            png(root / name / f"{i}.png", color(c, i))
    return root


@register_source("imagefolder")
class ImageFolder(DataSource):
    description = "class folders of images (data.root; train/ + test/, or split by data.test_fraction)"
    uses_test_fraction = True

    def load(self, req: LoadRequest) -> ImageFolderDataset:
        return load_imagefolder(req.split, req.root, req.image_size, req.channels, req.seed, req.test_fraction,
                                req.check_images)

    def standin(self, folder: Path) -> StandIn:
        make_class_folders(folder, per_class=5)
        n_test = held_out_count(5, 0.2)
        return StandIn(folder, num_classes=3, train=3 * (5 - n_test), test=3 * n_test)
