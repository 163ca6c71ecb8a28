"""The training budget of a task and the diagnosis of its training loss.

:func:`training_budget` adapts the batch size and the epochs to a task's size; :func:`loss_diagnosis`
says whether the loss fell; :func:`describe_training` puts both into a task's record, which
:class:`~duallora.training.ContinualLearner` writes to ``history.json`` (warning with
:class:`TrainingBudgetWarning`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from duallora.errors import DualLoRAWarning

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


class TrainingBudgetWarning(DualLoRAWarning):
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


def counted(n: int, word: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``, ``"3 batches"``: ``n`` and ``word`` in the right number."""
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


def describe_training(task: int, num_classes: int, budget: Optional[TrainingBudget], batch_size: int,
                      batches: int, steps: int, train_set_images: int, epoch_losses: Sequence[float],
                      step_losses: Sequence[float], train_cfg: Any) -> dict[str, Any]:
    """The training part of a task's record (``history.json``; see ``ContinualLearner.learn_task``).

    Args:
        task: 0-based task index.
        num_classes: C_t.
        budget: the task's :class:`TrainingBudget`; None when nothing was trained.
        batch_size: the effective batch size; ``batches``: batches per epoch; ``steps``: steps taken.
        train_set_images: images of the training set the epochs iterated.
        epoch_losses, step_losses: as :func:`loss_diagnosis`.
        train_cfg: the ``train`` config section (``batch_size``, ``epochs``, ``min_steps``,
            ``max_batch_fraction`` as configured).

    Returns:
        ``trained``, ``batch_size`` (None when not trained), ``epochs``, ``steps``, ``budget``
        (trained only: the budget's fields, ``train_set_images`` and the configured values),
        ``loss_trend``, ``warnings`` (``"task K: ..."`` sentences) and ``summary`` (one line), in
        that order.
    """
    trained = budget is not None
    epochs = budget.epochs if budget is not None else 0
    trend, problems = loss_diagnosis(step_losses, epoch_losses, num_classes)
    out: dict[str, Any] = {"trained": trained, "batch_size": batch_size if trained else None, "epochs": epochs,
                           "steps": steps}
    if budget is not None:
        out["budget"] = {**asdict(budget), "train_set_images": train_set_images,
                         "configured_batch_size": train_cfg.batch_size, "configured_epochs": train_cfg.epochs,
                         "min_steps": train_cfg.min_steps, "max_batch_fraction": train_cfg.max_batch_fraction}
        if steps < FEW_STEPS_WARNING:
            problems.insert(0, (
                f"only {counted(steps, 'optimizer step')} ({counted(epochs, 'epoch')} x "
                f"{counted(batches, 'batch')} of up to {batch_size} images, {train_set_images} training images); "
                f"fewer than {FEW_STEPS_WARNING} rarely train the heads and adapters: raise train.min_steps "
                f"(now {train_cfg.min_steps}) or train.epochs (now {train_cfg.epochs})"))
    task_warnings = [f"task {task + 1}: {msg}" for msg in problems]
    if not trained:
        summary = "no training (statistics only)"
    else:
        summary = f"loss {epoch_losses[-1]:.4f}"
        if budget.batch_capped or budget.epochs_raised:
            summary += (f" ({counted(steps, 'step')}: {counted(epochs, 'epoch')} x "
                        f"{counted(batches, 'batch')} of {batch_size})")
    if task_warnings:
        summary += f" [{len(task_warnings)} warning{'s' if len(task_warnings) > 1 else ''}]"
    return {**out, "loss_trend": trend, "warnings": task_warnings, "summary": summary}
