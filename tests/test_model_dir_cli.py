"""Model directories across processes: a learn killed (SIGKILL) or terminated (SIGTERM) mid-training leaves the
model as it was, and learning folders one `duallora learn` process at a time equals `duallora run` over the same
tasks (the same tensors, the same accuracies). Also `predict --version` and `history` on that run folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duallora.backbones import SHIPPED_WEIGHTS
from duallora.predict import load_predictor
from test_model_dir import TRAIN, copy_model, history_json, invoke, make_folders, ok, predictions, snapshot

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped backbone weights missing")

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")


def duallora(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "duallora", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folders(tmp_path_factory.mktemp("folders"))


@pytest.fixture(scope="module")
def learned_t1(data, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("model1") / "m"
    ok(invoke("learn", model, data / "t1", *TRAIN, "data.num_tasks=3"))
    return model


@pytest.fixture()
def model1(learned_t1, tmp_path) -> Path:
    """A duallora model of one version (t1), to change."""
    return copy_model(learned_t1, tmp_path / "m1")


def _signal_while_training(model: Path, folder: Path, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start a long `duallora learn` of ``folder`` and send ``sig`` once it has started training;
    its outcome and its process id."""
    proc = subprocess.Popen([sys.executable, "-m", "duallora", "learn", str(model), str(folder), "train.epochs=500",
                             "train.min_steps=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    first = proc.stdout.readline()  # printed just before training starts
    if not first.startswith("learning task"):
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no training started:\n{first}{out}\n{err}")
    time.sleep(1.0)  # in the middle of 500 epochs (a few minutes)
    assert proc.poll() is None, "the learn ended before it could be signalled"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, first + out, err), proc.pid


def test_a_killed_learn_leaves_the_model_unchanged_and_the_next_learn_works(model1, data):
    before = snapshot(model1)
    model_json = (model1 / "model.json").read_bytes()
    predicted = ok(invoke("predict", model1, data / "test")).stdout
    done, pid = _signal_while_training(model1, data / "t2", signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    assert (model1 / "model.json").read_bytes() == model_json
    assert snapshot(model1) == before
    assert [h["number"] for h in history_json(model1)] == [1]
    assert ok(invoke("predict", model1, data / "test")).stdout == predicted
    # a learn killed while it wrote its version leaves a staging folder: the next learn removes it
    stale = model1 / "versions" / f".staging-{pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a checkpoint")
    ok(invoke("learn", model1, data / "t2"))  # also: the killed process's lock is gone
    assert not stale.exists() and sorted(p.name for p in (model1 / "versions").iterdir()) == ["0001", "0002"]
    assert [(h["number"], h["parent"], h["current"]) for h in history_json(model1)] == [(1, None, False),
                                                                                          (2, 1, True)]


def test_a_terminated_learn_says_the_model_is_unchanged(model1, data):
    before = snapshot(model1)
    done, _ = _signal_while_training(model1, data / "t2", signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: terminated by SIGTERM; the model in {model1} is unchanged (current version 1)")
    assert snapshot(model1) == before


# ------------------------------------------------------------------ learn, one process a task = run


EQUIVALENCE_METHODS = ("duallora", "fecam")


@pytest.fixture(scope="module")
def equivalence(data, tmp_path_factory):
    """For each method: a `duallora run` of 2 tasks on root/{train,test}/{a,b,c,d} with class order a c | b d,
    and a model of the same tasks learned by two `duallora learn` processes, evaluated on root/test."""
    base = tmp_path_factory.mktemp("equivalence")
    root = base / "root"
    for c in "abcd":
        shutil.copytree(data / ("t1" if c in "ab" else "t2") / c, root / "train" / c)
        shutil.copytree(data / "test_mixed" / c, root / "test" / c)  # with images filed under another class
    tasks = [base / "f1", base / "f2"]
    for folder, classes in zip(tasks, ("ac", "bd")):
        for c in classes:
            shutil.copytree(root / "train" / c, folder / c)
    out = {}
    for method in EQUIVALENCE_METHODS:
        config = [*TRAIN, "data.num_tasks=2", f"method.name={method}"]
        run = base / f"run-{method}"
        # label ids are the sorted names (a=0 .. d=3); each task's classes in ascending id order, as learn takes them
        ok(invoke("run", "-o", run, "data.dataset=imagefolder", f"data.root={root}", "data.class_order=[0,2,1,3]",
                  *config))
        model = base / f"model-{method}"
        for k, folder in enumerate(tasks):
            done = duallora("learn", model, folder, *(config if k == 0 else []))
            assert done.returncode == 0, done.stderr
        ok(invoke("evaluate", model, root / "test", "-o", base / f"eval-{method}"))
        evaluation = json.loads((base / f"eval-{method}" / "evaluation.json").read_text())
        out[method] = (run, model, evaluation)
    return out


@pytest.mark.parametrize("method", EQUIVALENCE_METHODS)
def test_learning_folders_one_process_at_a_time_equals_a_run(equivalence, method):
    run, model, evaluation = equivalence[method]
    order = json.loads((run / "class_order.json").read_text())
    assert order["class_order"] == [0, 2, 1, 3]
    assert [v["classes_added"] for v in history_json(model)] == [["a", "c"], ["b", "d"]]
    for k in (1, 2):
        mine = load_file(model / "versions" / f"{k:04d}" / "model.safetensors")
        theirs = load_file(run / "checkpoints" / f"task_{k}.safetensors")
        assert mine.keys() == theirs.keys() and len(mine) > 0
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype and mine[key].shape == theirs[key].shape, key
            assert torch.allclose(mine[key], theirs[key], rtol=0, atol=1e-6), (k, key)
    metrics = json.loads((run / "metrics.json").read_text())
    last = metrics["accuracy_matrix"][-1]
    assert [evaluation["per_task_accuracy"][t] for t in ("1", "2")] == pytest.approx(last, abs=1e-9)
    assert metrics["test_images_per_task"] == [7, 8]
    assert evaluation["accuracy"] == pytest.approx(metrics["final_accuracy"], abs=1e-9)  # over images, as here
    assert evaluation["accuracy"] < 100.0  # the images filed under another class are counted wrong
    assert evaluation["accuracy"] > 25.0  # learned, not chance over 4 classes


def test_predict_version_and_history_of_a_run_folder(equivalence, data):
    run = equivalence["duallora"][0]
    old = predictions(run, data / "test", "--version", "1", "-k", "1")
    assert len(old) == 12 and {r["class_name"] for r in old} <= {"a", "c"}
    reference = load_predictor(run / "checkpoints" / "task_1.safetensors").predict_files(
        [Path(r["path"]) for r in old], top_k=1)
    assert [p.class_name for p in reference.predictions] == [r["class_name"] for r in old]
    new = predictions(run, data / "test", "--version", "2", "-k", "1")
    assert new == predictions(run, data / "test", "-k", "1")  # the last task by default
    r = invoke("predict", run, data / "test", "--version", "3")
    assert r.exit_code == 2 and "has 2 task checkpoints; --version 3 does not exist" in r.stderr
    # evaluate RUN FOLDER on the run's own test images: the run's last accuracy-matrix row
    out = run.parent / "eval-run"
    ok(invoke("evaluate", run, run.parent / "root" / "test", "-o", out))
    evaluation = json.loads((out / "evaluation.json").read_text())
    rows = json.loads((run / "metrics.json").read_text())["accuracy_matrix"]
    assert [evaluation["per_task_accuracy"][t] for t in ("1", "2")] == pytest.approx(rows[1], abs=1e-9)
    assert evaluation["confusion_matrix"]["classes"] == ["a", "b", "c", "d"]
    hist = history_json(run)
    assert [(h["number"], h["parent"], h["classes_added"], h["images"], h["current"]) for h in hist] == [
        (1, None, ["a", "c"], 12, False), (2, 1, ["b", "d"], 12, True)]
    assert hist[1]["accuracy"] == pytest.approx(sum(rows[1]) / 2, abs=1e-9)
