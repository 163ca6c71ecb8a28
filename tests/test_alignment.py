"""Classifier alignment from stored class Gaussians (duallora.methods.alignment; InfLoRA-CA)."""

from __future__ import annotations

import math

import pytest
import torch

from duallora.config import load_config
from duallora.errors import ConfigError
from duallora.methods.alignment import (
    COV_RIDGE,
    SAMPLES_PER_CLASS,
    class_gaussians,
    decoupled_logits,
    sample_features,
)
from duallora.methods.base import TaskContext
from duallora.training import ContinualLearner
from tests.synthetic import SMALL_TRAINING, TASKS, make_data, small_backbone


def make_learner(method: str, overrides=()) -> ContinualLearner:
    cfg = load_config(None, SMALL_TRAINING + [f"method.name={method}"] + list(overrides))
    return ContinualLearner(cfg, num_tasks=3, backbone=small_backbone(), device=torch.device("cpu"))


def learn(learner: ContinualLearner, tasks=TASKS[:2], per_class: int = 20) -> list[dict]:
    return [learner.learn_task(make_data(c, per_class, seed=t), c) for t, c in enumerate(tasks)]


def test_decoupled_logits_divide_by_the_mean_task_norm_and_the_temperature():
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0, 0.0], [1.0, 0.0, 2.0, 0.0, 0.0]])
    # task slices [2, 3]: norms (5, 1) and (1, 2): means 3 and 1.5
    got = decoupled_logits(logits, [2, 3], temperature=0.5)
    want = torch.stack([logits[0] / 3.0 / 0.5, logits[1] / 1.5 / 0.5])
    assert torch.allclose(got, want, atol=1e-5)


def test_class_gaussians_equal_torch_cov_plus_the_ridge_per_class():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2] * 10)
    batches = [(feats[i:i + 7], labels[i:i + 7]) for i in range(0, 30, 7)]  # uneven batches
    ctx = TaskContext(task=0, num_classes=3, num_tasks=2, stats_loader=batches, device=torch.device("cpu"),
                      progress=lambda it, desc: it)
    means, covs = class_gaussians(ctx, lambda x: x, 4)
    for c in range(3):
        fc = feats[labels == c]
        assert torch.allclose(means[c], fc.mean(0))
        assert torch.allclose(covs[c], torch.cov(fc.T) + COV_RIDGE * torch.eye(4, dtype=torch.float64))


def test_samples_follow_the_scaled_means_and_the_covariances_and_are_seeded():
    means = torch.tensor([[4.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.stack([torch.tensor([[1.0, 0.5], [0.5, 2.0]]), torch.tensor([[0.2, 0.0], [0.0, 0.1]])]).double()
    task_of_class = torch.tensor([0, 1])
    x, y = sample_features(means, covs, task_of_class, task=1, n=20000, generator=torch.Generator().manual_seed(1))
    assert x.shape == (40000, 2) and torch.equal(torch.bincount(y), torch.tensor([20000, 20000]))
    assert not torch.equal(y[:100], y[:100].sort().values)  # shuffled
    # task 0 of 2 tasks: mean scaled by 0.9 + 0.1 * 1/2 = 0.95; task 1: by 1.0
    assert torch.allclose(x[y == 0].mean(0), 0.95 * means[0], atol=0.05)
    assert torch.allclose(x[y == 1].mean(0), means[1], atol=0.02)
    assert torch.allclose(torch.cov(x[y == 0].T), covs[0], atol=0.06)
    assert torch.allclose(torch.cov(x[y == 1].T), covs[1], atol=0.01)
    again = sample_features(means, covs, task_of_class, task=1, n=20000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


@pytest.mark.parametrize("method", ["frozen", "inflora"])
def test_alignment_retrains_every_head_on_samples_and_leaves_the_backbone_alone(method):
    plain = make_learner(method)
    aligned = make_learner(method, ["method.classifier_alignment=2"])
    rec_plain, rec_aligned = learn(plain), learn(aligned)
    # task 1: statistics only (nothing to align with yet); task 2 aligned
    assert "alignment_loss" not in rec_aligned[0] and "alignment_loss" not in rec_plain[1]
    assert math.isfinite(rec_aligned[1]["alignment_loss"])
    means, covs = aligned.method.align_means, aligned.method.align_covs
    assert means.shape == (4, plain.model.embed_dim) and covs.shape == (4, plain.model.embed_dim, plain.model.embed_dim)
    # the stored Gaussians are those of the final features of the training images, task by task
    x0 = make_data(TASKS[0], 20, seed=0).tensors[0]
    # (frozen: the backbone never changes, so the first task's statistics are today's features)
    if method == "frozen":
        with torch.no_grad():
            f0 = aligned.model.features(x0).double()
        y0 = make_data(TASKS[0], 20, seed=0).tensors[1]
        classes = sorted(set(TASKS[0]), key=list(TASKS[0]).index)
        for c, label in enumerate(classes):
            assert torch.allclose(means[c], f0[y0 == label].mean(0), atol=1e-5)
    # task 2 aligned every head: the first task's head moved, unlike in the plain run
    assert not torch.equal(aligned.model.heads[0].weight, plain.model.heads[0].weight)
    assert all(not p.requires_grad for h in aligned.model.heads for p in h.parameters())
    # the adapters were trained exactly alike (alignment touches only the heads)
    sp, sa = plain.method.state_tensors(), aligned.method.state_tensors()
    for key in sp:
        if not key.startswith("heads."):
            assert torch.equal(sp[key], sa[key]), key


def test_alignment_improves_the_cross_task_balance_of_sampled_features():
    learner = make_learner("frozen", ["method.classifier_alignment=5"])
    learn(learner)
    m = learner.method
    x, y = sample_features(m.align_means, m.align_covs, torch.tensor([0, 0, 1, 1]), 1, 200,
                           torch.Generator().manual_seed(5))
    with torch.no_grad():
        acc = (learner.model.head_logits(x.float()).argmax(1) == y).float().mean().item()
    plain = make_learner("frozen")
    learn(plain)
    with torch.no_grad():
        acc_plain = (plain.model.head_logits(x.float()).argmax(1) == y).float().mean().item()
    assert acc > acc_plain + 0.1  # 20 SGD steps at the official lr 0.01: better, not converged


def test_aligned_model_round_trips_and_resumes_alike(tmp_path):
    learner = make_learner("inflora", ["method.classifier_alignment=2"])
    learn(learner)
    x = make_data([7, 3, 0, 9], 3, seed=7).tensors[0]
    path = learner.save(tmp_path / "ckpt.safetensors")
    loaded = ContinualLearner.load(path, device=torch.device("cpu"), backbone=small_backbone())
    assert torch.equal(loaded.predict(x).probs, learner.predict(x).probs)
    assert torch.equal(loaded.method.align_covs, learner.method.align_covs)
    # a third task learned after the load aligns exactly like the uninterrupted learner
    third = make_data(TASKS[2], 20, seed=2)
    learner.learn_task(third, TASKS[2])
    loaded.learn_task(third, TASKS[2])
    assert torch.equal(loaded.predict(x).probs, learner.predict(x).probs)


def test_alignment_epochs_must_be_non_negative_and_only_head_methods_read_them():
    with pytest.raises(ConfigError, match="classifier_alignment"):
        load_config(None, ["method.name=inflora", "method.classifier_alignment=-1"])
    with pytest.raises(ConfigError, match="classifier_alignment"):
        load_config(None, ["method.name=fecam", "method.classifier_alignment=3"])


def test_samples_per_class_is_the_official_256():
    assert SAMPLES_PER_CLASS == 256
