"""``inflora``: interference-free low-rank adaptation (Liang and Li, CVPR 2024, arXiv 2404.00228)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from duallora import distributed
from duallora.memory import GramAccumulator, SubspaceMemory, energy_threshold
from duallora.methods.alignment import ALIGNMENT_OPTIONS, AlignedHeads
from duallora.methods.base import TaskContext
from duallora.methods.branches import BranchMethod
from duallora.methods.options import (
    ADAPTED_MODULES,
    ENERGY_THRESHOLD_END,
    ENERGY_THRESHOLD_START,
    RANK_ORTHOGONAL,
    STAT_IMAGES,
)
from duallora.methods.posterior import POSTERIOR_OPTIONS, PosteriorHeads
from duallora.methods.registry import register_method
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig


@register_method
class InfLoRA(PosteriorHeads, AlignedHeads, BranchMethod):
    """InfLoRA: interference-free low-rank adaptation (Liang and Li, CVPR 2024, arXiv 2404.00228).

    Every adapted layer (default: the attention ``qkv`` of every block) gets one LoRA branch per task,
    written to the key and value outputs only (the last 2/3 of timm's fused ``qkv`` rows; the query
    rows are untouched, as InfLoRA adapts ``W_k`` and ``W_v``)::

        y = W h + sum_{j <= t} B_j A_j h

    * ``A_t`` (r, d_in), the dimensionality-reduction matrix, is designed before task t and fixed:
      the top-r eigenvectors of the task's input Gram matrix projected away from the memory ``M``
      (:meth:`SubspaceMemory.orthogonal_directions`), so ``A_t M = 0``: training ``B_t`` cannot change
      the outputs for inputs in span ``M`` (the old tasks' inputs, up to the energy left out).
    * ``B_t`` (rows, r), the dimensionality-increasing matrix, starts at zero and is trained on task t
      only, with the task's head (cross-entropy over the task's classes).
    * After task t the memory grows with the GPM energy criterion (threshold ``eps_t`` rising from
      ``energy_threshold_start`` to ``energy_threshold_end``) on the inputs of the updated model.
    * All branches stay on for every image (no gates, no task identity); inference is one pass with
      plain concatenated logits (softmax over all seen classes).

    Reproduced: the fixed, memory-orthogonal down-projection from the input statistics, the trained
    up-projection from zero, k/v-only adaptation, the energy-threshold memory, the branch sum
    (equivalent to merging), per-task classifiers trained on their own classes, rank ``rank_orthogonal``.
    Official settings (liangyanshuo/InfLoRA, ``configs/cifar100_inflora.json``, ``methods/inflora.py``):
    Adam 5e-4 with a cosine schedule, batch 128, no weight decay, 20 epochs (ImageNet-R 50), rank 10,
    input statistics over every training image of the task (``method.stat_images=null``), threshold
    ``(lame - lamb) * t / T + lamb`` with ``lamb`` 0.95 and ``lame`` 1.0 (``energy_threshold_start``
    0.95, ``energy_threshold_end`` 0.95 + 0.05 (T - 1) / T; the comparison specs set these).
    Not reproduced: DualGPM's choice of storing the memory or its complement (we always store ``M``;
    the subspace is the same), the 1/sqrt(3) scale of the first task's ``A``, ViT-B/16 at 224 px.
    The classifier-alignment variant (``InfLoRA_CA1``, ``configs/cifar100_infloraca.json``: SGD lr 1e-3,
    heads 1e-2, weight decay 1e-3, rank 5, then 5 epochs of alignment) is ``method.classifier_alignment=5``
    with those ``train.*`` settings (:mod:`duallora.methods.alignment`; variant ``inflora-ca`` of the
    comparison specs); not reproduced there: its fresh final LayerNorm on CIFAR-100.
    """

    name = "inflora"
    options = {
        "adapted_modules": ADAPTED_MODULES,
        "rank_orthogonal": RANK_ORTHOGONAL,
        "energy_threshold_start": ENERGY_THRESHOLD_START,
        "energy_threshold_end": ENERGY_THRESHOLD_END,
        "stat_images": STAT_IMAGES,
        **POSTERIOR_OPTIONS,
        **ALIGNMENT_OPTIONS,
    }
    parts = (1, 2)  # k, v

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.memories = {n: SubspaceMemory(layer.in_features) for n, layer in model.adapted_layers()}

    @torch.no_grad()
    def _grams(self, ctx: TaskContext, desc: str) -> dict[str, torch.Tensor]:
        """Input Gram matrix (all tokens) of every adapted layer over the task's data, current model."""
        acc = {n: GramAccumulator(layer.in_features, "all") for n, layer in self.model.adapted_layers()}
        for name, layer in self.model.adapted_layers():
            layer.recorder = acc[name].update
        try:
            for x, _ in ctx.progress(ctx.stats_loader, desc):
                self.model.features(x.to(ctx.device))
        finally:
            for _, layer in self.model.adapted_layers():
                layer.recorder = None
        # sums: add up the torchrun processes' shards before any eigendecomposition
        return {n: distributed.all_reduce_sum_(a.gram) for n, a in acc.items()}

    def begin_task(self, ctx: TaskContext) -> dict:
        """Design ``A_t``: top-r eigenvectors of the task's input Gram matrix away from the memory,
        fixed; ``B_t = 0`` trained; then the head. Returns ``inflora_rank`` per layer."""
        grams = self._grams(ctx, f"task {ctx.task + 1} statistics")
        ranks: dict[str, int] = {}
        for name, b in self.branches.items():
            A = self.memories[name].orthogonal_directions(grams[name], self.cfg.rank_orthogonal)
            w = self._weight(name)
            b.add(ctx.task, A.to(device=w.device, dtype=w.dtype))
            ranks[name] = int(A.shape[0])
        super().begin_task(ctx)
        return {"inflora_rank": ranks}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """The head and task t's up-projections ``B_t`` (down-projections stay fixed)."""
        groups = super().param_groups(task)
        groups["adapters"] += [b.B[j] for b, j in self._current(task) if b.A[j].shape[0] > 0]
        return groups

    def end_task(self, ctx: TaskContext) -> dict:
        """Freeze ``B_t`` and the head; grow the memory (GPM energy criterion, threshold eps_t) from the
        inputs of the updated model. Returns ``energy_threshold``, ``memory_added``, ``memory_size``."""
        for b, j in self._current(ctx.task):
            b.freeze(j)
        base_info = super().end_task(ctx)
        grams = self._grams(ctx, f"task {ctx.task + 1} memory")
        eps = energy_threshold(ctx.task, ctx.num_tasks, self.cfg.energy_threshold_start,
                               self.cfg.energy_threshold_end)
        info: dict = {**base_info, "energy_threshold": eps, "memory_added": {}, "memory_size": {}}
        for name, mem in self.memories.items():
            info["memory_added"][name] = mem.grow(grams[name], eps)
            info["memory_size"][name] = mem.size
        return info

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Heads, branches and the memory bases."""
        out = super().state_tensors()
        for name, mem in self.memories.items():
            out[f"memory.{name}.basis"] = mem.state()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        for name, mem in self.memories.items():
            mem.load(tensors[f"memory.{name}.basis"])
