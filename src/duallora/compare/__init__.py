"""``duallora compare``: several methods or ablations x several seeds, one folder, one summary.

Every variant x seed of a compare spec (:mod:`duallora.compare.spec`) is composed into a validated
:class:`~duallora.config.RunConfig` with the very function ``duallora run`` uses
(:func:`duallora.config.load_config`) before anything runs. The plan (:mod:`duallora.compare.plan`)
decides for each what is on disk: a finished folder of the same config is reused, an interrupted one
resumed, an inference-only change from a finished run derived from its checkpoints. The runs are
ordinary ``duallora run`` folders ``DIR/runs/<variant>/seed-<s>``, made one after another
(:mod:`duallora.compare.run`); after every run the summary (:mod:`duallora.compare.summary`:
``runs.csv``, ``summary.csv``, ``summary.md``, ``comparison.png``) is rewritten atomically from the
finished runs' ``metrics.json`` files. See docs/compare.md.
"""

from duallora.compare.plan import (
    CONFLICT,
    RERUN,
    RESUME,
    REUSE,
    RUN,
    SKIP,
    PlannedRun,
    derivation_source,
    finished_differences,
    format_plan,
    plan_compare,
    planned_derivations,
    read_metrics,
    run_folder,
    staging_folder,
    stored_differences,
)
from duallora.compare.run import CompareResult, run_compare
from duallora.compare.spec import (
    NAME_PATTERN,
    SPEC_KEYS,
    VARIANT_KEYS,
    CompareSpec,
    Echo,
    Variant,
    check_name,
    check_overrides,
    check_seeds,
    check_unique,
    compose,
    compose_all,
    load_spec,
    override_key,
    parse_names,
    parse_seeds,
    spec_from_methods,
    spec_origin,
)
from duallora.compare.summary import (
    RUN_METRICS,
    SUMMARY_METRICS,
    mean_std,
    plot_comparison,
    result_line,
    write_runs_csv,
    write_summary,
    write_summary_csv,
    write_summary_md,
)

__all__ = [
    "CONFLICT", "RERUN", "RESUME", "REUSE", "RUN", "SKIP",
    "NAME_PATTERN", "RUN_METRICS", "SPEC_KEYS", "SUMMARY_METRICS", "VARIANT_KEYS",
    "CompareResult", "CompareSpec", "Echo", "PlannedRun", "Variant",
    "check_name", "check_overrides", "check_seeds", "check_unique", "compose", "compose_all",
    "derivation_source", "finished_differences", "format_plan", "load_spec", "mean_std", "override_key",
    "parse_names", "parse_seeds", "plan_compare", "planned_derivations", "plot_comparison", "read_metrics",
    "result_line", "run_compare", "run_folder", "spec_from_methods", "spec_origin", "staging_folder",
    "stored_differences", "write_runs_csv", "write_summary", "write_summary_csv", "write_summary_md",
]
