"""duallora compare's selection on validation data: the spec's ``select:`` section, the ranking, and a
tiny compare whose chosen variant alone is evaluated on the test split."""

import json
import math

import pytest
import yaml

from duallora import runner
from duallora.backbones import SHIPPED_WEIGHTS
from duallora.compare import load_spec, plan_compare
from duallora.compare.select import rank_candidates, selection_markdown
from duallora.compare.spec import Selection
from duallora.config import load_config
from duallora.errors import ConfigError
from tests.test_compare import invoke, tiny  # noqa: F401 - the module fixture

needs_weights = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped backbone weights missing")


@pytest.mark.parametrize(
    "select, fragment",
    [
        ("[a]", "must be a mapping"),
        ("{metric: loss, groups: {g: [a]}}", "choose one of final_accuracy"),
        ("{groups: {g: [c]}}", "names 'c', which is not a variant"),
        ("{groups: {g: [a], h: [a, b]}}", "is in groups 'g' and 'h'"),
        ("{groups: {}}", "non-empty mapping"),
        ("{groups: {g: []}}", "at least one variant"),
        ("{groups: {g: [a]}, metrc: x}", "unknown key 'metrc'"),
        ("{groups: {'g/h': [a]}}", "not usable as a folder name"),
        ("{groups: {g: [a]}, test: maybe}", "must be true or false"),
    ],
)
def test_select_errors_name_the_cause(tmp_path, select, fragment):
    path = tmp_path / "spec.yaml"
    path.write_text(f"variants: {{a: [], b: [method.name=frozen]}}\nselect: {select}\n")
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert fragment in str(err.value)


def test_candidates_run_on_validation_others_on_test(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("overrides: [data.validation_fraction=0.1]\n"
                    "variants: {a: [], b: [train.lr=1e-3], c: [method.name=frozen]}\n"
                    "select: {groups: {duallora: [a, b]}}\n")
    spec = load_spec(path)
    assert spec.selection.group_of("b") == "duallora" and spec.selection.group_of("c") is None
    planned = {p.variant: p.cfg for p in plan_compare(spec, tmp_path / "out")}
    assert planned["a"].data.evaluate_on == "validation" and planned["b"].data.evaluate_on == "validation"
    assert planned["c"].data.evaluate_on == "test"
    # the same training either way: only the evaluated split differs
    assert planned["a"].data.validation_fraction == planned["c"].data.validation_fraction == 0.1


def test_candidates_need_a_validation_split(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("variants: {a: []}\nselect: {groups: {g: [a]}}\n")
    with pytest.raises(ConfigError) as err:
        plan_compare(load_spec(path), tmp_path / "out")
    assert "validation_fraction" in str(err.value) and "`select`" in str(err.value)


def test_ranking_picks_the_best_mean_and_waits_for_every_seed():
    sel = Selection(groups=(("g", ("a", "b", "c")),))
    m = {("a", 0): {"final_accuracy": 50.0}, ("a", 1): {"final_accuracy": 60.0},   # mean 55
         ("b", 0): {"final_accuracy": 58.0}, ("b", 1): {"final_accuracy": 54.0},   # mean 56: best
         ("c", 0): {"final_accuracy": 70.0}, ("c", 1): {"final_accuracy": 42.0}}   # mean 56: a tie, listed later
    r = rank_candidates(sel, "g", [0, 1], m)
    assert r["chosen"] == "b" and r["complete"]
    assert r["candidates"]["a"]["mean"] == pytest.approx(55.0)
    assert r["candidates"]["a"]["std"] == pytest.approx(math.sqrt(50.0))
    # lower forgetting is better
    f = {k: {"forgetting": v["final_accuracy"]} for k, v in m.items()}
    by_forgetting = Selection(groups=(("g", ("a", "b", "c")),), metric="forgetting")
    assert rank_candidates(by_forgetting, "g", [0, 1], f)["chosen"] == "a"
    # a missing seed or a NaN: no choice yet
    del m[("c", 1)]
    assert rank_candidates(sel, "g", [0, 1], m)["chosen"] is None
    m[("c", 1)] = {"final_accuracy": float("nan")}
    r = rank_candidates(sel, "g", [0, 1], m)
    assert r["chosen"] is None and not r["complete"]
    assert "not all candidates finished" in selection_markdown(
        {"metric": "final_accuracy", "seeds": [0, 1], "groups": {"g": dict(r, test={}, test_runs=[])}})


@needs_weights
def test_compare_selects_on_validation_and_tests_only_the_choice(tmp_path, tiny):  # noqa: F811
    base = tiny + ["data.validation_fraction=0.34", "method.name=frozen"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "seeds": [0], "overrides": base,
        "variants": {"slow": ["train.head_lr=1e-6"], "fast": ["train.head_lr=5e-2"], "other": []},
        "select": {"metric": "final_accuracy", "groups": {"frozen": ["slow", "fast"]}},
    }))
    out = tmp_path / "out"
    result = invoke("compare", spec, "-o", out)
    assert result.exit_code == 0, result.output
    sel = json.loads((out / "selection.json").read_text())
    g = sel["groups"]["frozen"]
    val = {v: json.loads((out / "runs" / v / "seed-0" / "metrics.json").read_text()) for v in ("slow", "fast")}
    assert g["candidates"]["slow"]["mean"] == pytest.approx(val["slow"]["final_accuracy"])
    best = max(("slow", "fast"), key=lambda v: (val[v]["final_accuracy"], v == "slow"))
    assert g["chosen"] == best
    # only the chosen variant has test numbers
    assert sorted(p.name for p in (out / "selected").iterdir()) == ["frozen"]
    test = json.loads((out / "selected" / "frozen" / "seed-0" / "metrics.json").read_text())
    assert test["evaluated_on"] == "test" and test["selected_from"].endswith(f"runs/{best}/seed-0")
    assert g["test"]["final_accuracy"]["mean"] == pytest.approx(test["final_accuracy"])
    # ... and they equal a run of the chosen config trained the same way and evaluated on test
    cfg = load_config(None, base + [f"train.head_lr={'1e-6' if best == 'slow' else '5e-2'}", "seed=0"])
    assert cfg.data.evaluate_on == "test"
    m = runner.run_experiment(cfg, tmp_path / "direct", echo=lambda line: None)
    flat = lambda R: [math.nan if v is None else v for row in R for v in row]  # noqa: E731
    assert flat(test["accuracy_matrix"]) == pytest.approx(flat(m["accuracy_matrix"]), abs=1e-9, nan_ok=True)
    assert test["final_accuracy"] == pytest.approx(m["final_accuracy"], abs=1e-9)
    assert (out / "selection.md").read_text().count("| frozen |") == 1
    # run again: everything reused, the test record too
    before = (out / "selected" / "frozen" / "seed-0" / "metrics.json").stat().st_mtime_ns
    again = invoke("compare", spec, "-o", out)
    assert again.exit_code == 0, again.output
    assert (out / "selected" / "frozen" / "seed-0" / "metrics.json").stat().st_mtime_ns == before


@needs_weights
def test_select_test_false_chooses_without_touching_the_test_split(tmp_path, tiny, monkeypatch):  # noqa: F811
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "seeds": [0], "overrides": tiny + ["data.validation_fraction=0.34", "method.name=fecam"],
        "variants": {"a": ["method.tau_id=0.02"], "b": ["method.tau_id=0.5"]},
        "select": {"groups": {"fecam": ["a", "b"]}, "test": False},
    }))

    def no_test(*args, **kwargs):
        raise AssertionError("nothing may be evaluated on the test split")

    monkeypatch.setattr(runner, "evaluate_checkpoints", no_test)
    out = tmp_path / "out"
    result = invoke("compare", spec, "-o", out)
    assert result.exit_code == 0, result.output
    sel = json.loads((out / "selection.json").read_text())
    assert sel["test"] is False and sel["groups"]["fecam"]["chosen"] in ("a", "b")
    assert sel["groups"]["fecam"]["test"] == {} and not (out / "selected").exists()
    assert "no variant was evaluated on the test split" in (out / "selection.md").read_text()


def test_choice_follows_validation_even_where_the_test_split_would_choose_otherwise(tmp_path, monkeypatch):
    """Candidate ``a`` is best on validation, ``b`` would be best on test: ``a`` is chosen, its test
    numbers are reported, and ``b`` is never evaluated on the test split."""
    from duallora.compare.select import select_and_test
    from duallora.compare.spec import CompareSpec

    validation = {"a": 60.0, "b": 50.0}
    test = {"a": 40.0, "b": 70.0}
    for name, value in validation.items():
        for s in (0, 1):
            folder = tmp_path / "runs" / name / f"seed-{s}"
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({"final_accuracy": value + s, "train_time_s": 1.0}))
    evaluated = []

    def fake_evaluate(source, **kwargs):
        assert kwargs["overrides"] == {"data.evaluate_on": "test"}
        evaluated.append(source)
        return {"final_accuracy": test[source.parent.name] + int(source.name[-1])}

    monkeypatch.setattr(runner, "evaluate_checkpoints", fake_evaluate)
    spec = CompareSpec(variants={"a": (), "b": ()}, seeds=(0, 1),
                       selection=Selection(groups=(("g", ("a", "b")),)))
    metrics = {(v, s): json.loads((tmp_path / "runs" / v / f"seed-{s}" / "metrics.json").read_text())
               for v in validation for s in (0, 1)}
    record = select_and_test(tmp_path, spec, [0, 1], metrics, echo=lambda line: None)
    g = record["groups"]["g"]
    assert g["chosen"] == "a" and record["split_used_for_choice"] == "validation"
    assert g["candidates"]["a"]["mean"] == pytest.approx(60.5) and g["candidates"]["b"]["mean"] == pytest.approx(50.5)
    assert g["test"]["final_accuracy"]["mean"] == pytest.approx(40.5)  # a's test numbers, not b's 70.5
    assert sorted(p.parent.name for p in evaluated) == ["a", "a"]
