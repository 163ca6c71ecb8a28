"""``frozen``: the reference without any adaptation (README, "Results on the default benchmark")."""

from __future__ import annotations

from duallora.methods.alignment import ALIGNMENT_OPTIONS, AlignedHeads
from duallora.methods.base import ContinualMethod
from duallora.methods.posterior import POSTERIOR_OPTIONS, PosteriorHeads
from duallora.methods.registry import register_method


@register_method
class Frozen(PosteriorHeads, AlignedHeads, ContinualMethod):
    """Reference: frozen backbone, per-task linear heads, plain concatenated logits, no adapters.

    Everything is :class:`ContinualMethod`'s default: a head per task trained with cross-entropy
    over its classes, inference = softmax over the concatenated logits. With
    ``method.task_posterior=gate`` (variant ``frozen-posterior``) the output is calibrated with
    DualLoRA's task posterior instead (:class:`~duallora.methods.posterior.PosteriorHeads`).
    """

    name = "frozen"
    uses_adapters = False
    options = {**POSTERIOR_OPTIONS, **ALIGNMENT_OPTIONS}
