"""The training budget that adapts to a task's size, and the warnings about too little training.

Unit tests of the pure rule (:func:`training_budget`) and the loss check (:func:`loss_diagnosis`)
with exact values; then a small-data image folder built from real MNIST / Fashion-MNIST images
(20 classes, 16 training images per class, 2 tasks of 10 classes = 160 images per task) learned on
the shipped backbone: the default budget gives every task at least ``train.min_steps`` steps and its
loss falls; ``train.min_steps=0`` keeps 2 epochs and warns. A tiny random ViT covers divergence
(``train.head_lr=1e9``) and the training-free methods' records.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from duallora.backbones import SHIPPED_WEIGHTS, create_backbone
from duallora.config import load_config
from duallora.errors import ConfigError
from duallora.training import (
    FEW_STEPS_WARNING,
    ContinualLearner,
    TrainingBudget,
    TrainingBudgetWarning,
    loss_diagnosis,
    training_budget,
)
from tests.synthetic import SMALL_TRAINING, TASKS, make_data, small_backbone


# ---------------------------------------------------------------------- the rule, exact values
@pytest.mark.parametrize("n, batch, epochs, min_steps, fraction, expected", [
    # the default benchmark: 12,000 images per task, neither rule binds (188 steps as before)
    (12000, 128, 2, 100, 0.25, (128, 2, 94, 188, False, False)),
    # README's reduced compare budget (2,000 per class x 2): 64 steps -> epochs raised to 4
    (4000, 128, 2, 100, 0.25, (128, 4, 32, 128, False, True)),
    (4000, 128, 2, 64, 0.25, (128, 2, 32, 64, False, False)),
    # the task: 5 classes x 30 images: 5 equal batches of 30, 20 epochs
    (150, 128, 2, 100, 0.25, (30, 20, 5, 100, True, True)),
    (160, 128, 2, 100, 0.25, (40, 25, 4, 100, True, True)),
    # min_steps not a multiple of the epoch: rounded up to whole epochs
    (150, 128, 2, 101, 0.25, (30, 21, 5, 105, True, True)),
    # the cap does not bind above 4 x 128 = 512 images; the last batch holds the remainder
    (600, 128, 2, 100, 0.25, (128, 20, 5, 100, False, True)),
    (512, 128, 2, 0, 0.25, (128, 2, 4, 8, False, False)),
    (511, 128, 2, 0, 0.25, (103, 2, 5, 10, True, False)),  # cap 127: 5 equal batches of <= 103
    # tiny tasks: the cap floor is 8 images, then equal batches
    (17, 128, 2, 100, 0.25, (6, 34, 3, 102, True, True)),
    (9, 128, 2, 100, 0.25, (5, 50, 2, 100, True, True)),
    (3, 128, 2, 100, 0.25, (3, 100, 1, 100, True, True)),
    # a configured batch below the cap is kept
    (150, 10, 2, 100, 0.25, (10, 7, 15, 105, False, True)),
    # switches: min_steps=0 keeps train.epochs; fraction None keeps train.batch_size
    (150, 128, 2, 0, 0.25, (30, 2, 5, 10, True, False)),
    (150, 128, 2, 0, None, (128, 2, 2, 4, False, False)),
    (150, 128, 30, 100, None, (128, 50, 2, 100, False, True)),
    (150, 128, 60, 100, None, (128, 60, 2, 120, False, False)),
])
def test_training_budget_exact_values(n, batch, epochs, min_steps, fraction, expected):
    got = training_budget(n, batch, epochs, min_steps, fraction)
    assert got == TrainingBudget(*expected)
    assert got.steps == got.epochs * got.steps_per_epoch == got.epochs * math.ceil(n / got.batch_size)
    assert got.batch_size <= batch and got.steps >= min_steps and got.epochs >= epochs


def test_training_budget_rejects_bad_values():
    for args in [(0, 128, 2, 100, 0.25), (10, 0, 2, 100, 0.25), (10, 128, 0, 100, 0.25),
                 (10, 128, 2, -1, 0.25), (10, 128, 2, 100, 0.0), (10, 128, 2, 100, 1.5)]:
        with pytest.raises(ValueError):
            training_budget(*args)


def test_config_validates_the_budget_keys():
    cfg = load_config(None, [])
    assert (cfg.train.min_steps, cfg.train.max_batch_fraction) == (100, 0.25)
    assert load_config("configs/default.yaml").train == cfg.train
    off = load_config(None, ["train.min_steps=0", "train.max_batch_fraction=null"])
    assert (off.train.min_steps, off.train.max_batch_fraction) == (0, None)
    for bad, key in [("train.min_steps=-1", "train.min_steps"), ("train.max_batch_fraction=0", "max_batch_fraction"),
                     ("train.max_batch_fraction=1.5", "max_batch_fraction")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


# ---------------------------------------------------------------------- the loss check
def test_loss_diagnosis_falls_flat_chance_diverges():
    falling = list(np.linspace(1.6, 0.2, 100))
    trend, problems = loss_diagnosis(falling, [1.0, 0.2], 5)
    assert trend["window_steps"] == 10 and problems == []
    assert trend["first"] == pytest.approx(np.mean(falling[:10]))
    assert trend["last"] == pytest.approx(np.mean(falling[-10:]))
    assert trend["change"] == pytest.approx(trend["last"] / trend["first"] - 1)

    flat = [1.6] * 50 + [1.55] * 50
    _, problems = loss_diagnosis(flat, [1.6, 1.55], 5)
    assert len(problems) == 1 and "did not fall" in problems[0] and "fell by only 3.1%" in problems[0]
    assert "near chance level" in problems[0]

    _, problems = loss_diagnosis([0.5] * 20 + [0.6] * 20, [0.5, 0.6], 5)  # rose, but far below chance
    assert len(problems) == 1 and "rose by 20.0%" in problems[0] and "near chance" not in problems[0]

    _, problems = loss_diagnosis([2.0] * 10 + [1.45] * 10, [2.0, 1.45], 5)  # fell 27%, still near ln 5
    assert len(problems) == 1 and "ended near chance level" in problems[0] and "90% of ln 5" in problems[0]

    _, problems = loss_diagnosis([0.01] * 20, [0.01], 5)  # learned from the start: nothing to fall
    assert problems == []

    _, problems = loss_diagnosis([1.6, 3e8, 1e9, 1e9], [1.5e8, 1e9], 5)
    assert len(problems) == 1 and "diverged" in problems[0] and "1e+09" in problems[0]
    _, problems = loss_diagnosis([0.01] * 10 + [1.5] * 10, [0.01, 1.5], 5)  # x150, back near ln 5
    assert len(problems) == 1 and "diverged" in problems[0]
    _, problems = loss_diagnosis([0.01] * 10 + [0.2] * 10, [0.01, 0.2], 5)  # x20 but far below ln 5
    assert len(problems) == 1 and "did not fall: it rose by 1900.0%" in problems[0]
    _, problems = loss_diagnosis([0.8], [0.8], 2)  # one step: nothing to compare, but near chance
    assert len(problems) == 1 and "ended near chance level: first step 0.8, last step 0.8" in problems[0]
    _, problems = loss_diagnosis([0.69, 50.0, 3e3, 0.1], [30.0, 0.1], 2)  # a spike that recovers
    assert len(problems) == 1 and "unstable: epoch 1 averaged 30" in problems[0]

    assert loss_diagnosis([], [], 5) == ({}, [])
    assert loss_diagnosis([0.0] * 10, [0.0], 1)[1] == []  # one class: the loss is always 0


# ---------------------------------------------------------------------- tiny random ViT
def _tiny(overrides, method="duallora"):
    extra = ["method.gate_layer=1"] if method == "duallora" else []
    # the budget rules at their defaults (SMALL_TRAINING switches them off for the other tests)
    rules = ["train.min_steps=100", "train.max_batch_fraction=0.25"]
    cfg = load_config(None, SMALL_TRAINING + rules + extra + [f"method.name={method}"] + list(overrides))
    return ContinualLearner(cfg, num_tasks=2, backbone=small_backbone(), device=torch.device("cpu"))


def test_training_free_methods_say_no_training_happened():
    for method in ("fecam", "simplecil"):
        learner = _tiny([], method)
        with warnings.catch_warnings():
            warnings.simplefilter("error", TrainingBudgetWarning)
            rec = learner.learn_task(make_data(TASKS[0], 10), TASKS[0])
        assert rec["trained"] is False and rec["epoch_loss"] == [] and rec["steps"] == 0 and rec["epochs"] == 0
        assert rec["batch_size"] is None and "budget" not in rec and rec["loss_trend"] == {}
        assert rec["warnings"] == [] and rec["summary"] == "no training (statistics only)"
        json.dumps(rec, allow_nan=False)  # standard JSON: no NaN left in the record


def test_record_of_a_trained_task_and_the_scheduler_spans_the_effective_steps():
    # 2 classes x 20 = 40 images, batch 10 (below the cap of 10: not capped), 1 epoch -> raised to 25
    learner = _tiny(["train.min_steps=100"])
    rec = learner.learn_task(make_data(TASKS[0], 20), TASKS[0])
    assert rec["trained"] is True and (rec["batch_size"], rec["epochs"], rec["steps"]) == (10, 25, 100)
    assert len(rec["epoch_loss"]) == 25 and rec["loss_trend"]["window_steps"] == 10
    assert rec["budget"] == {"batch_size": 10, "epochs": 25, "steps_per_epoch": 4, "steps": 100, "batch_capped": False,
                             "epochs_raised": True, "train_set_images": 40, "configured_batch_size": 10,
                             "configured_epochs": 1, "min_steps": 100, "max_batch_fraction": 0.25}
    assert rec["summary"].startswith(f"loss {rec['epoch_loss'][-1]:.4f} (100 steps: 25 epochs x 4 batches of 10)")
    json.dumps(rec, allow_nan=False)


def test_cosine_schedule_spans_the_effective_steps(monkeypatch):
    seen = []
    real = torch.optim.lr_scheduler.CosineAnnealingLR

    def spy(opt, T_max, **kw):
        seen.append(T_max)
        return real(opt, T_max=T_max, **kw)

    monkeypatch.setattr(torch.optim.lr_scheduler, "CosineAnnealingLR", spy)
    learner = _tiny(["train.min_steps=70"])
    rec = learner.learn_task(make_data(TASKS[0], 20), TASKS[0])
    assert seen == [rec["steps"]] == [72]  # 4 steps per epoch, 18 epochs


def test_diverging_head_lr_is_warned():
    # labels that the images cannot predict (one pattern, two labels): at head_lr=1e9 the loss stays ~1e9
    x = make_data([7], 40).tensors[0]
    y = torch.tensor([7, 3] * 20)
    learner = _tiny(["train.head_lr=1e9", "train.min_steps=60"])
    with pytest.warns(TrainingBudgetWarning, match="diverged") as caught:
        rec = learner.learn_task(torch.utils.data.TensorDataset(x, y), (7, 3))
    assert rec["epoch_loss"][-1] > 1e6 > 10 * math.log(2)
    assert len(rec["warnings"]) == 1 and rec["warnings"][0].startswith("task 1: the training loss diverged")
    assert str(caught[0].message) == rec["warnings"][0]
    assert rec["summary"].endswith("[1 warning]")


def test_a_loss_spike_that_recovers_is_warned():
    # separable classes: head_lr=1e9 spikes the loss to ~1e9 in the first epochs, then it reaches 0
    learner = _tiny(["train.head_lr=1e9", "train.min_steps=60"])
    with pytest.warns(TrainingBudgetWarning, match="unstable"):
        rec = learner.learn_task(make_data(TASKS[0], 20), TASKS[0])
    assert max(rec["epoch_loss"]) > 1e6 and rec["epoch_loss"][-1] < 10 * math.log(2)
    assert len(rec["warnings"]) == 1 and "lower train.lr / train.head_lr" in rec["warnings"][0]


# ---------------------------------------------------------------------- small real data
def _write_small_folder(root, train_per_class=16, test_per_class=10, seed=0):
    """root/{train,test}/{fashion0..9,digit0..9}/N.png: 28x28 grey images drawn (seeded) from the
    Fashion-MNIST and MNIST IDX files that the project's loaders find (skips when absent)."""
    from PIL import Image

    from duallora.data.datasets import _IDX_FILES, _find_idx, _locate_idx, read_idx
    from duallora.errors import DataError

    rng = np.random.default_rng(seed)
    for name, prefix in (("fashion-mnist", "fashion"), ("mnist", "digit")):
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            try:
                folder = _locate_idx(name, split, None)
            except DataError as exc:
                pytest.skip(f"{name} files not installed: {exc}")
            images = read_idx(_find_idx(folder, _IDX_FILES[split][0]))
            labels = read_idx(_find_idx(folder, _IDX_FILES[split][1]))
            for c in range(10):
                d = root / split / f"{prefix}{c}"
                d.mkdir(parents=True, exist_ok=True)
                for i in rng.choice(np.flatnonzero(labels == c), size=n, replace=False):
                    Image.fromarray(images[i]).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip("shipped backbone weights missing")
    return _write_small_folder(tmp_path_factory.mktemp("small-data"))


@pytest.fixture
def shipped_backbone():
    """A fresh copy per test: a learner adapts its backbone's layers in place."""
    return create_backbone(load_config(None, []).backbone.name)


def _small_learner(folder, backbone, overrides=()):
    from duallora.runner import build_scenario

    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={folder}", "data.num_tasks=2",
                             "train.progress=false", "train.threads=1", "train.device=cpu", *overrides])
    scenario = build_scenario(cfg, backbone[1])
    learner = ContinualLearner(cfg, num_tasks=scenario.num_tasks, backbone=backbone)
    return learner, scenario


def test_small_data_default_budget_trains_every_task(small_folder, shipped_backbone):
    learner, scenario = _small_learner(small_folder, shipped_backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingBudgetWarning)  # no warning at the default budget
        records = [learner.learn_task(scenario.train_dataset(t), task.classes) for t, task in enumerate(scenario.tasks)]
    for rec in records:
        assert rec["train_images"] == 160 and len(rec["classes"]) == 10
        # 160 images: batch 40 (a quarter), 4 steps per epoch, 25 epochs = 100 steps (was 2 x 2 = 4)
        assert (rec["batch_size"], rec["epochs"], rec["steps"]) == (40, 25, 100)
        assert rec["steps"] >= learner.cfg.train.min_steps
        losses = rec["epoch_loss"]
        assert losses[0] > 0.8 * math.log(10)  # starts near chance (ln 10 = 2.30)
        assert losses[-1] < 0.5 * losses[0], losses  # and falls clearly
        assert rec["warnings"] == [] and rec["summary"].startswith("loss ")
    row = learner.evaluate([scenario.test_dataset(t) for t in range(2)])
    assert row["accuracy"][0] > 40.0, row  # the first task well above chance (10% within 20 classes)


def test_small_data_without_min_steps_warns_about_few_steps(small_folder, shipped_backbone):
    learner, scenario = _small_learner(small_folder, shipped_backbone, ["train.min_steps=0"])
    with pytest.warns(TrainingBudgetWarning) as caught:
        rec = learner.learn_task(scenario.train_dataset(0), scenario.tasks[0].classes)
    assert (rec["batch_size"], rec["epochs"], rec["steps"]) == (40, 2, 8)
    assert rec["steps"] < FEW_STEPS_WARNING
    assert rec["warnings"][0].startswith("task 1: only 8 optimizer steps (2 epochs x 4 batches of up to 40 images, "
                                         "160 training images)")
    assert "train.min_steps (now 0)" in rec["warnings"][0]
    # 8 steps leave the loss near ln 10: the second warning says so
    assert len(rec["warnings"]) == 2 and "near chance level" in rec["warnings"][1]
    assert [str(w.message) for w in caught if w.category is TrainingBudgetWarning] == rec["warnings"]
    assert rec["summary"].endswith("[2 warnings]")
