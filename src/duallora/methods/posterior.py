"""DualLoRA's task posterior for methods with per-task heads (``method.task_posterior=gate``).

:class:`GatePosterior` gives a head method the task posterior DualLoRA calibrates with
(docs/method.md, "Inference: one forward pass"): after each task, class means and a pooled
within-class covariance of the *gate features* (for each block ``b = 0..gate_layer`` the mean over
tokens of the block's first LayerNorm output, concatenated) taken by the model as it stands at the
end of that task; at test time ``p(j | x) = softmax_j(-min_{c in task j} d_c(x) / tau_id)`` with the
squared Mahalanobis distance per dimension ``d_c``, and the output
``p(y | x) = p(task(y) | x) * softmax over task(y)'s head logits`` (the ``product`` calibration).
The gate features are read in the same forward pass as the logits (forward hooks), so inference
stays one pass. Nothing about training changes: a ``gate`` run trains exactly the model of a
``heads`` run, which is why ``duallora compare`` derives it from the ``heads`` run's checkpoints
(:func:`duallora.derivation.derive_run`).

Methods opt in by inheriting :class:`PosteriorHeads` before their base class and declaring
:data:`POSTERIOR_OPTIONS` (frozen, seq-lora, inflora, sd-lora do).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional

import torch

from duallora.errors import ConfigError
from duallora.methods.base import Inference, TaskContext
from duallora.methods.calibration import calibrate
from duallora.methods.options import GATE_LAYER, RIDGE, SHRINKAGE, TAU_ID, Option
from duallora.methods.statistics import class_sums
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures

if TYPE_CHECKING:
    from duallora.config import MethodConfig

TASK_POSTERIOR = Option("heads", "head methods: task posterior the output is calibrated with: heads (plain "
                                 "concatenated softmax) | gate (DualLoRA's gate statistics, product calibration)",
                        choices=("heads", "gate"))

#: The options a :class:`PosteriorHeads` method declares (merge into its ``options``).
POSTERIOR_OPTIONS = {"task_posterior": TASK_POSTERIOR, "gate_layer": GATE_LAYER, "tau_id": TAU_ID, "ridge": RIDGE,
                     "shrinkage": SHRINKAGE}


def gate_blocks(model: AdaptedViT, gate_layer: int) -> list[int]:
    """Indices ``0..L`` of the blocks whose ``norm1`` outputs make the gate features (``gate_layer``
    may count from the end when negative).

    Raises:
        ConfigError: ``gate_layer`` outside the backbone's blocks.
    """
    depth = len(model.backbone.blocks)
    last = gate_layer if gate_layer >= 0 else depth + gate_layer
    if not 0 <= last < depth:
        raise ConfigError(f"method.gate_layer={gate_layer} is outside the backbone's {depth} blocks")
    return list(range(last + 1))


@contextmanager
def capture_gate_tokens(model: AdaptedViT, blocks: list[int]) -> Iterator[list[torch.Tensor]]:
    """While active, every forward pass appends the mean ``norm1`` tokens (B, D) of each block in
    ``blocks`` to the yielded list, in block order; concatenate them along dim 1 for the gate features."""
    parts: list[torch.Tensor] = []
    bb = model.backbone
    hooks = [bb.blocks[b].norm1.register_forward_hook(lambda m, i, out: parts.append(out.mean(dim=1)))
             for b in blocks]
    try:
        yield parts
    finally:
        for hook in hooks:
            hook.remove()


class GatePosterior:
    """Gate-feature statistics per task and the task posterior they give (module docstring).

    Args:
        model: the method's model (its blocks ``0..gate_layer`` are hooked).
        cfg: reads ``gate_layer``, ``tau_id``, ``ridge``, ``shrinkage``.

    Raises:
        ConfigError: ``gate_layer`` outside the backbone's blocks.
    """

    def __init__(self, model: AdaptedViT, cfg: MethodConfig) -> None:
        self.model = model
        self.blocks = gate_blocks(model, cfg.gate_layer)
        self.signatures = TaskSignatures(model.embed_dim * len(self.blocks), score="mahalanobis", tau=cfg.tau_id,
                                         ridge=cfg.ridge, shrinkage=cfg.shrinkage)

    @torch.no_grad()
    def add_task(self, ctx: TaskContext) -> None:
        """One pass over ``ctx.stats_loader`` with the current model: the task's class means and
        within-class scatter of the gate features join the pooled statistics.

        Raises:
            TrainingError: a class without images.
        """
        self.signatures.add_task(class_sums(ctx, self.features, self.signatures.dim, "posterior statistics"))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Gate features (B, (L+1) D) of images ``x`` (B, C, H, W) through the current model."""
        with capture_gate_tokens(self.model, self.blocks) as parts:
            self.model.features(x)
        return torch.cat(parts, dim=1)


class PosteriorHeads:
    """Mixin for head methods: with ``method.task_posterior=gate`` the output is calibrated with
    :class:`GatePosterior`'s task posterior; with ``heads`` (the default) nothing changes.

    Inherit it first (``class Frozen(PosteriorHeads, ContinualMethod)``). Its ``end_task`` adds the
    statistics after the base method's own ``end_task`` (so with the model that the checkpoint of the
    task holds); :meth:`add_posterior_task` does the same for a checkpoint loaded without them.
    """

    #: ``method.*`` keys that change only the statistics gathered after training and the prediction:
    #: a run differing from a finished one only in them is derived from its checkpoints.
    derived_keys: ClassVar[frozenset[str]] = frozenset(POSTERIOR_OPTIONS)

    @classmethod
    def inactive_options(cls, cfg: Any) -> dict[str, str]:
        """The posterior's own options (``gate_layer``, ``tau_id``, ``ridge``, ``shrinkage``) are read only
        with ``task_posterior=gate``: with ``heads`` a changed value would be silently ignored."""
        inactive = dict(super().inactive_options(cfg))  # type: ignore[misc]
        if cfg.task_posterior != "gate":
            inactive.update({k: "method.task_posterior=gate" for k in POSTERIOR_OPTIONS if k != "task_posterior"})
        return inactive

    @classmethod
    def min_classes_per_task(cls, cfg: Any) -> int:
        """2 with plain concatenated heads (a one-class head's cross-entropy is 0 whatever its logit, so it
        never learns to win against other tasks' logits); 1 with ``task_posterior=gate``, where the task
        posterior picks the task and the one class then has probability 1 within it."""
        return 1 if cfg.task_posterior == "gate" else 2

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)  # type: ignore[call-arg]
        self.posterior: Optional[GatePosterior] = GatePosterior(model, cfg) if cfg.task_posterior == "gate" else None

    def end_task(self, ctx: TaskContext) -> dict:
        """The base method's ``end_task``, then (``gate``) the task's gate statistics."""
        info = super().end_task(ctx)  # type: ignore[misc]
        if self.posterior is not None:
            self.posterior.add_task(ctx)
        return info

    def add_posterior_task(self, ctx: TaskContext) -> None:
        """Add task ``ctx.task``'s gate statistics to a model loaded from a checkpoint that lacks them
        (the statistics of tasks ``< ctx.task`` must be there already: :meth:`posterior_state`).

        Raises:
            ValueError: not a ``task_posterior=gate`` method, or earlier tasks' statistics missing.
        """
        if self.posterior is None:
            raise ValueError("add_posterior_task needs method.task_posterior=gate")
        if self.posterior.signatures.num_tasks != ctx.task:
            raise ValueError(f"gate statistics of {self.posterior.signatures.num_tasks} tasks; task {ctx.task + 1} "
                             f"needs those of the {ctx.task} before it")
        self.posterior.add_task(ctx)

    def posterior_state(self) -> dict[str, torch.Tensor]:
        """The gate statistics (empty without ``gate``)."""
        return {} if self.posterior is None else self.posterior.signatures.state("signatures.posterior.")

    def load_posterior_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`posterior_state` output (no-op without ``gate``)."""
        if self.posterior is not None:
            self.posterior.signatures.load("signatures.posterior.", tensors)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        """``heads``: the base method's inference. ``gate``: one pass giving the concatenated head
        logits (B, C) and the gate features; output ``calibrate(logits, p(j | x), product)``."""
        if self.posterior is None:
            return super().infer(x)  # type: ignore[misc]
        sizes = self.model.head_sizes  # type: ignore[attr-defined]
        with capture_gate_tokens(self.model, self.posterior.blocks) as parts:  # type: ignore[attr-defined]
            logits = self.logits(x)  # type: ignore[attr-defined]
        posterior = self.posterior.signatures.task_posterior(torch.cat(parts, dim=1))
        return Inference(calibrate(logits, posterior, sizes, "product"), posterior)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()  # type: ignore[misc]
        out.update(self.posterior_state())
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the base method's state and, when the checkpoint holds them, the gate statistics."""
        super().load_state_tensors(tensors)  # type: ignore[misc]
        if any(k.startswith("signatures.posterior.") for k in tensors):
            self.load_posterior_state(tensors)


__all__ = ["TASK_POSTERIOR", "POSTERIOR_OPTIONS", "GatePosterior", "PosteriorHeads", "gate_blocks",
           "capture_gate_tokens"]
