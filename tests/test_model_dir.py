"""Model directories (`duallora learn`, `history`, `rollback`, `predict --version`, `evaluate MODEL_DIR FOLDER`)
through the command line, in process (typer's CliRunner), on tiny folders of synthetic 28x28 grey PNGs and the
shipped backbone. The subprocess tests (kill -9, SIGTERM, the learn = run equivalence) are in
tests/test_model_dir_cli.py; the helpers and fixtures shared with it are here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from duallora.backbones import SHIPPED_WEIGHTS, TINY_IMAGENET_NAME
from duallora.cli import app
from duallora.errors import CheckpointError, ConfigError, DataError
from duallora.methods import method_names
from duallora.model_dir import FORMAT_VERSION, ContinualModel, locked
from duallora.task_folder import scan_task_folder

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped backbone weights missing")

#: A few optimizer steps at a high rate: seconds per learn on one CPU thread, and the pattern classes are learned.
TRAIN = ["train.epochs=1", "train.min_steps=6", "train.batch_size=8", "train.lr=0.01", "train.threads=1",
         "train.progress=false", "train.device=cpu"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def refused(result, *fragments: str) -> str:
    """A user error: exit 2, one ``error: ...`` line on stderr holding every fragment."""
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


def grey_images(folder: Path, classes, per_class: int, seed: int) -> Path:
    """folder/<class>/<i>.png: the class's fixed on/off pattern (from its name) at 200 plus noise in [0, 40)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        base = (np.random.default_rng(zlib.crc32(name.encode())).random((28, 28)) > 0.5) * 200.0
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(base + rng.random((28, 28)) * 40, 0, 255).astype(np.uint8)
            Image.fromarray(a, mode="L").save(folder / name / f"{i}.png")
    return folder


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def history_json(model: Path) -> list[dict]:
    return json.loads(ok(invoke("history", model, "--json")).stdout)


def predictions(model: Path, images: Path, *extra) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(ok(invoke("predict", model, images, *extra)).stdout)))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_folders(base: Path) -> Path:
    """Task folders t1 (a, b), t2 (c, d), t3 (e, f) of 6 images a class, labelled test folders, one-class folders."""
    grey_images(base / "t1", "ab", 6, 0)
    grey_images(base / "t2", "cd", 6, 1)
    grey_images(base / "t3", "ef", 6, 2)
    grey_images(base / "test", "abcd", 3, 3)
    grey_images(base / "test_ab", "ab", 3, 3)  # the same images as test/a and test/b
    # test_mixed: test with 3 images filed under another class (errors a learned model makes: accuracy 80%)
    shutil.copytree(base / "test", base / "test_mixed")
    for image, wrong in (("c/0.png", "a"), ("b/1.png", "d"), ("a/2.png", "b")):
        shutil.copy(base / "test" / image, base / "test_mixed" / wrong / f"z{image.replace('/', '')}")
    grey_images(base / "one", ["x"], 6, 4)
    grey_images(base / "after_one", ["y", "z"], 6, 5)
    return base


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folders(tmp_path_factory.mktemp("folders"))


@pytest.fixture(scope="module")
def model2(data, tmp_path_factory) -> Path:
    """A duallora model of 2 versions: t1, then t2 with --eval test. Tests change copies of it."""
    model = tmp_path_factory.mktemp("model2") / "m"
    r = ok(invoke("learn", model, data / "t1", *TRAIN, "data.num_tasks=3"))
    assert f"learning task 1: 2 classes, 12 images from {data / 't1'} into a new duallora model in {model}" in r.stdout
    r = ok(invoke("learn", model, data / "t2", "--eval", data / "test"))
    assert f"version 2 of {model}: task 2, classes c, d" in r.stdout and "accuracy on" in r.stdout
    return model


@pytest.fixture()
def model1(model2, tmp_path) -> Path:
    """A copy of model2 pruned to its version 1."""
    m = copy_model(model2, tmp_path / "m1")
    assert ContinualModel.open(m).rollback(1, prune=True) == [2]
    return m


# ------------------------------------------------------------------ 1. learn, versions, layout, history


def test_two_learns_make_two_versions_with_records_and_nothing_else(model2, data):
    files = {p.relative_to(model2).as_posix() for p in model2.rglob("*") if p.is_file()}
    assert files == {"model.json", ".lock", "versions/0001/model.safetensors", "versions/0001/version.json",
                     "versions/0002/model.safetensors", "versions/0002/version.json",
                     "versions/0002/evaluations.json"}
    folders = {p.relative_to(model2).as_posix() for p in model2.rglob("*") if p.is_dir()}
    assert folders == {"versions", "versions/0001", "versions/0002"}
    meta = json.loads((model2 / "model.json").read_text())
    assert meta["format"] == "duallora-model" and meta["format_version"] == 1 == FORMAT_VERSION
    assert meta["current"] == 2 and meta["versions"] == [1, 2]
    assert meta["method"] == "duallora" and meta["backbone"] == "vit_tiny_patch7_28.duallora_mnist"

    v1 = json.loads((model2 / "versions/0001/version.json").read_text())
    v2 = json.loads((model2 / "versions/0002/version.json").read_text())
    assert (v1["version"], v1["parent"], v1["task"], v1["classes_added"], v1["train_images"]) == (1, None, 1,
                                                                                                   ["a", "b"], 12)
    assert (v2["version"], v2["parent"], v2["task"], v2["classes_added"], v2["train_images"]) == (2, 1, 2,
                                                                                                   ["c", "d"], 12)
    assert v2["classes"] == [{"id": 0, "name": "a", "task": 1, "train_images": 6},
                             {"id": 1, "name": "b", "task": 1, "train_images": 6},
                             {"id": 2, "name": "c", "task": 2, "train_images": 6},
                             {"id": 3, "name": "d", "task": 2, "train_images": 6}]
    assert v1["data_sha256"] == scan_task_folder(data / "t1").sha256() != v2["data_sha256"]
    assert v2["data_sha256"] == scan_task_folder(data / "t2").sha256()
    # the stored config is the first learn's (data.num_tasks=3), the second learn gave no config
    assert v2["config"]["data"]["num_tasks"] == 3 and v2["config"]["train"]["min_steps"] == 6

    # history: both versions, classes added, images, the current one marked
    hist = history_json(model2)
    assert [(h["number"], h["parent"], h["task"], h["classes_added"], h["images"], h["current"]) for h in hist] == [
        (1, None, 1, ["a", "b"], 12, False), (2, 1, 2, ["c", "d"], 12, True)]
    assert hist[0]["accuracy"] is None  # version 1 was not evaluated; version 2 by its --eval
    evals = json.loads((model2 / "versions/0002/evaluations.json").read_text())
    assert len(evals) == 1 and hist[1]["accuracy"] == evals[0]["accuracy"]
    assert evals[0]["images"] == 12 and set(evals[0]["per_task_accuracy"]) == {"1", "2"}
    lines = ok(invoke("history", model2)).stdout.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["version", "parent", "task"]
    assert lines[1].split()[:4] == ["1", "-", "1", "12"] and lines[1].endswith("a, b")
    assert lines[2].split()[:5] == ["*", "2", "1", "2", "12"] and lines[2].endswith("c, d")
    assert f"{evals[0]['accuracy']:.2f}" in lines[2].split()


def test_learn_eval_records_what_evaluate_gives(model2, data):
    recorded = json.loads((model2 / "versions/0002/evaluations.json").read_text())[0]
    again = ContinualModel.open(model2).evaluate(data / "test", record=False)
    for key in ("images", "accuracy", "per_class_accuracy", "per_task_accuracy", "task_id_accuracy"):
        assert recorded[key] == again[key], key
    assert recorded["version"] == 2 and "confusion_matrix" not in recorded
    # the tiny task is learned: better than chance over 4 classes
    assert recorded["accuracy"] > 25.0


def _fail_the_commit(monkeypatch):
    """Make the write of model.json (the commit point) fail as on a full disk; other writes work."""
    import duallora.reporting

    real = duallora.reporting.write_json_atomic

    def write(path, obj):
        if Path(path).name == "model.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(duallora.reporting, "write_json_atomic", write)


def test_a_failed_commit_leaves_the_model_unchanged(model1, data, monkeypatch):
    before = snapshot(model1)
    with monkeypatch.context() as patch:
        _fail_the_commit(patch)
        r = invoke("learn", model1, data / "t2")
    assert r.exit_code == 2 and "No space left on device" in r.stderr, r.output
    after = snapshot(model1)
    assert {k: after.get(k) for k in before} == before  # every file as it was
    assert [h["number"] for h in history_json(model1)] == [1]
    assert not list((model1 / "versions").glob(".staging-*"))
    ok(invoke("learn", model1, data / "t2"))
    assert [(h["parent"], h["classes_added"], h["current"]) for h in history_json(model1)][-1] == (1, ["c", "d"], True)


def test_a_failed_commit_leaves_no_version_folder(model1, data, monkeypatch):
    before = snapshot(model1)
    with monkeypatch.context() as patch:
        _fail_the_commit(patch)
        assert invoke("learn", model1, data / "t2").exit_code == 2
    assert snapshot(model1) == before
    ok(invoke("learn", model1, data / "t2"))  # model1 was pruned from version 2: numbers are never reused
    assert [h["number"] for h in history_json(model1)] == [1, 3]


def test_a_failed_first_learn_leaves_no_folder_it_made(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(invoke("learn", tmp_path / "nest/deeper/model", empty), "holds no class folder")
    assert not (tmp_path / "nest").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    refused(invoke("learn", existing, empty), "holds no class folder")
    assert existing.is_dir() and list(existing.iterdir()) == []


# ------------------------------------------------------------------ 3. the lock


def test_learn_while_another_process_holds_the_lock_is_refused(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    before = snapshot(m)
    with locked(m, "test"):
        refused(invoke("learn", m, data / "t3"), "another duallora process is changing the model", str(m))
        refused(invoke("rollback", m, "1"), "another duallora process")
        assert snapshot(m) == before
    assert snapshot(m) == before
    ok(invoke("rollback", m, "1"))  # released: works again


# ------------------------------------------------------------------ 4. bad input changes nothing


def test_bad_folders_and_configs_exit_2_and_leave_the_model_as_it_was(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    before = snapshot(m)
    bad = tmp_path / "bad"
    known = grey_images(bad / "known", ["a", "new"], 3, 7)
    (bad / "empty").mkdir(parents=True)
    (bad / "imageless" / "g").mkdir(parents=True)
    (bad / "imageless" / "g" / "notes.txt").write_text("not an image")
    grey_images(bad / "imageless", ["h"], 2, 8)
    from duallora.data.sources.imagefolder import make_class_folders

    rgb = make_class_folders(bad / "rgb", classes=("g", "h"), per_class=3)  # colour 8x8 PNGs
    grey_images(bad / "unknown_eval", ["q"], 2, 9)

    cases = [
        (["learn", m, known], ["already knows class(es) 'a'", "(version 2)"]),
        (["learn", m, bad / "empty"], ["holds no class folder"]),
        (["learn", m, bad / "imageless"], ["class folder(s) 'g'", "hold no image"]),
        (["learn", m, bad / "missing"], ["does not exist"]),
        (["learn", m, rgb], ["6 of 6 images", "are colour", "grey (1-channel)", "--convert-channels"]),
        (["learn", m, data / "t3", "method.name=fecam"], ["changes method.name ('duallora' -> 'fecam')"]),
        (["learn", m, data / "t3", f"backbone.name={TINY_IMAGENET_NAME}"], ["changes backbone.name"]),
        (["learn", m, data / "t3", "data.num_tasks=7"], ["changes data.num_tasks (3 -> 7)"]),
        (["learn", m, data / "t3", "--eval", bad / "unknown_eval"], ["--eval", "'q'", "neither known"]),
    ]
    for args, fragments in cases:
        refused(invoke(*args), *fragments)
        assert snapshot(m) == before, args
    assert not list((m / "versions").glob(".staging-*"))
    # --convert-channels accepts the colour images
    ok(invoke("learn", m, rgb, "--convert-channels"))
    assert [h["classes_added"] for h in history_json(m)] == [["a", "b"], ["c", "d"], ["g", "h"]]


def test_too_few_images_for_the_method_and_a_failed_first_learn_leaves_no_model(data, tmp_path):
    few = grey_images(tmp_path / "few", ["p", "q"], 1, 10)
    fresh = tmp_path / "new-model"
    # fecam's per-class covariances need 2 images a class (FeCAM.min_images_per_class)
    refused(invoke("learn", fresh, few, *TRAIN, "method.name=fecam"),
            "'p' (1), 'q' (1)", "fewer than the 2 images per class")
    assert not fresh.exists()
    for folder in (tmp_path / "nothing-here", data / "t1" / "a"):  # missing; a class folder, not a task folder
        refused(invoke("learn", fresh, folder, *TRAIN))
        assert not fresh.exists()
    with pytest.raises(DataError, match="'a' \\(6\\), 'b' \\(6\\) .* fewer than the 7 images"):
        scan_task_folder(data / "t1", min_images=7)
    assert scan_task_folder(data / "t1", min_images=6).num_images == 12
    # an existing fecam model: refused, unchanged
    model = tmp_path / "fecam"
    ok(invoke("learn", model, data / "t1", *TRAIN, "method.name=fecam"))
    before = snapshot(model)
    refused(invoke("learn", model, few), "fewer than the 2 images per class")
    assert snapshot(model) == before
    # pooled covariances need 1
    ok(invoke("learn", tmp_path / "pooled", few, *TRAIN, "method.name=fecam", "method.fecam_covariance=pooled"))


def test_a_non_model_folder_is_refused_and_kept(data, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused(invoke("learn", other, data / "t1", *TRAIN), "is not empty and is not a duallora model directory")
    assert snapshot(other) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    refused(invoke("history", other), "neither a duallora model directory")


# ------------------------------------------------------------------ 5. rollback


def test_rollback_then_learn_branches_from_the_old_version_and_prune_deletes(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    r = ok(invoke("rollback", m, "1"))
    assert r.stdout.strip() == f"version 1 of {m} is current"
    assert [h["current"] for h in history_json(m)] == [True, False]
    assert {row["class_name"] for row in predictions(m, data / "test")} <= {"a", "b"}
    # version 1 does not know c and d: the same folder is learned again, from version 1
    ok(invoke("learn", m, data / "t2"))
    hist = history_json(m)
    assert [(h["number"], h["parent"], h["task"], h["classes_added"], h["current"]) for h in hist] == [
        (1, None, 1, ["a", "b"], False), (2, 1, 2, ["c", "d"], False), (3, 1, 2, ["c", "d"], True)]
    # the same parent, config and folder: the same model
    v2, v3 = load_file(m / "versions/0002/model.safetensors"), load_file(m / "versions/0003/model.safetensors")
    assert v2.keys() == v3.keys() and all(torch.equal(v2[k], v3[k]) for k in v2)

    refused(invoke("rollback", m, "9"), "has no version 9", "its versions are 1, 2, 3")
    r = ok(invoke("rollback", m, "1", "--prune"))
    assert r.stdout.strip() == f"version 1 of {m} is current; deleted version(s) 2, 3"
    assert [h["number"] for h in history_json(m)] == [1]
    assert sorted(p.name for p in (m / "versions").iterdir()) == ["0001"]
    assert json.loads((m / "model.json").read_text())["versions"] == [1]
    refused(invoke("rollback", m, "2"), "has no version 2")
    refused(invoke("rollback", tmp_path / "nowhere", "1"), "not a duallora model directory")


# ------------------------------------------------------------------ 6. predict --version


def test_predict_an_older_version_knows_only_its_classes(model2, data):
    new = predictions(model2, data / "test", "-k", "4")
    old = predictions(model2, data / "test", "--version", "1", "-k", "2")
    assert [r["path"] for r in new] == [r["path"] for r in old] and len(old) == 12
    assert {r["class_name"] for r in old} == {"a", "b"}
    assert {r["top1_class"] for r in old} | {r["top2_class"] for r in old} == {"a", "b"}
    # version 2 tells c and d apart from a and b (it is not a model that only knows a and b)
    assert {r["class_name"] for r in new if Path(r["path"]).parent.name in "cd"} & {"c", "d"}
    assert {r["class_name"] for r in new} <= {"a", "b", "c", "d"}
    # version 1's predictions are those of version 1's checkpoint, whatever is current
    v1 = ContinualModel.open(model2).predict_files([Path(r["path"]) for r in old], top_k=2, version=1)
    assert [p.class_name for p in v1] == [r["class_name"] for r in old]
    assert [float(r["top1_prob"]) for r in old] == pytest.approx([p.top_k[0].probability for p in v1], abs=1e-6)
    refused(invoke("predict", model2, data / "test", "--version", "3"), "has no version 3")


# ------------------------------------------------------------------ 7. format version


def test_a_newer_format_is_refused_by_every_command(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    meta = json.loads((m / "model.json").read_text())
    meta["format_version"] = 99
    (m / "model.json").write_text(json.dumps(meta))
    before = snapshot(m)
    for args in (["learn", m, data / "t3"], ["predict", m, data / "test"], ["history", m], ["rollback", m, "1"],
                 ["evaluate", m, data / "test"]):
        refused(invoke(*args), "newer duallora (model format 99", "upgrade duallora")
    assert snapshot(m) == before
    with pytest.raises(CheckpointError, match="newer"):
        ContinualModel.open(m)


# ------------------------------------------------------------------ 8. evaluate MODEL_DIR FOLDER


def test_evaluate_folder_agrees_with_predict_and_is_recorded(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    out = tmp_path / "eval"
    r = ok(invoke("evaluate", m, data / "test_mixed", "-o", out, "train.threads=1"))
    result = json.loads((out / "evaluation.json").read_text())
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "evaluation.json"]

    rows = predictions(m, data / "test_mixed", "-k", "1")
    task_of = {"a": 1, "b": 1, "c": 2, "d": 2}
    truth = [Path(row["path"]).parent.name for row in rows]
    hits = [row["class_name"] == t for row, t in zip(rows, truth)]
    assert result["images"] == len(rows) == 15 and result["version"] == 2
    assert result["accuracy"] == 100.0 * sum(hits) / 15
    assert 0 < sum(hits) < 15  # some right, some wrong: the checks below mean something
    for c in "abcd":
        mine = [h for h, t in zip(hits, truth) if t == c]
        assert result["per_class_accuracy"][c] == 100.0 * sum(mine) / len(mine), c
        assert result["per_class_images"][c] == len(mine) == (3 if c == "c" else 4)
    for task in (1, 2):
        mine = [h for h, t in zip(hits, truth) if task_of[t] == task]
        assert result["per_task_accuracy"][str(task)] == 100.0 * sum(mine) / len(mine), task
    task_hits = [int(row["task"]) == task_of[t] for row, t in zip(rows, truth)]
    assert result["task_id_accuracy"] == 100.0 * sum(task_hits) / 15
    counts = [[0] * 4 for _ in range(4)]
    for row, t in zip(rows, truth):
        counts["abcd".index(t)]["abcd".index(row["class_name"])] += 1
    assert result["confusion_matrix"] == {"classes": ["a", "b", "c", "d"], "counts": counts}
    assert f"accuracy {result['accuracy']:.2f}% on 15 images" in r.stdout

    # recorded: version 2 has its --eval (on test) and this one; history shows the latest
    recorded = json.loads((m / "versions/0002/evaluations.json").read_text())
    assert len(recorded) == 2 and recorded[1]["accuracy"] == result["accuracy"] != recorded[0]["accuracy"]
    assert history_json(m)[1]["accuracy"] == result["accuracy"]
    # version 1, never evaluated, shows its first evaluation (on its own classes)
    assert history_json(m)[0]["accuracy"] is None
    ok(invoke("evaluate", m, data / "test_ab", "--version", "1"))
    v1 = json.loads((m / "versions/0001/evaluations.json").read_text())
    assert len(v1) == 1 and v1[0]["version"] == 1 and set(v1[0]["per_task_accuracy"]) == {"1"}
    assert history_json(m)[0]["accuracy"] == v1[0]["accuracy"]
    # --no-record leaves the model's files as they are
    before = snapshot(m)
    ok(invoke("evaluate", m, data / "test", "--no-record"))
    assert snapshot(m) == before

    # classes the version does not know
    refused(invoke("evaluate", m, data / "test", "--version", "1"), "'c', 'd'", "not classes of this model version")
    refused(invoke("evaluate", m, data / "t3"), "'e', 'f'", "not classes of this model version")
    refused(invoke("evaluate", m, data / "test", "-o", out), "exists and is not an empty folder")
    assert snapshot(m) == before


# ------------------------------------------------------------------ 10. every method, one-class tasks


def _min_classes(method: str, extra: tuple[str, ...] = ()) -> int:
    from duallora.config import load_config
    from duallora.methods import get_method

    cfg = load_config(None, [f"method.name={method}", *extra])
    return get_method(method).min_classes_per_task(cfg.method)


@pytest.mark.parametrize("method", method_names())
def test_every_method_learns_a_one_class_task_then_another_or_says_why_not(method, data, tmp_path):
    root = tmp_path / "m"
    model = ContinualModel.open(root, overrides=[*TRAIN, "data.num_tasks=2", f"method.name={method}"])
    if method == "joint":  # retrains on every earlier task's images, which a model directory never keeps
        with pytest.raises(ConfigError, match="needs the images of every earlier task"):
            model.learn(data / "one", echo=lambda s: None)
        assert not root.exists()
        return
    if _min_classes(method) == 2:  # one softmax head per task: a one-class head never learns
        with pytest.raises(DataError, match="learns at least 2 classes per task"):
            model.learn(data / "one", echo=lambda s: None)
        assert not root.exists()
        return
    first = model.learn(data / "one", echo=lambda s: None)
    assert (first.number, first.parent, first.classes_added, first.images) == (1, None, ["x"], 6)
    assert [p.class_name for p in model.predict_files([data / "one/x/0.png"])] == ["x"]
    second = model.learn(data / "after_one", echo=lambda s: None)
    assert (second.number, second.parent, second.task, second.classes_added) == (2, 1, 2, ["y", "z"])
    files = [data / "one/x/1.png", data / "after_one/y/1.png", data / "after_one/z/1.png"]
    got = model.predict_files(files, top_k=3)
    assert [p.class_name for p in got] == ["x", "y", "z"]  # the one-class task's class is still predicted
    assert all(sorted(t.class_name for t in p.top_k) == ["x", "y", "z"] for p in got)
    assert model.class_names() == {0: "x", 1: "y", 2: "z"}


def test_head_methods_with_the_task_posterior_learn_a_one_class_task(data, tmp_path):
    assert _min_classes("frozen") == 2 and _min_classes("frozen", ("method.task_posterior=gate",)) == 1
    model = ContinualModel.open(tmp_path / "m", overrides=[*TRAIN, "data.num_tasks=2", "method.name=frozen",
                                                           "method.task_posterior=gate"])
    model.learn(data / "one", echo=lambda s: None)
    model.learn(data / "after_one", echo=lambda s: None)
    got = model.predict_files([data / "one/x/1.png", data / "one/x/2.png"])
    assert [p.class_name for p in got] == ["x", "x"]  # the one-class task's class wins through the posterior
    assert all(p.task == 1 for p in got)


# ------------------------------------------------------------------ 11. the Python API


def test_python_api_learn_predict_evaluate_history_rollback(model2, data, tmp_path):
    root = copy_model(model2, tmp_path / "m")
    model = ContinualModel.open(root, overrides=["train.threads=1"])
    assert model.exists and model.current == 2
    lines: list[str] = []
    v3 = model.learn(data / "t3", echo=lines.append)
    assert (v3.number, v3.parent, v3.task, v3.classes_added, v3.images, v3.current) == (3, 2, 3, ["e", "f"], 12, True)
    assert lines[0].startswith("learning task 3: 2 classes, 12 images") and lines[-1].startswith(f"version 3 of {root}")
    assert model.current == 3 and model.class_names()[5] == "f"

    files = sorted((data / "test").rglob("*.png"))
    got = model.predict_files(files, top_k=2)
    cli = predictions(root, data / "test", "-k", "2")
    assert [p.class_name for p in got] == [r["class_name"] for r in cli]
    assert [str(p.path) for p in got] == [r["path"] for r in cli]
    with pytest.raises(DataError, match="cannot read"):
        model.predict_files([data / "test"])  # a folder is not an image file

    result = model.evaluate(data / "test")
    assert result["version"] == 3 and result["images"] == 12 and set(result["per_task_accuracy"]) == {"1", "2"}
    assert result["accuracy"] == 100.0 * sum(p.class_name == p.path.parent.name for p in got) / 12
    hist = model.history()
    assert [(v.number, v.parent, v.current) for v in hist] == [(1, None, False), (2, 1, False), (3, 2, True)]
    assert hist[2].accuracy == result["accuracy"] and hist[2].learn_time_s > 0
    assert hist[2].record["data_sha256"] == scan_task_folder(data / "t3").sha256()

    assert model.rollback(2) == [] and model.current == 2
    assert model.rollback(1, prune=True) == [2, 3] and [v.number for v in model.history()] == [1]
    with pytest.raises(CheckpointError, match="has no version 3"):
        model.rollback(3)
    # after the prune, the next learn takes a number no version had: pruned numbers are never reused
    v = model.learn(data / "t2", echo=lines.append)
    assert (v.number, v.parent) == (4, 1)


# ------------------------------------------------------------------ 12. what a fresh user broke


def test_a_damaged_model_file_stops_learn_before_anything_is_removed(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    data_file = json.loads((m / "model.json").read_text())
    for damage in ({**data_file, "versions": []}, {k: v for k, v in data_file.items() if k != "current"},
                   {**data_file, "versions": [1, "x"]}, {**data_file, "format_version": 0}):
        (m / "model.json").write_text(json.dumps(damage))
        before = snapshot(m)
        for args in (("learn", m, data / "t3"), ("history", m), ("rollback", m, "1")):
            refused(invoke(*args), "is damaged")
        assert snapshot(m) == before  # both version folders are still there
    # a model.json listing fewer versions than the folders on disk: the unlisted ones are kept, not reused
    (m / "model.json").write_text(json.dumps({**data_file, "versions": [1], "current": 1}))
    ok(invoke("learn", m, data / "t3"))
    assert (m / "versions/0002/model.safetensors").is_file()
    assert [h["number"] for h in history_json(m)] == [1, 3]


def test_a_first_learn_killed_after_its_rename_is_taken_up_by_the_next_learn(model2, data, tmp_path):
    m = tmp_path / "m"
    (m / "versions").mkdir(parents=True)
    (m / ".lock").touch()
    shutil.copytree(model2 / "versions/0001", m / "versions/0001")  # renamed, never committed
    (m / "versions/.staging-99999").mkdir()
    (m / ".model.json.abc.tmp").write_text("{")
    ok(invoke("learn", m, data / "t1"))
    assert [h["number"] for h in history_json(m)] == [1]
    assert sorted(p.name for p in m.iterdir()) == [".lock", "model.json", "versions"]
    assert sorted(p.name for p in (m / "versions").iterdir()) == ["0001"]
    # a folder holding anything else is not taken
    other = tmp_path / "other"
    (other / "versions/0001").mkdir(parents=True)
    (other / "versions/0001/notes.txt").write_text("mine")
    refused(invoke("learn", other, data / "t1"), "not a duallora model directory")
    assert (other / "versions/0001/notes.txt").read_text() == "mine"


def test_evaluate_while_a_learn_holds_the_lock_prints_and_writes_but_does_not_record(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    with locked(m, "test"):
        result = invoke("evaluate", m, data / "test", "-o", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert "not recorded" in result.stderr and "accuracy" in result.stdout
    assert (tmp_path / "ev/evaluation.json").is_file()
    assert not (m / "versions/0002/evaluations.json").exists() or \
        json.loads((m / "versions/0002/evaluations.json").read_text()) == \
        json.loads((model2 / "versions/0002/evaluations.json").read_text())


def test_outputs_inside_a_model_directory_are_refused(model2, data, tmp_path):
    m = copy_model(model2, tmp_path / "m")
    before = snapshot(m)
    image = next((data / "test").rglob("*.png"))
    refused(invoke("predict", m, image, "-o", m / "model.json"), "inside the model directory")
    refused(invoke("evaluate", m, data / "test", "-o", m / "evals"), "inside the model directory")
    assert snapshot(m) == before and not (m / "evals").exists()


def test_class_names_are_unicode_normalised_and_split_folders_are_recognised(model2, data, tmp_path):
    import unicodedata

    from duallora.task_folder import scan_task_folder

    nfd = tmp_path / "nfd"
    shutil.copytree(data / "t3/e", nfd / unicodedata.normalize("NFD", "caf\u00e9"))
    assert scan_task_folder(nfd).classes == ["caf\u00e9"]
    shutil.copytree(data / "t3/e", nfd / "caf\u00e9")
    with pytest.raises(DataError, match="name the same class twice"):
        scan_task_folder(nfd)
    split = tmp_path / "split"
    shutil.copytree(data / "t3", split / "train")
    shutil.copytree(data / "t3", split / "test")
    refused(invoke("learn", tmp_path / "new", split), "looks like a data set with test and train splits")
    assert not (tmp_path / "new").exists()


def test_files_that_are_not_images_are_counted_and_named_in_the_learn_output(data, tmp_path):
    from duallora.task_folder import scan_task_folder

    folder = tmp_path / "w"
    shutil.copytree(data / "t1", folder)
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "a" / "scan.tif").write_bytes(b"II*\0")
    (folder / "a" / ".hidden.png").write_bytes(b"")  # hidden: neither learned nor counted
    found = scan_task_folder(folder)
    assert (found.skipped, found.num_images) == (2, scan_task_folder(data / "t1").num_images)
    r = ok(invoke("learn", tmp_path / "m", folder, *TRAIN))
    assert f"note: 2 file(s) in {folder} are not images of an accepted type" in r.stdout
