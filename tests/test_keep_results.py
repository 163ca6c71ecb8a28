"""scripts/keep_results.py: the small results of a compare folder, without checkpoints."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.scripts import load_script as load_scripts_module


def load_script():
    return load_scripts_module("keep_results")


def test_keeps_summaries_and_finished_runs_metrics_and_config_only(tmp_path):
    src, dst = tmp_path / "cmp", tmp_path / "kept"
    done = src / "runs" / "fecam" / "seed-0"
    (done / "checkpoints").mkdir(parents=True)
    (done / "checkpoints" / "task-1.safetensors").write_bytes(b"x" * 100)
    for name in ("metrics.json", "config.yaml", "accuracy_matrix.csv", "history.json"):
        (done / name).write_text(name)
    unfinished = src / "runs" / "fecam" / "seed-1.partial"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("partial")
    (src / "summary.md").write_text("table")
    (dst).mkdir()
    (dst / "notes.txt").write_text("mine")  # not created by the script: must survive

    assert load_script().main([str(src), str(dst)]) == 0
    kept = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert kept == ["notes.txt", "runs/fecam/seed-0/accuracy_matrix.csv", "runs/fecam/seed-0/config.yaml",
                    "runs/fecam/seed-0/metrics.json", "summary.md"]
    assert (dst / "runs/fecam/seed-0/metrics.json").read_text() == "metrics.json"


def test_refuses_a_folder_without_runs(tmp_path, capsys):
    assert load_script().main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no runs/ folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_kept_runs_under_docs_results_are_not_git_ignored():
    """The kept runs must be committable: a `runs/` pattern in .gitignore once hid them (and lost them)."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    kept = "docs/results/compare-default/runs/duallora/seed-0/metrics.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", kept], cwd=root).returncode
    assert ignored == 1, f"{kept} is git-ignored: keep_results' output would never be committed"
    assert subprocess.run(["git", "check-ignore", "-q", "runs/x/metrics.json"], cwd=root).returncode == 0
