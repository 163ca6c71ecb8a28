"""Classifier alignment from stored class Gaussians (``method.classifier_alignment=N``), no images kept.

After every task ``t`` the method stores each new class's mean and covariance of the final features
(``model.features`` of the task's training images, the model as it stands at the end of the task). From
the second task on, every head (old and new) is then re-trained for ``N`` epochs on features *sampled*
from all stored Gaussians, so the heads of different tasks are calibrated against each other without
replaying an image. This is the classifier-alignment stage of SLCA (Zhang et al., ICCV 2023) as the
InfLoRA repository runs it (liangyanshuo/InfLoRA, ``methods/inflora_ca1.py``, ``_compute_class_mean`` and
``_stage2_compact_classifier``; config ``configs/cifar100_infloraca.json``), reproduced here:

* class covariance ``torch.cov`` of the features plus ``1e-4 I``;
* per epoch, 256 samples per seen class from ``N(s_j mu_c, Sigma_c)`` with the mean scaled by
  ``s_j = 0.9 + 0.1 (j + 1) / (t + 1)`` for a class of task ``j`` (older tasks' means shrink more);
* the samples shuffled and cut into batches of 256; SGD lr 0.01, momentum 0.9, weight decay 5e-4,
  cosine annealing over the ``N`` epochs (the official ``N`` is 5);
* loss: cross-entropy over every seen class of the *decoupled* logits ``z / (n / 0.1)``, ``n`` the mean
  over tasks of the L2 norm of each task's logit slice (``logit_norm = 0.1``).

Sampling uses the method's seeded generator (stream 4 of task ``t``), so a run and its resume align
alike. Storage: ``C D^2`` floats for C classes (D = 192: 147 KB per class).

Methods opt in by inheriting :class:`AlignedHeads` before their base class and declaring
:data:`ALIGNMENT_OPTIONS` (frozen, seq-lora, inflora, sd-lora do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.nn import functional as F

from duallora import distributed
from duallora.methods.base import TaskContext, class_task_index
from duallora.methods.options import Option, non_negative
from duallora.methods.statistics import require_every_class

if TYPE_CHECKING:
    from duallora.config import MethodConfig
    from duallora.model import AdaptedViT

CLASSIFIER_ALIGNMENT = Option(0, "head methods: epochs of classifier alignment on features sampled from stored "
                                 "class Gaussians after every task from the second (InfLoRA-CA: 5); 0 = off",
                              check=non_negative)

#: The options an :class:`AlignedHeads` method declares (merge into its ``options``).
ALIGNMENT_OPTIONS = {"classifier_alignment": CLASSIFIER_ALIGNMENT}

#: The official stage's constants (module docstring).
SAMPLES_PER_CLASS = 256
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
LOGIT_NORM = 0.1
COV_RIDGE = 1e-4


def decoupled_logits(logits: torch.Tensor, sizes: list[int], temperature: float = LOGIT_NORM) -> torch.Tensor:
    """``logits`` (B, C) divided by the mean over tasks of each task slice's L2 norm, then by ``temperature``.

    Args:
        logits: (B, C), columns grouped by task as ``sizes`` (``sum(sizes) == C``).
    """
    norms = torch.stack([s.norm(dim=1) + 1e-7 for s in logits.split(sizes, dim=1)], dim=1)  # (B, T)
    return logits / norms.mean(dim=1, keepdim=True) / temperature


@torch.no_grad()
def class_gaussians(ctx: TaskContext, features: Callable[[torch.Tensor], torch.Tensor],
                    dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C_t, D) and covariance (C_t, D, D) (unbiased, as ``torch.cov``; float64; plus ``1e-4 I``) of the
    features of each class of ``ctx.stats_loader``, from per-class sums (summed over torchrun processes).

    Args:
        features: images (B, C, H, W) -> features (B, ``dim``).

    Raises:
        TrainingError: a class without training images.
    """
    n = torch.zeros(ctx.num_classes, dtype=torch.float64)
    s = torch.zeros(ctx.num_classes, dim, dtype=torch.float64)
    ss = torch.zeros(ctx.num_classes, dim, dim, dtype=torch.float64)
    for x, y in ctx.progress(ctx.stats_loader, f"task {ctx.task + 1} alignment statistics"):
        f, y = features(x.to(ctx.device)).double().cpu(), y.cpu()
        n.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        s.index_add_(0, y, f)
        ss.index_add_(0, y, f[:, :, None] * f[:, None, :])
    for tensor in (n, s, ss):
        distributed.all_reduce_sum_(tensor)
    require_every_class(n, ctx.task)
    means = s / n[:, None]
    scatter = ss - n[:, None, None] * means[:, :, None] * means[:, None, :]
    covs = scatter / (n - 1).clamp(min=1)[:, None, None]
    return means, covs + COV_RIDGE * torch.eye(dim, dtype=torch.float64)


def sample_features(means: torch.Tensor, covs: torch.Tensor, task_of_class: torch.Tensor, task: int,
                    n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples per class from ``N(s_j mu_c, Sigma_c)`` (module docstring), shuffled.

    Args:
        means: (C, D) float64; covs: (C, D, D) float64; task_of_class: (C,) the task of each class.
        task: t, the task just learned (0-based).

    Returns:
        features (C n, D) float64 and their class positions (C n,), in one random order.
    """
    scale = 0.9 + 0.1 * (task_of_class.double() + 1) / (task + 1)  # (C,)
    chol = torch.linalg.cholesky(covs)  # (C, D, D)
    z = torch.randn(means.shape[0], n, means.shape[1], generator=generator, dtype=torch.float64)
    x = (scale[:, None] * means)[:, None, :] + z @ chol.transpose(1, 2)  # (C, n, D)
    labels = torch.arange(means.shape[0]).repeat_interleave(n)
    order = torch.randperm(labels.numel(), generator=generator)
    return x.reshape(-1, means.shape[1])[order], labels[order]


class AlignedHeads:
    """Mixin for head methods: with ``method.classifier_alignment=N > 0`` every head is aligned on
    sampled features after each task from the second (module docstring); with 0 nothing changes.

    Inherit it before the base method (``class InfLoRA(PosteriorHeads, AlignedHeads, BranchMethod)``);
    its ``end_task`` runs after the base method's (heads frozen, model final for the task).
    """

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)  # type: ignore[call-arg]
        self.align_means: Optional[torch.Tensor] = None  # (C, D) float64
        self.align_covs: Optional[torch.Tensor] = None  # (C, D, D) float64

    @property
    def aligns(self) -> bool:
        return self.cfg.classifier_alignment > 0  # type: ignore[attr-defined]

    def end_task(self, ctx: TaskContext) -> dict:
        """The base method's ``end_task``; then the task's class Gaussians and, from the second task, the
        alignment. Adds ``alignment_loss`` (mean loss of the last epoch) to the returned facts."""
        info = super().end_task(ctx)  # type: ignore[misc]
        if not self.aligns:
            return info
        model: AdaptedViT = self.model  # type: ignore[attr-defined]
        means, covs = class_gaussians(ctx, model.features, model.embed_dim)
        self.align_means = means if self.align_means is None else torch.cat([self.align_means, means])
        self.align_covs = covs if self.align_covs is None else torch.cat([self.align_covs, covs])
        if ctx.task > 0:
            info = {**info, "alignment_loss": self.align_heads(ctx.task)}
        return info

    def align_heads(self, task: int) -> float:
        """Re-train every head on sampled features for ``classifier_alignment`` epochs; the heads end
        frozen again. Returns the mean loss of the last epoch."""
        model: AdaptedViT = self.model  # type: ignore[attr-defined]
        assert self.align_means is not None and self.align_covs is not None
        sizes = model.head_sizes
        params = [p for h in model.heads for p in h.parameters()]
        device, dtype = params[0].device, params[0].dtype
        epochs = self.cfg.classifier_alignment  # type: ignore[attr-defined]
        gen = self.task_generator(task, stream=4)  # type: ignore[attr-defined]
        task_of_class = class_task_index(sizes, torch.device("cpu"))
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        last = 0.0
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                for _ in range(epochs):
                    x, y = sample_features(self.align_means, self.align_covs, task_of_class, task,
                                           SAMPLES_PER_CLASS, gen)
                    losses = []
                    for xb, yb in zip(x.split(SAMPLES_PER_CLASS), y.split(SAMPLES_PER_CLASS)):
                        logits = model.head_logits(xb.to(device=device, dtype=dtype))
                        loss = F.cross_entropy(decoupled_logits(logits, sizes), yb.to(device))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        losses.append(loss.item())
                    sched.step()
                    last = sum(losses) / len(losses)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return last

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()  # type: ignore[misc]
        if self.align_means is not None and self.align_covs is not None:
            out["alignment.means"] = self.align_means.contiguous()
            out["alignment.covs"] = self.align_covs.contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)  # type: ignore[misc]
        if "alignment.means" in tensors:
            self.align_means = tensors["alignment.means"].double()
            self.align_covs = tensors["alignment.covs"].double()


__all__ = ["ALIGNMENT_OPTIONS", "AlignedHeads", "CLASSIFIER_ALIGNMENT", "class_gaussians", "decoupled_logits",
           "sample_features"]
