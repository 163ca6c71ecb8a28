"""Kill a run at a task boundary or mid-task, resume it, and get the uninterrupted run's metrics."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from duallora.backbones import SHIPPED_WEIGHTS
from duallora.cli import app

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not (SHIPPED_WEIGHTS.is_file() and FMNIST.is_file()),
                                reason="needs the shipped weights and the Fashion-MNIST files")

SMALL = ["train.min_steps=0", "train.max_batch_fraction=null", "data.train_per_class=40", "data.test_per_class=10",
         "train.epochs=2", "train.progress=false", "train.batch_size=16", "train.threads=1"]
TIMING = {"train_time_s", "eval_time_s", "final_eval_time_s", "inference_ms_per_image", "wall_time_s",
          "resumed_after_task", "output"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def results(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in TIMING}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = invoke("run", "-o", str(out), *SMALL)
    assert r.exit_code == 0, r.output
    return out


def test_same_seed_twice_gives_identical_metrics(reference, tmp_path):
    r = invoke("run", "-o", str(tmp_path / "again"), *SMALL)
    assert r.exit_code == 0, r.output
    assert results(tmp_path / "again") == results(reference)


def _kill_after(out: Path, checkpoint: int, extra_delay: float) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "duallora", "run", "-o", str(out), *SMALL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    target = Path(str(out) + ".partial") / "checkpoints" / f"task_{checkpoint}.safetensors"
    deadline = time.time() + 300
    while not target.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(extra_delay)  # 0: at the boundary; > 0: in the middle of the next task
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("checkpoint, delay", [(2, 0.0), (3, 0.7)])
def test_killed_run_resumes_to_the_same_metrics(reference, tmp_path, checkpoint, delay):
    out = tmp_path / "run"
    _kill_after(out, checkpoint, delay)
    assert not out.exists() and Path(str(out) + ".partial").is_dir()
    # every checkpoint the killed run left is complete and readable (writes are atomic)
    from duallora.training import ContinualLearner

    ckpts = sorted((Path(str(out) + ".partial") / "checkpoints").glob("task_*.safetensors"))
    assert len(ckpts) >= checkpoint
    for c in ckpts:
        tensors, meta = ContinualLearner.read_checkpoint(c)
        assert tensors and len(meta["extra"]["accuracy_rows"]) == int(c.stem.split("_")[1])
    r = invoke("run", "--resume", str(out))
    assert r.exit_code == 0, r.output
    assert "resuming after task" in r.output
    assert results(out) == results(reference)
    hist = json.loads((out / "history.json").read_text())
    assert [h["task"] for h in hist] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run"
    _kill_after(out, 1, 0.0)
    r = invoke("run", "--resume", str(out), *SMALL[:-1], "train.epochs=3")
    assert r.exit_code == 2
    assert "differs from the interrupted run" in r.output and "train.epochs" in r.output
    # the same overrides as the run are accepted (threads and progress do not matter)
    r = invoke("run", "--resume", str(out), *[o for o in SMALL if not o.startswith("train.threads")])
    assert r.exit_code == 0, r.output


def test_resume_refuses_a_run_of_an_older_version(tmp_path):
    out = tmp_path / "run"
    _kill_after(out, 1, 0.0)
    path = Path(f"{out}.partial") / "config.yaml"
    stored = yaml.safe_load(path.read_text())
    del stored["train"]["precision"]  # a key this version has and the run's version had not
    path.write_text(yaml.safe_dump(stored))
    r = invoke("run", "--resume", str(out))
    assert r.exit_code == 2 and "older version of duallora" in r.output and "train.precision" in r.output


def test_resume_without_an_interrupted_run(reference, tmp_path):
    r = invoke("run", "--resume", str(reference))
    assert r.exit_code == 2 and "already finished" in r.output
    r = invoke("run", "--resume", str(reference), "--print-config")  # not the defaults: there is nothing to resume
    assert r.exit_code == 2 and "no interrupted run" in r.output and "config.yaml" in r.output
    r = invoke("run", "--resume", str(tmp_path / "never"))
    assert r.exit_code == 2 and "no interrupted run" in r.output


@pytest.mark.parametrize("error", [KeyboardInterrupt, "data"])
def test_a_run_stopped_mid_way_names_its_unfinished_folder(tmp_path, monkeypatch, error):
    from duallora.errors import DataError
    from duallora.training import ContinualLearner

    real = ContinualLearner.learn_task
    calls = {"n": 0}

    def second_task_fails(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt if error is KeyboardInterrupt else DataError("a corrupt image: img_7.png")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ContinualLearner, "learn_task", second_task_fails)
    out = tmp_path / "run"
    r = invoke("run", "-o", str(out), *SMALL)
    assert r.exit_code == (130 if error is KeyboardInterrupt else 2)
    assert f"the unfinished run stays in {out}.partial" in r.output
    assert f"duallora run --resume {out}" in r.output
    if error is not KeyboardInterrupt:
        assert "a corrupt image: img_7.png" in r.output
    assert (Path(f"{out}.partial") / "checkpoints" / "task_1.safetensors").is_file() and not out.exists()
    monkeypatch.setattr(ContinualLearner, "learn_task", real)
    r = invoke("run", "--resume", f"{out}.partial")  # the staging folder's own name is accepted too
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["resumed_after_task"] == 1
