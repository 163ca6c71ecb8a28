"""Run every benchmark preset end to end on tiny stand-in data (no real data or ViT-B/16 needed).

    python benchmarks/standins.py /tmp/standins          # build stand-ins, run each preset, print a table
    python benchmarks/standins.py /tmp/standins --dry-run  # only build them and print the commands

Each preset in configs/ runs through the same code path as on real data (its loader, split rule,
transforms and method settings), with three substitutions that make it fit a CPU in seconds: the
stand-in folder as ``data.root``, a random tiny ViT (the shipped architecture, random weights) as the
backbone, and 2 tasks of 1 epoch.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from duallora.data.registry import get_source

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "cifar100_10tasks.yaml": "cifar100",
    "imagenet_r_5tasks.yaml": "imagenet-r",
    "imagenet_r_10tasks.yaml": "imagenet-r",
    "imagenet_r_20tasks.yaml": "imagenet-r",
    "imagenet_a_10tasks.yaml": "imagenet-a",
    "domainnet_5tasks.yaml": "domainnet",
    "cub200_10tasks.yaml": "cub200",
    "tiny_imagenet_5tasks.yaml": "tiny-imagenet",
    "tiny_imagenet_10tasks.yaml": "tiny-imagenet",
    "tiny_imagenet_20tasks.yaml": "tiny-imagenet",
}


def build(folder: Path) -> dict[str, Path]:
    """Stand-in roots for every benchmark dataset (each source's own, ``DataSource.standin``) plus a random
    tiny backbone file under ``folder``."""
    from safetensors.torch import save_file

    from duallora.backbones import build_shipped_architecture

    data = folder / "standin-data"
    if data.exists():  # rebuilt on every call, so the script can be run again on the same folder
        shutil.rmtree(data)
    data.mkdir(parents=True)
    roots = {name: get_source(name).standin(data / name).root for name in dict.fromkeys(PRESETS.values())}
    torch.manual_seed(0)
    weights = data / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in build_shipped_architecture().state_dict().items()}, str(weights))
    roots["weights"] = weights
    return roots


def command(preset: str, root: Path, weights: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "duallora", "run", "--config", str(ROOT / "configs" / preset), "--output",
            str(output), "--overwrite", f"data.root={root}", "backbone.name=vit_tiny_patch7_28.duallora_mnist",
            f"backbone.weights={weights}", "data.num_tasks=2", "train.epochs=1", "train.batch_size=8",
            "train.threads=1", "train.progress=false"] + (["data.classes=null"] if "tiny_imagenet" in preset else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to build the stand-ins and write the runs")
    parser.add_argument("--dry-run", action="store_true", help="build the stand-ins and print the commands only")
    args = parser.parse_args(argv)
    roots = build(args.folder)
    failures = 0
    print(f"{'preset':28s} {'status':8s} {'final acc':>9s} {'seconds':>8s}")
    for preset, dataset in PRESETS.items():
        cmd = command(preset, roots[dataset], roots["weights"], args.folder / "runs" / preset.removesuffix(".yaml"))
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if proc.returncode == 0:
            import json

            m = json.loads((Path(cmd[cmd.index("--output") + 1]) / "metrics.json").read_text())
            print(f"{preset:28s} {'ok':8s} {m['final_accuracy']:9.2f} {took:8.1f}")
        else:
            failures += 1
            print(f"{preset:28s} {'FAILED':8s} {'':9s} {took:8.1f}\n{proc.stderr.strip()[-2000:]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
