"""Tests of duallora.pretrain: a tiny MNIST pre-training run and the file/record it writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from duallora import backbones
from duallora.errors import DataError, TrainingError
from duallora.pretrain import pretrain, random_translate


def test_random_translate_shifts_each_image():
    x = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    x[:, :, 4, 4] = 255  # one bright pixel in the centre
    out = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out.flatten(1).sum(1) == 255).all()  # the pixel stays in the frame, nothing else appears
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = (pos // 9).tolist(), (pos % 9).tolist()
    assert set(rows) == {2, 3, 4, 5, 6} and set(cols) == {2, 3, 4, 5, 6}  # all shifts in [-2, 2]
    again = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert random_translate(x, 0, torch.Generator()) is x


def test_pretrain_tiny(tmp_path):
    out = tmp_path / "sub" / "w.safetensors"
    try:
        rec = pretrain(out, epochs=1, batch_size=16, train_per_class=5, test_per_class=5, seed=0,
                       progress=False)
    except DataError as exc:
        pytest.skip(f"MNIST files not found: {exc}")
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not list(out.parent.glob("*.tmp"))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == rec
    assert rec["sha256"] == backbones.file_sha256(out)
    assert rec["name"] == backbones.SHIPPED_NAME
    assert rec["architecture"] == backbones.SHIPPED_ARCH
    assert rec["epochs"] == 1 and rec["batch_size"] == 16 and rec["lr"] == 1e-3 and rec["seed"] == 0
    assert rec["train_images"] == 50 and rec["test_images"] == 50
    assert rec["data"] == "MNIST subset: train 50 / test 50"
    assert rec["dtype"] == "float16"
    assert 0.0 <= rec["test_accuracy"] <= 100.0 and rec["wall_time_s"] > 0
    assert rec["torch_version"] == torch.__version__
    assert set(rec) >= {"timm_version", "final_train_loss"}

    state = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert not any(k.startswith("head") for k in state)
    assert out.stat().st_mode & 0o444 == 0o444  # readable by everyone (shipped in the package)

    model, info = backbones.create_backbone(backbones.SHIPPED_NAME, weights=str(out))
    assert info.sha256 == rec["sha256"] and info.weights_path == str(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    feats = model.forward_features(torch.zeros(2, 1, 28, 28))
    assert feats.shape == (2, 17, 192)

    # deterministic given the seed: a second run writes byte-identical weights
    rec2 = pretrain(tmp_path / "w2.safetensors", epochs=1, batch_size=16, train_per_class=5,
                    test_per_class=5, seed=0, progress=False)
    assert rec2["sha256"] == rec["sha256"]


def test_pretrain_rejects_bad_settings(tmp_path):
    with pytest.raises(TrainingError, match="epochs=0"):
        pretrain(tmp_path / "w.safetensors", epochs=0, progress=False)
    assert not (tmp_path / "w.safetensors").exists()


def test_shipped_weights_record_matches_file():
    if not backbones.SHIPPED_WEIGHTS.is_file():
        pytest.skip("shipped weights not generated yet (duallora pretrain)")
    rec = backbones.shipped_record()
    assert rec["sha256"] == backbones.file_sha256(backbones.SHIPPED_WEIGHTS)
    assert rec["name"] == backbones.SHIPPED_NAME and rec["dtype"] == "float16"
    assert rec["data"] == "MNIST train 60k / test 10k"
    assert rec["test_accuracy"] >= 98.0


def test_weights_of_another_architecture_are_a_clear_error():
    from duallora.backbones import SHIPPED, create_backbone
    from duallora.errors import BackboneError

    mnist = SHIPPED["vit_tiny_patch7_28.duallora_mnist"].weights
    if not mnist.is_file() or not SHIPPED["vit_tiny_patch4_32.duallora_tinyimagenet100"].weights.is_file():
        pytest.skip("shipped backbone weights missing")
    with pytest.raises(BackboneError, match="does not fit vit_tiny_patch4_32.duallora_tinyimagenet100 .*pos_embed"):
        create_backbone("vit_tiny_patch4_32.duallora_tinyimagenet100", str(mnist))
