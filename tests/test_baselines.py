"""Baselines (duallora.methods) through the shared learner: InfLoRA, SD-LoRA, L2P, SimpleCIL, FeCAM, joint.

Tiny random ViTs and synthetic images (one random pixel pattern per class), 1 epoch per task; the
training-free classifiers are checked by hand on features looked up from the image (pixel 0 = an id).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from duallora.backbones import create_backbone
from duallora.config import load_config
from duallora.errors import ConfigError, TrainingError
from duallora.methods import (
    L2P,
    METHODS,
    FeCAM,
    InfLoRA,
    Joint,
    LowRankBranches,
    NCMGate,
    RanPAC,
    SDLoRA,
    SimpleCIL,
    build_method,
)
from duallora.training import ContinualLearner
from tests.synthetic import SMALL_TRAINING, TASKS, make_data, small_backbone

BASE = SMALL_TRAINING
BASELINES = ["inflora", "sd-lora", "l2p", "simplecil", "fecam", "ranpac", "ncm-gate", "joint"]
TRAINING_FREE = {"simplecil", "fecam", "ranpac", "ncm-gate"}


# ---------------------------------------------------------------------- helpers
def make_learner(method: str, overrides=(), backbone=None, num_tasks: int = 3) -> ContinualLearner:
    small = ["method.gate_layer=1"] if method == "ncm-gate" else []  # the test backbones have 2 blocks
    cfg = load_config(None, BASE + [f"method.name={method}"] + small + list(overrides))
    return ContinualLearner(cfg, num_tasks=num_tasks, backbone=backbone or small_backbone(),
                            device=torch.device("cpu"))


def learn(learner: ContinualLearner, tasks=TASKS[:2], per_class: int = 20) -> list[dict]:
    return [learner.learn_task(make_data(c, per_class, seed=t), c) for t, c in enumerate(tasks)]


# ---------------------------------------------------------------------- every method, end to end
@pytest.mark.parametrize("method", BASELINES)
def test_method_learns_two_tasks_end_to_end(method):
    learner = make_learner(method)
    assert type(learner.method) is METHODS[method]
    records = learn(learner)
    for rec in records:
        if method in TRAINING_FREE:
            assert rec["epoch_loss"] == [] and rec["trained"] is False  # no epoch ran
        else:
            assert rec["epoch_loss"] and all(math.isfinite(v) for v in rec["epoch_loss"])
    x = make_data([7, 3, 0, 9], 2, seed=11).tensors[0]
    pred = learner.predict(x)
    assert pred.probs.shape == (8, 4)
    assert torch.allclose(pred.probs.sum(1), torch.ones(8), atol=1e-5)
    assert pred.labels.shape == (8,) and set(pred.labels.tolist()) <= {7, 3, 0, 9}
    assert ((pred.confidence >= 0.5 - 1e-6) & (pred.confidence <= 1 + 1e-6)).all()
    row = learner.evaluate([make_data(TASKS[0], 3, seed=12), make_data(TASKS[1], 3, seed=13)])
    assert row["total"] == [6, 6] and all(0.0 <= a <= 100.0 for a in row["accuracy"])
    if method in TRAINING_FREE | {"joint"}:
        # class templates are far apart: prototypes and the joint model get every image right
        assert row["accuracy"] == [100.0, 100.0], row


def test_training_free_methods_have_no_parameters_and_run_no_epoch(monkeypatch):
    for method in sorted(TRAINING_FREE):
        learner = make_learner(method)
        assert learner.method.param_groups(0) == {"adapters": [], "head": []}
        calls = []
        monkeypatch.setattr(learner.method, "train_logits", lambda x, t, calls=calls: calls.append(1))
        learn(learner, TASKS[:1])
        assert calls == [] and len(learner.model.heads) == 0


# ---------------------------------------------------------------------- InfLoRA
def test_inflora_down_projections_orthogonal_to_memory_frozen_and_kv_only():
    learner = make_learner("inflora")
    method = learner.method
    assert isinstance(method, InfLoRA)
    snaps: list[dict] = []
    checks: list[dict] = []
    orig_groups, orig_end = method.param_groups, method.end_task

    def groups(task):
        out = orig_groups(task)
        snaps.append({n: b.A[b.tasks.index(task)].detach().clone() for n, b in method.branches.items()})
        return out

    def end(ctx):
        rec = {"overlap": 0.0, "mem": 0, "rows": 0}
        for name, b in method.branches.items():
            j = b.tasks.index(ctx.task)
            A, M = b.A[j], method.memories[name].basis  # the memory before this task's growth
            assert not A.requires_grad and b.B[j].requires_grad
            assert torch.equal(A, snaps[-1][name])  # A_t did not move during training
            assert float(b.B[j].detach().norm()) > 0  # B_t trained from zero
            rec["rows"] += A.shape[0]
            rec["mem"] += M.shape[1]
            if A.shape[0] and M.shape[1]:
                rec["overlap"] = max(rec["overlap"], float((A.double() @ M).abs().max()))
        checks.append(rec)
        return orig_end(ctx)

    method.param_groups, method.end_task = groups, end  # type: ignore[method-assign]
    learn(learner, TASKS[:1])
    after1 = {n: (b.A[0].detach().clone(), b.B[0].detach().clone()) for n, b in method.branches.items()}
    learn_rec = learner.learn_task(make_data(TASKS[1], 20, seed=1), TASKS[1])
    assert learn_rec["memory_size"] and min(learn_rec["memory_size"].values()) > 0
    assert checks[0]["mem"] == 0 and checks[1]["mem"] > 0 and checks[1]["rows"] > 0  # not vacuous
    assert checks[1]["overlap"] < 1e-5
    for name, b in method.branches.items():
        assert b.tasks == [0, 1]
        assert torch.equal(b.A[0], after1[name][0]) and torch.equal(b.B[0], after1[name][1])
        assert not any(p.requires_grad for p in (*b.A, *b.B))
    # branches write to the k and v rows of qkv only
    name, layer = next(iter(learner.model.adapted_layers()))
    D = layer.in_features
    assert name.endswith("attn.qkv") and method.branches[name].num_rows == 2 * D
    h = torch.randn(3, 17, D)
    with torch.no_grad():
        full, base = layer(h), layer.base(h)
    assert torch.equal(full[..., :D], base[..., :D])
    assert not torch.allclose(full[..., D:], base[..., D:], atol=1e-6)


def test_inflora_keeps_old_task_outputs_with_eps_one():
    # width 192: task 1's 2 x 2 x 17 = 68 tokens leave room; with eps = 1 the memory holds all of them
    torch.manual_seed(0)
    learner = make_learner("inflora", ["method.energy_threshold_start=1.0", "method.energy_threshold_end=1.0"],
                           backbone=create_backbone("vit_tiny_patch7_28.duallora_mnist", pretrained=False),
                           num_tasks=2)
    task1 = make_data((7, 3), 2, seed=0)
    learner.learn_task(task1, (7, 3))
    x1 = task1.tensors[0]
    with torch.no_grad():
        before = learner.model.features(x1)
    learner.learn_task(make_data((0, 9), 10, seed=1), (0, 9))
    with torch.no_grad():
        after = learner.model.features(x1)
    assert max(float(b.B[1].norm()) for b in learner.method.branches.values()) > 1e-3
    scale = float(before.abs().max())
    assert torch.allclose(after, before, atol=1e-5 * scale, rtol=0), float((after - before).abs().max())


# ---------------------------------------------------------------------- SD-LoRA
def test_sdlora_official_structure_separate_qv_shared_magnitudes_normalised_directions():
    learner = make_learner("sd-lora")
    method = learner.method
    assert isinstance(method, SDLoRA)
    x = make_data([7, 3], 2, seed=5).tensors[0]
    orig_end = method.end_task
    continuity: list[float] = []

    def end(ctx):
        with torch.no_grad():
            before = learner.model.features(x)
        out = orig_end(ctx)
        with torch.no_grad():
            after = learner.model.features(x)
        continuity.append(float((after - before).abs().max() / before.abs().max()))
        return out

    method.end_task = end  # type: ignore[method-assign]
    learn(learner, TASKS[:2])
    # separate q and v LoRAs on every qkv layer, each with its own factors, on its own rows
    assert sorted(method.branches) == sorted(f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in "qv")
    q, v = method.branches["blocks.0.attn.qkv.q"], method.branches["blocks.0.attn.qkv.v"]
    d = q.in_features
    assert q.rows == ((0, d),) and v.rows == ((2 * d, 3 * d),)
    assert not torch.equal(q.A[0], v.A[0]) and not torch.equal(q.B[0], v.B[0])
    snap = {n: (b.A[0].detach().clone(), b.B[0].detach().clone(), b.A[1].detach().clone(),
                b.B[1].detach().clone()) for n, b in method.branches.items()}
    learned = [float(m) for m in method.magnitudes]
    assert len(learned) == 2 and learned[1] != pytest.approx(0.8, abs=1e-6)  # trained in task 2
    groups = None
    orig_groups = method.param_groups

    def spy(task):
        nonlocal groups
        groups = orig_groups(task)
        return groups

    method.param_groups = spy  # type: ignore[method-assign]
    start_values: list[float] = []
    orig_begin = method.begin_task

    def begin(ctx):
        out = orig_begin(ctx)
        start_values.extend(float(m.detach()) for m in method.magnitudes)
        return out

    method.begin_task = begin  # type: ignore[method-assign]
    learner.learn_task(make_data(TASKS[2], 20, seed=2), TASKS[2])
    assert max(continuity) < 1e-6  # end_task leaves the function as trained
    # every magnitude restarts at 0.8 at the start of a task, as in the official code, and trains
    assert start_values == pytest.approx([0.8, 0.8, 0.8])
    assert len(method.magnitudes) == 3 and all(not m.requires_grad for m in method.magnitudes)
    for name, b in method.branches.items():
        assert b.tasks == [0, 1, 2]
        A0, B0, A1, B1 = snap[name]
        assert torch.equal(b.A[0], A0) and torch.equal(b.B[0], B0) and torch.equal(b.A[1], A1)
        # earlier directions divided by ||B||_F ||A||_F (the official normalisation); the current one is not
        for j, (A, B) in enumerate([(A0, B0), (A1, B1)]):
            want = float(torch.linalg.matrix_norm(B.double()) * torch.linalg.matrix_norm(A.double()))
            assert b.norms[j] == pytest.approx(want, rel=1e-12)
        assert b.norms[2] == 1.0
        # one magnitude per task, the same parameter object on every layer and on q and v
        for j in range(3):
            assert b.alpha[j] is method.magnitudes[j]
    assert groups is not None
    trained = [id(p) for p in groups["adapters"]]
    assert len(trained) == len(set(trained)) == 2 * len(method.branches) + 3
    for b in method.branches.values():
        assert {id(b.A[2]), id(b.B[2])} <= set(trained)
        assert not {id(b.A[0]), id(b.B[0]), id(b.A[1]), id(b.B[1])} & set(trained)
    assert {id(m) for m in method.magnitudes} <= set(trained)
    # the branch formula: delta = sum_j alpha_j / n_j * B_j A_j h on the q rows
    h = torch.randn(3, q.in_features)
    with torch.no_grad():
        ref = sum(float(method.magnitudes[j]) / q.norms[j] * (h @ q.A[j].T @ q.B[j].T) for j in range(3))
        assert torch.allclose(q.delta(h), ref, atol=1e-5)


def test_low_rank_branches_hook_formula():
    lin = torch.nn.Linear(4, 6)
    b = LowRankBranches(lin, rows=((0, 2), (4, 6)))
    A = torch.randn(2, 4)
    B = torch.randn(4, 2)
    b.add(0, A, B, alpha=3.0, norm=2.0)
    h = torch.randn(5, 4)
    with torch.no_grad():
        y = lin(h)
        ref = lin.weight @ h.T
        ref = ref.T + lin.bias
        delta = 1.5 * (h @ A.T @ B.T)
        ref[:, [0, 1, 4, 5]] += delta
    assert torch.allclose(y, ref, atol=1e-5)


# ---------------------------------------------------------------------- L2P
def test_l2p_selects_prompts_per_image_and_trains_pool_and_keys():
    learner = make_learner("l2p", ["method.prompt_pool=6", "method.prompt_top_k=2", "method.prompt_length=3"])
    method = learner.method
    assert isinstance(method, L2P)
    keys0, prompts0 = method.keys.detach().clone(), method.prompts.detach().clone()
    learn(learner)
    assert not torch.equal(method.keys, keys0) and not torch.equal(method.prompts, prompts0)
    x = make_data([7, 3, 0, 9], 3, seed=9).tensors[0]
    with torch.no_grad():
        _, idx = method.select(method.query(x))
    assert idx.shape == (12, 2)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, idx_perm = method.select(method.query(x[perm]))
        assert torch.equal(idx_perm, idx[perm])
        for i in range(12):
            _, alone = method.select(method.query(x[i:i + 1]))
            assert torch.equal(alone[0], idx[i])
    full = learner.predict(x)
    shuffled = learner.predict(x[perm])
    assert torch.allclose(shuffled.probs, full.probs[perm], atol=1e-5)
    # the prompted pass inserts k * length tokens after the class token
    seen = []
    handle = learner.model.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    learner.predict(x[:2])
    handle.remove()
    assert seen == [17, 17 + 2 * 3]  # query pass, prompted pass


def test_l2p_loss_hook_adds_the_weighted_key_loss_and_the_record_keeps_the_cross_entropy():
    learner = make_learner("l2p", ["method.prompt_pool=6", "method.prompt_top_k=2", "method.prompt_key_weight=0.5"])
    method = learner.method
    learn(learner, TASKS[:1])
    x, y = make_data(TASKS[0], 3, seed=4).tensors
    y = (y == TASKS[0][1]).long()  # task-local labels
    logits = method.train_logits(x, 0)
    sim, idx = method.select(method.query(x))
    key_loss = (1.0 - sim.gather(1, idx)).sum(1).mean()
    ce = torch.nn.functional.cross_entropy(logits, y)
    total = method.loss(logits, y, x, 0)
    assert torch.allclose(total, ce + 0.5 * key_loss)
    total.backward()
    assert method.keys.grad is not None and float(method.keys.grad.abs().sum()) > 0  # the key term reaches the keys
    with pytest.raises(TrainingError, match="train_logits"):  # the key loss is used once, by its own step
        method.loss(logits, y, x, 0)
    # the record's loss is the plain cross-entropy of the step's logits, not the objective
    seen: list[float] = []
    orig = method.loss

    def spy(logits, labels, images, task):
        seen.append(float(torch.nn.functional.cross_entropy(logits.detach(), labels)))
        return orig(logits, labels, images, task)

    method.loss = spy  # type: ignore[method-assign]
    record = learner.learn_task(make_data(TASKS[1], 20, seed=1), TASKS[1])
    assert len(seen) == 4 and record["epoch_loss"] == [pytest.approx(sum(seen) / 4, rel=1e-6)]


# ---------------------------------------------------------------------- joint
def test_joint_trains_one_classifier_on_every_seen_task():
    learner = make_learner("joint", ["train.epochs=2"])
    method = learner.method
    assert isinstance(method, Joint)
    seen: list[int] = []
    orig = method.train_logits

    def spy(x, task):
        out = orig(x, task)
        seen.append(x.shape[0])
        assert out.shape == (x.shape[0], sum(method.sizes))  # logits over every seen class
        return out

    method.train_logits = spy  # type: ignore[method-assign]
    rec1 = learner.learn_task(make_data(TASKS[0], 20, seed=0), TASKS[0])
    n1 = sum(seen)
    seen.clear()
    rec2 = learner.learn_task(make_data(TASKS[1], 20, seed=1), TASKS[1])
    assert n1 == 2 * 40 and sum(seen) == 2 * 80  # task 2 trained on both tasks' 80 images, 2 epochs
    assert rec1["joint_train_images"] == 40 and rec2["joint_train_images"] == 80
    assert learner.model.head_sizes == [2, 2]
    union = method.training_set(method.datasets[1], 1)
    assert sorted({int(union[i][1]) for i in range(len(union))}) == [0, 1, 2, 3]
    test = make_data([7, 3, 0, 9], 5, seed=42)
    pred = learner.predict(test.tensors[0])
    assert torch.equal(pred.labels, test.tensors[1])


# ---------------------------------------------------------------------- training-free classifiers by hand
def id_images(n: int, start: int = 0) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(start, start + n, dtype=torch.uint8)
    return x


def feature_learner(method: str, table: torch.Tensor, overrides=()) -> ContinualLearner:
    learner = make_learner(method, overrides)
    learner.model.features = lambda x: table[x[:, 0, 0, 0].long()]  # type: ignore[method-assign]
    return learner


def feature_tasks(means: list[list[float]], offsets: list[list[float]], dim: int = 32):
    """Each class: its mean plus each offset; returns (table, per-task datasets, labels per task)."""
    rows = []
    for m in means:
        for o in offsets:
            v = torch.zeros(dim)
            v[: len(m)] = torch.tensor(m) + torch.tensor(o)
            rows.append(v)
    return torch.stack(rows)


def test_simplecil_predicts_by_cosine_to_class_means():
    means = [[2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 4.0, 0, 0], [-1.0, 0, 0, 0]]  # classes 7, 3 | 0, 9
    offs = [[0, 0, 0, 1.0], [0, 0, 0, -1.0]]
    table = feature_tasks(means, offs)
    tests = torch.zeros(2, 32)
    tests[0, :2] = torch.tensor([3.0, 1.0])
    tests[1, :2] = torch.tensor([10.0, 9.0])  # Euclid: nearest mean is class 0's; cosine: class 7
    table = torch.cat([table, tests])
    learner = feature_learner("simplecil", table)
    learner.learn_task(TensorDataset(id_images(4, 0), torch.tensor([7, 7, 3, 3])), (7, 3))
    learner.learn_task(TensorDataset(id_images(4, 4), torch.tensor([0, 0, 9, 9])), (0, 9))
    protos = learner.method.prototypes
    assert torch.equal(protos[:, :4], torch.tensor(means, dtype=torch.float64))
    assert torch.equal(protos[:, 4:], torch.zeros(4, 28, dtype=torch.float64))
    pred = learner.predict(id_images(2, 8))
    assert pred.labels.tolist() == [7, 7] and pred.tasks.tolist() == [0, 0]
    cos = torch.tensor([[3 / math.sqrt(10), 0.0, 1 / math.sqrt(10), -3 / math.sqrt(10)],
                        [10 / math.sqrt(181), 0.0, 9 / math.sqrt(181), -10 / math.sqrt(181)]])
    assert torch.allclose(pred.probs, torch.softmax(cos / 0.02, dim=1), atol=1e-5)


def test_fecam_predicts_by_mahalanobis_with_pooled_covariance():
    # 4 samples per class: mean +- (3, 0), mean +- (0, 0.1): pooled scatter diag(8 * 9, 8 * 0.01) over
    # 16 - 4 = 12 degrees of freedom -> covariance diag(6, 0.08 / 12) (plus the relative ridge)
    means = [[0.0, 0.0], [0.0, 5.0], [6.0, 1.0], [-6.0, 5.0]]  # classes 7, 3 | 0, 9
    offs = [[3.0, 0], [-3.0, 0], [0, 0.1], [0, -0.1]]
    table = feature_tasks(means, offs)
    tests = torch.zeros(2, 32)
    tests[0, :2] = torch.tensor([4.0, 0.0])  # Euclid: class 0 (distance 2.2 vs 4); Mahalanobis: class 7
    # Euclid: a three-way tie of classes 7, 3 and 0 (squared distance 13.36); Mahalanobis: 0 (farther in dim 0,
    # where the spread is large, closer in dim 1). (Was (-3, 5): an exact tie of 3 and 9 under any diagonal
    # covariance, which only float rounding decided.)
    tests[1, :2] = torch.tensor([8.0 / 3.0, 2.5])
    table = torch.cat([table, tests])
    learner = feature_learner("fecam", table, ["method.fecam_covariance=pooled"])
    learner.learn_task(TensorDataset(id_images(8, 0), torch.tensor([7] * 4 + [3] * 4)), (7, 3))
    learner.learn_task(TensorDataset(id_images(8, 8), torch.tensor([0] * 4 + [9] * 4)), (0, 9))
    sig = learner.method.signatures
    assert torch.allclose(sig.means[:, :2], torch.tensor(means, dtype=torch.float64), atol=1e-6)
    assert sig.count == 16
    var = torch.tensor([6.0, 0.08 / 12])
    ridge = 1e-4 * float(var.sum()) / 32
    pred = learner.predict(id_images(2, 16))
    assert pred.labels.tolist() == [7, 0]
    diff = tests[:, None, :2] - torch.tensor(means)[None]  # (2, 4, 2)
    d = (diff ** 2 / (var + ridge)).sum(-1) / 32
    assert torch.allclose(learner.method.signatures.class_distances(tests), d, rtol=1e-4)
    assert torch.allclose(pred.probs, torch.softmax(-d / 0.02, dim=1), atol=1e-5)


# ---------------------------------------------------------------------- save / load
@pytest.mark.parametrize("method", BASELINES)
def test_save_load_gives_identical_predictions(tmp_path, method):
    learner = make_learner(method, backbone=small_backbone(4))
    learn(learner)
    path = learner.save(tmp_path / "ckpt.safetensors")
    x = make_data([7, 3, 0, 9], 3, seed=7).tensors[0]
    want = learner.predict(x)
    loaded = ContinualLearner.load(path, device=torch.device("cpu"), backbone=small_backbone(4))
    assert type(loaded.method) is type(learner.method)
    got = loaded.predict(x)
    assert loaded.task_classes == [(7, 3), (0, 9)]
    assert torch.equal(got.probs, want.probs)
    assert torch.equal(got.labels, want.labels)
    assert torch.equal(got.confidence, want.confidence)


def test_loaded_joint_cannot_learn_further_tasks(tmp_path):
    from duallora.errors import TrainingError

    learner = make_learner("joint")
    learn(learner, TASKS[:1])
    loaded = ContinualLearner.load(learner.save(tmp_path / "j.safetensors"), device=torch.device("cpu"),
                                   backbone=small_backbone())
    with pytest.raises(TrainingError, match="earlier task"):
        loaded.learn_task(make_data(TASKS[1], 5, seed=1), TASKS[1])


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, fragment", [
    (["method.name=l2p", "method.gate=hard"], "method 'l2p' does not use it"),
    (["method.name=duallora", "method.prompt_pool=30"], "method 'duallora' does not use it"),
    (["method.name=simplecil", "method.rank_orthogonal=4"], "method 'simplecil' does not use it"),
    (["method.name=fecam", "method.adapted_modules=[qkv,fc1]"], "method 'fecam' does not use it"),
    (["method.name=sd-lora", "method.energy_threshold_end=1.0"], "method 'sd-lora' does not use it"),
    (["method.name=l2p", "method.prompt_top_k=11"], "prompt_top_k=11 must not exceed"),
    (["method.name=l2p", "method.prompt_length=0"], "prompt_length=0 must be a positive integer"),
])
def test_baseline_config_rejects_unused_or_bad_keys(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_baseline_config_accepts_its_keys():
    for overrides in (["method.name=inflora", "method.rank_orthogonal=4", "method.energy_threshold_end=1.0"],
                      ["method.name=sd-lora", "method.adapted_modules=[qkv,fc1]"],
                      ["method.name=l2p", "method.prompt_pool=20", "method.prompt_key_weight=0.5"],
                      ["method.name=simplecil", "method.tau_id=0.1"],
                      ["method.name=fecam", "method.ridge=0.01"],
                      ["method.name=joint", "method.rank_orthogonal=4"]):
        cfg = load_config(None, overrides)
        model, info = small_backbone()
        from duallora.model import AdaptedViT

        method = build_method(AdaptedViT(model, info.mean, info.std, cfg.method.adapted_modules), cfg.method)
        assert method.name == cfg.method.name


def test_sdlora_and_inflora_adapt_other_layers_on_all_rows():
    learner = make_learner("sd-lora", ["method.adapted_modules=[qkv,fc1]"], num_tasks=2)
    learn(learner, TASKS[:1], per_class=5)
    rows = {n: b.rows for n, b in learner.method.branches.items()}
    assert sum(n.endswith("mlp.fc1") for n in rows) == 2
    assert all(r is None for n, r in rows.items() if n.endswith("mlp.fc1"))
    assert isinstance(learner.method, SDLoRA)
    learner = make_learner("inflora", ["method.adapted_modules=[fc1]"], num_tasks=2)
    learn(learner, TASKS[:1], per_class=5)
    assert all(b.rows is None and b.num_rows == 128 for b in learner.method.branches.values())


def test_simplecil_fecam_are_registered_statistics_classifiers():
    assert {m: METHODS[m] for m in BASELINES} == {
        "inflora": InfLoRA, "sd-lora": SDLoRA, "l2p": L2P, "simplecil": SimpleCIL, "fecam": FeCAM, "ranpac": RanPAC,
        "ncm-gate": NCMGate, "joint": Joint}


def test_fecam_per_class_as_published():
    # two classes per task with different shapes: class 7 spread along dim 0, class 3 along dim 1
    gen = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for c, (mean, scale) in enumerate([([4.0, 0.5], [2.0, 0.1]), ([0.5, 4.0], [0.1, 2.0])]):
        z = torch.zeros(12, 32)
        z[:, :2] = torch.tensor(mean) + torch.tensor(scale) * torch.randn(12, 2, generator=gen)
        z[:, 2:] = 0.05 * torch.randn(12, 30, generator=gen)
        rows.append(z)
        labels += [(7, 3)[c]] * 12
    table = torch.cat(rows + [torch.randn(3, 32, generator=gen)])
    learner = feature_learner("fecam", table)
    learner.learn_task(TensorDataset(id_images(24, 0), torch.tensor(labels)), (7, 3))
    m = learner.method
    z = torch.nn.functional.normalize(table[:24], dim=1).double()  # normalised in the features' dtype
    for c in range(2):
        zc = z[c * 12:(c + 1) * 12]
        cov = torch.cov(zc.T)  # n - 1 degrees of freedom, as np.cov
        cov = cov + cov.diagonal().mean() * torch.eye(32, dtype=torch.float64)
        sd = cov.diagonal().sqrt()
        cov = cov / torch.outer(sd, sd)
        assert torch.allclose(m.means[c], zc.mean(0), atol=1e-12)
        assert torch.allclose(m.covariances[c], cov, atol=1e-10)
        assert torch.allclose(m.covariances[c].diagonal(), torch.ones(32, dtype=torch.float64))
    q = torch.nn.functional.normalize(table[24:], dim=1).double()
    want = torch.stack([torch.einsum("bd,de,be->b", q - m.means[c], torch.linalg.pinv(m.covariances[c]),
                                     q - m.means[c]) for c in range(2)], 1) / 32
    assert torch.allclose(m.class_distances(table[24:]).double(), want, rtol=1e-5)
    pred = learner.predict(id_images(3, 24))
    assert pred.labels.tolist() == [(7, 3)[i] for i in want.argmin(1).tolist()]


def test_ncm_gate_reads_the_gate_features_of_the_untouched_backbone():
    learner = make_learner("ncm-gate", ["method.gate_layer=1"], backbone=small_backbone(3))
    x = make_data(TASKS[0], 3, seed=4).tensors[0]
    bb = learner.model.backbone
    seen = []
    hooks = [bb.blocks[b].norm1.register_forward_hook(lambda m, i, o: seen.append(o.mean(1))) for b in (0, 1)]
    with torch.no_grad():
        learner.model.features(x)
    for h in hooks:
        h.remove()
    got = learner.method.gate_features(x)
    assert got.shape == (x.shape[0], 2 * learner.model.embed_dim)
    assert torch.allclose(got, torch.cat(seen, 1), atol=1e-6)
    assert not any(blk.norm1._forward_hooks for blk in bb.blocks)  # its hooks are removed
    # duallora's shared gate (before any adapter is trained) reads the same features
    dl = make_learner("duallora", ["method.gate_layer=1"], backbone=small_backbone(3))
    captured = []
    for name in ("blocks.0.attn.qkv", "blocks.1.attn.qkv"):  # the default placement: qkv inputs = norm1 outputs
        dl.model.adapted[name].recorder = lambda h: captured.append(h.mean(1))
    with torch.no_grad():
        dl.model.features(x)
    assert torch.allclose(torch.cat(captured, 1), got, atol=1e-6)
    assert dl.method.gate_blocks == [0, 1]
    with pytest.raises(ConfigError, match="gate_layer=9"):
        make_learner("ncm-gate", ["method.gate_layer=9"])


# ---------------------------------------------------------------------- heads with DualLoRA's task posterior
@pytest.mark.parametrize("method", ["frozen", "seq-lora", "inflora", "sd-lora"])
def test_posterior_variant_trains_the_same_model_and_keeps_its_within_task_predictions(method):
    from duallora.methods.calibration import calibrate

    heads = make_learner(method)  # gate_layer is read only with task_posterior=gate
    gate = make_learner(method, ["method.gate_layer=1", "method.task_posterior=gate"])
    learn(heads)
    learn(gate)
    for a, b in zip(heads.model.heads, gate.model.heads):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)  # the same training
    assert gate.method.posterior.signatures.num_tasks == 2 and heads.method.posterior is None
    x = make_data([7, 3, 0, 9], 3, seed=21).tensors[0]
    with torch.no_grad():
        logits = heads.method.logits(x)
        assert torch.equal(gate.method.logits(x), logits)
        plain, calibrated = heads.method.infer(x), gate.method.infer(x)
    assert torch.allclose(plain.probs, torch.softmax(logits, dim=1))
    # within each task the calibrated output ranks classes exactly as the base method's heads do
    # (images whose posterior for the task underflowed to 0 have no ranking left to compare)
    for j, (lo, hi) in enumerate(((0, 2), (2, 4))):
        live = calibrated.task_posterior[:, j] > 0
        assert live.any()
        assert torch.equal(calibrated.probs[live, lo:hi].argmax(1), plain.probs[live, lo:hi].argmax(1))
    assert torch.allclose(calibrated.probs, calibrate(logits, calibrated.task_posterior, [2, 2], "product"))
    assert torch.allclose(calibrated.probs.sum(1), torch.ones(12), atol=1e-5)
    # the posterior is DualLoRA's: min Mahalanobis distance per task of the gate features
    if method == "frozen":  # no adapters: the gate features are ncm-gate's on the untouched backbone
        ncm = make_learner("ncm-gate", ["method.gate_layer=1"])
        learn(ncm)
        with torch.no_grad():
            z = ncm.method.gate_features(x)
        want = ncm.method.signatures.task_posterior(z)
        assert torch.allclose(calibrated.task_posterior, want, atol=1e-6)


def test_posterior_variant_round_trips_its_statistics(tmp_path):
    learner = make_learner("inflora", ["method.gate_layer=1", "method.task_posterior=gate"])
    learn(learner)
    x = make_data([7, 3, 0, 9], 2, seed=3).tensors[0]
    path = learner.save(tmp_path / "ckpt.safetensors")
    loaded = ContinualLearner.load(path, device=torch.device("cpu"), backbone=small_backbone())
    assert torch.equal(loaded.predict(x).probs, learner.predict(x).probs)


# ---------------------------------------------------------------------- official settings
def test_l2p_head_reads_the_mean_of_the_prompt_tokens_and_pool_starts_in_unit_interval():
    learner = make_learner("l2p", ["method.prompt_pool=6", "method.prompt_top_k=2", "method.prompt_length=3"])
    method = learner.method
    # nn.init.uniform_: U(0, 1)
    assert float(method.prompts.detach().min()) >= 0 and float(method.prompts.detach().max()) < 1
    assert float(method.keys.detach().min()) >= 0 and float(method.keys.detach().max()) < 1
    learn(learner, TASKS[:1], per_class=5)
    x = make_data([7, 3], 2, seed=4).tensors[0]
    outputs = []
    handle = learner.model.backbone.norm.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        _, idx = method.select(method.query(x))
        feats = method.prompted_features(x, idx)
    handle.remove()
    tokens = outputs[-1]  # (B, 1 + 2 * 3 + patches, D): [cls, prompts, patches]
    assert torch.allclose(feats, tokens[:, 1:7].mean(dim=1), atol=1e-6)
    assert not torch.allclose(feats, tokens[:, 0], atol=1e-3)


def test_grad_clip_bounds_every_step_to_the_clipped_norm():
    lr, clip = 1.0, 1e-3
    learner = make_learner("frozen", ["train.optimizer=sgd", "train.momentum=0.0", f"train.lr={lr}",
                                      "train.scheduler=constant", f"train.grad_clip={clip}", "train.epochs=1",
                                      "train.min_steps=0"])
    steps: list[float] = []
    head = None
    before: list[torch.Tensor] = []

    def on_step(task, loss, opt):
        nonlocal head
        head = learner.model.heads[task]
        before.append(torch.cat([p.detach().flatten().clone() for p in head.parameters()]))

    learner.step_callback = on_step
    learn(learner, TASKS[:1], per_class=40)
    assert head is not None and len(before) >= 3
    # the callback runs after each optimizer step: consecutive snapshots differ by one update
    for a, b in zip(before, before[1:]):
        steps.append(float((b - a).norm()))
    # SGD without momentum: each update is lr * the clipped gradient, whose norm is at most `clip`
    assert max(steps) <= lr * clip * (1 + 1e-4) and min(steps) > 0.5 * lr * clip


def test_grad_clip_must_be_positive():
    with pytest.raises(ConfigError, match="train.grad_clip=0.0 must be > 0"):
        load_config(None, ["train.grad_clip=0"])


def test_duallora_with_adapters_at_or_above_the_gate_keeps_ncm_gates_task_posterior():
    # adapters only in block 1, gate reading blocks 0..1: nothing trained moves the gate's features, so
    # DualLoRA's task posterior is exactly the training-free ncm-gate's on the untouched backbone
    dl = make_learner("duallora", ["method.gate_layer=1", r"method.adapted_modules=[blocks\.1\.attn\.qkv]"])
    ncm = make_learner("ncm-gate", ["method.gate_layer=1"])
    learn(dl)
    learn(ncm)
    assert dl.method.memories["blocks.1.attn.qkv"].size > 0  # it did adapt block 1
    x = make_data([7, 3, 0, 9], 3, seed=11).tensors[0]
    with torch.no_grad():
        got, want = dl.method.infer(x).task_posterior, ncm.method.infer(x).task_posterior
    assert torch.allclose(dl.method.signatures["gate"].means, ncm.method.signatures.means, atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5)
    # method.protect_gate=true with the default placement is the same model: no adapter below the gate
    protected = make_learner("duallora", ["method.gate_layer=1", "method.protect_gate=true"])
    learn(protected)
    assert list(protected.method.memories) == ["blocks.1.attn.qkv"]
    assert protected.model.adapted["blocks.0.attn.qkv"].merged == []
    with torch.no_grad():
        assert torch.allclose(protected.method.infer(x).probs, dl.method.infer(x).probs, atol=1e-6)
    with pytest.raises(ConfigError, match="protect_gate"):
        load_config(None, ["method.gate=soft", "method.protect_gate=true"])


def test_default_duallora_adapts_only_the_last_block_and_keeps_the_untouched_backbones_gate():
    # DualLoRA's own defaults (docs/method.md, "Defaults"): the gate reads every block, adapters only in the last,
    # class scores from the adapted model's statistics, shrinkage while the statistics rest on few images
    dl = make_learner("duallora")
    cfg = dl.cfg.method
    assert (cfg.gate_layer, cfg.protect_gate, cfg.class_scores, cfg.class_tau, cfg.stat_images, cfg.shrinkage) == \
        (-1, True, "stats", 0.001, None, "auto")
    ncm = make_learner("ncm-gate", ["method.gate_layer=-1", "method.shrinkage=auto"])
    learn(dl)
    learn(ncm)
    assert list(dl.method.memories) == ["blocks.1.attn.qkv"]  # the 2-block test ViT: block 1 only
    assert dl.model.adapted["blocks.0.attn.qkv"].merged == [] and len(dl.model.adapted["blocks.1.attn.qkv"].merged) == 2
    gate = dl.method.signatures["gate"]
    assert gate.shrinks() and gate.count == 80  # every image; 78 degrees of freedom for 64 dimensions
    # nothing trained moves the gate's features: its statistics and task posterior are ncm-gate's on the untouched
    # backbone (with the same shrinkage)
    assert torch.allclose(gate.means, ncm.method.signatures.means, atol=1e-5)
    assert torch.allclose(gate.scatter, ncm.method.signatures.scatter, rtol=1e-5, atol=1e-8)
    x = make_data([7, 3, 0, 9], 3, seed=11).tensors[0]
    with torch.no_grad():
        out = dl.method.infer(x)
        assert torch.allclose(out.task_posterior, ncm.method.infer(x).task_posterior, atol=1e-5)
    assert dl.method.signatures["classes"].num_tasks == 2
    assert torch.allclose(out.probs.sum(1), torch.ones(len(x)), atol=1e-5)


def test_ncm_all_appends_the_final_feature_to_every_blocks_gate_tokens():
    learner = make_learner("ncm-gate", ["method.gate_layer=-1", "method.ncm_final=true"], backbone=small_backbone(3))
    x = make_data(TASKS[0], 3, seed=4).tensors[0]
    bb = learner.model.backbone
    seen = []
    hooks = [blk.norm1.register_forward_hook(lambda m, i, o: seen.append(o.mean(1))) for blk in bb.blocks]
    with torch.no_grad():
        final = learner.model.features(x)
    for h in hooks:
        h.remove()
    got = learner.method.gate_features(x)
    assert got.shape == (x.shape[0], (len(bb.blocks) + 1) * learner.model.embed_dim)
    assert torch.allclose(got, torch.cat(seen + [final], 1), atol=1e-6)
    learn(learner)
    assert learner.method.signatures.dim == got.shape[1] and learner.method.signatures.num_tasks == 2


def test_duallora_heads_plus_gate_multiplies_the_within_task_softmaxes():
    overrides = ["method.gate_layer=1", r"method.adapted_modules=[blocks\.1\.attn\.qkv]"]
    plain = make_learner("duallora", overrides + ["method.class_scores=heads"])
    learn(plain)
    both = make_learner("duallora", overrides + ["method.class_scores=heads+gate"])
    both.method.load_state_tensors(plain.method.state_tensors())
    both.task_classes = plain.task_classes
    x = make_data([7, 3, 0, 9], 3, seed=12).tensors[0]
    with torch.no_grad():
        a, b = plain.method.infer(x), both.method.infer(x)
        feats = plain.model.features(x)
        z = make_learner("ncm-gate", ["method.gate_layer=1"]).method.gate_features(x)
    assert torch.equal(a.task_posterior, b.task_posterior)  # the same task posterior
    heads = plain.model.head_logits(feats)
    gate = -plain.method.signatures["gate"].class_distances(z) / plain.cfg.method.tau_id
    for lo, hi in ((0, 2), (2, 4)):
        want = torch.softmax(heads[:, lo:hi], 1) * torch.softmax(gate[:, lo:hi], 1)
        want = want / want.sum(1, keepdim=True)
        got = b.probs[:, lo:hi] / b.probs[:, lo:hi].sum(1, keepdim=True)
        live = b.probs[:, lo:hi].sum(1) > 1e-12
        assert torch.allclose(got[live], want[live], atol=1e-4)
    with pytest.raises(ConfigError, match="class_scores"):
        load_config(None, ["method.gate=soft", "method.protect_gate=false", "method.class_scores=heads+gate"])


def test_duallora_head_over_gate_trains_heads_on_top_of_the_gate_class_scores():
    overrides = ["method.gate_layer=1", "method.protect_gate=true", "method.class_scores=heads+gate"]
    over = make_learner("duallora", overrides + ["method.head_over_gate=true"])
    plain = make_learner("duallora", overrides)
    learn(over)
    learn(plain)
    sig_over, sig_plain = over.method.signatures["gate"], plain.method.signatures["gate"]
    assert sig_over.num_tasks == 2  # added before each task's training, once
    # protected gate: the statistics gathered before training equal those gathered after it
    assert torch.allclose(sig_over.means, sig_plain.means, atol=1e-6)
    assert torch.allclose(sig_over.scatter, sig_plain.scatter, rtol=1e-6, atol=1e-8)
    assert not torch.equal(over.model.heads[1].weight, plain.model.heads[1].weight)  # trained otherwise
    x = make_data(TASKS[1], 2, seed=13).tensors[0]
    with torch.no_grad():
        got = over.method.train_logits(x, 1)
        z = make_learner("ncm-gate", ["method.gate_layer=1"]).method.gate_features(x)
        want = over.model.head_logits(over.model.features(x), 1) - sig_over.class_distances(z)[:, 2:4] / 0.02
    # the same logits up to a constant of each row (distances relative to the class means' mean): the same
    # cross-entropy and the same gradients
    shift = got - want
    assert shift.abs().max() > 1.0  # relative distances do move the row
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-3)
    assert torch.allclose(torch.log_softmax(got, 1), torch.log_softmax(want, 1), atol=1e-4)
    with pytest.raises(ConfigError, match="head_over_gate"):
        load_config(None, ["method.head_over_gate=true", "method.protect_gate=false", "method.class_scores=heads+gate"])


def adapted_class_features(learner: ContinualLearner, x: torch.Tensor) -> torch.Tensor:
    """ncm-all's features (every block's mean norm1 tokens, then the final feature) of DualLoRA's adapted model
    under its inference gating: (B, (depth + 1) D) float64."""
    seen: list = []
    hooks = [b.norm1.register_forward_hook(lambda m, i, o: seen.append(o.mean(1)))
             for b in learner.model.backbone.blocks]
    try:
        with torch.no_grad():
            f = learner.method._dynamic_features(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(seen + [f], 1).double()


def test_duallora_stats_class_scores_are_ncm_all_statistics_of_the_adapted_model():
    overrides = ["method.gate_layer=1", r"method.adapted_modules=[blocks\.1\.attn\.qkv]", "method.stat_images=null"]
    stats = make_learner("duallora", overrides + ["method.class_scores=stats", "method.class_tau=null"])
    plain = make_learner("duallora", overrides + ["method.class_scores=heads"])
    learn(stats)
    learn(plain)
    # gathering the class statistics changes no training step: the same adapters and heads
    assert torch.equal(stats.model.heads[1].weight, plain.model.heads[1].weight)
    sig = stats.method.signatures["classes"]
    D, depth = stats.model.embed_dim, len(stats.model.backbone.blocks)
    assert sig.dim == D * (depth + 1) and sig.num_tasks == 2 and sig.means.shape == (4, sig.dim)
    # task 2's class means: ncm-all's features (every block's mean norm1 tokens + final) of the final model
    data = make_data(TASKS[1], 20, seed=1)
    z = adapted_class_features(stats, data.tensors[0])
    y = data.tensors[1]
    for c in range(2):
        assert torch.allclose(sig.means[2 + c], z[y == TASKS[1][c]].mean(0), atol=1e-4)
    # prediction: within each task, softmax(-d_c / tau_id) of those statistics; the gate's task posterior
    x = make_data([7, 3, 0, 9], 3, seed=12).tensors[0]
    with torch.no_grad():
        out, base = stats.method.infer(x), plain.method.infer(x)
    assert torch.equal(out.task_posterior, base.task_posterior)
    scores = -sig.class_distances(adapted_class_features(stats, x).float()) / stats.cfg.method.tau_id
    for lo, hi in ((0, 2), (2, 4)):
        got = out.probs[:, lo:hi] / out.probs[:, lo:hi].sum(1, keepdim=True)
        live = out.probs[:, lo:hi].sum(1) > 1e-12
        assert live.any()
        assert torch.allclose(got[live], torch.softmax(scores[:, lo:hi], 1)[live], atol=1e-4)
    # a checkpoint round-trip keeps them; the heads-only model lacks them, so no run derives one from the other
    again = make_learner("duallora", overrides + ["method.class_scores=stats", "method.class_tau=null"])
    again.method.load_state_tensors(stats.method.state_tensors())
    again.task_classes = stats.task_classes
    with torch.no_grad():
        assert torch.allclose(again.method.infer(x).probs, out.probs, atol=1e-6)
    # class_tau: the same statistics and task posterior, another within-task softmax; inference only
    other = make_learner("duallora", overrides + ["method.class_scores=stats", "method.class_tau=1000.0"])
    other.method.load_state_tensors(stats.method.state_tensors())
    other.task_classes = stats.task_classes
    with torch.no_grad():
        out_other = other.method.infer(x)
    assert torch.equal(out_other.task_posterior, out.task_posterior)
    other_scores = scores * (0.02 / 1000.0)
    assert not torch.allclose(out_other.probs, out.probs, atol=1e-3)
    for lo, hi in ((0, 2), (2, 4)):
        got = out_other.probs[:, lo:hi] / out_other.probs[:, lo:hi].sum(1, keepdim=True)
        live = out_other.probs[:, lo:hi].sum(1) > 1e-12
        assert torch.allclose(got[live], torch.softmax(other_scores[:, lo:hi], 1)[live], atol=1e-4)
    with pytest.raises(ConfigError, match="class_tau"):
        load_config(None, ["method.class_tau=0"])
    from duallora.derivation import inference_only_change

    assert inference_only_change(stats.cfg, other.cfg)
    assert not inference_only_change(plain.cfg, stats.cfg)
    assert inference_only_change(stats.cfg, load_config(None, BASE + ["method.name=duallora"] + overrides
                                                        + ["method.class_scores=heads+stats"]))
    # the adapted statistics are gathered under the inference gating: the gate's keys change them
    for key in ("method.tau_id=0.05", "method.shrinkage=oas", "method.task_id_score=cosine"):
        assert not inference_only_change(stats.cfg, load_config(None, BASE + ["method.name=duallora"] + overrides
                                                                 + ["method.class_scores=stats", key]))
    # without adapted statistics they change only the prediction
    assert inference_only_change(plain.cfg, load_config(None, BASE + ["method.name=duallora"] + overrides
                                                        + ["method.class_scores=heads", "method.shrinkage=oas",
                                                           "method.tau_id=0.05"]))


def test_duallora_drift_compensation_moves_old_class_means_by_the_new_tasks_drift():
    from duallora.signatures import TaskSignatures, semantic_drift

    overrides = ["method.gate_layer=1", r"method.adapted_modules=[blocks\.1\.attn\.qkv]", "method.stat_images=null",
                 "method.class_scores=stats"]
    comp = make_learner("duallora", overrides + ["method.drift_compensation=true"])
    plain = make_learner("duallora", overrides)
    task1 = make_data(TASKS[0], 20, seed=0)
    comp.learn_task(task1, TASKS[0])
    plain.learn_task(task1, TASKS[0])
    sig = comp.method.signatures["classes"]
    old = sig.means.clone()
    assert torch.equal(old, plain.method.signatures["classes"].means)  # nothing to compensate after task 1

    task2 = make_data(TASKS[1], 20, seed=1)
    before = adapted_class_features(comp, task2.tensors[0])
    ref = TaskSignatures(sig.dim, score="mahalanobis", tau=sig.tau, ridge=sig.ridge, shrinkage=sig.shrinkage)
    ref.load("s.", sig.state("s."))
    comp.learn_task(task2, TASKS[1])
    plain.learn_task(task2, TASKS[1])
    after = adapted_class_features(comp, task2.tensors[0])
    # training is unchanged; task 1's means moved by the drift of task 2's images, task 2's are fresh
    assert torch.equal(comp.model.heads[1].weight, plain.model.heads[1].weight)
    want = old + semantic_drift(before, after, ref)
    assert torch.allclose(sig.means[:2], want, atol=1e-4)
    assert not torch.allclose(sig.means[:2], old, atol=1e-4)
    assert torch.allclose(sig.means[2:], plain.method.signatures["classes"].means[2:], atol=1e-6)
    with pytest.raises(ConfigError, match="drift_compensation"):
        load_config(None, ["method.drift_compensation=true", "method.class_scores=heads"])
