"""``joint``: one LoRA and the heads trained on the data of every task seen so far (an upper bound,
NOT continual and NOT rehearsal-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from duallora.errors import ConfigError, TrainingError
from duallora.methods.base import ContinualMethod, TaskContext
from duallora.methods.options import ADAPTED_MODULES, RANK_ORTHOGONAL
from duallora.methods.registry import register_method
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig


class _Shifted(Dataset):
    """A task's dataset with task-local labels shifted to class-order positions."""

    def __init__(self, base: Dataset, offset: int) -> None:
        self.base, self.offset = base, offset

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, int(y) + self.offset


@register_method
class Joint(ContinualMethod):
    """Joint training: the upper bound, NOT a continual and NOT a rehearsal-free method.

    It keeps a reference to the training data of every task it has seen. At task t it trains, from
    scratch (fresh LoRA of rank ``rank_orthogonal`` on the adapted layers, re-initialised heads), one
    LoRA and the heads of tasks 1..t on the union of the tasks' data, with cross-entropy over all seen
    classes (the heads concatenated are one classifier over them). Evaluation after each task then
    shows what the same backbone, adapters and budget (``train.epochs`` over the union) reach with all
    the data at once. Inference: plain concatenated logits.

    It needs the training loop to iterate the union: the loop takes the data of its epochs from the
    :meth:`training_set` hook. A loaded checkpoint predicts, but cannot learn further tasks (the data of
    earlier tasks is not in the checkpoint).
    """

    name = "joint"
    learns_without_old_images = False
    options = {"adapted_modules": ADAPTED_MODULES, "rank_orthogonal": RANK_ORTHOGONAL}

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        if not model.adapted:
            raise ConfigError("method 'joint' needs at least one adapted layer (method.adapted_modules)")
        self.datasets: dict[int, Dataset] = {}
        self.sizes: list[int] = []
        self._union_task: Optional[int] = None

    def begin_task(self, ctx: TaskContext) -> dict:
        """A fresh LoRA on every adapted layer, every earlier head re-initialised and trainable again,
        and the new task's head: training restarts from scratch on the union."""
        g = self.task_generator(ctx.task, 1)
        for _, layer in self.model.adapted_layers():
            layer.add_lora(self.cfg.rank_orthogonal, g)
        bound = 1.0 / self.model.embed_dim ** 0.5
        g = self.task_generator(ctx.task, 2)
        with torch.no_grad():
            for head in self.model.heads:
                head.weight.uniform_(-bound, bound, generator=g)
                head.bias.uniform_(-bound, bound, generator=g)
                head.requires_grad_(True)
        self.sizes = self.model.head_sizes + [ctx.num_classes]
        self._union_task = None
        return super().begin_task(ctx)

    def training_set(self, dataset: Dataset, task: int) -> Dataset:
        """The epoch loop's data for ``task``: every seen task's data, labels = class-order positions.

        Raises:
            TrainingError: the data of an earlier task is not at hand (e.g. after loading a checkpoint).
        """
        self.datasets[task] = dataset
        missing = [j for j in range(task) if j not in self.datasets]
        if missing:
            raise TrainingError(f"joint needs the training data of every earlier task; tasks {missing} are "
                                "missing (a loaded joint checkpoint cannot learn further tasks)")
        offsets = [sum(self.sizes[:j]) for j in range(task + 1)]
        self._union_task = task
        return ConcatDataset([_Shifted(self.datasets[j], offsets[j]) for j in range(task + 1)])

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """The LoRA factors and every head."""
        adapters: list[nn.Parameter] = []
        for _, layer in self.model.adapted_layers():
            assert layer.lora_A is not None and layer.lora_B is not None
            adapters += [layer.lora_A, layer.lora_B]
        return {"adapters": adapters, "head": [p for h in self.model.heads for p in h.parameters()]}

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits (B, C) over every seen class (labels of :meth:`training_set` are class positions).

        Raises:
            TrainingError: the data does not come from :meth:`training_set`.
        """
        if self._union_task != task:
            raise TrainingError("joint trains on the union of all tasks' data: the training loop must take its "
                                "data from Joint.training_set")
        return self.model.head_logits(self.model.features(x))  # all seen classes

    def end_task(self, ctx: TaskContext) -> dict:
        """Freeze every head. Returns ``joint_train_images`` (images of the union trained on)."""
        for head in self.model.heads:
            head.requires_grad_(False)
        self.tasks_learned = ctx.task + 1
        seen = sum(len(d) for j, d in self.datasets.items() if j <= ctx.task)  # type: ignore[arg-type]
        return {"joint_train_images": seen}
