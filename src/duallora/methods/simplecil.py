"""``simplecil``: cosine prototype classifier on the frozen backbone (Zhou et al., IJCV 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from duallora.methods.base import TaskContext
from duallora.methods.options import TAU_ID
from duallora.methods.registry import register_method
from duallora.methods.statistics import StatisticsClassifier
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig


@register_method
class SimpleCIL(StatisticsClassifier):
    """SimpleCIL: prototype classifier on a frozen pre-trained model (Zhou et al., "Revisiting
    Class-Incremental Learning with Pre-Trained Models: Generalizability and Adaptivity are All You
    Need", IJCV 2024, arXiv 2303.07338).

    After each task, the prototype of each of its classes is the mean of the frozen backbone's final
    features of its training images. Prediction: the class with the highest cosine similarity to the
    image's feature; probabilities ``softmax(cos / tau_id)`` over all seen classes (the temperature
    changes confidences and the task posterior, never the predicted class). No training at all.

    Reproduced: frozen backbone, class-mean prototypes, cosine classifier. Not reproduced: APER
    (the adapted-model variant of the same paper); the paper's ViT-B/16 backbone.
    """

    name = "simplecil"
    options = {"tau_id": TAU_ID}

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.prototypes = torch.zeros(0, model.embed_dim, dtype=torch.float64)

    def end_task(self, ctx: TaskContext) -> dict:
        """Append the prototypes (class means of the final features) of the task's classes."""
        acc = self._class_sums(ctx)
        self.prototypes = torch.cat([self.prototypes, acc["sum"] / acc["n"][:, None]])
        return super().end_task(ctx)

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, C) of ``feats`` (B, D) to every prototype, divided by ``tau_id``."""
        protos = F.normalize(self.prototypes, dim=1).to(device=feats.device, dtype=feats.dtype)
        return F.normalize(feats, dim=1) @ protos.T / self.cfg.tau_id

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out["prototypes"] = self.prototypes.clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.prototypes = tensors["prototypes"].to(torch.float64).clone()
