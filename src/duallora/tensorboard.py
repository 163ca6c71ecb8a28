"""TensorBoard logs of a run (``train.tensorboard=true``; ``pip install duallora[tensorboard]``).

:class:`RunLogger` writes into the run folder, ``<run>/tensorboard/``, as two TensorBoard runs::

    tensorboard --logdir <run>/tensorboard

* ``train``: per training step, x = training steps counted over all tasks: ``train/loss`` (the
  step's cross-entropy) and ``train/lr`` (learning rate of the step, one tag per parameter group:
  ``train/lr/adapters``, ``train/lr/head``);
* ``eval``: after each task, x = the task (from 1): ``eval/accuracy`` (sample-weighted, on the test
  images of every task seen so far), ``eval/task_id_accuracy``, ``eval/confidence_mean``,
  ``eval/accuracy_task_I`` (``R[t][I]``, one curve per task), ``train/epoch_loss`` (last epoch's mean
  loss), ``train/task_time_s``, ``memory/dims_mean`` (methods with a subspace memory), and the
  accuracy matrix so far as a Markdown table (text ``accuracy_matrix``) and a heatmap (image
  ``accuracy_matrix``).

A resumed run continues both: the step count reached after each finished task is kept in
``tensorboard/state.json``, and the events of the interrupted task are purged (TensorBoard's
``purge_step``), so the logs hold the steps and values of an uninterrupted run (times aside). Under
torchrun only rank 0 logs (its own shard's loss).

The hook into a run is three calls::

    logger = RunLogger.from_config(cfg, run_folder, start_task=k)   # a no-op logger when switched off
    learner.step_callback = logger.step                                # (task, loss, optimizer) per step
    logger.task_end(task, evaluation, accuracy_rows, task_id_rows, record); ...; logger.close()
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from duallora.errors import ConfigError

#: Sub-folder of the run folder that holds the logs.
LOG_DIR = "tensorboard"
#: Config switch (``train.tensorboard``).
CONFIG_KEY = "tensorboard"
INSTALL_HINT = "pip install duallora[tensorboard]"


def enabled(cfg: Any) -> bool:
    """Whether ``cfg`` switches TensorBoard logging on (``train.tensorboard``; False when the key is absent)."""
    return bool(getattr(cfg.train, CONFIG_KEY, False))


def available() -> bool:
    """Whether the ``tensorboard`` package (needed by ``torch.utils.tensorboard``) can be imported."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def require(cfg: Any) -> None:
    """Check, before anything is written, that logging can work when ``cfg`` switches it on.

    Raises:
        ConfigError: ``train.tensorboard=true`` but the ``tensorboard`` package is not installed.
    """
    if enabled(cfg) and not available():
        raise ConfigError(f"train.tensorboard=true needs the tensorboard package: {INSTALL_HINT} "
                          "(or pip install tensorboard), or set train.tensorboard=false")


def _group_name(i: int, group: Mapping[str, Any], count: int) -> str:
    name = group.get("name")
    if name:
        return str(name)
    return "lr" if count == 1 else f"group{i}"


class RunLogger:
    """TensorBoard logs of one run; every method is a no-op when logging is off (``writer`` None).

    Build it with :meth:`from_config`; construct it directly (``RunLogger(folder)``) to log
    unconditionally, e.g. in tests.

    Args:
        run_dir: the run folder (or its staging ``.partial`` folder); logs go to ``run_dir/tensorboard``.
            None: a logger that logs nothing.
        start_task: tasks already finished (a resumed run); their logs are kept, later events purged.

    Raises:
        ConfigError: the tensorboard package is not installed.
    """

    def __init__(self, run_dir: Optional[str | Path], start_task: int = 0) -> None:
        self.log_dir: Optional[Path] = Path(run_dir) / LOG_DIR if run_dir is not None else None
        self.global_step = 0
        self._task_start_steps: list[int] = [0]  # the step count at the start of task k (k = index)
        self._train = self._eval = None
        if self.log_dir is None:
            return
        if not available():
            raise ConfigError(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}")
        from torch.utils.tensorboard import SummaryWriter

        # the step count at the start of every task up to start_task; a resumed run continues from it
        # (a session that did not log leaves gaps: the count then restarts at the last one known)
        steps = (self._read_state() or [0])[: start_task + 1]
        steps += [steps[-1]] * (start_task + 1 - len(steps))
        self._task_start_steps = steps
        self.global_step = steps[-1]
        purge_train = purge_eval = None
        if self.log_dir.exists():
            # events of the interrupted task (and anything after it) are hidden from TensorBoard
            purge_train, purge_eval = self.global_step, start_task + 1
        self._train = SummaryWriter(str(self.log_dir / "train"), purge_step=purge_train)
        self._eval = SummaryWriter(str(self.log_dir / "eval"), purge_step=purge_eval)

    @classmethod
    def from_config(cls, cfg: Any, run_dir: str | Path, *, start_task: int = 0) -> "RunLogger":
        """The logger a run of ``cfg`` uses: real when ``train.tensorboard`` is true and this is the
        main process (rank 0 under torchrun), else one that logs nothing.

        Raises:
            ConfigError: the switch is on but the tensorboard package is not installed.
        """
        from duallora import distributed

        if not enabled(cfg):
            return cls(None)
        require(cfg)
        if not distributed.is_main():
            return cls(None)
        return cls(run_dir, start_task=start_task)

    @property
    def enabled(self) -> bool:
        """Whether this logger writes anything."""
        return self._train is not None

    # ------------------------------------------------------------------ state (resume)
    def _state_path(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "state.json"

    def _read_state(self) -> Optional[list[int]]:
        try:
            data = json.loads(self._state_path().read_text())
            steps = [int(s) for s in data["task_start_steps"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return steps or None

    def _write_state(self) -> None:
        from duallora.reporting import write_json_atomic

        write_json_atomic(self._state_path(), {"task_start_steps": self._task_start_steps})

    # ------------------------------------------------------------------ logging
    def step(self, task: int, loss: float, optimizer: Any = None) -> None:
        """Log one training step of ``task`` (0-based): its loss and learning rate(s).

        Args:
            task: the task being learned (0-based, as in the learner).
            loss: the step's loss.
            optimizer: a torch optimizer (each parameter group's ``lr`` is logged, named by the
                group's ``name`` key when it has one, e.g. ``train/lr/adapters``), a float (one
                learning rate) or a mapping ``{name: lr}``; None logs no learning rate.
        """
        if self._train is None:
            return
        s = self.global_step
        w = self._train
        w.add_scalar("train/loss", float(loss), s)
        if isinstance(optimizer, (int, float)):
            w.add_scalar("train/lr", float(optimizer), s)
        elif isinstance(optimizer, Mapping):
            for name, lr in optimizer.items():
                w.add_scalar(f"train/lr/{name}", float(lr), s)
        elif optimizer is not None:
            groups = list(getattr(optimizer, "param_groups", []))
            for i, g in enumerate(groups):
                name = _group_name(i, g, len(groups))
                w.add_scalar("train/lr" if name == "lr" else f"train/lr/{name}", float(g["lr"]), s)
        self.global_step += 1

    def task_end(self, task: int, evaluation: Mapping[str, Any], accuracy_rows: Sequence[Sequence[float]],
                 task_id_rows: Optional[Sequence[float]] = None, record: Optional[Mapping[str, Any]] = None) -> None:
        """Log the evaluation after ``task`` (0-based) and flush both logs to disk.

        Args:
            task: the task just learned (0-based); logged at x = ``task + 1``.
            evaluation: :meth:`ContinualLearner.evaluate`'s result after it (``correct``, ``total``,
                ``task_id_accuracy``, optionally ``confidence_mean``).
            accuracy_rows: the accuracy matrix so far, row t = accuracy (%) per task after task t.
            task_id_rows: task-identity accuracy after each task (unused beyond the current value,
                which ``evaluation`` holds; accepted so the call mirrors the runner's lists).
            record: the learner's record of the task (``epoch_loss``, ``task_time_s``, ``memory_size``).
        """
        if self._eval is None:
            return
        x = task + 1
        w = self._eval
        total = sum(int(n) for n in evaluation.get("total", []))
        if total:
            w.add_scalar("eval/accuracy", 100.0 * sum(int(c) for c in evaluation["correct"]) / total, x)
        w.add_scalar("eval/task_id_accuracy", float(evaluation["task_id_accuracy"]), x)
        if "confidence_mean" in evaluation:
            w.add_scalar("eval/confidence_mean", float(evaluation["confidence_mean"]), x)
        last = list(accuracy_rows[-1]) if accuracy_rows else list(evaluation.get("accuracy", []))
        for i, acc in enumerate(last):
            w.add_scalar(f"eval/accuracy_task_{i + 1}", float(acc), x)
        if record is not None:
            losses = [v for v in record.get("epoch_loss", []) if v is not None and math.isfinite(v)]
            if losses:
                w.add_scalar("train/epoch_loss", float(losses[-1]), x)
            if record.get("task_time_s") is not None:
                w.add_scalar("train/task_time_s", float(record["task_time_s"]), x)
            mem = record.get("memory_size")
            if isinstance(mem, Mapping) and mem:
                w.add_scalar("memory/dims_mean", sum(mem.values()) / len(mem), x)
        if accuracy_rows:
            w.add_text("accuracy_matrix", matrix_markdown(accuracy_rows), x)
            w.add_image("accuracy_matrix", matrix_image(accuracy_rows), x, dataformats="HWC")
        w.flush()
        assert self._train is not None
        self._train.flush()
        del self._task_start_steps[x:]
        self._task_start_steps.append(self.global_step)
        self._write_state()

    def close(self) -> None:
        """Flush and close the logs (safe to call twice)."""
        for w in (self._train, self._eval):
            if w is not None:
                w.close()
        self._train = self._eval = None


def matrix_markdown(rows: Sequence[Sequence[Optional[float]]]) -> str:
    """The accuracy matrix as a Markdown table: a row per task learned, a column per task tested."""
    n = max(len(r) for r in rows)
    lines = ["| after task | " + " | ".join(f"task {i + 1}" for i in range(n)) + " |",
             "|---" * (n + 1) + "|"]
    for t, row in enumerate(rows):
        cells = [("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2f}")
                 for v in list(row) + [None] * (n - len(row))]
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_image(rows: Sequence[Sequence[Optional[float]]]):
    """The accuracy matrix as an RGB heatmap, ``uint8 (H, W, 3)`` (numpy), values written in the cells."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(r) for r in rows)
    R = np.full((len(rows), n), np.nan)
    for t, row in enumerate(rows):
        for i, v in enumerate(row):
            if v is not None:
                R[t, i] = float(v)
    size = 1.2 + 0.55 * n
    fig = Figure(figsize=(size, 0.9 + 0.55 * len(rows)), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=100, cmap="viridis")
    for t in range(R.shape[0]):
        for i in range(R.shape[1]):
            if not np.isnan(R[t, i]):
                ax.text(i, t, f"{R[t, i]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if R[t, i] < 60 else "black")
    ax.set_xticks(range(n), [str(i + 1) for i in range(n)])
    ax.set_yticks(range(len(rows)), [str(t + 1) for t in range(len(rows))])
    ax.set_xlabel("tested task")
    ax.set_ylabel("after task")
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
