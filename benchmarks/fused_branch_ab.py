"""A/B in one process: DualLoRA's training on task 2 with the fused training branch (the current
``AdaptedLinear.forward``) and with separate orthogonal and residual branches (the code before 2026-12-07,
reproduced below), beside InfLoRA; interleaved rounds, medians. Prints JSON (docs/performance.md).

    python benchmarks/fused_branch_ab.py --rounds 3 --min-steps 40     # about 10 minutes on this machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from duallora.adapters import AdaptedLinear

sys.path.insert(0, str(Path(__file__).parent))
from speed import learner_after  # noqa: E402

FUSED_FORWARD = AdaptedLinear.forward


def separate_forward(self: AdaptedLinear, h: torch.Tensor) -> torch.Tensor:
    """``AdaptedLinear.forward`` before 2026-12-07: every branch its own two matrix products."""
    if self.recorder is not None:
        self.recorder(h)
    y = self.base(h)
    if self.orth_A is not None and self.orth_B is not None and self.orth_A.shape[0] > 0:
        y = y + F.linear(F.linear(h, self.orth_A), self.orth_B)
    if self.lora_A is not None and self.lora_B is not None:
        y = y + self.lora_scale * F.linear(F.linear(h, self.lora_A), self.lora_B)
    gates = self.residual_gates(h)
    if gates is not None:
        if gates.ndim == 1:
            for j in torch.nonzero(gates).flatten().tolist():
                y = y + gates[j] * F.linear(h @ self.res_P[j], self.res_B[j])
        else:
            P, Bcat, cols = self.residual_stack()
            g = gates.index_select(1, cols).to(h.dtype)
            z = h @ P
            shape = (g.shape[0],) + (1,) * (z.ndim - 2) + (g.shape[1],)
            y = y + F.linear(z * g.view(shape), Bcat)
    return y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument("--min-steps", type=int, default=40, help="train.min_steps of every task")
    parser.add_argument("--per-class", type=int, default=512, help="random images per class (2 classes per task)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")  # random images: every budget warning fires
    torch.set_num_threads(1)
    variants = {"duallora-fused": ("duallora", FUSED_FORWARD), "duallora-separate": ("duallora", separate_forward),
                "inflora": ("inflora", FUSED_FORWARD)}
    step: dict[str, list[float]] = {k: [] for k in variants}
    task: dict[str, list[float]] = {k: [] for k in variants}
    t0 = time.perf_counter()
    try:
        for _ in range(args.rounds):
            for name, (method, forward) in variants.items():
                AdaptedLinear.forward = forward
                learner = learner_after(method, 1, args.per_class, 1, [f"train.min_steps={args.min_steps}"])
                c, h, w = learner.backbone_info.input_size
                g = torch.Generator().manual_seed(1)
                x = torch.randint(0, 256, (2 * args.per_class, c, h, w), generator=g, dtype=torch.uint8)
                y = torch.tensor([100] * args.per_class + [101] * args.per_class)
                record = learner.learn_task(TensorDataset(x, y), (100, 101))
                step[name].append(record["train_time_s"] / record["steps"])
                task[name].append(record["task_time_s"])
    finally:
        AdaptedLinear.forward = FUSED_FORWARD
    med = {k: statistics.median(v) for k, v in step.items()}
    tmed = {k: statistics.median(v) for k, v in task.items()}
    out = {"rounds": args.rounds, "images_per_task": 2 * args.per_class, "min_steps": args.min_steps,
           "ms_per_step": {k: 1e3 * v for k, v in med.items()}, "task_s": tmed,
           "step_fused_over_separate": med["duallora-fused"] / med["duallora-separate"],
           "task_fused_over_inflora": tmed["duallora-fused"] / tmed["inflora"],
           "task_separate_over_inflora": tmed["duallora-separate"] / tmed["inflora"],
           "step_fused_over_inflora": med["duallora-fused"] / med["inflora"],
           "step_separate_over_inflora": med["duallora-separate"] / med["inflora"],
           "wall_s": time.perf_counter() - t0}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
