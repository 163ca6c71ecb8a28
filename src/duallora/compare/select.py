"""Model selection on validation data, test numbers for the chosen variant only.

A compare spec's ``select:`` section (:class:`~duallora.compare.spec.Selection`) groups variants as
candidates (e.g. one method at several learning rates). Every candidate runs as usual but with
``data.evaluate_on=validation``: it trains on the training images minus the held-out validation share
(``data.validation_fraction``) and its ``metrics.json`` holds validation numbers. After the runs,
:func:`select_and_test` picks per group the candidate with the best mean validation metric over the
seeds and evaluates *that candidate's* task checkpoints on the test split
(:func:`duallora.runner.evaluate_checkpoints` with ``data.evaluate_on=test``: the same trained
models, no retraining). No other candidate is ever evaluated on the test split, so the test numbers
play no part in any choice. Output, each file written atomically:

* ``DIR/selected/<group>/seed-<s>/metrics.json``: the chosen run's test metrics (accuracy matrix,
  final and average incremental accuracy, forgetting, ...), with ``selected_from`` (its run folder,
  relative to DIR) and the source run's training time;
* ``DIR/selection.json`` and ``DIR/selection.md``: per group every candidate's validation mean and
  std, the choice, and the chosen variant's test mean and std.

A test record is reused when the source run's ``metrics.json`` is unchanged (its sha256 is stored).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from duallora.compare.spec import SELECT_METRICS, CompareSpec, Echo, Selection

#: Metrics reported per group in selection.json / selection.md (test split of the chosen variant).
TEST_METRICS = ("final_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer",
                "task_id_accuracy", "train_time_s")


def rank_candidates(selection: Selection, group: str, seeds: Sequence[int],
                    metrics: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict[str, Any]:
    """Rank one group's candidates by their validation metric (mean over ``seeds``).

    Args:
        selection: the spec's selection; group: one of its group names; seeds: the compare's seeds.
        metrics: ``(variant, seed) -> metrics.json`` of finished runs (validation numbers).

    Returns:
        ``{"candidates": {name: {"mean", "std", "seeds"}}, "chosen": name or None, "complete": bool}``;
        ``chosen`` is None until every candidate has finished every seed with a finite value.
        Higher is better except for ``forgetting``; a tie goes to the candidate listed first.
    """
    from duallora.compare.summary import mean_std

    members = dict(selection.groups)[group]
    higher = SELECT_METRICS[selection.metric]
    table: dict[str, Any] = {}
    complete = True
    for name in members:
        values = [metrics[(name, s)].get(selection.metric) for s in seeds if (name, s) in metrics]
        done = len(values) == len(seeds) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        complete &= done
        mean, std = mean_std([float(v) if isinstance(v, (int, float)) else math.nan for v in values])
        table[name] = {"mean": mean, "std": std, "seeds": len(values)}
    chosen = None
    if complete:
        chosen = members[0]
        for name in members[1:]:
            a, b = table[name]["mean"], table[chosen]["mean"]
            if (a > b) if higher else (a < b):
                chosen = name
    return {"candidates": table, "chosen": chosen, "complete": complete}


def _test_record(source: Path, output: Path, echo: Echo) -> dict[str, Any]:
    """The test metrics of finished run ``source`` (its checkpoints on the test split), cached in ``output``."""
    from duallora import runner
    from duallora.backbones import file_sha256
    from duallora.compare.plan import read_metrics
    from duallora.reporting import write_json_atomic

    path = output / "metrics.json"
    source_sha = file_sha256(source / "metrics.json")
    if path.is_file():
        try:
            held = read_metrics(output)
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed
            held = {}
        if held.get("source_metrics_sha256") == source_sha:
            return held
    echo(f"  evaluating {source} on the test split")
    m = runner.evaluate_checkpoints(source, echo=lambda line: None, progress=False,
                                    overrides={"data.evaluate_on": "test"})
    src = read_metrics(source)
    for key in ("matches_stored_record", "max_difference_to_metrics_json", "checkpoints"):
        m.pop(key, None)
    m.update({
        "evaluated_on": "test",
        "selected_from": str(source),
        "source_metrics_sha256": source_sha,
        "validation_final_accuracy": src.get("final_accuracy"),
        "train_time_s": src.get("train_time_s"),
        "method": src.get("method"),
        "seed": src.get("seed"),
    })
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, m)
    return m


def select_and_test(output: Path, spec: CompareSpec, seeds: Sequence[int],
                    metrics: Mapping[tuple[str, int], Mapping[str, Any]], echo: Echo = print) -> dict[str, Any]:
    """Choose each group's variant on validation, evaluate it on test, write ``selection.{json,md}``.

    Args:
        output: the compare folder DIR (run folders ``DIR/runs/<variant>/seed-<s>``).
        spec: the spec (``spec.selection`` must be set).
        seeds: the compare's seeds.
        metrics: ``(variant, seed) -> metrics.json`` of the finished runs.
        echo: where progress lines go.

    Returns:
        the ``selection.json`` content: ``{"metric", "split_used_for_choice": "validation",
        "groups": {group: {"candidates", "chosen", "complete", "test": {metric: {"mean", "std"}},
        "test_runs": [folders]}}}``. A group whose candidates have not all finished has no choice and
        no test numbers yet.

    Raises:
        CheckpointError, DataError: a chosen run's checkpoints cannot be evaluated.
    """
    from duallora.compare.plan import run_folder
    from duallora.compare.summary import mean_std
    from duallora.reporting import write_json_atomic, write_text_atomic

    selection = spec.selection
    assert selection is not None
    output = Path(output)
    record: dict[str, Any] = {"metric": selection.metric, "split_used_for_choice": "validation",
                              "seeds": list(seeds), "test": selection.test, "groups": {}}
    for group, _ in selection.groups:
        ranked = rank_candidates(selection, group, seeds, metrics)
        entry = dict(ranked, test={}, test_runs=[])
        if ranked["chosen"] is not None and selection.test:
            tests = []
            for s in seeds:
                src = run_folder(output, ranked["chosen"], s)
                dst = output / "selected" / group / f"seed-{s}"
                tests.append(_test_record(src, dst, echo))
                entry["test_runs"].append(str(dst.relative_to(output)))
            for key in TEST_METRICS:
                mean, std = mean_std([t.get(key) if isinstance(t.get(key), (int, float)) else math.nan
                                      for t in tests])
                entry["test"][key] = {"mean": mean, "std": std}
        record["groups"][group] = entry
    write_json_atomic(output / "selection.json", record)
    write_text_atomic(output / "selection.md", selection_markdown(record))
    return record


def _pm(cell: Mapping[str, Any]) -> str:
    mean, std = cell.get("mean"), cell.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def selection_markdown(record: Mapping[str, Any]) -> str:
    """``selection.md``: the test table of the chosen variants, then each group's validation ranking."""
    metric = record["metric"]
    lines = [
        "# Selection on validation data, test numbers of the chosen variants",
        "",
        f"Each group's variant was chosen by its mean validation `{metric}` over seeds {record['seeds']}; "
        + ("only the chosen variant was evaluated on the test split (its own task checkpoints, no retraining)."
           if record.get("test", True) else "no variant was evaluated on the test split (`select.test: false`)."),
        "",
    ]
    tested = record.get("test", True)
    test_keys = ("final_accuracy", "average_incremental_accuracy", "forgetting", "task_id_accuracy")
    head = ["group", "chosen", f"validation {metric}"]
    if tested:
        head += ["test final accuracy", "test avg. incremental accuracy", "test forgetting", "test task-id accuracy"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, e in record["groups"].items():
        chosen = e["chosen"]
        cells = [group, chosen or "-", _pm(e["candidates"][chosen]) if chosen else "(not all candidates finished)"]
        if tested:
            cells += [_pm(e["test"].get(k, {})) for k in test_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Candidates (validation split)", ""]
    for group, e in record["groups"].items():
        lines.append(f"- **{group}**: " + ", ".join(
            f"{name} {_pm(c)}{' (chosen)' if name == e['chosen'] else ''}" + ("" if c["seeds"] == len(record["seeds"])
                                                                           else f" [{c['seeds']} seeds]")
            for name, c in e["candidates"].items()))
    return "\n".join(lines) + "\n"
