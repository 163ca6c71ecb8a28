"""The model directory's format: its files, records, version numbers and lock (format 1).

The layout and its guarantees are described in :mod:`duallora.model_dir` and docs/model-directory.md;
this module holds what :mod:`duallora.model_dir`, :mod:`duallora.model_learning` and
:mod:`duallora.folder_evaluation` share, so that none of them imports another in a cycle.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from duallora.errors import CheckpointError

FORMAT = "duallora-model"
#: The layout version this code writes and reads; a directory of a later version is refused.
FORMAT_VERSION = 1
MODEL_FILE = "model.json"
VERSIONS = "versions"
CHECKPOINT = "model.safetensors"
RECORD = "version.json"
EVALUATIONS = "evaluations.json"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"




# ------------------------------------------------------------------------------------------ records


@dataclass
class VersionInfo:
    """One version of a model: the model after its task.

    Attributes:
        number: the version, from 1.
        parent: the version it was learned from (None for the first).
        task: how many tasks the model knows at this version (the new task's number, from 1).
        classes_added: names of the classes this version learned.
        images: training images of the new task.
        created: ISO time (UTC) the version was committed.
        learn_time_s: wall time of the learn (process work after the command started), seconds.
        data_sha256: hash of the task folder (:meth:`duallora.task_folder.TaskFolder.sha256`).
        accuracy: accuracy (percent) of the latest evaluation of this version, or None.
        current: whether it is the current version.
        record: the whole ``version.json``.
    """

    number: int
    parent: Optional[int]
    task: int
    classes_added: list[str]
    images: int
    created: str
    learn_time_s: Optional[float]
    data_sha256: Optional[str]
    accuracy: Optional[float] = None
    current: bool = False
    record: dict[str, Any] = field(default_factory=dict)


def version_dir(root: Path, number: int) -> Path:
    return root / VERSIONS / f"{number:04d}"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {what} {str(path)!r} ({type(exc).__name__}: {exc}); "
                              "the model directory is damaged") from exc


def read_model_file(root: Path) -> dict[str, Any]:
    """``model.json`` of a model directory, checked.

    Raises:
        CheckpointError: not a model directory (no ``model.json``), unreadable, or of another format
            or of a later format version than this duallora reads (upgrade duallora).
    """
    path = Path(root) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(root)!r} is not a duallora model directory (no {MODEL_FILE}); create one with "
                              f"`duallora learn {root} FOLDER`")
    data = _read_json(path, "model file")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a duallora model file (format {data.get('format')!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{root} was written by a newer duallora (model format {version}; this duallora "
                              f"reads up to {FORMAT_VERSION}); upgrade duallora (pip install -U duallora)")
    return data


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``model.json``."""
    return (Path(path) / MODEL_FILE).is_file()


def version_record(root: Path, number: int) -> dict[str, Any]:
    """``version.json`` of version ``number``, with its ``evaluations`` (list) added."""
    folder = version_dir(root, number)
    record = _read_json(folder / RECORD, "version record")
    evals = folder / EVALUATIONS
    record["evaluations"] = _read_json(evals, "evaluation record") if evals.is_file() else []
    return record


def version_info(record: dict[str, Any], current: Optional[int]) -> VersionInfo:
    evals = record.get("evaluations") or []
    return VersionInfo(number=int(record["version"]), parent=record.get("parent"), task=int(record["task"]),
                       classes_added=list(record["classes_added"]), images=int(record["train_images"]),
                       created=str(record.get("created", "")), learn_time_s=record.get("learn_time_s"),
                       data_sha256=record.get("data_sha256"),
                       accuracy=evals[-1]["accuracy"] if evals else None,
                       current=int(record["version"]) == current, record=record)


# ------------------------------------------------------------------------------------------ locking


@contextmanager
def locked(root: Path, what: str) -> Iterator[None]:
    """Hold the model directory's lock (``flock`` on ``root/.lock``) while inside.

    Raises:
        CheckpointError: another process (a learn or rollback) holds it.
    """
    import fcntl

    fd = os.open(Path(root) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise CheckpointError(
                f"another duallora process is changing the model in {root} right now (a learn or rollback); "
                f"wait for it to finish, then run {what} again") from exc
        yield
    finally:
        os.close(fd)  # releases the lock


def next_version_number(root: Path, data: Optional[dict[str, Any]]) -> int:
    """One more than the highest committed version (numbers of pruned versions may come back)."""
    return max((int(v) for v in (data or {}).get("versions", [])), default=0) + 1


def now_iso() -> str:
    """The current UTC time as ISO 8601, seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def elapsed(start: float) -> float:
    """Seconds since ``start`` (``time.perf_counter``), rounded to ms."""
    return round(time.perf_counter() - start, 3)
