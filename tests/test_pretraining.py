"""Tests of duallora.pretraining: the general ViT pre-training recipe (augmentation, resume, outputs)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from duallora.backbones import file_sha256
from duallora.errors import TrainingError
from duallora.pretraining import PretrainRecipe, augment_batch, checkpoint_path, pretrain_vit
from tests.data.test_tiny_imagenet import write_layout


def tiny_recipe(root, **kw) -> PretrainRecipe:
    base = dict(name="vit_test_patch4_8.tiny", root=str(root), classes=None, image_size=8, patch_size=4,
                embed_dim=16, depth=1, num_heads=2, epochs=3, batch_size=4, warmup_epochs=1.0)
    base.update(kw)
    return PretrainRecipe(**base)


@pytest.fixture
def root(tmp_path):
    write_layout(tmp_path / "data" / "tiny", 16, train_per_class=6, val_per_class=2)
    return tmp_path / "data"


def test_augment_batch_identity_crop_and_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    full = PretrainRecipe(image_size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
    out = augment_batch(x, full, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-4)  # a crop of the whole image at the same size is the image
    flips = PretrainRecipe(image_size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True)
    outs = [augment_batch(x, flips, torch.Generator().manual_seed(s)) for s in range(8)]
    flipped = [torch.allclose(o[0], x[0].flip(-1), atol=1e-4) for o in outs]
    kept = [torch.allclose(o[0], x[0], atol=1e-4) for o in outs]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    small = PretrainRecipe(image_size=4, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip=False)
    crop = augment_batch(x, small, torch.Generator().manual_seed(0))
    assert crop.shape == (2, 3, 4, 4)
    a = augment_batch(x, small, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment_batch(x, small, torch.Generator().manual_seed(3)))


def test_pretrain_writes_weights_and_record(root, tmp_path):
    out = tmp_path / "out" / "w.safetensors"
    rec = pretrain_vit(tiny_recipe(root), out, device="cpu", precision="fp32", progress=False)
    assert json.loads(out.with_suffix(".json").read_text()) == rec
    assert rec["sha256"] == file_sha256(out) and rec["epochs"] == 3
    assert len(rec["top1_per_epoch"]) == 3 and 0.0 <= rec["top1"] <= 100.0
    assert rec["classes"] == ["n0000001", "n0000002", "n0000003"]
    assert rec["data_sha256"] and rec["architecture"]["patch_size"] == 4
    state = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert not any(k.startswith("head") for k in state)
    assert not checkpoint_path(out).exists()  # the resumable checkpoint is removed once done


def test_killed_and_resumed_gives_the_same_weights(root, tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    recipe = tiny_recipe(root, drop_path=0.1)
    pretrain_vit(recipe, a, device="cpu", precision="fp32", progress=False)
    stopped = pretrain_vit(recipe, b, device="cpu", precision="fp32", progress=False, stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1} and checkpoint_path(b).is_file() and not b.exists()
    rec_b = pretrain_vit(recipe, b, device="cpu", precision="fp32", progress=False)
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert rec_b["top1_per_epoch"] == json.loads(a.with_suffix(".json").read_text())["top1_per_epoch"]
    # a checkpoint of another recipe is refused, not silently mixed in
    pretrain_vit(recipe, tmp_path / "c.safetensors", device="cpu", precision="fp32", progress=False,
                 stop_after_epoch=1)
    with pytest.raises(TrainingError, match="another recipe"):
        pretrain_vit(tiny_recipe(root, lr=2e-3), tmp_path / "c.safetensors", device="cpu", progress=False)


@pytest.mark.parametrize("change, match", [
    (dict(epochs=0), "epochs"), (dict(lr=float("nan")), "lr"), (dict(image_size=10), "multiple of patch_size"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"), (dict(train_per_class=0), "train_per_class"),
    (dict(test_per_class=0), "test_per_class"),
])
def test_bad_recipes_are_refused(root, tmp_path, change, match):
    with pytest.raises(TrainingError, match=match):
        pretrain_vit(tiny_recipe(root, **change), tmp_path / "w.safetensors", progress=False)
    assert not (tmp_path / "w.safetensors").exists()


def test_recipe_from_settings_reads_yaml_values_and_refuses_unknown_keys():
    from duallora.pretraining import recipe_from_settings

    r = recipe_from_settings(["epochs=3", "crop_scale=[0.35, 1.0]", "randaugment=[2, 9]", "classes=null"])
    assert (r.epochs, r.crop_scale, r.randaugment, r.classes) == (3, (0.35, 1.0), (2, 9), None)
    assert recipe_from_settings([]) == PretrainRecipe()
    with pytest.raises(TrainingError, match="unknown pretraining setting 'width'.*embed_dim"):
        recipe_from_settings(["width=64"])
    with pytest.raises(TrainingError, match="not key=value"):
        recipe_from_settings(["epochs"])


def test_cli_pretrain_vit_recipe(root, tmp_path):
    from typer.testing import CliRunner

    from duallora.cli import app

    out = tmp_path / "cli.safetensors"
    args = ["pretrain", "--recipe", "vit", "--output", str(out), "--device", "cpu", "--precision", "fp32",
            f"root={root}", "classes=null", "image_size=8", "patch_size=4", "embed_dim=16", "depth=1",
            "num_heads=2", "epochs=1", "batch_size=4", "warmup_epochs=0", "name=vit_test.cli"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["name"] == "vit_test.cli" and rec["epochs"] == 1 and rec["recipe"]["embed_dim"] == 16
    bad = CliRunner().invoke(app, ["pretrain", "--recipe", "mnist", "epochs=2"])
    assert bad.exit_code == 2 and "takes no KEY=VALUE" in bad.output


def test_shipped_tiny_imagenet_backbone_record_matches_file():
    from duallora import backbones

    spec = backbones.SHIPPED[backbones.TINY_IMAGENET_NAME]
    if not spec.weights.is_file():
        pytest.skip("the Tiny-ImageNet backbone is not shipped yet (duallora pretrain --recipe vit)")
    rec = backbones.shipped_record(backbones.TINY_IMAGENET_NAME)
    assert rec["sha256"] == file_sha256(spec.weights) and rec["name"] == spec.name
    assert rec["architecture"] == spec.arch and tuple(rec["mean"]) == spec.mean and tuple(rec["std"]) == spec.std
    from duallora.data.tiny_imagenet_classes import PRETRAIN_WNIDS

    assert rec["classes"] == list(PRETRAIN_WNIDS)  # pre-trained on the pre-training half only
    model, info = backbones.create_backbone(spec.name)
    assert info.input_size == (3, 32, 32) and model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 65, 192)


def test_resume_accepts_moved_data(root, tmp_path):
    import shutil

    recipe = tiny_recipe(root, epochs=2)
    out = tmp_path / "m.safetensors"
    pretrain_vit(recipe, out, device="cpu", precision="fp32", progress=False, stop_after_epoch=1)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    rec = pretrain_vit(tiny_recipe(moved, epochs=2), out, device="cpu", precision="fp32", progress=False)
    assert rec["epochs"] == 2 and len(rec["top1_per_epoch"]) == 2  # continued, not restarted
    pretrain_vit(recipe, tmp_path / "m2.safetensors", device="cpu", precision="fp32", progress=False,
                 stop_after_epoch=1)
    with pytest.raises(TrainingError, match="lr: checkpoint 0.001, given 0.005"):  # the difference is named
        pretrain_vit(tiny_recipe(root, epochs=2, lr=5e-3), tmp_path / "m2.safetensors", device="cpu", progress=False)


def test_init_from_continues_an_earlier_run(root, tmp_path):
    first = tmp_path / "a" / "w.safetensors"
    rec1 = pretrain_vit(tiny_recipe(root, epochs=2), first, device="cpu", precision="fp32", progress=False)
    # a one-epoch cycle over it starts from its weights
    second = tmp_path / "b" / "w.safetensors"
    started = {}

    import duallora.pretraining as pt

    real = pt._load_init

    def spy(backbone, recipe):
        out = real(backbone, recipe)
        started.update({k: v.clone() for k, v in backbone.state_dict().items()})
        return out

    pt._load_init = spy
    try:
        rec2 = pretrain_vit(tiny_recipe(root, epochs=1, init_from=str(first), seed=1), second, device="cpu",
                            precision="fp32", progress=False)
    finally:
        pt._load_init = real
    held = load_file(str(first))
    assert all(torch.equal(started[k], held[k].float()) for k in held)  # training began at the earlier weights
    assert rec2["epochs"] == 3 and rec2["cycle_epochs"] == 1
    assert rec2["wall_time_s"] == pytest.approx(rec1["wall_time_s"] + rec2["cycle_wall_time_s"], abs=0.11)
    assert rec2["continues"]["sha256"] == rec1["sha256"] and rec2["continues"]["top1"] == rec1["top1"]
    # another architecture is refused, naming both
    with pytest.raises(TrainingError, match="embed_dim"):
        pretrain_vit(tiny_recipe(root, epochs=1, init_from=str(first), embed_dim=32), tmp_path / "c" / "w.safetensors",
                     device="cpu", precision="fp32", progress=False)
    with pytest.raises(TrainingError, match="is not a file"):
        tiny_recipe(root, init_from=str(tmp_path / "missing.safetensors")).validate()


def test_recipe_values_are_numbers_of_their_kind():
    from duallora.pretraining import recipe_from_settings

    r = recipe_from_settings(["lr=5e-4", "epochs=6", "warmup_epochs=1"])
    assert r.lr == 5e-4 and isinstance(r.lr, float) and r.epochs == 6 and isinstance(r.warmup_epochs, float)
    for bad in ("depth=abc", "epochs=2.5", "lr=nan", "lr=.inf", "depth=true"):
        with pytest.raises(TrainingError, match="expected"):
            recipe_from_settings([bad])
