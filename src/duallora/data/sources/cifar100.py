"""``cifar100``: CIFAR-100 in torchvision's python layout, the official 50,000 / 10,000 split.

Held in memory (180 MB of 32x32 pixels) and resized per item by the backbone's timm transform.
Label ids are the fine labels (alphabetical class names). Without ``data.root``,
``~/.cache/duallora/data`` is used and torchvision downloads the archive there where the network
allows (an unreachable host is reported at once, with the layout).
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Optional

import numpy as np

from duallora.data.base import DOWNLOAD_DIR
from duallora.data.benchmarks import BenchmarkSource, BenchmarkSpec, Index
from duallora.data.registry import StandIn, register_source
from duallora.data.splits import files_record
from duallora.errors import DataError

_CIFAR_LAYOUT = """cifar100 expects torchvision's CIFAR-100 python version in data.root:
  ROOT/cifar-100-python/train   pickle: 'data' (50000 x 3072 uint8), 'fine_labels'
  ROOT/cifar-100-python/test    pickle: 'data' (10000 x 3072 uint8), 'fine_labels'
  ROOT/cifar-100-python/meta    pickle: 'fine_label_names' (100 names)
(ROOT may also be the cifar-100-python folder itself). Get cifar-100-python.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html and unpack it in ROOT, or leave data.root unset:
then ~/.cache/duallora/data is used, downloaded there by torchvision where the network allows."""

_CIFAR_FILES = ("train", "test", "meta")
CIFAR_URL_HOST = "www.cs.toronto.edu"


def _cifar_folder(base: Path) -> Optional[Path]:
    for c in (base / "cifar-100-python", base):
        if all((c / f).is_file() for f in _CIFAR_FILES):
            return c
    return None


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_cifar100() -> Path:
    from torchvision import datasets as tvd

    if not _reachable(CIFAR_URL_HOST):
        raise DataError(
            f"cifar100: no local files in {str(DOWNLOAD_DIR / 'cifar-100-python')!r} and {CIFAR_URL_HOST} is not "
            "reachable (offline); download cifar-100-python.tar.gz elsewhere, unpack it and pass data.root=FOLDER\n"
            + _CIFAR_LAYOUT
        )
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    try:
        tvd.CIFAR100(root=str(DOWNLOAD_DIR), train=True, download=True)
    except Exception as exc:
        raise DataError(f"cifar100: the torchvision download into {str(DOWNLOAD_DIR)!r} failed ({type(exc).__name__}: "
                        f"{exc}); pass data.root=FOLDER with the files\n{_CIFAR_LAYOUT}") from exc
    folder = _cifar_folder(DOWNLOAD_DIR)
    if folder is None:
        raise DataError(f"cifar100: the download into {str(DOWNLOAD_DIR)!r} did not produce cifar-100-python/")
    return folder


def make_cifar(root: Path, n_classes: int = 4, n_train: int = 3, n_test: int = 2) -> Path:
    """A stand-in in torchvision's cifar-100-python layout: train/test/meta pickles; pixel value = f(label)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{c}" for c in range(n_classes)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["all"]}, f)
    for split, per in (("train", n_train), ("test", n_test)):
        labels = [c for c in range(n_classes) for _ in range(per)]
        data = np.stack([np.full(3072, 30 * c + 10, dtype=np.uint8) for c in labels])
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels),
                         "filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": split}, f)
    return root


@register_source("cifar100")
class Cifar100(BenchmarkSource):
    description = "CIFAR-100, official split (torchvision's cifar-100-python)"
    spec = BenchmarkSpec(
        "cifar100", 100, 50_000, 10_000, 60_000, ("official",), (10, 5, 20), _CIFAR_LAYOUT,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    )

    def _unpickle(self, path: Path) -> dict:
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f, encoding="latin1")
        except Exception as exc:
            raise self.layout_error(f"cannot read {str(path)!r} as a CIFAR-100 pickle ({type(exc).__name__}: {exc})") \
                from exc
        if not isinstance(obj, dict):
            raise self.layout_error(f"{str(path)!r} does not hold a dict")
        return obj

    def _split_arrays(self, folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        d = self._unpickle(folder / split)
        if "data" not in d or "fine_labels" not in d:
            raise self.layout_error(f"{str(folder / split)!r} lacks 'data' or 'fine_labels'")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
            raise self.layout_error(f"{str(folder / split)!r}: 'data' {data.shape} and 'fine_labels' {labels.shape} "
                                    "are not (N, 3072) and (N,)")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise self.layout_error(f"{str(folder / split)!r} has labels outside 0..{num_classes - 1}")
        return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels

    def build_index(self, root: Optional[str], split_train: list[str], split_test: list[str], seed: int,
                    test_fraction: float) -> Index:
        if root is not None:
            base = self.need_root(root)
            folder = _cifar_folder(base)
            if folder is None:
                raise self.layout_error(f"data.root={str(base)!r} lacks cifar-100-python/{{train,test,meta}}")
        else:
            folder = _cifar_folder(DOWNLOAD_DIR) or _download_cifar100()
        meta = self._unpickle(folder / "meta")
        classes = meta.get("fine_label_names")
        if not isinstance(classes, list) or not classes:
            raise self.layout_error(f"{str(folder / 'meta')!r} has no 'fine_label_names' list")
        items = {split: self._split_arrays(folder, split, len(classes)) for split in ("train", "test")}
        files_rec = files_record([(f, folder / f) for f in _CIFAR_FILES])
        info = {"kind": "official", "name": "CIFAR-100 train/test (torchvision cifar-100-python)", "files": files_rec,
                "label_ids": "fine_labels"}
        return Index([str(c) for c in classes], items, info, str(folder), arrays=True, files=files_rec)

    def standin(self, folder: Path) -> StandIn:
        make_cifar(folder, n_classes=4, n_train=3, n_test=2)
        return StandIn(folder, num_classes=4, train=12, test=8)
