"""``fecam``: Mahalanobis classifier with a pooled covariance on the frozen backbone (Goswami et al.,
NeurIPS 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from duallora.methods.base import TaskContext
from duallora.methods.options import RIDGE, TAU_ID
from duallora.methods.registry import register_method
from duallora.methods.statistics import StatisticsClassifier
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures

if TYPE_CHECKING:
    from duallora.config import MethodConfig


@register_method
class FeCAM(StatisticsClassifier):
    """FeCAM: feature covariance-aware metric (Goswami et al., NeurIPS 2023, arXiv 2309.14062).

    Frozen backbone; after each task, the class means of its final features and their within-class
    scatter (added to a covariance pooled over every class so far; :class:`TaskSignatures`).
    Prediction: the class with the smallest squared Mahalanobis distance (per dimension, with the
    pooled covariance plus a small ridge ``ridge``); probabilities ``softmax(-d / tau_id)``.
    No training.

    Reproduced: frozen backbone, prototypes, Mahalanobis distance with a covariance from the training
    statistics only (no images kept). Not reproduced: FeCAM's per-class covariance matrices with
    covariance shrinkage, correlation normalisation and Tukey's power transform of the features (its
    many-shot setting); we use one pooled covariance (the common-covariance variant) and a relative
    ridge.
    """

    name = "fecam"
    options = {"tau_id": TAU_ID, "ridge": RIDGE}

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.signatures = TaskSignatures(model.embed_dim, score="mahalanobis", tau=cfg.tau_id, ridge=cfg.ridge)

    def end_task(self, ctx: TaskContext) -> dict:
        """Add the task's class means and within-class scatter to the pooled statistics."""
        self.signatures.add_task(self._class_sums(ctx))
        return super().end_task(ctx)

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``-d / tau_id`` (B, C): d the squared Mahalanobis distance per dimension to each class mean."""
        return -self.signatures.class_distances(feats) / self.cfg.tau_id

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out.update(self.signatures.state("signatures.final."))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.signatures.load("signatures.final.", tensors)
