"""Replayed statistics passes (methods/replay.py): the same statistics as running every block again."""

from __future__ import annotations

import pytest
import torch

from duallora.config import load_config
from duallora.methods import replay as replay_module
from duallora.training import ContinualLearner
from tests.synthetic import SMALL_TRAINING, TASKS, make_data, small_backbone


class NoReplay(replay_module.TokenReplay):
    """Keeps nothing (0 MiB allowed): every pass runs every block, as before replay existed."""

    def __init__(self, model, block):
        super().__init__(model, block, max_mib=0)


def learner(overrides=()) -> ContinualLearner:
    cfg = load_config(None, SMALL_TRAINING + list(overrides))  # DualLoRA at its defaults
    return ContinualLearner(cfg, num_tasks=3, backbone=small_backbone(depth=3), device=torch.device("cpu"))


def learn_all(lr: ContinualLearner) -> None:
    for t, classes in enumerate(TASKS):
        lr.learn_task(make_data(classes, 12, seed=t), classes)


def block_calls(lr: ContinualLearner, block: int) -> dict:
    calls = {"n": 0}
    lr.model.backbone.blocks[block].register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_features_from_equals_the_whole_forward():
    lr = learner()
    x = make_data(TASKS[0], 5).tensors[0]
    seen = {}
    lr.model.backbone.blocks[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("t", a[0]))
    with torch.no_grad():
        whole = lr.model.features(x)
        assert torch.equal(lr.model.features_from(seen["t"], 2), whole)
    with pytest.raises(IndexError, match="outside the backbone's 3 blocks"):
        lr.model.features_from(seen["t"], 3)


@pytest.mark.parametrize("overrides", [
    [],  # the defaults: gate on every block, adapters in the last block (replayed from block 2)
    # the gate wholly below the replayed block (blocks 0-1, adapters in block 2 only): computed from recorded tokens
    ["method.protect_gate=false", "method.gate_layer=0", "method.adapted_modules=[blocks.2.attn.qkv]"],
    ["method.drift_compensation=true"],  # a pass before the task (not replayed) beside the replayed ones
])
def test_replayed_passes_give_the_same_statistics_and_predictions(overrides):
    replayed = learner(overrides)
    assert replayed.method.replay_block == 2
    calls = block_calls(replayed, 0)
    ends = []
    original_end = replayed.method.end_task

    def counted_end(ctx):
        before = calls["n"]
        out = original_end(ctx)
        ends.append(calls["n"] - before)
        return out

    replayed.method.end_task = counted_end  # type: ignore[method-assign]
    learn_all(replayed)
    assert ends == [0, 0, 0]  # the memory and class-statistics passes never ran block 0
    assert replayed.method._replay is None  # the task's tokens were released

    full = learner(overrides + ["method.stat_replay_mib=0"])
    calls_full = block_calls(full, 0)
    learn_all(full)
    assert calls_full["n"] > calls["n"]
    a, b = replayed.method.state_tensors(), full.method.state_tensors()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    x = make_data([c for task in TASKS for c in task], 3, seed=9).tensors[0]
    with torch.no_grad():
        assert torch.equal(replayed.method.infer(x).probs, full.method.infer(x).probs)


def test_a_task_over_the_memory_limit_is_not_kept():
    lr = learner()
    rep = NoReplay(lr.model, 2)
    x = make_data(TASKS[0], 4).tensors[0]
    with torch.no_grad(), rep.record() as close:
        lr.model.features(x)
        close(torch.zeros(len(x), dtype=torch.long))
    assert not rep.complete and rep.batches == []
    kept = replay_module.TokenReplay(lr.model, 2)
    with torch.no_grad(), kept.record() as close:
        lr.model.features(x)
        close(torch.zeros(len(x), dtype=torch.long))
    assert kept.complete and len(kept.batches) == 1
    batch = kept.batches[0]
    assert batch.tokens.shape == (8, 17, 32) and len(batch.early) == 2 and batch.early[0].shape == (8, 32)
    with pytest.raises(ValueError, match="nothing to skip"):
        replay_module.TokenReplay(lr.model, 0)


def test_stat_replay_mib_does_not_make_another_run():
    # the same numbers either way: resume and compare's reuse ignore the key (run_records.RESUME_IGNORED_KEYS)
    from duallora.run_records import config_differences

    a = load_config(None, ["method.stat_replay_mib=0"])
    assert config_differences(a, load_config(None)) == []
    assert config_differences(load_config(None, ["method.rank_orthogonal=4"]), load_config(None)) != []


@pytest.mark.parametrize("overrides", [[], ["method.class_scores=heads+gate", "method.protect_gate=true"]])
def test_relative_distances_give_the_probabilities_of_full_distances(overrides, monkeypatch):
    # inference scores classes and tasks by Mahalanobis distances up to a constant of each row (signatures.py,
    # class_distances(relative=True)); every softmax ignores that constant, so a trained DualLoRA's probabilities
    # are those of the full distances, up to float32 rounding
    from duallora.signatures import TaskSignatures

    lr = learner(overrides)
    learn_all(lr)
    x = torch.cat([make_data(c, 4, seed=9).tensors[0] for c in TASKS])
    fast = lr.predict(x)
    full = TaskSignatures.class_distances
    monkeypatch.setattr(TaskSignatures, "class_distances", lambda self, z, relative=False: full(self, z))
    lr.method.signatures["gate"]._cache = None
    slow = lr.predict(x)
    assert torch.allclose(fast.probs, slow.probs, atol=1e-4)
    assert torch.equal(fast.labels, slow.labels)
    assert torch.allclose(fast.confidence, slow.confidence, atol=1e-4)
    assert torch.equal(fast.tasks, slow.tasks)
    assert (fast.probs.max(1).values > 0.2).any()  # not a uniform guess: the scores decide
