"""Copy a `duallora compare` folder's small results into a folder meant to be committed (docs/results/...).

Kept: the summary files (summary.md/.csv, runs.csv, compare.json, comparison.png, selection.md/.json,
selected/) and, of every finished run, ``metrics.json``, ``config.yaml`` and ``accuracy_matrix.csv``; not
the checkpoints. A compare folder seeded with the kept ``runs/`` reuses those runs (reuse needs only
``metrics.json`` and ``config.yaml``), so a comparison split over sessions never trains a kept run again::

    python scripts/keep_results.py runs/compare-default docs/results/compare-default
    mkdir -p runs/compare-default && cp -r docs/results/compare-default/runs runs/compare-default/   # later

Derived runs are kept too; deriving a *new* variant still needs its source run's checkpoints.
Existing files in the destination are replaced one by one (each written to a temporary name, then renamed);
nothing else there is deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

SUMMARY = ("summary.md", "summary.csv", "runs.csv", "compare.json", "comparison.png", "selection.md",
           "selection.json")
PER_RUN = ("metrics.json", "config.yaml", "accuracy_matrix.csv")


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keep(source: Path, dest: Path) -> int:
    """Copy what is kept from ``source`` to ``dest``; returns the number of finished runs kept."""
    for name in SUMMARY:
        if (source / name).is_file():
            copy_atomic(source / name, dest / name)
    for path in sorted((source / "selected").rglob("*.json")) if (source / "selected").is_dir() else []:
        copy_atomic(path, dest / path.relative_to(source))
    runs = 0
    for metrics in sorted((source / "runs").glob("*/seed-*/metrics.json")):
        folder = metrics.parent
        for name in PER_RUN:
            if (folder / name).is_file():
                copy_atomic(folder / name, dest / folder.relative_to(source) / name)
        runs += 1
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a duallora compare --output folder")
    parser.add_argument("dest", type=Path, help="where to keep the small results (e.g. docs/results/NAME)")
    args = parser.parse_args(argv)
    if not (args.source / "runs").is_dir():
        print(f"error: {args.source} holds no runs/ folder; pass a `duallora compare --output` folder",
              file=sys.stderr)
        return 2
    n = keep(args.source, args.dest)
    print(f"kept {n} finished runs and the summary of {args.source} in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
