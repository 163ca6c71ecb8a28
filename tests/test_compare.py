"""duallora compare: spec checks, a tiny 2 variants x 2 seeds compare, reuse, summary numbers, conflicts,
dry runs, failures and resumption."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from duallora import runner
from duallora.backbones import SHIPPED_WEIGHTS
from duallora.cli import app
from duallora.compare import (
    RUN,
    SUMMARY_METRICS,
    load_spec,
    mean_std,
    parse_seeds,
    plan_compare,
    spec_from_methods,
)
from duallora.errors import ConfigError
from tests.synthetic import TASKS, make_data

ROOT = Path(__file__).resolve().parents[1]
needs_weights = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped backbone weights missing")
SUMMARY_FILES = ["runs.csv", "summary.csv", "summary.md", "comparison.png", "compare.json"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Overrides for a run of a few seconds: the synthetic class patterns as an image folder, 2 tasks."""
    root = tmp_path_factory.mktemp("patterns")
    classes = [c for task in TASKS[:2] for c in task]
    for split, per_class, seed in (("train", 6, 0), ("test", 3, 1)):
        ds = make_data(classes, per_class, seed=seed)
        images, labels = ds.tensors
        for i, (img, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i}.png")
    return ["data.dataset=imagefolder", f"data.root={root}", "data.num_tasks=2", "train.epochs=1",
            "train.batch_size=8", "train.progress=false", "train.threads=1", "train.device=cpu"]


def tiny_spec(path: Path, tiny: list[str], variants: dict, seeds=(0, 1)) -> Path:
    path.write_text(yaml.safe_dump({"seeds": list(seeds), "overrides": tiny, "variants": variants}))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny):
    """A finished compare: duallora and frozen, seeds 0 and 1."""
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip("shipped backbone weights missing")
    base = tmp_path_factory.mktemp("compare")
    spec = tiny_spec(base / "spec.yaml", tiny, {"duallora": [], "frozen": ["method.name=frozen"]})
    out = base / "out"
    result = invoke("compare", spec, "-o", out)
    assert result.exit_code == 0, result.output
    return spec, out, result.output


def copy_of(finished, tmp_path):
    spec, out, _ = finished
    target = tmp_path / "out"
    shutil.copytree(out, target)
    return spec, target


def metrics_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("runs/*/*/metrics.json"))}


def forbid_runs(monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("run_experiment must not be called")

    monkeypatch.setattr(runner, "run_experiment", no_run)


# ------------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("variants: {a: []}\nvariant: {b: []}\n", "unknown key 'variant'"),
        ("seeds: [0]\n", "`variants`"),
        ("variants: {}\n", "non-empty mapping"),
        ("variants: {'a/b': []}\n", "not usable as a folder name"),
        ("variants: {.hidden: []}\n", "not usable as a folder name"),
        ("variants: {a: [], b: []}\nvariants: {c: []}\n", "duplicate key"),
        ("variants: {gate: [], Gate: []}\n", "appears twice"),
        ("seeds: [0, 1.5]\nvariants: {a: []}\n", "not an integer"),
        ("seeds: ['1']\nvariants: {a: []}\n", "not an integer"),
        ("seeds: [true]\nvariants: {a: []}\n", "not an integer"),
        ("seeds: 3\nvariants: {a: []}\n", "non-empty list of integers"),
        ("seeds: [0, 0]\nvariants: {a: []}\n", "repeats a seed"),
        ("seeds: [-1]\nvariants: {a: []}\n", "[0, 2**32)"),
        ("overrides: [train.epochs]\nvariants: {a: []}\n", "key=value"),
        ("overrides: train.epochs=1\nvariants: {a: []}\n", "must be a list"),
        ("overrides: [seed=3]\nvariants: {a: []}\n", "seeds are given by"),
        ("variants: {a: [3]}\n", "key=value"),
        ("variants: {a: {overides: [x=1]}}\n", "unknown key 'overides'"),
        ("- a\n- b\n", "must be a mapping"),
        ("variants: {a: [\n", "cannot parse"),
    ],
)
def test_spec_errors_name_the_key_and_the_fix(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path / "spec.yaml", text))
    assert fragment in str(err.value)


def test_spec_forms_and_relative_config(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("train:\n  epochs: 1\n")
    (tmp_path / "other.yaml").write_text("train:\n  epochs: 3\n")
    spec = load_spec(write_spec(tmp_path / "spec.yaml", (
        "config: sub/base.yaml\nseeds: [4, 2]\noverrides: [train.batch_size=16]\n"
        "variants:\n  plain:\n  listed: [method.gate=soft, method.protect_gate=false]\n"
        "  mapped: {config: other.yaml, overrides: [method.name=frozen]}\n")))
    assert spec.seeds == (4, 2) and [v.name for v in spec.variants] == ["plain", "listed", "mapped"]
    runs = plan_compare(spec, tmp_path / "out", extra_overrides=["train.batch_size=8"])
    cfg = {(r.variant, r.seed): r.cfg for r in runs}
    assert [(r.variant, r.seed) for r in runs] == [(v, s) for v in ("plain", "listed", "mapped") for s in (4, 2)]
    assert cfg["plain", 4].train.epochs == 1 and cfg["plain", 4].seed == 4
    assert cfg["listed", 2].method.gate == "soft" and cfg["listed", 2].seed == 2
    assert cfg["mapped", 4].train.epochs == 3 and cfg["mapped", 4].method.name == "frozen"
    assert all(c.train.batch_size == 8 for c in cfg.values())  # the command line comes last
    assert all(r.action == RUN for r in runs)
    assert not (tmp_path / "out").exists()


def test_a_command_line_override_of_a_variant_key_wins_with_a_note(tmp_path):
    spec = load_spec(write_spec(tmp_path / "spec.yaml",
                                "variants: {soft: [method.gate=soft, method.protect_gate=false], plain: []}\n"))
    notes = []
    runs = plan_compare(spec, tmp_path / "out", extra_overrides=["method.gate=hard", "method.protect_gate=false"],
                        echo=notes.append)
    assert notes == ["note: the command-line overrides replace method.gate, method.protect_gate of variant 'soft'"]
    assert all(r.cfg.method.gate == "hard" for r in runs)


def test_default_spec_variants_are_all_valid_and_all_differ():
    spec = load_spec(ROOT / "configs" / "compare" / "default.yaml")
    runs = plan_compare(spec, Path("/nonexistent/compare"))
    assert len(runs) == len(spec.variants) * 3 and spec.seeds == (0, 1, 2)
    configs = {r.variant: r.cfg for r in runs if r.seed == 0}
    reference = configs["duallora"]
    for name, cfg in configs.items():
        assert name == "duallora" or cfg != reference, f"variant {name} does not change the config"


def test_invalid_variants_fail_before_anything_runs(tmp_path, monkeypatch):
    forbid_runs(monkeypatch)
    spec = write_spec(tmp_path / "spec.yaml", (
        "variants:\n  duallora: []\n  gate-typo: [method.gate=sofft]\n  key-typo: [method.gat=soft]\n"
        "  frozen-ranked: [method.name=frozen, method.rank_orthogonal=4]\n"))
    result = invoke("compare", spec, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    for fragment in ("3 of 4 variants have", "variant 'gate-typo'", "variant 'key-typo'", "variant 'frozen-ranked'",
                     "method.gate='sofft'", "unknown config key 'method.gat' in the overrides of variant 'key-typo'",
                     "does not use it"):
        assert fragment in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--methods", "duallora,frozen", "SPEC"], "not both"),
        ([], "nothing to compare"),
        (["--methods", "duallora,duallora"], "appears twice"),
        (["--methods", "duallora,nope"], "method.name='nope' is not supported"),
        (["SPEC", "--only", "fecam"], "--only fecam: no such variant"),
        (["SPEC", "--seeds", "0,x"], "--seeds"),
        (["SPEC", "--seeds", "1,1"], "repeats a seed"),
        (["SPEC", "seed=2"], "seeds are given by"),
        (["SPEC", "a.yaml"], "one compare spec file"),
        (["/nonexistent/spec.yaml"], "does not exist"),
        (["SPEC", "--summary-only"], "no runs to summarise"),
    ],
)
def test_command_line_errors(tmp_path, args, fragment):
    spec = write_spec(tmp_path / "spec.yaml", "variants: {duallora: [], frozen: [method.name=frozen]}\n")
    result = invoke("compare", *[spec if a == "SPEC" else a for a in args], "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (tmp_path / "out").exists()


def test_seeds_and_methods_helpers():
    assert parse_seeds("0,1, 2") == (0, 1, 2)
    spec = spec_from_methods(["duallora", "fecam"], (3,))
    assert [(v.name, v.overrides) for v in spec.variants] == [("duallora", ("method.name=duallora",)),
                                                               ("fecam", ("method.name=fecam",))]
    assert spec.seeds == (3,)


def test_mean_std_is_numpy_with_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == (float(np.mean([1.0, 2.0, 4.0])), float(np.std([1.0, 2.0, 4.0], ddof=1)))
    mean, std = mean_std([3.5])
    assert mean == 3.5 and math.isnan(std)
    assert all(math.isnan(v) for v in mean_std([1.0, math.nan]))  # a missing value is not guessed
    assert all(math.isnan(v) for v in mean_std([]))


# --------------------------------------------------------------------------------------- a real compare


@needs_weights
def test_compare_writes_every_file(finished):
    _, out, output = finished
    for name in SUMMARY_FILES:
        assert (out / name).is_file(), name
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for v in ("duallora", "frozen"):
        for s in (0, 1):
            folder = out / "runs" / v / f"seed-{s}"
            m = json.loads((folder / "metrics.json").read_text())
            assert m["seed"] == s and m["method"] == v
            # 2 tasks x 2 classes x 3 test images were evaluated after the last task
            assert m["inference_ms_per_image"] == pytest.approx(1000 * m["final_eval_time_s"] / 12)
            assert m["inference_ms_per_image"] > 0
            assert not Path(str(folder) + ".partial").exists()
    for line in ["[1/4] duallora seed 0", "[2/4] duallora seed 1", "[3/4] frozen seed 0", "[4/4] frozen seed 1"]:
        assert line in output
    assert output.count("final accuracy") == 4
    md = (out / "summary.md").read_text()
    assert "| variant | method | final accuracy | AIA | forgetting | task-id | train time (s) | inference (ms/image) " \
           "| seeds |" in md
    assert "| frozen | frozen |" in md and "`method.name=frozen`" in md and "Seeds: 0, 1." in md
    assert " ± " in md and "2/2" in md
    record = json.loads((out / "compare.json").read_text())
    assert record["seeds"] == [0, 1] and list(record["variants"]) == ["duallora", "frozen"]


@needs_weights
def test_summary_numbers_equal_the_runs_metrics_exactly(finished):
    _, out, _ = finished
    metrics = {(v, s): json.loads((out / "runs" / v / f"seed-{s}" / "metrics.json").read_text())
               for v in ("duallora", "frozen") for s in (0, 1)}
    with open(out / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert [(r["variant"], int(r["seed"])) for r in runs] == list(metrics)
    for r in runs:
        m = metrics[r["variant"], int(r["seed"])]
        assert r["folder"] == f"runs/{r['variant']}/seed-{r['seed']}"
        for key in ("final_accuracy", "forgetting", "task_id_accuracy", "train_time_s", "inference_ms_per_image"):
            assert float(r[key]) == m[key], key
        assert r["num_tasks"] == "2"
    with open(out / "summary.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["duallora", "frozen"]
    for v, row in rows.items():
        assert row["n_seeds"] == "2" and row["seeds"] == "0 1" and row["method"] == v
        for metric in SUMMARY_METRICS:
            values = np.array([metrics[v, s][metric] for s in (0, 1)], dtype=np.float64)
            assert float(row[f"{metric}_mean"]) == np.mean(values), metric
            assert float(row[f"{metric}_std"]) == np.std(values, ddof=1), metric


@needs_weights
def test_rerun_reuses_every_finished_run(finished, tmp_path, monkeypatch):
    spec, out = copy_of(finished, tmp_path)
    before = metrics_bytes(out)
    forbid_runs(monkeypatch)
    result = invoke("compare", spec, "-o", out, "--no-progress")  # progress does not change results
    assert result.exit_code == 0, result.output
    assert result.output.count(": reused (final accuracy") == 4
    assert metrics_bytes(out) == before
    dry = invoke("compare", spec, "-o", out, "--dry-run")
    assert dry.exit_code == 0 and dry.output.count("reused") >= 4 and "0 to run" in dry.output


@needs_weights
def test_changed_config_is_refused_without_overwrite(finished, tmp_path, monkeypatch):
    spec, out = copy_of(finished, tmp_path)
    before = metrics_bytes(out)
    real = runner.run_experiment
    forbid_runs(monkeypatch)
    result = invoke("compare", spec, "-o", out, "train.lr=0.001")
    assert result.exit_code == 2, result.output
    assert "4 existing run folders in" in result.output and "--overwrite" in result.output
    assert "train.lr: run has 0.0005, given 0.001" in result.output
    assert metrics_bytes(out) == before
    # with --overwrite (and --only) the frozen runs are redone with the new config; duallora's are left alone
    monkeypatch.setattr(runner, "run_experiment", real)
    result = invoke("compare", spec, "-o", out, "train.lr=0.001", "--overwrite", "--only", "frozen")
    assert result.exit_code == 0, result.output
    assert "replacing the old folder" in result.output
    for s in (0, 1):
        stored = yaml.safe_load((out / "runs" / "frozen" / f"seed-{s}" / "config.yaml").read_text())
        assert stored["train"]["lr"] == 0.001
        assert (out / "runs" / "duallora" / f"seed-{s}" / "metrics.json").read_bytes() == \
            before[f"runs/duallora/seed-{s}/metrics.json"]
    with open(out / "summary.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert rows["frozen"]["n_seeds"] == "2" and rows["duallora"]["n_seeds"] == "0"  # duallora differs now
    assert "not selected by --only" in (out / "summary.md").read_text()


@needs_weights
def test_run_from_an_older_version_is_not_reused(finished, tmp_path, monkeypatch):
    # a config.yaml without a key added since (here method.stat_images) means the run used the old
    # behaviour; the key's current default would hide that, so the run counts as different
    spec, out = copy_of(finished, tmp_path)
    path = out / "runs" / "duallora" / "seed-0" / "config.yaml"
    stored = yaml.safe_load(path.read_text())
    del stored["method"]["stat_images"]
    path.write_text(yaml.safe_dump(stored))
    forbid_runs(monkeypatch)
    result = invoke("compare", spec, "-o", out)
    assert result.exit_code == 2, result.output
    assert "method.stat_images: not in the run's config (made by an older version" in result.output


@needs_weights
def test_dry_run_runs_and_writes_nothing(tmp_path, tiny, monkeypatch):
    forbid_runs(monkeypatch)
    spec = tiny_spec(tmp_path / "spec.yaml", tiny, {"duallora": [], "frozen": ["method.name=frozen"]})
    result = invoke("compare", spec, "-o", tmp_path / "out", "--dry-run", "--seeds", "0,1,2")
    assert result.exit_code == 0, result.output
    assert result.output.count("to run") >= 6 and str(tmp_path / "out" / "runs" / "frozen" / "seed-2") in result.output
    assert "6 runs in" in result.output
    assert not (tmp_path / "out").exists()


@needs_weights
def test_a_failing_variant_lets_the_others_finish(tmp_path, tiny):
    spec = tiny_spec(tmp_path / "spec.yaml", tiny, {"broken": ["data.root=/nonexistent/patterns"],
                                                    "frozen": ["method.name=frozen"]}, seeds=(0,))
    out = tmp_path / "out"
    result = invoke("compare", spec, "-o", out)
    assert result.exit_code == 1, result.output
    assert "[1/2] broken seed 0" in result.output and "failed: " in result.output
    assert "/nonexistent/patterns" in result.output
    assert "1 of 2 runs failed (broken seed 0)" in result.output
    assert (out / "runs" / "frozen" / "seed-0" / "metrics.json").is_file()
    with open(out / "runs.csv") as fh:
        assert [r["variant"] for r in csv.DictReader(fh)] == ["frozen"]
    with open(out / "summary.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert rows["frozen"]["n_seeds"] == "1" and rows["frozen"]["final_accuracy_std"] == ""  # one seed: no std
    assert rows["broken"]["n_seeds"] == "0" and rows["broken"]["final_accuracy_mean"] == ""
    md = (out / "summary.md").read_text()
    assert "broken seed 0: failed:" in md and "0/1" in md


@needs_weights
def test_interrupted_compare_leaves_a_summary_and_resumes(finished, tmp_path, monkeypatch):
    spec, out = copy_of(finished, tmp_path)
    before = json.loads((out / "runs" / "frozen" / "seed-1" / "metrics.json").read_text())
    # an interrupted run: its staging folder with the first task's checkpoint only
    folder = out / "runs" / "frozen" / "seed-1"
    partial = Path(str(folder) + ".partial")
    folder.rename(partial)
    (partial / "metrics.json").unlink()
    (partial / "checkpoints" / "task_2.safetensors").unlink()
    # compare is killed (Ctrl-C) in that run: the summary still covers the three finished runs
    real = runner.run_experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    result = invoke("compare", spec, "-o", out)
    assert result.exit_code == 130
    with open(out / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert "frozen seed 1: not run yet" in (out / "summary.md").read_text()
    monkeypatch.setattr(runner, "run_experiment", real)
    dry = invoke("compare", spec, "-o", out, "--dry-run")
    assert "to resume" in dry.output
    result = invoke("compare", spec, "-o", out, "--verbose")
    assert result.exit_code == 0, result.output
    assert "[4/4] frozen seed 1 (resuming)" in result.output and "resuming after task 1" in result.output
    after = json.loads((out / "runs" / "frozen" / "seed-1" / "metrics.json").read_text())
    assert after["accuracy_matrix"] == before["accuracy_matrix"] and after["resumed_after_task"] == 1
    with open(out / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


@needs_weights
def test_inference_only_variants_are_derived_and_equal_trained_runs(finished, tmp_path, tiny):
    _, out = copy_of(finished, tmp_path)
    variants = {"duallora": [], "frozen": ["method.name=frozen"],
                "no-calibration": ["method.calibration=none"], "class-tau": ["method.class_tau=0.01"],
                "gate-hard": ["method.gate=hard", "method.protect_gate=false"]}  # a training change: never derived
    spec = tiny_spec(tmp_path / "spec.yaml", tiny, variants, seeds=(0,))
    dry = invoke("compare", spec, "-o", out, "--seeds", "0", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.output.count("to derive from duallora's checkpoints") == 2 and "2 derived from checkpoints" in dry.output
    result = invoke("compare", spec, "-o", out, "--seeds", "0")
    assert result.exit_code == 0, result.output
    assert result.output.count("inference-only change from duallora") == 2
    for name in ("no-calibration", "class-tau"):
        m = json.loads((out / "runs" / name / "seed-0" / "metrics.json").read_text())
        assert m["derived_from"] == "../../duallora/seed-0"  # relative: the compare folder can move
        assert m["train_time_s"] == json.loads((out / "runs/duallora/seed-0/metrics.json").read_text())["train_time_s"]
    assert "derived_from" not in json.loads((out / "runs/gate-hard/seed-0/metrics.json").read_text())
    derived = out / "runs" / "no-calibration" / "seed-0"
    r = invoke("evaluate", "--checkpoint", derived, "--no-progress")
    assert r.exit_code == 2 and "was derived from the checkpoints of" in r.output
    # history and predict --version name the run whose versions they are (the path normalised)
    source = str(out / "runs" / "duallora" / "seed-0")
    r = invoke("history", derived)
    assert r.exit_code == 2 and f"`duallora history {source}` lists them" in r.output, r.output
    r = invoke("predict", derived, "--version", "1", tmp_path)
    assert r.exit_code == 2 and f"pick a version of {source}" in r.output, r.output
    # without --version it predicts with the source's last checkpoint under its own config (no calibration)
    image = sorted((Path(tiny[1].split("=", 1)[1]) / "test").rglob("*.png"))[0]
    r = invoke("predict", derived, image, "--format", "json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["checkpoint"].endswith("task_2.safetensors") and "duallora" in record["checkpoint"]
    # trained from scratch (--no-derive) they give the same accuracy matrices, to the bit
    trained = tmp_path / "trained"
    result = invoke("compare", spec, "-o", trained, "--seeds", "0", "--only", "no-calibration,class-tau",
                    "--no-derive")
    assert result.exit_code == 0, result.output
    assert "inference-only change" not in result.output
    for name in ("no-calibration", "class-tau"):
        a = json.loads((out / "runs" / name / "seed-0" / "metrics.json").read_text())
        b = json.loads((trained / "runs" / name / "seed-0" / "metrics.json").read_text())
        assert a["accuracy_matrix"] == b["accuracy_matrix"]
        assert a["task_id_accuracy_after_task"] == b["task_id_accuracy_after_task"]


def test_posterior_variant_is_derived_from_its_base_method_and_equals_a_trained_run(finished, tmp_path, tiny):
    _, out = copy_of(finished, tmp_path)
    variants = {"frozen": ["method.name=frozen"],
                "frozen-posterior": ["method.name=frozen", "method.task_posterior=gate"]}
    spec = tiny_spec(tmp_path / "spec.yaml", tiny, variants, seeds=(0,))
    result = invoke("compare", spec, "-o", out, "--seeds", "0")
    assert result.exit_code == 0, result.output
    assert "inference-only change from frozen" in result.output
    m = json.loads((out / "runs/frozen-posterior/seed-0/metrics.json").read_text())
    base = json.loads((out / "runs/frozen/seed-0/metrics.json").read_text())
    assert m["derived_from"] == "../../frozen/seed-0"
    assert "method.task_posterior" in m["derived_keys"] and m["derived_statistics_time_s"] > 0
    # the statistics passes gathered again count as training time
    assert m["train_time_s"] == pytest.approx(base["train_time_s"] + m["derived_statistics_time_s"])
    trained = tmp_path / "trained"
    result = invoke("compare", spec, "-o", trained, "--seeds", "0", "--only", "frozen-posterior", "--no-derive")
    assert result.exit_code == 0, result.output
    t = json.loads((trained / "runs/frozen-posterior/seed-0/metrics.json").read_text())
    assert "derived_from" not in t
    assert m["accuracy_matrix"] == t["accuracy_matrix"]
    assert m["task_id_accuracy_after_task"] == t["task_id_accuracy_after_task"]
    assert m["task_id_accuracy_after_task"] != base["task_id_accuracy_after_task"]


def test_compare_uses_only_public_helpers_of_runner_and_reporting():
    """The compare package uses no underscore name of duallora.runner or duallora.reporting."""
    import ast

    import duallora.compare

    private = []
    for path in sorted(Path(duallora.compare.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("duallora.runner", "duallora.reporting"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in ("runner", "reporting") and node.attr.startswith("_")):
                private.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not private, private


@needs_weights
def test_summary_only_runs_nothing_and_summarises_the_finished_runs(finished, tmp_path, tiny, monkeypatch):
    _, out = copy_of(finished, tmp_path)
    variants = {"duallora": [], "frozen": ["method.name=frozen"], "fecam": ["method.name=fecam"]}
    spec = tiny_spec(tmp_path / "spec.yaml", tiny, variants, seeds=(0, 1, 2))

    def never(*args, **kwargs):
        raise AssertionError("--summary-only must not run anything")

    monkeypatch.setattr(runner, "run_experiment", never)
    result = invoke("compare", spec, "-o", out, "--summary-only")
    assert result.exit_code == 0, result.output
    assert not (out / "runs" / "fecam").exists()
    with open(out / "summary.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert rows["duallora"]["n_seeds"] == "2" and rows["frozen"]["n_seeds"] == "2" and rows["fecam"]["n_seeds"] == "0"
    assert "4 of 9 runs finished (0 run now)" in result.output
