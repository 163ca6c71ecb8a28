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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from duallora import config as config_mod
from duallora import distributed
from duallora.backbones import BackboneInfo, create_backbone
from duallora.budget import (  # noqa: F401  (re-exported: the budget API predates duallora.budget)
    DIVERGENCE_FACTOR,
    FEW_STEPS_WARNING,
    LOSS_CHANCE_SHARE,
    LOSS_FALL_RATIO,
    LOSS_SMALL_SHARE,
    MIN_CAPPED_BATCH,
    TrainingBudget,
    TrainingBudgetWarning,
    describe_training,
    loss_diagnosis,
    training_budget,
)
from duallora.config import RunConfig
from duallora.devices import seed_everything, select_device  # noqa: F401  (select_device re-exported)
from duallora.errors import CheckpointError, ConfigError, DivergenceError, TrainingError
from duallora.methods import ContinualMethod, TaskContext, build_method, get_method
from duallora.model import AdaptedViT

CHECKPOINT_FORMAT = 1


def make_progress(enabled: bool):
    """A ``progress(iterable, description)`` function: tqdm bars when enabled, else identity.

    Bars are drawn only when stderr is a terminal (tqdm's ``disable=None``), so logs of batch jobs
    and pipes stay free of carriage-return noise."""
    if not enabled:
        return lambda it, desc: it
    from tqdm.auto import tqdm

    return lambda it, desc: tqdm(it, desc=desc, leave=False, dynamic_ncols=True, disable=None)


class _TaskForward(nn.Module):
    """One training step's ``(x, y) -> (logits, loss)`` as a module, so DDP can wrap the whole objective.

    The loss is computed inside the wrapped forward so that every parameter it reaches (e.g. L2P's
    keys, through its key-matching term) is found from DDP's output. ``train_logits`` runs under the
    run's ``autocast`` (and ``torch.compile`` with ``compile_logits``); the loss outside it.
    """

    def __init__(self, method: ContinualMethod, task: int, autocast: Callable[[], Any],
                 compile_logits: bool = False) -> None:
        super().__init__()
        self.method = method
        self.task = task
        self.autocast = autocast
        self.logits_fn = torch.compile(self._logits) if compile_logits else self._logits

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.train_logits(x, self.task)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.logits_fn(x)
        return logits, self.method.loss(logits, y, x, self.task)


@dataclass
class _TrainingRun:
    """What the epochs of one task use (built by :meth:`ContinualLearner._prepare_training`)."""

    trainable: list[nn.Parameter]
    train_set: Dataset
    budget: Optional[TrainingBudget]
    epochs: int
    batch_size: int
    loader: DataLoader
    opt: Optional[torch.optim.Optimizer]
    sched: Optional[Any]
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    scaler: Optional[Any]
    plain_loss: bool  # the method's loss is the cross-entropy itself (recorded as is)


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
            raise TrainingError(f"image {i} has label {y}, which is not one of this task's classes "
                                f"{sorted(self.mapping)}")
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
    """A frozen ViT that learns class-incremental tasks with one of the registered methods
    (:data:`duallora.methods.METHODS`).

    Args:
        cfg: the run config (its ``backbone``, ``method``, ``train`` and ``seed`` sections are used).
        num_tasks: T, for the energy-threshold schedule; None = unknown (eps stays at its start value).
        backbone: an already built ``(model, info)`` pair (tests); None builds ``cfg.backbone``.
        device: overrides ``cfg.train.device``.

    Raises:
        BackboneError, TrainingError: see :func:`~duallora.backbones.create_backbone`, :func:`select_device`.
        ConfigError: a rank option above the adapted layers' input width, or what the method's
            constructor refuses (e.g. DualLoRA's ``gate_layer`` outside the backbone).
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
        method_cls = get_method(cfg.method.name)
        modules = cfg.method.adapted_modules if method_cls.uses_adapters else ()
        self.model = AdaptedViT(model, info.mean, info.std, modules)
        widths = [layer.in_features for _, layer in self.model.adapted_layers()]
        for key in [k for k, option in method_cls.options.items() if option.rank]:  # ranks the method reads
            rank = getattr(cfg.method, key)
            if widths and rank > min(widths):
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

        Methods that read ``stat_images`` (their declared options) get a random subset of that many
        images, drawn with a generator seeded by (seed, task) and kept in dataset order, so that a
        resumed or distributed run sees the same subset. Other methods (e.g. fecam, simplecil, whose
        classifier *is* the statistics) and ``stat_images=None`` get every image.
        """
        n = self.cfg.method.stat_images
        if n is None or "stat_images" not in type(self.method).options or n >= len(data):
            return data
        order = torch.randperm(len(data), generator=self.method.task_generator(task, stream=3))
        keep = order[:n].sort().values.tolist()
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

        The steps: the method's ``begin_task`` (statistics passes, new adapters and head), the epochs
        over its ``training_set`` minimising its ``loss`` (only for a method with parameters to
        train), its ``end_task`` (merge, memory and statistics update), then the task's record.

        The batch size and epochs adapt to the size of the training set (for ``joint`` the union of
        the tasks so far; :func:`~duallora.budget.training_budget`); the cosine schedule spans the
        effective steps. Too few steps or a loss that diverged, did not fall, spiked or ended near
        chance (:func:`~duallora.budget.loss_diagnosis`) are warned about: in ``record["warnings"]``
        and as a :class:`TrainingBudgetWarning` (main process only).

        Args:
            train_data: the task's training images.
            classes: the task's dataset label ids; their order fixes the head's output order.

        Returns:
            a record of the task (JSON-serialisable; the run writes it to history.json):
            ``epoch_loss`` (mean cross-entropy per epoch, nats, without a method's extra loss terms;
            ``[]`` when nothing was trained), ``trained`` (False for methods without trainable
            parameters: simplecil, fecam), ``batch_size``/``epochs``/``steps`` (effective; None/0/0
            when not trained), ``budget`` (trained only: the :class:`TrainingBudget` fields, the
            training-set size and the configured values), ``loss_trend`` (see ``loss_diagnosis``;
            ``{}`` when not trained), ``warnings`` (list of str), ``summary`` (one line for the
            terminal: ``"loss 0.3445"``, with the budget when it was adapted and the number of
            warnings, or ``"no training (statistics only)"``), times in seconds, and what the
            method's ``begin_task``/``end_task`` return (adapter ranks, memory growth).

        Raises:
            DivergenceError: the loss became NaN/inf.
            TrainingError: a label is not in ``classes``, or a method that declares ``trains=False``
                returned parameters to train.
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
        data = _LocalLabels(train_data, {c: i for i, c in enumerate(classes)})
        ctx = self._context(data, t, len(classes))
        start = time.perf_counter()
        begin_info = self._begin(ctx)
        run = self._prepare_training(data, t)
        losses, step_losses, steps, train_time = self._train_epochs(run, t)
        end_info, end_time = self._end(ctx, run)
        self.task_classes.append(classes)
        record = self._task_record(t, classes, data, run, losses, step_losses, steps)
        record.update({"train_time_s": train_time, "task_time_s": time.perf_counter() - start,
                       "end_task_time_s": end_time})
        record.update(begin_info)
        record.update(end_info)
        if distributed.is_main():
            for msg in record["warnings"]:
                warnings.warn(msg, TrainingBudgetWarning, stacklevel=2)
        self.history.append(record)
        return record

    def _context(self, data: Dataset, t: int, num_classes: int) -> TaskContext:
        """The hooks' :class:`TaskContext` of task ``t`` whose training images ``data`` carry local labels."""
        stats_loader = self._loader(self._statistics_subset(data, t), self.cfg.train.eval_batch_size, shuffle=False)
        return TaskContext(task=t, num_classes=num_classes, num_tasks=self.num_tasks,
                           stats_loader=stats_loader, device=self.device, progress=self.progress)

    def task_context(self, train_data: Dataset, task: int) -> TaskContext:
        """The :class:`TaskContext` that ``learn_task`` gave the method for the already learned task
        ``task`` (0-based) with training images ``train_data`` (dataset label ids), e.g. to add
        statistics to a loaded checkpoint (:func:`duallora.derivation.derive_run`).

        Raises:
            IndexError: ``task`` was not learned.
        """
        if not 0 <= task < len(self.task_classes):
            raise IndexError(f"task {task + 1} was not learned ({len(self.task_classes)} tasks)")
        classes = self.task_classes[task]
        return self._context(_LocalLabels(train_data, {c: i for i, c in enumerate(classes)}), task, len(classes))

    def _begin(self, ctx: TaskContext) -> dict:
        """The method's ``begin_task`` (under the precision policy), the model in eval mode."""
        self.model.eval()  # the backbone has no dropout we want; adapters have none
        with self.autocast():
            return self.method.begin_task(ctx)

    def _prepare_training(self, data: Dataset, t: int) -> _TrainingRun:
        """Parameters, optimiser, training set, budget, loader, schedule and forward of task ``t``.

        A method without trainable parameters (simplecil, fecam) learns in ``end_task``: no epochs,
        no optimiser; its record says trained=False with an empty epoch_loss.

        Raises:
            TrainingError: a method with ``trains=False`` returned parameters.
            ValueError: a training set without images (for a method that trains).
        """
        tc = self.cfg.train
        groups = self.method.param_groups(t)
        trainable = [p for g in groups.values() for p in g]
        if trainable and not self.method.trains:
            raise TrainingError(f"method {self.method.name!r} declares trains=False but param_groups returned "
                                "parameters; set trains=True or return no parameters")
        opt = self._optimizer(groups) if trainable else None
        # a method may train on more than the task's own data (joint, the non-continual upper bound)
        train_set = self.method.training_set(data, t) if trainable else data
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
        forward: Any = _TaskForward(self.method, t, self.autocast, compile_logits=tc.compile and bool(trainable))
        if distributed.world_size() > 1 and trainable:
            from torch.nn.parallel import DistributedDataParallel

            # gradients of the task's trainable parameters are averaged over the processes
            forward = DistributedDataParallel(forward, find_unused_parameters=True,
                                              device_ids=[self.device.index] if self.device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(self.device.type) if tc.precision == "fp16" and trainable else None
        return _TrainingRun(trainable=trainable, train_set=train_set, budget=budget, epochs=epochs,
                            batch_size=batch_size, loader=loader, opt=opt, sched=sched, forward=forward,
                            scaler=scaler, plain_loss=type(self.method).loss is ContinualMethod.loss)

    def _train_epochs(self, run: _TrainingRun, t: int) -> tuple[list[float], list[float], int, float]:
        """The epochs of task ``t``: ``(mean loss per epoch, loss per step, steps, seconds)``."""
        losses: list[float] = []
        step_losses: list[float] = []
        train_start = time.perf_counter()
        step = 0
        for epoch in range(run.epochs):
            total, n = 0.0, 0
            bar = self.progress(run.loader, f"task {t + 1} epoch {epoch + 1}/{run.epochs}")
            for x, y in bar:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                value = self._train_step(run, x, y, t, epoch, step)
                step += 1
                step_losses.append(value)
                total += value * len(y)
                n += len(y)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{value:.4f}")
            losses.append(total / max(n, 1))
        return losses, step_losses, step, time.perf_counter() - train_start

    def _train_step(self, run: _TrainingRun, x: torch.Tensor, y: torch.Tensor, t: int, epoch: int,
                    step: int) -> float:
        """One optimizer step on the batch ``(x, y)``; returns its cross-entropy (the recorded loss).

        Raises:
            DivergenceError: a NaN or infinite loss.
        """
        opt = run.opt
        assert opt is not None
        logits, loss = run.forward(x, y)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"the loss became {loss.item()} at task {t + 1}, epoch {epoch + 1}, step {step}; "
                f"lower train.lr (now {self.cfg.train.lr}) or check the data"
            )
        # a method's extra loss terms are trained on, but the record keeps the plain cross-entropy
        recorded = loss if run.plain_loss else F.cross_entropy(logits.detach(), y)
        opt.zero_grad(set_to_none=True)
        clip = self.cfg.train.grad_clip
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            if clip is not None:
                run.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(run.trainable, clip)
            run.scaler.step(opt)
            run.scaler.update()
        else:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(run.trainable, clip)
            opt.step()
        value = recorded.item()
        if self.step_callback is not None:  # before the schedule moves: the rate this step used
            self.step_callback(t, value, opt)
        if run.sched is not None:
            run.sched.step()
        return value

    def _end(self, ctx: TaskContext, run: _TrainingRun) -> tuple[dict, float]:
        """Drop the gradients, run the method's ``end_task``; ``(its facts, seconds)``."""
        for p in run.trainable:
            p.grad = None
        end_start = time.perf_counter()
        with self.autocast():
            end_info = self.method.end_task(ctx)
        return end_info, time.perf_counter() - end_start

    def _task_record(self, t: int, classes: tuple[int, ...], data: Dataset, run: _TrainingRun,
                     losses: list[float], step_losses: list[float], steps: int) -> dict[str, Any]:
        """The task's record without its times and method facts (see :meth:`learn_task`)."""
        training = describe_training(t, len(classes), run.budget, run.batch_size, len(run.loader), steps,
                                     len(run.train_set), losses, step_losses, self.cfg.train)  # type: ignore[arg-type]
        return {"task": t + 1, "classes": list(classes), "train_images": len(data),  # type: ignore[arg-type]
                "epoch_loss": losses, **training}

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
                same trained state, e.g. another calibration: ``derivation.inference_only_change``).

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

