"""Every registered data source, tested from the registry alone: its stand-in is built, both splits are
loaded and checked (class counts, image counts, shapes, labels), and the options every dataset shares
(``data.classes``, ``data.validation_fraction``) work on it. Registering a source is enough for it to be
tested here; a source registered in this file is accepted by ``load_config`` and ``load_dataset``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from duallora.config import load_config
from duallora.data import registry
from duallora.data.base import TensorImageDataset
from duallora.data.datasets import DATASETS, load_dataset
from duallora.data.registry import DataSource, LoadRequest, StandIn, get_source, register_source, source_names
from duallora.data.scenarios import ClassIncrementalScenario, scenario_from_config
from duallora.data.splits import held_out_count
from duallora.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore::duallora.data.benchmarks.DataCountWarning")

SIZES = [((8, 8), 3), ((6, 10), 1)]


def check_source(name: str, folder: Path) -> None:
    """Build ``name``'s stand-in in ``folder``, load it, and check what every source must deliver."""
    stand = get_source(name).standin(folder)
    assert isinstance(stand, StandIn), f"{name}: DataSource.standin must return a StandIn"
    for size, channels in SIZES:
        kw = dict(root=str(stand.root), image_size=size, channels=channels, **stand.options)
        train, test = load_dataset(name, "train", **kw), load_dataset(name, "test", **kw)
        assert train.classes == test.classes and len(train.classes) == stand.num_classes, name
        assert (len(train), len(test)) == (stand.train, stand.test), name
        assert (train.split, test.split) == ("train", "test")
        for ds in (train, test):
            assert ds.targets.dtype == torch.int64
            assert sorted(set(ds.targets.tolist())) == list(range(stand.num_classes)), f"{name}: a class has no images"
            for i in (0, len(ds) - 1):
                x, y = ds[i]
                assert x.dtype == torch.uint8 and tuple(x.shape) == (channels, *size), (name, tuple(x.shape))
                assert isinstance(y, int) and y == int(ds.targets[i])
        ClassIncrementalScenario(train, test, num_tasks=1, seed=0)


@pytest.mark.parametrize("name", source_names())
def test_every_registered_source_loads_its_stand_in(name, tmp_path):
    check_source(name, tmp_path / name)


@pytest.mark.parametrize("name", source_names())
def test_every_source_takes_a_class_list_and_a_validation_split(name, tmp_path):
    stand = get_source(name).standin(tmp_path / name)
    kw = dict(root=str(stand.root), image_size=(8, 8), channels=3, **stand.options)
    full = load_dataset(name, "train", **kw)
    ids = full.class_ids or full.classes
    picked = [ids[-1], ids[0]]  # by identifier (WordNet id where the dataset has them), in this order
    some = load_dataset(name, "train", classes=picked, **kw)
    assert (some.class_ids or some.classes) == picked and some.classes == [full.classes[-1], full.classes[0]]
    counts = torch.bincount(full.targets, minlength=len(full.classes)).tolist()
    assert torch.bincount(some.targets, minlength=2).tolist() == [counts[-1], counts[0]]
    assert some.split_info["classes"]["kept"] == picked
    by_label = load_dataset(name, "train", classes=[len(full.classes) - 1, 0], **kw)
    assert by_label.targets.tolist() == some.targets.tolist()

    train = load_dataset(name, "train", validation_fraction=0.5, **kw)
    val = load_dataset(name, "validation", validation_fraction=0.5, **kw)
    assert val.split == "validation" and val.classes == full.classes
    for c, n in enumerate(counts):  # stratified: round_half_up(0.5 n) per class (at least 1, at most n - 1)
        assert int((val.targets == c).sum()) == held_out_count(n, 0.5)
        assert int((train.targets == c).sum()) == n - held_out_count(n, 0.5)
    x, y = val[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 8, 8) and y == int(val.targets[0])


def test_source_names_are_the_dataset_choices():
    assert DATASETS == source_names()[: len(DATASETS)]
    assert "tiny-imagenet" in DATASETS
    with pytest.raises(DataError, match="unknown dataset 'nope'; choose one of mnist, fashion-mnist"):
        get_source("nope")
    assert get_source("MNIST") is get_source("mnist")


# ------------------------------------------------------------------------ a source registered here


class Blobs(DataSource):
    """A test source: coloured squares held in memory (class c is brightness 40 c), from a ``blobs.npz`` file."""

    description = "test blobs"

    def load(self, req: LoadRequest) -> TensorImageDataset:
        if req.root is None:
            raise DataError("blobs needs data.root")
        data = np.load(Path(req.root) / "blobs.npz")
        images = torch.from_numpy(data[f"{req.split}_images"])
        return TensorImageDataset(images, data[f"{req.split}_labels"], ["dark", "mid", "light", "white"],
                                  image_size=req.image_size, channels=req.channels, name="blobs", source=req.root)

    def standin(self, folder: Path) -> StandIn:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for split, per in (("train", 6), ("test", 2)):
            labels = np.repeat(np.arange(4), per)
            arrays[f"{split}_images"] = np.stack([np.full((1, 5, 5), 40 * c + i, np.uint8)
                                                  for i, c in enumerate(labels)])
            arrays[f"{split}_labels"] = labels
        np.savez(folder / "blobs.npz", **arrays)
        return StandIn(folder, num_classes=4, train=24, test=8)


@pytest.fixture
def blobs():
    register_source("test-blobs")(Blobs)
    yield "test-blobs"
    registry.unregister_source("test-blobs")


def test_a_source_registered_here_is_tested_loaded_and_configured(blobs, tmp_path):
    check_source(blobs, tmp_path / "blobs")  # the same checks as every built-in source
    root = tmp_path / "blobs"
    cfg = load_config(None, [f"data.dataset={blobs}", f"data.root={root}", "data.num_tasks=2",
                             "data.classes=[white,dark]", "data.validation_fraction=0.5",
                             "data.evaluate_on=validation"])
    assert cfg.data.dataset == blobs
    s = scenario_from_config(cfg.data, seed=cfg.seed, image_size=(5, 5), channels=1)
    assert s.num_classes == 2 and s.train.classes == ["white", "dark"] and s.test.split == "validation"
    assert (len(s.train), len(s.test)) == (6, 6) and s.record()["evaluate_on"] == "validation"
    # the source's capabilities decide which keys the config takes
    with pytest.raises(ConfigError, match=f"data.dataset='{blobs}' does not use split lists"):
        load_config(None, [f"data.dataset={blobs}", "data.split_train=a.txt", "data.split_test=b.txt"])
    with pytest.raises(ConfigError, match="resizes without cropping"):
        load_config(None, [f"data.dataset={blobs}", "data.crop_pct=0.9"])
    with pytest.raises(DataError, match="test-blobs: split lists"):
        load_dataset(blobs, "train", root=str(root), split_train="a.txt", split_test="b.txt")


def test_registering_checks_names_and_classes(blobs):
    with pytest.raises(ValueError, match="already registered"):
        register_source(blobs)(Blobs)
    with pytest.raises(ValueError, match="lowercase"):
        register_source("Blobs")
    with pytest.raises(ValueError, match="DataSource subclass"):
        register_source("not-a-source")(object)
    registry.unregister_source(blobs)
    with pytest.raises(ConfigError, match=f"data.dataset='{blobs}' is not supported"):
        load_config(None, [f"data.dataset={blobs}"])
