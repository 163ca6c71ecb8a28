"""The continual learner: train one task after another, predict and evaluate without task labels.

:class:`ContinualLearner` is the Python API (usable from a notebook)::

    learner = ContinualLearner(cfg, num_tasks=5)          # builds the frozen backbone + method
    learner.learn_task(train_dataset, classes=(3, 7))      # labels are dataset label ids
    pred = learner.predict(images)                         # class, task and confidence per image
    row = learner.evaluate([test_task1, test_task2])       # accuracy per task, task-id accuracy
    learner.save("ckpt.safetensors"); ContinualLearner.load("ckpt.safetensors")

:func:`run_experiment` (``duallora run``) drives a whole class-incremental scenario and writes a run
folder; see :mod:`duallora.runner`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from duallora import config as config_mod
from duallora import distributed
from duallora.backbones import BackboneInfo, create_backbone
from duallora.config import RunConfig
from duallora.errors import CheckpointError, ConfigError, DivergenceError, TrainingError
from duallora.methods import ContinualMethod, TaskContext, build_method
from duallora.model import AdaptedViT

CHECKPOINT_FORMAT = 1

#: Smallest batch the task-size cap (``train.max_batch_fraction``) cuts the batch down to; tasks
#: with fewer images than this train on all of them in one batch.
MIN_CAPPED_BATCH = 8
#: A task trained with fewer optimizer steps than this gets a :class:`TrainingBudgetWarning`.
FEW_STEPS_WARNING = 50
#: The loss "did not fall" when the mean of its last 10% of steps is above this share of the mean of
#: its first 10% (i.e. it fell by less than 10%) ...
LOSS_FALL_RATIO = 0.9
#: ... unless it already is below this share of ln(C_t) (a task learned from the first steps on).
LOSS_SMALL_SHARE = 0.1
#: The loss "ended near chance level" when the mean of its last 10% of steps is at least this share
#: of ln(C_t), the loss of a uniform guess (the task's classes are barely told apart).
LOSS_CHANCE_SHARE = 0.75
#: The loss "diverged" when the final epoch's mean exceeds this multiple of ln(C_t), or the last
#: 10% of steps average more than this multiple of the first 10% and end near chance level.
DIVERGENCE_FACTOR = 10.0


class TrainingBudgetWarning(UserWarning):
    """A task was trained too little or badly: few optimizer steps, a loss that did not fall or one
    that diverged. The same text is in the task's record (``record["warnings"]``, history.json)."""


@dataclass(frozen=True)
class TrainingBudget:
    """The optimisation budget of one task (see :func:`training_budget`).

    Attributes:
        batch_size: images per optimizer step (global over torchrun processes).
        epochs: passes over the task's training images.
        steps_per_epoch: optimizer steps per epoch, ``ceil(num_images / batch_size)``.
        steps: optimizer steps in all, ``epochs * steps_per_epoch``.
        batch_capped: the batch is smaller than ``train.batch_size`` because the task is small.
        epochs_raised: ``epochs`` is above ``train.epochs`` to reach ``train.min_steps``.
    """

    batch_size: int
    epochs: int
    steps_per_epoch: int
    steps: int
    batch_capped: bool
    epochs_raised: bool


def training_budget(num_images: int, batch_size: int, epochs: int, min_steps: int = 0,
                    max_batch_fraction: Optional[float] = None) -> TrainingBudget:
    """The batch size, epochs and optimizer steps of a task of ``num_images`` training images.

    1. Batch cap: ``cap = max(MIN_CAPPED_BATCH, floor(max_batch_fraction * num_images))``. When
       ``cap < batch_size`` the epoch is cut into ``k = ceil(num_images / cap)`` batches of nearly
       equal size, ``ceil(num_images / k)`` images each (<= cap; so a fraction of 0.25 gives at
       least 4 steps per epoch once ``num_images >= 4 * MIN_CAPPED_BATCH``). Otherwise the batch
       is ``batch_size`` (the last batch of an epoch holds the remainder). ``None`` = no cap.
    2. ``steps_per_epoch = ceil(num_images / batch)``.
    3. Minimum steps: ``epochs = max(epochs, ceil(min_steps / steps_per_epoch))``; ``min_steps=0``
       keeps ``epochs``.

    Examples (batch 128, 2 epochs, min_steps 100, fraction 0.25): 12,000 images -> batch 128,
    2 epochs, 188 steps (unchanged); 150 images -> batch 30, 20 epochs of 5 steps, 100 steps.

    Args:
        num_images: the task's training images (>= 1).
        batch_size: ``train.batch_size`` (>= 1).
        epochs: ``train.epochs`` (>= 1), the least number of epochs.
        min_steps: ``train.min_steps`` (>= 0).
        max_batch_fraction: ``train.max_batch_fraction`` in (0, 1], or None.

    Raises:
        ValueError: a value outside those ranges.
    """
    if num_images < 1:
        raise ValueError(f"a task needs at least one training image, got {num_images}")
    if batch_size < 1 or epochs < 1 or min_steps < 0:
        raise ValueError(f"batch_size={batch_size} and epochs={epochs} must be >= 1, min_steps={min_steps} >= 0")
    if max_batch_fraction is not None and not 0.0 < max_batch_fraction <= 1.0:
        raise ValueError(f"max_batch_fraction={max_batch_fraction} must lie in (0, 1] or be None")
    batch, capped = batch_size, False
    if max_batch_fraction is not None:
        cap = max(MIN_CAPPED_BATCH, math.floor(max_batch_fraction * num_images))
        if cap < batch_size:
            k = math.ceil(num_images / cap)
            batch, capped = math.ceil(num_images / k), True
    per_epoch = math.ceil(num_images / batch)
    needed = math.ceil(min_steps / per_epoch) if min_steps > 0 else 0
    eff_epochs = max(epochs, needed)
    return TrainingBudget(batch_size=batch, epochs=eff_epochs, steps_per_epoch=per_epoch,
                          steps=eff_epochs * per_epoch, batch_capped=capped, epochs_raised=eff_epochs > epochs)


def _count(n: int, word: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``, ``"3 batches"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('tch') else 's'}"


def loss_diagnosis(step_losses: Sequence[float], epoch_losses: Sequence[float],
                   num_classes: int) -> tuple[dict[str, float], list[str]]:
    """Did a task's training loss fall? Compares the first and last 10% of its steps.

    Args:
        step_losses: the cross-entropy of every optimizer step, in order (nats).
        epoch_losses: the mean loss of every epoch (nats); the last one is the final loss.
        num_classes: C_t; ln(C_t) is the loss of a uniform prediction.

    Returns:
        ``(trend, problems)``: ``trend`` holds ``first`` and ``last`` (mean loss of the first and
        last ``window_steps = max(1, steps // 10)`` steps), ``window_steps`` and ``change``
        (``last / first - 1``, e.g. -0.6 = fell by 60%); ``problems`` holds at most one sentence
        (without the task's name), the first that applies of: the loss diverged (final epoch above
        ``DIVERGENCE_FACTOR * ln C_t``, or ``last > DIVERGENCE_FACTOR * first`` while ``last >=
        LOSS_CHANCE_SHARE * ln C_t``), did not fall (``last > LOSS_FALL_RATIO * first`` while above
        ``LOSS_SMALL_SHARE * ln C_t``; not checked for a single step), was unstable (an earlier
        epoch above ``DIVERGENCE_FACTOR * ln C_t``), or ended near chance level (``last >=
        LOSS_CHANCE_SHARE * ln C_t``). Empty inputs give ``({}, [])``; a single-class task (its
        loss is always 0) gets the trend and no problem.
    """
    if not step_losses or not epoch_losses:
        return {}, []
    k = max(1, len(step_losses) // 10)
    first = float(np.mean(step_losses[:k]))
    last = float(np.mean(step_losses[-k:]))
    change = last / first - 1.0 if first > 0 else 0.0
    trend = {"first": first, "last": last, "window_steps": k, "change": change}
    if num_classes < 2:
        return trend, []
    chance = math.log(num_classes)
    final = float(epoch_losses[-1])
    where = (f"mean of the first {k} steps {first:.4g}, of the last {k} {last:.4g}" if k > 1
             else f"first step {first:.4g}, last step {last:.4g}")
    near_chance = last >= LOSS_CHANCE_SHARE * chance
    if final > DIVERGENCE_FACTOR * chance or (last > DIVERGENCE_FACTOR * first and near_chance):
        return trend, [(f"the training loss diverged: final epoch loss {final:.4g} (a uniform guess over "
                       f"{num_classes} classes scores ln {num_classes} = {chance:.3f}; {where}); "
                       "lower train.lr / train.head_lr")]
    how = f"fell by only {-100 * change:.1f}%" if change < 0 else f"rose by {100 * change:.1f}%"
    advice = "the task is barely learned: raise train.min_steps or train.epochs, or check train.lr and the data"
    if len(step_losses) > 1 and last > LOSS_FALL_RATIO * first and last > LOSS_SMALL_SHARE * chance:
        end = " and ended near chance level" if near_chance else ""
        return trend, [(f"the training loss did not fall: it {how}{end} ({where}; a uniform guess over "
                       f"{num_classes} classes scores ln {num_classes} = {chance:.3f}); {advice}")]
    peak = int(np.argmax(epoch_losses))
    if epoch_losses[peak] > DIVERGENCE_FACTOR * chance:
        return trend, [(f"the training loss was unstable: epoch {peak + 1} averaged {epoch_losses[peak]:.4g} (over "
                       f"{DIVERGENCE_FACTOR:g} x ln {num_classes} = {DIVERGENCE_FACTOR * chance:.3g}) before it ended "
                       f"at {final:.4g}; lower train.lr / train.head_lr")]
    if near_chance:
        return trend, [(f"the training loss ended near chance level: {where}, {100 * last / chance:.0f}% of "
                       f"ln {num_classes} = {chance:.3f} (a uniform guess over {num_classes} classes); {advice}")]
    return trend, []


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; other names are passed to torch.

    Raises:
        TrainingError: a named device that is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"train.device={name!r} is not a device name (auto, cpu, cuda, cuda:0, mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA GPU is available; use train.device=auto or cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_progress(enabled: bool):
    """A ``progress(iterable, description)`` function: tqdm bars when enabled, else identity.

    Bars are drawn only when stderr is a terminal (tqdm's ``disable=None``), so logs of batch jobs
    and pipes stay free of carriage-return noise."""
    if not enabled:
        return lambda it, desc: it
    from tqdm.auto import tqdm

    return lambda it, desc: tqdm(it, desc=desc, leave=False, dynamic_ncols=True, disable=None)


class _TaskForward(nn.Module):
    """``x -> method.train_logits(x, task)`` as a module, so DDP can wrap the training forward."""

    def __init__(self, method: ContinualMethod, task: int) -> None:
        super().__init__()
        self.method = method
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.train_logits(x, self.task)


class _LocalLabels(Dataset):
    """Wraps a dataset of (image, dataset label id) into (image, task-local label)."""

    def __init__(self, base: Dataset, mapping: dict[int, int]) -> None:
        self.base, self.mapping = base, mapping

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        y = int(y)
        if y not in self.mapping:
            raise TrainingError(f"image {i} has label {y}, which is not one of this task's classes {sorted(self.mapping)}")
        return x, self.mapping[y]


@dataclass
class Prediction:
    """Per-image prediction for B images.

    Attributes:
        labels: (B,) predicted dataset label ids.
        positions: (B,) predicted class-order positions (global output index).
        tasks: (B,) predicted task (0-based).
        confidence: (B,) task confidence ``max_j p(j | x)`` in [0, 1].
        probs: (B, C) class probabilities over all seen classes (columns = positions).
    """

    labels: torch.Tensor
    positions: torch.Tensor
    tasks: torch.Tensor
    confidence: torch.Tensor
    probs: torch.Tensor


class ContinualLearner:
    """A frozen ViT that learns class-incremental tasks with one of the methods in :data:`METHODS`.

    Args:
        cfg: the run config (its ``backbone``, ``method``, ``train`` and ``seed`` sections are used).
        num_tasks: T, for the energy-threshold schedule; None = unknown (eps stays at its start value).
        backbone: an already built ``(model, info)`` pair (tests); None builds ``cfg.backbone``.
        device: overrides ``cfg.train.device``.

    Raises:
        BackboneError, TrainingError: see :func:`~duallora.backbones.create_backbone`, :func:`select_device`.
    """

    def __init__(self, cfg: RunConfig, num_tasks: Optional[int] = None,
                 backbone: Optional[tuple[nn.Module, BackboneInfo]] = None,
                 device: Optional[torch.device] = None) -> None:
        self.cfg = cfg
        self.num_tasks = num_tasks
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = distributed.local_device(device or select_device(cfg.train.device))
        if cfg.train.precision == "fp16" and self.device.type != "cuda":
            raise TrainingError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
        distributed.init(self.device)
        seed_everything(cfg.seed)
        model, info = backbone if backbone is not None else create_backbone(cfg.backbone.name, cfg.backbone.weights)
        self.backbone_info = info
        modules = cfg.method.adapted_modules if cfg.method.name != "frozen" else ()
        self.model = AdaptedViT(model, info.mean, info.std, modules)
        widths = [layer.in_features for _, layer in self.model.adapted_layers()]
        for key in ("rank_orthogonal", "rank_residual"):
            rank = getattr(cfg.method, key)
            if widths and key in config_mod.METHOD_KEYS[cfg.method.name] and rank > min(widths):
                raise ConfigError(f"method.{key}={rank} exceeds the input width of the adapted layers "
                                  f"({min(widths)}); use at most {min(widths)}")
        self.method: ContinualMethod = build_method(self.model, cfg.method, cfg.seed)
        self.model.to(self.device)
        self.task_classes: list[tuple[int, ...]] = []
        self.history: list[dict[str, Any]] = []
        self.progress = make_progress(cfg.train.progress)
        #: called as ``step_callback(task, loss, optimizer)`` after every optimiser step (duallora.tensorboard)
        self.step_callback = None

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        """The precision policy (``train.precision``) for training, statistics passes and inference:
        a ``torch.autocast`` context for bf16/fp16, a no-op for fp32. Statistics are still summed in
        float64 and task posteriors computed in float32."""
        precision = self.cfg.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def seen_labels(self) -> list[int]:
        """Dataset label ids of all seen classes, in position order."""
        return [c for classes in self.task_classes for c in classes]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
        """Training loader (``shuffle``): global batches of the single-process order, each split over
        the torchrun processes. Otherwise (statistics, evaluation): this process's shard, in order."""
        common = dict(num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            sampler = distributed.GlobalBatchSampler(len(dataset), batch_size, g)  # type: ignore[arg-type]
            workers_seed = torch.Generator().manual_seed(seed + 7919)  # keeps the global RNG untouched
            return DataLoader(dataset, batch_sampler=sampler, generator=workers_seed, **common)
        if distributed.world_size() > 1:
            dataset = Subset(dataset, distributed.shard(range(len(dataset))))  # type: ignore[arg-type]
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)

    def _statistics_subset(self, data: Dataset, task: int) -> Dataset:
        """The images of task ``task`` that the statistics passes see (``method.stat_images``).

        Methods that read ``stat_images`` (config.METHOD_KEYS) get a random subset of that many
        images, drawn with a generator seeded by (seed, task) and kept in dataset order, so that a
        resumed or distributed run sees the same subset. Other methods (e.g. fecam, simplecil, whose
        classifier *is* the statistics) and ``stat_images=None`` get every image.
        """
        n = self.cfg.method.stat_images
        if n is None or "stat_images" not in config_mod.METHOD_KEYS[self.cfg.method.name] or n >= len(data):
            return data
        keep = torch.randperm(len(data), generator=self.method.task_generator(task, stream=3))[:n].sort().values.tolist()
        return Subset(data, keep)

    def _optimizer(self, groups: dict[str, list[nn.Parameter]]) -> torch.optim.Optimizer:
        tc = self.cfg.train
        head_lr = tc.head_lr if tc.head_lr is not None else tc.lr
        params = [{"params": groups["adapters"], "lr": tc.lr, "name": "adapters"},
                  {"params": groups["head"], "lr": head_lr, "name": "head"}]
        params = [p for p in params if p["params"]]
        if tc.optimizer == "adam":
            return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
        if tc.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)

    # ------------------------------------------------------------------ learning
    def learn_task(self, train_data: Dataset, classes: Sequence[int]) -> dict[str, Any]:
        """Learn the next task from ``train_data`` (yielding ``(image (C, H, W), dataset label id)``).

        Args:
            train_data: the task's training images.
            classes: the task's dataset label ids; their order fixes the head's output order.

        The training budget adapts to the task's size (:func:`training_budget`): with N training
        images (for ``joint``, the union of the tasks so far), the batch is at most
        ``max(8, floor(train.max_batch_fraction * N))`` images (epochs cut into equal batches when
        this cap is below ``train.batch_size``), and the epochs are raised above ``train.epochs``
        until the task gets at least ``train.min_steps`` optimizer steps. The cosine schedule spans
        the effective steps. At the defaults (batch 128, 2 epochs, min_steps 100, fraction 0.25) a
        task of 12,000 images trains as configured (188 steps); one of 150 images gets 20 epochs of
        5 batches of 30 (100 steps).

        A task trained with fewer than :data:`FEW_STEPS_WARNING` (50) steps gets a warning, and so
        does one whose loss diverged (final epoch above 10 ln C_t, or the last 10% of steps above
        10x the first 10% and near chance), did not fall by 10% from its first to its last 10% of
        steps, spiked (an epoch above 10 ln C_t) or ended near chance level (last 10% of steps at
        >= 0.75 ln C_t; :func:`loss_diagnosis`): in ``record["warnings"]`` and as a
        :class:`TrainingBudgetWarning` (main process only).

        Args:
            train_data: the task's training images.
            classes: the task's dataset label ids; their order fixes the head's output order.

        Returns:
            a record of the task (JSON-serialisable; the run writes it to history.json):
            ``epoch_loss`` (mean cross-entropy per epoch, nats; ``[]`` when nothing was trained),
            ``trained`` (False for methods without trainable parameters: simplecil, fecam),
            ``batch_size``/``epochs``/``steps`` (effective; None/0/0 when not trained),
            ``budget`` (trained only: the :class:`TrainingBudget` fields, the training-set size and
            the configured values), ``loss_trend`` (see :func:`loss_diagnosis`; ``{}`` when not
            trained), ``warnings`` (list of str), ``summary`` (one line for the terminal: ``"loss
            0.3445"``, with the budget when it was adapted and the number of warnings, or ``"no
            training (statistics only)"``), times in seconds, adapter ranks, memory growth.

        Raises:
            TrainingError: the loss became NaN/inf, or a label is not in ``classes``.
            ValueError: a class already seen, an empty class list, or no training images (for a
                method that trains).
        """
        classes = tuple(int(c) for c in classes)
        if not classes:
            raise ValueError("a task needs at least one class")
        overlap = set(classes) & set(self.seen_labels)
        if overlap:
            raise ValueError(f"classes {sorted(overlap)} were already learned in an earlier task")
        t = len(self.task_classes)
        tc = self.cfg.train
        data = _LocalLabels(train_data, {c: i for i, c in enumerate(classes)})
        stats_loader = self._loader(self._statistics_subset(data, t), tc.eval_batch_size, shuffle=False)
        ctx = TaskContext(task=t, num_classes=len(classes), num_tasks=self.num_tasks,
                          stats_loader=stats_loader, device=self.device, progress=self.progress)
        start = time.perf_counter()
        self.model.eval()  # the backbone has no dropout we want; adapters have none
        with self.autocast():
            begin_info = self.method.begin_task(ctx)
        groups = self.method.param_groups(t)
        trainable = [p for g in groups.values() for p in g]
        # a method without trainable parameters (simplecil, fecam) learns in end_task: no epochs, no
        # optimiser; its record says trained=False with an empty epoch_loss
        opt = self._optimizer(groups) if trainable else None
        # a method may train on more than the task's own data (joint, the non-continual upper bound)
        training_set = getattr(self.method, "training_set", None)
        train_set = training_set(data, t) if training_set is not None and trainable else data
        budget: Optional[TrainingBudget] = None
        if trainable:
            if len(train_set) == 0:  # type: ignore[arg-type]
                raise ValueError(f"task {t + 1} has no training images")
            budget = training_budget(len(train_set), tc.batch_size, tc.epochs, tc.min_steps,  # type: ignore[arg-type]
                                     tc.max_batch_fraction)
        epochs = budget.epochs if budget is not None else 0
        batch_size = budget.batch_size if budget is not None else tc.batch_size
        loader = self._loader(train_set, batch_size, shuffle=True, seed=self.cfg.seed * 1000 + t)
        steps = epochs * len(loader)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
                 if tc.scheduler == "cosine" and opt is not None else None)
        forward = _TaskForward(self.method, t)
        if distributed.world_size() > 1 and trainable:
            from torch.nn.parallel import DistributedDataParallel

            # gradients of the task's trainable parameters are averaged over the processes
            forward = DistributedDataParallel(forward, find_unused_parameters=True,
                                              device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if tc.compile and trainable:
            forward = torch.compile(forward)  # type: ignore[assignment]
        scaler = torch.amp.GradScaler(self.device.type) if tc.precision == "fp16" and trainable else None
        losses: list[float] = []
        step_losses: list[float] = []
        train_start = time.perf_counter()
        step = 0
        for epoch in range(epochs):
            assert opt is not None
            total, n = 0.0, 0
            bar = self.progress(loader, f"task {t + 1} epoch {epoch + 1}/{epochs}")
            for x, y in bar:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.autocast():
                    logits = forward(x)
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise DivergenceError(
                        f"the loss became {loss.item()} at task {t + 1}, epoch {epoch + 1}, step {step}; "
                        f"lower train.lr (now {tc.lr}) or check the data"
                    )
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if self.step_callback is not None:  # before the schedule moves: the rate this step used
                    self.step_callback(t, loss.item(), opt)
                if sched is not None:
                    sched.step()
                step += 1
                value = loss.item()
                step_losses.append(value)
                total += value * len(y)
                n += len(y)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{value:.4f}")
            losses.append(total / max(n, 1))
        train_time = time.perf_counter() - train_start
        for p in trainable:
            p.grad = None
        end_start = time.perf_counter()
        with self.autocast():
            end_info = self.method.end_task(ctx)
        end_time = time.perf_counter() - end_start
        self.task_classes.append(classes)
        trend, problems = loss_diagnosis(step_losses, losses, len(classes))
        budget_info: dict[str, Any] = {"trained": bool(trainable), "batch_size": batch_size if trainable else None,
                                       "epochs": epochs, "steps": step}
        if budget is not None:
            budget_info["budget"] = {**asdict(budget), "train_set_images": len(train_set),  # type: ignore[arg-type]
                                     "configured_batch_size": tc.batch_size, "configured_epochs": tc.epochs,
                                     "min_steps": tc.min_steps, "max_batch_fraction": tc.max_batch_fraction}
            if step < FEW_STEPS_WARNING:
                problems.insert(0, (
                    f"only {_count(step, 'optimizer step')} ({_count(epochs, 'epoch')} x "
                    f"{_count(len(loader), 'batch')} of up to {batch_size} images, "
                    f"{len(train_set)} training images); "  # type: ignore[arg-type]
                    f"fewer than {FEW_STEPS_WARNING} rarely train the heads and adapters: raise train.min_steps "
                    f"(now {tc.min_steps}) or train.epochs (now {tc.epochs})"))
        task_warnings = [f"task {t + 1}: {msg}" for msg in problems]
        if not trainable:
            summary = "no training (statistics only)"
        else:
            summary = f"loss {losses[-1]:.4f}"
            if budget is not None and (budget.batch_capped or budget.epochs_raised):
                summary += (f" ({_count(step, 'step')}: {_count(epochs, 'epoch')} x "
                            f"{_count(len(loader), 'batch')} of {batch_size})")
        if task_warnings:
            summary += f" [{len(task_warnings)} warning{'s' if len(task_warnings) > 1 else ''}]"
        record = {
            "task": t + 1,
            "classes": list(classes),
            "train_images": len(data),
            "epoch_loss": losses,
            **budget_info,
            "loss_trend": trend,
            "warnings": task_warnings,
            "summary": summary,
            "train_time_s": train_time,
            "task_time_s": time.perf_counter() - start,
            "end_task_time_s": end_time,
            **begin_info,
            **end_info,
        }
        if distributed.is_main():
            for msg in task_warnings:
                warnings.warn(msg, TrainingBudgetWarning, stacklevel=2)
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Predict class, task and confidence for images (B, C, H, W) or one image (C, H, W).

        One forward pass; every image is predicted on its own (no batch statistics).

        Args:
            images: a tensor or numpy array, uint8 in [0, 255] or float in [0, 1], of the backbone's
                input size (``backbone_info.input_size``, e.g. (1, 28, 28)).

        Raises:
            RuntimeError: before the first task is learned.
            ValueError: wrong shape, channels or size, or floats outside [0, 1] (e.g. 0-255 floats:
                divide by 255 or pass uint8).
        """
        if not self.task_classes:
            raise RuntimeError("learn a task before predicting")
        images = self._check_images(images)
        if self.model.training:
            self.model.eval()
        with self.autocast():
            out = self.method.infer(images.to(self.device))
        positions = out.probs.argmax(dim=1)
        conf, tasks = out.task_posterior.max(dim=1)
        lookup = torch.tensor(self.seen_labels)
        return Prediction(labels=lookup[positions.cpu()], positions=positions.cpu(), tasks=tasks.cpu(),
                          confidence=conf.cpu(), probs=out.probs.cpu())

    def _check_images(self, images: Any) -> torch.Tensor:
        """``images`` as a (B, C, H, W) tensor of the backbone's input size; see :meth:`predict`."""
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(np.asarray(images))
        expected = tuple(self.backbone_info.input_size)
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"predict expects images of shape (B, {', '.join(map(str, expected))}) "
                             f"(the backbone's input size), got {tuple(images.shape)}; resize/convert them first "
                             "(the scenario's transforms do this for datasets)")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise ValueError(f"predict expects uint8 or float images, got {images.dtype}")
            if images.numel() and (images.min() < 0 or images.max() > 1):
                raise ValueError("float images must lie in [0, 1]; divide 0-255 values by 255 or pass uint8")
        return images

    @torch.no_grad()
    def evaluate(self, test_sets: Sequence[Dataset]) -> dict[str, Any]:
        """Accuracy on each task's test set, predicting among all seen classes, task unknown.

        The test sets are mixed into one loader, so batches hold images of several tasks.

        Args:
            test_sets: test data of tasks 0..k (k < tasks learned), each yielding (image, label id).

        Returns:
            ``accuracy`` (list, percent per task), ``correct``/``total`` per task,
            ``task_id_accuracy`` (percent), ``confidence_mean``.
        """
        from torch.utils.data import ConcatDataset

        if len(test_sets) > len(self.task_classes):
            raise ValueError("more test sets than learned tasks")
        label_task = {c: t for t, classes in enumerate(self.task_classes) for c in classes}
        loader = self._loader(ConcatDataset(list(test_sets)), self.cfg.train.eval_batch_size, shuffle=False)
        correct = [0] * len(test_sets)
        total = [0] * len(test_sets)
        task_correct = 0
        conf_sum = 0.0
        for x, y in self.progress(loader, "evaluate"):
            pred = self.predict(x)
            y = y.cpu()
            true_task = torch.tensor([label_task[int(v)] for v in y])
            hit = pred.labels == y
            for t in range(len(test_sets)):
                m = true_task == t
                correct[t] += int(hit[m].sum())
                total[t] += int(m.sum())
            task_correct += int((pred.tasks == true_task).sum())
            conf_sum += float(pred.confidence.sum())
        if distributed.world_size() > 1:
            counts = torch.tensor(correct + total + [task_correct, conf_sum], dtype=torch.float64)
            distributed.all_reduce_sum_(counts)
            k = len(test_sets)
            correct = [int(v) for v in counts[:k]]
            total = [int(v) for v in counts[k:2 * k]]
            task_correct, conf_sum = int(counts[2 * k]), float(counts[2 * k + 1])
        n = sum(total)
        return {
            "accuracy": [100.0 * c / max(s, 1) for c, s in zip(correct, total)],
            "correct": correct,
            "total": total,
            "task_id_accuracy": 100.0 * task_correct / max(n, 1),
            "confidence_mean": conf_sum / max(n, 1),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, extra: Optional[dict[str, Any]] = None) -> Path:
        """Write everything learned so far to a safetensors file (atomically).

        The file holds the adapters (as low-rank factors), heads, memory and statistics; metadata
        holds the config, backbone record and the classes of each task. The frozen backbone is not
        copied: loading rebuilds it from its name/weights file and checks the sha256.
        """
        from safetensors.torch import save

        from duallora.reporting import write_bytes_atomic

        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": config_mod.to_dict(self.cfg),
            "num_tasks": self.num_tasks,
            "backbone": self.backbone_info.to_dict(),
            "task_classes": [list(c) for c in self.task_classes],
            "history": self.history,
            "extra": extra or {},
        }
        tensors = {k: v.contiguous() for k, v in self.method.state_tensors().items()}
        data = save(tensors, metadata={"duallora": json.dumps(meta)})
        return write_bytes_atomic(Path(path), data)

    @classmethod
    def read_checkpoint(cls, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata of a checkpoint file.

        Raises:
            CheckpointError: missing file, not a duallora checkpoint, or an unknown format.
        """
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta_raw = (f.metadata() or {}).get("duallora")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {str(p)!r}: {type(exc).__name__}: {exc}") from exc
        if meta_raw is None:
            raise CheckpointError(f"{str(p)!r} is a safetensors file but not a duallora checkpoint")
        meta = json.loads(meta_raw)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {meta.get('format')} is not supported (need {CHECKPOINT_FORMAT})")
        return tensors, meta

    @classmethod
    def load(cls, path: str | Path, device: Optional[torch.device] = None,
             backbone: Optional[tuple[nn.Module, BackboneInfo]] = None,
             cfg: Optional[RunConfig] = None) -> "ContinualLearner":
        """Rebuild a learner from :meth:`save` output; predictions are identical.

        Args:
            cfg: build the learner with this config instead of the stored one (it must describe the
                same trained state, e.g. another calibration: ``runner.inference_only_change``).

        Raises:
            CheckpointError: unreadable file, or backbone weights whose sha256 differs from the record.
        """
        tensors, meta = cls.read_checkpoint(path)
        cfg = cfg if cfg is not None else config_mod.from_dict(meta["config"])
        learner = cls(cfg, num_tasks=meta["num_tasks"], backbone=backbone, device=device)
        want = meta["backbone"]["sha256"]
        if learner.backbone_info.sha256 != want:
            raise CheckpointError(
                f"backbone weights differ from the ones this checkpoint was trained on "
                f"(sha256 {learner.backbone_info.sha256[:12]}... != {want[:12]}...); pass the same weights file"
            )
        learner.method.load_state_tensors(tensors)
        learner.model.to(learner.device)
        learner.task_classes = [tuple(c) for c in meta["task_classes"]]
        learner.history = list(meta.get("history", []))
        return learner

