"""AdaptedLinear: the frozen linear layer with orthogonal, residual and LoRA branches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from duallora.adapters import AdaptedLinear

D_IN, D_OUT = 12, 9


def make_base(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT)


def tokens(batch: int = 3, n: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, D_IN, generator=g)


def orthonormal_rows(r: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D_IN, r, generator=g))
    return q.T.contiguous()


def test_no_branches_equals_base_and_base_is_frozen():
    base = make_base()
    ref = copy.deepcopy(base)
    layer = AdaptedLinear(base)
    h = tokens()
    assert torch.equal(layer(h), ref(h))
    assert all(not p.requires_grad for p in layer.base.parameters())
    # no residual attached: no gates, even with a gate function set
    layer.gate_fn = lambda x: torch.ones(x.shape[0], 1)
    assert layer.residual_gates(h) is None
    assert torch.equal(layer(h), ref(h))


def test_fresh_orthogonal_adapter_is_identity():
    base = make_base()
    ref = copy.deepcopy(base)
    layer = AdaptedLinear(base)
    B = layer.add_orthogonal(orthonormal_rows(4))
    assert B.shape == (D_OUT, 4)
    assert B.requires_grad
    assert torch.count_nonzero(B) == 0
    h = tokens()
    assert torch.equal(layer(h), ref(h))


def test_orthogonal_branch_and_merge():
    base = make_base()
    W0 = base.weight.detach().clone()
    layer = AdaptedLinear(base)
    A = orthonormal_rows(4)
    B = layer.add_orthogonal(A)
    g = torch.Generator().manual_seed(5)
    Bval = torch.randn(D_OUT, 4, generator=g)
    with torch.no_grad():
        B.copy_(Bval)
    h = tokens()
    before = layer(h)
    # the branch really adds B A h
    expected = h @ (W0 + Bval @ A).T + base.bias
    assert torch.allclose(before, expected, atol=1e-5)
    assert not torch.allclose(before, h @ W0.T + base.bias, atol=1e-3)
    layer.merge_orthogonal()
    assert layer.orth_A is None and layer.orth_B is None
    after = layer(h)
    assert torch.allclose(after, before, atol=1e-5)
    assert torch.equal(layer.base.weight, W0 + Bval @ A)
    assert len(layer.merged) == 1
    assert torch.equal(layer.merged[0][0], A) and torch.equal(layer.merged[0][1], Bval)
    # merging again is a no-op, and a new adapter may now be attached
    layer.merge_orthogonal()
    assert len(layer.merged) == 1
    layer.add_orthogonal(orthonormal_rows(2, seed=3))


def test_residual_fixed_one_hot_equals_dynamic_gate():
    layer = AdaptedLinear(make_base())
    g = torch.Generator().manual_seed(7)
    for task, r in ((1, 3), (2, 2)):
        P = torch.linalg.qr(torch.randn(D_IN, r, generator=g)).Q
        B = layer.add_residual(task, P)
        with torch.no_grad():
            B.copy_(torch.randn(D_OUT, r, generator=g))
    h = tokens(batch=4)
    base_out = layer.base(h)
    for j in range(2):
        layer.fixed_gates = torch.nn.functional.one_hot(torch.tensor(j), 2).float()
        fixed = layer(h)
        layer.fixed_gates = None
        layer.gate_fn = lambda x, j=j: torch.nn.functional.one_hot(torch.full((x.shape[0],), j), 2).float()
        dynamic = layer(h)
        layer.gate_fn = None
        assert torch.allclose(fixed, dynamic, atol=1e-5)
        expected = base_out + (h @ layer.res_P[j]) @ layer.res_B[j].T
        assert torch.allclose(fixed, expected, atol=1e-5)
        assert not torch.allclose(fixed, base_out, atol=1e-3)
    # soft gates: a weighted sum of the branches
    layer.fixed_gates = torch.tensor([0.25, 0.5])
    soft = layer(h)
    expected = (base_out + 0.25 * (h @ layer.res_P[0]) @ layer.res_B[0].T
                + 0.5 * (h @ layer.res_P[1]) @ layer.res_B[1].T)
    assert torch.allclose(soft, expected, atol=1e-5)


def test_per_image_gates_apply_per_image():
    layer = AdaptedLinear(make_base())
    P = torch.linalg.qr(torch.randn(D_IN, 3, generator=torch.Generator().manual_seed(8))).Q
    B = layer.add_residual(1, P)
    with torch.no_grad():
        B.copy_(torch.randn(D_OUT, 3, generator=torch.Generator().manual_seed(9)))
    h = tokens(batch=2)
    layer.gate_fn = lambda x: torch.tensor([[1.0], [0.0]])
    out = layer(h)
    base_out = layer.base(h)
    assert torch.allclose(out[1], base_out[1], atol=1e-6)
    expected0 = base_out[0] + (h[0] @ P) @ B.detach().T
    assert torch.allclose(out[0], expected0, atol=1e-5)
    assert not torch.allclose(out[0], base_out[0], atol=1e-3)
    # the same image alone with the same gate gives the same output
    layer.gate_fn = lambda x: torch.tensor([[1.0]])
    assert torch.allclose(layer(h[:1])[0], out[0], atol=1e-6)


def test_no_active_residual_without_gates():
    layer = AdaptedLinear(make_base())
    B = layer.add_residual(1, torch.eye(D_IN)[:, :2])
    with torch.no_grad():
        B.fill_(1.0)
    h = tokens()
    # neither fixed gates nor gate_fn: the residual is off
    assert torch.equal(layer(h), layer.base(h))
    layer.fixed_gates = torch.tensor([0.0])
    assert torch.equal(layer(h), layer.base(h))


def test_lora_branch_trains_both_factors():
    layer = AdaptedLinear(make_base())
    A, B = layer.add_lora(3, torch.Generator().manual_seed(0))
    assert A.shape == (3, D_IN) and B.shape == (D_OUT, 3)
    assert A.requires_grad and B.requires_grad
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    h = tokens()
    assert torch.equal(layer(h), layer.base(h))
    with torch.no_grad():
        B.fill_(0.1)
    assert torch.allclose(layer(h), layer.base(h) + (h @ A.T) @ B.T, atol=1e-5)


def _populated_layer(base: nn.Linear) -> AdaptedLinear:
    layer = AdaptedLinear(base)
    g = torch.Generator().manual_seed(11)
    for k in range(3):
        B = layer.add_orthogonal(orthonormal_rows(3, seed=20 + k))
        with torch.no_grad():
            B.copy_(torch.randn(D_OUT, 3, generator=g))
        layer.merge_orthogonal()
    for task in (1, 2):
        B = layer.add_residual(task, torch.linalg.qr(torch.randn(D_IN, 2, generator=g)).Q)
        with torch.no_grad():
            B.copy_(torch.randn(D_OUT, 2, generator=g))
    layer.freeze_residuals()
    A, B = layer.add_lora(2, g)
    with torch.no_grad():
        B.copy_(torch.randn(D_OUT, 2, generator=g))
    return layer


def test_adapter_state_round_trip_is_bit_identical():
    base = make_base(3)
    fresh = copy.deepcopy(base)
    layer = _populated_layer(base)
    state = layer.adapter_state("x.")
    assert "x.merged.2.A" in state and "x.merged.3.A" not in state
    assert state["x.residual_tasks"].tolist() == [1, 2]
    rebuilt = AdaptedLinear(fresh)
    rebuilt.load_adapter_state("x.", state)
    assert torch.equal(rebuilt.base.weight, layer.base.weight)
    assert torch.equal(rebuilt.base.bias, layer.base.bias)
    assert rebuilt.res_tasks == [1, 2]
    assert all(not B.requires_grad for B in rebuilt.res_B)
    h = tokens(batch=2)
    gates = torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    for lay in (layer, rebuilt):
        lay.gate_fn = lambda x: gates
    assert torch.equal(rebuilt(h), layer(h))
    layer.fixed_gates = rebuilt.fixed_gates = torch.tensor([0.0, 1.0])
    assert torch.equal(rebuilt(h), layer(h))
    # loading onto a layer that already carries adapters is refused
    with pytest.raises(ValueError):
        rebuilt.load_adapter_state("x.", state)


def test_shape_errors():
    layer = AdaptedLinear(make_base())
    with pytest.raises(ValueError):
        layer.add_orthogonal(torch.zeros(3, D_IN + 1))
    with pytest.raises(ValueError):
        layer.add_orthogonal(torch.zeros(D_IN))
    layer.add_orthogonal(torch.zeros(3, D_IN))
    with pytest.raises(ValueError):
        layer.add_orthogonal(torch.zeros(3, D_IN))  # already attached
    with pytest.raises(ValueError):
        layer.add_residual(1, torch.zeros(D_IN + 2, 2))
    with pytest.raises(ValueError):
        layer.add_residual(1, torch.zeros(D_IN))
    layer.add_residual(1, torch.zeros(D_IN, 2))
    with pytest.raises(ValueError):
        layer.add_residual(1, torch.zeros(D_IN, 2))  # task already has one


def test_residual_stack_cache_follows_edits_and_keeps_gradients():
    layer = AdaptedLinear(make_base())
    g = torch.Generator().manual_seed(3)
    P1 = torch.linalg.qr(torch.randn(D_IN, 2, generator=g)).Q
    P2 = torch.linalg.qr(torch.randn(D_IN, 3, generator=g)).Q
    B1 = layer.add_residual(1, P1)
    with torch.no_grad():
        B1.copy_(torch.randn(D_OUT, 2, generator=g))
    layer.freeze_residuals()
    B2 = layer.add_residual(2, P2)  # trainable: never served from the cache with autograd on
    h = tokens(batch=2)
    gates = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    layer.gate_fn = lambda x: gates

    def expected() -> torch.Tensor:
        out = layer.base(h)
        for i in range(2):
            out[i] = out[i] + gates[i, 0] * (h[i] @ P1) @ B1.detach().T + gates[i, 1] * (h[i] @ P2) @ B2.detach().T
        return out

    P, B, cols = layer.residual_stack()
    assert P.shape == (D_IN, 5) and B.shape == (D_OUT, 5)
    assert cols.tolist() == [0, 0, 1, 1, 1]
    layer(h).sum().backward()  # gradients reach the trainable B_2 through the stacked factors
    assert B2.grad is not None and B2.grad.abs().sum() > 0
    with torch.no_grad():
        first = layer(h)
        assert torch.allclose(first, expected(), atol=1e-5)
        B2.add_(1.0)  # an optimiser step: in place, bumps the version counter -> the cache is rebuilt
        second = layer(h)
        assert torch.allclose(second, expected(), atol=1e-5)
        assert not torch.allclose(first, second, atol=1e-3)
        assert layer.residual_stack()[1] is layer.residual_stack()[1]  # cached while nothing changes


def test_training_branches_fused_equal_separate_branches_with_their_gradients():
    """Training a task runs B_o A_o and the task's residual B_t P_t^T as one concatenated branch
    (AdaptedLinear._fixed_branches): same output and the same gradients as two separate branches."""
    g = torch.Generator().manual_seed(11)
    layer = AdaptedLinear(make_base())
    P = torch.linalg.qr(torch.randn(D_IN, 3, generator=g)).Q
    B_t = layer.add_residual(1, P)
    B_o = layer.add_orthogonal(orthonormal_rows(4))
    with torch.no_grad():
        B_t.copy_(torch.randn(D_OUT, 3, generator=g))
        B_o.copy_(torch.randn(D_OUT, 4, generator=g))
    layer.fixed_gates = torch.tensor([1.0])
    h = tokens(batch=4)
    y = layer(h)
    target = torch.randn(y.shape, generator=g)
    ((y - target) ** 2).sum().backward()
    fused_grads = B_o.grad.clone(), B_t.grad.clone()

    B_o2, B_t2 = B_o.detach().clone().requires_grad_(), B_t.detach().clone().requires_grad_()
    expected = layer.base(h) + (h @ layer.orth_A.T) @ B_o2.T + (h @ P) @ B_t2.T
    assert torch.allclose(y, expected, atol=1e-5)
    assert not torch.allclose(y, layer.base(h) + (h @ layer.orth_A.T) @ B_o2.T, atol=1e-2)  # B_t counts
    ((expected - target) ** 2).sum().backward()
    assert torch.allclose(fused_grads[0], B_o2.grad, atol=1e-4)
    assert torch.allclose(fused_grads[1], B_t2.grad, atol=1e-4)
    assert fused_grads[0].abs().sum() > 0 and fused_grads[1].abs().sum() > 0


def test_single_orthogonal_branch_is_computed_exactly_as_one_branch():
    """One branch (InfLoRA, DualLoRA's first task) is not concatenated: bit-identical to base + B A h."""
    layer = AdaptedLinear(make_base())
    B_o = layer.add_orthogonal(orthonormal_rows(4))
    with torch.no_grad():
        B_o.copy_(torch.randn(D_OUT, 4, generator=torch.Generator().manual_seed(3)))
    h = tokens()
    expected = layer.base(h) + torch.nn.functional.linear(torch.nn.functional.linear(h, layer.orth_A), B_o)
    assert torch.equal(layer(h), expected)
