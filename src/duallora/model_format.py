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
#: Files a version folder holds (and the temporary names :func:`~duallora.reporting.write_bytes_atomic` uses).
VERSION_FILES = frozenset({CHECKPOINT, RECORD, EVALUATIONS})


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
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a duallora model file (format {found!r})")
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{root} was written by a newer duallora (model format {version}; this duallora "
                              f"reads up to {FORMAT_VERSION}); upgrade duallora to the release or checkout that "
                              "wrote it")
    versions = data.get("versions")
    current = data.get("current")
    ok = (isinstance(version, int) and not isinstance(version, bool) and version >= 1
          and isinstance(versions, list) and versions
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in versions)
          and isinstance(current, int) and current in versions)
    if not ok:
        raise CheckpointError(f"{path} is damaged (format_version {version!r}, versions {versions!r}, current "
                              f"{current!r}: expected a format version 1..{FORMAT_VERSION}, a non-empty list of "
                              "version numbers and the current one among them); restore it from a backup or "
                              "`duallora history --json` of a copy")
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
    """A number no version of this directory ever had: one more than every committed version, the highest
    ever given (``model.json``'s ``last_version``, kept after a prune) and every numbered folder on disk
    (a version folder an interrupted learn renamed but never committed)."""
    numbers = [int(v) for v in (data or {}).get("versions", [])] + [int((data or {}).get("last_version", 0))]
    folder = Path(root) / VERSIONS
    if folder.is_dir():
        numbers += [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    return max(numbers, default=0) + 1


def _ours(path: Path, names: frozenset[str]) -> bool:
    """Whether ``path`` is one of ``names`` or an atomic write's temporary file of one (``.NAME.*.tmp``)."""
    n = path.name
    return n in names or any(n.startswith(f".{x}.") and n.endswith(".tmp") for x in names)


def leftovers_only(root: Path) -> bool:
    """Whether a folder without ``model.json`` holds nothing but what an interrupted *first* learn leaves:
    the lock file, a temporary ``model.json``, and under ``versions/`` staging folders and version folders
    holding only version files. Such a folder is taken as a new model (the next learn cleans it)."""
    for p in Path(root).iterdir():
        if p.name == LOCK or (_ours(p, frozenset({MODEL_FILE})) and p.is_file()):
            continue
        if p.name != VERSIONS or not p.is_dir() or p.is_symlink():
            return False
        for v in p.iterdir():
            if v.is_symlink() or not v.is_dir():
                return False
            if not v.name.startswith(STAGING_PREFIX) and not (v.name.isdigit() and len(v.name) == 4):
                return False
            if not all(_ours(f, VERSION_FILES) and f.is_file() for f in v.iterdir()):
                return False
    return True


def remove_leftovers(root: Path) -> list[str]:
    """Remove what an interrupted learn left (called under the lock); returns what was removed.

    Always: staging folders ``versions/.staging-*`` and temporary ``model.json`` files, both duallora's own.
    Version folders ``versions/NNNN`` only when there is no ``model.json`` yet (an interrupted first learn:
    nothing was ever committed, :func:`leftovers_only` checked that they hold only version files); with a
    ``model.json``, an unlisted version folder is never deleted (its number is skipped instead).
    """
    import shutil

    removed: list[str] = []
    root = Path(root)
    first = not (root / MODEL_FILE).is_file()
    for p in root.iterdir():
        if p.name != MODEL_FILE and _ours(p, frozenset({MODEL_FILE})) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    folder = root / VERSIONS
    if folder.is_dir():
        for v in folder.iterdir():
            if v.is_symlink() or not v.is_dir():
                continue
            if v.name.startswith(STAGING_PREFIX) or (first and v.name.isdigit() and leftovers_only(root)):
                shutil.rmtree(v, ignore_errors=True)
                removed.append(f"{VERSIONS}/{v.name}")
    return removed


def now_iso() -> str:
    """The current UTC time as ISO 8601, seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def elapsed(start: float) -> float:
    """Seconds since ``start`` (``time.perf_counter``), rounded to ms."""
    return round(time.perf_counter() - start, 3)
