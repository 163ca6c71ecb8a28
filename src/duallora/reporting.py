"""Run outputs: atomic file writes, the accuracy-matrix CSV, plots, the run folder and a terminal table.

Every file is written through a temporary file in the same directory, flushed and fsynced, then
renamed over the target with :func:`os.replace`, so a killed process never leaves a half-written
file: a reader sees either the old content or the new one. A whole run is staged in a
``<output>.partial`` folder and published by :meth:`RunDirectory.commit` (see there).

Plots use matplotlib's Agg canvas directly (no pyplot, no display, no global state).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from duallora.errors import CheckpointError

__all__ = [
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "to_jsonable",
    "write_accuracy_matrix_csv",
    "plot_accuracy_matrix",
    "plot_accuracy_curve",
    "new_figure",
    "save_png",
    "RunDirectory",
    "RUN_OUTPUTS",
    "check_replaceable",
    "format_metrics_table",
]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(directory: PathLike) -> None:
    """fsync ``directory`` so that a rename inside it is durable (no-op where folders cannot be opened)."""
    _fsync_dir(Path(directory))


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory (created if missing), which is flushed,
    fsynced and then renamed over ``path`` with :func:`os.replace`. If anything fails, the temporary
    file is removed and an existing ``path`` keeps its old content. The new file gets mode 0644.

    Args:
        path: target file.
        data: the complete new content.

    Returns:
        ``Path(path)``.

    Raises:
        TypeError: ``data`` is not bytes-like.
        OSError: the directory cannot be created or written.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes_atomic needs bytes, got {type(data).__name__}")
    target = Path(path)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return target


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes_atomic`."""
    if not isinstance(text, str):
        raise TypeError(f"write_text_atomic needs str, got {type(text).__name__}")
    return write_bytes_atomic(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively into plain JSON types.

    * float NaN and +-inf (Python or numpy) become ``None`` (JSON ``null``);
    * numpy scalars become Python scalars, numpy arrays become (nested) lists;
    * tuples become lists; mapping keys become strings (numpy/int keys via ``str``);
    * :class:`os.PathLike` values become strings.

    Other objects are returned unchanged (``json`` then rejects unknown types with TypeError).
    """
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, type(None))):  # bool is an int
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, np.generic):
                k = k.item()
            out[k if isinstance(k, str) else str(k)] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2, trailing newline) to ``path`` atomically.

    ``obj`` is first passed through :func:`to_jsonable` (NaN -> ``null``, numpy -> Python), and is
    serialised completely before anything touches the disk.

    Raises:
        TypeError: ``obj`` holds a value JSON cannot represent (the target is left untouched).
        OSError: see :func:`write_bytes_atomic`.
    """
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text)


# --------------------------------------------------------------------------------------------------
# accuracy matrix CSV
# --------------------------------------------------------------------------------------------------


def _as_square(R) -> np.ndarray:
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square with shape (T, T), T >= 1; got shape {arr.shape}")
    return arr


def _format_cell(v: float) -> str:
    """NaN -> empty cell; otherwise the shortest text that reads back to the same float."""
    return "" if math.isnan(v) else repr(float(v))


def write_accuracy_matrix_csv(path: PathLike, R, task_names: Optional[Sequence[str]] = None) -> Path:
    """Write the accuracy matrix as CSV, atomically.

    Layout (``T`` tasks)::

        after_task,task_1,...,task_T
        1,R[0,0],,...
        2,R[1,0],R[1,1],,...

    Row ``t`` (1-based in the file) holds the accuracies in percent after learning task ``t``; column
    ``task_i`` the accuracy on task ``i``. NaN (tasks not yet learned) is an empty cell; other values
    are written with full precision (shortest round-trip float text, e.g. ``90.0``). Lines end in
    ``\\n``.

    Args:
        path: target ``.csv`` file.
        R: array-like ``(T, T)``.
        task_names: optional ``T`` column names replacing ``task_1..task_T``.

    Raises:
        ValueError: ``R`` not square 2-D, or ``task_names`` of the wrong length.
    """
    arr = _as_square(R)
    T = arr.shape[0]
    if task_names is None:
        names = [f"task_{i + 1}" for i in range(T)]
    else:
        names = [str(n) for n in task_names]
        if len(names) != T:
            raise ValueError(f"task_names has {len(names)} entries but the accuracy matrix has {T} tasks")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["after_task", *names])
    for t in range(T):
        writer.writerow([str(t + 1), *(_format_cell(v) for v in arr[t])])
    return write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches at 110 dpi on its own Agg canvas.

    No pyplot and no global state (nothing else keeps a reference to it). Save it with
    :func:`save_png`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: PathLike) -> Path:
    """Render ``fig`` (from :func:`new_figure`) as PNG (tight bounding box) and write it to ``path``
    atomically (:func:`write_bytes_atomic`); returns ``Path(path)``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_bytes_atomic(path, buf.getvalue())


def plot_accuracy_matrix(path: PathLike, R, title: str) -> Path:
    """Save the accuracy matrix as an annotated heatmap PNG, atomically.

    Only the diagonal and lower triangle are drawn (the upper triangle is blank); each drawn cell
    shows its value with one decimal. x axis: evaluated task (1..T); y axis: after task (1..T, top to
    bottom); colour scale fixed to 0..100 % with a colorbar.

    Args:
        path: target ``.png`` file.
        R: array-like ``(T, T)`` of accuracies in percent.
        title: figure title.

    Raises:
        ValueError: ``R`` not square 2-D.
    """
    arr = _as_square(R)
    T = arr.shape[0]
    lower = np.tril(np.ones((T, T), dtype=bool))
    masked = np.ma.array(arr, mask=~lower | np.isnan(arr))
    size = min(3.0 + 0.55 * T, 16.0)
    fig = new_figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=100.0, interpolation="nearest")
    fontsize = max(4.0, min(10.0, 90.0 / T))
    for t in range(T):
        for i in range(t + 1):
            v = arr[t, i]
            if math.isnan(v):
                continue
            color = "black" if v >= 60.0 else "white"
            ax.text(i, t, f"{v:.1f}", ha="center", va="center", color=color, fontsize=fontsize)
    ticks = np.arange(T)
    labels = [str(k + 1) for k in range(T)]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after task")
    ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("accuracy (%)")
    return save_png(fig, path)


def plot_accuracy_curve(
    path: PathLike,
    curves: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str = "accuracy (%)",
) -> Path:
    """Save a line plot of accuracy after each task (one or several labelled curves) as PNG, atomically.

    Curve ``label -> [a_1, ..., a_T]`` is drawn at x = 1..T with markers; curves may differ in length.
    The plot has a legend, a grid and integer x ticks.

    Args:
        path: target ``.png`` file.
        curves: mapping from label to the values after tasks 1..T (NaN leaves a gap).
        title: figure title.
        ylabel: y-axis label.

    Raises:
        ValueError: no curves, or a curve is empty.
    """
    from matplotlib.ticker import MaxNLocator

    if not curves:
        raise ValueError("plot_accuracy_curve needs at least one curve")
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, values in curves.items():
        ys = np.asarray(list(values), dtype=np.float64)
        if ys.ndim != 1 or ys.size == 0:
            raise ValueError(f"curve {label!r} must be a non-empty list of numbers")
        xs = np.arange(1, ys.size + 1)
        ax.plot(xs, ys, marker="o", label=str(label))
    ax.set_xlabel("after task")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.4)
    ax.legend()
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------------
# run directory
# --------------------------------------------------------------------------------------------------

#: What a run folder may hold: the files ``duallora run`` writes (README, "What a run writes") and its
#: ``checkpoints/`` folder. ``--overwrite`` replaces or discards only folders holding nothing else.
RUN_OUTPUTS = frozenset({
    "config.yaml", "class_order.json", "metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png",
    "accuracy_curve.png", "history.json", "checkpoints",
})
#: A finished (or derived) run folder has ``config.yaml`` and at least one of these.
RUN_MARKERS = ("metrics.json", "class_order.json")
_CHECKPOINT_FILE = re.compile(r"task_\d+\.safetensors$")
#: ``train.tensorboard=true`` writes event files into ``tensorboard/``.
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.[^/]+$")
_SHOWN = 5  # unexpected entries named in a refusal


def _is_temp_of(name: str, allowed: Callable[[str], bool]) -> bool:
    """Whether ``name`` is a temporary file of :func:`write_bytes_atomic` for an allowed target name."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    stem = name[1:-4].rsplit(".", 1)[0]  # ".<target>.<random>.tmp" -> "<target>"
    return allowed(stem)


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` (and of its ``checkpoints/``) that a run does not write, sorted."""
    def top(name: str) -> bool:
        return name in RUN_OUTPUTS

    def ckpt(name: str) -> bool:
        return bool(_CHECKPOINT_FILE.fullmatch(name))

    out: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name == "checkpoints" and entry.is_dir() and not entry.is_symlink():
            for sub in sorted(entry.iterdir(), key=lambda p: p.name):
                ok = (ckpt(sub.name) and sub.is_file() and not sub.is_symlink()) or _is_temp_of(sub.name, ckpt)
                if not ok:
                    out.append(f"checkpoints/{sub.name}" + ("/" if sub.is_dir() else ""))
        elif name == "tensorboard" and entry.is_dir() and not entry.is_symlink():
            for sub in sorted(entry.iterdir(), key=lambda p: p.name):
                if not (_EVENT_FILE.fullmatch(sub.name) and sub.is_file() and not sub.is_symlink()):
                    out.append(f"tensorboard/{sub.name}" + ("/" if sub.is_dir() else ""))
        elif not ((top(name) and entry.is_file() and not entry.is_symlink()) or _is_temp_of(name, top)):
            out.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return out


def _within(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both resolved, symlinks followed)."""
    try:
        a, b = Path(inner).expanduser().resolve(), Path(outer).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return a == b or b in a.parents


def check_replaceable(folder: PathLike, *, staging: bool = False, protect: Sequence[Optional[PathLike]] = (),
                      option: str = "--overwrite") -> None:
    """Refuse to let ``--overwrite`` delete a folder that is not a duallora run's.

    A folder may be replaced (or, as a staging folder, discarded) only when everything it holds is a
    known run output (:data:`RUN_OUTPUTS`, ``checkpoints/task_K.safetensors`` and the temporary files
    of atomic writes), when a finished run folder (``staging=False``) also has ``config.yaml`` and
    one of :data:`RUN_MARKERS`, and when no path in ``protect`` (the data folder, the config file
    read) is the folder or lies inside it. A missing or empty folder is always replaceable.

    Args:
        folder: the run folder, or its ``<run>.partial`` staging folder with ``staging=True``.
        staging: check it as a staging folder (an interrupted run may not have written
            ``config.yaml`` yet, so no marker file is required).
        protect: paths that must survive (None entries are skipped).
        option: the option named in the message.

    Raises:
        CheckpointError: the folder holds a protected path, unexpected entries (a few are named), or
            lacks a run's files; nothing is deleted.
    """
    folder = Path(folder)
    what = "staging folder of an unfinished run" if staging else "output folder"
    for p in protect:
        if p is not None and _within(Path(p), folder):
            raise CheckpointError(
                f"{option} would delete {what} {folder}, but it holds {p}, which this run reads; "
                "move it out of that folder or choose another --output"
            )
    if folder.is_symlink() or not folder.is_dir() or not any(folder.iterdir()):
        return
    foreign = _foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        raise CheckpointError(
            f"{option} refuses to delete {what} {folder}: it is not a duallora run folder "
            f"(it holds {shown}; a run writes only {', '.join(sorted(RUN_OUTPUTS))}); "
            "choose another --output, or move those entries away (or delete the folder yourself)"
        )
    if not staging and not ((folder / "config.yaml").is_file() and any((folder / m).is_file() for m in RUN_MARKERS)):
        held = ", ".join(sorted(p.name for p in folder.iterdir()))
        raise CheckpointError(
            f"{option} refuses to delete {what} {folder}: it is not a finished duallora run folder "
            f"(it holds {held} but lacks config.yaml with metrics.json or class_order.json); "
            "choose another --output, or delete the folder yourself"
        )


def _remove(path: Path) -> None:
    """Remove a file, symlink or directory tree at ``path`` (nothing if absent)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class _FolderLock:
    """An exclusive ``flock`` on a folder (its open descriptor), held until :meth:`close` or exit."""

    def __init__(self, fd: Optional[int]) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __del__(self) -> None:
        self.close()


def _lock_folder(path: Path, final: Path) -> _FolderLock:
    """Lock the staging folder ``path`` of the run ``final`` for this process.

    The lock follows the folder through the rename to ``final`` and ends with the process, so a
    crash never leaves it behind and no lock file is written.

    Raises:
        CheckpointError: another process (a second ``--resume``, a run still going) holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        return _FolderLock(None)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise CheckpointError(
            f"another duallora process is running the run in {path} right now; wait for it to finish "
            f"(or stop it), then `duallora run --resume {final}` if it was interrupted") from exc
    return _FolderLock(fd)


class RunDirectory:
    """One run = one output folder, published only when the run succeeded.

    Everything of the run is written into the staging folder :attr:`path` = ``<final>.partial``
    (created fresh and exclusively; an unfinished one left by an interrupted run is refused unless
    ``overwrite``, which discards it; ``resume`` reopens it). :meth:`commit` then publishes it
    under ``final`` with renames inside the same parent directory.

    Guarantees:

    * a run that crashes or is killed before :meth:`commit` leaves ``<final>.partial`` for inspection
      and ``final`` (an earlier run's outputs) untouched;
    * without ``overwrite`` an existing non-empty ``final`` is never replaced;
    * with ``overwrite``, ``final`` is replaced only at :meth:`commit`: the old folder is renamed to
      ``<final>.old-<pid>``, the staging folder is renamed to ``final``, then the old one is deleted.
      Only a kill in the instant between the two renames can leave ``final`` missing, and then the
      earlier outputs are still in ``<final>.old-<pid>``.

    Two runs must not share one ``final`` at the same time.

    With ``runs_only`` (what ``duallora run`` and ``duallora compare`` use), ``overwrite`` replaces
    or discards only folders that :func:`check_replaceable` accepts: a duallora run folder (or
    staging folder) holding nothing but a run's outputs and none of the ``protect`` paths; that is
    checked here, before the run starts, and again at :meth:`commit`.

    Args:
        final: the output folder the run publishes to.
        overwrite: allow replacing an existing non-empty ``final`` at commit (and discarding a
            leftover ``<final>.partial`` now).
        resume: reopen the staging folder of an interrupted run instead of starting a fresh one.
        runs_only: with ``overwrite``, refuse to replace or discard a folder that is not a run's.
        protect: paths (the data folder, the config file read) that no replaced or discarded folder
            may hold; None entries are skipped.

    Raises:
        CheckpointError: ``final`` exists and is not a directory, or exists and is non-empty while
            ``overwrite`` is False; with ``runs_only``, ``final`` or a leftover staging folder that
            ``overwrite`` would delete is not a run's or holds a protected path.
    """

    def __init__(self, final: PathLike, *, overwrite: bool = False, resume: bool = False, runs_only: bool = False,
                 protect: Sequence[Optional[PathLike]] = ()) -> None:
        self.final = Path(final)
        if self.final.name in ("", ".", ".."):
            raise CheckpointError(f"output {str(final)!r} must name a folder, e.g. runs/my-run")
        self.overwrite = bool(overwrite)
        self.runs_only = bool(runs_only)
        self.protect = tuple(p for p in protect if p is not None)
        self.path = self.final.with_name(self.final.name + ".partial")
        self._committed = False
        self._resumed = bool(resume)
        if resume:
            # continue an interrupted run: keep its staging folder as it is
            if not self.path.is_dir():
                if self.final.is_dir() and (self.final / "metrics.json").is_file():
                    raise CheckpointError(f"run {self.final} already finished; there is nothing to resume")
                raise CheckpointError(
                    f"no interrupted run to resume at {self.final} (looked for {self.path}); "
                    "start it with `duallora run --output DIR`"
                )
            self.overwrite = True  # the interrupted run was allowed to start, so it may publish
            self._check_final()
            self._lock = _lock_folder(self.path, self.final)
            return
        self._check_final()
        if self.path.exists():
            if self.path.is_dir() and not self.path.is_symlink():
                _lock_folder(self.path, self.final).close()  # refuse while another process runs it
            if not self.overwrite:
                raise CheckpointError(
                    f"an unfinished run is in {self.path} (interrupted, or still running); continue it with "
                    f"`duallora run --resume {self.final}`, or pass --overwrite to discard it and start over"
                )
            if self.runs_only:
                if self.path.is_symlink() or not self.path.is_dir():
                    raise CheckpointError(
                        f"--overwrite refuses to delete {self.path}: it is a symlink or not a folder, so not the "
                        "staging folder of an unfinished run; remove it yourself or choose another --output")
                check_replaceable(self.path, staging=True, protect=self.protect)
            _remove(self.path)
        try:
            self.path.mkdir(parents=True)  # exclusive: a second run started at the same time fails here
        except FileExistsError as exc:
            raise CheckpointError(f"another run is writing {self.path}; choose another --output") from exc
        self._lock = _lock_folder(self.path, self.final)

    def _check_final(self) -> None:
        final = self.final
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise CheckpointError(
                f"output {final} exists and is a symlink or not a directory; choose another --output"
            )
        if not self.overwrite and final.is_dir() and any(final.iterdir()):
            raise CheckpointError(
                f"output directory {final} already exists; choose another --output or pass --overwrite"
            )
        if self.runs_only and final.is_dir():
            # a resumed run publishes over the folder as its first start was allowed to (--overwrite)
            check_replaceable(final, protect=self.protect, option="--resume" if self._resumed else "--overwrite")

    def release(self) -> None:
        """Release this process's lock on the run folder (at the end of the run, or after a failure)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()

    @property
    def committed(self) -> bool:
        """True once :meth:`commit` has published the run."""
        return self._committed

    def commit(self) -> Path:
        """Publish the staging folder as ``final`` and return ``final``.

        If ``final`` exists (empty, or non-empty with ``overwrite``) it is renamed to
        ``<final>.old-<pid>``, the staging folder is renamed to ``final`` and the old folder is then
        deleted. If the second rename fails, the old folder is moved back.

        Raises:
            CheckpointError: already committed, the staging folder has vanished, or ``final`` became
                non-empty (or a non-directory) since the constructor and ``overwrite`` is False (with
                ``runs_only``: or it is no longer a run folder, see :func:`check_replaceable`).
            OSError: a rename failed (``final`` is restored where possible).
        """
        if self._committed:
            raise CheckpointError(f"run directory {self.final} was already committed")
        if not self.path.is_dir():
            raise CheckpointError(f"staging folder {self.path} is missing; the run's outputs are lost")
        self._check_final()
        old: Optional[Path] = None
        if self.final.exists():
            old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(self.final, old)
        try:
            os.replace(self.path, self.final)
        except BaseException:
            if old is not None and not self.final.exists():
                os.replace(old, self.final)
            raise
        _fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        self.release()
        return self.final

    def __repr__(self) -> str:
        return f"RunDirectory(final={str(self.final)!r}, overwrite={self.overwrite}, committed={self._committed})"


# --------------------------------------------------------------------------------------------------
# terminal table
# --------------------------------------------------------------------------------------------------


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Format the scalar metrics as a small plain-text table for the terminal.

    Only entries whose value is a number or ``None`` are shown (lists such as
    ``accuracy_after_task`` are skipped), in the mapping's order. Numbers are printed with two
    decimals, ``None`` (and NaN) as ``n/a``. Example::

        metric                        value
        ---------------------------- ------
        final_accuracy                80.00
        forgetting                      n/a

    Returns:
        the table without a trailing newline.
    """
    rows: list[tuple[str, str]] = []
    for name, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is None:
            text = "n/a"
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
        else:
            continue
        rows.append((str(name), text))
    name_w = max([len("metric")] + [len(n) for n, _ in rows])
    val_w = max([len("value")] + [len(v) for _, v in rows])
    lines = [f"{'metric':<{name_w}}  {'value':>{val_w}}", f"{'-' * name_w}  {'-' * val_w}"]
    lines += [f"{n:<{name_w}}  {v:>{val_w}}" for n, v in rows]
    return "\n".join(lines)
