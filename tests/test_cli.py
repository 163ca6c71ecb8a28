"""End to end through the command line: a small real run, its outputs, re-evaluation, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from duallora.backbones import SHIPPED_WEIGHTS
from duallora.cli import app

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped backbone weights missing")

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SMALL = ["train.min_steps=0", "train.max_batch_fraction=null", "data.train_per_class=30", "data.test_per_class=10",
         "train.epochs=1", "train.progress=false", "train.batch_size=32"]
OUTPUTS = ["config.yaml", "metrics.json", "accuracy_matrix.csv", "class_order.json", "accuracy_matrix.png",
           "accuracy_curve.png", "history.json"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    if not FMNIST.is_file():
        pytest.skip("Fashion-MNIST files not installed (scripts/setup.sh installs them)")
    out = tmp_path_factory.mktemp("runs") / "small"
    result = invoke("run", "-o", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    return out, result


def test_run_writes_every_output(small_run):
    out, result = small_run
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"task_{k}.safetensors" for k in range(1, 6)]
    assert not Path(str(out) + ".partial").exists()
    assert "final_accuracy" in result.output


def test_metrics_json_is_complete_and_consistent(small_run):
    out, _ = small_run
    m = json.loads((out / "metrics.json").read_text())
    for key in ["final_accuracy", "final_accuracy_task_mean", "average_incremental_accuracy", "forgetting",
                "backward_transfer", "task_id_accuracy", "accuracy_matrix", "num_tasks", "method", "backbone",
                "backbone_sha256", "seed", "wall_time_s"]:
        assert key in m, key
    R = m["accuracy_matrix"]
    assert m["num_tasks"] == 5 and len(R) == 5
    assert all(len(row) == 5 for row in R)
    assert all(R[t][i] is None for t in range(5) for i in range(t + 1, 5))
    # 10 test images per class, 2 classes per task: every task has 20 images, so both averages agree
    assert m["test_images_per_task"] == [20] * 5
    assert m["final_accuracy"] == pytest.approx(sum(R[4]) / 5)
    assert m["method"] == "duallora"
    assert m["backbone"] == "vit_tiny_patch7_28.duallora_mnist"
    assert len(m["backbone_sha256"]) == 64
    # the class order recorded in both places agrees and is a permutation of the 10 classes
    order = json.loads((out / "class_order.json").read_text())["class_order"]
    assert sorted(order) == list(range(10))
    assert m["class_order"] == order
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["train_per_class"] == 30 and cfg["train"]["epochs"] == 1
    csv_rows = (out / "accuracy_matrix.csv").read_text().strip().splitlines()
    assert csv_rows[0] == "after_task,task_1,task_2,task_3,task_4,task_5"
    assert len(csv_rows) == 6


def test_evaluate_reproduces_the_metrics(small_run, tmp_path):
    out, _ = small_run
    stored = json.loads((out / "metrics.json").read_text())
    target = tmp_path / "eval.json"
    result = invoke("evaluate", "--checkpoint", str(out), "--no-progress", "-o", str(target))
    assert result.exit_code == 0, result.output
    again = json.loads(target.read_text())
    assert again["accuracy_matrix"] == stored["accuracy_matrix"]
    for key in ["final_accuracy", "average_incremental_accuracy", "forgetting", "task_id_accuracy"]:
        assert again[key] == pytest.approx(stored[key], abs=1e-9), key
    assert again["max_difference_to_metrics_json"] == 0.0
    assert "equals the run's metrics.json" in result.output
    # a run folder whose metrics.json no longer matches what its checkpoints give is flagged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    edited = json.loads((copy / "metrics.json").read_text())
    edited["accuracy_matrix"][4][0] = edited["accuracy_matrix"][4][0] + 12.5
    (copy / "metrics.json").write_text(json.dumps(edited))
    result = invoke("evaluate", "--checkpoint", str(copy), "--no-progress")
    assert result.exit_code == 0
    assert "differs from the run's metrics.json by up to 12.50 points" in result.output


def test_existing_output_is_refused_and_kept(small_run):
    out, _ = small_run
    before = (out / "metrics.json").read_bytes()
    result = invoke("run", "-o", str(out), *SMALL)
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert (out / "metrics.json").read_bytes() == before


def test_failed_run_leaves_earlier_outputs_untouched(small_run):
    out, _ = small_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # a learning rate this large makes the loss NaN: the run fails after it started writing
    result = invoke("run", "-o", str(out), "--overwrite", *SMALL, "train.lr=1e30", "train.optimizer=sgd")
    assert result.exit_code == 2
    assert "loss became" in result.output and "train.lr" in result.output
    assert "Traceback" not in result.output
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["data.dataset=cifar"], "data.dataset='cifar' is not supported"),
        (["method.name=l2x"], "method.name='l2x' is not supported"),
        (["backbone.name=vit_nonexistent_patch3.foo"], "unknown backbone"),
        (["backbone.name=vit_base_patch16_224.augreg_in21k"], "backbone.weights="),
        (["backbone.weights=/nonexistent/w.safetensors"], "does not exist"),
        (["bogus.key=1"], "unknown config key 'bogus'"),
        (["data.num_tasks=20"], "num_tasks=20 is more than the 10 classes"),
        (["data.num_tasks=3"], "cannot be split into 3 equal tasks"),
        (["data.dataset=imagefolder", "data.root=/nonexistent/folder"], "/nonexistent/folder"),
        (["data.root=/nonexistent/fmnist"], "/nonexistent/fmnist"),
    ],
)
def test_bad_input_gives_a_clear_error(args, fragment, tmp_path):
    result = invoke("run", "-o", str(tmp_path / "r"), *args)
    assert result.exit_code == 2, result.output
    assert fragment.lower() in result.output.lower()
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_unreadable_image_is_named(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_bytes(b"not a png")
    result = invoke("run", "-o", str(tmp_path / "r"), "data.dataset=imagefolder", f"data.root={root}",
                    "data.num_tasks=1", "train.progress=false")
    assert result.exit_code == 2, result.output
    assert ".png" in result.output
    assert "Traceback" not in result.output


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "duallora", "run", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "overrides" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "duallora", "run", "nope=1"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown config key 'nope'")


def test_duallora_warnings_print_as_one_line_without_source_location(capsys, monkeypatch):
    import warnings

    from duallora import cli
    from duallora.budget import TrainingBudgetWarning

    cli._show_warning(TrainingBudgetWarning("task 1: only 5 optimizer steps"), TrainingBudgetWarning, "x.py", 3)
    assert capsys.readouterr().err == "warning: task 1: only 5 optimizer steps\n"
    seen = []
    monkeypatch.setattr(cli, "_python_show_warning", lambda *a: seen.append(a[1]))
    cli._show_warning(UserWarning("other"), UserWarning, "x.py", 3)  # other warnings keep Python's format
    assert seen == [UserWarning] and capsys.readouterr().err == ""
    assert warnings.showwarning is not cli._show_warning  # installed only while main() runs
