"""Low-rank branches hooked onto linear layers, and the base of the methods built on them
(InfLoRA, SD-LoRA).

:class:`LowRankBranches` adds its branches to the output of a wrapped linear layer with a forward
hook (no forked model code); :class:`BranchMethod` keeps one per adapted layer
(``model.adapted_sites()``, the layers ``method.adapted_modules`` places) and saves them with the
heads. This is the way a new method attaches low-rank branches (the
:class:`~duallora.model.AdaptedViT` docstring says when ``AdaptedLinear``'s own branches fit instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from duallora.errors import ConfigError
from duallora.methods.base import ContinualMethod
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig

Rows = Optional[tuple[tuple[int, int], ...]]


class LowRankBranches(nn.Module):
    """Low-rank branches summed into the output of one linear layer (attached by a forward hook).

    For input tokens ``h`` (..., d_in) the hooked layer returns::

        y = layer(h) + sum_j (alpha_j / n_j) * B_j A_j h        (only on the output rows ``rows``)

    with ``A_j`` (r_j, d_in), ``B_j`` (len(rows), r_j), a magnitude ``alpha_j`` (a 0-dim parameter)
    and a fixed normaliser ``n_j`` (1 unless a method sets it, e.g. SD-LoRA's ``||B_j A_j||_F``).

    Args:
        layer: the linear layer (``in_features``/``out_features``, e.g. an ``AdaptedLinear``).
        rows: output rows the branches write to, as ``((lo, hi), ...)`` ranges; None = every row.
    """

    def __init__(self, layer: nn.Module, rows: Rows = None) -> None:
        super().__init__()
        self.in_features = int(layer.in_features)
        self.out_features = int(layer.out_features)
        self.rows = rows
        self.num_rows = self.out_features if rows is None else sum(hi - lo for lo, hi in rows)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.alpha = nn.ParameterList()
        self.norms: list[float] = []
        self.tasks: list[int] = []
        self._index: Optional[torch.Tensor] = None
        self.handle = layer.register_forward_hook(self._hook)

    def __len__(self) -> int:
        return len(self.tasks)

    def add(self, task: int, A: torch.Tensor, B: Optional[torch.Tensor] = None, train_A: bool = False,
            alpha: float = 1.0, norm: float = 1.0) -> tuple[nn.Parameter, nn.Parameter]:
        """Append task ``task``'s branch: ``A`` (r, d_in) as given, ``B`` as given or zeros (trained).

        Returns:
            ``(A, B)`` parameters; ``A`` trains only with ``train_A``, ``B`` always trains (freeze it
            with :meth:`freeze`); ``alpha`` is fixed until a method makes it trainable.

        Raises:
            ValueError: ``A`` or ``B`` of the wrong shape.
        """
        if A.ndim != 2 or A.shape[1] != self.in_features:
            raise ValueError(f"A must be (r, {self.in_features}), got {tuple(A.shape)}")
        r = A.shape[0]
        if B is None:
            B = torch.zeros(self.num_rows, r, dtype=A.dtype, device=A.device)
        if B.shape != (self.num_rows, r):
            raise ValueError(f"B must be ({self.num_rows}, {r}), got {tuple(B.shape)}")
        pa = nn.Parameter(A.contiguous(), requires_grad=train_A)
        pb = nn.Parameter(B.contiguous())
        self.A.append(pa)
        self.B.append(pb)
        self.alpha.append(nn.Parameter(torch.tensor(float(alpha), dtype=A.dtype, device=A.device),
                                       requires_grad=False))
        self.norms.append(float(norm))
        self.tasks.append(int(task))
        return pa, pb

    def freeze(self, j: int) -> None:
        """Stop gradients to branch ``j``'s factors (its task is over)."""
        self.A[j].requires_grad_(False)
        self.B[j].requires_grad_(False)

    def _rows_index(self, device: torch.device) -> torch.Tensor:
        if self._index is None or self._index.device != device:
            assert self.rows is not None
            self._index = torch.cat([torch.arange(lo, hi) for lo, hi in self.rows]).to(device)
        return self._index

    def delta(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """The summed branch output (..., len(rows)) for input ``h``, or None without branches."""
        live = [j for j in range(len(self.tasks)) if self.A[j].shape[0] > 0]
        if not live:
            return None
        A = torch.cat([self.A[j] for j in live], dim=0)  # (R, d_in)
        B = torch.cat([self.B[j] for j in live], dim=1)  # (rows, R)
        coef = torch.cat([(self.alpha[j] / self.norms[j]).reshape(1).expand(self.A[j].shape[0]) for j in live])
        return F.linear(F.linear(h, A) * coef.to(h.dtype), B)

    def _hook(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
        d = self.delta(inputs[0])
        if d is None:
            return None
        if self.rows is None:
            return out + d
        return out.index_add(out.ndim - 1, self._rows_index(out.device), d.to(out.dtype))

    # ------------------------------------------------------------------ state
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors that rebuild the branches exactly (``{prefix}{j}.A|B|alpha|norm``, ``{prefix}tasks``)."""
        out: dict[str, torch.Tensor] = {}
        for j in range(len(self.tasks)):
            out[f"{prefix}{j}.A"] = self.A[j].detach()
            out[f"{prefix}{j}.B"] = self.B[j].detach()
            out[f"{prefix}{j}.alpha"] = self.alpha[j].detach().reshape(1).clone()  # may be shared (SD-LoRA)
            out[f"{prefix}{j}.norm"] = torch.tensor([self.norms[j]], dtype=torch.float64)
        if self.tasks:
            out[f"{prefix}tasks"] = torch.tensor(self.tasks, dtype=torch.int64)
        return {k: v.cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load(self, prefix: str, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
             trainable_alpha: bool = False) -> None:
        """Restore :meth:`state` output into empty branches; every factor frozen."""
        if self.tasks:
            raise ValueError("load needs empty branches")
        if f"{prefix}tasks" not in tensors:
            return
        for j, task in enumerate(tensors[f"{prefix}tasks"].tolist()):
            A = tensors[f"{prefix}{j}.A"].to(device=device, dtype=dtype)
            B = tensors[f"{prefix}{j}.B"].to(device=device, dtype=dtype)
            self.add(int(task), A, B, alpha=float(tensors[f"{prefix}{j}.alpha"][0]),
                     norm=float(tensors[f"{prefix}{j}.norm"][0]))
            self.freeze(j)
            # the magnitude is restored bit-for-bit (a Python float round trip is exact)
            self.alpha[j].requires_grad_(trainable_alpha)


def qkv_rows(name: str, out_features: int, parts: Sequence[int]) -> Rows:
    """Output rows of the q (0), k (1), v (2) parts of a timm ``attn.qkv`` layer; None for other layers."""
    if not name.endswith("attn.qkv"):
        return None
    if out_features % 3:
        raise ConfigError(f"{name} has {out_features} outputs, not 3 x width; cannot find its q, k, v rows")
    d = out_features // 3
    return tuple((p * d, (p + 1) * d) for p in parts)


class BranchMethod(ContinualMethod):
    """Shared machinery: one :class:`LowRankBranches` per adapted layer, saved with the heads.

    Not registered itself; a subclass sets ``parts`` (the q/k/v parts of a fused ``attn.qkv`` its
    branches write to; other layers get every row), ``separate_parts`` (one branch set per part of a
    ``qkv`` layer, keyed ``<layer>.q`` / ``.k`` / ``.v``, each with its own factors, instead of one
    whose ``A`` all parts share) and ``_trainable_alpha`` (whether the branch magnitudes train after
    a load).

    Raises:
        ConfigError: no adapted layer (empty ``method.adapted_modules``), or a ``qkv`` layer whose
            outputs are not 3 x width.
    """

    parts: Sequence[int] = (0, 1, 2)
    separate_parts = False
    _trainable_alpha = False

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        if not model.adapted:
            raise ConfigError(f"method {self.name!r} needs at least one adapted layer (method.adapted_modules)")
        self.branches: dict[str, LowRankBranches] = {}
        self._site_of: dict[str, str] = {}  # branch key -> adapted layer name
        for site in model.adapted_sites():
            qkv = site.name.endswith("attn.qkv")
            groups = [(p,) for p in self.parts] if self.separate_parts and qkv else [tuple(self.parts)]
            for group in groups:
                key = f"{site.name}.{'qkv'[group[0]]}" if len(groups) > 1 else site.name
                self.branches[key] = LowRankBranches(site.layer, qkv_rows(site.name, site.layer.out_features, group))
                self._site_of[key] = site.name
        # registered (for .to / .parameters) under names without dots
        self.branch_modules = nn.ModuleDict({n.replace(".", "_"): b for n, b in self.branches.items()})

    def _weight(self, key: str) -> torch.Tensor:
        """The frozen weight of the layer branch set ``key`` is hooked on."""
        return self.model.adapted[self._site_of[key]].base.weight

    def _current(self, task: int) -> list[tuple[LowRankBranches, int]]:
        return [(b, b.tasks.index(task)) for b in self.branches.values() if task in b.tasks]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        for name, b in self.branches.items():
            out.update(b.state(f"branches.{name}."))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        for name, b in self.branches.items():
            w = self._weight(name)
            b.load(f"branches.{name}.", tensors, w.device, w.dtype, trainable_alpha=self._trainable_alpha)
