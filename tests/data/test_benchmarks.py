"""The paper family's benchmarks on tiny stand-ins built here, in each dataset's real layout and split
format (fewer classes, a few 8x8 images each): class counts, task layouts, splits and their records,
layout errors, count warnings, transforms, presets, and one preset run end to end on a tiny random ViT.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from duallora.config import load_config
from duallora.data import benchmarks as bm
from duallora.data.benchmarks import DataCountWarning, file_sha256
from duallora.data.datasets import BENCHMARKS, DATASETS, TensorImageDataset, load_dataset
from duallora.data.scenarios import ClassIncrementalScenario
from duallora.data.sources.cifar100 import make_cifar
from duallora.data.sources.cub200 import make_cub
from duallora.data.sources.domainnet import DOMAINNET_DOMAINS, make_domainnet
from duallora.data.sources.wnid import make_coda_yaml, make_wnid_folders
from duallora.data.splits import read_split_file
from duallora.data.standins import png
from duallora.data.transforms import AugmentedDataset, resolve_transform_config
from duallora.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {
    "cifar100_10tasks.yaml": ("cifar100", 10),
    "imagenet_r_5tasks.yaml": ("imagenet-r", 5),
    "imagenet_r_10tasks.yaml": ("imagenet-r", 10),
    "imagenet_r_20tasks.yaml": ("imagenet-r", 20),
    "imagenet_a_10tasks.yaml": ("imagenet-a", 10),
    "domainnet_5tasks.yaml": ("domainnet", 5),
    "cub200_10tasks.yaml": ("cub200", 10),
}
SMALL = dict(image_size=(16, 16), channels=3)

# the stand-ins have a few classes: their count mismatch is expected here (tested once, below)
pytestmark = pytest.mark.filterwarnings("ignore::duallora.data.benchmarks.DataCountWarning")


# ----------------------------------------------------------------------------------- stand-ins


_png = png


def load_pair(name: str, root: Path, **kw):
    return tuple(load_dataset(name, split, root=str(root), **SMALL, **kw) for split in ("train", "test"))


def _check_item(ds, index: int = 0) -> int:
    x, y = ds[index]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 16, 16)
    assert isinstance(y, int) and 0 <= y < len(ds.classes)
    return y


# ------------------------------------------------------------------------------------ datasets


def test_registry_lists_the_benchmarks():
    for name in ("cifar100", "imagenet-r", "imagenet-a", "domainnet", "cub200"):
        assert name in DATASETS and name in BENCHMARKS


def test_cifar100(tmp_path):
    tr, te = load_pair("cifar100", make_cifar(tmp_path))
    assert tr.classes == ["class0", "class1", "class2", "class3"] and te.classes == tr.classes
    assert (len(tr), len(te)) == (12, 8)
    x, y = tr[4]
    assert y == 1 and tuple(x.shape) == (3, 16, 16) and int(x.float().mean().round()) == 40  # 30*1 + 10
    s = ClassIncrementalScenario(tr, te, num_tasks=2, seed=0)
    assert s.classes_per_task == 2 and [len(t.classes) for t in s.tasks] == [2, 2]
    assert [len(s.train_indices(t)) for t in range(2)] == [6, 6]
    info = tr.split_info
    assert info["kind"] == "official" and [f["role"] for f in info["files"]] == ["train", "test", "meta"]
    assert info["files"][0]["sha256"] == file_sha256(tmp_path / "cifar-100-python" / "train")
    # the folder itself works as root too
    assert len(load_dataset("cifar100", "train", root=str(tmp_path / "cifar-100-python"), **SMALL)) == 12


def test_imagenet_r_stratified_split(tmp_path):
    wnids = make_wnid_folders(tmp_path, n_classes=4, per_class=5)
    tr, te = load_pair("imagenet-r", tmp_path, seed=0)
    assert tr.classes == wnids and (len(tr), len(te)) == (16, 4)  # 80/20 per class
    assert sorted(te.targets.tolist()) == [0, 1, 2, 3]
    assert _check_item(te) == 0
    assert tr.split_info["kind"] == "stratified" and tr.split_info["name"] == "stratified-80/20 seed 0"
    assert not hasattr(tr, "images")  # lazy: a list of files, PIL on access
    assert len(tr.files) == 16 and all(Path(f).is_file() for f in tr.files)
    again, _ = load_pair("imagenet-r", tmp_path, seed=0)
    assert again.files == tr.files  # deterministic
    other, _ = load_pair("imagenet-r", tmp_path, seed=1)
    assert other.split_info["name"] == "stratified-80/20 seed 1"
    assert other.split_info["list_sha256"]["train"] != tr.split_info["list_sha256"]["train"]
    s = ClassIncrementalScenario(tr, te, num_tasks=2, seed=0)
    rec = s.record()
    assert rec["split"]["name"] == "stratified-80/20 seed 0" and rec["train_images_per_task"] == [8, 8]
    assert rec["test_images_per_task"] == [2, 2] and rec["root"] == str(tmp_path)


def test_imagenet_r_coda_split_files_and_sha256(tmp_path):
    root = tmp_path / "imagenet-r"
    wnids = make_wnid_folders(root, n_classes=4, per_class=5)
    ytr, yte = make_coda_yaml(root, wnids, tmp_path)
    assert read_split_file(ytr)[:2] == [("data/imagenet-r/test/n00000001/art_1.png", 3),
                                    ("data/imagenet-r/train/n00000001/art_2.png", 3)]
    kw = dict(split_train=str(ytr), split_test=[str(yte)])
    tr, te = load_pair("imagenet-r", root, **kw)
    # label ids are the files' targets (reversed here), each naming its WordNet-id folder
    assert tr.classes == wnids[::-1] and (len(tr), len(te)) == (16, 4)
    for ds in (tr, te):
        for f, t in zip(ds.files, ds.targets.tolist()):
            assert Path(f).parent.name == ds.classes[t]
    assert tr.split_info["kind"] == "files" and tr.split_info["label_ids"] == "the split lists' labels"
    hashes = [file_sha256(ytr), file_sha256(yte)]
    assert [f["sha256"] for f in tr.split_info["files"]] == hashes
    load_pair("imagenet-r", root, split_sha256=hashes, **kw)  # the right hashes pass
    with pytest.raises(DataError, match="sha256 of split file .*imagenet-r_test.yaml"):
        load_dataset("imagenet-r", "train", root=str(root), split_sha256=[hashes[0], "0" * 64], **SMALL, **kw)
    with pytest.raises(DataError, match="has 1 hashes but 2 split files"):
        load_dataset("imagenet-r", "train", root=str(root), split_sha256=hashes[0], **SMALL, **kw)
    # a listed image that is not under the root is an error naming it
    (root / wnids[0] / "art_1.png").unlink()
    bm.clear_cache()  # indexes are cached per process (keyed by the root's and the lists' mtimes)
    with pytest.raises(DataError, match=r"1 of the 16 images listed in imagenet-r_train.yaml .*art_1.png"):
        load_dataset("imagenet-r", "train", root=str(root), **SMALL, **kw)


def test_imagenet_r_lae_text_lists(tmp_path):
    """LAE's train_list.txt / val_list.txt (InfLoRA's ImageNet-R split): "imagenet-r/<wnid>/<file> <label>"."""
    root = tmp_path / "imagenet-r"
    wnids = make_wnid_folders(root, n_classes=3, per_class=4)
    lists = {}
    for split, keep in (("train", lambda i: i > 0), ("val", lambda i: i == 0)):
        lists[split] = tmp_path / f"{split}_list.txt"
        lists[split].write_text("".join(f"imagenet-r/{w}/art_{i}.png {c}\n" for c, w in enumerate(wnids)
                                        for i in range(4) if keep(i)))
    tr, te = load_pair("imagenet-r", root, split_train=str(lists["train"]), split_test=str(lists["val"]))
    assert tr.classes == wnids and (len(tr), len(te)) == (9, 3) and te.targets.tolist() == [0, 1, 2]
    assert tr.split_info["name"] == "split lists train_list.txt, val_list.txt"


def test_imagenet_r_presplit_folders(tmp_path):
    make_wnid_folders(tmp_path / "train", n_classes=3, per_class=3)
    make_wnid_folders(tmp_path / "test", n_classes=3, per_class=1)
    tr, te = load_pair("imagenet-r", tmp_path)
    assert len(tr.classes) == 3 and (len(tr), len(te)) == (9, 3)
    assert tr.split_info["kind"] == "folders"


def test_imagenet_a(tmp_path):
    wnids = make_wnid_folders(tmp_path, n_classes=5, per_class=4)
    tr, te = load_pair("imagenet-a", tmp_path, test_fraction=0.25)
    assert tr.classes == wnids and (len(tr), len(te)) == (15, 5)
    assert tr.split_info["name"] == "stratified-75/25 seed 0"
    s = ClassIncrementalScenario(tr, te, num_tasks=5, seed=0)
    assert [len(t.classes) for t in s.tasks] == [1] * 5
    _check_item(tr)


def test_domainnet_official_lists(tmp_path):
    classes = make_domainnet(tmp_path, n_classes=3, n_train=2, n_test=1)
    tr, te = load_pair("domainnet", tmp_path)
    assert tr.classes == sorted(classes, key=str.lower)  # the lists' (alphabetical) label ids
    assert (len(tr), len(te)) == (6 * 3 * 2, 6 * 3 * 1)
    assert tr.split_info["kind"] == "official" and len(tr.split_info["files"]) == 12
    assert {Path(f).parts[-3] for f in tr.files} == set(DOMAINNET_DOMAINS)  # all six domains, class-incremental
    s = ClassIncrementalScenario(tr, te, num_tasks=3, seed=0)
    assert s.classes_per_task == 1 and [len(s.test_indices(t)) for t in range(3)] == [6, 6, 6]
    _check_item(te)
    # explicit lists: a subset of the domains
    two = dict(split_train=[str(tmp_path / "real_train.txt"), str(tmp_path / "sketch_train.txt")],
               split_test=[str(tmp_path / "real_test.txt"), str(tmp_path / "sketch_test.txt")])
    tr2, te2 = load_pair("domainnet", tmp_path, **two)
    assert (len(tr2), len(te2)) == (12, 6) and tr2.split_info["kind"] == "files"


def test_domainnet_yaml_lists(tmp_path):
    """InfLoRA's domainnet_train.yaml format (CODA-Prompt's YAML) with a data/domainnet/ prefix."""
    make_domainnet(tmp_path, n_classes=2, n_train=1, n_test=1, domains=("clipart", "real"))
    out = {}
    for split in ("train", "test"):
        pairs = [line.split() for d in ("clipart", "real")
                 for line in (tmp_path / f"{d}_{split}.txt").read_text().split("\n") if line]
        out[split] = tmp_path / f"domainnet_{split}.yaml"
        out[split].write_text(yaml.safe_dump({"data": [f"data/domainnet/{p}" for p, _ in pairs],
                                              "targets": [int(t) for _, t in pairs]}))
    tr, te = load_pair("domainnet", tmp_path, split_train=str(out["train"]), split_test=str(out["test"]))
    assert len(tr.classes) == 2 and (len(tr), len(te)) == (4, 4)


def test_cub200(tmp_path):
    folder = make_cub(tmp_path, n_classes=4, per_class=4)
    tr, te = load_pair("cub200", tmp_path)
    assert tr.classes == [f"{c:03d}.Bird_{c}" for c in range(1, 5)] and (len(tr), len(te)) == (8, 8)
    assert tr.targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert tr.split_info["name"] == "CUB-200-2011 train_test_split.txt"
    assert tr.split_info["files"][0]["sha256"] == file_sha256(folder / "train_test_split.txt")
    assert len(load_dataset("cub200", "test", root=str(folder), **SMALL)) == 8  # the folder itself as root
    s = ClassIncrementalScenario(tr, te, num_tasks=2, seed=0)
    assert [len(s.train_indices(t)) for t in range(2)] == [4, 4]
    _check_item(tr)


# ---------------------------------------------------------------------------- errors, warnings


@pytest.mark.parametrize("name, fragment", [
    ("cifar100", "cifar-100-python/train"),
    ("imagenet-r", "ROOT/n01443537/"),
    ("imagenet-a", "ROOT/n01443537/"),
    ("domainnet", "ROOT/clipart_train.txt"),
    ("cub200", "ROOT/CUB_200_2011/train_test_split.txt"),
])
def test_missing_or_malformed_root_shows_the_layout(tmp_path, name, fragment):
    with pytest.raises(DataError, match="does not exist") as exc:
        load_dataset(name, "train", root=str(tmp_path / "nope"), **SMALL)
    assert fragment in str(exc.value)
    bad = tmp_path / "bad"
    (bad / "some_folder").mkdir(parents=True)
    _png(bad / "some_folder" / "x.png", (1, 2, 3))
    with pytest.raises(DataError) as exc:
        load_dataset(name, "train", root=str(bad), **SMALL)
    assert fragment in str(exc.value), str(exc.value)


def test_other_data_errors(tmp_path):
    with pytest.raises(DataError, match="needs data.root"):
        load_dataset("imagenet-r", "train", **SMALL)
    make_domainnet(tmp_path / "dn", n_classes=2, domains=("clipart",))
    with pytest.raises(DataError, match=r"lacks DomainNet's split lists \['infograph_train.txt'"):
        load_dataset("domainnet", "train", root=str(tmp_path / "dn"), **SMALL)
    bad = tmp_path / "bad.txt"
    bad.write_text("clipart/airplane/x.png 0\nno-label-here\n")
    with pytest.raises(DataError, match="line 2: 'no-label-here' is not '<image path> <integer label>'"):
        read_split_file(bad)
    (tmp_path / "bad.yaml").write_text("data: [a.png]\n")
    with pytest.raises(DataError, match="`data:`.*`targets:`"):
        read_split_file(tmp_path / "bad.yaml")
    with pytest.raises(DataError, match="give both"):
        load_dataset("imagenet-r", "train", root=str(tmp_path), split_train=str(bad), **SMALL)
    with pytest.raises(DataError, match="not used by this dataset"):
        load_dataset("cifar100", "train", root=str(tmp_path), split_train=str(bad), split_test=str(bad), **SMALL)
    with pytest.raises(DataError, match="pins split files, but this dataset reads none"):
        load_dataset("mnist", "train", split_sha256="0" * 64)


def test_count_mismatch_is_a_warning_with_the_numbers(tmp_path):
    make_wnid_folders(tmp_path, n_classes=2, per_class=3)
    bm.clear_cache()
    with pytest.warns(DataCountWarning,
                      match=r"imagenet-r: found 2 classes \(expected 200\), 6 images \(expected 30,000\)"):
        tr = load_dataset("imagenet-r", "train", root=str(tmp_path), **SMALL)
    assert tr.split_info["count_mismatches"] == ["2 classes (expected 200)", "6 images (expected 30,000)"]
    assert bm.check_counts("cifar100", 100, 50_000, 10_000, "official", "x") == []
    with pytest.warns(DataCountWarning, match=r"49,999 train images \(expected 50,000\)"):
        bm.check_counts("cifar100", 100, 49_999, 10_000, "official", "x")


# ---------------------------------------------------------------------------------- transforms


def test_transform_config_from_timm():
    tc = resolve_transform_config("vit_base_patch16_224.augreg_in21k", (3, 224, 224))
    assert (tc.interpolation, tc.crop_pct) == ("bicubic", 0.9) and "timm pretrained_cfg" in tc.source
    tc = resolve_transform_config("vit_base_patch16_224.augreg_in21k", (3, 224, 224), crop_pct=0.875)
    assert tc.crop_pct == 0.875
    shipped = resolve_transform_config("vit_tiny_patch7_28.duallora_mnist", (1, 28, 28))
    assert (shipped.interpolation, shipped.crop_pct, shipped.channels) == ("bilinear", 1.0, 1)
    with pytest.raises(DataError, match="crop_pct"):
        resolve_transform_config("x", (3, 8, 8), crop_pct=1.5)


def test_augmentation_train_only_uint8(tmp_path):
    make_wnid_folders(tmp_path, n_classes=2, per_class=5)
    tc = resolve_transform_config("vit_base_patch16_224.augreg_in21k", (3, 16, 16))
    tr = load_dataset("imagenet-r", "train", root=str(tmp_path), transform=tc, augment=True)
    te = load_dataset("imagenet-r", "test", root=str(tmp_path), transform=tc, augment=True)
    assert tr.transform_info["augment"] and not te.transform_info["augment"]
    assert any("RandomResizedCrop" in s for s in tr.transform_info["steps"])
    assert any("CenterCrop" in s for s in te.transform_info["steps"])
    x, _ = tr[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 16, 16)
    assert torch.equal(te[0][0], te[0][0])  # evaluation is deterministic
    # the datasets that resize themselves get the augmentation on their output
    base = TensorImageDataset(torch.randint(0, 255, (4, 1, 12, 12), dtype=torch.uint8), [0, 1, 0, 1], ["a", "b"])
    aug = AugmentedDataset(base, tc)
    x, y = aug[1]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 12, 12) and y == 1
    assert aug.targets is base.targets and aug.classes == ["a", "b"]


# ------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("file", sorted(PRESETS))
def test_presets_load(file):
    cfg = load_config(ROOT / "configs" / file)
    name, tasks = PRESETS[file]
    assert cfg.data.dataset == name and cfg.data.num_tasks == tasks
    assert cfg.data.root is None and cfg.backbone.name == "vit_base_patch16_224.augreg_in21k"
    assert BENCHMARKS[name].num_classes % tasks == 0
    assert tasks in BENCHMARKS[name].task_layouts or name == "cifar100"


def test_default_preset_has_the_new_keys_at_their_defaults():
    text = (ROOT / "configs" / "default.yaml").read_text()
    for key in ("split_train", "split_test", "split_sha256", "augment", "crop_pct"):
        assert f"  {key}:" in text


@pytest.mark.parametrize("overrides, fragment", [
    (["data.dataset=cifar100", "data.split_train=a.yaml", "data.split_test=b.yaml"], "does not use split lists"),
    (["data.dataset=imagenet-r", "data.split_train=a.yaml"], "give both"),
    (["data.dataset=imagenet-r", "data.split_sha256=[abc]"], "not a sha256"),
    (["data.split_sha256=" + "a" * 64], "reads no split files"),
    (["data.crop_pct=0.9"], "data.crop_pct is set but"),
    (["data.dataset=cub200", "data.crop_pct=1.5"], r"data.crop_pct=1.5 must lie in \(0, 1\]"),
    (["data.dataset=imagenet-r", "data.split_train=3", "data.split_test=b.yaml"], "must be a file path"),
])
def test_config_rejects_bad_split_keys(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A random state dict of the shipped architecture (same code path as ViT-B/16, tiny)."""
    from safetensors.torch import save_file

    from duallora.backbones import build_shipped_architecture

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in build_shipped_architecture().state_dict().items()}, str(path))
    return path


def test_imagenet_r_preset_runs_end_to_end(tmp_path, tiny_weights):
    from typer.testing import CliRunner

    from duallora.cli import app

    root = tmp_path / "imagenet-r"
    wnids = make_wnid_folders(root, n_classes=4, per_class=5)
    ytr, yte = make_coda_yaml(root, wnids, tmp_path)
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "configs" / "imagenet_r_10tasks.yaml"), "-o", str(out),
            f"data.root={root}", f"data.split_train={ytr}", f"data.split_test={yte}",
            f"data.split_sha256=[{file_sha256(ytr)},{file_sha256(yte)}]",
            "backbone.name=vit_tiny_patch7_28.duallora_mnist", f"backbone.weights={tiny_weights}",
            "data.num_tasks=2", "data.num_workers=0", "train.epochs=1", "train.batch_size=8",
            "train.threads=1", "train.progress=false"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataCountWarning)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    rec = m["data_record"]
    assert m["dataset"] == "imagenet-r" and m["data_root"] == str(root) and m["num_tasks"] == 2
    assert rec["split"]["kind"] == "files" and "imagenet-r_train.yaml" in rec["split"]["name"]
    assert [f["sha256"] for f in rec["split"]["files"]] == [file_sha256(ytr), file_sha256(yte)]
    assert set(rec["split"]["list_sha256"]) == {"train", "test"}
    assert rec["train_images_per_task"] == [8, 8] and rec["test_images_per_task"] == [2, 2]
    assert m["train_images_per_task"] == [8, 8] and m["test_images_per_task"] == [2, 2]
    assert rec["transform"]["train"]["augment"] is True and rec["transform"]["test"]["augment"] is False
    assert rec["transform"]["test"]["settings"]["crop_pct"] == 0.875  # from the preset
    assert sorted(m["class_order"]) == [0, 1, 2, 3] and rec["class_order"] == m["class_order"]
    assert len(m["backbone_sha256"]) == 64 and m["seed"] == 0
    assert {"torch", "timm"} <= set(m["environment"])
    order = json.loads((out / "class_order.json").read_text())
    assert order["split"]["name"] == rec["split"]["name"] and order["root"] == str(root)


def test_cifar100_preset_builds_its_scenario(tmp_path, tiny_weights):
    """The CIFAR-100 preset's data path (official split, crop_pct 1.0) through runner.build_scenario."""
    from duallora.backbones import create_backbone
    from duallora.runner import build_scenario

    make_cifar(tmp_path, n_classes=4)
    cfg = load_config(ROOT / "configs" / "cifar100_10tasks.yaml",
                      [f"data.root={tmp_path}", "data.num_tasks=2", "backbone.name=vit_tiny_patch7_28.duallora_mnist",
                       f"backbone.weights={tiny_weights}"])
    _, info = create_backbone(cfg.backbone.name, cfg.backbone.weights)
    s = build_scenario(cfg, info)
    x, _ = s.train_dataset(0)[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 28, 28)  # the backbone's size and channels
    rec = s.record()
    assert rec["split"]["kind"] == "official" and rec["transform"]["test"]["settings"]["crop_pct"] == 1.0
    assert rec["train_images_per_task"] == [6, 6]
