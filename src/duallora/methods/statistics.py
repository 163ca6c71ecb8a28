"""Training-free classifiers on the frozen backbone's final features (SimpleCIL, FeCAM): their base."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from duallora import distributed
from duallora.errors import TrainingError
from duallora.methods.base import ContinualMethod, Inference, TaskContext, posterior_from_probs
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures

if TYPE_CHECKING:
    from duallora.config import MethodConfig


def require_every_class(counts: torch.Tensor, task: int) -> None:
    """Raise :class:`TrainingError` when a class of task ``task`` (0-based) has no training image.

    Args:
        counts: (C_t,) images per class of the task (summed over the torchrun processes).
    """
    if (counts <= 0).any():
        raise TrainingError(f"task {task + 1}: every class needs at least one training image")


@torch.no_grad()
def class_sums(ctx: TaskContext, features: Callable[[torch.Tensor], torch.Tensor], dim: int,
               desc: str = "statistics") -> dict[str, torch.Tensor]:
    """Per-class sums (``TaskSignatures.new_accumulator``) of the features of ``ctx.stats_loader``'s
    images, summed over the torchrun processes.

    Args:
        ctx: the task (its statistics loader, device, progress).
        features: images (B, C, H, W) -> features (B, ``dim``).
        desc: the progress bar's label after ``task N``.

    Raises:
        TrainingError: a class without training images.
    """
    acc = TaskSignatures.new_accumulator(ctx.num_classes, dim)
    for x, y in ctx.progress(ctx.stats_loader, f"task {ctx.task + 1} {desc}"):
        TaskSignatures.accumulate(acc, features(x.to(ctx.device)), y)
    for tensor in acc.values():  # sums over the torchrun processes' shards
        distributed.all_reduce_sum_(tensor)
    require_every_class(acc["n"], ctx.task)
    return acc


class StatisticsClassifier(ContinualMethod):
    """Frozen backbone, no head, nothing trained: ``end_task`` gathers class statistics of the final
    features, ``infer`` classifies with them. ``param_groups`` is empty (``trains = False``), so the
    shared loop runs no epoch for these methods.

    Not registered itself; a subclass implements :meth:`class_logits` and keeps its statistics
    (with :meth:`_class_sums`) in ``end_task``.
    """

    trains = False
    uses_adapters = False

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.sizes: list[int] = []

    def begin_task(self, ctx: TaskContext) -> dict:
        return {}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        return {"adapters": [], "head": []}

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        raise TrainingError(f"{self.name} trains nothing; the training loop must skip methods without parameters")

    def _class_sums(self, ctx: TaskContext, features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    dim: Optional[int] = None) -> dict[str, torch.Tensor]:
        """:func:`class_sums` of the task's features; default the final features (``model.features``,
        ``dim`` = embed_dim)."""
        return class_sums(ctx, features or self.model.features, dim or self.model.embed_dim)

    def end_task(self, ctx: TaskContext) -> dict:
        """Record the task's class count (subclasses first add its statistics)."""
        self.sizes.append(ctx.num_classes)
        self.tasks_learned = ctx.task + 1
        return {}

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) over every seen class of final features ``feats`` (B, D)."""
        raise NotImplementedError

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        """``softmax(class_logits(features))``; task posterior = class probabilities summed per task."""
        probs = torch.softmax(self.class_logits(self.model.features(x)), dim=1)
        return Inference(probs, posterior_from_probs(probs, self.sizes))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out["classes_per_task"] = torch.tensor(self.sizes, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.sizes = [int(v) for v in tensors["classes_per_task"].tolist()]
