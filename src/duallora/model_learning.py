"""One ``duallora learn``: check a folder, learn it as the next task, commit the new version atomically.

:func:`learn_version` is the body of :meth:`duallora.model_dir.ContinualModel.learn`, which holds the
model directory's lock around it. Steps: the config (new model, or the stored one with changeable keys),
the backbone, every check of the folder (and of ``--eval FOLDER``) before any training, the learner
(new, or the current version's checkpoint), ``learn_task``, an optional evaluation, then the version's
files in a staging folder, renamed to ``versions/NNNN``, and ``model.json`` replaced: the commit point.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from duallora.errors import DataError

Echo = Callable[[str], None]


def learn_version(model: Any, folder: Path, *, eval_folder: Optional[str | Path] = None,
                  convert_channels: bool = False, echo: Echo = print) -> Any:
    """Learn ``folder`` as the next task of ``model`` (a :class:`~duallora.model_dir.ContinualModel`) and
    commit it as a new version; the caller holds the lock. See :meth:`ContinualModel.learn`.

    Returns:
        the new version's :class:`~duallora.model_dir.VersionInfo`.
    """
    from duallora import __version__
    from duallora import config as config_mod
    from duallora.backbones import create_backbone
    from duallora.methods import get_method
    from duallora.model_format import (
        CHECKPOINT,
        EVALUATIONS,
        FORMAT,
        FORMAT_VERSION,
        MODEL_FILE,
        RECORD,
        STAGING_PREFIX,
        VERSIONS,
        elapsed,
        next_version_number,
        now_iso,
        version_dir,
        version_info,
    )
    from duallora.reporting import fsync_dir, write_json_atomic
    from duallora.task_folder import check_channels, check_files, dataset_of, scan_task_folder
    from duallora.training import ContinualLearner, make_progress

    start = time.perf_counter()
    cfg, data = model.config_for_learn()
    method_cls = get_method(cfg.method.name)
    parent_record = model.record() if data is not None else None
    known = [dict(c) for c in parent_record["classes"]] if parent_record else []
    known_names = {c["name"] for c in known}

    # every check before anything is built or trained
    task_folder = scan_task_folder(folder, min_images=method_cls.min_images_per_class(cfg.method))
    fewest = method_cls.min_classes_per_task(cfg.method)
    if len(task_folder.classes) < fewest:
        held = _count(len(task_folder.classes), "class")
        raise DataError(f"{folder} holds {held}, but method {cfg.method.name!r} learns at "
                        f"least {fewest} classes per task (one softmax head per task: a head of one class gets no "
                        "training signal and its class would never be predicted); put at least two new classes in "
                        "the folder, or use a model whose method handles it (duallora, fecam, simplecil, ranpac, "
                        "ncm-gate, or method.task_posterior=gate)")
    again = [c for c in task_folder.classes if c in known_names]
    if again:
        raise DataError(f"the model in {model.root} already knows class(es) {', '.join(map(repr, again))} "
                        f"(version {data['current']}); a class is learned once: rename the folder(s) if they are "
                        "new classes, or leave them out")
    eval_tf = None
    if eval_folder is not None:
        try:
            eval_tf = scan_task_folder(eval_folder)
        except DataError as exc:
            raise DataError(f"--eval {eval_folder}: {exc}") from exc
        unknown = sorted(set(eval_tf.classes) - known_names - set(task_folder.classes))
        if unknown:
            raise DataError(f"--eval {eval_folder}: class(es) {', '.join(map(repr, unknown))} are neither known to "
                            "the model nor in the folder being learned; evaluate on known classes only")
    backbone, info = create_backbone(cfg.backbone.name, cfg.backbone.weights)
    check_files(task_folder, cfg.data.check_images)
    check_channels(task_folder, int(info.input_size[0]), convert=convert_channels)
    if eval_tf is not None:
        check_files(eval_tf, cfg.data.check_images)
        check_channels(eval_tf, int(info.input_size[0]), convert=convert_channels)

    if data is None:
        learner = ContinualLearner(cfg, num_tasks=cfg.data.num_tasks, backbone=(backbone, info))
    else:
        learner = ContinualLearner.load(model.checkpoint(), backbone=(backbone, info), cfg=cfg)
        learner.progress = make_progress(cfg.train.progress)
    task = len(learner.task_classes) + 1
    ids = list(range(len(known), len(known) + len(task_folder.classes)))
    dataset = dataset_of(task_folder, ids, info.input_size)
    digest = task_folder.sha256()
    if task_folder.skipped:
        from duallora.data.base import IMAGE_EXTENSIONS

        echo(f"note: {task_folder.skipped} file(s) in {folder} are not images of an accepted type "
             f"({' '.join(IMAGE_EXTENSIONS)}) and were left out")
    where = f"the model in {model.root}" if data is not None else f"a new {cfg.method.name} model in {model.root}"
    echo(f"learning task {task}: {_count(len(task_folder.classes), 'class')}, {task_folder.num_images} images "
         f"from {folder} into {where}")
    record = learner.learn_task(dataset, ids)
    classes = known + [{"id": i, "name": n, "task": task, "train_images": len(f)}
                       for i, n, f in zip(ids, task_folder.classes, task_folder.files)]
    number = next_version_number(model.root, data)
    version = {
        "version": number,
        "parent": data["current"] if data is not None else None,
        "task": task,
        "classes_added": list(task_folder.classes),
        "classes": classes,
        "train_images": task_folder.num_images,
        "data_sha256": digest,
        "source_folder": str(Path(folder).resolve()),  # provenance only: never read again
        "training": {k: record.get(k) for k in ("epochs", "steps", "batch_size", "epoch_loss", "warnings",
                                                "summary", "trained", "train_time_s", "task_time_s")},
        "config": config_mod.to_dict(cfg),
        "duallora_version": __version__,
    }
    evaluation = None
    if eval_tf is not None:
        from duallora.folder_evaluation import evaluate_folder, evaluation_summary
        from duallora.predict import Predictor

        names = {c["id"]: c["name"] for c in classes}
        evaluation = evaluate_folder(Predictor(learner, Path(CHECKPOINT), names), version, eval_folder,
                                     convert_channels=convert_channels)
        evaluation["version"] = number
        version["evaluations"] = [evaluation_summary(evaluation)]
    staging = model.root / VERSIONS / f"{STAGING_PREFIX}{os.getpid()}"
    final = version_dir(model.root, number)
    committed = False
    try:
        staging.mkdir(parents=True)
        learner.save(staging / CHECKPOINT, extra={"model_version": number})
        version["created"] = now_iso()
        version["learn_time_s"] = elapsed(start)
        write_json_atomic(staging / RECORD, version)
        if evaluation is not None:
            write_json_atomic(staging / EVALUATIONS, version["evaluations"])
        os.replace(staging, final)
        fsync_dir(final.parent)
        model_file = dict(data) if data is not None else {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created": version["created"],
            "backbone": cfg.backbone.name, "method": cfg.method.name, "versions": []}
        model_file["versions"] = [int(v) for v in model_file["versions"]] + [number]
        model_file["last_version"] = max(number, int(model_file.get("last_version", 0)))
        model_file["current"] = number
        write_json_atomic(model.root / MODEL_FILE, model_file)  # the commit point
        committed = True
    except BaseException:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)  # renamed but never committed: ours, never listed
        raise
    version.setdefault("evaluations", [])
    info_ = version_info(version, number)
    echo(f"version {number} of {model.root}: task {task}, classes {', '.join(task_folder.classes)}; "
         f"{record['summary']} ({version['learn_time_s']:.1f}s)"
         + (f"; accuracy on {eval_folder}: {evaluation['accuracy']:.2f}%" if evaluation is not None else ""))
    return info_


def _count(n: int, word: str) -> str:
    """``"1 class"``, ``"2 classes"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"
