"""Continual-learning metrics from the accuracy matrix.

Every metric here derives from two inputs:

* the **accuracy matrix** ``R``, a float array of shape ``(T, T)`` where ``R[t, i]`` is the accuracy
  in percent (0..100) on the test images of task ``i`` after learning task ``t`` (both 0-based).
  Entries with ``i > t`` (tasks not yet learned) are NaN by convention; they are never read.
* the **test-set sizes** ``n_i``: the number of test images of each task.

Field lessons this module encodes: "final accuracy" is task-averaged in some code bases and
sample-weighted in others, so both are reported under distinct names; forgetting must include the
newest old task (``i = T-2``) and take the maximum over every earlier evaluation of task ``i``, not
just the diagonal, and average over the ``T-1`` old tasks (not over ``T``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Optional, Union

import numpy as np

__all__ = ["compute_metrics", "accuracy_row", "build_matrix", "validate_accuracy_matrix"]

MetricValue = Union[float, None, list]


def _check_task_sizes(task_sizes: Sequence[int], num_tasks: int) -> list[int]:
    """Return ``task_sizes`` as a list of Python ints after checking it (length ``T``, positive ints)."""
    if isinstance(task_sizes, (str, bytes)) or not hasattr(task_sizes, "__len__"):
        raise ValueError(f"task_sizes must be a sequence of {num_tasks} positive ints, got {task_sizes!r}")
    sizes = list(task_sizes)
    if len(sizes) != num_tasks:
        raise ValueError(
            f"task_sizes has {len(sizes)} entries but the accuracy matrix has {num_tasks} tasks; "
            "give one test-set size per task"
        )
    out = []
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, Integral):
            raise ValueError(f"task_sizes[{i}] = {n!r} is not an int; give the number of test images per task")
        if n <= 0:
            raise ValueError(f"task_sizes[{i}] = {n} must be positive (a task needs at least one test image)")
        out.append(int(n))
    return out


def validate_accuracy_matrix(R) -> np.ndarray:
    """Check an accuracy matrix and return it as a float64 array.

    Args:
        R: array-like of shape ``(T, T)``, ``T >= 1``; ``R[t, i]`` = accuracy in percent on task ``i``
            after learning task ``t``. Only the diagonal and the lower triangle (``i <= t``) are checked
            and used; the upper triangle may hold NaN (the convention) or anything else.

    Returns:
        ``np.ndarray`` of dtype float64 and shape ``(T, T)`` (a copy).

    Raises:
        ValueError: ``R`` is not a non-empty square 2-D numeric array, or an entry on or below the
            diagonal is NaN/infinite or outside ``[0, 100]``.
    """
    try:
        arr = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"accuracy matrix must be a numeric (T, T) array: {exc}") from exc
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(
            f"accuracy matrix must be square with shape (T, T), T >= 1; got shape {arr.shape}"
        )
    T = arr.shape[0]
    for t in range(T):
        for i in range(t + 1):
            v = arr[t, i]
            if not math.isfinite(v):
                raise ValueError(
                    f"accuracy matrix entry R[{t}, {i}] (task {i} after task {t}) is {v}; entries on and "
                    "below the diagonal must be finite"
                )
            if not 0.0 <= v <= 100.0:
                raise ValueError(
                    f"accuracy matrix entry R[{t}, {i}] = {v} is outside [0, 100]; accuracies are in percent"
                )
    return arr


def compute_metrics(
    R,
    task_sizes: Sequence[int],
    task_id_accuracy: Optional[float] = None,
) -> dict[str, MetricValue]:
    """Compute the continual-learning metrics of one run.

    Notation: ``T`` tasks (0-based ``t, i``), ``R[t, i]`` accuracy in percent on task ``i`` after
    learning task ``t``, ``n_i`` = ``task_sizes[i]`` test images of task ``i``.

    Returned keys (all in percent, full float precision, no rounding):

    * ``final_accuracy`` (sample-weighted, over all test images after the last task)::

          sum_i R[T-1, i] * n_i / sum_i n_i

    * ``final_accuracy_task_mean`` (every task counts the same)::

          (1/T) * sum_i R[T-1, i]

    * ``accuracy_after_task``: list of ``A_t`` for ``t = 0..T-1``, the sample-weighted accuracy over
      the tasks learned so far::

          A_t = sum_{i<=t} R[t, i] * n_i / sum_{i<=t} n_i

    * ``accuracy_after_task_task_mean``: list of ``(1/(t+1)) * sum_{i<=t} R[t, i]`` for ``t = 0..T-1``.
    * ``average_incremental_accuracy``::

          (1/T) * sum_t A_t

    * ``forgetting`` (average forgetting over the ``T-1`` old tasks, the newest old task
      ``i = T-2`` included; the maximum runs over every evaluation of task ``i`` before the last task,
      so a task whose accuracy rose and then fell counts its whole drop; not clamped at 0)::

          (1/(T-1)) * sum_{i=0}^{T-2} ( max_{t=i}^{T-2} R[t, i]  -  R[T-1, i] )

      ``None`` when ``T == 1``.
    * ``backward_transfer``::

          (1/(T-1)) * sum_{i=0}^{T-2} ( R[T-1, i] - R[i, i] )

      ``None`` when ``T == 1``.
    * ``task_id_accuracy``: the argument passed through (``None`` if not given).

    Args:
        R: accuracy matrix, array-like ``(T, T)``; see :func:`validate_accuracy_matrix`.
        task_sizes: ``T`` positive ints, the test-set size of each task.
        task_id_accuracy: optional task-identification accuracy in percent (``[0, 100]``).

    Returns:
        dict with the keys above; scalars are Python floats (or ``None``), lists hold Python floats.

    Raises:
        ValueError: invalid ``R`` (see :func:`validate_accuracy_matrix`), ``task_sizes`` not ``T``
            positive ints, or ``task_id_accuracy`` not a finite number in ``[0, 100]``.
    """
    arr = validate_accuracy_matrix(R)
    T = arr.shape[0]
    sizes = _check_task_sizes(task_sizes, T)
    task_id_accuracy = _check_task_id_accuracy(task_id_accuracy)
    acc_weighted, acc_task_mean = _accuracy_after_each_task(arr, sizes)
    forgetting, backward_transfer = _forgetting_and_backward_transfer(arr)
    return {
        "final_accuracy": acc_weighted[-1],
        "final_accuracy_task_mean": acc_task_mean[-1],
        "average_incremental_accuracy": sum(acc_weighted) / T,
        "forgetting": forgetting,
        "backward_transfer": backward_transfer,
        "task_id_accuracy": task_id_accuracy,
        "accuracy_after_task": acc_weighted,
        "accuracy_after_task_task_mean": acc_task_mean,
    }


def _check_task_id_accuracy(value: Optional[float]) -> Optional[float]:
    """``value`` as a Python float after checking it is a finite percentage; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"task_id_accuracy must be a number in percent or None, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise ValueError(f"task_id_accuracy = {value} must be a finite percentage in [0, 100]")
    return value


def _accuracy_after_each_task(arr: np.ndarray, sizes: list[int]) -> tuple[list[float], list[float]]:
    """Per task ``t``: the sample-weighted and the task-averaged accuracy over tasks ``0..t`` after ``t``."""
    acc_weighted: list[float] = []
    acc_task_mean: list[float] = []
    for t in range(arr.shape[0]):
        row = [float(arr[t, i]) for i in range(t + 1)]
        weights = sizes[: t + 1]
        acc_weighted.append(sum(a * n for a, n in zip(row, weights)) / sum(weights))
        acc_task_mean.append(sum(row) / (t + 1))
    return acc_weighted, acc_task_mean


def _forgetting_and_backward_transfer(arr: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """Average forgetting and backward transfer over the old tasks (see :func:`compute_metrics`);
    ``(None, None)`` for one task."""
    T = arr.shape[0]
    if T == 1:
        return None, None
    last = T - 1
    drops = [max(float(arr[t, i]) for t in range(i, last)) - float(arr[last, i]) for i in range(last)]
    transfers = [float(arr[last, i]) - float(arr[i, i]) for i in range(last)]
    return sum(drops) / last, sum(transfers) / last


def accuracy_row(correct_per_task: Sequence[int], totals: Sequence[int]) -> list[float]:
    """Turn per-task counts of correct predictions into accuracies in percent.

    ``row[i] = 100 * correct_per_task[i] / totals[i]``.

    Args:
        correct_per_task: number of correctly classified test images of each evaluated task.
        totals: number of test images of each evaluated task (same length, positive).

    Returns:
        list of floats in ``[0, 100]``, one per task.

    Raises:
        ValueError: lengths differ, a total is not a positive int, or a count is not an int in
            ``[0, total]``.
    """
    correct = list(correct_per_task)
    tot = list(totals)
    if len(correct) != len(tot):
        raise ValueError(
            f"correct_per_task has {len(correct)} entries but totals has {len(tot)}; give one count per task"
        )
    row = []
    for i, (c, n) in enumerate(zip(correct, tot)):
        if isinstance(n, bool) or not isinstance(n, Integral) or n <= 0:
            raise ValueError(f"totals[{i}] = {n!r} must be a positive int (number of test images)")
        if isinstance(c, bool) or not isinstance(c, Integral) or not 0 <= c <= n:
            raise ValueError(f"correct_per_task[{i}] = {c!r} must be an int in [0, {n}]")
        row.append(100.0 * int(c) / int(n))
    return row


def build_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Stack per-task accuracy rows into the ``(T, T)`` accuracy matrix.

    Row ``t`` (0-based) holds the accuracies on tasks ``0..t`` after learning task ``t``, so it has
    exactly ``t + 1`` entries; the entries ``i > t`` of the result are NaN.

    Args:
        rows: ``T >= 1`` rows of lengths ``1, 2, ..., T``.

    Returns:
        float64 array of shape ``(T, T)``.

    Raises:
        ValueError: no rows, or row ``t`` does not have ``t + 1`` entries.
    """
    rows = [list(r) for r in rows]
    T = len(rows)
    if T == 0:
        raise ValueError("build_matrix needs at least one row (one task)")
    out = np.full((T, T), np.nan, dtype=np.float64)
    for t, row in enumerate(rows):
        if len(row) != t + 1:
            raise ValueError(
                f"row {t} has {len(row)} entries; after task {t} (0-based) there must be exactly {t + 1} "
                "accuracies (tasks 0..t)"
            )
        out[t, : t + 1] = row
    return out
