"""SubspaceMemory (GPM energy criterion), adapter directions, schedule and Gram accumulation."""

from __future__ import annotations

import pytest
import torch

from duallora.memory import GramAccumulator, SubspaceMemory, energy_threshold

D = 16
F64 = torch.float64


def gram_of(n: int, rank: int | None = None, seed: int = 0, dim: int = D) -> torch.Tensor:
    """Gram matrix sum h h^T of n random tokens, optionally confined to a rank-``rank`` subspace."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        H = torch.randn(n, dim, generator=g, dtype=torch.float64)
    else:
        basis = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64)).Q
        H = torch.randn(n, rank, generator=g, dtype=torch.float64) @ basis.T
    # uneven scales so the spectrum is spread out
    H = H * torch.linspace(0.3, 3.0, dim, dtype=torch.float64)
    return H.T @ H


def test_orthogonal_directions_are_orthonormal_and_orthogonal_to_memory():
    mem = SubspaceMemory(D)
    mem.grow(gram_of(40, rank=5, seed=1), 1.0)
    assert mem.size == 5
    A = mem.orthogonal_directions(gram_of(50, seed=2), rank=4)
    assert A.shape == (4, D)
    assert A.dtype == torch.float64
    assert torch.allclose(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert (A @ mem.basis).abs().max() < 1e-10


def test_orthogonal_directions_empty_memory_are_top_eigenvectors():
    G = torch.diag(torch.tensor([1.0, 7.0, 3.0, 0.0], dtype=torch.float64))
    mem = SubspaceMemory(4)
    A = mem.orthogonal_directions(G, rank=2)
    assert torch.allclose(A.abs(), torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float64))
    # only 3 non-zero eigenvalues: asking for 4 gives 3 rows
    assert mem.orthogonal_directions(G, rank=4).shape == (3, 4)




def test_orthogonal_directions_when_memory_spans_the_task():
    # docstring: "zero [rows] when the memory already spans all of the task's input energy"
    G = gram_of(30, rank=4, seed=3)
    mem = SubspaceMemory(D)
    mem.grow(G, 1.0)
    assert mem.orthogonal_directions(G, rank=5).shape == (0, D)


def test_orthogonal_directions_of_a_full_memory_are_empty():
    # m = d: no direction is orthogonal to M, so A_o must be empty; today it returns rows with
    # |A_o M| ~ 0.8, which breaks "A_o is orthogonal to M" and the stability of old tasks.
    mem = SubspaceMemory(4)
    assert mem.grow(gram_of(50, seed=1, dim=4), 1.0) == 4
    A = mem.orthogonal_directions(gram_of(50, seed=2, dim=4), rank=3)
    assert A.shape[0] == 0 or float((A @ mem.basis).abs().max()) < 1e-10


def test_inside_directions_empty_when_task_is_orthogonal_to_memory():
    Q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    mem = SubspaceMemory(6)
    mem.load(Q[:, :2])
    H = torch.randn(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ Q[:, 2:].T
    assert mem.inside_directions(H.T @ H, rank=5).shape == (6, 0)


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.97, 1.0])
def test_grow_keeps_orthonormal_basis(eps):
    mem = SubspaceMemory(D)
    for seed in range(4):
        mem.grow(gram_of(12, seed=10 + seed), eps)
        M = mem.basis
        assert torch.allclose(M.T @ M, torch.eye(mem.size, dtype=torch.float64), atol=1e-10)
    assert mem.size > 0


def test_gpm_criterion_hand_example():
    # total energy 20; eps 0.8 needs 16: 10 + 5 = 15 < 16, 10 + 5 + 3 = 18 >= 16 -> 3 directions
    G = torch.diag(torch.tensor([10.0, 5.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    mem = SubspaceMemory(5)
    assert mem.grow(G, 0.8) == 3
    assert torch.allclose(mem.basis.abs(), torch.eye(5, dtype=torch.float64)[:, :3], atol=1e-12)
    assert mem.covered_energy(G) == pytest.approx(18 / 20)
    # eps 0.75 exactly reached by two directions (15/20)
    mem2 = SubspaceMemory(5)
    assert mem2.grow(G, 0.75) == 2
    assert torch.allclose(mem2.basis.abs(), torch.eye(5, dtype=torch.float64)[:, :2], atol=1e-12)
    # eps 0.5: the top direction alone covers 10/20
    assert SubspaceMemory(5).grow(G, 0.5) == 1


def test_gpm_criterion_counts_covered_energy():
    G = torch.diag(torch.tensor([10.0, 5.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    mem = SubspaceMemory(5)
    mem.load(torch.eye(5, dtype=torch.float64)[:, :1])  # M = e1 covers 10 of 20
    # 10 + 5 = 15 < 16, 10 + 5 + 3 = 18 >= 16 -> e2, e3
    assert mem.grow(G, 0.8) == 2
    assert torch.allclose(mem.basis.abs(), torch.eye(5, dtype=torch.float64)[:, :3], atol=1e-12)
    # already covered: nothing added
    assert mem.grow(G, 0.9) == 0
    assert mem.size == 3
    # M = e3 (3 of 20): eps 0.8 needs 13 more: 10 (e1) < 13, 10 + 5 = 15 >= 13 -> e1, e2
    mem3 = SubspaceMemory(5)
    mem3.load(torch.eye(5, dtype=torch.float64)[:, 2:3])
    assert mem3.grow(G, 0.8) == 2
    span = mem3.basis @ mem3.basis.T
    assert torch.allclose(span, torch.diag(torch.tensor([1.0, 1, 1, 0, 0], dtype=torch.float64)), atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_eps_one_adds_exactly_the_rank(k):
    G = gram_of(25, rank=k, seed=k)
    mem = SubspaceMemory(D)
    assert mem.grow(G, 1.0) == k
    assert mem.covered_energy(G) == pytest.approx(1.0, abs=1e-10)
    # a second task in a fresh rank-2 subspace adds 2 more
    G2 = gram_of(25, rank=2, seed=100 + k)
    assert mem.grow(G2, 1.0) == 2
    assert mem.size == k + 2
    assert mem.covered_energy(G2) == pytest.approx(1.0, abs=1e-10)


def spread_gram(k: int, dim: int = D, decades: float = 9.0, seed: int = 0) -> torch.Tensor:
    """Rank-k Gram matrix whose eigenvalues span ``decades`` orders of magnitude (1 .. 10^-decades)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=F64)).Q
    lam = torch.logspace(0, -decades, k, dtype=F64)
    return (U * lam) @ U.T


def test_eps_one_keeps_weak_but_real_directions():
    G = spread_gram(6)  # eigenvalues 1, 1.6e-2, ..., 1e-9: rank 6, far above float64 round-off
    mem = SubspaceMemory(D)
    assert mem.grow(G, 1.0) == 6
    assert 1.0 - mem.covered_energy(G) < 1e-13


def test_eps_one_with_moderate_spread_adds_the_rank():
    G = spread_gram(5, decades=4.0, seed=1)  # eigenvalues 1 .. 1e-4
    mem = SubspaceMemory(D)
    assert mem.grow(G, 1.0) == 5
    assert 1.0 - mem.covered_energy(G) < 1e-12


def test_grow_is_capped_by_the_width_and_rejects_bad_threshold():
    mem = SubspaceMemory(4)
    assert mem.grow(gram_of(50, seed=1, dim=4), 1.0) == 4
    assert mem.grow(gram_of(50, seed=2, dim=4), 1.0) == 0
    assert mem.size == 4
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            SubspaceMemory(4).grow(torch.eye(4, dtype=torch.float64), bad)
    assert SubspaceMemory(4).grow(torch.zeros(4, 4, dtype=torch.float64), 0.9) == 0


def test_inside_directions_lie_in_memory_and_rank_is_capped():
    mem = SubspaceMemory(D)
    assert mem.inside_directions(gram_of(30, seed=1), 5).shape == (D, 0)
    mem.grow(gram_of(30, rank=3, seed=2), 1.0)
    assert mem.size == 3
    G = gram_of(40, seed=4)
    P = mem.inside_directions(G, rank=10)
    assert P.shape == (D, 3)  # capped by m = 3
    M = mem.basis
    assert torch.allclose(M @ (M.T @ P), P, atol=1e-10)  # in span M
    assert torch.allclose(P.T @ P, torch.eye(3, dtype=torch.float64), atol=1e-10)
    P2 = mem.inside_directions(G, rank=2)
    assert P2.shape == (D, 2)
    # top direction of M M^T G M M^T
    S = M @ M.T @ G @ M @ M.T
    vals, vecs = torch.linalg.eigh(S)
    assert abs(float(vecs[:, -1] @ P2[:, 0])) == pytest.approx(1.0, abs=1e-8)


def test_energy_threshold_schedule():
    vals = [energy_threshold(t, 5, 0.95, 0.99) for t in range(5)]
    assert vals == pytest.approx([0.95, 0.96, 0.97, 0.98, 0.99], abs=1e-12)
    assert energy_threshold(7, 5, 0.95, 0.99) == pytest.approx(0.99)  # past the end: stays at end
    assert energy_threshold(3, None, 0.9, 0.99) == 0.9
    assert energy_threshold(0, 1, 0.9, 0.99) == 0.9
    assert energy_threshold(1, 3, 0.9, 1.0) == pytest.approx(0.95)


def test_gram_accumulator_batches_equal_one_shot():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 7, 6, generator=g)
    acc = GramAccumulator(6)
    for chunk in h.split(3):
        acc.update(chunk)
    flat = h.reshape(-1, 6).double()
    assert acc.count == 70
    assert acc.gram.dtype == torch.float64
    assert torch.allclose(acc.gram, flat.T @ flat, atol=1e-10)
    one = GramAccumulator(6)
    one.update(h)
    assert torch.allclose(acc.gram, one.gram, atol=1e-10)


def test_gram_accumulator_cls_uses_token_zero_only():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, 3, generator=g)
    acc = GramAccumulator(3, tokens="cls")
    acc.update(h)
    c = h[:, 0].double()
    assert acc.count == 5
    assert torch.allclose(acc.gram, c.T @ c, atol=1e-12)
    # changing the other tokens changes nothing
    h2 = h.clone()
    h2[:, 1:] = 100.0
    acc2 = GramAccumulator(3, tokens="cls")
    acc2.update(h2)
    assert torch.equal(acc.gram, acc2.gram)
    with pytest.raises(ValueError):
        GramAccumulator(3, tokens="mean")


def test_memory_state_round_trip():
    mem = SubspaceMemory(D)
    mem.grow(gram_of(30, seed=5), 0.9)
    other = SubspaceMemory(D)
    other.load(mem.state())
    assert torch.equal(other.basis, mem.basis)
    with pytest.raises(ValueError):
        other.load(torch.zeros(D + 1, 2, dtype=torch.float64))
