"""What a run folder records, and the checks made against those records.

* ``class_order.json``: the scenario's description and its :func:`data_identity` (what a resumed
  run's data is checked against, :func:`check_same_data`);
* the accuracy rows, task-id rows and times measured so far (:class:`RunState`), stored in every
  task checkpoint so that a resumed run continues them;
* ``metrics.json`` (:func:`run_metrics`) and the files derived from it (:func:`write_outputs`);
* which config keys a stored run may differ in (:data:`RESUME_IGNORED_KEYS`, :func:`config_differences`).

:mod:`duallora.runner` writes and reads these; it re-exports every name here.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from duallora import __version__
from duallora import config as config_mod
from duallora.config import RunConfig
from duallora.errors import CheckpointError
from duallora.metrics import build_matrix, compute_metrics
from duallora.reporting import plot_accuracy_curve, plot_accuracy_matrix, write_accuracy_matrix_csv, write_json_atomic

if TYPE_CHECKING:
    from duallora.backbones import BackboneInfo
    from duallora.data.scenarios import ClassIncrementalScenario

__all__ = [
    "RESUME_IGNORED_KEYS",
    "config_differences",
    "data_identity",
    "class_order_record",
    "data_changes",
    "check_same_data",
    "RunState",
    "run_metrics",
    "write_outputs",
]

#: Config keys that do not change a run's results; a resumed run may differ in them.
RESUME_IGNORED_KEYS = {("train", "progress"), ("data", "num_workers"), ("train", "threads"),
                       ("data", "check_images"), ("train", "tensorboard"),
                       ("method", "stat_replay_mib")}  # replayed statistics passes: the same numbers


def config_differences(a: RunConfig, b: RunConfig, ignored: set[tuple[str, str]] = RESUME_IGNORED_KEYS) -> list[str]:
    """How two configs differ, as a stored run's config ``b`` against a given one ``a``.

    Returns:
        ``section.key: run has B, given A`` for every key (outside ``ignored``, ``(section, key)``
        pairs) where ``a`` and ``b`` differ, sorted by section and key; ``[]`` when they are equal.
    """
    da, db = config_mod.to_dict(a), config_mod.to_dict(b)
    out = []
    for section in sorted(set(da) | set(db)):
        va, vb = da.get(section), db.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):
            for key in sorted(set(va) | set(vb)):
                if (section, key) not in ignored and va.get(key) != vb.get(key):
                    out.append(f"{section}.{key}: run has {vb.get(key)!r}, given {va.get(key)!r}")
        elif va != vb:
            out.append(f"{section}: run has {vb!r}, given {va!r}")
    return out


def _environment() -> dict[str, str]:
    import timm

    return {"duallora": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def _describe_images(dataset: Any, indices: list[int]) -> dict[str, Any]:
    """``{"count", "sha256"}`` of the images ``indices`` of ``dataset`` (see :func:`data_identity`)."""
    base = dataset
    while getattr(base, "files", None) is None and getattr(base, "base", None) is not None:
        base = base.base  # an augmentation wrapper: the items are its base's
    files = getattr(base, "files", None)
    targets = dataset.targets
    h = hashlib.sha256()
    if files is not None:
        source = getattr(dataset, "source", None) or getattr(base, "source", None)
        labels = targets.tolist()
        for i in indices:
            name = Path(files[i])
            if source is not None:
                try:
                    name = name.relative_to(source)
                except ValueError:
                    pass
            h.update(f"{name.as_posix()}\t{labels[i]}\n".encode())
    else:
        images = getattr(base, "images", None)
        for start in range(0, len(indices), 4096):
            chunk = indices[start:start + 4096]
            h.update(np.asarray(targets[chunk], dtype=np.int64).tobytes())
            if images is not None:
                part = images[torch.as_tensor(chunk, dtype=torch.int64)] if isinstance(images, torch.Tensor) \
                    else np.asarray(images)[np.asarray(chunk, dtype=np.int64)]
                h.update(np.ascontiguousarray(np.asarray(part)).tobytes())
            else:  # no pixels to hash: the positions of the images stand for them
                h.update(np.asarray(chunk, dtype=np.int64).tobytes())
    return {"count": len(indices), "sha256": h.hexdigest()}


def data_identity(scenario: ClassIncrementalScenario) -> dict[str, Any]:
    """What a run's accuracy rows depend on in its data: per task and split, the images it uses.

    Per task and split the record holds the number of images and a sha256: for datasets read from
    files (image folders, the benchmarks' file lists) over ``"<path relative to the data folder>\\t<label
    id>\\n"`` lines in index order (file contents are not read); for datasets held as arrays (the IDX
    files, CIFAR) over the pixels of the task's images and their label ids.

    Args:
        scenario: the run's scenario.

    Returns:
        ``{"scheme": ..., "tasks": [{"index": t, "train": {"count", "sha256"}, "test": {...}}, ...]}``
        (JSON-able; stored in ``class_order.json`` when a run starts and checked on ``--resume``).
    """
    return {
        "scheme": "sha256 over '<path relative to the data folder>\\t<label id>' lines, or over pixels and labels",
        "tasks": [{"index": t, "train": _describe_images(scenario.train, scenario.train_indices(t)),
                   "test": _describe_images(scenario.test, scenario.test_indices(t))}
                  for t in range(scenario.num_tasks)],
    }


def class_order_record(scenario: ClassIncrementalScenario) -> dict[str, Any]:
    """The ``class_order.json`` content: the scenario's description and its :func:`data_identity`."""
    return {**scenario.to_dict(), "data_identity": data_identity(scenario)}


def data_changes(stored: dict[str, Any], scenario: ClassIncrementalScenario) -> list[str]:
    """How the data of ``scenario`` differs from a run's stored ``class_order.json`` (``[]``: the same).

    Runs started before the data identity was recorded are compared by their image counts per task.
    """
    now = data_identity(scenario)["tasks"]
    identity = stored.get("data_identity")
    if isinstance(identity, dict) and isinstance(identity.get("tasks"), list):
        before = identity["tasks"]
    else:  # an older run: only the counts per task are known
        before = [{"index": t.get("index"), "train": {"count": t.get("train_count")},
                   "test": {"count": t.get("test_count")}} for t in stored.get("tasks", [])]
    if len(before) != len(now):
        return [f"{len(before)} tasks when the run started, {len(now)} now"]
    out = []
    for b, n in zip(before, now):
        for split in ("train", "test"):
            bb, nn = b.get(split) or {}, n[split]
            where = f"task {n['index'] + 1} {split} images"
            if bb.get("count") is not None and bb["count"] != nn["count"]:
                out.append(f"{where}: {bb['count']} when the run started, {nn['count']} now")
            elif bb.get("sha256") is not None and bb["sha256"] != nn["sha256"]:
                out.append(f"{where}: {nn['count']} as before, but other files or labels")
    return out


def check_same_data(stage: Path, scenario: ClassIncrementalScenario, output: Path) -> None:
    """Refuse to resume the run in ``stage`` when its data changed since it started.

    Raises:
        CheckpointError: ``class_order.json`` is missing or unreadable, or the images of a task and
            split differ in number or in files/labels (:func:`data_identity`) from what it records.
    """
    path = stage / "class_order.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is missing or unreadable ({exc}); the run's data cannot be checked, so it "
                              f"cannot be resumed: start a new run to {output} with --overwrite") from exc
    changes = data_changes(stored, scenario)
    if changes:
        root = stored.get("root") or getattr(scenario.train, "source", None)
        raise CheckpointError(
            f"the data changed since the interrupted run started ({'; '.join(changes)}; data folder {root}): its "
            "accuracy rows would come from different data; restore the data as it was and resume again, or start "
            f"a new run to {output} with --overwrite (which discards {stage})"
        )


@dataclass
class RunState:
    """What a run has measured so far; stored in every task checkpoint, so a resumed run continues it.

    Attributes:
        rows: accuracy row after each learned task (accuracy on tasks 1..t, percent).
        task_id_rows: task-id accuracy after each learned task (percent).
        train_time: seconds of learning so far (all sessions of a resumed run).
        eval_time: seconds of the evaluations after each task so far.
        last_eval_s: wall time of the latest evaluation (all tasks seen so far), None before the first.
        last_eval_images: test images it predicted.
    """

    rows: list[list[float]] = field(default_factory=list)
    task_id_rows: list[float] = field(default_factory=list)
    train_time: float = 0.0
    eval_time: float = 0.0
    last_eval_s: Optional[float] = None
    last_eval_images: Optional[int] = None

    @classmethod
    def from_checkpoint(cls, extra: dict[str, Any]) -> RunState:
        """The state stored in a checkpoint's ``extra`` metadata (:meth:`checkpoint_extra`)."""
        return cls(rows=[list(r) for r in extra.get("accuracy_rows", [])],
                   task_id_rows=list(extra.get("task_id_accuracy_rows", [])),
                   train_time=float(extra.get("train_time_s", 0.0)),
                   eval_time=float(extra.get("eval_time_s", 0.0)),
                   last_eval_s=extra.get("last_eval_time_s"),
                   last_eval_images=extra.get("last_eval_images"))

    def checkpoint_extra(self) -> dict[str, Any]:
        """The ``extra`` metadata of a task checkpoint: this state, read back by :meth:`from_checkpoint`."""
        return {"accuracy_rows": self.rows, "task_id_accuracy_rows": self.task_id_rows,
                "train_time_s": self.train_time, "eval_time_s": self.eval_time,
                "last_eval_time_s": self.last_eval_s, "last_eval_images": self.last_eval_images}

    def add_evaluation(self, ev: dict[str, Any], seconds: float) -> None:
        """Record the evaluation after a task (``ContinualLearner.evaluate``'s result) that took ``seconds``."""
        self.last_eval_s = seconds
        self.last_eval_images = int(sum(ev["total"]))
        self.eval_time += seconds
        self.rows.append(ev["accuracy"])
        self.task_id_rows.append(ev["task_id_accuracy"])


def run_metrics(cfg: RunConfig, scenario: ClassIncrementalScenario, info: BackboneInfo,
                state: RunState) -> dict[str, Any]:
    """The ``metrics.json`` content of a run (every key but the per-session ones)."""
    R = build_matrix(state.rows)
    test_sizes = [len(scenario.test_dataset(t)) for t in range(scenario.num_tasks)]
    data_record = scenario.record()
    metrics: dict[str, Any] = compute_metrics(R, test_sizes, task_id_accuracy=state.task_id_rows[-1])
    last_eval_s, last_eval_images = state.last_eval_s, state.last_eval_images
    metrics.update({
        "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in R],
        "task_id_accuracy_after_task": state.task_id_rows,
        "num_tasks": scenario.num_tasks,
        "test_images_per_task": test_sizes,
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "data_root": data_record.get("root") or cfg.data.root,  # the folder actually read
        "data_record": data_record,
        "train_images_per_task": [len(scenario.train_dataset(t)) for t in range(scenario.num_tasks)],
        "class_order": scenario.class_order,
        "backbone": info.name,
        "backbone_sha256": info.sha256,
        "backbone_sha256_of": info.sha256_of,
        "seed": cfg.seed,
        "train_time_s": state.train_time,
        "eval_time_s": state.eval_time,
        # the final task's evaluation (every test image of every task): wall time and per image
        "final_eval_time_s": last_eval_s,
        "inference_ms_per_image": (1000.0 * last_eval_s / last_eval_images
                                   if last_eval_s is not None and last_eval_images else None),
        "environment": _environment(),
    })
    return metrics


def write_outputs(stage: Path, cfg: RunConfig, scenario: ClassIncrementalScenario, metrics: dict[str, Any],
                  history: list) -> None:
    """history.json, the accuracy matrix (CSV, PNG), the accuracy curve and metrics.json (last)."""
    R = np.array([[np.nan if v is None else v for v in row] for row in metrics["accuracy_matrix"]], dtype=np.float64)
    write_json_atomic(stage / "history.json", history)
    write_accuracy_matrix_csv(stage / "accuracy_matrix.csv", R)
    title = f"{cfg.method.name} on {cfg.data.dataset} ({scenario.num_tasks} tasks)"
    plot_accuracy_matrix(stage / "accuracy_matrix.png", R, title)
    plot_accuracy_curve(stage / "accuracy_curve.png",
                        {"accuracy (sample-weighted)": metrics["accuracy_after_task"],
                         "task-id accuracy": metrics["task_id_accuracy_after_task"]}, title)
    write_json_atomic(stage / "metrics.json", metrics)

