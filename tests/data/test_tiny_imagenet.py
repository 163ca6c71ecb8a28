"""Tiny-ImageNet loader on a tiny stand-in in the official layout (zip and folder, 64 px and 32 px)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from duallora.data.sources import tiny_imagenet as ti
from duallora.data.tiny_imagenet_classes import CONTINUAL_WNIDS, PRETRAIN_WNIDS
from duallora.errors import DataError

WNIDS = ["n0000003", "n0000001", "n0000002"]
NAMES = {"n0000001": "goldfish, Carassius auratus", "n0000002": "tabby, tabby cat", "n0000003": "goldfish"}


def colour(label: int, k: int, size: int) -> np.ndarray:
    """A distinct, recognisable image: class colour in channel ``label``, item brightness ``k``."""
    img = np.full((size, size, 3), 20 + 10 * k, dtype=np.uint8)
    img[..., label % 3] = 200
    return img


def write_layout(top: Path, size: int, train_per_class: int = 4, val_per_class: int = 2) -> None:
    """The official layout under ``top`` (wnids.txt, words.txt, train/, val/)."""
    (top / "train").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    words = "\n".join(f"{w}\t{n}" for w, n in NAMES.items()) + "\nn9999999\tunused, not a class\n"
    (top / "words.txt").write_text(words)
    for w in WNIDS:
        label = sorted(WNIDS).index(w)
        d = top / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(train_per_class):
            Image.fromarray(colour(label, k, size)).save(d / f"{w}_{k}.JPEG", quality=95)
    (top / "val" / "images").mkdir(parents=True)
    lines = []
    i = 0
    for w in WNIDS:
        label = sorted(WNIDS).index(w)
        for k in range(val_per_class):
            Image.fromarray(colour(label, k, size)).save(top / "val" / "images" / f"val_{i}.JPEG", quality=95)
            lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t{size - 1}\t{size - 1}")
            i += 1
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder.parent))
    return archive


@pytest.fixture(params=["folder-64", "zip-32"])
def root(request, tmp_path) -> Path:
    kind, size = request.param.split("-")
    top = tmp_path / "tiny-imagenet-200"
    write_layout(top, int(size))
    return zip_folder(top, tmp_path / "tiny.zip") if kind == "zip" else tmp_path


def test_loads_both_splits_with_names_and_labels(root):
    train = ti.load_tiny_imagenet("train", root, image_size=(16, 16))
    test = ti.load_tiny_imagenet("test", root, image_size=(16, 16))
    assert train.wnids == sorted(WNIDS) and test.wnids == sorted(WNIDS)
    # first name of words.txt; two classes named "goldfish" are told apart by their id
    assert train.classes == ["goldfish (n0000001)", "tabby", "goldfish (n0000003)"]
    assert len(train) == 12 and len(test) == 6
    assert torch.bincount(train.targets).tolist() == [4, 4, 4]
    assert torch.bincount(test.targets).tolist() == [2, 2, 2]
    img, label = train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    # the image's colour channel is its class (JPEG keeps the dominant channel clearly brightest)
    for ds in (train, test):
        for i in range(len(ds)):
            x, y = ds[i]
            means = x.float().mean(dim=(1, 2))
            assert int(means.argmax()) == y % 3
    assert all(f.startswith("val/images/") for f in test.files)


def test_class_list_restricts_and_orders(root):
    ds = ti.load_tiny_imagenet("train", root, classes=["n0000002", "n0000001"], image_size=(8, 8), channels=1)
    assert ds.wnids == ["n0000002", "n0000001"] and ds.classes == ["tabby", "goldfish"]
    assert len(ds) == 8 and ds[0][0].shape == (1, 8, 8)
    with pytest.raises(DataError, match="n7777777"):
        ti.load_tiny_imagenet("train", root, classes=["n7777777"])
    with pytest.raises(DataError, match="twice"):
        ti.load_tiny_imagenet("train", root, classes=["n0000001", "n0000001"])
    with pytest.raises(DataError, match="unknown class list"):
        ti.load_tiny_imagenet("train", root, classes="tiny-imagenet-first-half")


def test_fixed_class_halves_are_disjoint_and_complete():
    assert len(PRETRAIN_WNIDS) == len(CONTINUAL_WNIDS) == 100
    assert not set(PRETRAIN_WNIDS) & set(CONTINUAL_WNIDS)
    both = sorted(PRETRAIN_WNIDS + CONTINUAL_WNIDS)
    assert list(PRETRAIN_WNIDS) == both[0::2] and list(CONTINUAL_WNIDS) == both[1::2]
    assert PRETRAIN_WNIDS[0] == "n01443537" and CONTINUAL_WNIDS[0] == "n01629819"


def test_missing_and_malformed_roots_name_the_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ti.load_tiny_imagenet("train", tmp_path / "nowhere.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="wnids.txt, words.txt, train/<wnid>/images"):
        ti.load_tiny_imagenet("train", tmp_path / "empty")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zip"):
        ti.load_tiny_imagenet("train", bad)
    top = tmp_path / "partial" / "tiny"
    write_layout(top, 8)
    (top / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="missing val/val_annotations.txt"):
        ti.load_tiny_imagenet("test", tmp_path / "partial")


def test_archive_sha256_changes_with_content(tmp_path):
    top = tmp_path / "a" / "tiny"
    write_layout(top, 8)
    h1 = ti.archive_sha256(tmp_path / "a")
    assert h1 == ti.archive_sha256(tmp_path / "a") and len(h1) == 64
    (top / "wnids.txt").write_text("\n".join(WNIDS[:2]) + "\n")
    assert ti.archive_sha256(tmp_path / "a") != h1


def test_shared_archive_if_present():
    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "tiny-imagenet-200-32px.zip"
    if not path.is_file():
        pytest.skip("shared Tiny-ImageNet archive not on this machine")
    ds = ti.load_tiny_imagenet("test", path, classes="tiny-imagenet-continual")
    assert len(ds) == 5000 and len(ds.classes) == 100 and ds[0][0].shape == (3, 32, 32)
    assert torch.bincount(ds.targets).tolist() == [50] * 100
