"""``data.classes`` (any dataset restricted to a class list), ``data.validation_fraction`` / ``data.evaluate_on``
(a seeded, stratified validation split carved from the training images), and Tiny-ImageNet as a data source."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from duallora.config import load_config
from duallora.data.base import ImageDataset, SelectedDataset
from duallora.data.datasets import load_dataset
from duallora.data.scenarios import ClassIncrementalScenario, scenario_from_config
from duallora.data.selection import restrict_classes, validation_split
from duallora.data.sources import tiny_imagenet as ti
from duallora.data.sources.imagefolder import make_class_folders
from duallora.data.sources.wnid import make_wnid_folders
from duallora.data.splits import held_out_count
from duallora.errors import ConfigError, DataError
from tests.data.test_tiny_imagenet import write_layout, zip_folder

pytestmark = pytest.mark.filterwarnings("ignore::duallora.data.benchmarks.DataCountWarning")
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "tiny-imagenet-200-32px.zip"


@pytest.fixture
def folder(tmp_path) -> Path:
    """An imagefolder with train/ and test/: classes a..d, 10 (train) and 3 (test) images each."""
    for split, n in (("train", 10), ("test", 3)):
        make_class_folders(tmp_path / split, classes=("a", "b", "c", "d"), per_class=n)
    return tmp_path


def rel(ds) -> list[str]:
    return [Path(f).relative_to(ds.source).as_posix() for f in ds.files]


# -------------------------------------------------------------------------------- data.classes


def test_classes_restrict_and_relabel_in_list_order(folder):
    ds = load_dataset("imagefolder", "train", root=str(folder), classes=["c", "a"])
    assert ds.classes == ["c", "a"] and len(ds) == 20
    assert torch.bincount(ds.targets).tolist() == [10, 10]
    assert all(Path(f).parent.name == "ca"[t] for f, t in zip(ds.files, ds.targets.tolist()))
    x, y = ds[0]
    assert x.dtype == torch.uint8 and y == int(ds.targets[0])
    assert load_dataset("imagefolder", "test", root=str(folder), classes=[2, 0]).classes == ["c", "a"]  # label ids
    assert ds.split_info["classes"] == {"selection": ["c", "a"], "kept": ["c", "a"],
                                        "label_ids": "the order of data.classes"}


def test_unknown_and_repeated_classes_are_named(folder):
    with pytest.raises(DataError, match=r"does not have: 'zebra', 7; use its class names \('a', 'b', 'c', 'd'\)"):
        load_dataset("imagefolder", "train", root=str(folder), classes=["a", "zebra", 7])
    with pytest.raises(DataError, match="lists a class twice: 'a'"):
        load_dataset("imagefolder", "train", root=str(folder), classes=["a", 0])  # by name and by label id
    with pytest.raises(DataError, match="unknown class list 'tiny-imagenet-first-half'"):
        load_dataset("imagefolder", "train", root=str(folder), classes="tiny-imagenet-first-half")
    with pytest.raises(DataError, match="does not have: 'n01443537'"):  # a named list whose classes are not there
        load_dataset("imagefolder", "train", root=str(folder), classes="tiny-imagenet-pretrain")


def test_classes_on_mnist_and_in_a_scenario():
    try:
        ds = load_dataset("mnist", "test", classes=["7", "1"])
    except DataError as exc:
        pytest.skip(f"mnist files not found: {exc}")
    assert ds.classes == ["7", "1"] and torch.bincount(ds.targets).tolist() == [1028, 1135]
    assert ds[0][1] == 0  # the first test image is a 7
    s = ClassIncrementalScenario(ds, ds, num_tasks=2, shuffle_classes=False)
    assert s.class_names == ["7", "1"] and s.record()["split"]["classes"]["kept"] == ["7", "1"]


@pytest.mark.parametrize("overrides, fragment", [
    (["data.classes=first-half"], "is not a named class list"),
    (["data.classes=[]"], "must be a non-empty list"),
    (["data.classes=3"], "must be a non-empty list"),
    (["data.classes=[a,b,a]"], "lists 'a' more than once"),
    (["data.validation_fraction=1.0"], r"data.validation_fraction=1.0 must lie in \[0, 1\)"),
    (["data.validation_fraction=-0.1"], r"must lie in \[0, 1\)"),
    (["data.evaluate_on=validation"], "needs a validation split: set data.validation_fraction"),
    (["data.evaluate_on=val", "data.validation_fraction=0.1"], "data.evaluate_on='val' is not supported"),
    (["data.dataset=tiny-imagenet", "data.crop_pct=0.9"], "resizes without cropping"),
])
def test_config_rejects_bad_data_keys(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_config_takes_the_new_keys():
    cfg = load_config(None, ["data.classes=tiny-imagenet-continual", "data.validation_fraction=0.1",
                             "data.evaluate_on=validation"])
    assert (cfg.data.classes, cfg.data.validation_fraction, cfg.data.evaluate_on) == \
        ("tiny-imagenet-continual", 0.1, "validation")
    assert load_config(None, ["data.classes=[n01443537,3]"]).data.classes == ["n01443537", 3]
    default = (Path(__file__).resolve().parents[2] / "configs" / "default.yaml").read_text()
    for key in ("classes", "validation_fraction", "evaluate_on"):
        assert f"\n  {key}:" in default


# --------------------------------------------------------------------------- validation split


def test_validation_is_disjoint_stratified_and_seeded(folder):
    kw = dict(root=str(folder), validation_fraction=0.25, seed=3)
    train, val = load_dataset("imagefolder", "train", **kw), load_dataset("imagefolder", "validation", **kw)
    full = load_dataset("imagefolder", "train", root=str(folder))
    assert not set(rel(train)) & set(rel(val)) and sorted(rel(train) + rel(val)) == sorted(rel(full))
    n_val = held_out_count(10, 0.25)  # round_half_up(2.5) = 3 per class
    assert torch.bincount(val.targets).tolist() == [n_val] * 4
    assert torch.bincount(train.targets).tolist() == [10 - n_val] * 4
    assert rel(load_dataset("imagefolder", "validation", **kw)) == rel(val)  # same seed, same images
    others = {tuple(rel(load_dataset("imagefolder", "validation", root=str(folder), validation_fraction=0.25,
                                     seed=s))) for s in range(4)}
    assert len(others) > 1  # the seed decides
    # the rule, by hand: per class, item indices shuffled with Random(f"validation:{seed}:{name}")
    members = [i for i, t in enumerate(full.targets.tolist()) if t == 1]
    random.Random("validation:3:b").shuffle(members)
    by_hand = sorted(rel(full)[i] for i in members[:n_val])
    assert by_hand == [f for f, t in zip(rel(val), val.targets.tolist()) if t == 1]
    info = val.split_info["validation"]
    assert info["fraction"] == 0.25 and info["seed"] == 3 and info["images"] == {"train": 28, "validation": 12}
    assert getattr(load_dataset("imagefolder", "test", **kw), "split_info", None) is None  # test: untouched


def test_validation_does_not_depend_on_caps_or_other_classes(folder):
    kw = dict(root=str(folder), validation_fraction=0.3, seed=0)
    val = load_dataset("imagefolder", "validation", **kw)
    val_bc = load_dataset("imagefolder", "validation", classes=["b", "c"], **kw)
    # restricting the classes keeps each class's split
    assert rel(val_bc) == [f for f in rel(val) if Path(f).parent.name in "bc"]
    train = load_dataset("imagefolder", "train", **kw)
    test = load_dataset("imagefolder", "test", **kw)
    capped = ClassIncrementalScenario(train, val, num_tasks=2, seed=0, train_per_class=2)
    full = ClassIncrementalScenario(train, val, num_tasks=2, seed=0)
    assert [capped.test_indices(t) for t in range(2)] == [full.test_indices(t) for t in range(2)]
    trained = {rel(train)[i] for t in range(2) for i in capped.train_indices(t)}
    assert len(trained) == 8 and not trained & set(rel(val))
    assert ClassIncrementalScenario(train, test, num_tasks=2).record().get("evaluate_on") is None


def test_validation_split_of_tensor_data():
    targets = torch.tensor([0, 1] * 5 + [2])  # class 2 has one image: nothing is held out of it
    train, val = validation_split(targets, ["x", "y", "z"], 0.4, seed=1)
    assert sorted(train + val) == list(range(11)) and not set(train) & set(val)
    assert [int((targets[val] == c).sum()) for c in range(3)] == [2, 2, 0]
    assert validation_split(targets, ["x", "y", "z"], 0.4, seed=1) == (train, val)


def test_validation_errors(folder):
    with pytest.raises(DataError, match="the validation split needs validation_fraction > 0"):
        load_dataset("imagefolder", "validation", root=str(folder))
    with pytest.raises(DataError, match=r"validation_fraction=1.5 must lie in \[0, 1\)"):
        load_dataset("imagefolder", "train", root=str(folder), validation_fraction=1.5)


def test_evaluate_on_validation_through_the_config(tmp_path):
    wnids = make_wnid_folders(tmp_path, n_classes=4, per_class=10)
    over = [f"data.root={tmp_path}", "data.dataset=imagenet-r", "data.num_tasks=2", "data.validation_fraction=0.2"]
    s_test = scenario_from_config(load_config(None, over).data, seed=0, image_size=(8, 8), channels=3)
    cfg_val = load_config(None, over + ["data.evaluate_on=validation", "data.train_per_class=3"])
    s_val = scenario_from_config(cfg_val.data, seed=0, image_size=(8, 8), channels=3)
    assert s_val.test.split == "validation" and s_val.record()["evaluate_on"] == "validation"
    val_files = set(s_val.test.files)
    assert len(val_files) == 4 * 2 and not val_files & set(s_test.test.files)  # not the test images
    assert not val_files & set(s_test.train.files)  # never trained on, capped or not
    seen = {s_val.train.files[i] for t in range(2) for i in s_val.train_indices(t)}
    assert len(seen) == 4 * 3 and seen <= set(s_test.train.files)
    assert s_val.class_order == s_test.class_order and s_val.train.classes == wnids


# ------------------------------------------------------------------------------ tiny-imagenet


@pytest.fixture(params=["folder", "zip"])
def tiny_root(request, tmp_path) -> Path:
    top = tmp_path / "tiny-imagenet-200"
    write_layout(top, 16, train_per_class=6, val_per_class=2)
    return zip_folder(top, tmp_path / "tiny.zip") if request.param == "zip" else tmp_path


def test_tiny_imagenet_is_a_source(tiny_root):
    train = load_dataset("tiny-imagenet", "train", root=str(tiny_root), image_size=(8, 8), channels=3)
    test = load_dataset("tiny-imagenet", "test", root=str(tiny_root), image_size=(8, 8), channels=3)
    assert (len(train), len(test)) == (18, 6)
    assert train.classes == ["goldfish (n0000001)", "tabby", "goldfish (n0000003)"]
    sha = ti.archive_sha256(tiny_root)
    info = train.split_info
    assert info["archive_sha256"] == sha
    assert info["files"] == [{"role": "archive", "path": str(tiny_root), "sha256": sha}]
    load_dataset("tiny-imagenet", "test", root=str(tiny_root), split_sha256=[sha])  # the pin passes
    with pytest.raises(DataError, match="sha256 of split file .* not the expected"):
        load_dataset("tiny-imagenet", "test", root=str(tiny_root), split_sha256=["0" * 64])
    some = load_dataset("tiny-imagenet", "train", root=str(tiny_root), classes=["n0000003", "tabby"],
                        validation_fraction=0.5)
    assert some.wnids == ["n0000003", "n0000002"] and some.classes == ["goldfish", "tabby"] and len(some) == 6
    assert some.split_info["archive_sha256"] == sha and some.split_info["classes"]["kept"] == some.wnids
    with pytest.raises(DataError, match="needs data.root"):
        load_dataset("tiny-imagenet", "train")


def test_tiny_imagenet_run_records_the_archive(tmp_path):
    """``duallora run data.dataset=tiny-imagenet data.root=ZIP`` end to end, on a random tiny ViT."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from duallora.backbones import build_shipped_architecture
    from duallora.cli import app

    top = tmp_path / "tiny-imagenet-200"
    write_layout(top, 8, train_per_class=6, val_per_class=2)
    archive = zip_folder(top, tmp_path / "tiny.zip")
    torch.manual_seed(0)
    weights = tmp_path / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in build_shipped_architecture().state_dict().items()}, str(weights))
    out = tmp_path / "run"
    args = ["run", "-o", str(out), "data.dataset=tiny-imagenet", f"data.root={archive}", "data.num_tasks=3",
            f"backbone.weights={weights}", "method.name=fecam", "train.threads=1", "train.progress=false"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "tiny-imagenet" and m["data_root"] == str(archive)
    assert m["data_record"]["split"]["archive_sha256"] == ti.archive_sha256(archive)
    assert m["train_images_per_task"] == [6, 6, 6] and m["test_images_per_task"] == [2, 2, 2]
    order = json.loads((out / "class_order.json").read_text())
    assert sorted(order["class_names"]) == sorted(["goldfish (n0000001)", "tabby", "goldfish (n0000003)"])
    assert order["split"]["archive_sha256"] == m["data_record"]["split"]["archive_sha256"]


def test_shared_archive_as_a_source_if_present():
    if not SHARED.is_file():
        pytest.skip("shared Tiny-ImageNet archive not on this machine")
    picked = list(ti.CLASS_LISTS["tiny-imagenet-continual"][:2])
    test = load_dataset("tiny-imagenet", "test", root=str(SHARED), image_size=(32, 32), channels=3, classes=picked)
    assert len(test) == 100 and test.wnids == picked and test.classes == ["European fire salamander", "tailed frog"]
    assert test.split_info["archive_sha256"] == "76ae8eca79974f92f7187ed3e3b53b4fe46d5796b38db48d17291cecc443fa07"


def test_datasets_of_other_kinds_are_restricted_through_a_view():
    class Counting(ImageDataset):  # items computed on access: nothing to copy
        def __init__(self):
            self.targets = torch.tensor([0, 1, 2, 0, 1, 2])
            self.classes, self.image_size, self.channels = ["x", "y", "z"], (2, 2), 1

        def __getitem__(self, i):
            return torch.full((1, 2, 2), i, dtype=torch.uint8), int(self.targets[i])

    view = restrict_classes(Counting(), ["z", "x"])
    assert isinstance(view, SelectedDataset) and view.classes == ["z", "x"]
    assert [(int(view[i][0][0, 0, 0]), view[i][1]) for i in range(len(view))] == [(0, 1), (2, 0), (3, 1), (5, 0)]
