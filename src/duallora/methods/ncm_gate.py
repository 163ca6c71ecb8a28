"""``ncm-gate``: Mahalanobis nearest class mean on the features DualLoRA's shared gate reads, on the
untouched backbone (the training-free bar for DualLoRA's task posterior)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from duallora.methods.base import TaskContext
from duallora.methods.options import GATE_LAYER, RIDGE, SHRINKAGE, TAU_ID, Option
from duallora.methods.posterior import capture_gate_tokens, gate_blocks
from duallora.methods.registry import register_method
from duallora.methods.statistics import StatisticsClassifier
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures

if TYPE_CHECKING:
    from duallora.config import MethodConfig


@register_method
class NCMGate(StatisticsClassifier):
    """Nearest class mean with a pooled-covariance Mahalanobis distance on intermediate features.

    Features of an image (B, (gate_layer + 1) * D): for each block ``b = 0..gate_layer`` the mean over
    tokens of the block's first LayerNorm output (``blocks[b].norm1``, i.e. the input of its attention
    ``qkv``), concatenated. These are exactly the features DualLoRA's shared gate reads
    (``method.gate=shared``, docs/method.md, "Measured decisions") but taken from the untouched
    backbone, so this classifier measures what those statistics give without any adapter. After each
    task its class means and within-class scatter join a covariance pooled over all classes so far
    (:class:`~duallora.signatures.TaskSignatures`, the same code as DualLoRA's gate); prediction is the
    class with the smallest squared Mahalanobis distance per dimension (pooled covariance plus a
    relative ridge ``method.ridge``, shrinkage ``method.shrinkage``), probabilities ``softmax(-d / tau_id)``.
    No training.

    ``method.ncm_final=true`` appends the final feature (``model.features``, (B, D)) to those tokens:
    variant ``ncm-all`` of the comparison specs (``gate_layer=-1``: every block, plus the final
    feature), the best feature set of the untouched backbone on validation data
    (``benchmarks/untouched_features.py``; docs/benchmarks.md).

    Source: the Mahalanobis classifier of Lee et al. (NeurIPS 2018) / FeCAM's common-covariance
    variant (Goswami et al., NeurIPS 2023) on intermediate-layer features; not a published method.

    Raises:
        ConfigError: ``method.gate_layer`` outside the backbone's blocks.
        TrainingError: a class without training images.
    """

    name = "ncm-gate"
    options = {"gate_layer": GATE_LAYER, "tau_id": TAU_ID, "ridge": RIDGE, "shrinkage": SHRINKAGE,
               "ncm_final": Option(False, "ncm-gate: append the final feature to the gate tokens (variant ncm-all)")}

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.blocks = gate_blocks(model, cfg.gate_layer)
        self.with_final = bool(cfg.ncm_final)
        dim = model.embed_dim * (len(self.blocks) + int(self.with_final))
        self.signatures = TaskSignatures(dim, score="mahalanobis", tau=cfg.tau_id,
                                         ridge=cfg.ridge, shrinkage=cfg.shrinkage)

    def gate_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean ``norm1`` tokens of blocks ``0..gate_layer``, concatenated: (B, C, H, W) -> (B, (L+1) D);
        with ``ncm_final`` the final feature appended: (B, (L+2) D).

        Without ``ncm_final`` the forward pass stops after block ``gate_layer``."""
        bb = self.model.backbone
        if self.with_final:
            with capture_gate_tokens(self.model, self.blocks) as parts:
                final = self.model.features(x)
            return torch.cat(parts + [final], dim=1)
        with capture_gate_tokens(self.model, self.blocks) as parts:
            h = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(self.model.normalize(x)))))
            for b in self.blocks:
                h = bb.blocks[b](h)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict:
        """Add the task's class means and within-class scatter of the gate features."""
        self.signatures.add_task(self._class_sums(ctx, self.gate_features, self.signatures.dim))
        return super().end_task(ctx)

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``-d / tau_id`` (B, C) of gate features ``feats`` (B, (L+1) D), ``d`` up to a constant of each
        row (:meth:`~duallora.signatures.TaskSignatures.class_distances` ``relative``; the softmax ignores it)."""
        return -self.signatures.class_distances(feats, relative=True) / self.cfg.tau_id

    @torch.no_grad()
    def infer(self, x: torch.Tensor):
        """Classify by the gate features (not the final ones): one partial forward pass."""
        from duallora.methods.base import Inference, posterior_from_probs

        probs = torch.softmax(self.class_logits(self.gate_features(x)), dim=1)
        return Inference(probs, posterior_from_probs(probs, self.sizes))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out.update(self.signatures.state("signatures.gate."))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.signatures.load("signatures.gate.", tensors)
