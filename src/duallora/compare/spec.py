"""The compare spec: the spec file and the command-line options, read and checked into variants x seeds.

A *compare spec* (YAML, e.g. ``configs/compare/default.yaml``) names variants, each a list of
``key=value`` overrides on a base config, and the seeds to run each of them with::

    config: ../default.yaml          # optional base config file, relative to this spec file
    seeds: [0, 1, 2]
    overrides: [train.threads=1]     # applied to every variant
    variants:
      duallora: []
      frozen: [method.name=frozen]
      custom: {config: my.yaml, overrides: [method.gate=soft]}
    select:                          # optional: choose among variants on validation data
      metric: final_accuracy
      groups: {duallora: [duallora, duallora-lr1e-3]}

:func:`load_spec` reads and checks the file (:func:`spec_from_methods` builds a spec from
``--methods``); :func:`compose_all` turns a spec, the seeds and the command line's overrides into one
validated :class:`~duallora.config.RunConfig` per variant x seed, with the very function
``duallora run`` uses (:func:`duallora.config.load_config`), so a typo in the last variant fails at
once. Override order, later wins: the spec's ``overrides``, the variant's own overrides, the command
line's overrides, then ``seed``. A variant named in ``select.groups`` is then run with
``data.evaluate_on=validation`` (:func:`compose`); :mod:`duallora.compare.select` picks each group's
best variant by its validation metric and evaluates only that one's checkpoints on the test split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from duallora.config import RunConfig, load_config
from duallora.errors import ConfigError

Echo = Callable[[str], None]

#: Keys a compare spec may have at its top level.
SPEC_KEYS = ("config", "seeds", "overrides", "variants", "select")
#: Keys of the ``select:`` section.
SELECT_KEYS = ("metric", "groups", "test")
#: Metrics a selection may rank by, and whether higher is better.
SELECT_METRICS = {"final_accuracy": True, "average_incremental_accuracy": True, "forgetting": False,
                  "task_id_accuracy": True}
#: Keys of a variant given as a mapping.
VARIANT_KEYS = ("config", "overrides")
#: A variant name is a folder name: letters, digits, ``-``, ``_``, ``.``; not starting with ``.`` or ``-``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
class Selection:
    """Choose among variants on validation data, report the chosen one on the test data.

    Attributes:
        groups: group name -> candidate variant names (each candidate is in one group only). Every
            candidate runs with ``data.evaluate_on=validation``; the group's choice is the candidate
            with the best mean ``metric`` over the seeds (the first listed on a tie).
        metric: one of :data:`SELECT_METRICS` (validation numbers of the candidates' ``metrics.json``).
        test: evaluate each group's choice on the test split (False: only choose, e.g. when the choice
            is a preset's setting whose test numbers come from other runs).
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...]
    metric: str = "final_accuracy"
    test: bool = True

    def group_of(self, variant: str) -> Optional[str]:
        """The group ``variant`` is a candidate of, or None."""
        for name, members in self.groups:
            if variant in members:
                return name
        return None


@dataclass(frozen=True)
class CompareSpec:
    """A parsed, checked compare spec.

    Attributes:
        variants: the variants, in the spec's order (names unique, also ignoring case).
        seeds: seeds every variant runs with (unique ints in ``[0, 2**32)``).
        overrides: ``key=value`` overrides applied to every variant (before the variant's own).
        config: base config file of every variant without its own; None = the defaults.
        source: the spec file, None when built from ``--methods``.
        selection: the ``select:`` section, or None (every variant evaluated on ``data.evaluate_on``).
    """

    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    config: Optional[Path] = None
    source: Optional[Path] = None
    selection: Optional[Selection] = None


def spec_origin(source: Optional[Path]) -> str:
    """What to call a spec in messages: ``compare spec '<file>'``, or ``the compare command`` (``--methods``)."""
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


def override_key(override: str) -> str:
    """The key of a ``key=value`` override (``method.gate=soft`` -> ``method.gate``)."""
    return override.split("=", 1)[0].strip()


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


def check_unique(names: Sequence[str], where: str) -> None:
    """Refuse two variant names that are equal ignoring case (they are folder names).

    Raises:
        ConfigError: naming both spellings.
    """
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


def _read_spec_file(src: Path) -> dict:
    """The spec file as a plain mapping with only :data:`SPEC_KEYS`.

    Raises:
        ConfigError: missing, unparseable (also duplicate YAML keys), not a mapping, an unknown key.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not src.is_file():
        raise ConfigError(f"compare spec {str(src)!r} does not exist; e.g. configs/compare/default.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(src), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:  # duplicate YAML keys are YAMLErrors
        raise ConfigError(f"cannot parse compare spec {str(src)!r}: {' '.join(str(exc).split())[:300]}") from exc
    where = spec_origin(src)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; allowed top-level keys: {', '.join(SPEC_KEYS)} "
                          "(run options go into `overrides:` as key=value)")
    return raw


def _parse_variant(name: Any, value: Any, base: Path, where: str) -> Variant:
    """One entry of ``variants:``: a list of overrides, or a mapping ``{config, overrides}``.

    Raises:
        ConfigError: a bad name, an unknown key of the mapping, overrides that are not ``key=value``.
    """
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
    return Variant(name=name, overrides=vover, config=vconfig)


def _parse_selection(raw: Any, variants: Sequence[str], where: str) -> Selection:
    """The ``select:`` section.

    Raises:
        ConfigError: not a mapping, an unknown key or metric, an empty or unknown group member, a
            variant in two groups, a group name that is not folder-safe.
    """
    example = "e.g. `select: {metric: final_accuracy, groups: {duallora: [duallora, duallora-lr1e-3]}}`"
    if not isinstance(raw, dict):
        raise ConfigError(f"`select` in {where} must be a mapping with keys {', '.join(SELECT_KEYS)}; {example}")
    bad = [k for k in raw if k not in SELECT_KEYS]
    if bad:
        raise ConfigError(f"unknown key {bad[0]!r} in `select` of {where}; allowed: {', '.join(SELECT_KEYS)}")
    metric = raw.get("metric", "final_accuracy")
    if metric not in SELECT_METRICS:
        raise ConfigError(f"`select.metric` in {where} is {metric!r}; choose one of {', '.join(SELECT_METRICS)}")
    groups_raw = raw.get("groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise ConfigError(f"`select.groups` in {where} must be a non-empty mapping group -> variant names; {example}")
    seen: dict[str, str] = {}
    groups = []
    for gname, members in groups_raw.items():
        check_name(gname, f"`select.groups` of {where}")
        if isinstance(members, str):
            members = [members]
        if not isinstance(members, (list, tuple)) or not members:
            raise ConfigError(f"group {gname!r} in `select.groups` of {where} must list at least one variant")
        for m in members:
            if m not in variants:
                raise ConfigError(f"group {gname!r} in `select.groups` of {where} names {m!r}, which is not a "
                                  f"variant; variants: {', '.join(variants)}")
            if m in seen:
                raise ConfigError(f"variant {m!r} is in groups {seen[m]!r} and {gname!r} of `select.groups` in "
                                  f"{where}; a variant is a candidate of one group only")
            seen[m] = gname
        groups.append((gname, tuple(members)))
    check_unique([g for g, _ in groups], f"`select.groups` of {where}")
    test = raw.get("test", True)
    if not isinstance(test, bool):
        raise ConfigError(f"`select.test` in {where} must be true or false; got {test!r}")
    return Selection(groups=tuple(groups), metric=metric, test=test)


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a compare spec file.

    Relative ``config:`` paths (top level and per variant) are relative to the spec file's folder.

    Args:
        path: the YAML spec.

    Returns:
        the checked :class:`CompareSpec` (configs are composed later, by :func:`compose_all`).

    Raises:
        ConfigError: missing/unparseable file, duplicate YAML keys, unknown top-level or variant keys,
            no variants, bad or repeated variant names, seeds that are not distinct ints, overrides
            that are not ``key=value`` strings.
    """
    src = Path(path)
    raw = _read_spec_file(src)
    where = spec_origin(src)
    base = src.parent
    config = _config_path(raw["config"], base, f"`config` in {where}") if raw.get("config") is not None else None
    seeds = check_seeds(raw["seeds"], f"`seeds` in {where}") if "seeds" in raw else (0,)
    overrides = check_overrides(raw.get("overrides"), f"`overrides` in {where}")
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(f"`variants` in {where} must be a non-empty mapping name -> list of key=value "
                          "overrides, e.g. `variants: {duallora: [], frozen: [method.name=frozen]}`")
    variants = [_parse_variant(name, value, base, where) for name, value in variants_raw.items()]
    check_unique([v.name for v in variants], where)
    selection = (_parse_selection(raw["select"], [v.name for v in variants], where)
                 if raw.get("select") is not None else None)
    return CompareSpec(variants=tuple(variants), seeds=seeds, overrides=overrides, config=config, source=src,
                       selection=selection)


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
    check_unique(names, "--methods")
    return CompareSpec(variants=tuple(Variant(n, (f"method.name={n}",)) for n in names), seeds=check_seeds(list(seeds)))


def compose(spec: CompareSpec, variant: Variant, seed: int, extra_overrides: Sequence[str] = ()) -> RunConfig:
    """The validated config of one variant and seed, as ``duallora run`` would build it.

    Order (later wins): base config file (the variant's, else the spec's, else the defaults), the
    spec's ``overrides``, the variant's overrides, ``extra_overrides`` (command line), then
    ``data.evaluate_on=validation`` for a candidate of ``spec.selection``, then ``seed``.

    Raises:
        ConfigError: as :func:`duallora.config.load_config`, prefixed with the variant's name.
    """
    base = variant.config or spec.config
    groups = [("the spec's `overrides`", spec.overrides),
              (f"the overrides of variant {variant.name!r}", variant.overrides),
              ("the command-line overrides", tuple(extra_overrides)),
              ("the seeds", (f"seed={seed}",))]
    if spec.selection is not None and spec.selection.group_of(variant.name) is not None:
        groups.insert(3, ("`select` (candidates run on the validation split)", ("data.evaluate_on=validation",)))
    try:
        return load_config(base, [o for _, group in groups for o in group])
    except ConfigError as exc:
        if "evaluate_on=validation needs" in str(exc) and len(groups) == 5:
            raise ConfigError(f"variant {variant.name!r} is a candidate of `select`, so it runs with "
                              f"data.evaluate_on=validation: {exc}; add data.validation_fraction=0.1 to the "
                              "spec's `overrides`") from exc
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


def compose_all(spec: CompareSpec, *, seeds: Optional[Sequence[int]] = None, extra_overrides: Sequence[str] = (),
                only: Sequence[str] = (), echo: Optional[Echo] = None) -> list[tuple[str, int, RunConfig]]:
    """Check the command line's options and compose every variant x seed (:func:`compose`).

    Every variant is composed and validated, also those left out by ``only`` (so a typo anywhere is
    found now, not hours later); all errors are reported together.

    Args:
        spec: the checked spec.
        seeds: replace the spec's seeds (``--seeds``).
        extra_overrides: ``key=value`` applied to every variant after the spec's and the variant's.
        only: names that ``--only`` selects (checked against the spec's variants).
        echo: where notes go (an extra override that replaces a variant's own value).

    Returns:
        ``(variant name, seed, config)`` variant-major in spec order, seeds in the given order.

    Raises:
        ConfigError: an unknown ``only`` name, bad seeds/overrides, or any variant whose config is
            invalid (all such variants named in one message).
    """
    use_seeds = check_seeds(list(seeds), "--seeds") if seeds is not None else spec.seeds
    extra = check_overrides(list(extra_overrides), "the command-line overrides")
    names = [v.name for v in spec.variants]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: no such variant in {spec_origin(spec.source)}; "
                          f"variants: {', '.join(names)}")
    extra_keys = {override_key(o) for o in extra}
    errors: list[str] = []
    composed: list[tuple[str, int, RunConfig]] = []
    for v in spec.variants:
        replaced = sorted(extra_keys & {override_key(o) for o in v.overrides})
        if replaced and echo is not None:
            echo(f"note: the command-line overrides replace {', '.join(replaced)} of variant {v.name!r}")
        for seed in use_seeds:
            try:
                cfg = compose(spec, v, seed, extra)
            except ConfigError as exc:
                errors.append(str(exc))
                break
            composed.append((v.name, seed, cfg))
    if errors:
        verb = "has" if len(errors) == 1 else "have"
        raise ConfigError(f"{len(errors)} of {len(spec.variants)} variants {verb} an invalid config; nothing was run: "
                          + " | ".join(errors))
    return composed
