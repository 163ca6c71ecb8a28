"""Low-rank adapters beside a frozen linear layer (method.md, "Where adapters sit").

An adapted layer computes, for input tokens ``h`` of shape ``(B, N, d_in)``::

    y = W h + b + B_o A_o h + sum_j g_j(x) B_j P_j^T h + s * B_l A_l h

* ``W``: the frozen pre-trained weight plus the merged orthogonal updates of finished tasks.
* ``(A_o, B_o)``: the orthogonal adapter of the task being learned; ``A_o`` (r_o, d_in) fixed,
  ``B_o`` (d_out, r_o) trained from zero, merged into ``W`` by :meth:`AdaptedLinear.merge_orthogonal`.
* ``(P_j, B_j)``: the residual adapter of task j; ``P_j`` (d_in, r_j) fixed, ``B_j`` (d_out, r_j)
  trained only during task j; ``g_j(x)`` in [0, 1] its per-image gate (dynamic memory).
* ``(A_l, B_l)``: a plain LoRA branch (the ``seq-lora`` reference method), both factors trained.

The layer keeps the factors of every merge, so its state can be saved compactly (low-rank factors, not
the full matrix) and replayed bit-for-bit onto the pre-trained weight (:meth:`adapter_state`,
:meth:`load_adapter_state`). Like PEFT's ``LoraLayer`` it wraps the original ``nn.Linear`` rather
than copying model code.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

GateFn = Callable[[torch.Tensor], torch.Tensor]


class ParameterCache:
    """A value computed from some tensors, reused while none of them changed.

    The key is each tensor's identity, in-place version counter, dtype and device, so an optimiser
    step, a load, a new tensor or a move to another device or dtype all rebuild the value. Only
    ``cacheable`` calls store or reuse it (callers pass False when the value must carry autograd).
    """

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._value: Any = None

    def get(self, tensors: list[torch.Tensor], build: Callable[[], Any], cacheable: bool = True) -> Any:
        """``build()``, or the stored result of an earlier call with the same, unchanged ``tensors``."""
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if cacheable and self._key == key:
            return self._value
        value = build()
        if cacheable:
            self._key, self._value = key, value
        return value

    def clear(self) -> None:
        self._key, self._value = None, None


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` with orthogonal, residual and plain LoRA low-rank branches.

    Args:
        base: the pre-trained linear layer; its parameters are frozen (``requires_grad=False``).

    Attributes:
        gate_fn: callable mapping this layer's input ``(B, N, d_in)`` to gates ``(B, J)`` for the J
            residual adapters (inference, dynamic memory). Used when :attr:`fixed_gates` is None.
        fixed_gates: ``(J,)`` gates shared by every image (training and statistics passes: the task
            being learned 1, the others 0), or None to use :attr:`gate_fn`.
        recorder: callable receiving this layer's input ``(B, N, d_in)`` (statistics passes), or None.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.orth_A: Optional[torch.Tensor] = None
        self.orth_B: Optional[nn.Parameter] = None
        self.res_P = nn.ParameterList()
        self.res_B = nn.ParameterList()
        self.res_tasks: list[int] = []
        self.lora_A: Optional[nn.Parameter] = None
        self.lora_B: Optional[nn.Parameter] = None
        self.lora_scale = 1.0
        self.merged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gate_fn: Optional[GateFn] = None
        self.fixed_gates: Optional[torch.Tensor] = None
        self.recorder: Optional[Callable[[torch.Tensor], None]] = None
        self._res_stack = ParameterCache()

    # ------------------------------------------------------------------ construction
    def add_orthogonal(self, A: torch.Tensor) -> nn.Parameter:
        """Attach an orthogonal adapter with fixed rows ``A`` (r, d_in) and trainable ``B_o = 0``.

        Returns:
            the trainable ``B_o`` parameter, shape (d_out, r).

        Raises:
            ValueError: if an orthogonal adapter is already attached or ``A`` has the wrong width.
        """
        if self.orth_A is not None:
            raise ValueError("an orthogonal adapter is already attached; merge it first")
        if A.ndim != 2 or A.shape[1] != self.in_features:
            raise ValueError(f"A_o must be (r, {self.in_features}), got {tuple(A.shape)}")
        w = self.base.weight
        self.orth_A = A.to(device=w.device, dtype=w.dtype).contiguous()
        self.orth_B = nn.Parameter(torch.zeros(self.out_features, A.shape[0], device=w.device, dtype=w.dtype))
        return self.orth_B

    @torch.no_grad()
    def merge_orthogonal(self) -> None:
        """``W <- W + B_o A_o``; drop the orthogonal adapter (method.md, step 5). No-op if none."""
        if self.orth_A is None or self.orth_B is None:
            return
        A, B = self.orth_A.detach().clone(), self.orth_B.detach().clone()
        if A.shape[0] > 0:
            self.base.weight.add_(B @ A)
        self.merged.append((A, B))
        self.orth_A, self.orth_B = None, None

    def add_residual(self, task: int, P: torch.Tensor) -> nn.Parameter:
        """Attach task ``task``'s residual adapter with fixed ``P`` (d_in, r) and trainable ``B = 0``.

        Returns:
            the trainable ``B_j`` parameter, shape (d_out, r).

        Raises:
            ValueError: if ``P`` has the wrong height or the task already has one.
        """
        if P.ndim != 2 or P.shape[0] != self.in_features:
            raise ValueError(f"P must be ({self.in_features}, r), got {tuple(P.shape)}")
        if task in self.res_tasks:
            raise ValueError(f"task {task} already has a residual adapter")
        w = self.base.weight
        self.res_P.append(nn.Parameter(P.to(device=w.device, dtype=w.dtype).contiguous(), requires_grad=False))
        B = nn.Parameter(torch.zeros(self.out_features, P.shape[1], device=w.device, dtype=w.dtype))
        self.res_B.append(B)
        self.res_tasks.append(task)
        self._res_stack.clear()
        return B

    def add_lora(self, rank: int, generator: Optional[torch.Generator] = None) -> list[nn.Parameter]:
        """Attach a plain LoRA branch: ``A`` (rank, d_in) Kaiming-uniform, ``B`` (d_out, rank) zeros.

        Returns:
            ``[A, B]``, both trainable.
        """
        w = self.base.weight
        A = torch.empty(rank, self.in_features, dtype=w.dtype)
        bound = 1.0 / math.sqrt(self.in_features)
        A.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(A.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        return [self.lora_A, self.lora_B]

    def freeze_residuals(self) -> None:
        """Stop gradients to every residual adapter (after its task ends)."""
        for B in self.res_B:
            B.requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def residual_stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual adapters side by side: ``P`` (d_in, R), ``B`` (d_out, R) and the adapter
        index of each of the R rank columns (R,) (``R = sum_j r_j``).

        Without autograd (inference, statistics passes) or once every ``B_j`` is frozen the result is
        cached; the cache is keyed on the tensors' identity and in-place version counters, so adding,
        loading or editing an adapter (an optimiser step included), moving the layer to another
        device or dtype all rebuild it. With autograd on and some ``B_j`` trainable it is rebuilt on
        every call, so that gradients reach it.
        """
        params = list(self.res_P) + list(self.res_B)

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            P = torch.cat(list(self.res_P), dim=1)
            ranks = torch.tensor([p.shape[1] for p in self.res_P], device=P.device)
            cols = torch.repeat_interleave(torch.arange(len(self.res_P), device=P.device), ranks)
            return P, torch.cat(list(self.res_B), dim=1), cols

        cacheable = not torch.is_grad_enabled() or not any(p.requires_grad for p in params)
        return self._res_stack.get(params, build, cacheable)

    def residual_gates(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """Gates ``(B, J)`` (or ``(J,)`` when fixed) for this input, or None when no residual is active."""
        if not self.res_tasks:
            return None
        if self.fixed_gates is not None:
            return self.fixed_gates
        if self.gate_fn is None:
            return None
        return self.gate_fn(h)

    def _fixed_branches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The branches every image passes alike: the orthogonal adapter and, under fixed gates, each
        switched-on residual adapter, as down projections ``(r, d_in)`` and up projections ``(d_out, r)``.

        Training a task runs both ``B_o A_o`` and ``g_t B_t P_t^T``; the forward pass concatenates them into
        one rank ``r_o + r_t`` branch, two matrix products instead of four (forward and backward), which
        brings DualLoRA's training step to InfLoRA's (docs/performance.md). A single branch is computed as
        before, so methods with one branch (InfLoRA, DualLoRA's first task) are unchanged bit for bit.
        """
        downs: list[torch.Tensor] = []
        ups: list[torch.Tensor] = []
        if self.orth_A is not None and self.orth_B is not None and self.orth_A.shape[0] > 0:
            downs.append(self.orth_A)
            ups.append(self.orth_B)
        gates = self.fixed_gates if self.res_tasks else None
        if gates is not None:
            for j in torch.nonzero(gates).flatten().tolist():
                downs.append(self.res_P[j].t())
                ups.append(self.res_B[j] if float(gates[j]) == 1.0 else gates[j] * self.res_B[j])
        return downs, ups

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Map ``h`` (..., d_in) to (..., d_out); see the module docstring for the formula."""
        if self.recorder is not None:
            self.recorder(h)
        y = self.base(h)
        downs, ups = self._fixed_branches()
        if len(downs) == 1:
            y = y + F.linear(F.linear(h, downs[0]), ups[0])
        elif downs:  # one down and one up projection for every fixed branch (training: B_o and B_t)
            y = y + F.linear(F.linear(h, torch.cat(downs)), torch.cat(ups, dim=1))
        if self.lora_A is not None and self.lora_B is not None:
            y = y + self.lora_scale * F.linear(F.linear(h, self.lora_A), self.lora_B)
        gates = self.residual_gates(h)
        if gates is not None and gates.ndim > 1:  # per-image gates (inference): fixed ones are in _fixed_branches
            P, Bcat, cols = self.residual_stack()  # (d_in, R), (d_out, R), (R,)
            g = gates.index_select(1, cols).to(h.dtype)  # (B, R): each rank column's gate
            z = h @ P
            shape = (g.shape[0],) + (1,) * (z.ndim - 2) + (g.shape[1],)
            y = y + F.linear(z * g.view(shape), Bcat)
        return y

    # ------------------------------------------------------------------ state
    def adapter_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors that, with the pre-trained weight, rebuild this layer exactly.

        Keys: ``{prefix}merged.{k}.A|B`` (merge history), ``{prefix}residual.{j}.P|B``,
        ``{prefix}residual_tasks``, ``{prefix}lora.A|B``. The open orthogonal adapter is not saved:
        states are taken between tasks, after the merge.
        """
        out: dict[str, torch.Tensor] = {}
        for k, (A, B) in enumerate(self.merged):
            out[f"{prefix}merged.{k}.A"] = A
            out[f"{prefix}merged.{k}.B"] = B
        for j, (P, B) in enumerate(zip(self.res_P, self.res_B)):
            out[f"{prefix}residual.{j}.P"] = P.detach()
            out[f"{prefix}residual.{j}.B"] = B.detach()
        if self.res_tasks:
            out[f"{prefix}residual_tasks"] = torch.tensor(self.res_tasks, dtype=torch.int64)
        if self.lora_A is not None and self.lora_B is not None:
            out[f"{prefix}lora.A"] = self.lora_A.detach()
            out[f"{prefix}lora.B"] = self.lora_B.detach()
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_adapter_state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild from :meth:`adapter_state` output onto a fresh (pre-trained) base layer.

        Merges are replayed in their original order, so the merged weight is bit-identical.

        Raises:
            ValueError: if this layer already carries adapters.
        """
        if self.merged or self.res_tasks or self.lora_A is not None:
            raise ValueError("load_adapter_state needs a freshly wrapped layer")
        k = 0
        while f"{prefix}merged.{k}.A" in tensors:
            self.add_orthogonal(tensors[f"{prefix}merged.{k}.A"])
            assert self.orth_B is not None
            self.orth_B.copy_(tensors[f"{prefix}merged.{k}.B"])
            self.merge_orthogonal()
            k += 1
        if f"{prefix}residual_tasks" in tensors:
            for j, task in enumerate(tensors[f"{prefix}residual_tasks"].tolist()):
                B = self.add_residual(int(task), tensors[f"{prefix}residual.{j}.P"])
                B.copy_(tensors[f"{prefix}residual.{j}.B"])
            self.freeze_residuals()
        if f"{prefix}lora.A" in tensors:
            A, B = self.add_lora(tensors[f"{prefix}lora.A"].shape[0])
            A.copy_(tensors[f"{prefix}lora.A"])
            B.copy_(tensors[f"{prefix}lora.B"])

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, merged={len(self.merged)}, "
            f"residual_tasks={self.res_tasks}, orthogonal={'yes' if self.orth_A is not None else 'no'}, "
            f"lora={'yes' if self.lora_A is not None else 'no'}"
        )
