"""``seq-lora``: one plain LoRA fine-tuned task after task (the naive reference DualLoRA improves on)."""

from __future__ import annotations

from torch import nn

from duallora.methods.alignment import ALIGNMENT_OPTIONS, AlignedHeads
from duallora.methods.base import ContinualMethod, TaskContext
from duallora.methods.options import ADAPTED_MODULES, RANK_ORTHOGONAL
from duallora.methods.posterior import POSTERIOR_OPTIONS, PosteriorHeads
from duallora.methods.registry import register_method


@register_method
class SeqLoRA(PosteriorHeads, AlignedHeads, ContinualMethod):
    """Reference: one plain LoRA adapter (rank ``rank_orthogonal``) fine-tuned on each task in turn.

    No memory, no projection, no calibration: it shows what the DualLoRA machinery adds. The LoRA
    factors keep training across tasks; each task's head is trained during its task only.
    ``method.task_posterior=gate`` calibrates the heads with DualLoRA's task posterior
    (:class:`~duallora.methods.posterior.PosteriorHeads`).
    """

    name = "seq-lora"
    options = {"adapted_modules": ADAPTED_MODULES, "rank_orthogonal": RANK_ORTHOGONAL, **POSTERIOR_OPTIONS,
               **ALIGNMENT_OPTIONS}

    def begin_task(self, ctx: TaskContext) -> dict:
        """Attach the one LoRA (rank ``rank_orthogonal``) before the first task, then the task's head."""
        if ctx.task == 0 or self.model.adapted and next(iter(self.model.adapted.values())).lora_A is None:
            gen = self.task_generator(ctx.task, stream=1)
            for _, layer in self.model.adapted_layers():
                if layer.lora_A is None:
                    layer.add_lora(self.cfg.rank_orthogonal, gen)
        return super().begin_task(ctx)

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """The task's head and both LoRA factors of every adapted layer."""
        groups = super().param_groups(task)
        for _, layer in self.model.adapted_layers():
            assert layer.lora_A is not None and layer.lora_B is not None
            groups["adapters"] += [layer.lora_A, layer.lora_B]
        return groups
