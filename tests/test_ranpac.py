"""RanPAC (training-free variant): the closed-form ridge head, the ridge choice, accumulation over tasks."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from duallora.methods.ranpac import RIDGE_GRID, choose_ridge, ridge_solve
from tests.test_baselines import feature_learner, id_images


def test_ridge_solve_equals_a_direct_least_squares_solve():
    gen = torch.Generator().manual_seed(0)
    H = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.randint(0, 3, (40,), generator=gen), 3).double()
    lam = 0.7
    W = ridge_solve(H.T @ H, H.T @ Y, lam)
    # min |H W - Y|^2 + lam |W|^2 as an ordinary least-squares problem on [H; sqrt(lam) I]
    A = torch.cat([H, lam**0.5 * torch.eye(12, dtype=torch.float64)])
    B = torch.cat([Y, torch.zeros(12, 3, dtype=torch.float64)])
    direct = torch.linalg.lstsq(A, B).solution
    assert torch.allclose(W, direct, atol=1e-10)


def test_choose_ridge_equals_fitting_each_ridge_directly():
    gen = torch.Generator().manual_seed(1)
    H = torch.relu(torch.randn(50, 30, generator=gen, dtype=torch.float64))
    labels = torch.randint(0, 4, (50,), generator=gen)
    Y = torch.nn.functional.one_hot(labels, 4).double()
    Y = Y + 0.3 * torch.randn(50, 4, generator=gen, dtype=torch.float64)  # noisy targets: a mid-grid ridge wins
    losses = []
    for lam in RIDGE_GRID:
        W = ridge_solve(H[:40].T @ H[:40], H[:40].T @ Y[:40], lam)
        losses.append(float(((H[40:] @ W - Y[40:]) ** 2).mean()))
    want = RIDGE_GRID[min(range(len(losses)), key=losses.__getitem__)]
    assert choose_ridge(H, Y) == want


def test_ranpac_accumulates_tasks_into_one_closed_form_head():
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(16, 32, generator=gen)
    learner = feature_learner("ranpac", table, ["method.ranpac_dim=64"])
    m = learner.method
    learner.learn_task(TensorDataset(id_images(8, 0), torch.tensor([7] * 4 + [3] * 4)), (7, 3))
    learner.learn_task(TensorDataset(id_images(8, 8), torch.tensor([0] * 4 + [9] * 4)), (0, 9))
    H = torch.relu(table.double() @ m.W_rand.double())
    Y = torch.zeros(16, 4, dtype=torch.float64)
    Y[torch.arange(16), torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)] = 1.0
    assert torch.allclose(m.G, H.T @ H, rtol=1e-5, atol=1e-4)
    assert torch.allclose(m.Q, H.T @ Y, rtol=1e-5, atol=1e-4)
    assert len(m.ridges) == 2 and all(r in RIDGE_GRID for r in m.ridges)
    W = ridge_solve(H.T @ H, H.T @ Y, m.ridges[-1])
    assert torch.allclose(m.W, W, rtol=1e-4, atol=1e-6)
    logits = m.class_logits(table[:4])
    assert torch.allclose(logits.double(), (H[:4] @ W) / 0.02, rtol=1e-3, atol=1e-3)
