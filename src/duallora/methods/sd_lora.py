"""``sd-lora``: scalable decoupled LoRA (Wu et al., ICLR 2025, arXiv 2501.13198)."""

from __future__ import annotations

import math

import torch
from torch import nn

from duallora.methods.base import TaskContext
from duallora.methods.branches import BranchMethod
from duallora.methods.options import ADAPTED_MODULES, RANK_ORTHOGONAL
from duallora.methods.registry import register_method


@register_method
class SDLoRA(BranchMethod):
    """SD-LoRA: scalable decoupled LoRA (Wu et al., ICLR 2025, arXiv 2501.13198).

    Every adapted layer (default: the attention ``qkv``) carries, while task t is learned::

        y = W h + sum_{j < t} alpha_j * (B_j A_j) / ||B_j A_j||_F  +  B_t A_t

    written to the query and value outputs (timm's fused ``qkv`` rows of q and v; SD-LoRA builds on
    LoRA-ViT, which adapts ``W_q`` and ``W_v``).

    * Directions of earlier tasks, ``(B_j A_j) / ||B_j A_j||_F``, are fixed (``A_j``, ``B_j`` and the
      norm frozen after task j).
    * Magnitudes ``alpha_j`` of every earlier task (one scalar per task per layer) are learned in every
      later task, together with the new task's LoRA (``A_t`` Kaiming-uniform, ``B_t`` zero, both
      trained) and head.
    * At the end of task t its branch becomes a fixed direction with magnitude
      ``alpha_t = ||B_t A_t||_F``, so the function is unchanged by the change of parameterisation.
    * No gates, no task identity: all directions are on for every image; inference is one pass with
      plain concatenated logits.

    Simplifications (documented, deliberate):

    * The paper writes the new task's term as ``alpha_t * B_t A_t / ||B_t A_t||_F`` already while it is
      learned. With ``B_t = 0`` at the start that quotient is 0/0 (the official code divides by
      ``||B|| ||A||`` with a zero ``B``); we learn ``B_t A_t`` unnormalised during its own task, which
      spans the same updates, and split it into magnitude and direction when the task ends. Gradient
      dynamics during task t differ from the paper's.
    * One LoRA per layer writes to both q and v rows (one shared ``A``, one magnitude); the official
      code has separate q and v LoRAs and normalises with ``||B|| ||A||`` instead of ``||B A||_F``.
    * One magnitude per task per layer (the brief's reading); the official code's magnitudes are
      per task.
    * The variants SD-LoRA-RR (rank reduction) and SD-LoRA-KD (knowledge distillation) are not
      implemented; rank = ``rank_orthogonal``; the shared loop's optimiser and epochs are used.
    """

    name = "sd-lora"
    options = {"adapted_modules": ADAPTED_MODULES, "rank_orthogonal": RANK_ORTHOGONAL}
    parts = (0, 2)  # q, v
    _trainable_alpha = True

    def begin_task(self, ctx: TaskContext) -> dict:
        """Task t's LoRA (``A_t`` Kaiming-uniform, ``B_t = 0``, both trained) on every adapted layer, then
        the head."""
        r = self.cfg.rank_orthogonal
        g = self.task_generator(ctx.task, 1)
        for name, b in self.branches.items():
            w = self._weight(name)
            bound = 1.0 / math.sqrt(b.in_features)
            A = torch.empty(r, b.in_features, dtype=w.dtype).uniform_(-bound, bound, generator=g)
            b.add(ctx.task, A.to(w.device), train_A=True)
        super().begin_task(ctx)
        return {}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """The head, task t's ``A_t`` and ``B_t`` and the magnitudes ``alpha_j`` of every earlier task."""
        groups = super().param_groups(task)
        for b in self.branches.values():
            for j, t in enumerate(b.tasks):
                if t == task:
                    groups["adapters"] += [b.A[j], b.B[j]]
                else:
                    groups["adapters"].append(b.alpha[j])
        return groups

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict:
        """Split task t's LoRA into a fixed direction and its magnitude ``||B_t A_t||_F`` (the function
        is unchanged). Returns ``sdlora_magnitude`` per layer."""
        norms: dict[str, float] = {}
        for name, b in self.branches.items():
            j = b.tasks.index(ctx.task)
            b.freeze(j)
            n = float(torch.linalg.matrix_norm(b.B[j].double() @ b.A[j].double()))
            a = b.alpha[j]
            if n > 0:
                b.norms[j] = n
                b.alpha[j] = nn.Parameter(torch.tensor(n, dtype=a.dtype, device=a.device))
            else:  # nothing learned: a zero direction with magnitude 0
                b.alpha[j] = nn.Parameter(torch.zeros((), dtype=a.dtype, device=a.device))
            norms[name] = n
        super().end_task(ctx)
        return {"sdlora_magnitude": norms}
