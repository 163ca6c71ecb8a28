"""Whole runs: a class-incremental scenario learned task by task into one output folder.

``duallora run`` calls :func:`run_experiment`; ``duallora evaluate`` calls :func:`evaluate_checkpoints`.
A run folder holds (see README, "What a run writes"): ``config.yaml``, ``class_order.json``,
``metrics.json``, ``accuracy_matrix.csv``, ``accuracy_matrix.png``, ``accuracy_curve.png``,
``history.json`` and ``checkpoints/task_K.safetensors`` after each task K. Everything is written into
``<output>.partial`` and published only when the run succeeds, so a failed run never touches an
earlier run's outputs (field-lessons.md, lessons 9 and 11).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from duallora import __version__, distributed
from duallora import config as config_mod
from duallora.backbones import BackboneInfo, create_backbone
from duallora.config import RunConfig
from duallora.data.datasets import load_dataset
from duallora.data.scenarios import ClassIncrementalScenario
from duallora.errors import CheckpointError, DivergenceError, DualLoRAError
from duallora.metrics import build_matrix, compute_metrics
from duallora.reporting import (
    RunDirectory,
    plot_accuracy_curve,
    plot_accuracy_matrix,
    write_accuracy_matrix_csv,
    write_json_atomic,
    write_text_atomic,
)
from duallora.tensorboard import RunLogger
from duallora.tensorboard import require as require_tensorboard
from duallora.training import ContinualLearner, make_progress, select_device

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
    from duallora.data.transforms import resolve_transform_config

    d = cfg.data
    channels, height, width = info.input_size
    transform = resolve_transform_config(cfg.backbone.name, info.input_size, crop_pct=d.crop_pct,
                                         mean=info.mean, std=info.std)
    kw = dict(root=d.root, image_size=(height, width), channels=channels, seed=cfg.seed, test_fraction=d.test_fraction,
              check_images=d.check_images,
              split_train=d.split_train, split_test=d.split_test, split_sha256=d.split_sha256,
              transform=transform, augment=d.augment)
    train = load_dataset(d.dataset, "train", **kw)
    test = load_dataset(d.dataset, "test", **kw)
    return ClassIncrementalScenario(
        train, test, num_tasks=d.num_tasks, classes_per_task=d.classes_per_task, seed=cfg.seed,
        class_order=list(d.class_order) if d.class_order is not None else None,
        shuffle_classes=d.shuffle_classes, train_per_class=d.train_per_class, test_per_class=d.test_per_class,
    )


def _environment() -> dict[str, str]:
    import timm

    return {"duallora": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


#: Config keys that do not change a run's results; a resumed run may differ in them.
RESUME_IGNORED_KEYS = {("train", "progress"), ("data", "num_workers"), ("train", "threads"),
                       ("data", "check_images"), ("train", "tensorboard")}


def _config_differences(a: RunConfig, b: RunConfig, ignored: set[tuple[str, str]] = RESUME_IGNORED_KEYS) -> list[str]:
    """``section.key: run has B, given A`` for every key (outside ``ignored``) where ``a`` and ``b`` differ."""
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
    def describe(dataset: Any, indices: list[int]) -> dict[str, Any]:
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

    return {
        "scheme": "sha256 over '<path relative to the data folder>\\t<label id>' lines, or over pixels and labels",
        "tasks": [{"index": t, "train": describe(scenario.train, scenario.train_indices(t)),
                   "test": describe(scenario.test, scenario.test_indices(t))}
                  for t in range(scenario.num_tasks)],
    }


def _class_order_record(scenario: ClassIncrementalScenario) -> dict[str, Any]:
    """The ``class_order.json`` content: the scenario's description and its :func:`data_identity`."""
    return {**scenario.to_dict(), "data_identity": data_identity(scenario)}


def _data_changes(stored: dict[str, Any], scenario: ClassIncrementalScenario) -> list[str]:
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
        if output is None:
            raise CheckpointError("--resume needs the run folder: duallora run --resume DIR")
        if Path(output).name.endswith(".partial"):  # the staging folder itself was given
            output = Path(output).with_name(Path(output).name[: -len(".partial")])
        rundir = RunDirectory(Path(output), resume=True)
        stored_path = rundir.path / "config.yaml"
        if not stored_path.is_file():
            raise CheckpointError(f"{rundir.path} has no config.yaml; it was not started by `duallora run`")
        stored = config_mod.load_config(stored_path)
        older = [k for k in config_mod.missing_keys(stored_path) if tuple(k.split(".", 1)) not in RESUME_IGNORED_KEYS]
        if older:
            raise CheckpointError(
                f"{rundir.path} was started by an older version of duallora (its config lacks {', '.join(older)}); "
                "this version cannot continue it exactly: start a new run"
            )
        if cfg is None:
            cfg = stored
        else:
            diff = _config_differences(cfg, stored)
            if diff:
                raise CheckpointError(
                    f"the config given differs from the interrupted run's ({'; '.join(diff)}); "
                    f"resume without --config/overrides to use the run's own config"
                )
    assert cfg is not None
    require_tensorboard(cfg)  # train.tensorboard=true needs the package: say so before any folder is made
    output = Path(output) if output is not None else default_output(cfg)
    model, info = create_backbone(cfg.backbone.name, cfg.backbone.weights)
    scenario = build_scenario(cfg, info)
    # what --overwrite must never delete: the data folder (as configured and as read) and the config file
    keep = [*protect, cfg.data.root, getattr(scenario.train, "source", None), getattr(scenario.test, "source", None)]
    if not resume:
        rundir = (RunDirectory(output, overwrite=overwrite, runs_only=True, protect=keep) if main
                  else _Staging(output))
        distributed.barrier()
    else:
        rundir = RunDirectory(output, resume=True, runs_only=True, protect=keep)
    stage = rundir.path
    hint = (f"the unfinished run stays in {stage}; continue it with `duallora run --resume {output}` "
            "(or start again with --overwrite)")
    echo(f"{cfg.method.name}: {cfg.data.dataset}, {scenario.num_tasks} tasks, "
         f"backbone {info.name} (sha256 {info.sha256[:12]}), seed {cfg.seed}")
    echo(f"class order: {scenario.class_order}")

    rows: list[list[float]] = []
    task_id_rows: list[float] = []
    train_time = 0.0
    eval_time = 0.0
    last_eval_s: Optional[float] = None  # wall time of the latest evaluation (all tasks seen so far)
    last_eval_images: Optional[int] = None  # test images it predicted
    try:  # a Ctrl-C/SIGTERM from here on leaves the staging folder: name it
        done = find_checkpoints(stage / "checkpoints") if resume and (stage / "checkpoints").is_dir() else []
        if done and any((stage / "checkpoints").iterdir()):
            _check_same_data(stage, scenario, output)
            last = done[-1]
            learner = ContinualLearner.load(last, backbone=(model, info))
            learner.cfg = cfg
            learner.progress = make_progress(cfg.train.progress)
            _, meta = ContinualLearner.read_checkpoint(last)
            extra = meta.get("extra", {})
            rows = [list(r) for r in extra.get("accuracy_rows", [])]
            task_id_rows = list(extra.get("task_id_accuracy_rows", []))
            train_time = float(extra.get("train_time_s", 0.0))
            eval_time = float(extra.get("eval_time_s", 0.0))
            last_eval_s = extra.get("last_eval_time_s")
            last_eval_images = extra.get("last_eval_images")
            expected = [list(t.classes) for t in scenario.tasks[: len(learner.task_classes)]]
            if expected != [list(c) for c in learner.task_classes] or len(rows) != len(learner.task_classes):
                raise CheckpointError(f"{last} does not match the scenario rebuilt from the run's config")
            echo(f"resuming after task {len(learner.task_classes)} from {last}")
        else:
            if main:
                write_text_atomic(stage / "config.yaml", config_mod.to_yaml(cfg))
                write_json_atomic(stage / "class_order.json", _class_order_record(scenario))
            learner = ContinualLearner(cfg, num_tasks=scenario.num_tasks, backbone=(model, info))
    except KeyboardInterrupt as exc:
        raise KeyboardInterrupt(f"interrupted; {hint}") from exc
    start_task = len(learner.task_classes)
    test_sizes = [len(scenario.test_dataset(t)) for t in range(scenario.num_tasks)]
    logger = RunLogger.from_config(cfg, stage, start_task=start_task)  # a no-op unless train.tensorboard
    learner.step_callback = logger.step
    try:
        for task in scenario.tasks[start_task:]:
            t = task.index
            record = learner.learn_task(scenario.train_dataset(t), task.classes)
            train_time += record["task_time_s"]
            e0 = time.perf_counter()
            ev = learner.evaluate([scenario.test_dataset(i) for i in range(t + 1)])
            last_eval_s = time.perf_counter() - e0
            last_eval_images = int(sum(ev["total"]))
            eval_time += last_eval_s
            rows.append(ev["accuracy"])
            task_id_rows.append(ev["task_id_accuracy"])
            record["evaluation"] = ev
            if main:
                learner.save(stage / "checkpoints" / f"task_{t + 1}.safetensors",
                             extra={"accuracy_rows": rows, "task_id_accuracy_rows": task_id_rows,
                                    "train_time_s": train_time, "eval_time_s": eval_time,
                                    "last_eval_time_s": last_eval_s, "last_eval_images": last_eval_images})
            logger.task_end(t, ev, rows, task_id_rows, record)
            seen = sum(c for c in ev["correct"]) / max(sum(ev["total"]), 1) * 100
            mem = record.get("memory_size")
            mem_txt = f", memory dims {min(mem.values())}-{max(mem.values())}" if mem else ""
            echo(f"task {t + 1}/{scenario.num_tasks} classes {list(task.classes)}: {record['summary']}, "
                 f"accuracy on seen classes {seen:.2f}%, task-id {ev['task_id_accuracy']:.2f}%{mem_txt} "
                 f"({record['task_time_s']:.1f}s)")
    except KeyboardInterrupt as exc:
        raise KeyboardInterrupt(f"interrupted; {hint}") from exc
    except DualLoRAError as exc:
        if _diverged(exc):
            raise type(exc)(f"{exc}\n{_divergence_hint(cfg, output, stage, command)}") from exc
        raise type(exc)(f"{exc}\n{hint}") from exc
    finally:
        learner.step_callback = None
        logger.close()

    metrics = _run_metrics(cfg, scenario, info, rows, task_id_rows, train_time, eval_time, last_eval_s,
                           last_eval_images)
    metrics.update({
        "wall_time_s": time.perf_counter() - wall_start,
        "resumed_after_task": start_task if resume else None,
        "device": str(learner.device),
        "world_size": distributed.world_size(),
    })
    if not main:
        distributed.barrier()
        return metrics
    _write_outputs(stage, cfg, scenario, metrics, learner.history)
    final = rundir.commit()
    distributed.barrier()
    metrics["output"] = str(final)
    return metrics


def _check_same_data(stage: Path, scenario: ClassIncrementalScenario, output: Path) -> None:
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
    changes = _data_changes(stored, scenario)
    if changes:
        root = stored.get("root") or getattr(scenario.train, "source", None)
        raise CheckpointError(
            f"the data changed since the interrupted run started ({'; '.join(changes)}; data folder {root}): its "
            "accuracy rows would come from different data; restore the data as it was and resume again, or start "
            f"a new run to {output} with --overwrite (which discards {stage})"
        )


def _run_metrics(cfg: RunConfig, scenario: ClassIncrementalScenario, info: BackboneInfo, rows: list[list[float]],
                 task_id_rows: list[float], train_time: float, eval_time: float, last_eval_s: Optional[float],
                 last_eval_images: Optional[int]) -> dict[str, Any]:
    """The ``metrics.json`` content of a run (every key but the per-session ones)."""
    R = build_matrix(rows)
    test_sizes = [len(scenario.test_dataset(t)) for t in range(scenario.num_tasks)]
    data_record = scenario.record()
    metrics: dict[str, Any] = compute_metrics(R, test_sizes, task_id_accuracy=task_id_rows[-1])
    metrics.update({
        "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in R],
        "task_id_accuracy_after_task": task_id_rows,
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
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        # the final task's evaluation (every test image of every task): wall time and per image
        "final_eval_time_s": last_eval_s,
        "inference_ms_per_image": (1000.0 * last_eval_s / last_eval_images
                                   if last_eval_s is not None and last_eval_images else None),
        "environment": _environment(),
    })
    return metrics


def _write_outputs(stage: Path, cfg: RunConfig, scenario: ClassIncrementalScenario, metrics: dict[str, Any],
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


#: DualLoRA method keys that change only how a trained model predicts, when the task posterior is the
#: shared gate's (``gate=shared``, ``task_id_features`` auto/gate): no training step, statistics pass or
#: stored tensor depends on them (the signatures keep means, scatter and subspace bases for every score).
INFERENCE_ONLY_KEYS = {("method", "calibration"), ("method", "confidence_threshold"),
                       ("method", "task_id_score"), ("method", "tau_id")}


def inference_only_change(a: RunConfig, b: RunConfig) -> bool:
    """Whether runs of ``a`` and ``b`` train the same model and differ only in how it predicts.

    True when both are ``duallora`` with the shared gate as task posterior and every key outside
    :data:`INFERENCE_ONLY_KEYS` (and :data:`RESUME_IGNORED_KEYS`) is equal; a run of ``b`` then equals
    the checkpoints of a run of ``a`` evaluated under ``b`` (:func:`derive_run`).
    """
    for cfg in (a, b):
        if cfg.method.name != "duallora" or cfg.method.gate != "shared" or cfg.method.task_id_features == "final":
            return False
    return not _config_differences(a, b, RESUME_IGNORED_KEYS | INFERENCE_ONLY_KEYS)


def derive_run(source: Path, cfg: RunConfig, output: Path, *, overwrite: bool = False,
               echo: Echo = print) -> dict[str, Any]:
    """A run of ``cfg`` made from a finished run of a config that trains the same model.

    Every task checkpoint of ``source`` is loaded with ``cfg`` (an inference-only change, see
    :func:`inference_only_change`) and evaluated as the run would have after that task; the run
    folder written to ``output`` has the same files as :func:`run_experiment`'s except the
    checkpoints (they would equal ``source``'s), and ``metrics.json`` names ``derived_from`` (the
    source folder, relative to ``output``) and ``derived_keys`` (the keys such a change may touch).
    Its ``train_time_s`` is the source's (the same training), its evaluation times are measured.

    Raises:
        CheckpointError: ``source`` is not a finished run, lacks checkpoints, or its config is not an
            inference-only change away from ``cfg``; and as :func:`run_experiment` for ``output``.
    """
    wall_start = time.perf_counter()
    source = Path(source)
    if not (source / "metrics.json").is_file():
        raise CheckpointError(f"{source} is not a finished run (no metrics.json)")
    stored = config_mod.load_config(source / "config.yaml")
    if not inference_only_change(stored, cfg):
        raise CheckpointError(f"{source} trained a different model than the config given; run it instead")
    files = find_checkpoints(source / "checkpoints")
    source_metrics = json.loads((source / "metrics.json").read_text())
    if len(files) != source_metrics["num_tasks"]:
        raise CheckpointError(f"{source} has {len(files)} checkpoints for {source_metrics['num_tasks']} tasks")
    rundir = RunDirectory(Path(output), overwrite=overwrite, runs_only=True, protect=[cfg.data.root, source])
    rows: list[list[float]] = []
    task_id_rows: list[float] = []
    eval_time, last_eval_s, last_eval_images = 0.0, None, None
    learner = scenario = None
    for _, learner, scenario, ev, seconds in _evaluate_each(files, lambda meta: cfg, cfg.train.progress):
        last_eval_s, last_eval_images = seconds, int(sum(ev["total"]))
        eval_time += seconds
        rows.append(ev["accuracy"])
        task_id_rows.append(ev["task_id_accuracy"])
        echo(f"task {len(rows)}/{len(files)}: accuracy per task {[round(a, 2) for a in ev['accuracy']]}, "
             f"task-id {ev['task_id_accuracy']:.2f}%")
    assert scenario is not None and learner is not None
    info = learner.backbone_info
    stage = rundir.path
    write_text_atomic(stage / "config.yaml", config_mod.to_yaml(cfg))
    write_json_atomic(stage / "class_order.json", _class_order_record(scenario))
    metrics = _run_metrics(cfg, scenario, info, rows, task_id_rows, float(source_metrics["train_time_s"]),
                           eval_time, last_eval_s, last_eval_images)
    metrics.update({"wall_time_s": time.perf_counter() - wall_start, "resumed_after_task": None,
                    "device": str(learner.device), "world_size": 1,
                    "derived_from": os.path.relpath(source, Path(output)), "derived_keys": sorted(f"{a}.{b}" for a, b in INFERENCE_ONLY_KEYS)})
    _write_outputs(stage, cfg, scenario, metrics, learner.history)
    metrics["output"] = str(rundir.commit())
    return metrics


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
        raise CheckpointError(f"no task_K.safetensors checkpoints in {str(folder)!r}; pass a run folder made by `duallora run`")
    return [p for _, p in found]


def _evaluate_each(files: list[Path], config_of: Callable[[dict[str, Any]], RunConfig], progress: bool):
    """Load every checkpoint with ``config_of(its metadata)`` and evaluate it on the test data of its
    tasks. Yields ``(file, learner, scenario, evaluation, seconds of the evaluation)``.

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
            raise CheckpointError(f"{f.name}: the rebuilt class order differs from the checkpoint's; was the data changed?")
        t0 = time.perf_counter()
        ev = learner.evaluate([scenario.test_dataset(i) for i in range(k)])
        yield f, learner, scenario, ev, time.perf_counter() - t0


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
    derived = Path(path) / "metrics.json"
    if derived.is_file() and not (Path(path) / "checkpoints").is_dir():
        source = json.loads(derived.read_text()).get("derived_from")
        if source:
            raise CheckpointError(f"{path} was derived from the checkpoints of {Path(path) / source} (an inference-only "
                                  "change, see docs/compare.md) and has none of its own; evaluate that run, or "
                                  "derive again with duallora compare")
    files = find_checkpoints(Path(path))
    rows: list[list[float]] = []
    task_ids: list[float] = []
    scenario = None

    def stored_config(meta: dict[str, Any]) -> RunConfig:
        stored = meta["config"]
        stored["train"]["progress"] = progress
        if data_root is not None:
            stored["data"]["root"] = data_root
        for dotted, value in (overrides or {}).items():
            section, key = dotted.split(".", 1)
            stored[section][key] = value
        return config_mod.from_dict(stored)

    for f, _, scenario, ev, _ in _evaluate_each(files, stored_config, progress):
        rows.append(ev["accuracy"])
        task_ids.append(ev["task_id_accuracy"])
        echo(f"{f.name}: accuracy per task {[round(a, 2) for a in ev['accuracy']]}, task-id {ev['task_id_accuracy']:.2f}%")
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
    out["matches_stored_record"] = bool(stored_rows) and np.allclose(rows[-1], stored_rows[-1])
    # the run's metrics.json, when there is one: the whole re-evaluated matrix against the stored one
    run_metrics = files[-1].parent.parent / "metrics.json"
    out["max_difference_to_metrics_json"] = None
    if run_metrics.is_file():
        try:
            stored_matrix = json.loads(run_metrics.read_text())["accuracy_matrix"]
            S = np.array([[np.nan if v is None else v for v in row] for row in stored_matrix], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{run_metrics} is not a run's metrics file ({exc})") from exc
        if S.shape == R.shape and np.array_equal(np.isnan(S), np.isnan(R)):
            out["max_difference_to_metrics_json"] = float(np.nanmax(np.abs(S - R)))
        else:
            out["max_difference_to_metrics_json"] = float("inf")
    out["accuracy_matrix"] = [[None if np.isnan(v) else float(v) for v in row] for row in R]
    out["task_id_accuracy_after_task"] = task_ids
    out["checkpoints"] = [str(f) for f in files]
    return out
