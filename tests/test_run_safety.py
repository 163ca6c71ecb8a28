"""What `--overwrite` may delete, the way out of a diverged run, resuming on changed data, and SIGTERM.

The runs here learn a tiny image folder (4 classes of 8x8 PNGs, 2 tasks) on the shipped backbone.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from duallora.backbones import SHIPPED_WEIGHTS
from duallora.cli import app
from duallora.errors import CheckpointError, TrainingError
from duallora.reporting import RunDirectory, check_replaceable, write_text_atomic

needs_backbone = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped backbone weights missing")

RUN_OPTIONS = ["data.dataset=imagefolder", "data.num_tasks=2", "train.epochs=1", "train.progress=false",
               "train.batch_size=4", "train.threads=1"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def make_images(root: Path, classes: int = 4, train: int = 3, test: int = 2) -> Path:
    """root/{train,test}/c<k>/<i>.png: 8x8 grayscale noise around a class-dependent level."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(rng.normal(60 * c, 20, (8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(a, "L").save(d / f"{i}.png")
    return root


def tiny(root: Path) -> list[str]:
    return [f"data.root={root}", *RUN_OPTIONS]


def fake_run_folder(folder: Path) -> Path:
    """A folder with a finished run's marker files (and a checkpoint and a temp file of an atomic write)."""
    (folder / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.json", "class_order.json", "history.json"):
        (folder / name).write_text("{}")
    (folder / "checkpoints" / "task_1.safetensors").write_bytes(b"x")
    (folder / "checkpoints" / ".task_2.safetensors.ab12_x.tmp").write_bytes(b"half")
    return folder


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ --overwrite: RunDirectory


def test_overwrite_refuses_a_folder_of_unrelated_files(tmp_path):
    final = tmp_path / "mine"
    final.mkdir()
    for name in ("notes.txt", "thesis.tex", "b.csv", "c.csv", "d.csv", "e.csv", "f.csv"):
        (final / name).write_text(name)
    (final / "photos").mkdir()
    (final / "photos" / "cat.jpg").write_bytes(b"jpg")
    before = tree(final)
    with pytest.raises(CheckpointError) as err:
        RunDirectory(final, overwrite=True, runs_only=True)
    text = str(err.value)
    assert f"--overwrite refuses to delete output folder {final}: it is not a duallora run folder" in text
    assert "it holds b.csv, c.csv, d.csv, e.csv, f.csv and 3 more" in text
    assert tree(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder either


def test_overwrite_refuses_run_files_with_a_foreign_entry_or_without_markers(tmp_path):
    run = fake_run_folder(tmp_path / "r")
    (run / "checkpoints" / "my_model.pt").write_bytes(b"mine")
    with pytest.raises(CheckpointError, match=r"it holds checkpoints/my_model\.pt;"):
        RunDirectory(run, overwrite=True, runs_only=True)
    assert (run / "checkpoints" / "my_model.pt").read_bytes() == b"mine"
    only_history = tmp_path / "h"
    only_history.mkdir()
    (only_history / "history.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a finished duallora run folder .*holds history.json but lacks"):
        RunDirectory(only_history, overwrite=True, runs_only=True)
    assert (only_history / "history.json").read_text() == "[]"


def test_overwrite_refuses_a_folder_that_holds_a_protected_path(tmp_path, monkeypatch):
    run = fake_run_folder(tmp_path / "r")
    data = run / "data"
    data.mkdir()
    (data / "img.png").write_bytes(b"png")
    with pytest.raises(CheckpointError) as err:
        RunDirectory(run, overwrite=True, runs_only=True, protect=[None, data])
    assert f"would delete output folder {run}, but it holds {data}, which this run reads" in str(err.value)
    assert (data / "img.png").read_bytes() == b"png"
    # a protected path given relative to the working directory, or the folder itself, counts the same
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="which this run reads"):
        check_replaceable(run, protect=["r/data"])
    with pytest.raises(CheckpointError, match="which this run reads"):
        check_replaceable(run, protect=[run])


def test_overwrite_still_replaces_a_run_folder_and_discards_a_run_staging_folder(tmp_path):
    run = fake_run_folder(tmp_path / "r")
    staging = tmp_path / "r.partial"
    (staging / "checkpoints").mkdir(parents=True)
    (staging / "config.yaml").write_text("old")
    (staging / ".class_order.json.xyz.tmp").write_text("half")
    (staging / "checkpoints" / "task_1.safetensors").write_bytes(b"x")
    rd = RunDirectory(run, overwrite=True, runs_only=True, protect=[tmp_path / "elsewhere"])
    assert list(rd.path.iterdir()) == []  # the old staging folder was discarded
    write_text_atomic(rd.path / "metrics.json", "new")
    rd.commit()
    assert tree(run) == {"metrics.json": b"new"}


def test_overwrite_refuses_a_staging_folder_that_is_not_a_runs(tmp_path):
    final = tmp_path / "r"
    staging = tmp_path / "r.partial"
    staging.mkdir()
    (staging / "config.yaml").write_text("cfg")
    (staging / "dataset").mkdir()
    (staging / "dataset" / "a.png").write_bytes(b"png")
    with pytest.raises(CheckpointError) as err:
        RunDirectory(final, overwrite=True, runs_only=True)
    assert f"refuses to delete staging folder of an unfinished run {staging}" in str(err.value)
    assert "it holds dataset/;" in str(err.value)
    assert tree(staging) == {"config.yaml": b"cfg", "dataset/a.png": b"png"}
    # and one that holds the config file this run read
    (staging / "dataset" / "a.png").unlink()
    (staging / "dataset").rmdir()
    with pytest.raises(CheckpointError, match=f"but it holds {staging / 'config.yaml'}, which this run reads"):
        RunDirectory(final, overwrite=True, runs_only=True, protect=[staging / "config.yaml"])
    assert tree(staging) == {"config.yaml": b"cfg"}


def test_commit_and_resume_check_the_folder_they_would_replace(tmp_path):
    final = tmp_path / "r"
    rd = RunDirectory(final, overwrite=True, runs_only=True)
    final.mkdir()
    (final / "report.docx").write_bytes(b"doc")  # appeared while the run trained
    with pytest.raises(CheckpointError, match="refuses to delete output folder"):
        rd.commit()
    assert tree(final) == {"report.docx": b"doc"}
    # a resumed run publishes over its output too: refused before it continues
    with pytest.raises(CheckpointError, match=r"--resume refuses to delete output folder .*report\.docx"):
        RunDirectory(final, resume=True, runs_only=True)
    assert tree(final) == {"report.docx": b"doc"}


# ------------------------------------------------------------------ --overwrite: the commands


@needs_backbone
def test_run_overwrite_refuses_unrelated_files_the_data_and_the_config(tmp_path):
    from duallora import config as config_mod

    images = make_images(tmp_path / "img")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = invoke("run", "-o", str(mine), "--overwrite", *tiny(images))
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: --overwrite refuses to delete output folder {mine}: it is not a duallora "
                               "run folder (it holds notes.txt;")
    assert tree(mine) == {"notes.txt": b"keep me"} and not Path(f"{mine}.partial").exists()

    # the data root inside a folder that looks like a run: refused, nothing trained or written
    run = fake_run_folder(tmp_path / "run")
    data = make_images(run / "data")
    before = tree(run)
    r = invoke("run", "-o", str(run), "--overwrite", *tiny(data))
    assert r.exit_code == 2, r.output
    assert f"but it holds {data}, which this run reads" in r.output and "task 1/2" not in r.output
    assert tree(run) == before and not Path(f"{run}.partial").exists()

    # re-running a run's own config.yaml over that run
    run2 = fake_run_folder(tmp_path / "run2")
    (run2 / "config.yaml").write_text(config_mod.to_yaml(config_mod.load_config(None, tiny(images))))
    r = invoke("run", "--config", str(run2 / "config.yaml"), "-o", str(run2), "--overwrite")
    assert r.exit_code == 2, r.output
    assert f"but it holds {run2 / 'config.yaml'}, which this run reads" in r.output

    # the data root inside a leftover staging folder
    staging = tmp_path / "out.partial"
    data2 = make_images(staging / "data")
    r = invoke("run", "-o", str(tmp_path / "out"), "--overwrite", *tiny(data2))
    assert r.exit_code == 2, r.output
    assert f"would delete staging folder of an unfinished run {staging}, but it holds {data2}" in r.output
    assert (data2 / "test" / "c0" / "0.png").is_file()


@needs_backbone
def test_compare_overwrite_goes_through_the_same_guard(tmp_path):
    images = make_images(tmp_path / "img")
    out = tmp_path / "cmp"
    folder = out / "runs" / "frozen" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    r = invoke("compare", "--methods", "frozen", "-o", str(out), "--overwrite", *tiny(images))
    assert r.exit_code == 1, r.output
    assert f"refuses to delete output folder {folder}: it is not a duallora run folder (it holds notes.txt;" in r.output
    assert tree(folder) == {"notes.txt": b"keep me"}


# ------------------------------------------------------------------ divergence


def test_divergence_is_recognised_by_its_type():
    from duallora.errors import DivergenceError
    from duallora.runner import _diverged

    assert _diverged(DivergenceError("the task statistics are not finite: training diverged; lower train.lr"))
    assert issubclass(DivergenceError, TrainingError)  # callers catching TrainingError still catch it
    assert not _diverged(TrainingError("train.device=cuda but no CUDA GPU is available"))
    assert not _diverged(TrainingError("the loss became nan"))  # the type decides, not the wording
    assert not _diverged(CheckpointError("statistics are not finite"))


def test_divergence_hint_without_the_command_copies_the_config_out_first(tmp_path):
    from duallora.config import load_config
    from duallora.runner import _divergence_hint

    cfg = load_config(None, ["train.lr=0.0001"])
    hint = _divergence_hint(cfg, tmp_path / "run", tmp_path / "run.partial", None)
    assert "--resume" not in hint
    assert (f"`cp {tmp_path}/run.partial/config.yaml {tmp_path}/run.config.yaml && duallora run --config "
            f"{tmp_path}/run.config.yaml -o {tmp_path}/run --overwrite train.lr=1e-05`") in hint


@needs_backbone
def test_diverged_run_shows_a_new_run_with_overwrite_that_works(tmp_path):
    images = make_images(tmp_path / "img")
    out = tmp_path / "run"
    # adapters in every block (not only the last, DualLoRA's default): lr 1e9 then blows up the features
    every_block = ["method.protect_gate=false", "method.gate_layer=1"]
    r = invoke("run", "-o", str(out), *tiny(images), *every_block, "train.lr=1e9")
    assert r.exit_code == 2, r.output
    assert "--resume" not in r.output
    assert "training diverged at train.lr=1e+09: resuming would repeat it" in r.output
    assert f"--overwrite (which discards the unfinished run in {out}.partial)" in r.output
    command = r.output.split("`")[1]
    assert command == "duallora run " + shlex.join(["-o", str(out), "--overwrite", *tiny(images), *every_block,
                                                    "train.lr=0.0005"])
    assert Path(f"{out}.partial").is_dir()
    r = invoke(*shlex.split(command)[1:])  # the command shown, as given
    assert r.exit_code == 0, r.output
    assert (out / "metrics.json").is_file() and not Path(f"{out}.partial").exists()


# ------------------------------------------------------------------ resume on changed data


def test_data_changes_are_counted_and_hashed_per_task_and_split():
    import torch

    from duallora.data.datasets import TensorImageDataset
    from duallora.data.scenarios import ClassIncrementalScenario
    from duallora.runner import data_changes, data_identity

    def scenario(drop_test: int = 0, relabel: bool = False):
        ys = torch.arange(4).repeat_interleave(3)
        train = TensorImageDataset(torch.zeros(12, 1, 4, 4, dtype=torch.uint8), ys, list("abcd"))
        yt = torch.arange(4).repeat_interleave(2)[drop_test:]
        if relabel:
            yt = yt.flip(0)
        test = TensorImageDataset(torch.zeros(len(yt), 1, 4, 4, dtype=torch.uint8), yt, list("abcd"))
        return ClassIncrementalScenario(train, test, num_tasks=2, shuffle_classes=False)

    s = scenario()
    stored = {**s.to_dict(), "data_identity": data_identity(s)}
    assert stored["data_identity"]["tasks"][0]["test"]["count"] == 4
    assert data_changes(stored, scenario()) == []
    assert data_changes(stored, scenario(drop_test=1)) == ["task 1 test images: 4 when the run started, 3 now"]
    assert data_changes(stored, scenario(relabel=True)) == [
        "task 1 test images: 4 as before, but other files or labels",
        "task 2 test images: 4 as before, but other files or labels"]
    older = s.to_dict()  # a run started before the identity was recorded: its counts are compared
    assert data_changes(older, scenario(drop_test=1)) == ["task 1 test images: 4 when the run started, 3 now"]
    assert data_changes(older, scenario()) == []


@needs_backbone
def test_resume_refuses_changed_data_and_continues_unchanged_data(tmp_path, monkeypatch):
    from duallora.training import ContinualLearner

    images = make_images(tmp_path / "img")
    real = ContinualLearner.learn_task
    calls = {"n": 0}

    def interrupted_in_task_2(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ContinualLearner, "learn_task", interrupted_in_task_2)
    out = tmp_path / "run"
    r = invoke("run", "-o", str(out), *tiny(images))
    assert r.exit_code == 130, r.output
    monkeypatch.setattr(ContinualLearner, "learn_task", real)
    order = json.loads((Path(f"{out}.partial") / "class_order.json").read_text())
    first, second = order["tasks"][0]["class_names"][0], order["tasks"][1]["class_names"][0]

    # a test image of task 1 deleted
    victim = images / "test" / first / "0.png"
    kept = victim.read_bytes()
    victim.unlink()
    r = invoke("run", "--resume", str(out))
    assert r.exit_code == 2, r.output
    assert "error: the data changed since the interrupted run started (task 1 test images: 4 when the run " \
           f"started, 3 now; data folder {images})" in r.output
    assert "restore the data as it was and resume again" in r.output
    victim.write_bytes(kept)

    # a training image of task 2 renamed: the same count, other files
    moved = images / "train" / second / "0.png"
    moved.rename(moved.with_name("9.png"))
    r = invoke("run", "--resume", str(out))
    assert r.exit_code == 2, r.output
    assert "(task 2 train images: 6 as before, but other files or labels;" in r.output
    moved.with_name("9.png").rename(moved)

    # the data as it was: the run continues
    r = invoke("run", "--resume", str(out))
    assert r.exit_code == 0, r.output
    assert "resuming after task 1" in r.output
    assert json.loads((out / "metrics.json").read_text())["resumed_after_task"] == 1


# ------------------------------------------------------------------ SIGTERM / SIGINT


def _signal_when(args: list[str], marker: Path, sig: int) -> subprocess.CompletedProcess:
    """Start ``python -m duallora ARGS``, send ``sig`` once ``marker`` exists, return its outcome."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "duallora", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended before it could be signalled:\n{out}\n{err}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{marker} never appeared")
        time.sleep(0.05)
    time.sleep(0.3)  # in the middle of training
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@needs_backbone
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_signalled_run_names_the_resume_command(tmp_path, sig, code, word):
    images = make_images(tmp_path / "img")
    out = tmp_path / "run"
    # many epochs: the run is still training when the signal comes
    args = ["run", "-o", str(out), *tiny(images), "train.epochs=300"]
    done = _signal_when(args, Path(f"{out}.partial") / "config.yaml", sig)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {word}; the unfinished run stays in {out}.partial; continue it with "
        f"`duallora run --resume {out}` (or start again with --overwrite)")
    assert Path(f"{out}.partial").is_dir() and not out.exists()


@needs_backbone
def test_terminated_compare_names_the_same_command(tmp_path):
    images = make_images(tmp_path / "img")
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "frozen", "-o", str(out), *tiny(images), "train.epochs=300"]
    done = _signal_when(args, out / "runs" / "frozen" / "seed-0.partial" / "config.yaml", signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    again = "duallora compare " + shlex.join([*tiny(images), "train.epochs=300", "--output", str(out),
                                              "--methods", "frozen"])
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: terminated by SIGTERM; finished runs are kept in {out}; the same command continues with the "
        f"unfinished ones: `{again}`")


def test_divergence_hint_lowers_the_head_rate_too_and_keeps_other_arguments(tmp_path):
    from duallora.config import load_config
    from duallora.runner import _divergence_hint

    cfg = load_config(None, ["train.lr=0.01", "train.head_lr=0.1"])
    hint = _divergence_hint(cfg, tmp_path / "r", tmp_path / "r.partial",
                            ["--config", "my preset.yaml", "train.lr=0.01", "train.head_lr=0.1", "seed=3"])
    assert hint.endswith(f"`duallora run -o {tmp_path}/r --overwrite --config 'my preset.yaml' seed=3 "
                         "train.lr=0.0005 train.head_lr=0.0005`")


def test_run_state_round_trips_through_checkpoint_metadata():
    from duallora.runner import RunState

    state = RunState()
    state.train_time += 1.5
    state.add_evaluation({"accuracy": [90.0], "task_id_accuracy": 100.0, "total": [4]}, 0.25)
    state.add_evaluation({"accuracy": [80.0, 70.0], "task_id_accuracy": 75.0, "total": [4, 3]}, 0.5)
    extra = json.loads(json.dumps(state.checkpoint_extra()))  # as a checkpoint's JSON metadata holds it
    assert extra == {"accuracy_rows": [[90.0], [80.0, 70.0]], "task_id_accuracy_rows": [100.0, 75.0],
                     "train_time_s": 1.5, "eval_time_s": 0.75, "last_eval_time_s": 0.5, "last_eval_images": 7}
    assert RunState.from_checkpoint(extra) == state
    assert RunState.from_checkpoint({}) == RunState()  # a checkpoint without a record: nothing measured yet


def test_a_run_folder_is_locked_while_a_process_runs_it(tmp_path):
    final = tmp_path / "run"
    first = RunDirectory(final, runs_only=True)
    (first.path / "config.yaml").write_text("seed: 0\n")
    # a second process (here: a child) can neither resume nor discard it while the first holds it
    code = (
        "import sys\nfrom duallora.reporting import RunDirectory\nfrom duallora.errors import CheckpointError\n"
        "for kw in ({'resume': True}, {'overwrite': True, 'runs_only': True}):\n"
        "    try:\n        RunDirectory(sys.argv[1], **kw)\n    except CheckpointError as e:\n"
        "        print('refused:', e)\n    else:\n        print('opened')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True, check=True).stdout
    assert out.count("refused: another duallora process is running the run") == 2, out
    assert (first.path / "config.yaml").is_file()  # nothing was discarded
    first.release()
    out = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "opened", out  # released: it can be resumed
    # the lock is released at commit, too
    again = RunDirectory(tmp_path / "other", runs_only=True)
    (again.path / "metrics.json").write_text("{}")
    again.commit()
    assert again._lock.fd is None


def test_overwrite_accepts_a_run_folder_with_tensorboard_logs_and_nothing_else(tmp_path):
    run = fake_run_folder(tmp_path / "r")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1733.host.123.0").write_bytes(b"x")
    check_replaceable(run)  # a run with train.tensorboard=true
    (run / "tensorboard" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="tensorboard/notes.txt"):
        check_replaceable(run)


def test_a_config_the_model_refuses_leaves_no_partial_folder(tmp_path):
    # method.gate_layer outside the backbone's 6 blocks is found when the model is built: before any folder
    images = make_images(tmp_path / "img")
    out = tmp_path / "run"
    r = invoke("run", "-o", str(out), *tiny(images), "method.gate_layer=99")
    assert r.exit_code == 2 and "method.gate_layer=99 is outside the backbone's 6 blocks" in r.output, r.output
    assert not out.exists() and not Path(f"{out}.partial").exists()
    # protect_gate (DualLoRA's default) with adapters only below the gate would adapt nothing: refused, nothing left
    r = invoke("run", "-o", str(out), *tiny(images), r"method.adapted_modules=[blocks\.0\.attn\.qkv]",
               "method.use_residual=false")
    assert r.exit_code == 2 and "DualLoRA would adapt nothing" in r.output and "protect_gate=false" in r.output
    assert not Path(f"{out}.partial").exists()
    assert invoke("run", "-o", str(out), *tiny(images)).exit_code == 0  # the same folder, a good config
