"""`duallora predict` on a tiny real run, and the CLI options added with it (issue 9): `evaluate`
overrides that do not change the model, `run --no-progress`."""

import csv
import inspect
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from duallora.backbones import SHIPPED_WEIGHTS
from duallora.cli import app

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped backbone weights missing")

CLASSES = ["ankle", "bag", "coat", "dress"]
RUN = ["data.dataset=imagefolder", "data.num_tasks=2", "train.epochs=2", "train.batch_size=8", "train.lr=0.01",
       "train.progress=false", "train.threads=1", "train.device=cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _pattern_image(c: int, rng: np.random.Generator) -> np.ndarray:
    base = (np.random.default_rng(1000 + c).random((28, 28)) > 0.5) * 200.0
    return np.clip(base + rng.random((28, 28)) * 40, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-task run on 4 imagefolder classes of 8 synthetic 28x28 PNGs each (a few seconds)."""
    base = tmp_path_factory.mktemp("predict")
    data = base / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(_pattern_image(c, rng), mode="L").save(data / name / f"{i}.png")
    out = base / "run"
    result = invoke("run", "-o", out, f"data.root={data}", *RUN)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def images(tmp_path):
    """Query images: 28x28 grayscale PNGs in a nested folder, an RGB JPEG of another size, files that
    a folder search must skip (hidden, not an image) and one broken PNG named on its own."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "query"
    (folder / "sub").mkdir(parents=True)
    files = []
    for c in range(4):
        p = (folder if c % 2 else folder / "sub") / f"img{c}.png"
        Image.fromarray(_pattern_image(c, rng), mode="L").save(p)
        files.append(p)
    rgb = folder / "sub" / "rgb.JPG"
    Image.fromarray(np.stack([_pattern_image(2, rng)] * 3, axis=-1)).resize((40, 36)).save(rgb)
    files.append(rgb)
    deep = folder / "sub" / "deep16.png"  # 16-bit greyscale: converted as the training reader converts it
    Image.fromarray(_pattern_image(3, rng).astype(np.uint16) * 257).save(deep)
    files.append(deep)
    Image.fromarray(_pattern_image(0, rng), mode="L").save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    return folder, files, broken


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def reference(run: Path, files, checkpoint: str = "task_2.safetensors"):
    """learner.predict on the images as ImageFolderDataset (training's reader) converts them."""
    from duallora.data.datasets import ImageFolderDataset
    from duallora.training import ContinualLearner

    learner = ContinualLearner.load(run / "checkpoints" / checkpoint)
    ds = ImageFolderDataset(files, [0] * len(files), ["?"], image_size=(28, 28), channels=1)
    return learner, learner.predict(torch.stack([ds[i][0] for i in range(len(files))]))


def test_predict_csv_equals_learner_predict(tiny_run, images):
    folder, files, _ = images
    result = invoke("predict", tiny_run, folder, "--threads", "1", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    rows = parse_csv(result.stdout)
    # one row per image, folders searched recursively and sorted; hidden and non-image files skipped
    assert [Path(r["path"]).name for r in rows] == ["img1.png", "img3.png", "deep16.png", "img0.png", "img2.png",
                                                    "rgb.JPG"]
    by_name = {Path(r["path"]).name: r for r in rows}
    learner, pred = reference(tiny_run, files)
    order = json.loads((tiny_run / "class_order.json").read_text())
    names = dict(zip(order["class_order"], order["class_names"]))
    seen = learner.seen_labels
    for i, f in enumerate(files):
        row = by_name[f.name]
        assert int(row["class_id"]) == int(pred.labels[i])
        assert row["class_name"] == names[int(pred.labels[i])] and row["class_name"] in CLASSES
        assert int(row["task"]) == int(pred.tasks[i]) + 1  # tasks numbered from 1, as `duallora run` prints
        assert float(row["task_confidence"]) == pytest.approx(float(pred.confidence[i]), abs=1e-6)
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert row["top1_class"] == row["class_name"]
        # the most probable first; equal probabilities (e.g. 0 for another task) in class order
        top = sorted(range(len(seen)), key=lambda j: -float(pred.probs[i, j]))[:3]
        assert [row[f"top{k}_class"] for k in (1, 2, 3)] == [names[seen[j]] for j in top]
        assert probs == pytest.approx([float(pred.probs[i, j]) for j in top], abs=1e-6)
    # the header: the documented columns, then top-k pairs
    assert result.stdout.splitlines()[0] == ("path,class_id,class_name,task,task_confidence,"
                                             "top1_class,top1_prob,top2_class,top2_prob,top3_class,top3_prob")


def test_unreadable_file_is_listed_and_the_others_predicted(tiny_run, images, tmp_path):
    folder, files, broken = images
    missing = tmp_path / "nope.png"
    target = tmp_path / "out" / "pred.csv"
    result = invoke("predict", tiny_run, broken, files[0], missing, files[1], "-o", target)
    assert result.exit_code == 1, result.output
    assert f"error: cannot read {broken} (" in result.stderr
    assert f"error: cannot read {missing} (no such file or folder)" in result.stderr
    assert "2 of 4 files could not be read" in result.stderr
    assert "Traceback" not in result.output
    alone = invoke("predict", tiny_run, broken)  # every file unreadable: no "others" to speak of
    assert alone.exit_code == 1 and "none of the 1 files could be read" in alone.stderr
    rows = parse_csv(target.read_text())
    assert [r["path"] for r in rows] == [str(files[0]), str(files[1])]
    assert result.stdout == ""  # with --output the table goes to the file only
    assert not list(target.parent.glob("*.tmp*"))
    # nothing that exists at all: bad input (exit 2), nothing written
    lone = tmp_path / "out" / "none.csv"
    result = invoke("predict", tiny_run, missing, tmp_path / "gone", "-o", lone)
    assert result.exit_code == 2 and "none of the paths given exists" in result.output and not lone.exists()


def test_checkpoint_file_json_and_top_k(tiny_run, images):
    _, files, _ = images
    ckpt = tiny_run / "checkpoints" / "task_1.safetensors"
    result = invoke("predict", ckpt, *files, "--format", "json", "--top-k", "10")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["checkpoint"] == str(ckpt) and data["errors"] == []
    learner, pred = reference(tiny_run, files, "task_1.safetensors")
    task1 = set(learner.seen_labels)
    assert len(task1) == 2
    for i, p in enumerate(data["predictions"]):
        assert p["task"] == 1 and p["class_id"] == int(pred.labels[i]) and p["class_id"] in task1
        assert len(p["top_k"]) == 2  # only the classes learned so far
        assert {c["class_id"] for c in p["top_k"]} == task1
        assert sum(c["probability"] for c in p["top_k"]) == pytest.approx(1.0, abs=1e-5)
    # the same file through the run folder's checkpoints/ folder gives the last checkpoint
    last = invoke("predict", tiny_run / "checkpoints", files[0], "--format", "json")
    assert json.loads(last.stdout)["checkpoint"].endswith("task_2.safetensors")


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/no-such-run", "{img}"], "no model directory, run folder or checkpoint at"),
    (["{run}", "{tmp}/empty"], "no image files in"),
    (["{run}", "{img}", "--format", "xml"], "--format xml is not supported"),
    (["{run}", "{img}", "--device", "cuda:7"], "train.device"),
])
def test_bad_input_gives_a_clear_error(tiny_run, images, tmp_path, args, fragment):
    (tmp_path / "empty").mkdir()
    values = dict(tmp=tmp_path, img=images[1][0], run=tiny_run)
    result = invoke("predict", *[a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert "Traceback" not in result.output


def test_class_names_without_class_order_json(tiny_run, images, tmp_path):
    import shutil

    _, files, _ = images
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(tiny_run / "checkpoints" / "task_2.safetensors", ckpt)
    result = invoke("predict", ckpt, files[0])
    assert result.exit_code == 0, result.output
    assert "warning: no class names found" in result.stderr
    row = parse_csv(result.stdout)[0]
    assert row["class_name"] == row["class_id"]


# ------------------------------------------------------------------- evaluate overrides, run --no-progress


def test_evaluate_refuses_overrides_that_change_the_model(tiny_run):
    for item, fragment in [("method.calibration=none", "method.calibration cannot be overridden"),
                           ("data.num_tasks=4", "data.num_tasks cannot be overridden"),
                           ("bogus.key=1", "unknown config key"),
                           ("train.threads=0", "train.threads=0 must be >= 1")]:
        result = invoke("evaluate", "--checkpoint", tiny_run, item)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
        if "overridden" in fragment:
            assert "train.eval_batch_size" in result.stderr  # names what is allowed


def test_evaluate_passes_overrides_on(monkeypatch, tiny_run):
    import duallora.runner

    seen = {}

    class Stop(Exception):
        pass

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(duallora.runner, "evaluate_checkpoints", fake)
    result = invoke("evaluate", "--checkpoint", tiny_run, "train.eval_batch_size=7", "train.threads=1",
                    "data.num_workers=0", "train.progress=false", "data.root=/elsewhere")
    assert isinstance(result.exception, Stop), result.output
    assert seen["overrides"] == {"train.eval_batch_size": 7, "train.threads": 1, "data.num_workers": 0}
    assert seen["progress"] is False and seen["data_root"] == "/elsewhere"
    result = invoke("evaluate", "--checkpoint", tiny_run, "--data-root", "/a", "data.root=/b")
    assert result.exit_code == 2 and "disagree" in result.stderr


@pytest.mark.skipif("overrides" not in inspect.signature(__import__("duallora.runner", fromlist=["x"])
                                                         .evaluate_checkpoints).parameters,
                    reason="runner.evaluate_checkpoints does not take overrides yet")
def test_evaluate_with_overrides_reproduces_the_metrics(tiny_run):
    stored = json.loads((tiny_run / "metrics.json").read_text())
    result = invoke("evaluate", "--checkpoint", tiny_run, "train.eval_batch_size=3", "train.threads=1",
                    "train.device=cpu", "train.progress=false")
    assert result.exit_code == 0, result.output
    assert "equals the run's metrics.json" in result.output
    assert f"{stored['final_accuracy']:.2f}" in result.output


def test_run_no_progress_sets_train_progress():
    for flag, value in [("--no-progress", "false"), ("--progress", "true")]:
        result = invoke("run", "--print-config", flag)
        assert result.exit_code == 0, result.output
        assert f"progress: {value}" in result.stdout
    # the flag wins over an override, as compare's does
    result = invoke("run", "--print-config", "train.progress=true", "--no-progress")
    assert "progress: false" in result.stdout


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar100"])
def test_reader_converts_as_the_dataset_does(tmp_path, dataset):
    """imagefolder (and mnist, fashion-mnist): ImageFolderDataset's resize; the benchmarks: their timm
    evaluation transform (resize the shorter side, centre crop)."""
    from types import SimpleNamespace

    from duallora.config import load_config
    from duallora.data.datasets import ImageFolderDataset
    from duallora.data.transforms import build_transform, resolve_transform_config
    from duallora.predict import Predictor

    path = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((40, 64, 3)) * 255).astype(np.uint8)).save(path)
    cfg = load_config(None, [f"data.dataset={dataset}"])
    info = SimpleNamespace(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    got = Predictor(SimpleNamespace(cfg=cfg, backbone_info=info), path, {}).reader([path])(0)
    if dataset == "imagefolder":
        want = ImageFolderDataset([path], [0], ["?"], image_size=(32, 32), channels=3)[0][0]
    else:
        tc = resolve_transform_config(cfg.backbone.name, info.input_size, crop_pct=cfg.data.crop_pct)
        want = build_transform(tc, augment=False)(Image.open(path).convert("RGB"))
    assert got.dtype == torch.uint8 and tuple(got.shape) == (3, 32, 32)
    assert torch.equal(got, want)
