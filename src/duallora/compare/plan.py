"""The compare plan: for every variant x seed, what is on disk and what to do with it.

Each run is an ordinary ``duallora run`` folder ``DIR/runs/<variant>/seed-<s>``. A finished folder
whose stored config equals the composed one is reused; an interrupted one (``<folder>.partial``) of
the same config is resumed; a folder of a different config is a conflict (or, with ``--overwrite``,
rerun); a run whose config is an inference-only change from a finished run of the same seed is
derived from that run's checkpoints. :func:`plan_compare` decides it without running or writing
anything; :func:`format_plan` is the ``--dry-run`` table. See docs/compare.md, "Reuse, resumption,
conflicts".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from duallora.compare.spec import CompareSpec, Echo, compose_all
from duallora.config import RunConfig, load_config, missing_keys
from duallora.errors import CheckpointError, ConfigError

#: Actions of a planned run.
REUSE, RUN, RESUME, RERUN, SKIP, CONFLICT = "reuse", "run", "resume", "rerun", "skip", "conflict"


@dataclass
class PlannedRun:
    """One variant x seed of a compare.

    Attributes:
        variant: the variant's name.
        seed: the run's seed.
        cfg: the composed, validated config (``seed`` set).
        folder: the run folder ``DIR/runs/<variant>/seed-<seed>``.
        action: ``reuse`` (finished, same config), ``run`` (fresh), ``resume`` (an interrupted run of
            the same config in ``<folder>.partial``), ``rerun`` (``--overwrite``: replace a folder
            whose config differs), ``skip`` (not selected by ``--only``) or ``conflict`` (a folder
            whose config differs, without ``--overwrite``).
        note: why (the config differences of a rerun/conflict).
        discard: start fresh even though a staging folder or an unfinished folder is in the way.
    """

    variant: str
    seed: int
    cfg: RunConfig
    folder: Path
    action: str = RUN
    note: str = ""
    discard: bool = False


def run_folder(output: Path, variant: str, seed: int) -> Path:
    """``output/runs/<variant>/seed-<seed>``."""
    return Path(output) / "runs" / variant / f"seed-{seed}"


def staging_folder(folder: Path) -> Path:
    """``<folder>.partial``: where an unfinished run of ``folder`` is written."""
    return folder.with_name(folder.name + ".partial")


def read_metrics(folder: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``.

    Raises:
        CheckpointError: missing or not valid JSON.
    """
    path = Path(folder) / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a metrics object")
    return data


def stored_differences(folder: Path, cfg: RunConfig) -> list[str]:
    """How the config stored in a run folder (or its staging folder) differs from ``cfg``.

    Keys that do not change results (``train.progress``, ``train.threads``, ``data.num_workers``,
    see :data:`duallora.runner.RESUME_IGNORED_KEYS`) are ignored, as when resuming a run.

    Returns:
        one text per differing key; ``[]`` when equal; a single explanatory text when the folder
        has no readable ``config.yaml``.
    """
    from duallora.runner import RESUME_IGNORED_KEYS, config_differences

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return [f"{path} is missing"]
    try:
        stored = load_config(path, stored=True)
        missing = missing_keys(path)
    except ConfigError as exc:
        return [f"its config.yaml cannot be read by this version ({exc})"]
    older = [f"{key}: not in the run's config (made by an older version of duallora)" for key in missing
             if tuple(key.split(".", 1)) not in RESUME_IGNORED_KEYS]
    return older + config_differences(cfg, stored)


def finished_differences(folder: Path, cfg: RunConfig) -> list[str]:
    """:func:`stored_differences` of a folder with metrics.json, which must also be readable."""
    try:
        read_metrics(folder)
    except CheckpointError as exc:
        return [str(exc)]
    return stored_differences(folder, cfg)


def _reusable(run: PlannedRun) -> bool:
    return (run.folder / "metrics.json").is_file() and not finished_differences(run.folder, run.cfg)


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _decide_staged(run: PlannedRun, overwrite: bool, blocked: bool, blocked_note: str) -> None:
    """Set ``run.action`` when ``<folder>.partial`` holds an unfinished run with a ``config.yaml``."""
    partial = staging_folder(run.folder)
    partial_diff = stored_differences(partial, run.cfg)
    if not partial_diff:
        if blocked and not overwrite:
            run.action, run.note = CONFLICT, blocked_note
        else:
            run.action = RESUME
            run.note = "interrupted run of the same config" + (" (replaces the old folder)" if blocked else "")
        return
    if not overwrite:
        run.action = CONFLICT
        run.note = f"an unfinished run with a different config is in {partial}: " + "; ".join(partial_diff)
        return
    run.action, run.discard = RERUN, True
    run.note = "discards the unfinished run with a different config"


def _decide(run: PlannedRun, overwrite: bool) -> None:
    """Set ``run.action`` from what is on disk (see :class:`PlannedRun`)."""
    folder, partial = run.folder, staging_folder(run.folder)
    finished = (folder / "metrics.json").is_file()
    final_diff = finished_differences(folder, run.cfg) if finished else []
    if finished and not final_diff:
        run.action = REUSE
        return
    blocked = finished or (folder.exists() and not finished and _non_empty_dir(folder)) or (
        folder.exists() and not folder.is_dir())
    blocked_note = ("finished with a different config: " + "; ".join(final_diff) if finished
                    else f"{folder} exists but holds no finished run")
    if partial.is_dir() and (partial / "config.yaml").is_file():
        _decide_staged(run, overwrite, blocked, blocked_note)
        return
    if blocked:
        if overwrite:
            run.action, run.discard, run.note = RERUN, True, blocked_note
        else:
            run.action, run.note = CONFLICT, blocked_note
        return
    # a staging folder without config.yaml was killed before it wrote anything: nothing to keep
    run.action, run.discard = RUN, partial.exists()


def plan_compare(spec: CompareSpec, output: str | Path, *, seeds: Optional[Sequence[int]] = None,
                 extra_overrides: Sequence[str] = (), only: Sequence[str] = (),
                 overwrite: bool = False, echo: Optional[Echo] = None) -> list[PlannedRun]:
    """Compose every variant x seed and decide what to do with each; runs nothing, writes nothing.

    Every variant is composed and validated, also those left out by ``only`` (so a typo anywhere is
    found now, not hours later); all errors are reported together.

    Args:
        spec: the checked spec.
        output: the compare folder DIR.
        seeds: replace the spec's seeds (``--seeds``).
        extra_overrides: ``key=value`` applied to every variant after the spec's and the variant's.
        only: run only these variants (the others become ``skip``; their finished runs still count).
        overwrite: replace runs whose stored config differs (``rerun``) instead of ``conflict``.
        echo: where notes go (an extra override that replaces a variant's own value).

    Returns:
        the planned runs, variant-major in spec order, seeds in the given order.

    Raises:
        ConfigError: an unknown ``only`` name, bad seeds/overrides, or any variant whose config is
            invalid (all such variants named in one message).
    """
    composed = compose_all(spec, seeds=seeds, extra_overrides=extra_overrides, only=only, echo=echo)
    planned = [PlannedRun(name, seed, cfg, run_folder(Path(output), name, seed)) for name, seed, cfg in composed]
    for run in planned:
        if only and run.variant not in only:
            run.action = REUSE if _reusable(run) else SKIP
            if run.action == SKIP:
                run.note = "not selected by --only"
            continue
        _decide(run, overwrite)
    return planned


def planned_derivations(planned: Sequence[PlannedRun]) -> dict[int, str]:
    """Which runs to be made will be derived (:func:`derivation_source`) rather than trained, as far
    as the plan tells: ``{index in planned: source variant}`` for each run to run whose config is an
    inference-only change from an earlier trained run of the same seed that is reused or runs first."""
    from duallora.derivation import inference_only_change

    derived: dict[int, str] = {}
    for i, p in enumerate(planned):
        if p.action not in (RUN, RERUN):
            continue
        for j, q in enumerate(planned):
            if j == i or j in derived or q.seed != p.seed or q.action not in (REUSE, RUN, RESUME, RERUN):
                continue
            if (q.action == REUSE or j < i) and inference_only_change(q.cfg, p.cfg):
                derived[i] = q.variant
                break
    return derived


def derivation_source(run: PlannedRun, planned: Sequence[PlannedRun]) -> Optional[PlannedRun]:
    """A finished, trained (not itself derived) run of the same seed whose config trains the same model
    as ``run``'s (:func:`duallora.derivation.inference_only_change`), or None."""
    from duallora.derivation import inference_only_change

    for other in planned:
        if other is run or other.seed != run.seed or not (other.folder / "metrics.json").is_file():
            continue
        if not inference_only_change(other.cfg, run.cfg) or stored_differences(other.folder, other.cfg):
            continue
        try:
            if "derived_from" in read_metrics(other.folder):
                continue
        except CheckpointError:
            continue
        if (other.folder / "checkpoints").is_dir():
            return other
    return None


def format_plan(planned: Sequence[PlannedRun], output: Path, derive: bool = True) -> str:
    """The plan as a text table: variant, seed, folder, action (and why)."""
    labels = {REUSE: "reused", RUN: "to run", RESUME: "to resume", RERUN: "to rerun (--overwrite)",
              SKIP: "skipped", CONFLICT: "CONFLICT"}
    derived = planned_derivations(planned) if derive else {}
    rows = [(p.variant, str(p.seed), str(p.folder),
             (f"to derive from {derived[i]}'s checkpoints" if i in derived else labels[p.action])
             + (f": {p.note}" if p.note else ""))
            for i, p in enumerate(planned)]
    head = ("variant", "seed", "folder", "action")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    lines = [f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:<{widths[2]}}  {head[3]}"]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    counts = {k: sum(p.action == k for p in planned) for k in labels}
    todo = counts[RUN] + counts[RESUME] + counts[RERUN]
    lines.append(f"{len(planned)} runs in {output}: {counts[REUSE]} reused, {todo} to run"
                 f" ({counts[RESUME]} resumed, {counts[RERUN]} replaced, {len(derived)} derived from checkpoints),"
                 f" {counts[SKIP]} skipped"
                 + (f", {counts[CONFLICT]} in conflict" if counts[CONFLICT] else ""))
    return "\n".join(lines)
