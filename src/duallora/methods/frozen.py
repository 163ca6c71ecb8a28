"""``frozen``: the reference without any adaptation (README, "Results on the default benchmark")."""

from __future__ import annotations

from duallora.methods.base import ContinualMethod
from duallora.methods.registry import register_method


@register_method
class Frozen(ContinualMethod):
    """Reference: frozen backbone, per-task linear heads, plain concatenated logits, no adapters.

    Everything is :class:`ContinualMethod`'s default: a head per task trained with cross-entropy
    over its classes, inference = softmax over the concatenated logits. It reads no option.
    """

    name = "frozen"
    uses_adapters = False
