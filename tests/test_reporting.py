"""Tests of atomic writes, the CSV/plots, RunDirectory and the terminal table."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from duallora import reporting
from duallora.errors import CheckpointError
from duallora.reporting import (
    RunDirectory,
    format_metrics_table,
    plot_accuracy_curve,
    plot_accuracy_matrix,
    to_jsonable,
    write_accuracy_matrix_csv,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

NAN = float("nan")
R3 = np.array([[90.0, NAN, NAN], [95.0, 70.0, NAN], [80.0, 60.0, 85.5]])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- atomic writes


def test_write_text_atomic_content_and_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "a.txt"  # parent is created
    write_text_atomic(target, "hello\nwörld\n")
    assert target.read_text(encoding="utf-8") == "hello\nwörld\n"
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_write_bytes_atomic(tmp_path):
    target = tmp_path / "b.bin"
    out = write_bytes_atomic(target, b"\x00\x01\x02")
    assert out == target
    assert target.read_bytes() == b"\x00\x01\x02"
    assert os.listdir(tmp_path) == ["b.bin"]
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        write_text_atomic(target, b"not text")  # type: ignore[arg-type]


def test_failed_replace_keeps_old_content_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "c.txt"
    write_text_atomic(target, "old")

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(reporting.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["c.txt"]


def test_write_json_nan_to_null_and_numpy(tmp_path):
    target = tmp_path / "m.json"
    obj = {
        "a": NAN,
        "b": np.float32(1.5),
        "c": np.array([[1.0, np.nan], [np.inf, 2.0]]),
        "d": [np.int64(3), (np.float64(np.nan), True)],
        "e": None,
        1: "int key",
        "path": tmp_path / "x",
    }
    write_json_atomic(target, obj)
    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.endswith("\n")
    assert '\n  "a": null' in text  # indent 2
    loaded = json.loads(text)
    assert loaded == {
        "a": None,
        "b": 1.5,
        "c": [[1.0, None], [None, 2.0]],
        "d": [3, [None, True]],
        "e": None,
        "1": "int key",
        "path": str(tmp_path / "x"),
    }
    assert type(loaded["d"][0]) is int
    assert os.listdir(tmp_path) == ["m.json"]


def test_write_json_unserialisable_leaves_target(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_to_jsonable_scalars():
    assert to_jsonable(np.bool_(True)) is True
    assert to_jsonable(float("-inf")) is None
    assert to_jsonable(np.float64(2.25)) == 2.25


# ---------------------------------------------------------------- CSV


def test_accuracy_matrix_csv_exact(tmp_path):
    target = tmp_path / "acc.csv"
    write_accuracy_matrix_csv(target, R3)
    assert target.read_text() == (
        "after_task,task_1,task_2,task_3\n"
        "1,90.0,,\n"
        "2,95.0,70.0,\n"
        "3,80.0,60.0,85.5\n"
    )
    assert os.listdir(tmp_path) == ["acc.csv"]


def test_accuracy_matrix_csv_names_and_precision(tmp_path):
    target = tmp_path / "acc.csv"
    write_accuracy_matrix_csv(target, [[100 / 3, NAN], [50.0, 12.5]], task_names=["digits 0-4", "a,b"])
    assert target.read_text() == (
        'after_task,digits 0-4,"a,b"\n'
        "1,33.333333333333336,\n"
        "2,50.0,12.5\n"
    )
    with pytest.raises(ValueError):
        write_accuracy_matrix_csv(target, R3, task_names=["x"])
    with pytest.raises(ValueError):
        write_accuracy_matrix_csv(target, np.zeros((2, 3)))


# ---------------------------------------------------------------- plots


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_plot_accuracy_matrix(tmp_path):
    target = tmp_path / "m" / "matrix.png"
    out = plot_accuracy_matrix(target, R3, "accuracy matrix")
    assert out == target
    _assert_png(target)


def test_plot_accuracy_matrix_single_and_many_tasks(tmp_path):
    plot_accuracy_matrix(tmp_path / "one" / "m.png", [[42.0]], "one task")
    _assert_png(tmp_path / "one" / "m.png")
    rng = np.random.default_rng(0)
    R = np.tril(rng.uniform(0, 100, size=(20, 20))) + np.triu(np.full((20, 20), np.nan), 1)
    plot_accuracy_matrix(tmp_path / "many" / "m.png", R, "20 tasks")
    _assert_png(tmp_path / "many" / "m.png")


def test_plot_accuracy_curve(tmp_path):
    target = tmp_path / "curve.png"
    plot_accuracy_curve(
        target,
        {"duallora": [90.0, 86.7, 80.0], "frozen": [88.0, 75.0, 70.0], "short": [50.0]},
        "accuracy after each task",
    )
    _assert_png(target)
    with pytest.raises(ValueError):
        plot_accuracy_curve(tmp_path / "x.png", {}, "empty")
    with pytest.raises(ValueError):
        plot_accuracy_curve(tmp_path / "x.png", {"a": []}, "empty curve")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- RunDirectory


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_run_directory_fresh(tmp_path):
    final = tmp_path / "runs" / "r1"
    run = RunDirectory(final)
    assert run.path == tmp_path / "runs" / "r1.partial"
    assert run.path.is_dir() and not final.exists()
    write_text_atomic(run.path / "metrics.json", "{}")
    assert run.commit() == final
    assert run.committed
    assert _files(final) == {"metrics.json": "{}"}
    assert sorted(p.name for p in final.parent.iterdir()) == ["r1"]
    with pytest.raises(CheckpointError):
        run.commit()


def test_existing_nonempty_without_overwrite_raises_untouched(tmp_path):
    final = tmp_path / "r"
    final.mkdir()
    (final / "old.txt").write_text("earlier run")
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        RunDirectory(final)
    assert _files(final) == {"old.txt": "earlier run"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_existing_empty_dir_is_fine(tmp_path):
    final = tmp_path / "r"
    final.mkdir()
    run = RunDirectory(final)
    (run.path / "a.txt").write_text("a")
    run.commit()
    assert _files(final) == {"a.txt": "a"}


def test_existing_file_raises(tmp_path):
    final = tmp_path / "r"
    final.write_text("x")
    with pytest.raises(CheckpointError):
        RunDirectory(final, overwrite=True)
    assert final.read_text() == "x"


def test_commit_with_overwrite_replaces_contents(tmp_path):
    final = tmp_path / "r"
    final.mkdir()
    (final / "old.txt").write_text("earlier run")
    (final / "sub").mkdir()
    (final / "sub" / "deep.txt").write_text("deep")
    run = RunDirectory(final, overwrite=True)
    assert _files(final) == {"old.txt": "earlier run", "sub/deep.txt": "deep"}  # untouched until commit
    write_text_atomic(run.path / "new.txt", "new run")
    run.commit()
    assert _files(final) == {"new.txt": "new run"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no .partial, no .old-<pid>


def test_failure_before_commit_keeps_old_final(tmp_path):
    final = tmp_path / "r"
    final.mkdir()
    (final / "old.txt").write_text("earlier run")

    def failing_run():
        run = RunDirectory(final, overwrite=True)
        write_text_atomic(run.path / "half.txt", "partial output")
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError):
        failing_run()
    assert _files(final) == {"old.txt": "earlier run"}
    assert _files(tmp_path / "r.partial") == {"half.txt": "partial output"}  # left for inspection

    # the next run removes the stale staging folder and starts clean
    run = RunDirectory(final, overwrite=True)
    assert list(run.path.iterdir()) == []
    assert _files(final) == {"old.txt": "earlier run"}


def test_commit_restores_old_when_publish_fails(tmp_path, monkeypatch):
    final = tmp_path / "r"
    final.mkdir()
    (final / "old.txt").write_text("earlier run")
    run = RunDirectory(final, overwrite=True)
    (run.path / "new.txt").write_text("new")
    real_replace = os.replace

    def flaky(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(reporting.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        run.commit()
    monkeypatch.undo()
    assert _files(final) == {"old.txt": "earlier run"}
    assert _files(run.path) == {"new.txt": "new"}
    assert not run.committed


def test_commit_refuses_if_final_appeared(tmp_path):
    final = tmp_path / "r"
    run = RunDirectory(final)
    final.mkdir()
    (final / "other.txt").write_text("someone else")
    with pytest.raises(CheckpointError):
        run.commit()
    assert _files(final) == {"other.txt": "someone else"}


def test_bad_final_name(tmp_path):
    with pytest.raises(CheckpointError):
        RunDirectory(".")


# ---------------------------------------------------------------- table


def test_format_metrics_table():
    table = format_metrics_table(
        {
            "final_accuracy": 80.0,
            "forgetting": None,
            "backward_transfer": -10.0 / 3,
            "accuracy_after_task": [90.0, 80.0],
            "task_id_accuracy": np.float64(97.5),
        }
    )
    lines = table.splitlines()
    assert lines == [
        "metric             value",
        "-----------------  -----",
        "final_accuracy     80.00",
        "forgetting           n/a",
        "backward_transfer  -3.33",
        "task_id_accuracy   97.50",
    ]
    assert not table.endswith("\n")


def test_unfinished_run_is_not_silently_discarded(tmp_path):
    final = tmp_path / "r"
    first = RunDirectory(final)
    write_text_atomic(first.path / "checkpoints" / "task_1.txt", "progress")
    # a second run to the same output (interrupted first run, or one still running) is refused
    with pytest.raises(CheckpointError, match="--resume"):
        RunDirectory(final)
    assert _files(first.path / "checkpoints") == {"task_1.txt": "progress"}
    first.release()  # the first run's process ends (it holds the folder's lock while it runs)
    with pytest.raises(CheckpointError, match="--resume"):
        RunDirectory(final)  # an interrupted run is still refused
    # resuming reopens it as it is; --overwrite discards it
    resumed = RunDirectory(final, resume=True)
    assert resumed.path == first.path
    resumed.release()
    assert list(RunDirectory(final, overwrite=True).path.iterdir()) == []
