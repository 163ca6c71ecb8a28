"""The compare summary: ``runs.csv``, ``summary.csv``, ``summary.md`` and ``comparison.png``.

Everything is computed from the finished runs' ``metrics.json`` files as stored (no rounding before
the mean; the sample std, ``ddof=1``); every file is written atomically (a temporary file and a
rename), so a compare that is killed leaves a valid summary of the runs finished so far. The metric
definitions are in docs/compare.md, "Summary files and metric definitions".
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from duallora.compare.plan import CONFLICT, SKIP, PlannedRun
from duallora.compare.spec import CompareSpec
from duallora.reporting import new_figure, save_png, write_text_atomic

#: Metrics summarised per variant in summary.csv (``<metric>_mean``, ``<metric>_std``).
SUMMARY_METRICS = (
    "final_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "task_id_accuracy",
    "train_time_s",
    "eval_time_s",
    "inference_ms_per_image",
)
#: Scalar metrics of every run in runs.csv.
RUN_METRICS = (
    "final_accuracy",
    "final_accuracy_task_mean",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "task_id_accuracy",
    "num_tasks",
    "train_time_s",
    "eval_time_s",
    "final_eval_time_s",
    "inference_ms_per_image",
    "wall_time_s",
)


def _number(value: Any) -> float:
    """A metrics.json value as a float: None/missing/non-number -> NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _cell(value: Any) -> str:
    """CSV cell: an int as is; None/NaN/non-number -> empty; a float as the shortest text that reads
    back to the same float."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = _number(value)
    return "" if math.isnan(value) else repr(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) with numpy.

    A NaN among ``values`` (a metric a run did not record) makes both NaN: nothing is guessed.
    One value: ``(value, NaN)``. No values: ``(NaN, NaN)``.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    mean = float(np.mean(arr))
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan
    return mean, std


def result_line(m: Mapping[str, Any]) -> str:
    """A run's result in one line: ``final accuracy 80.12%, forgetting 9.87`` (no forgetting: one task)."""
    acc = _number(m.get("final_accuracy"))
    forg = _number(m.get("forgetting"))
    return f"final accuracy {acc:.2f}%" + ("" if math.isnan(forg) else f", forgetting {forg:.2f}")


def _variant_rows(spec: CompareSpec, planned: Sequence[PlannedRun],
                  metrics: Mapping[tuple[str, int], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per variant: name, method, seeds planned and finished, per-metric values."""
    out = []
    for v in spec.variants:
        runs = [p for p in planned if p.variant == v.name]
        done = [p for p in runs if (p.variant, p.seed) in metrics]
        row: dict[str, Any] = {
            "variant": v.name,
            "method": runs[0].cfg.method.name if runs else "",
            "seeds_planned": [p.seed for p in runs],
            "seeds": [p.seed for p in done],
            "values": {m: [_number(metrics[(p.variant, p.seed)].get(m)) for p in done] for m in SUMMARY_METRICS},
            "curves": [list(map(_number, metrics[(p.variant, p.seed)].get("accuracy_after_task") or []))
                       for p in done],
        }
        row["stats"] = {m: mean_std(vals) for m, vals in row["values"].items()}
        out.append(row)
    return out


def write_runs_csv(path: Path, planned: Sequence[PlannedRun], metrics: Mapping[tuple[str, int], Mapping[str, Any]],
                   output: Path) -> Path:
    """``runs.csv``: one row per finished (variant, seed), in plan order, with :data:`RUN_METRICS`.

    Columns: ``variant, seed, method, folder`` (relative to the compare folder), then the metrics at
    full precision; a metric the run did not record is an empty cell.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "seed", "method", "folder", *RUN_METRICS])
    for p in planned:
        m = metrics.get((p.variant, p.seed))
        if m is None:
            continue
        w.writerow([p.variant, p.seed, p.cfg.method.name, p.folder.relative_to(output).as_posix(),
                    *(_cell(m.get(k)) for k in RUN_METRICS)])
    return write_text_atomic(path, buf.getvalue())


def write_summary_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``summary.csv``: one row per variant: ``variant, method, n_seeds, seeds`` and, per metric of
    :data:`SUMMARY_METRICS`, ``<metric>_mean`` and ``<metric>_std`` (sample std, ddof=1).

    An empty cell is NaN: the std of one seed, or a metric some run did not record.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    stats = [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")]
    w.writerow(["variant", "method", "n_seeds", "seeds", *stats])
    for r in rows:
        cells = []
        for m in SUMMARY_METRICS:
            mean, std = r["stats"][m]
            cells += [_cell(mean), _cell(std)]
        w.writerow([r["variant"], r["method"], len(r["seeds"]), " ".join(map(str, r["seeds"])), *cells])
    return write_text_atomic(path, buf.getvalue())


def _pm(stat: tuple[float, float]) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _code(items: Sequence[str]) -> str:
    """Markdown inline code of each item (pipes escaped for tables), comma-separated; "none" if empty."""
    escaped = [o.replace("|", "\\|") for o in items]
    return ", ".join(f"`{o}`" for o in escaped) if escaped else "none"


def _results_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The head of ``summary.md`` and its results table (mean ± std per variant)."""
    lines = ["# duallora compare", "",
             "Mean ± sample standard deviation (ddof=1) over the finished seeds; one seed: the value alone; "
             "n/a: not recorded. Accuracies, forgetting and task-id accuracy in percent.", "",
             "| variant | method | final accuracy | AIA | forgetting | task-id | train time (s) | inference (ms/image) "
             "| seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stats"]
        lines.append(f"| {r['variant']} | {r['method']} | {_pm(s['final_accuracy'])} | "
                     f"{_pm(s['average_incremental_accuracy'])} | {_pm(s['forgetting'])} | "
                     f"{_pm(s['task_id_accuracy'])} | {_pm(s['train_time_s'])} | "
                     f"{_pm(s['inference_ms_per_image'])} | {len(r['seeds'])}/{len(r['seeds_planned'])} |")
    return lines


def _variants_section(spec: CompareSpec, planned: Sequence[PlannedRun], extra_overrides: Sequence[str]) -> list[str]:
    """Each variant's config file and overrides, the seeds, the common overrides and the spec file."""
    seeds = sorted({p.seed for p in planned}, key=[p.seed for p in planned].index)
    lines = ["", "## Variants", "", "| variant | config file | overrides |", "|---|---|---|"]
    for v in spec.variants:
        base = v.config or spec.config
        lines.append(f"| {v.name} | {f'`{base}`' if base else 'defaults'} | {_code(v.overrides)} |")
    lines += ["", f"Seeds: {', '.join(map(str, seeds))}.", "",
              f"Overrides of every variant: the spec's {_code(spec.overrides)}, then the variant's own (above), "
              f"then the command line's {_code(extra_overrides)}; later ones win."]
    if spec.source is not None:
        lines += ["", f"Spec: `{spec.source}`."]
    return lines


def _missing_runs(rows: Sequence[Mapping[str, Any]], planned: Sequence[PlannedRun],
                  failed: Sequence[tuple[str, int, str]]) -> list[str]:
    """The runs of the table's variants that are not in it, each with the reason (none: ``[]``)."""
    failed_msg = {(v, s): msg for v, s, msg in failed}
    missing = [p for p in planned if p.variant in {r["variant"] for r in rows}
               and p.seed not in next(r["seeds"] for r in rows if r["variant"] == p.variant)]
    if not missing:
        return []
    lines = ["", "## Runs not in the table", ""]
    for p in missing:
        why = failed_msg.get((p.variant, p.seed)) or {SKIP: "not selected by --only",
                                                      CONFLICT: "config differs from the existing folder"}.get(
            p.action, "not run yet")
        why = f"failed: {why}" if (p.variant, p.seed) in failed_msg else why
        lines.append(f"- {p.variant} seed {p.seed}: {why.replace('|', '/')}")
    return lines


def write_summary_md(path: Path, spec: CompareSpec, rows: Sequence[Mapping[str, Any]], planned: Sequence[PlannedRun],
                     extra_overrides: Sequence[str], failed: Sequence[tuple[str, int, str]]) -> Path:
    """``summary.md``: the results table (mean ± sample std over seeds, 2 decimals), each variant's
    config and overrides, the common overrides and seeds, and the runs not (yet) in the table."""
    lines = (_results_table(rows) + _variants_section(spec, planned, extra_overrides)
             + _missing_runs(rows, planned, failed))
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _plot_bars(ax, rows: Sequence[Mapping[str, Any]]) -> None:
    """Final accuracy and forgetting per variant, sample-std error bars."""
    x = np.arange(len(rows))
    width = 0.38
    for k, (metric, label) in enumerate((("final_accuracy", "final accuracy"), ("forgetting", "forgetting"))):
        means = np.array([r["stats"][metric][0] for r in rows])
        stds = np.array([r["stats"][metric][1] for r in rows])
        shown = ~np.isnan(means)  # e.g. forgetting of a one-task run: no bar rather than a zero one
        ax.bar(x[shown] + (k - 0.5) * width, means[shown], width,
               yerr=np.where(np.isnan(stds), 0.0, stds)[shown], capsize=3, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([r["variant"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("percent")
    ax.set_title("final accuracy and forgetting (mean ± std over seeds)")
    ax.grid(True, axis="y", alpha=0.4)
    ax.legend(fontsize=8)


def _plot_curves(ax, rows: Sequence[Mapping[str, Any]]) -> None:
    """The mean over seeds of the accuracy after each task, one line per variant."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab10"]
    styles = ("-", "--", ":", "-.")
    for i, r in enumerate(rows):
        length = max(len(c) for c in r["curves"]) if r["curves"] else 0
        if length == 0:
            continue
        padded = np.full((len(r["curves"]), length), np.nan)
        for j, c in enumerate(r["curves"]):
            padded[j, : len(c)] = c
        with np.errstate(all="ignore"), _no_warnings():
            mean = np.nanmean(padded, axis=0)
        ax.plot(np.arange(1, length + 1), mean, marker="o", markersize=3, color=cmap(i % 10),
                linestyle=styles[(i // 10) % len(styles)], label=r["variant"])
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy after each task (mean over seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_comparison(path: Path, rows: Sequence[Mapping[str, Any]]) -> Optional[Path]:
    """``comparison.png``: left, final accuracy and forgetting per variant (bars, sample-std error
    bars); right, the mean over seeds of the accuracy after each task, one line per variant.

    Variants without a finished run are left out; nothing is written when there is none.
    """
    rows = [r for r in rows if r["seeds"]]
    if not rows:
        return None
    fig = new_figure(max(11.0, 6.0 + 0.9 * len(rows)), 4.8)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    _plot_bars(ax, rows)
    _plot_curves(ax2, rows)
    return save_png(fig, path)


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def write_summary(output: Path, spec: CompareSpec, planned: Sequence[PlannedRun],
                  metrics: Mapping[tuple[str, int], Mapping[str, Any]], extra_overrides: Sequence[str] = (),
                  failed: Sequence[tuple[str, int, str]] = ()) -> None:
    """Rewrite ``runs.csv``, ``summary.csv``, ``summary.md`` and ``comparison.png`` in ``output``
    (each atomically) from the finished runs' metrics.

    Raises:
        OSError: the folder cannot be written.
    """
    output = Path(output)
    rows = _variant_rows(spec, planned, metrics)
    write_runs_csv(output / "runs.csv", planned, metrics, output)
    write_summary_csv(output / "summary.csv", rows)
    write_summary_md(output / "summary.md", spec, rows, planned, extra_overrides, failed)
    plot_comparison(output / "comparison.png", rows)
