"""TensorBoard logs of a run: written by RunLogger, read back with TensorBoard's EventAccumulator."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from duallora import tensorboard as tb
from duallora.errors import ConfigError

pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install duallora[tensorboard])")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read(log_dir):
    """``{tag: [(step, value)]}`` of the scalars, the text and the image events of one log folder."""
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags["scalars"]}
    texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(t)] for t in tags["tensors"]}
    images = {t: [(e.step, e.width, e.height) for e in ea.Images(t)] for t in tags["images"]}
    return scalars, texts, images


def optimizer():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3, "name": "adapters"},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 5e-3, "name": "head"}]
    opt = torch.optim.Adam(groups)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)


def evaluation(correct, total, task_id):
    return {"accuracy": [100.0 * c / n for c, n in zip(correct, total)], "correct": correct, "total": total,
            "task_id_accuracy": task_id, "confidence_mean": 0.75}


def test_logger_writes_loss_lr_accuracy_and_the_matrix(tmp_path):
    logger = tb.RunLogger(tmp_path)
    opt, sched = optimizer()
    lrs = []
    for i in range(4):  # task 1: 4 steps with a cosine schedule
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        logger.step(0, 2.0 - 0.25 * i, opt)
        sched.step()
    logger.task_end(0, evaluation([9], [10], 100.0), [[90.0]], [100.0],
                    {"epoch_loss": [1.25], "task_time_s": 3.5, "memory_size": {"a": 4, "b": 6}})
    for i in range(2):  # task 2: 2 steps, a single learning rate given as a float
        logger.step(1, 1.0 - 0.5 * i, 0.01)
    logger.task_end(1, evaluation([7, 8], [10, 10], 80.0), [[90.0], [70.0, 80.0]], [100.0, 80.0],
                    {"epoch_loss": [0.5], "task_time_s": 2.0})
    logger.close()
    logger.close()  # twice is fine

    train, _, _ = read(tmp_path / "tensorboard" / "train")
    assert train["train/loss"] == [(0, 2.0), (1, 1.75), (2, 1.5), (3, 1.25), (4, 1.0), (5, 0.5)]
    assert [s for s, _ in train["train/lr/adapters"]] == [0, 1, 2, 3]
    assert [v for _, v in train["train/lr/adapters"]] == pytest.approx(lrs)
    assert lrs[0] > lrs[-1]  # the learning rate of each step, before the scheduler moves on
    assert [v for _, v in train["train/lr/head"]] == pytest.approx([5 * v for v in lrs])
    assert train["train/lr"] == [(4, pytest.approx(0.01)), (5, pytest.approx(0.01))]

    scalars, texts, images = read(tmp_path / "tensorboard" / "eval")
    assert scalars["eval/accuracy"] == [(1, pytest.approx(90.0)), (2, pytest.approx(75.0))]
    assert scalars["eval/task_id_accuracy"] == [(1, 100.0), (2, 80.0)]
    assert scalars["eval/accuracy_task_1"] == [(1, 90.0), (2, 70.0)]
    assert scalars["eval/accuracy_task_2"] == [(2, 80.0)]
    assert scalars["eval/confidence_mean"] == [(1, 0.75), (2, 0.75)]
    assert scalars["train/epoch_loss"] == [(1, 1.25), (2, 0.5)]
    assert scalars["train/task_time_s"] == [(1, 3.5), (2, 2.0)]
    assert scalars["memory/dims_mean"] == [(1, 5.0)]
    (step, table), = [t for t in texts["accuracy_matrix/text_summary"] if t[0] == 2]
    assert table.splitlines() == ["| after task | task 1 | task 2 |", "|---|---|---|",
                                  "| 1 | 90.00 |  |", "| 2 | 70.00 | 80.00 |"]
    assert [s for s, _, _ in images["accuracy_matrix"]] == [1, 2]
    assert all(w > 50 and h > 50 for _, w, h in images["accuracy_matrix"])
    assert json.loads((tmp_path / "tensorboard" / "state.json").read_text()) == {"task_start_steps": [0, 4, 6]}


def test_resumed_run_continues_and_purges_the_interrupted_task(tmp_path):
    logger = tb.RunLogger(tmp_path)
    for i in range(3):
        logger.step(0, 1.0 + i, 0.1)
    logger.task_end(0, evaluation([5], [10], 90.0), [[50.0]])
    for i in range(5):  # task 2 is interrupted after 5 steps, before its evaluation
        logger.step(1, 100.0 + i, 0.1)
    logger.close()
    time.sleep(1.1)  # event file names hold the time in seconds

    logger = tb.RunLogger(tmp_path, start_task=1)  # duallora run --resume: after task 1
    assert logger.global_step == 3
    for i in range(2):
        logger.step(1, 10.0 + i, 0.1)
    logger.task_end(1, evaluation([6, 7], [10, 10], 95.0), [[50.0], [60.0, 70.0]])
    logger.close()

    train, _, _ = read(tmp_path / "tensorboard" / "train")
    assert train["train/loss"] == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 10.0), (4, 11.0)]
    scalars, _, _ = read(tmp_path / "tensorboard" / "eval")
    assert scalars["eval/task_id_accuracy"] == [(1, 90.0), (2, 95.0)]


def test_from_config_switch_and_missing_package(tmp_path, monkeypatch):
    off = SimpleNamespace(train=SimpleNamespace(tensorboard=False))
    on = SimpleNamespace(train=SimpleNamespace(tensorboard=True))
    logger = tb.RunLogger.from_config(off, tmp_path)
    assert not logger.enabled
    logger.step(0, 1.0, 0.1)
    logger.task_end(0, evaluation([1], [1], 100.0), [[100.0]])
    logger.close()
    assert not (tmp_path / "tensorboard").exists()
    # a config without the key (before config.py has it) means off
    assert not tb.enabled(SimpleNamespace(train=SimpleNamespace()))

    logger = tb.RunLogger.from_config(on, tmp_path)
    assert logger.enabled
    logger.close()
    assert (tmp_path / "tensorboard" / "train").is_dir()

    monkeypatch.setattr(tb, "available", lambda: False)
    tb.require(off)  # off: nothing needed
    for call in (lambda: tb.require(on), lambda: tb.RunLogger.from_config(on, tmp_path / "other")):
        with pytest.raises(ConfigError, match=r"pip install duallora\[tensorboard\]"):
            call()
    assert not (tmp_path / "other").exists()


def test_logger_with_a_real_learner(tmp_path):
    """The learner's own evaluation and task record, and a per-step callback around its optimiser."""
    from duallora.config import load_config
    from duallora.training import ContinualLearner
    from tests.synthetic import SMALL_TRAINING, make_data, small_backbone

    cfg = load_config(None, SMALL_TRAINING + ["method.gate_layer=1"])  # the small test ViT has 2 blocks
    learner = ContinualLearner(cfg, num_tasks=2, backbone=small_backbone())
    logger = tb.RunLogger(tmp_path)
    steps = []

    def after_step(opt, args, kwargs):  # stands in for the learner's per-step hook
        steps.append(opt.param_groups[0]["lr"])
        logger.step(len(learner.task_classes), 1.0, opt)

    make = learner._optimizer

    def with_hook(groups):  # the learner's training optimiser, with a step hook
        opt = make(groups)
        opt.register_step_post_hook(after_step)
        return opt

    learner._optimizer = with_hook
    rows, tests = [], []
    for t, classes in enumerate([(7, 3), (0, 9)]):
        tests.append(make_data(classes, 5, seed=10 + t))
        record = learner.learn_task(make_data(classes, 20, seed=t), classes)
        ev = learner.evaluate(tests)
        rows.append(ev["accuracy"])
        logger.task_end(t, ev, rows, None, record)
    logger.close()
    train, _, _ = read(tmp_path / "tensorboard" / "train")
    assert len(train["train/loss"]) == len(steps) > 0  # one event per optimiser step of both tasks
    assert [v for _, v in train["train/lr/adapters"]] == pytest.approx(steps)  # the learner names its groups
    state = json.loads((tmp_path / "tensorboard" / "state.json").read_text())["task_start_steps"]
    assert len(state) == 3 and state[0] == 0 and state[-1] == len(steps)
    scalars, _, _ = read(tmp_path / "tensorboard" / "eval")
    assert [v for _, v in scalars["eval/task_id_accuracy"]] == pytest.approx([100.0, ev["task_id_accuracy"]])
    assert scalars["eval/accuracy_task_2"] == [(2, pytest.approx(rows[1][1]))]
    assert scalars["train/epoch_loss"][-1][1] == pytest.approx(record["epoch_loss"][-1])
