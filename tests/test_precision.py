"""The precision policy: bf16 autocast trains, gathers statistics and predicts; fp16 needs CUDA."""

import pytest
import torch

from duallora.config import load_config
from duallora.errors import TrainingError
from duallora.training import ContinualLearner
from tests.synthetic import TASKS, images_of, make_data, small_backbone

BASE = ["train.progress=false", "train.epochs=1", "train.batch_size=10", "train.device=cpu", "train.lr=0.01",
        "train.threads=1", "method.gate_layer=1"]


def test_bf16_autocast_learns_and_predicts_like_fp32():
    preds = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, BASE + [f"train.precision={precision}"])
        learner = ContinualLearner(cfg, num_tasks=2, backbone=small_backbone(), device=torch.device("cpu"))
        for t, classes in enumerate(TASKS[:2]):
            record = learner.learn_task(make_data(classes, 10, seed=t), classes)
            assert all(torch.isfinite(torch.tensor(record["epoch_loss"])))
        x = images_of(make_data([7, 3, 0, 9], 3, seed=5))
        pred = learner.predict(x)
        assert pred.probs.dtype == torch.float32 or pred.probs.dtype == torch.bfloat16
        assert torch.allclose(pred.probs.float().sum(1), torch.ones(12), atol=1e-2)
        preds[precision] = pred.labels
    # reduced precision changes the numbers a little, not the decisions on separable data
    assert (preds["fp32"] == preds["bf16"]).float().mean() >= 0.75


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = load_config(None, BASE + ["train.precision=fp16"])
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        ContinualLearner(cfg, backbone=small_backbone(), device=torch.device("cpu"))
