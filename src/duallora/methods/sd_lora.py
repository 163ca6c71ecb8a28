"""``sd-lora``: scalable decoupled LoRA (Wu et al., ICLR 2025, arXiv 2501.13198)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from duallora.methods.alignment import ALIGNMENT_OPTIONS, AlignedHeads
from duallora.methods.base import TaskContext
from duallora.methods.branches import BranchMethod
from duallora.methods.options import ADAPTED_MODULES, RANK_ORTHOGONAL
from duallora.methods.posterior import POSTERIOR_OPTIONS, PosteriorHeads
from duallora.methods.registry import register_method
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig


@register_method
class SDLoRA(PosteriorHeads, AlignedHeads, BranchMethod):
    """SD-LoRA: scalable decoupled LoRA (Wu et al., ICLR 2025, arXiv 2501.13198), as in its official code.

    Every adapted ``qkv`` layer carries separate LoRAs on the query and the value rows (other adapted
    layers one LoRA on all rows). While task t is learned, each of them computes::

        delta = sum_{j < t} alpha_j * (B_j A_j) / (||B_j||_F ||A_j||_F)  +  alpha_t * B_t A_t

    * ``A_t`` Kaiming-uniform, ``B_t`` zero, rank ``rank_orthogonal`` (10 in the official configs),
      both trained in task t, then fixed.
    * Magnitudes: **one scalar per task, shared by every layer and by q and v** (``self.magnitudes``).
      At the start of every task all of them, the new task's included, restart at 0.8 and are trained
      with the new LoRA and head (the official code rebuilds ``scaling_factor`` and
      ``wrapped_param_prev`` with 0.8 for every task and passes the same objects to every block).
    * Directions of earlier tasks are normalised by ``||B_j||_F ||A_j||_F`` (the official
      ``torch.norm(B.weight) * torch.norm(A.weight)``), fixed from the start of task j + 1; during its
      own task a LoRA is unnormalised, scaled by its magnitude. The checkpoint of task t therefore holds
      the function as trained; the next task's restart at 0.8 changes it, as in the official code.
    * No gates, no task identity: inference is one pass with plain concatenated logits (or, with
      ``method.task_posterior=gate``, DualLoRA's task posterior: ``sd-lora-posterior``).

    Source: WuYichen-97/SD-Lora-CL, ``backbone/lora.py`` (q/v LoRAs, the normalisation, the shared
    magnitudes) and ``models/sdlora.py``; training there is SGD, momentum 0.9, no weight decay, lr 8e-3
    (CIFAR-100; ImageNet-R 1e-2), a schedule whose milestones are never reached (constant), 20 epochs,
    batch 128 (``exps/SD-LoRA_C100.json``): ``train.*`` keys the comparison specs set for this method.
    Not implemented: the SD-LoRA-RR and SD-LoRA-KD variants.
    """

    name = "sd-lora"
    options = {"adapted_modules": ADAPTED_MODULES, "rank_orthogonal": RANK_ORTHOGONAL, **POSTERIOR_OPTIONS,
               **ALIGNMENT_OPTIONS}
    parts = (0, 2)  # q, v
    separate_parts = True
    #: the official initial (and per-task restart) value of every magnitude
    magnitude_init = 0.8

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.magnitudes = nn.ParameterList()

    def _share_magnitude(self, task: int, value: float, trainable: bool) -> nn.Parameter:
        """One scalar for ``task``, set as the magnitude of that task's branch on every layer."""
        w = next(iter(self.branches.values())).A[0]
        p = nn.Parameter(torch.tensor(float(value), dtype=w.dtype, device=w.device), requires_grad=trainable)
        if task < len(self.magnitudes):
            self.magnitudes[task] = p
        else:
            self.magnitudes.append(p)
        for b in self.branches.values():
            b.alpha[b.tasks.index(task)] = p
        return p

    @torch.no_grad()
    def begin_task(self, ctx: TaskContext) -> dict:
        """Normalise task t-1's directions, restart every magnitude at 0.8 (trained), add task t's LoRAs
        (``A_t`` Kaiming-uniform, ``B_t = 0``, both trained), then the head."""
        t = ctx.task
        if t > 0:
            for b in self.branches.values():
                j = b.tasks.index(t - 1)
                n = float(torch.linalg.matrix_norm(b.B[j].double()) * torch.linalg.matrix_norm(b.A[j].double()))
                if n > 0:  # a zero LoRA (nothing learned) stays a zero direction
                    b.norms[j] = n
        r = self.cfg.rank_orthogonal
        g = self.task_generator(t, 1)
        for key, b in self.branches.items():
            w = self._weight(key)
            bound = 1.0 / math.sqrt(b.in_features)
            A = torch.empty(r, b.in_features, dtype=w.dtype).uniform_(-bound, bound, generator=g)
            b.add(t, A.to(w.device), train_A=True)
        for j in range(t + 1):
            self._share_magnitude(j, self.magnitude_init, trainable=True)
        super().begin_task(ctx)
        return {}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """The head, task t's ``A_t`` and ``B_t`` on every branch set, and the t + 1 shared magnitudes."""
        groups = super().param_groups(task)
        for b, j in self._current(task):
            groups["adapters"] += [b.A[j], b.B[j]]
        groups["adapters"] += list(self.magnitudes)
        return groups

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict:
        """Freeze task t's LoRAs and every magnitude. Returns ``sdlora_magnitudes`` (one per task)."""
        for b, j in self._current(ctx.task):
            b.freeze(j)
        for p in self.magnitudes:
            p.requires_grad_(False)
        info = {"sdlora_magnitudes": [float(p) for p in self.magnitudes]}
        info.update(super().end_task(ctx))
        return info

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the branches and re-share each task's magnitude over the layers (frozen)."""
        super().load_state_tensors(tensors)
        self.magnitudes = nn.ParameterList()
        first = next(iter(self.branches.values()))
        for j, task in enumerate(first.tasks):
            self._share_magnitude(task, float(first.alpha[j]), trainable=False)
