"""``fecam``: Mahalanobis classifier on the frozen backbone (Goswami et al., NeurIPS 2023): per-class
covariances as published, or one pooled covariance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from duallora.methods.base import TaskContext
from duallora.methods.options import RIDGE, SHRINKAGE, TAU_ID, Option
from duallora.methods.registry import register_method
from duallora.methods.statistics import StatisticsClassifier, require_every_class
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures

if TYPE_CHECKING:
    from duallora.config import MethodConfig


@register_method
class FeCAM(StatisticsClassifier):
    """FeCAM: feature covariance-aware metric (Goswami et al., NeurIPS 2023, arXiv 2309.14062).

    Frozen backbone, no training; after each task, statistics of its classes' final features.

    * ``method.fecam_covariance=per-class`` (default; FeCAM as published for ViTs, official
      ``FeCAM_vit_cifar100.py``): features are L2-normalised; each class keeps its mean and its own
      covariance (``np.cov``, ``n - 1`` degrees of freedom), shrunk by adding the mean of its diagonal
      to the diagonal (``shrink_cov``, alpha1 = 1, alpha2 = 0) and normalised to a correlation matrix
      (``normalize_cov``); the distance to class c is ``(x - mu_c)^T pinv(Sigma_c) (x - mu_c)``.
    * ``pooled``: one covariance pooled over every class so far plus a relative ridge ``ridge``
      (FeCAM's common-covariance variant; :class:`TaskSignatures`), features not normalised.

    Prediction: the class with the smallest distance; probabilities ``softmax(-d / (D tau_id))``
    (``d`` per dimension). Not reproduced: Tukey's power transform (FeCAM applies it to the
    non-negative features of ResNets; its ViT scripts do not, ViT features being signed), the paper's
    ViT-B/16 backbone.

    Raises:
        TrainingError: a class without training images.
    """

    name = "fecam"
    options = {
        "tau_id": TAU_ID,
        "ridge": RIDGE,
        "shrinkage": SHRINKAGE,
        "fecam_covariance": Option("per-class", "fecam: per-class (as published: shrinkage, correlation "
                                                "normalisation, L2-normalised features) | pooled",
                                   choices=("per-class", "pooled")),
    }

    @classmethod
    def min_images_per_class(cls, cfg) -> int:
        """2 with per-class covariances (a covariance of one image is zero and cannot be normalised), else 1."""
        return 2 if cfg.fecam_covariance == "per-class" else 1

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.per_class = cfg.fecam_covariance == "per-class"
        self.signatures = TaskSignatures(model.embed_dim, score="mahalanobis", tau=cfg.tau_id, ridge=cfg.ridge,
                                         shrinkage=cfg.shrinkage)
        d = model.embed_dim
        self.means = torch.zeros(0, d, dtype=torch.float64)  # per-class: (C, D)
        self.covariances = torch.zeros(0, d, d, dtype=torch.float64)  # per-class: shrunk, normalised (C, D, D)
        self._precision: torch.Tensor | None = None

    def _features(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(feats, dim=1) if self.per_class else feats

    @torch.no_grad()
    def _per_class_statistics(self, ctx: TaskContext) -> None:
        """Means and shrunk, correlation-normalised covariances of the task's classes."""
        from duallora import distributed

        d = self.model.embed_dim
        s1 = torch.zeros(ctx.num_classes, d, dtype=torch.float64)
        s2 = torch.zeros(ctx.num_classes, d, d, dtype=torch.float64)
        n = torch.zeros(ctx.num_classes, dtype=torch.float64)
        for x, y in ctx.progress(ctx.stats_loader, f"task {ctx.task + 1} statistics"):
            z = self._features(self.model.features(x.to(ctx.device))).double().cpu()
            y = y.cpu()
            s1.index_add_(0, y, z)
            s2.index_add_(0, y, z[:, :, None] * z[:, None, :])
            n.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        for tensor in (s1, s2, n):
            distributed.all_reduce_sum_(tensor)
        require_every_class(n, ctx.task)
        mu = s1 / n[:, None]
        cov = (s2 - n[:, None, None] * mu[:, :, None] * mu[:, None, :]) / (n - 1).clamp(min=1)[:, None, None]
        eye = torch.eye(d, dtype=torch.float64)
        cov = cov + cov.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye  # shrink_cov (alpha1 = 1)
        sd = cov.diagonal(dim1=1, dim2=2).sqrt()
        cov = cov / (sd[:, :, None] * sd[:, None, :])  # normalize_cov: a correlation matrix
        self.means = torch.cat([self.means, mu])
        self.covariances = torch.cat([self.covariances, cov])
        self._precision = None

    def end_task(self, ctx: TaskContext) -> dict:
        """Add the task's class statistics (per-class covariances, or to the pooled covariance)."""
        if self.per_class:
            self._per_class_statistics(ctx)
        else:
            self.signatures.add_task(self._class_sums(ctx))
        return super().end_task(ctx)

    def class_distances(self, feats: torch.Tensor, relative: bool = False) -> torch.Tensor:
        """Squared Mahalanobis distances per dimension (B, C) of final features ``feats`` (B, D); ``relative``:
        the pooled variant's up to a constant of each row (:meth:`TaskSignatures.class_distances
        <duallora.signatures.TaskSignatures.class_distances>`; the per-class variant ignores it)."""
        if not self.per_class:
            return self.signatures.class_distances(feats, relative)
        if self._precision is None:
            self._precision = torch.linalg.pinv(self.covariances, hermitian=True)
        z = self._features(feats).double()
        diff = z[:, None, :] - self.means.to(z.device)[None]  # (B, C, D)
        d = torch.einsum("bcd,cde,bce->bc", diff, self._precision.to(z.device), diff)
        return (d / z.shape[1]).to(feats.dtype)

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``-d / tau_id`` (B, C): d the squared Mahalanobis distance per dimension to each class mean (pooled
        variant: up to a constant of each row, which the softmax ignores)."""
        return -self.class_distances(feats, relative=True) / self.cfg.tau_id

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        if self.per_class:
            out.update({"fecam.means": self.means.clone(), "fecam.covariances": self.covariances.clone()})
        else:
            out.update(self.signatures.state("signatures.final."))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        if self.per_class:
            self.means = tensors["fecam.means"].double().clone()
            self.covariances = tensors["fecam.covariances"].double().clone()
            self._precision = None
        else:
            self.signatures.load("signatures.final.", tensors)
