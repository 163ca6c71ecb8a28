"""A folder of class folders read as one task (``duallora learn``) or as labelled images (``duallora evaluate``).

``FOLDER/<class name>/<image>`` (images found recursively below each class folder, hidden files and
folders skipped, the accepted extensions of :data:`duallora.data.base.IMAGE_EXTENSIONS`), the same
layout and rules as ``data.dataset=imagefolder`` without ``train/``/``test/`` (docs/model-directory.md).
Classes are taken in sorted name order and the files of a class in sorted path order, which is the
order ``duallora run`` gives a task's images of an image folder, so learning a folder equals learning
the same classes inside a run (the equivalence test of ``tests/test_model_dir.py``).

Every check runs before anything is learned and raises :class:`~duallora.errors.DataError` naming the
cause and the fix: no such folder, no class folder, a class folder without images, a class with fewer
images than the method needs, unreadable image files, and images whose channels do not match the
backbone's (colour images for a 1-channel backbone or grey ones for an RGB backbone; ``convert_channels``
accepts them, converting as ``imagefolder`` does).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from duallora.errors import DataError

#: PIL modes of single-channel images; every other mode is a colour image.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"})


@dataclass
class TaskFolder:
    """The classes and image files of a folder of class folders.

    Attributes:
        root: the folder.
        classes: class names (the class folders' names in Unicode NFC form, so that a name typed or
            written by another system in decomposed form is the same class), in sorted folder order.
        files: ``files[i]`` the image files of ``classes[i]``, sorted by their path relative to ``root``.
        skipped: files in the class folders that were left out (not an accepted image extension; hidden
            files excluded), e.g. ``.tif`` images or notes, so that a caller can say so.
    """

    root: Path
    classes: list[str]
    files: list[list[Path]]
    skipped: int = 0

    @property
    def num_images(self) -> int:
        """All image files of all classes."""
        return sum(len(f) for f in self.files)

    def items(self, label_ids: Sequence[int]) -> tuple[list[Path], list[int]]:
        """``(files, labels)``: every image in class order, class ``i`` labelled ``label_ids[i]``."""
        if len(label_ids) != len(self.classes):
            raise ValueError(f"{len(label_ids)} label ids for {len(self.classes)} classes")
        files = [f for fs in self.files for f in fs]
        labels = [int(label) for label, fs in zip(label_ids, self.files) for _ in fs]
        return files, labels

    def sha256(self) -> str:
        """A hex sha256 of the folder's content: every class name, relative path and file content, in order.

        Two folders with the same classes and the same image bytes under the same names hash alike,
        wherever they lie.
        """
        h = hashlib.sha256()
        for name, files in zip(self.classes, self.files):
            h.update(f"class {name}\n".encode())
            for f in files:
                h.update(f"{f.relative_to(self.root).as_posix()}\n".encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()


def scan_task_folder(folder: str | Path, *, min_images: int = 1) -> TaskFolder:
    """Find the class folders and their images under ``folder``.

    Args:
        folder: a folder holding one folder per class.
        min_images: fewest images a class may have (the method's :attr:`min_images_per_class`).

    Raises:
        DataError: ``folder`` is missing or not a folder, holds no class folder (or only empty ones),
            a class folder holds no image, or a class has fewer than ``min_images`` images.
    """
    from duallora.data.base import IMAGE_EXTENSIONS, is_image

    root = Path(folder)
    if not root.exists():
        raise DataError(f"{str(root)!r} does not exist; give a folder with one subfolder of images per class")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file, not a folder; give a folder with one subfolder of images "
                        "per class (FOLDER/CLASS/IMAGE.png)")
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not dirs:
        raise DataError(f"{str(root)!r} holds no class folder; put the images of each class in its own subfolder "
                        "named after the class (FOLDER/CLASS/IMAGE.png)")
    classes: list[str] = []
    files: list[list[Path]] = []
    empty: list[str] = []
    skipped = 0
    for d in dirs:
        visible = [p for p in d.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(d).parts)]
        found = sorted((p for p in visible if is_image(p)), key=lambda p: p.relative_to(root).as_posix())
        skipped += len(visible) - len(found)
        if not found:
            empty.append(d.name)
        classes.append(unicodedata.normalize("NFC", d.name))
        files.append(found)
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise DataError(f"class folders in {str(root)!r} name the same class twice ({', '.join(map(repr, twice))}, "
                        "written in different Unicode forms); merge them into one folder")
    split = {"train", "test", "val", "validation"} & set(classes)
    if "train" in split and len(split) > 1 and all(any(q.is_dir() for q in (root / s).iterdir()) for s in split):
        raise DataError(f"{str(root)!r} looks like a data set with {' and '.join(sorted(split))} splits, not a folder "
                        f"of classes; give {root / 'train'} to learn (and e.g. {root / 'test'} to evaluate)")
    if empty:
        raise DataError(f"class folder(s) {', '.join(repr(e) for e in empty)} in {str(root)!r} hold no image "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)")
    few = [(c, len(f)) for c, f in zip(classes, files) if len(f) < min_images]
    if few:
        listed = ", ".join(f"{c!r} ({n})" for c, n in few)
        raise DataError(f"class(es) {listed} in {str(root)!r} have fewer than the {min_images} images per class "
                        "that this method needs; add images to them or leave them out of this folder")
    return TaskFolder(root, classes, files, skipped)


def check_channels(folder: TaskFolder, channels: int, *, convert: bool = False) -> None:
    """Check that the images are grey for a 1-channel backbone and colour for a 3-channel one.

    Only image headers are read (PIL's mode). With ``convert`` nothing is checked: images are then
    converted to the backbone's channels when read (:func:`duallora.data.base.pil_to_8bit`).

    Raises:
        DataError: naming how many images do not match, a few of them, and the fix.
    """
    if convert:
        return
    from PIL import Image

    wrong: list[tuple[Path, str]] = []
    for f in (f for fs in folder.files for f in fs):
        try:
            with Image.open(f) as im:
                mode = im.mode
        except Exception:  # unreadable files are reported by check_image_files
            continue
        grey = mode in GREY_MODES
        if (channels == 1 and not grey) or (channels == 3 and grey):
            wrong.append((f, mode))
    if wrong:
        kind, want = ("colour", "grey (1-channel)") if channels == 1 else ("grey", "colour (RGB)")
        listed = ", ".join(f"{str(p)!r} (mode {m})" for p, m in wrong[:3])
        raise DataError(
            f"{len(wrong)} of {folder.num_images} images in {str(folder.root)!r} are {kind} but the model's "
            f"backbone reads {want} images (e.g. {listed}); convert the images, or pass --convert-channels "
            "to convert them when read")


def check_files(folder: TaskFolder, check_images: bool = True) -> None:
    """Check that every image file is non-empty and has a readable header (``data.check_images``).

    Raises:
        DataError: the bad files and the fix (:func:`duallora.data.base.check_image_files`).
    """
    if check_images:
        from duallora.data.base import check_image_files

        check_image_files([f for fs in folder.files for f in fs], f"folder {folder.root}")


def dataset_of(folder: TaskFolder, label_ids: Sequence[int], input_size: Sequence[int],
               source: Optional[str] = None):
    """The folder's images as an :class:`~duallora.data.sources.imagefolder.ImageFolderDataset` of the
    backbone's ``input_size`` ``(C, H, W)``, class ``i`` labelled ``label_ids[i]``; items in class order."""
    from duallora.data.sources.imagefolder import ImageFolderDataset

    files, labels = folder.items(label_ids)
    channels, height, width = (int(v) for v in input_size)
    names = {int(i): c for i, c in zip(label_ids, folder.classes)}
    classes = [names.get(i, str(i)) for i in range(max(names) + 1)]
    return ImageFolderDataset(files, labels, classes, image_size=(height, width), channels=channels,
                              source=source or str(folder.root))
