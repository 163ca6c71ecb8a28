"""Evaluate a model version on a labelled folder of known classes (``duallora evaluate MODEL_DIR FOLDER``).

The folder holds one subfolder per class, named as the class was named when it was learned
(:mod:`duallora.task_folder`); every image is predicted among all classes the version knows, without
its task. Reported: accuracy over the images, accuracy per class and per task (the task in which the
class was learned, numbered from 1), task-identity accuracy, and the confusion matrix over the known
classes (rows: true class, columns: predicted class, image counts), written as JSON and PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from duallora.errors import CheckpointError, DataError


def evaluate_folder(predictor: Any, record: dict[str, Any], folder: str | Path,
                    batch_size: Optional[int] = None, convert_channels: bool = False) -> dict[str, Any]:
    """Predict every image of ``folder`` with ``predictor`` and score it against its class folder.

    Args:
        predictor: a :class:`~duallora.predict.Predictor` of the version.
        record: the version's record (``classes``: ``[{"id", "name", "task"}]``).
        folder: one subfolder per class, every class known to the version.
        convert_channels: accept images whose channels differ from the backbone's (converted when read),
            as ``learn --convert-channels``; otherwise they are refused (:func:`~duallora.task_folder.check_channels`).

    Returns:
        ``folder``, ``images``, ``accuracy`` (percent of images), ``per_class_accuracy``
        (``{name: percent}``), ``per_class_images``, ``per_task_accuracy`` (``{task: percent}`` over the
        tasks with images), ``task_id_accuracy`` (percent), ``confusion_matrix``
        (``{"classes": names in id order, "counts": [[int]] }``).

    Raises:
        DataError: a class folder whose name the version does not know (named, with the known ones),
            or an image that cannot be read.
    """
    from duallora.task_folder import check_channels, scan_task_folder

    tf = scan_task_folder(folder)
    check_channels(tf, int(predictor.learner.backbone_info.input_size[0]), convert=convert_channels)
    by_name = {c["name"]: c for c in record["classes"]}
    unknown = [c for c in tf.classes if c not in by_name]
    if unknown:
        known = ", ".join(sorted(by_name))
        raise DataError(f"{folder}: class folder(s) {', '.join(map(repr, unknown))} are not classes of this model "
                        f"version (it knows: {known}); evaluate on known classes only, named as when they were learned")
    ids = [int(by_name[c]["id"]) for c in tf.classes]
    files, labels = tf.items(ids)
    result = predictor.predict_files(files, top_k=1, batch_size=batch_size)
    if result.errors:
        path, message = result.errors[0]
        raise DataError(f"cannot read {path} ({message}); replace or remove the file "
                        f"({len(result.errors)} unreadable in all)")
    order = sorted(int(c["id"]) for c in record["classes"])
    position = {cid: i for i, cid in enumerate(order)}
    task_of = {int(c["id"]): int(c["task"]) for c in record["classes"]}
    name_of = {int(c["id"]): str(c["name"]) for c in record["classes"]}
    counts = [[0] * len(order) for _ in order]
    per_class: dict[str, list[int]] = {}
    per_task: dict[int, list[int]] = {}
    task_hits = 0
    for pred, label in zip(result.predictions, labels):
        hit = int(pred.class_id == label)
        counts[position[label]][position[pred.class_id]] += 1
        per_class.setdefault(name_of[label], [0, 0])
        per_class[name_of[label]][0] += hit
        per_class[name_of[label]][1] += 1
        per_task.setdefault(task_of[label], [0, 0])
        per_task[task_of[label]][0] += hit
        per_task[task_of[label]][1] += 1
        task_hits += int(pred.task == task_of[label])
    n = len(labels)
    return {
        "folder": str(Path(folder)),
        "images": n,
        "accuracy": 100.0 * sum(h for h, _ in per_class.values()) / max(n, 1),
        "per_class_accuracy": {c: 100.0 * h / t for c, (h, t) in per_class.items()},
        "per_class_images": {c: t for c, (_, t) in per_class.items()},
        "per_task_accuracy": {str(k): 100.0 * h / t for k, (h, t) in sorted(per_task.items())},
        "task_id_accuracy": 100.0 * task_hits / max(n, 1),
        "confusion_matrix": {"classes": [name_of[c] for c in order], "counts": counts},
    }


def evaluation_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What a version's ``evaluations.json`` keeps of an evaluation: everything but the confusion matrix."""
    from duallora.model_format import now_iso

    keep = {k: v for k, v in result.items() if k != "confusion_matrix"}
    keep.setdefault("evaluated", now_iso())
    return keep


def record_evaluation(version_folder: Path, result: dict[str, Any]) -> None:
    """Append an evaluation's summary to ``version_folder/evaluations.json`` (atomically)."""
    import json

    from duallora.model_format import EVALUATIONS
    from duallora.reporting import write_json_atomic

    path = Path(version_folder) / EVALUATIONS
    records = json.loads(path.read_text()) if path.is_file() else []
    write_json_atomic(path, records + [evaluation_summary(result)])


def write_evaluation(output: Path, result: dict[str, Any]) -> Path:
    """Write ``evaluation.json`` and ``confusion_matrix.png`` into ``output`` (a new or empty folder).

    Raises:
        CheckpointError: ``output`` exists and is not an empty folder (nothing is overwritten).
    """
    from duallora.reporting import new_figure, save_png, write_json_atomic

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"--output {output} exists and is not an empty folder; give a new folder "
                              "(nothing was overwritten)")
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "evaluation.json", result)
    names = result["confusion_matrix"]["classes"]
    counts = result["confusion_matrix"]["counts"]
    size = max(4.0, 0.35 * len(names) + 2.0)
    fig = new_figure(size, size)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"version {result.get('version', '?')}: accuracy {result['accuracy']:.2f}% "
                 f"({result['images']} images)")
    if len(names) <= 30:
        for i, row in enumerate(counts):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
    save_png(fig, output / "confusion_matrix.png")
    return output
