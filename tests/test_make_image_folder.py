"""scripts/make_image_folder.py: a dataset written as train/ and test/ class folders that imagefolder reads."""

from __future__ import annotations

import torch

from duallora.data.datasets import load_dataset
from duallora.data.sources.imagefolder import make_class_folders
from tests.scripts import load_script as load_scripts_module


def load_script():
    return load_scripts_module("make_image_folder")


def test_writes_a_seeded_few_training_images_per_class_and_every_test_image(tmp_path):
    source = make_class_folders(tmp_path / "src", classes=("cat", "dog", "emu"), per_class=10)
    out = tmp_path / "small"
    args = [str(out), "--train-per-class", "3", "--image-size", "8", "data.dataset=imagefolder",
            f"data.root={source}", "data.test_fraction=0.3"]
    assert load_script().main(args) == 0
    for cls in ("cat", "dog", "emu"):
        assert len(list((out / "train" / cls).glob("*.png"))) == 3
        assert len(list((out / "test" / cls).glob("*.png"))) == 3  # 30% of 10 held out by the source
    assert not (tmp_path / "small.partial").exists()
    # duallora reads it back as a pre-split image folder, at the written size
    train = load_dataset("imagefolder", "train", root=str(out), image_size=(8, 8), channels=3)
    assert list(train.classes) == ["cat", "dog", "emu"] and len(train) == 9
    assert train[0][0].dtype == torch.uint8 and tuple(train[0][0].shape) == (3, 8, 8)
    # an existing output is refused and left alone
    before = sorted(p.name for p in out.rglob("*"))
    assert load_script().main(args) == 2
    assert sorted(p.name for p in out.rglob("*")) == before


def test_safe_names_are_unique_and_file_system_safe():
    names = load_script().safe_names(["goldfish, Carassius", "goldfish, Carassius", "../x", ""])
    assert names == ["goldfish_Carassius", "goldfish_Carassius-1", "x", "class_3"]
