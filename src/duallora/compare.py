"""``duallora compare``: several methods or ablations x several seeds, one folder, one summary.

A *compare spec* (YAML, e.g. ``configs/compare/default.yaml``) names variants, each a list of
``key=value`` overrides on a base config, and the seeds to run each of them with::

    config: ../default.yaml          # optional base config file, relative to this spec file
    seeds: [0, 1, 2]
    overrides: [train.threads=1]     # applied to every variant
    variants:
      duallora: []
      frozen: [method.name=frozen]
      custom: {config: my.yaml, overrides: [method.gate=soft]}

Every variant x seed is composed into a validated :class:`~duallora.config.RunConfig` with the very
function ``duallora run`` uses (:func:`duallora.config.load_config`) before anything runs, so a typo
in the last variant fails at once. Override order, later wins: the spec's ``overrides``, the
variant's own overrides, the command line's overrides, then ``seed``.

Each run is an ordinary ``duallora run`` folder ``DIR/runs/<variant>/seed-<s>``, written by
:func:`duallora.runner.run_experiment`. A finished folder whose stored config equals the composed one
is reused; an interrupted one (``<folder>.partial``) is resumed. After every run the summary
(``runs.csv``, ``summary.csv``, ``summary.md``, ``comparison.png``) is rewritten atomically from the
finished runs' ``metrics.json`` files. See docs/compare.md.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from duallora.config import RunConfig, load_config, missing_keys
from duallora.errors import CheckpointError, ConfigError, DualLoRAError

Echo = Callable[[str], None]

#: Keys a compare spec may have at its top level.
SPEC_KEYS = ("config", "seeds", "overrides", "variants")
#: Keys of a variant given as a mapping.
VARIANT_KEYS = ("config", "overrides")
#: A variant name is a folder name: letters, digits, ``-``, ``_``, ``.``; not starting with ``.`` or ``-``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

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

#: Actions of a planned run.
REUSE, RUN, RESUME, RERUN, SKIP, CONFLICT = "reuse", "run", "resume", "rerun", "skip", "conflict"


# --------------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compared configuration.

    Attributes:
        name: folder-safe name (``DIR/runs/<name>/``).
        overrides: ``key=value`` overrides of this variant (on top of the spec's common overrides).
        config: base config file of this variant; None = the spec's ``config`` (or the defaults).
    """

    name: str
    overrides: tuple[str, ...] = ()
    config: Optional[Path] = None


@dataclass(frozen=True)
class CompareSpec:
    """A parsed, checked compare spec.

    Attributes:
        variants: the variants, in the spec's order (names unique, also ignoring case).
        seeds: seeds every variant runs with (unique ints in ``[0, 2**32)``).
        overrides: ``key=value`` overrides applied to every variant (before the variant's own).
        config: base config file of every variant without its own; None = the defaults.
        source: the spec file, None when built from ``--methods``.
    """

    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    config: Optional[Path] = None
    source: Optional[Path] = None


def _where(source: Optional[Path]) -> str:
    return f"compare spec {str(source)!r}" if source is not None else "the compare command"


def check_seeds(seeds: Any, where: str = "seeds") -> tuple[int, ...]:
    """Check a list of seeds.

    Args:
        seeds: a non-empty list of distinct ints in ``[0, 2**32)``.
        where: what to call it in messages (the spec key or the command-line option).

    Returns:
        the seeds as a tuple, in the given order.

    Raises:
        ConfigError: not a list, empty, a non-int (bool and float included), out of range, repeated.
    """
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ConfigError(f"{where} must be a non-empty list of integers, e.g. seeds: [0, 1, 2]; got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"{where} contains {s!r}, which is not an integer; write seeds as whole numbers, "
                              "e.g. [0, 1, 2]")
        if not 0 <= s < 2**32:
            raise ConfigError(f"{where} contains {s}; seeds must lie in [0, 2**32)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where} repeats a seed ({list(seeds)}); list each seed once")
    return tuple(int(s) for s in seeds)


def parse_seeds(text: str) -> tuple[int, ...]:
    """Parse ``--seeds 0,1,2`` (commas and/or spaces).

    Raises:
        ConfigError: empty, a part that is not an integer, or as :func:`check_seeds`.
    """
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    values = []
    for p in parts:
        if not re.fullmatch(r"[0-9]+", p):
            raise ConfigError(f"--seeds {text!r}: {p!r} is not a non-negative integer; write e.g. --seeds 0,1,2")
        values.append(int(p))
    return check_seeds(values, "--seeds")


def parse_names(values: Optional[Sequence[str]]) -> list[str]:
    """Split comma-separated names given once or repeatedly (``--only a,b --only c``); [] when none."""
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def check_overrides(items: Any, where: str) -> tuple[str, ...]:
    """Check a list of ``key=value`` overrides.

    ``seed`` may not be set here: the seeds come from ``seeds:`` / ``--seeds``.

    Raises:
        ConfigError: not a list of strings, an item without ``=``, or a ``seed=`` item.
    """
    if items is None:
        return ()
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where} must be a list of key=value strings, e.g. [method.name=frozen]; got {items!r}")
    for item in items:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"{where} contains {item!r}, which is not of the form key=value "
                              "(e.g. method.name=frozen; quote it in YAML if needed)")
        if item.split("=", 1)[0].strip() == "seed":
            raise ConfigError(f"{where} sets {item!r}; seeds are given by the spec's `seeds:` list or --seeds")
    return tuple(items)


def check_name(name: Any, where: str) -> str:
    """Check a variant name (used as a folder name).

    Raises:
        ConfigError: not a string matching :data:`NAME_PATTERN`.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"variant name {name!r} in {where} is not usable as a folder name; use letters, digits, '-', '_' "
            "and '.', not starting with '.' or '-' (e.g. gate-soft)"
        )
    return name


def _check_unique(names: Sequence[str], where: str) -> None:
    seen: dict[str, str] = {}
    for n in names:
        if n.lower() in seen:
            raise ConfigError(f"variant {n!r} appears twice in {where} (names are folder names, compared ignoring "
                              f"case: {seen[n.lower()]!r}); rename one")
        seen[n.lower()] = n


def _config_path(value: Any, base: Path, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a config file path (relative to the spec file); got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a compare spec file.

    Relative ``config:`` paths (top level and per variant) are relative to the spec file's folder.

    Args:
        path: the YAML spec.

    Returns:
        the checked :class:`CompareSpec` (configs are composed later, by :func:`plan_compare`).

    Raises:
        ConfigError: missing/unparseable file, duplicate YAML keys, unknown top-level or variant keys,
            no variants, bad or repeated variant names, seeds that are not distinct ints, overrides
            that are not ``key=value`` strings.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    src = Path(path)
    if not src.is_file():
        raise ConfigError(f"compare spec {str(src)!r} does not exist; e.g. configs/compare/default.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(src), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:  # duplicate YAML keys are YAMLErrors
        raise ConfigError(f"cannot parse compare spec {str(src)!r}: {' '.join(str(exc).split())[:300]}") from exc
    where = _where(src)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; allowed top-level keys: {', '.join(SPEC_KEYS)} "
                          "(run options go into `overrides:` as key=value)")
    base = src.parent
    config = _config_path(raw["config"], base, f"`config` in {where}") if raw.get("config") is not None else None
    seeds = check_seeds(raw["seeds"], f"`seeds` in {where}") if "seeds" in raw else (0,)
    overrides = check_overrides(raw.get("overrides"), f"`overrides` in {where}")
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(f"`variants` in {where} must be a non-empty mapping name -> list of key=value "
                          "overrides, e.g. `variants: {duallora: [], frozen: [method.name=frozen]}`")
    variants = []
    for name, value in variants_raw.items():
        check_name(name, where)
        key = f"variant {name!r} in {where}"
        vconfig = None
        if isinstance(value, dict):
            bad = [k for k in value if k not in VARIANT_KEYS]
            if bad:
                raise ConfigError(f"unknown key {bad[0]!r} in {key}; a variant mapping may have "
                                  f"{', '.join(VARIANT_KEYS)}")
            if value.get("config") is not None:
                vconfig = _config_path(value["config"], base, f"`config` of {key}")
            vover = check_overrides(value.get("overrides"), key)
        else:
            vover = check_overrides(value, key)
        variants.append(Variant(name=name, overrides=vover, config=vconfig))
    _check_unique([v.name for v in variants], where)
    return CompareSpec(variants=tuple(variants), seeds=seeds, overrides=overrides, config=config, source=src)


def spec_from_methods(methods: Sequence[str], seeds: Sequence[int] = (0,)) -> CompareSpec:
    """A spec without a file: one variant ``method.name=X`` per method, named after it.

    Raises:
        ConfigError: no methods, a repeated or unusable name (unknown methods fail when composed).
    """
    names = list(methods)
    if not names:
        raise ConfigError("--methods is empty; name at least one method, e.g. --methods duallora,fecam")
    for n in names:
        check_name(n, "--methods")
    _check_unique(names, "--methods")
    return CompareSpec(variants=tuple(Variant(n, (f"method.name={n}",)) for n in names), seeds=check_seeds(list(seeds)))


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


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


def _partial(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].strip()


def compose(spec: CompareSpec, variant: Variant, seed: int, extra_overrides: Sequence[str] = ()) -> RunConfig:
    """The validated config of one variant and seed, as ``duallora run`` would build it.

    Order (later wins): base config file (the variant's, else the spec's, else the defaults), the
    spec's ``overrides``, the variant's overrides, ``extra_overrides`` (command line), ``seed``.

    Raises:
        ConfigError: as :func:`duallora.config.load_config`, prefixed with the variant's name.
    """
    base = variant.config or spec.config
    groups = [("the spec's `overrides`", spec.overrides),
              (f"the overrides of variant {variant.name!r}", variant.overrides),
              ("the command-line overrides", tuple(extra_overrides)),
              ("the seeds", (f"seed={seed}",))]
    try:
        return load_config(base, [o for _, group in groups for o in group])
    except ConfigError as exc:
        # name the group that breaks it (load_config calls every override "the command-line overrides")
        applied: list[str] = []
        for label, group in groups:
            applied += group
            try:
                load_config(base, applied)
            except ConfigError as first:
                text = str(first).replace("in the command-line overrides", f"in {label}")
                raise ConfigError(f"variant {variant.name!r}: {text}") from exc
        raise ConfigError(f"variant {variant.name!r}: {exc}") from exc


def stored_differences(folder: Path, cfg: RunConfig) -> list[str]:
    """How the config stored in a run folder (or its staging folder) differs from ``cfg``.

    Keys that do not change results (``train.progress``, ``train.threads``, ``data.num_workers``,
    see :data:`duallora.runner.RESUME_IGNORED_KEYS`) are ignored, as when resuming a run.

    Returns:
        one text per differing key; ``[]`` when equal; a single explanatory text when the folder
        has no readable ``config.yaml``.
    """
    from duallora.runner import RESUME_IGNORED_KEYS, _config_differences

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return [f"{path} is missing"]
    try:
        stored = load_config(path)
        missing = missing_keys(path)
    except ConfigError as exc:
        return [f"its config.yaml cannot be read by this version ({exc})"]
    older = [f"{key}: not in the run's config (made by an older version of duallora)" for key in missing
             if tuple(key.split(".", 1)) not in RESUME_IGNORED_KEYS]
    return older + _config_differences(cfg, stored)


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _decide(run: PlannedRun, overwrite: bool) -> None:
    """Set ``run.action`` from what is on disk (see :class:`PlannedRun`)."""
    folder, partial = run.folder, _partial(run.folder)
    finished = (folder / "metrics.json").is_file()
    final_diff = _finished_differences(folder, run.cfg) if finished else []
    if finished and not final_diff:
        run.action = REUSE
        return
    blocked = finished or (folder.exists() and not finished and _non_empty_dir(folder)) or (
        folder.exists() and not folder.is_dir())
    blocked_note = ("finished with a different config: " + "; ".join(final_diff) if finished
                    else f"{folder} exists but holds no finished run")
    if partial.is_dir() and (partial / "config.yaml").is_file():
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
    use_seeds = check_seeds(list(seeds), "--seeds") if seeds is not None else spec.seeds
    extra = check_overrides(list(extra_overrides), "the command-line overrides")
    names = [v.name for v in spec.variants]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: no such variant in {_where(spec.source)}; "
                          f"variants: {', '.join(names)}")
    extra_keys = {_key_of(o) for o in extra}
    errors: list[str] = []
    planned: list[PlannedRun] = []
    for v in spec.variants:
        replaced = sorted(extra_keys & {_key_of(o) for o in v.overrides})
        if replaced and echo is not None:
            echo(f"note: the command-line overrides replace {', '.join(replaced)} of variant {v.name!r}")
        for seed in use_seeds:
            try:
                cfg = compose(spec, v, seed, extra)
            except ConfigError as exc:
                errors.append(str(exc))
                break
            planned.append(PlannedRun(v.name, seed, cfg, run_folder(Path(output), v.name, seed)))
    if errors:
        verb = "has" if len(errors) == 1 else "have"
        raise ConfigError(f"{len(errors)} of {len(spec.variants)} variants {verb} an invalid config; nothing was run: "
                          + " | ".join(errors))
    for run in planned:
        if only and run.variant not in only:
            run.action = REUSE if _reusable(run) else SKIP
            if run.action == SKIP:
                run.note = "not selected by --only"
            continue
        _decide(run, overwrite)
    return planned


def _finished_differences(folder: Path, cfg: RunConfig) -> list[str]:
    """:func:`stored_differences` of a folder with metrics.json, which must also be readable."""
    try:
        read_metrics(folder)
    except CheckpointError as exc:
        return [str(exc)]
    return stored_differences(folder, cfg)


def _reusable(run: PlannedRun) -> bool:
    return (run.folder / "metrics.json").is_file() and not _finished_differences(run.folder, run.cfg)


def planned_derivations(planned: Sequence[PlannedRun]) -> dict[int, str]:
    """Which runs to be made will be derived (:func:`_derivation_source`) rather than trained, as far
    as the plan tells: ``{index in planned: source variant}`` for each run to run whose config is an
    inference-only change from an earlier trained run of the same seed that is reused or runs first."""
    from duallora.runner import inference_only_change

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


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


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
    from duallora.reporting import write_text_atomic

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
    from duallora.reporting import write_text_atomic

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


def write_summary_md(path: Path, spec: CompareSpec, rows: Sequence[Mapping[str, Any]], planned: Sequence[PlannedRun],
                     extra_overrides: Sequence[str], failed: Sequence[tuple[str, int, str]]) -> Path:
    """``summary.md``: the results table (mean ± sample std over seeds, 2 decimals), each variant's
    config and overrides, the common overrides and seeds, and the runs not (yet) in the table."""
    from duallora.reporting import write_text_atomic

    seeds = sorted({p.seed for p in planned}, key=[p.seed for p in planned].index)
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
    lines += ["", "## Variants", "", "| variant | config file | overrides |", "|---|---|---|"]
    for v in spec.variants:
        base = v.config or spec.config
        lines.append(f"| {v.name} | {f'`{base}`' if base else 'defaults'} | {_code(v.overrides)} |")
    lines += ["", f"Seeds: {', '.join(map(str, seeds))}.", "",
              f"Overrides of every variant: the spec's {_code(spec.overrides)}, then the variant's own (above), "
              f"then the command line's {_code(extra_overrides)}; later ones win."]
    if spec.source is not None:
        lines += ["", f"Spec: `{spec.source}`."]
    failed_msg = {(v, s): msg for v, s, msg in failed}
    missing = [p for p in planned if p.variant in {r["variant"] for r in rows}
               and p.seed not in next(r["seeds"] for r in rows if r["variant"] == p.variant)]
    if missing:
        lines += ["", "## Runs not in the table", ""]
        for p in missing:
            why = failed_msg.get((p.variant, p.seed)) or {SKIP: "not selected by --only",
                                                          CONFLICT: "config differs from the existing folder"}.get(
                p.action, "not run yet")
            why = f"failed: {why}" if (p.variant, p.seed) in failed_msg else why
            lines.append(f"- {p.variant} seed {p.seed}: {why.replace('|', '/')}")
    return write_text_atomic(path, "\n".join(lines) + "\n")


def plot_comparison(path: Path, rows: Sequence[Mapping[str, Any]]) -> Optional[Path]:
    """``comparison.png``: left, final accuracy and forgetting per variant (bars, sample-std error
    bars); right, the mean over seeds of the accuracy after each task, one line per variant.

    Variants without a finished run are left out; nothing is written when there is none.
    """
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    from duallora.reporting import _new_figure, _save_png

    rows = [r for r in rows if r["seeds"]]
    if not rows:
        return None
    n = len(rows)
    fig = _new_figure(max(11.0, 6.0 + 0.9 * n), 4.8)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = np.arange(n)
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
        ax2.plot(np.arange(1, length + 1), mean, marker="o", markersize=3, color=cmap(i % 10),
                 linestyle=styles[(i // 10) % len(styles)], label=r["variant"])
    ax2.set_xlabel("after task")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("accuracy after each task (mean over seeds)")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(True, alpha=0.4)
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_png(fig, path)


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


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


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
    return {
        "spec": str(spec.source) if spec.source else None,
        "config": str(spec.config) if spec.config else None,
        "seeds": sorted({p.seed for p in planned}, key=[p.seed for p in planned].index),
        "overrides": list(spec.overrides),
        "command_line_overrides": list(extra),
        "variants": {v.name: {"config": str(v.config) if v.config else None, "overrides": list(v.overrides)}
                     for v in spec.variants},
    }


def _result_line(m: Mapping[str, Any]) -> str:
    acc = _number(m.get("final_accuracy"))
    forg = _number(m.get("forgetting"))
    return f"final accuracy {acc:.2f}%" + ("" if math.isnan(forg) else f", forgetting {forg:.2f}")


def _derivation_source(run: PlannedRun, planned: Sequence[PlannedRun]) -> Optional[PlannedRun]:
    """A finished, trained (not itself derived) run of the same seed whose config trains the same model
    as ``run``'s (:func:`duallora.runner.inference_only_change`), or None."""
    from duallora.runner import inference_only_change

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


def run_compare(spec: CompareSpec, output: str | Path, *, seeds: Optional[Sequence[int]] = None,
                extra_overrides: Sequence[str] = (), only: Sequence[str] = (), overwrite: bool = False,
                dry_run: bool = False, echo: Echo = print, verbose: bool = False,
                derive: bool = True) -> CompareResult:
    """Plan, then run every variant x seed in turn, rewriting the summary after each.

    Runs happen one after another in this process through :func:`duallora.runner.run_experiment`.
    A run that raises a :class:`~duallora.errors.DualLoRAError` is reported and the others go on;
    the caller decides the exit status from :attr:`CompareResult.failed`.

    Args:
        spec: the checked spec.
        output: the compare folder DIR (created; holds ``runs/``, ``compare.json`` and the summary).
        seeds, extra_overrides, only, overwrite: see :func:`plan_compare`.
        dry_run: print the plan and return without writing or running anything.
        echo: where the plan, progress and result lines go.
        verbose: also pass the runner's per-task lines to ``echo`` (indented).
        derive: make a run whose config is an inference-only change from a finished run of the same
            seed in this compare (e.g. another calibration) by evaluating that run's checkpoints
            (:func:`duallora.runner.derive_run`) instead of training the same model again.

    Returns:
        the :class:`CompareResult`.

    Raises:
        ConfigError: as :func:`plan_compare` (before anything runs).
        CheckpointError: existing runs whose config differs, without ``overwrite`` (before anything
            runs, also with ``dry_run`` after printing the plan), or another compare holds DIR.
        OSError: DIR cannot be written.
    """
    from duallora import runner
    from duallora.reporting import write_json_atomic

    output = Path(output)
    extra = tuple(extra_overrides)
    planned = plan_compare(spec, output, seeds=seeds, extra_overrides=extra, only=only, overwrite=overwrite,
                           echo=echo)
    conflicts = [p for p in planned if p.action == CONFLICT]
    if dry_run:
        echo(format_plan(planned, output, derive))
    if conflicts:
        folders = ", ".join(str(p.folder.relative_to(output)) for p in conflicts[:8])
        more = f" and {len(conflicts) - 8} more" if len(conflicts) > 8 else ""
        first = conflicts[0]
        raise CheckpointError(
            f"{len(conflicts)} existing run folders in {output} do not match the composed config ({folders}{more}); "
            f"e.g. {first.folder.relative_to(output)}: {first.note}; use another --output, or pass --overwrite "
            "to rerun them")
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
        selected = [p for p in planned if p.action != SKIP and not (only and p.variant not in only)]
        write_summary(output, spec, planned, result.metrics, extra, result.failed)
        total = len(selected)
        inner: Echo = (lambda line: echo(f"    {line}")) if verbose else (lambda line: None)
        for i, p in enumerate(selected, 1):
            head = f"[{i}/{total}] {p.variant} seed {p.seed}"
            if p.action == REUSE:
                echo(f"{head}: reused ({_result_line(result.metrics[(p.variant, p.seed)])})")
                continue
            echo(head + {RESUME: " (resuming)", RERUN: " (replacing the old folder)"}.get(p.action, ""))
            t0 = time.perf_counter()
            source = _derivation_source(p, planned) if derive and p.action != RESUME else None
            try:
                if source is not None:
                    echo(f"  inference-only change from {source.variant}: evaluating its checkpoints")
                    runner.derive_run(source.folder, p.cfg, p.folder, overwrite=p.discard, echo=inner)
                elif p.action == RESUME:
                    runner.run_experiment(p.cfg, p.folder, resume=True, echo=inner)
                else:
                    runner.run_experiment(p.cfg, p.folder, overwrite=p.discard, echo=inner)
                m = read_metrics(p.folder)
            except DualLoRAError as exc:
                result.failed.append((p.variant, p.seed, str(exc)))
                echo(f"  failed: {exc}")
            except KeyboardInterrupt:
                echo(f"  interrupted during {p.variant} seed {p.seed}; the same command resumes it")
                raise KeyboardInterrupt("interrupted; the same `duallora compare` command resumes the unfinished run") from None
            else:
                result.metrics[(p.variant, p.seed)] = m
                result.ran.append((p.variant, p.seed))
                echo(f"  {_result_line(m)}, {time.perf_counter() - t0:.1f} s")
            write_summary(output, spec, planned, result.metrics, extra, result.failed)
    done = len(result.metrics)
    echo(f"{done} of {len(planned)} runs finished ({len(result.ran)} run now); summary in {output / 'summary.md'}")
    return result
