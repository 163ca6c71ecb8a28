"""TaskSignatures: class means, pooled covariance and the task posterior."""

from __future__ import annotations

import math

import pytest
import torch

from duallora.signatures import AUTO_OAS_BELOW, TaskSignatures, oas_coefficient, semantic_drift

F64 = torch.float64


def add_task(sig: TaskSignatures, z: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    acc = TaskSignatures.new_accumulator(num_classes, z.shape[1])
    TaskSignatures.accumulate(acc, z, y)
    sig.add_task(acc)


def cross_samples(mean: list[float], s: float) -> torch.Tensor:
    """The 4 points mean +- s e1, mean +- s e2 (2-D): within-class scatter 2 s^2 I."""
    m = torch.tensor(mean, dtype=F64)
    offs = torch.tensor([[s, 0.0], [-s, 0.0], [0.0, s], [0.0, -s]], dtype=F64)
    return m + offs


def test_mahalanobis_hand_example_identity_covariance():
    # 2 tasks of 1 class each, 4 samples per class: pooled scatter 2 * 2 s^2 I = 4 s^2 I,
    # degrees of freedom 8 - 2 = 6, so s^2 = 1.5 gives the pooled covariance I exactly.
    s = math.sqrt(1.5)
    sig = TaskSignatures(2, ridge=1e-12)
    add_task(sig, cross_samples([0.0, 0.0], s), torch.zeros(4, dtype=torch.long), 1)
    add_task(sig, cross_samples([10.0, 0.0], s), torch.zeros(4, dtype=torch.long), 1)
    assert torch.allclose(sig.means, torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64))
    assert torch.allclose(sig.scatter, 6.0 * torch.eye(2, dtype=F64), atol=1e-12)
    assert sig.count == 8
    z = torch.tensor([[3.0, 4.0]], dtype=F64)
    d = sig.task_distances(z)
    # task 0: |(3,4)|^2 / D = 25 / 2 = 12.5; task 1: |(-7,4)|^2 / 2 = 65 / 2 = 32.5
    assert torch.allclose(d, torch.tensor([[12.5, 32.5]], dtype=F64), atol=1e-8)
    post = sig.task_posterior(z)
    # softmax(-d / tau), tau = 1: p0 = 1 / (1 + exp(-20))
    p0 = 1.0 / (1.0 + math.exp(-20.0))
    assert torch.allclose(post, torch.tensor([[p0, 1 - p0]], dtype=F64), atol=1e-10)


def test_mahalanobis_uses_the_covariance_and_temperature():
    # within-class spread 10x larger along e1: a point 3 away along e1 is closer than 1 away along e2
    base = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 0.3], [0.0, -0.3]], dtype=F64)
    sig = TaskSignatures(2, ridge=1e-12, tau=2.0)
    add_task(sig, base, torch.zeros(4, dtype=torch.long), 1)
    add_task(sig, base + torch.tensor([6.0, 1.0], dtype=F64), torch.zeros(4, dtype=torch.long), 1)
    # scatter diag(2*9*2, 2*0.09*2) = diag(36, 0.36), dof 6 -> cov diag(6, 0.06)
    z = torch.tensor([[3.0, 0.0]], dtype=F64)
    d = sig.task_distances(z)
    # task 0: 9/6 / 2 = 0.75; task 1: (9/6 + 1/0.06) / 2 = (1.5 + 16.6667) / 2 = 9.08333
    assert torch.allclose(d, torch.tensor([[0.75, (1.5 + 1 / 0.06) / 2]], dtype=F64), atol=1e-8)
    post = sig.task_posterior(z)
    expected = torch.softmax(-d / 2.0, dim=1)
    assert torch.allclose(post, expected, atol=1e-12)
    assert post.argmax().item() == 0


def two_task_gaussians(seed: int = 0, n: int = 60, dim: int = 4):
    """Task 0 has classes around +-5 e1, task 1 classes around +-5 e2; unit noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(4, dim, dtype=F64)
    centres[0, 0], centres[1, 0], centres[2, 1], centres[3, 1] = 5.0, -5.0, 5.0, -5.0
    z = centres.repeat_interleave(n, 0) + torch.randn(4 * n, dim, generator=g, dtype=F64)
    cls = torch.arange(4).repeat_interleave(n)
    return z, cls, centres


@pytest.mark.parametrize("score", ["mahalanobis", "cosine", "subspace"])
def test_scores_pick_the_right_task(score):
    z, cls, centres = two_task_gaussians()
    sig = TaskSignatures(4, score=score, subspace_dims=1)
    add_task(sig, z[cls < 2], cls[cls < 2], 2)
    add_task(sig, z[cls >= 2], cls[cls >= 2] - 2, 2)
    assert sig.num_tasks == 2
    assert sig.class_task.tolist() == [0, 0, 1, 1]
    zt, clst, _ = two_task_gaussians(seed=1, n=20)
    post = sig.task_posterior(zt)
    assert post.shape == (80, 2)
    assert torch.allclose(post.sum(1), torch.ones(80, dtype=F64), atol=1e-12)
    task = (clst >= 2).long()
    assert (post.argmax(1) == task).float().mean().item() >= 0.95
    # the class centres themselves are unambiguous
    assert sig.task_posterior(centres).argmax(1).tolist() == [0, 0, 1, 1]


def test_task_distance_is_min_over_its_classes():
    z, cls, centres = two_task_gaussians()
    sig = TaskSignatures(4, score="cosine")
    add_task(sig, z[cls < 2], cls[cls < 2], 2)
    add_task(sig, z[cls >= 2], cls[cls >= 2] - 2, 2)
    zt = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    per_class = 1.0 - torch.nn.functional.normalize(zt, dim=1) @ torch.nn.functional.normalize(sig.means, dim=1).T
    expected = torch.stack([per_class[:, :2].min(1).values, per_class[:, 2:].min(1).values], dim=1)
    assert torch.allclose(sig.task_distances(zt), expected, atol=1e-12)
    msig = TaskSignatures(4, ridge=1e-12)
    add_task(msig, z[cls < 2], cls[cls < 2], 2)
    add_task(msig, z[cls >= 2], cls[cls >= 2] - 2, 2)
    # hand: squared Mahalanobis per dimension with the pooled covariance
    cov = msig.scatter / (msig.count - 4)
    diff = zt[:, None, :] - msig.means[None]
    dc = torch.einsum("bcd,de,bce->bc", diff, torch.linalg.inv(cov), diff) / 4
    expected = torch.stack([dc[:, :2].min(1).values, dc[:, 2:].min(1).values], dim=1)
    assert torch.allclose(msig.task_distances(zt), expected, rtol=1e-6)


def test_rows_sum_to_one_float32():
    z, cls, _ = two_task_gaussians()
    sig = TaskSignatures(4)
    add_task(sig, z[cls < 2], cls[cls < 2], 2)
    add_task(sig, z[cls >= 2], cls[cls >= 2] - 2, 2)
    zt = torch.randn(9, 4, generator=torch.Generator().manual_seed(4)) * 3
    post = sig.task_posterior(zt)
    assert post.dtype == torch.float32
    assert torch.allclose(post.sum(1), torch.ones(9), atol=1e-6)
    assert (post >= 0).all()


@pytest.mark.parametrize("score", ["mahalanobis", "cosine", "subspace"])
def test_batch_invariance(score):
    z, cls, _ = two_task_gaussians()
    sig = TaskSignatures(4, score=score, subspace_dims=2)
    add_task(sig, z[cls < 2], cls[cls < 2], 2)
    add_task(sig, z[cls >= 2], cls[cls >= 2] - 2, 2)
    zt = (torch.randn(16, 4, generator=torch.Generator().manual_seed(5)) * 4).float()
    batch = sig.task_posterior(zt)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(6))
    shuffled = sig.task_posterior(zt[perm])
    assert torch.allclose(shuffled, batch[perm], atol=1e-6)
    for i in (0, 7, 15):
        alone = sig.task_posterior(zt[i : i + 1])
        assert torch.allclose(alone[0], batch[i], atol=1e-6)


def test_state_round_trip():
    z, cls, _ = two_task_gaussians()
    sig = TaskSignatures(4, score="subspace", subspace_dims=2)
    add_task(sig, z[cls < 2], cls[cls < 2], 2)
    add_task(sig, z[cls >= 2], cls[cls >= 2] - 2, 2)
    state = sig.state("s.")
    other = TaskSignatures(4, score="subspace", subspace_dims=2)
    other.load("s.", state)
    assert torch.equal(other.means, sig.means)
    assert torch.equal(other.class_task, sig.class_task)
    assert torch.equal(other.scatter, sig.scatter)
    assert other.count == sig.count == 240
    assert other.num_tasks == 2
    assert all(torch.equal(a, b) for a, b in zip(other.task_bases, sig.task_bases))
    zt = torch.randn(5, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert torch.equal(other.task_posterior(zt), sig.task_posterior(zt))
    # the Mahalanobis view of the same statistics agrees too
    m1, m2 = TaskSignatures(4), TaskSignatures(4)
    m1.load("s.", state)
    m2.load("s.", state)
    assert torch.equal(m1.task_posterior(zt), m2.task_posterior(zt))


def test_errors():
    with pytest.raises(ValueError):
        TaskSignatures(3, score="euclid")
    with pytest.raises(ValueError):
        TaskSignatures(3, tau=0.0)
    sig = TaskSignatures(3)
    with pytest.raises(RuntimeError):
        sig.task_distances(torch.zeros(1, 3))
    acc = TaskSignatures.new_accumulator(2, 3)
    TaskSignatures.accumulate(acc, torch.ones(2, 3), torch.tensor([0, 0]))
    with pytest.raises(ValueError):  # class 1 has no image
        sig.add_task(acc)


def test_semantic_drift_hand_example():
    # the hand example's two classes (pooled covariance I): means (0, 0) and (10, 0)
    s = math.sqrt(1.5)
    sig = TaskSignatures(2, ridge=1e-12)
    add_task(sig, cross_samples([0.0, 0.0], s), torch.zeros(4, dtype=torch.long), 1)
    add_task(sig, cross_samples([10.0, 0.0], s), torch.zeros(4, dtype=torch.long), 1)
    # every new image moves by the same vector: every class moves by it
    before = torch.tensor([[1.0, 1.0], [9.0, -1.0], [5.0, 3.0]], dtype=F64)
    shift = torch.tensor([0.5, -2.0], dtype=F64)
    assert torch.allclose(semantic_drift(before, before + shift, sig), shift.expand(2, 2), atol=1e-12)
    # two images, one at each mean, drifting differently; per-dim distances 0 and 50: the weight of the
    # far image is exp(-50 / 0.1), so each class takes its own image's drift
    before = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64)
    drift = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64)
    assert torch.allclose(semantic_drift(before, before + drift, sig), drift, atol=1e-12)
    # a wide bandwidth averages: images at distances 0 and 50 (class 0) with weights 1 and exp(-50 / 50)
    w = math.exp(-1.0)
    want0 = (drift[0] + w * drift[1]) / (1 + w)
    assert torch.allclose(semantic_drift(before, before + drift, sig, bandwidth=50.0)[0], want0, atol=1e-12)
    sig.shift_means(drift)
    assert torch.allclose(sig.means, torch.tensor([[1.0, 0.0], [10.0, 3.0]], dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        sig.shift_means(drift[:1])
    with pytest.raises(ValueError, match="must match"):
        semantic_drift(before, before[:1], sig)


def _oas_numpy(X):
    """OAS of Chen et al. 2010, Eq. (23), written independently in numpy from samples X (n, p)."""
    import numpy as np

    n, p = X.shape
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    tr, tr2 = np.trace(S), np.trace(S @ S)
    return min(1.0, ((1 - 2 / p) * tr2 + tr**2) / ((n + 1 - 2 / p) * (tr2 - tr**2 / p)))


def test_oas_coefficient_equals_the_published_formula_and_behaves_at_its_limits():
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.2, 3.0, 8, dtype=F64)
    X = torch.randn(30, 8, generator=g, dtype=F64) * scale
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / 30
    assert oas_coefficient(S, 30) == pytest.approx(_oas_numpy(X.numpy()), rel=1e-12)
    # few samples per dimension: strong shrinkage; many: little
    few = torch.randn(5, 64, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, 64, dtype=F64)
    many = torch.randn(20000, 8, generator=g, dtype=F64) * scale
    rho_few = oas_coefficient(torch.cov(few.T, correction=0), 5)
    rho_many = oas_coefficient(torch.cov(many.T, correction=0), 20000)
    assert rho_few > 0.5 and rho_many < 0.01
    # a multiple of the identity needs no estimate of its shape: rho = 1
    assert oas_coefficient(2.0 * torch.eye(4, dtype=F64), 10) == 1.0
    with pytest.raises(ValueError, match="square"):
        oas_coefficient(torch.zeros(2, 3, dtype=F64), 4)
    with pytest.raises(ValueError, match="n must be"):
        oas_coefficient(torch.eye(2, dtype=F64), 0)


def test_oas_shrinkage_shrinks_the_pooled_covariance_toward_its_mean_eigenvalue():
    # one class of 100 cross samples (25 copies of 4, dof 99), pooled covariance diag(4, 1)
    a, b = math.sqrt(4.0 * 99 / 50), math.sqrt(99 / 50)
    z = torch.tensor([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]], dtype=F64).repeat(25, 1)
    y = torch.zeros(100, dtype=torch.long)
    plain, shrunk = TaskSignatures(2, ridge=1e-12), TaskSignatures(2, ridge=1e-12, shrinkage="oas")
    for sig in (plain, shrunk):
        add_task(sig, z, y, 1)
    cov = torch.diag(torch.tensor([4.0, 1.0], dtype=F64))
    assert torch.allclose(plain.scatter / 99, cov)
    rho = oas_coefficient(cov, 99)
    assert 0.0 < rho < 1.0
    expected = (1 - rho) * cov + rho * 2.5 * torch.eye(2, dtype=F64)  # mean eigenvalue (4 + 1) / 2
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    want = float(x @ torch.linalg.inv(expected) @ x.T) / 2
    assert float(shrunk.class_distances(x)[0, 0]) == pytest.approx(want, rel=1e-9)
    assert float(plain.class_distances(x)[0, 0]) == pytest.approx((1 / 4 + 4 / 1) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="shrinkage"):
        TaskSignatures(2, shrinkage="ledoit")


def test_oas_shrinkage_helps_the_nearest_class_mean_with_fewer_images_than_dimensions():
    # 5 Gaussian classes in 64 dimensions (anisotropic, shared covariance), 8 training images per class:
    # 35 degrees of freedom for a 64 x 64 covariance. Shrinkage gains 5-9 points on seeds 0-4 (0.814 -> 0.877
    # on seed 0); the plain estimate rests on the ridge alone.
    g = torch.Generator().manual_seed(0)
    d, classes = 64, 5
    scale = torch.linspace(0.3, 3.0, d, dtype=F64)
    mu = torch.randn(classes, d, generator=g, dtype=F64) * 0.8

    def sample(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes).repeat_interleave(k)
        return mu[y] + torch.randn(classes * k, d, generator=g, dtype=F64) * scale, y

    x_train, y_train = sample(8)
    x_test, y_test = sample(200)
    accuracy = {}
    for shrinkage in ("none", "oas"):
        sig = TaskSignatures(d, shrinkage=shrinkage)
        add_task(sig, x_train, y_train, classes)
        accuracy[shrinkage] = float((sig.class_distances(x_test).argmin(1) == y_test).double().mean())
    assert accuracy["none"] == pytest.approx(0.814, abs=1e-9)
    assert accuracy["oas"] == pytest.approx(0.877, abs=1e-9)


def test_auto_shrinkage_shrinks_below_two_degrees_of_freedom_per_dimension_and_not_above():
    # 4 dimensions, one class per task: degrees of freedom after t tasks of n images = t * (n - 1).
    # auto equals oas while dof < 2 * 4 = 8 and none from 8 on (AUTO_OAS_BELOW).
    assert AUTO_OAS_BELOW == 2.0
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=F64)
    sigs = {s: TaskSignatures(4, shrinkage=s) for s in ("none", "oas", "auto")}
    x = torch.randn(5, 4, generator=g, dtype=F64)
    seen = []
    for task in range(3):  # 4 images per task: dof 3, 6, 9
        z = torch.randn(4, 4, generator=g, dtype=F64) * scale + task
        for sig in sigs.values():
            add_task(sig, z, torch.zeros(4, dtype=torch.long), 1)
        d = {s: sig.class_distances(x) for s, sig in sigs.items()}
        shrinks = sigs["auto"].shrinks()
        seen.append(shrinks)
        assert torch.equal(d["auto"], d["oas"] if shrinks else d["none"])
        assert not torch.allclose(d["oas"], d["none"])
    assert seen == [True, True, False]
    assert sigs["oas"].shrinks() and not sigs["none"].shrinks()


def test_relative_distances_hand_example():
    # the hand example above (pooled covariance I, class means (0,0) and (10,0), centre (5,0)): for z = (3,4),
    # d = (12.5, 32.5); relative = d - |z - centre|^2 / D = d - ((3-5)^2 + 4^2) / 2 = d - 10 = (2.5, 22.5)
    s = math.sqrt(1.5)
    sig = TaskSignatures(2, ridge=1e-12)
    add_task(sig, cross_samples([0.0, 0.0], s), torch.zeros(4, dtype=torch.long), 1)
    add_task(sig, cross_samples([10.0, 0.0], s), torch.zeros(4, dtype=torch.long), 1)
    z = torch.tensor([[3.0, 4.0]], dtype=F64)
    assert torch.allclose(sig.class_distances(z, relative=True), torch.tensor([[2.5, 22.5]], dtype=F64), atol=1e-8)
    assert torch.allclose(sig.task_distances(z, relative=True), torch.tensor([[2.5, 22.5]], dtype=F64), atol=1e-8)


def test_relative_distances_differ_by_a_row_constant_and_keep_every_softmax_in_float32():
    # features far from the origin (offset 50, as un-centred mean tokens are): the relative form is centred on the
    # class means, so float32 keeps the posterior; 3 tasks x 4 classes in 16 dimensions, a full covariance
    g = torch.Generator().manual_seed(3)
    dim, n = 16, 40
    mix = torch.randn(dim, dim, generator=g, dtype=F64) / 4 + torch.eye(dim, dtype=F64)
    sig = TaskSignatures(dim, tau=0.05, ridge=1e-4)
    for _ in range(3):
        centres = 50.0 + 1.5 * torch.randn(4, dim, generator=g, dtype=F64)
        y = torch.arange(4).repeat_interleave(n)
        add_task(sig, centres[y] + torch.randn(4 * n, dim, generator=g, dtype=F64) @ mix, y, 4)
    z = 50.0 + 1.5 * torch.randn(32, dim, generator=g, dtype=F64)
    full, rel = sig.class_distances(z), sig.class_distances(z, relative=True)
    shift = full - rel  # the same in every column of a row, and positive (|L^{-1}(z - m)|^2 / D)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-9)
    assert (shift > 0).all()
    post64 = torch.softmax(-sig.task_distances(z) / 0.05, dim=1)
    assert torch.allclose(sig.task_posterior(z), post64, atol=1e-12)
    sig32 = TaskSignatures(dim, tau=0.05, ridge=1e-4)
    sig32.load("", sig.state(""))
    post32 = sig32.task_posterior(z.float())
    assert post32.dtype == torch.float32
    assert torch.allclose(post32.double(), post64, atol=1e-4)
    within64 = torch.softmax(-full / 0.001, dim=1)
    within32 = torch.softmax(-sig32.class_distances(z.float(), relative=True) / 0.001, dim=1)
    assert (within32.argmax(1) == within64.argmax(1)).all()
