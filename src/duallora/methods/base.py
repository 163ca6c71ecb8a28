"""The method interface: :class:`ContinualMethod` and what its hooks receive and return.

A method owns an :class:`~duallora.model.AdaptedViT` and answers the hooks that the shared training
loop (:class:`~duallora.training.ContinualLearner`) calls, in this order for task t:

1. :meth:`ContinualMethod.begin_task` before training (statistics passes, new adapters, head);
2. :meth:`ContinualMethod.param_groups` the parameters to train (none: no epoch runs);
3. :meth:`ContinualMethod.training_set` the data the epochs iterate (default: the task's own);
4. per step :meth:`ContinualMethod.train_logits` task-local logits (B, C_t) and
   :meth:`ContinualMethod.loss` the objective to minimise (default: cross-entropy);
5. :meth:`ContinualMethod.end_task` after training (merge, freeze, memory and statistics update);

and at test time :meth:`ContinualMethod.infer`: one forward pass, no task label, class probabilities
over all seen classes and a task posterior. :meth:`ContinualMethod.state_tensors` /
:meth:`ContinualMethod.load_state_tensors` save and restore what was learned.

A method class also declares, as class attributes, its config ``name``, the ``options`` it reads
(:class:`~duallora.methods.options.Option`), whether it ``trains`` and whether it ``uses_adapters``;
:func:`~duallora.methods.registry.register_method` makes it known to the config and the learner.

Adapted layers: a method that ``uses_adapters`` finds the layers ``method.adapted_modules`` names
(:mod:`duallora.placements`) already wrapped in ``self.model``; it takes them, with their block
indices, from :meth:`~duallora.model.AdaptedViT.adapted_sites` (``(name, block, layer)``) and never
parses a block number out of a name. To attach low-rank branches to them, a new method should use
:class:`~duallora.methods.branches.LowRankBranches` via
:class:`~duallora.methods.branches.BranchMethod` (per-task branches owned and saved by the method);
:class:`~duallora.adapters.AdaptedLinear`'s built-in branches are DualLoRA's adapters and the
single LoRA of ``seq-lora``/``joint`` (see the :class:`~duallora.model.AdaptedViT` docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from duallora.errors import ConfigError
from duallora.methods.options import Option
from duallora.model import AdaptedViT
from duallora.placements import placement_names

if TYPE_CHECKING:  # built by duallora.config from the registered options
    from duallora.config import MethodConfig

Progress = Callable[[Iterable, str], Iterable]


@dataclass
class TaskContext:
    """What a hook knows about the task at hand.

    Attributes:
        task: 0-based index of the task.
        num_classes: C_t, classes of this task.
        num_tasks: T if known (for the energy-threshold schedule), else None.
        stats_loader: iterable of ``(images uint8 (B, C, H, W), local labels (B,))`` over the task's
            training data (the ``method.stat_images`` subset for methods that read it), without
            augmentation.
        device: where the model lives.
        progress: wraps an iterable with a progress bar: ``progress(iterable, description)``.
    """

    task: int
    num_classes: int
    num_tasks: Optional[int]
    stats_loader: Iterable
    device: torch.device
    progress: Progress


@dataclass
class Inference:
    """Output of one forward pass over a batch of B images.

    Attributes:
        probs: (B, C) probability of each seen class, columns in class-order position.
        task_posterior: (B, T) probability of each seen task.
    """

    probs: torch.Tensor
    task_posterior: torch.Tensor


def class_task_index(sizes: list[int], device: torch.device) -> torch.Tensor:
    """The task of every class position: (C,) with ``sizes[j]`` entries ``j`` for each task j."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def posterior_from_probs(probs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Sum class probabilities (B, C) per task -> (B, T); ``sum(sizes) == C``."""
    idx = class_task_index(sizes, probs.device)
    out = torch.zeros(probs.shape[0], len(sizes), device=probs.device, dtype=probs.dtype)
    return out.index_add_(1, idx, probs)


class ContinualMethod(nn.Module):
    """Base class: frozen backbone, one head per task trained on its own classes.

    Subclasses override the hooks they need and declare the class attributes below; see
    :func:`~duallora.methods.registry.register_method` for what the registry checks.

    Attributes:
        name: the ``method.name`` that selects the method.
        options: the ``method.*`` keys the method reads, ``{key: Option}``; any other key must keep
            its default (``config.check_method_keys``).
        option_defaults: this method's own default for some of its options, ``{key: value}``, where it
            differs from the option's declared default (which stays what a stored config without the
            key means, and what the other methods that read the key get). A config that sets the key
            (in its file or an override) keeps its value; ``config.load_config`` applies these only
            to the keys it leaves unset (docs/method.md, "Defaults").
        trains: False for methods without trainable parameters (statistics classifiers): the loop
            runs no epoch and builds no optimiser; :meth:`param_groups` must then be empty.
        uses_adapters: the learner wraps the layers ``method.adapted_modules`` names
            (:class:`~duallora.adapters.AdaptedLinear`; placements, paths or regular expressions,
            :mod:`duallora.placements`) only for methods that use adapters; those must declare the
            ``adapted_modules`` option, the others must not. The layers and their block indices
            are ``model.adapted_sites()``.

    Args:
        model: the wrapped backbone; its adapted layers are those the method needs.
        cfg: the method section of the run config.
        seed: seeds head (and adapter) initialisation.
    """

    name: ClassVar[str] = "base"
    options: ClassVar[dict[str, Option]] = {}
    option_defaults: ClassVar[dict[str, Any]] = {}
    trains: ClassVar[bool] = True
    uses_adapters: ClassVar[bool] = True

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.seed = seed
        self.tasks_learned = 0

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Checks of this method's options together, on a config whose options each passed their own
        checks (``Option.check``); called by ``config.validate`` for the chosen method only.

        The default refuses an empty ``adapted_modules`` for a method that uses adapters.

        Raises:
            ConfigError: naming the key(s) and what is allowed.
        """
        if cls.uses_adapters and not cfg.adapted_modules:
            raise ConfigError(f"method.adapted_modules is empty; name at least one placement "
                              f"({', '.join(placement_names())}), module path (attn.qkv) or regular expression")

    @classmethod
    def inactive_options(cls, cfg: Any) -> dict[str, str]:
        """Options of :attr:`options` that this method does not read under the method config ``cfg``,
        ``{key: the setting that makes it read the key}``: ``config.check_method_keys`` treats them as
        unused (an override that changes one is an error naming that setting; a value from a config file
        is reset to the default). Empty by default.
        """
        return {}

    #: False for a method that needs the images of earlier tasks to learn a new one (``joint``, the
    #: non-continual upper bound): a model directory (``duallora learn``) keeps no image and refuses it.
    learns_without_old_images: ClassVar[bool] = True

    @classmethod
    def min_classes_per_task(cls, cfg: Any) -> int:
        """The fewest classes a task may have for this method with the method config ``cfg`` (``duallora
        learn`` checks it before training); 1 unless a one-class task cannot be learned (e.g. a softmax
        head of one class gets no training signal and its class is never predicted)."""
        return 1

    @classmethod
    def min_images_per_class(cls, cfg: Any) -> int:
        """The fewest training images a class may have for this method with the method config ``cfg``
        (``duallora learn`` checks it before training); 1 unless a method's statistics need more."""
        return 1

    def task_generator(self, task: int, stream: int = 0) -> torch.Generator:
        """A generator seeded by (seed, task, stream): initialisations of task t do not depend on
        what ran before, so a run resumed at task t initialises exactly like an uninterrupted one.

        Streams in use: 0 heads, 1 adapters/LoRA, 2 other initialisations (L2P's pool, joint's heads),
        3 the ``stat_images`` subset (:class:`~duallora.training.ContinualLearner`), 4 classifier
        alignment's samples (:mod:`duallora.methods.alignment`)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + task * 101 + stream)

    # hooks -------------------------------------------------------------------------
    def begin_task(self, ctx: TaskContext) -> dict:
        """Prepare task ``ctx.task``: add its head. Returns facts worth logging (JSON-serialisable)."""
        self.model.add_head(ctx.num_classes, self.task_generator(ctx.task))
        return {}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters for ``task``: ``{"adapters": [...], "head": [...]}`` (the two
        learning rates ``train.lr`` and ``train.head_lr``)."""
        return {"adapters": [], "head": list(self.model.heads[task].parameters())}

    def training_set(self, dataset: Dataset, task: int) -> Dataset:
        """The data the epochs of ``task`` iterate, as ``(image, label)`` pairs whose labels
        :meth:`loss` understands; default ``dataset``, the task's own images with task-local labels.

        Called once per task, after :meth:`param_groups`, only for a method with parameters to train.
        """
        return dataset

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task-local logits (B, C_t) of images ``x`` (B, C, H, W) (under the run's autocast)."""
        return self.model.head_logits(self.model.features(x), task)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, task: int) -> torch.Tensor:
        """The scalar objective of one training step (method.md, "Learning task t", step 4).

        Args:
            logits: :meth:`train_logits` output (B, C_t).
            labels: (B,) labels of :meth:`training_set` (task-local by default).
            images: the step's images (B, C, H, W), for losses that need more than the logits.
            task: 0-based task index.

        Returns:
            a 0-dim tensor; default the cross-entropy over the task's classes. A method that adds
            terms trains on their sum; the loop still records the plain cross-entropy of ``logits``
            (``epoch_loss``, the loss diagnosis).
        """
        return F.cross_entropy(logits, labels)

    def end_task(self, ctx: TaskContext) -> dict:
        """Finish ``ctx.task``: freeze its head. Returns facts worth logging (JSON-serialisable)."""
        for p in self.model.heads[ctx.task].parameters():
            p.requires_grad_(False)
        self.tasks_learned = ctx.task + 1
        return {}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated head logits (B, C) of images ``x`` (B, C, H, W), classes in position order;
        default ``head_logits(features(x))``: one forward pass."""
        return self.model.head_logits(self.model.features(x))

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        """Images ``x`` (B, C, H, W) -> :class:`Inference`, every image on its own (no batch
        statistics). Default: plain concatenated :meth:`logits` -> softmax; task posterior = class
        probabilities summed per task."""
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=1)
        return Inference(probs, posterior_from_probs(probs, self.model.head_sizes))

    # state -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned so far, as CPU tensors (heads, adapters, memory, statistics)."""
        out: dict[str, torch.Tensor] = {}
        for t, head in enumerate(self.model.heads):
            out[f"heads.{t}.weight"] = head.weight.detach().cpu().contiguous()
            out[f"heads.{t}.bias"] = head.bias.detach().cpu().contiguous()
        for name, layer in self.model.adapted_layers():
            out.update(layer.adapter_state(f"adapters.{name}."))
        out["tasks_learned"] = torch.tensor([self.tasks_learned], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` output into a freshly built method (same config and backbone)."""
        t = 0
        while f"heads.{t}.weight" in tensors:
            head = self.model.add_head(tensors[f"heads.{t}.weight"].shape[0])
            head.weight.copy_(tensors[f"heads.{t}.weight"])
            head.bias.copy_(tensors[f"heads.{t}.bias"])
            head.requires_grad_(False)
            t += 1
        for name, layer in self.model.adapted_layers():
            layer.load_adapter_state(f"adapters.{name}.", tensors)
        self.tasks_learned = int(tensors["tasks_learned"][0])
