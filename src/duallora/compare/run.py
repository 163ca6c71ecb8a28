"""Running a compare: the plan's runs one after another in this process, the summary after each.

Each run is made by :func:`duallora.runner.run_experiment` (a fresh or resumed run) or
:func:`duallora.derivation.derive_run` (an inference-only change from a finished run's checkpoints).
A run that raises a :class:`~duallora.errors.DualLoRAError` is reported and the others go on.
``DIR/.compare.lock`` keeps a second compare off the same folder.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from duallora.compare.plan import (
    CONFLICT,
    RERUN,
    RESUME,
    REUSE,
    SKIP,
    PlannedRun,
    derivation_source,
    format_plan,
    plan_compare,
    read_metrics,
)
from duallora.compare.spec import CompareSpec, Echo
from duallora.compare.summary import result_line, write_summary
from duallora.errors import CheckpointError, ConfigError, DualLoRAError


@dataclass
class CompareResult:
    """What :func:`run_compare` did.

    Attributes:
        planned: every planned run with its action.
        metrics: ``(variant, seed) -> metrics.json`` of every finished run in the summary.
        failed: ``(variant, seed, message)`` of runs that raised a DualLoRAError.
        ran: ``(variant, seed)`` of runs trained (or resumed) by this call.
    """

    planned: list[PlannedRun]
    metrics: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    ran: list[tuple[str, int]] = field(default_factory=list)


@contextlib.contextmanager
def _lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output/.compare.lock`` (released when the process ends)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    output.mkdir(parents=True, exist_ok=True)
    with open(output / ".compare.lock", "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise CheckpointError(f"another `duallora compare` is writing {output}; wait for it or choose "
                                  "another --output") from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _spec_record(spec: CompareSpec, planned: Sequence[PlannedRun], extra: Sequence[str]) -> dict[str, Any]:
    """The ``compare.json`` content: this invocation's spec, seeds and overrides."""
    return {
        "spec": str(spec.source) if spec.source else None,
        "config": str(spec.config) if spec.config else None,
        "seeds": sorted({p.seed for p in planned}, key=[p.seed for p in planned].index),
        "overrides": list(spec.overrides),
        "command_line_overrides": list(extra),
        "variants": {v.name: {"config": str(v.config) if v.config else None, "overrides": list(v.overrides)}
                     for v in spec.variants},
    }


def _refuse_conflicts(planned: Sequence[PlannedRun], output: Path) -> None:
    """Raise when existing folders hold a different config than the plan's (nothing has run yet).

    Raises:
        CheckpointError: naming up to 8 such folders and the first one's differences.
    """
    conflicts = [p for p in planned if p.action == CONFLICT]
    if not conflicts:
        return
    folders = ", ".join(str(p.folder.relative_to(output)) for p in conflicts[:8])
    more = f" and {len(conflicts) - 8} more" if len(conflicts) > 8 else ""
    first = conflicts[0]
    raise CheckpointError(
        f"{len(conflicts)} existing run folders in {output} do not match the composed config ({folders}{more}); "
        f"e.g. {first.folder.relative_to(output)}: {first.note}; use another --output, or pass --overwrite "
        "to rerun them")


def _make_run(p: PlannedRun, source: Optional[PlannedRun], echo: Echo, inner: Echo) -> dict[str, Any]:
    """Derive (from ``source``'s checkpoints, when given), resume or train one planned run; its ``metrics.json``.

    Raises:
        DualLoRAError: the run failed (its folder's earlier content is untouched).
        KeyboardInterrupt: interrupted (the unfinished run stays to be resumed).
    """
    from duallora import derivation, runner

    if source is not None:
        echo(f"  inference-only change from {source.variant}: evaluating its checkpoints")
        derivation.derive_run(source.folder, p.cfg, p.folder, overwrite=p.discard, echo=inner)
    elif p.action == RESUME:
        runner.run_experiment(p.cfg, p.folder, resume=True, echo=inner)
    else:
        runner.run_experiment(p.cfg, p.folder, overwrite=p.discard, echo=inner)
    return read_metrics(p.folder)


def _run_selected(result: CompareResult, selected: Sequence[PlannedRun], derive: bool, echo: Echo,
                  verbose: bool, rewrite_summary: Callable[[], None]) -> None:
    """Make every selected run in turn (reused ones only reported), rewriting the summary after each."""
    total = len(selected)
    inner: Echo = (lambda line: echo(f"    {line}")) if verbose else (lambda line: None)
    for i, p in enumerate(selected, 1):
        head = f"[{i}/{total}] {p.variant} seed {p.seed}"
        if p.action == REUSE:
            echo(f"{head}: reused ({result_line(result.metrics[(p.variant, p.seed)])})")
            continue
        echo(head + {RESUME: " (resuming)", RERUN: " (replacing the old folder)"}.get(p.action, ""))
        t0 = time.perf_counter()
        source = derivation_source(p, result.planned) if derive and p.action != RESUME else None
        try:
            m = _make_run(p, source, echo, inner)
        except DualLoRAError as exc:
            result.failed.append((p.variant, p.seed, str(exc)))
            echo(f"  failed: {exc}")
        except KeyboardInterrupt:
            echo(f"  interrupted during {p.variant} seed {p.seed}; the same command resumes it")
            raise KeyboardInterrupt(
                "interrupted; the same `duallora compare` command resumes the unfinished run") from None
        else:
            result.metrics[(p.variant, p.seed)] = m
            result.ran.append((p.variant, p.seed))
            echo(f"  {result_line(m)}, {time.perf_counter() - t0:.1f} s")
        rewrite_summary()


def _select(result: CompareResult, spec: CompareSpec, output: Path, echo: Echo) -> None:
    """Choose each ``select`` group's variant on validation and evaluate it on test (selection.md)."""
    from duallora.compare.select import select_and_test

    seeds = sorted({p.seed for p in result.planned}, key=[p.seed for p in result.planned].index)
    record = select_and_test(output, spec, seeds, result.metrics, echo)  # raises: the runs stay, reused next time
    for group, e in record["groups"].items():
        if e["chosen"] is None:
            echo(f"select {group}: waiting for all candidates to finish")
        else:
            test = (f", test final accuracy {e['test']['final_accuracy']['mean']:.2f}" if e["test"] else "")
            echo(f"select {group}: {e['chosen']} (validation {record['metric']} "
                 f"{e['candidates'][e['chosen']]['mean']:.2f}){test}")
    echo(f"selection in {output / 'selection.md'}")


def run_compare(spec: CompareSpec, output: str | Path, *, seeds: Optional[Sequence[int]] = None,
                extra_overrides: Sequence[str] = (), only: Sequence[str] = (), overwrite: bool = False,
                dry_run: bool = False, echo: Echo = print, verbose: bool = False,
                derive: bool = True, summary_only: bool = False) -> CompareResult:
    """Plan, then run every variant x seed in turn, rewriting the summary after each.

    Runs happen one after another in this process through :func:`duallora.runner.run_experiment`.
    A run that raises a :class:`~duallora.errors.DualLoRAError` is reported and the others go on;
    the caller decides the exit status from :attr:`CompareResult.failed`.

    Args:
        spec: the checked spec.
        output: the compare folder DIR (created; holds ``runs/``, ``compare.json`` and the summary).
        seeds, extra_overrides, only, overwrite: see :func:`~duallora.compare.plan.plan_compare`.
        dry_run: print the plan and return without writing or running anything.
        echo: where the plan, progress and result lines go.
        verbose: also pass the runner's per-task lines to ``echo`` (indented).
        derive: make a run whose config is an inference-only change from a finished run of the same
            seed in this compare (e.g. another calibration) by evaluating that run's checkpoints
            (:func:`duallora.derivation.derive_run`) instead of training the same model again.
        summary_only: run nothing: rewrite the summary files from the finished runs only (the others
            show as missing seeds) and skip the ``select:`` step.

    Returns:
        the :class:`CompareResult`.

    Raises:
        ConfigError: as :func:`~duallora.compare.plan.plan_compare` (before anything runs); ``summary_only``
            with an ``output`` folder that does not exist.
        CheckpointError: existing runs whose config differs, without ``overwrite`` (before anything
            runs, also with ``dry_run`` after printing the plan), or another compare holds DIR.
        OSError: DIR cannot be written.
    """
    from duallora.reporting import write_json_atomic

    output = Path(output)
    if summary_only and not output.is_dir():
        raise ConfigError(f"--summary-only: {output} does not exist, so there are no runs to summarise; "
                          "give the --output folder of an earlier `duallora compare` (or drop --summary-only)")
    extra = tuple(extra_overrides)
    planned = plan_compare(spec, output, seeds=seeds, extra_overrides=extra, only=only, overwrite=overwrite,
                           echo=echo)
    if dry_run:
        echo(format_plan(planned, output, derive))
    _refuse_conflicts(planned, output)
    result = CompareResult(planned=planned)
    if dry_run:
        return result
    with _lock(output):
        planned = plan_compare(spec, output, seeds=seeds, extra_overrides=extra, only=only,
                               overwrite=overwrite)  # again, under the lock
        result.planned = planned
        write_json_atomic(output / "compare.json", _spec_record(spec, planned, extra))
        for p in planned:
            if p.action == REUSE:
                result.metrics[(p.variant, p.seed)] = read_metrics(p.folder)
        selected = [] if summary_only else [p for p in planned
                                            if p.action != SKIP and not (only and p.variant not in only)]

        def rewrite_summary() -> None:
            write_summary(output, spec, planned, result.metrics, extra, result.failed)

        rewrite_summary()
        _run_selected(result, selected, derive, echo, verbose, rewrite_summary)
        if spec.selection is not None and not summary_only:
            _select(result, spec, output, echo)
    done = len(result.metrics)
    echo(f"{done} of {len(planned)} runs finished ({len(result.ran)} run now); summary in {output / 'summary.md'}")
    return result
