"""Whole runs: a class-incremental scenario learned task by task into one output folder.

``duallora run`` calls :func:`run_experiment`; ``duallora evaluate`` calls :func:`evaluate_checkpoints`.
A run folder holds (see README, "What a run writes"): ``config.yaml``, ``class_order.json``,
``metrics.json``, ``accuracy_matrix.csv``, ``accuracy_matrix.png``, ``accuracy_curve.png``,
``history.json`` and ``checkpoints/task_K.safetensors`` after each task K. Everything is written into
``<output>.partial`` and published only when the run succeeds, so a failed run never touches an
earlier run's outputs (field-lessons.md, lessons 9 and 11).

:func:`run_experiment` goes through named steps: resolve the interrupted run's config (``--resume``),
open the staging folder, restore the learner from the last checkpoint or start a new one, learn each
task (evaluate, checkpoint, log), then write the outputs and publish the folder. What the folder
records (``class_order.json`` with the data identity, ``metrics.json``, the measurements kept in each
checkpoint) is made by :mod:`duallora.run_records`, whose names are re-exported here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from duallora import config as config_mod
from duallora import distributed
from duallora.backbones import BackboneInfo, create_backbone
from duallora.config import RunConfig
from duallora.data.scenarios import ClassIncrementalScenario, scenario_from_config
from duallora.data.transforms import resolve_transform_config
from duallora.errors import CheckpointError, DivergenceError, DualLoRAError
from duallora.metrics import build_matrix, compute_metrics
from duallora.reporting import RunDirectory, write_json_atomic, write_text_atomic
from duallora.run_records import (
    RESUME_IGNORED_KEYS,
    RunState,
    check_same_data,
    class_order_record,
    config_differences,
    data_changes,
    data_identity,
    run_metrics,
    write_outputs,
)
from duallora.tensorboard import RunLogger
from duallora.tensorboard import require as require_tensorboard
from duallora.training import ContinualLearner, make_progress, select_device

__all__ = [
    "default_output", "build_scenario", "run_experiment", "find_checkpoints", "evaluate_checkpoints",
    # re-exported from duallora.run_records
    "RESUME_IGNORED_KEYS", "config_differences", "data_identity", "class_order_record", "data_changes",
    "check_same_data", "RunState", "run_metrics", "write_outputs",
]

Echo = Callable[[str], None]


def _silent(_: str) -> None:
    """Echo for processes other than rank 0."""


class _Staging:
    """The staging folder's path for processes other than rank 0 (which never write to it)."""

    def __init__(self, final: Path) -> None:
        self.path = Path(final).with_name(Path(final).name + ".partial")


def default_output(cfg: RunConfig) -> Path:
    """``runs/<method>-<dataset>-<T>tasks-seed<S>-<timestamp>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tasks = cfg.data.num_tasks or f"c{cfg.data.classes_per_task}"
    return Path("runs") / f"{cfg.method.name}-{cfg.data.dataset}-{tasks}tasks-seed{cfg.seed}-{stamp}"


def build_scenario(cfg: RunConfig, info: BackboneInfo) -> ClassIncrementalScenario:
    """Load the configured dataset at the backbone's input size and cut it into tasks.

    Raises:
        DataError: unknown dataset, missing data, or classes that cannot be split as asked.
    """
    channels, height, width = info.input_size
    transform = resolve_transform_config(cfg.backbone.name, info.input_size, crop_pct=cfg.data.crop_pct,
                                         mean=info.mean, std=info.std)
    return scenario_from_config(cfg.data, seed=cfg.seed, image_size=(height, width), channels=channels,
                                transform=transform)


def _diverged(exc: BaseException) -> bool:
    """Whether ``exc`` says that training diverged (a non-finite loss or non-finite task statistics)."""
    return isinstance(exc, DivergenceError)


def _lower_lr(lr: float) -> float:
    """A learning rate to suggest after a divergence: the default if ``lr`` is above it, else a tenth."""
    default = RunConfig().train.lr
    return default if lr > default else lr / 10


def _divergence_hint(cfg: RunConfig, output: Path, stage: Path, command: Optional[Sequence[str]]) -> str:
    """The way out of a diverged run: a new run with a lower ``train.lr`` and ``--overwrite``."""
    lower = [f"train.lr={_lower_lr(cfg.train.lr):g}"]
    if cfg.train.head_lr is not None:
        lower.append(f"train.head_lr={_lower_lr(cfg.train.head_lr):g}")
    if command is not None:
        args = [a for a in command if not a.startswith(("train.lr=", "train.head_lr="))]
        cmd = "duallora run " + shlex.join(["-o", str(output), "--overwrite", *args, *lower])
    else:  # the run's own config is in the staging folder, which --overwrite discards: copy it out first
        copy = output.with_name(output.name + ".config.yaml")
        cmd = (f"cp {shlex.quote(str(stage / 'config.yaml'))} {shlex.quote(str(copy))} && duallora run "
               + shlex.join(["--config", str(copy), "-o", str(output), "--overwrite", *lower]))
    return (f"training diverged at train.lr={cfg.train.lr:g}: resuming would repeat it; start a new run with a "
            f"lower rate and --overwrite (which discards the unfinished run in {stage}): `{cmd}`")


def _resume_config(cfg: Optional[RunConfig], output: Optional[Path]) -> tuple[RunConfig, Path]:
    """The config and folder of the interrupted run at ``output`` that ``--resume`` continues.

    ``output`` may name the staging folder itself. A given ``cfg`` must equal the run's own config
    (up to :data:`RESUME_IGNORED_KEYS`); None uses the run's own.

    Raises:
        CheckpointError: no folder given, no interrupted run there (or a finished one), a staging
            folder without ``config.yaml`` or started by an older version, a ``cfg`` that differs.
    """
    if output is None:
        raise CheckpointError("--resume needs the run folder: duallora run --resume DIR")
    if Path(output).name.endswith(".partial"):  # the staging folder itself was given
        output = Path(output).with_name(Path(output).name[: -len(".partial")])
    rundir = RunDirectory(Path(output), resume=True)  # refuses while another process runs it
    rundir.release()
    stored_path = rundir.path / "config.yaml"
    if not stored_path.is_file():
        raise CheckpointError(f"{rundir.path} has no config.yaml; it was not started by `duallora run`")
    stored = config_mod.load_config(stored_path, stored=True)
    older = [k for k in config_mod.missing_keys(stored_path) if tuple(k.split(".", 1)) not in RESUME_IGNORED_KEYS]
    if older:
        raise CheckpointError(
            f"{rundir.path} was started by an older version of duallora (its config lacks {', '.join(older)}); "
            "this version cannot continue it exactly: start a new run"
        )
    if cfg is None:
        return stored, output
    diff = config_differences(cfg, stored)
    if diff:
        raise CheckpointError(
            f"the config given differs from the interrupted run's ({'; '.join(diff)}); "
            f"resume without --config/overrides to use the run's own config"
        )
    return cfg, output


def _open_run_directory(output: Path, cfg: RunConfig, scenario: ClassIncrementalScenario, *, overwrite: bool,
                        resume: bool, main: bool,
                        protect: Sequence[Optional[Union[str, os.PathLike]]]) -> Union[RunDirectory, _Staging]:
    """The run's staging folder: the interrupted run's (``resume``), or a fresh one made by rank 0 (the
    other processes only learn its path and wait for it).

    ``overwrite`` replaces or discards only duallora run folders, never one that holds the data folder
    (as configured and as read) or a ``protect`` path (:func:`duallora.reporting.check_replaceable`).

    Raises:
        CheckpointError: as :class:`~duallora.reporting.RunDirectory`.
    """
    # what --overwrite must never delete: the data folder (as configured and as read) and the config file
    keep = [*protect, cfg.data.root, getattr(scenario.train, "source", None), getattr(scenario.test, "source", None)]
    if resume:
        return RunDirectory(output, resume=True, runs_only=True, protect=keep)
    rundir = RunDirectory(output, overwrite=overwrite, runs_only=True, protect=keep) if main else _Staging(output)
    distributed.barrier()
    return rundir


@dataclass
class _Run:
    """One run in progress: what the steps of :func:`run_experiment` share."""

    cfg: RunConfig
    output: Path
    rundir: Union[RunDirectory, _Staging]
    scenario: ClassIncrementalScenario
    info: BackboneInfo
    main: bool  # rank 0, the process that writes
    echo: Echo
    command: Optional[Sequence[str]]  # the `duallora run` arguments, for the divergence hint

    @property
    def stage(self) -> Path:
        """The staging folder ``<output>.partial`` everything is written into."""
        return self.rundir.path

    def hint(self) -> str:
        """How to go on after an interruption or a failure: the ``--resume`` command."""
        return (f"the unfinished run stays in {self.stage}; continue it with `duallora run --resume {self.output}` "
                "(or start again with --overwrite)")


def _restore_or_start(run: _Run, model: torch.nn.Module, resume: bool,
                      fresh: Optional[ContinualLearner] = None) -> tuple[ContinualLearner, RunState]:
    """The learner and the measurements to go on from: those of the interrupted run's last checkpoint
    (``resume``, when it has one), else ``fresh`` or a new learner (rank 0 then writes ``config.yaml``
    and ``class_order.json``).

    Raises:
        CheckpointError: the run's data changed since it started (:func:`check_same_data`), or its last
            checkpoint does not match the scenario rebuilt from its config.
    """
    checkpoints = run.stage / "checkpoints"
    done = find_checkpoints(checkpoints) if resume and checkpoints.is_dir() else []
    if done and any(checkpoints.iterdir()):
        return _restore(run, model, done[-1])
    if run.main:
        write_text_atomic(run.stage / "config.yaml", config_mod.to_yaml(run.cfg))
        write_json_atomic(run.stage / "class_order.json", class_order_record(run.scenario))
    if fresh is not None:
        return fresh, RunState()
    return ContinualLearner(run.cfg, num_tasks=run.scenario.num_tasks, backbone=(model, run.info)), RunState()


def _restore(run: _Run, model: torch.nn.Module, last: Path) -> tuple[ContinualLearner, RunState]:
    """The learner saved in checkpoint ``last`` (on ``model``) and the measurements stored with it."""
    check_same_data(run.stage, run.scenario, run.output)
    learner = ContinualLearner.load(last, backbone=(model, run.info))
    learner.cfg = run.cfg
    learner.progress = make_progress(run.cfg.train.progress)
    _, meta = ContinualLearner.read_checkpoint(last)
    state = RunState.from_checkpoint(meta.get("extra", {}))
    expected = [list(t.classes) for t in run.scenario.tasks[: len(learner.task_classes)]]
    if expected != [list(c) for c in learner.task_classes] or len(state.rows) != len(learner.task_classes):
        raise CheckpointError(f"{last} does not match the scenario rebuilt from the run's config")
    run.echo(f"resuming after task {len(learner.task_classes)} from {last}")
    return learner, state


def _learn_task(run: _Run, learner: ContinualLearner, state: RunState, task: Any, logger: RunLogger) -> None:
    """Learn one task of the scenario, evaluate on the test images of every task seen so far, save the
    checkpoint (rank 0), log it and print its line."""
    t = task.index
    record = learner.learn_task(run.scenario.train_dataset(t), task.classes)
    state.train_time += record["task_time_s"]
    e0 = time.perf_counter()
    ev = learner.evaluate([run.scenario.test_dataset(i) for i in range(t + 1)])
    state.add_evaluation(ev, time.perf_counter() - e0)
    record["evaluation"] = ev
    if run.main:
        learner.save(run.stage / "checkpoints" / f"task_{t + 1}.safetensors", extra=state.checkpoint_extra())
    logger.task_end(t, ev, state.rows, state.task_id_rows, record)
    seen = sum(c for c in ev["correct"]) / max(sum(ev["total"]), 1) * 100
    mem = record.get("memory_size")
    mem_txt = f", memory dims {min(mem.values())}-{max(mem.values())}" if mem else ""
    run.echo(f"task {t + 1}/{run.scenario.num_tasks} classes {list(task.classes)}: {record['summary']}, "
             f"accuracy on seen classes {seen:.2f}%, task-id {ev['task_id_accuracy']:.2f}%{mem_txt} "
             f"({record['task_time_s']:.1f}s)")


def _learn_remaining(run: _Run, learner: ContinualLearner, state: RunState, start_task: int) -> None:
    """Learn the tasks after the first ``start_task`` ones in turn (:func:`_learn_task`); TensorBoard
    gets every step and task when ``train.tensorboard`` is on.

    Raises:
        KeyboardInterrupt: interrupted; the message names the staging folder and ``--resume``.
        DualLoRAError: as raised, with the way out appended: after a divergence the new run with a
            lower rate (:func:`_divergence_hint`), otherwise the staging folder and ``--resume``.
    """
    logger = RunLogger.from_config(run.cfg, run.stage, start_task=start_task)  # a no-op unless train.tensorboard
    learner.step_callback = logger.step
    try:
        for task in run.scenario.tasks[start_task:]:
            _learn_task(run, learner, state, task, logger)
    except KeyboardInterrupt as exc:
        raise KeyboardInterrupt(f"interrupted; {run.hint()}") from exc
    except DualLoRAError as exc:
        if _diverged(exc):
            raise type(exc)(f"{exc}\n{_divergence_hint(run.cfg, run.output, run.stage, run.command)}") from exc
        raise type(exc)(f"{exc}\n{run.hint()}") from exc
    finally:
        learner.step_callback = None
        logger.close()


def _finish(run: _Run, learner: ContinualLearner, state: RunState, resumed_after: Optional[int],
            wall_start: float) -> dict[str, Any]:
    """The run's metrics; rank 0 writes the outputs (metrics.json last) and publishes the staging
    folder as the run folder (``metrics["output"]``)."""
    metrics = run_metrics(run.cfg, run.scenario, run.info, state)
    metrics.update({
        "wall_time_s": time.perf_counter() - wall_start,
        "resumed_after_task": resumed_after,
        "device": str(learner.device),
        "world_size": distributed.world_size(),
    })
    if not run.main:
        distributed.barrier()
        return metrics
    write_outputs(run.stage, run.cfg, run.scenario, metrics, learner.history)
    final = run.rundir.commit()
    distributed.barrier()
    metrics["output"] = str(final)
    return metrics


def run_experiment(cfg: Optional[RunConfig], output: Optional[Path] = None, *, overwrite: bool = False,
                   resume: bool = False, echo: Echo = print, protect: Sequence[Optional[Union[str, os.PathLike]]] = (),
                   command: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Learn every task of the configured scenario and write the run folder.

    Args:
        cfg: a validated run config; with ``resume`` it may be None (use the interrupted run's own).
        output: the run folder; None = :func:`default_output`.
        overwrite: replace an existing non-empty folder (only once this run succeeds) and discard a
            leftover ``<output>.partial``; only duallora run folders are replaced or discarded, and
            never one that holds the data folder or a ``protect`` path
            (:func:`duallora.reporting.check_replaceable`).
        resume: continue the interrupted run at ``output`` (its ``<output>.partial`` folder) after
            its last finished task; the result equals an uninterrupted run of the same seed. The
            data must be the same as when the run started (:func:`data_identity`).
        echo: where progress lines go.
        protect: further paths that ``overwrite`` must not delete (the CLI passes ``--config``).
        command: the ``duallora run`` arguments that started this run (``--config`` and overrides),
            used to show the command that starts it again after a divergence.

    Returns:
        the metrics dict written to ``metrics.json``.

    Raises:
        DualLoRAError subclasses for bad config, data, backbone, diverged training (the message shows
        the new run to start), an existing output folder or one ``overwrite`` may not delete, or
        (resume) no interrupted run / a config that differs from the run's / data that changed since
        the run started; the earlier content of ``output`` is left untouched in every case.
        KeyboardInterrupt: interrupted (Ctrl-C, or SIGTERM under the CLI) once the staging folder
        exists; its message names the folder and the ``--resume`` command.
    """
    wall_start = time.perf_counter()
    # under torchrun, join the process group first: only rank 0 writes outputs
    distributed.init(select_device(cfg.train.device if cfg is not None else "auto"))
    main = distributed.is_main()
    if not main:
        echo = _silent
    if resume:
        cfg, output = _resume_config(cfg, output)
    assert cfg is not None
    require_tensorboard(cfg)  # train.tensorboard=true needs the package: say so before any folder is made
    output = Path(output) if output is not None else default_output(cfg)
    model, info = create_backbone(cfg.backbone.name, cfg.backbone.weights)
    scenario = build_scenario(cfg, info)
    # a new run builds its learner before any folder exists: a config the model refuses (e.g. method.gate_layer
    # outside the backbone's blocks) then leaves no <output>.partial behind
    fresh = None if resume else ContinualLearner(cfg, num_tasks=scenario.num_tasks, backbone=(model, info))
    rundir = _open_run_directory(output, cfg, scenario, overwrite=overwrite, resume=resume, main=main, protect=protect)
    run = _Run(cfg, output, rundir, scenario, info, main, echo, command)
    echo(f"{cfg.method.name}: {cfg.data.dataset}, {scenario.num_tasks} tasks, "
         f"backbone {info.name} (sha256 {info.sha256[:12]}), seed {cfg.seed}")
    echo(f"class order: {scenario.class_order}")
    try:
        try:  # a Ctrl-C/SIGTERM from here on leaves the staging folder: name it
            learner, state = _restore_or_start(run, model, resume, fresh)
        except KeyboardInterrupt as exc:
            raise KeyboardInterrupt(f"interrupted; {run.hint()}") from exc
        start_task = len(learner.task_classes)
        _learn_remaining(run, learner, state, start_task)
        try:
            return _finish(run, learner, state, start_task if resume else None, wall_start)
        except KeyboardInterrupt as exc:  # while writing the outputs: every task is done, resume rewrites them
            if isinstance(rundir, RunDirectory) and rundir.committed:
                raise KeyboardInterrupt(f"interrupted after the run was published in {output}") from exc
            raise KeyboardInterrupt(f"interrupted while writing the outputs; {run.hint()}") from exc
    finally:
        if isinstance(rundir, RunDirectory):
            rundir.release()  # the folder lock (another process may resume it now)


_TASK_FILE = re.compile(r"task_(\d+)\.safetensors$")


def find_checkpoints(path: Path) -> list[Path]:
    """Checkpoint files for ``path``: itself if a file, else ``task_K.safetensors`` in order.

    Accepts a run folder, its ``checkpoints/`` folder or one checkpoint file.

    Raises:
        CheckpointError: nothing found.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not folder.is_dir():
        raise CheckpointError(f"{str(path)!r} is neither a checkpoint file nor a run folder")
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _TASK_FILE.search(p.name))))
    if not found:
        raise CheckpointError(f"no task_K.safetensors checkpoints in {str(folder)!r}; "
                              "pass a run folder made by `duallora run`")
    return [p for _, p in found]


def evaluate_each(files: list[Path], config_of: Callable[[dict[str, Any]], RunConfig], progress: bool,
                   prepare: Optional[Callable[[ContinualLearner, ClassIncrementalScenario], None]] = None):
    """Load every checkpoint with ``config_of(its metadata)`` and evaluate it on the test data of its
    tasks; ``prepare(learner, scenario)`` runs after each load, before the evaluation. Yields
    ``(file, learner, scenario, evaluation, seconds of the evaluation)``.

    Raises:
        CheckpointError: a checkpoint's classes differ from the scenario rebuilt from its config.
    """
    scenario = None
    for f in files:
        _, meta = ContinualLearner.read_checkpoint(f)
        cfg = config_of(meta)
        # a fresh backbone per checkpoint: loading merges adapters into its weights in place
        learner = ContinualLearner.load(f, backbone=create_backbone(cfg.backbone.name, cfg.backbone.weights), cfg=cfg)
        learner.progress = make_progress(progress)
        if scenario is None:
            scenario = build_scenario(cfg, learner.backbone_info)
        k = len(learner.task_classes)
        if [list(t.classes) for t in scenario.tasks[:k]] != [list(c) for c in learner.task_classes]:
            raise CheckpointError(f"{f.name}: the rebuilt class order differs from the checkpoint's; "
                                  "was the data changed?")
        if prepare is not None:
            prepare(learner, scenario)
        t0 = time.perf_counter()
        ev = learner.evaluate([scenario.test_dataset(i) for i in range(k)])
        yield f, learner, scenario, ev, time.perf_counter() - t0


def derived_source(path: Path) -> Optional[Path]:
    """The run whose checkpoints a run folder made by :func:`~duallora.derivation.derive_run` evaluated
    (``derived_from`` in its ``metrics.json``, normalised), or None for any other path."""
    derived = Path(path) / "metrics.json"
    if not derived.is_file() or (Path(path) / "checkpoints").is_dir():
        return None
    try:
        source = json.loads(derived.read_text()).get("derived_from")
    except (ValueError, AttributeError):
        return None
    return Path(os.path.normpath(Path(path) / source)) if source else None


def _refuse_derived(path: Path) -> None:
    """Refuse a run folder made by :func:`derive_run`: it has no checkpoints of its own.

    Raises:
        CheckpointError: naming the run it was derived from.
    """
    source = derived_source(path)
    if source is not None:
        raise CheckpointError(f"{path} was derived from the checkpoints of {source} (an "
                              "inference-only change, see docs/compare.md) and has none of its own; evaluate "
                              "that run, or derive again with duallora compare")


def _stored_config(progress: bool, data_root: Optional[str],
                   overrides: Optional[dict[str, Any]]) -> Callable[[dict[str, Any]], RunConfig]:
    """The config of a checkpoint from its metadata, with ``train.progress``, ``data.root`` (when given)
    and ``overrides`` (``{"section.key": value}``) replaced."""
    def stored_config(meta: dict[str, Any]) -> RunConfig:
        stored = meta["config"]
        stored["train"]["progress"] = progress
        if data_root is not None:
            stored["data"]["root"] = data_root
        for dotted, value in (overrides or {}).items():
            section, key = dotted.split(".", 1)
            stored[section][key] = value
        return config_mod.from_dict(stored)

    return stored_config


def _difference_to_metrics_json(path: Path, R: np.ndarray) -> Optional[float]:
    """The largest difference between ``R`` and the accuracy matrix of a run's ``metrics.json`` at
    ``path``: inf when their shapes or missing entries differ; None when there is no such file.

    Raises:
        CheckpointError: the file is not a run's metrics file.
    """
    if not path.is_file():
        return None
    try:
        stored_matrix = json.loads(path.read_text())["accuracy_matrix"]
        S = np.array([[np.nan if v is None else v for v in row] for row in stored_matrix], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a run's metrics file ({exc})") from exc
    if S.shape == R.shape and np.array_equal(np.isnan(S), np.isnan(R)):
        return float(np.nanmax(np.abs(S - R)))
    return float("inf")


def evaluate_checkpoints(path: Path, *, echo: Echo = print, progress: bool = True,
                         data_root: Optional[str] = None,
                         overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Re-evaluate checkpoints on the test data their run used, without task labels.

    With a run folder every task's checkpoint is evaluated, which rebuilds the whole accuracy
    matrix and so every metric; with one checkpoint file only its row (its tasks) is evaluated.

    Args:
        path: run folder, its ``checkpoints/`` folder or a checkpoint file.
        data_root: overrides the stored ``data.root`` (data moved since the run).
        overrides: ``{"section.key": value}`` applied to the stored config; only keys that do not
            change the model (``duallora.predict.EVALUATE_OVERRIDE_KEYS``, checked by the CLI).

    Returns:
        metrics as in ``metrics.json`` (for a single file: ``final_accuracy`` etc. of its row).

    Raises:
        CheckpointError, DataError, BackboneError.
    """
    _refuse_derived(path)
    files = find_checkpoints(Path(path))
    rows: list[list[float]] = []
    task_ids: list[float] = []
    scenario = None
    for f, _, scenario, ev, _ in evaluate_each(files, _stored_config(progress, data_root, overrides), progress):  # noqa: B007
        rows.append(ev["accuracy"])
        task_ids.append(ev["task_id_accuracy"])
        echo(f"{f.name}: accuracy per task {[round(a, 2) for a in ev['accuracy']]}, "
             f"task-id {ev['task_id_accuracy']:.2f}%")
    assert scenario is not None
    sizes = [len(scenario.test_dataset(t)) for t in range(len(rows[-1]))]
    _, meta = ContinualLearner.read_checkpoint(files[-1])
    stored_rows = meta.get("extra", {}).get("accuracy_rows") or []
    if len(files) == 1 and len(rows[0]) > 1:
        if len(stored_rows) != len(rows[0]):
            raise CheckpointError(f"{files[0].name} has no stored accuracy record; evaluate the whole run folder")
        # one checkpoint re-evaluates the last row; earlier rows come from the checkpoint's record
        R = build_matrix(stored_rows[:-1] + [rows[0]])
    else:
        R = build_matrix(rows)
    out = compute_metrics(R, sizes, task_id_accuracy=task_ids[-1])
    stored_split = meta["config"]["data"].get("evaluate_on", "test")
    split = (overrides or {}).get("data.evaluate_on", stored_split)
    out["evaluated_on"] = split
    if split != stored_split:  # another split than the run's: nothing stored to compare with
        out["matches_stored_record"] = None
        out["max_difference_to_metrics_json"] = None
    else:
        out["matches_stored_record"] = bool(stored_rows) and np.allclose(rows[-1], stored_rows[-1])
        # the run's metrics.json, when there is one: the whole re-evaluated matrix against the stored one
        out["max_difference_to_metrics_json"] = _difference_to_metrics_json(
            files[-1].parent.parent / "metrics.json", R)
    out["accuracy_matrix"] = [[None if np.isnan(v) else float(v) for v in row] for row in R]
    out["task_id_accuracy_after_task"] = task_ids
    out["checkpoints"] = [str(f) for f in files]
    return out
