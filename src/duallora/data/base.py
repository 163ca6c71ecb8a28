"""The bottom layer of the data package: the dataset contract, in-memory images, PIL image reading and checks.

Every dataset is an :class:`ImageDataset`: ``dataset[i]`` is ``(image, label)`` with ``image`` a
``uint8`` tensor of shape ``(C, H, W)`` at the dataset's ``image_size`` and ``channels`` and ``label``
a python ``int`` (the dataset's label id, an index into ``dataset.classes``). Nothing is normalised
here; the model normalises with its backbone's mean and std.

Layers (each imports only the ones above it): this module; :mod:`~duallora.data.transforms`;
:mod:`~duallora.data.splits` (split rules and split lists); :mod:`~duallora.data.registry` (data
sources and named class lists); :mod:`~duallora.data.selection` (``data.classes``, the validation
split); :mod:`~duallora.data.benchmarks` (the benchmarks' shared machinery); the sources in
:mod:`duallora.data.sources`; :mod:`~duallora.data.datasets` (``load_dataset``);
:mod:`~duallora.data.scenarios`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from duallora.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Where torchvision downloads go when no local files are found.
DOWNLOAD_DIR = Path.home() / ".cache" / "duallora" / "data"
#: Whole in-memory datasets up to this many bytes (after resizing) are converted once at load time.
MAX_PRECONVERT_BYTES = 2_000_000_000
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def _take(values: Any, indices: list[int]) -> Any:
    """``values`` (a tensor, an array or a list) at ``indices``."""
    if isinstance(values, torch.Tensor):
        return values[torch.as_tensor(indices, dtype=torch.int64)]
    if isinstance(values, np.ndarray):
        return values[np.asarray(indices, dtype=np.int64)]
    return [values[i] for i in indices]


class ImageDataset(torch.utils.data.Dataset):
    """Images with integer labels.

    ``__getitem__(i)`` returns ``(image, label)``: ``image`` a ``uint8`` tensor ``(C, H, W)`` at
    :attr:`image_size` and :attr:`channels`, ``label`` an ``int`` in ``[0, len(classes))``.

    Attributes:
        targets: ``(N,)`` int64 tensor of label ids, ``targets[i]`` is the label of item ``i``.
        classes: class names; index = label id.
        class_ids: the dataset's own identifiers of its classes where they differ from the names
            (Tiny-ImageNet: WordNet ids), index = label id; None where the names are the identifiers.
        image_size: ``(H, W)`` of the returned images.
        channels: 1 (grayscale) or 3 (RGB).
        name: dataset name (``"mnist"``, ``"fashion-mnist"``, ``"imagefolder"``, ...) or None.
        source: where the data was read from (a folder), or None for synthetic data.
        split: ``"train"``, ``"validation"`` or ``"test"`` when loaded by ``load_dataset``, else None.
    """

    targets: torch.Tensor
    classes: list[str]
    class_ids: Optional[list[str]] = None
    image_size: tuple[int, int]
    channels: int
    name: Optional[str] = None
    source: Optional[str] = None
    split: Optional[str] = None
    #: Attributes holding one entry per item, subset by :meth:`select` (absent ones are skipped).
    item_attributes: tuple[str, ...] = ("files",)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={len(self.classes)}, "
            f"size={self.channels}x{self.image_size[0]}x{self.image_size[1]})"
        )

    def select(self, indices: Sequence[int], targets: Optional[Sequence[int]] = None,
               classes: Optional[Sequence[str]] = None, class_ids: Optional[Sequence[str]] = None) -> ImageDataset:
        """The items ``indices`` (in that order) as a dataset, optionally relabelled.

        Datasets that store their items in :attr:`item_attributes` (every dataset of this package)
        return a copy of their own type holding only those items; others a :class:`SelectedDataset`
        view.

        Args:
            indices: item indices into this dataset.
            targets: the new label id of each selected item; None keeps the labels.
            classes, class_ids: the new class names and identifiers (with ``targets``); None keeps them.
        """
        idx = [int(i) for i in indices]
        new_targets = (_take(self.targets, idx) if targets is None
                       else torch.as_tensor(np.asarray(targets, dtype=np.int64)).reshape(-1))
        if not self._stores_items():
            return SelectedDataset(self, idx, new_targets, classes, class_ids)
        out = copy.copy(self)
        for attr in self.item_attributes:
            if getattr(self, attr, None) is not None:
                setattr(out, attr, _take(getattr(self, attr), idx))
        out.targets = new_targets
        if classes is not None:
            out.classes = list(classes)
            out.class_ids = None if class_ids is None else list(class_ids)
        return out

    def _stores_items(self) -> bool:
        """Whether :attr:`item_attributes` hold everything ``__getitem__`` reads (True for this package's)."""
        return False


class SelectedDataset(ImageDataset):
    """Some items of another :class:`ImageDataset`, optionally relabelled (see :meth:`ImageDataset.select`)."""

    def __init__(self, parent: ImageDataset, indices: list[int], targets: torch.Tensor,
                 classes: Optional[Sequence[str]], class_ids: Optional[Sequence[str]]) -> None:
        self.parent = parent
        self.indices = list(indices)
        self.targets = targets
        self.classes = list(parent.classes if classes is None else classes)
        self.class_ids = parent.class_ids if classes is None else (None if class_ids is None else list(class_ids))
        self.image_size = parent.image_size
        self.channels = parent.channels
        self.name = parent.name
        self.source = parent.source
        self.split = parent.split
        for key in ("split_info", "transform_info"):
            if hasattr(parent, key):
                setattr(self, key, getattr(parent, key))
        if getattr(parent, "files", None) is not None:
            self.files = _take(parent.files, self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        image, _ = self.parent[self.indices[index]]
        return image, int(self.targets[index])


def check_size(image_size: Sequence[int], channels: int) -> tuple[int, int]:
    """``(H, W)`` as ints, checked with the channel count.

    Raises:
        DataError: not a pair of positive ints, or ``channels`` not 1 or 3.
    """
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError) as exc:
        raise DataError(f"image_size={image_size!r} must be a pair (height, width)") from exc
    if h < 1 or w < 1:
        raise DataError(f"image_size={image_size!r} must be positive")
    if channels not in (1, 3):
        raise DataError(f"channels={channels!r} is not supported; use 1 (grayscale) or 3 (RGB)")
    return h, w


def convert_images(
    images: torch.Tensor, image_size: tuple[int, int], channels: int, chunk: int = 4096
) -> torch.Tensor:
    """Resize and convert a batch of ``uint8`` images.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)`` with ``C`` 1 or 3.
        image_size: target ``(H', W')``; bilinear with antialiasing, rounded back to ``uint8``.
        channels: target channel count; 1->3 repeats the gray channel, 3->1 takes the luminance
            ``0.299 R + 0.587 G + 0.114 B``.
        chunk: images converted at a time (bounds the float32 working memory).

    Returns:
        ``uint8`` tensor ``(N, channels, H', W')``; the input itself when nothing changes.
    """
    n, c, h, w = images.shape
    if (h, w) == tuple(image_size) and c == channels:
        return images
    out = torch.empty((n, channels, *image_size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].to(torch.float32)
        if c == 3 and channels == 1:
            x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        if (h, w) != tuple(image_size):
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out[start : start + chunk] = x
    return out


class TensorImageDataset(ImageDataset):
    """An in-memory :class:`ImageDataset` (also the way to make synthetic data in tests).

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)``, ``C`` 1 or 3.
        targets: ``N`` integer label ids in ``[0, len(classes))`` (tensor, array or list).
        classes: class names, index = label id.
        image_size: ``(H, W)`` of returned images; None keeps the stored size.
        channels: 1 or 3; None keeps the stored channels.
        name, source: recorded in :attr:`name` / :attr:`source`.

    The whole tensor is converted once when the converted size is at most
    :data:`MAX_PRECONVERT_BYTES`, else each item is converted in ``__getitem__``.

    Raises:
        DataError: images not ``uint8`` ``(N, C, H, W)``, targets of another length or out of range.
    """

    item_attributes = ("files", "_images")

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | np.ndarray | Sequence[int],
        classes: Sequence[str],
        *,
        image_size: Optional[tuple[int, int]] = None,
        channels: Optional[int] = None,
        name: Optional[str] = None,
        source: Optional[str] = None,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError("images must be a uint8 tensor of shape (N, C, H, W)")
        if images.shape[1] not in (1, 3):
            raise DataError(f"images have {images.shape[1]} channels; 1 or 3 are supported")
        targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.int64).reshape(-1)
        if targets_t.shape[0] != images.shape[0]:
            raise DataError(f"{images.shape[0]} images but {targets_t.shape[0]} targets")
        self.classes = [str(c) for c in classes]
        if targets_t.numel() and (int(targets_t.min()) < 0 or int(targets_t.max()) >= len(self.classes)):
            raise DataError(
                f"targets must lie in [0, {len(self.classes)}) (one per class name); "
                f"got range [{int(targets_t.min())}, {int(targets_t.max())}]"
            )
        channels = int(images.shape[1]) if channels is None else channels
        size = tuple(images.shape[2:]) if image_size is None else image_size
        self.image_size = check_size(size, channels)
        self.channels = channels
        self.targets = targets_t
        self.name = name
        self.source = source
        n = images.shape[0]
        if n * channels * self.image_size[0] * self.image_size[1] <= MAX_PRECONVERT_BYTES:
            self._images = convert_images(images, self.image_size, channels)
            self._lazy = False
        else:
            self._images = images
            self._lazy = True

    @property
    def images(self) -> torch.Tensor:
        """The stored ``uint8`` images (already converted unless the dataset converts per item)."""
        return self._images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        img = self._images[index]
        if self._lazy:
            img = convert_images(img.unsqueeze(0), self.image_size, self.channels)[0]
        return img, int(self.targets[index])

    def _stores_items(self) -> bool:
        return True


# ------------------------------------------------------------------------------------- PIL images


#: PIL modes holding more than 8 bits per pixel, with the value that maps to 255 (see :func:`pil_to_8bit`).
HIGH_BIT_MODES: dict[str, float] = {
    "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
    "I": 65535.0,  # 32-bit int: what 16-bit PNG/PGM greyscale opens as in older Pillow, or I;16 converted
    "F": 1.0,  # 32-bit float: taken as intensities in [0, 1]
}


def pil_to_8bit(im: Any, channels: int) -> Any:
    """Convert a PIL image of any mode to 8-bit ``L`` (``channels=1``) or ``RGB`` (``channels=3``).

    Modes with more than 8 bits (:data:`HIGH_BIT_MODES`) are *scaled* to 0..255 by their value
    range and rounded, never clipped: ``I;16``/``I;16B``/``I;16L``/``I;16N`` and ``I`` divide by 257
    (65535 -> 255; ``I`` values outside 0..65535 are clipped, ``I`` being PIL's container for 16-bit
    greyscale), ``F`` multiplies by 255 (intensities in [0, 1], outside clipped, NaN -> 0). PIL's own
    ``convert("L")`` clips them instead, which turns a 16-bit image into a nearly binary one.
    Every other mode (``1``, ``L``, ``P``, ``PA``, ``LA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ...)
    goes through PIL's ``convert``: palettes are expanded, alpha is dropped (not composited),
    RGB -> L uses the ITU-R 601-2 luminance.

    Args:
        im: a PIL image (loaded or lazily opened).
        channels: 1 (greyscale) or 3 (RGB).

    Returns:
        A PIL image of mode ``L`` or ``RGB`` (``im`` itself when it already has that mode).

    Raises:
        ValueError: PIL cannot convert the mode (it names it); OSError: the image data cannot be decoded.
    """
    target = "L" if channels == 1 else "RGB"
    if im.mode == target:
        return im
    top = HIGH_BIT_MODES.get(im.mode)
    if top is not None:
        values = np.asarray(im, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        im = Image.fromarray(gray)  # mode L
        return im if target == "L" else im.convert(target)
    try:
        return im.convert(target)
    except ValueError:  # e.g. La -> L is not direct in PIL; go through a mode it converts from
        for via in ("RGBA", "LA", "RGB"):
            try:
                return im.convert(via).convert(target)
            except ValueError:
                continue
        raise


def read_pil(path: str | Path, channels: int, what: str, fix: str) -> Any:
    """Open an image file as a decoded 8-bit PIL image (:func:`pil_to_8bit`).

    Raises:
        DataError: ``"<what>: cannot read image <path> (<error>); <fix>"``.
    """
    try:
        with Image.open(path) as opened:
            im = pil_to_8bit(opened, channels)
            return im.copy() if im is opened else im  # decode before the file is closed
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"{what}: cannot read image {str(path)!r} ({type(exc).__name__}: {exc}); {fix}") from exc


def is_image(p: Path) -> bool:
    """A non-hidden file with one of the :data:`IMAGE_EXTENSIONS` (any case)."""
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _image_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable image (empty, missing, header or structure unreadable); None if fine."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()  # PNG: every chunk and its CRC up to IEND; other formats: the header
        if w < 1 or h < 1:
            return f"image of size {w}x{h}"
    except UnidentifiedImageError:
        return "not an image PIL can read (unknown or damaged header)"
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for damaged files
        return f"{type(exc).__name__}: {exc}"
    return None


#: Signatures (paths, sizes, modification times) of file sets that passed :func:`check_image_files`.
_CHECKED: set[int] = set()
#: Bad files named in a :func:`check_image_files` error (the rest are counted).
MAX_LISTED_BAD_FILES = 10


def check_image_files(paths: Sequence[str | Path], what: str) -> None:
    """Check up front that every image file is non-empty and readable by PIL (header, and for PNG every chunk).

    Fast (no pixel is decoded; a truncated JPEG whose header is intact passes and fails only when
    read). A set of files that passed is remembered for this process (keyed by path, size and
    modification time), so loading both splits of a folder checks it once.

    Args:
        paths: the image files.
        what: the dataset's name, for the message (e.g. ``"imagefolder"``).

    Raises:
        DataError: naming the first :data:`MAX_LISTED_BAD_FILES` bad files with their problem, the
            number of bad files, and the fix (remove or replace them, or ``data.check_images=false``).
    """
    files = sorted(str(p) for p in paths)
    stamps = []
    for f in files:
        try:
            st = Path(f).stat()
            stamps.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((f, -1, -1))
    signature = hash(tuple(stamps))
    if signature in _CHECKED:
        return
    bad = [(f, problem) for f in files if (problem := _image_problem(Path(f))) is not None]
    if bad:
        listed = "; ".join(f"{f!r} ({problem})" for f, problem in bad[:MAX_LISTED_BAD_FILES])
        more = f"; and {len(bad) - MAX_LISTED_BAD_FILES} more" if len(bad) > MAX_LISTED_BAD_FILES else ""
        raise DataError(
            f"{what}: {len(bad)} of {len(files)} image files cannot be read: {listed}{more}; remove or "
            "replace them, or set data.check_images=false to skip this check (unreadable images then fail "
            "when training reaches them)"
        )
    _CHECKED.add(signature)
