"""Speed and memory of DualLoRA against the methods it claims to beat, measured side by side.

Prints a table and writes JSON (default ``benchmarks/results/speed.json``). Every figure is a ratio of
two measurements taken in the same process, interleaved, so machine noise cancels as far as it can:

* inference time per image after T tasks: DualLoRA / frozen backbone, / InfLoRA, / L2P (two passes),
  at batch 1 and batch 64, and every compared method's (baselines, ``*-posterior`` heads,
  training-free classifiers) over the frozen method's (``over_frozen``);
* training time per step (forward + backward + optimiser step) on task 2: DualLoRA / seq-lora (same
  rank and layers), / InfLoRA; and task 2's whole time (statistics passes, training, memory update) of
  DualLoRA / InfLoRA at the same epochs and batch (InfLoRA's statistics on the default subset, and on every
  image as in its official code); and DualLoRA at its defaults until 2026-12-07 (``duallora-v1``: adapters
  in every block, statistics on 2,000 images) beside them;
* statistics passes and memory update per task as a share of that task's training time, at the
  default epochs (the ratio does not depend on the task's size: both scale with it);
* activation memory of one training step (bytes saved for backward): DualLoRA / seq-lora.

Usage::

    python benchmarks/speed.py --threads 1        # shipped backbone, 5 tasks, about 5-7 minutes
    python benchmarks/speed.py --repeats 30 --output /tmp/speed.json
    python benchmarks/speed.py --inference-only --threads 1   # inference rows only, about 5 minutes

Timings use random images on the shipped backbone (28x28x1 ViT, width 192, depth 6); the adapters'
structure after T tasks, not their trained values, decides the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from duallora.budget import TrainingBudgetWarning
from duallora.config import load_config
from duallora.signatures import TaskSignatures
from duallora.training import ContinualLearner

COMMON = ["train.progress=false", "train.device=cpu"]
#: DualLoRA's defaults until 2026-12-07 (variant ``duallora-v1`` of the comparison specs; docs/method.md, "Defaults")
V1 = ["method.gate_layer=2", "method.protect_gate=false", "method.class_scores=heads", "method.class_tau=null",
      "method.stat_images=2000", "method.shrinkage=none"]


def learner_after(method: str, tasks: int, per_class: int, epochs: int, extra: list[str],
                  classes_per_task: int = 2) -> ContinualLearner:
    """A learner of ``method`` that has learned ``tasks`` tasks of ``classes_per_task`` random classes each."""
    cfg = load_config(None, COMMON + [f"method.name={method}", f"train.epochs={epochs}"] + extra)
    learner = ContinualLearner(cfg, num_tasks=tasks)
    g = torch.Generator().manual_seed(0)
    c, h, w = learner.backbone_info.input_size
    k = classes_per_task
    for t in range(tasks):
        classes = tuple(range(k * t, k * t + k))
        x = torch.randint(0, 256, (k * per_class, c, h, w), generator=g, dtype=torch.uint8)
        y = torch.tensor(classes).repeat_interleave(per_class)
        learner.learn_task(TensorDataset(x, y), classes)
    return learner


def time_calls(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def full_distances(learner: ContinualLearner, x: torch.Tensor):
    """``learner.predict(x)`` with every Mahalanobis distance computed in full (``|L^{-1}(z - mu_c)|^2``, O(D^2)
    per image), as before 2026-12-07, instead of up to a row constant (O(D C); signatures.py)."""
    original = TaskSignatures.class_distances
    TaskSignatures.class_distances = lambda self, z, relative=False: original(self, z)
    try:
        return learner.predict(x)
    finally:
        TaskSignatures.class_distances = original


def inference(learners: dict[str, ContinualLearner], repeats: int) -> dict:
    out = {}
    c, h, w = next(iter(learners.values())).backbone_info.input_size
    for batch in (1, 64):
        x = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8)
        fns = {name: (lambda learner=learner, x=x: learner.predict(x)) for name, learner in learners.items()}
        duallora = learners["duallora"]
        fns["duallora-full-distances"] = lambda duallora=duallora, x=x: full_distances(duallora, x)
        frozen = learners["frozen"]
        fns["backbone"] = lambda frozen=frozen, x=x: frozen.model.features(x)
        med = time_calls(fns, repeats if batch == 64 else repeats * 4)
        per_image = {k: v / batch * 1e3 for k, v in med.items()}
        out[f"batch_{batch}"] = {"ms_per_image": per_image, "duallora_over_backbone": med["duallora"] / med["backbone"],
                                 "duallora_full_distances_over_backbone":
                                     med["duallora-full-distances"] / med["backbone"]}
        for other in ("frozen", "inflora", "l2p"):
            if other in med:
                out[f"batch_{batch}"][f"duallora_over_{other}"] = med["duallora"] / med[other]
        out[f"batch_{batch}"]["over_frozen"] = {k: v / med["frozen"] for k, v in med.items()}
    return out


def training_step(rounds: int, per_class: int, only: list[str] | None = None) -> dict:
    """Seconds per training step on task 2 (its orthogonal and residual adapters, head), batch 128, and
    the whole time of task 2 (statistics passes, training, memory update: the record's ``task_time_s``).

    Each round builds DualLoRA, ``duallora-v1``, seq-lora, InfLoRA (default ``stat_images``) and InfLoRA with statistics
    over every image (``inflora-all-images``, its official setting) learners in turn on the same random data,
    all at the same epochs and batch, and reads task 2's times from the learner's record; medians over rounds.
    ``duallora-full-passes`` is DualLoRA with every statistics pass running every block (``stat_replay_mib=0``).
    Task 1 has 1,024 images whatever ``per_class`` (task 2's cost barely depends on it); ``only`` picks learners.
    """
    names = {"duallora": ("duallora", []), "duallora-full-passes": ("duallora", ["method.stat_replay_mib=0"]),
             "duallora-v1": ("duallora", V1), "seq-lora": ("seq-lora", []),
             "inflora": ("inflora", []), "inflora-all-images": ("inflora", ["method.stat_images=null"])}
    if only:
        names = {n: names[n] for n in only}
    per_step: dict[str, list[float]] = {n: [] for n in names}
    per_task: dict[str, list[float]] = {n: [] for n in names}
    saved: dict[str, int] = {}
    for _ in range(rounds):
        for name, (method_name, extra) in names.items():
            learner = learner_after(method_name, 1, 512, 1, extra)
            method = learner.method
            original = method.train_logits
            calls = {"n": 0}

            def measured(x, t, original=original, name=name, calls=calls):
                calls["n"] += 1
                if calls["n"] == 2:  # one forward's activations saved for backward
                    box: dict[int, int] = {}
                    with torch.autograd.graph.saved_tensors_hooks(lambda z: _note(box, z), lambda z: z):
                        out = original(x, t)
                    saved[name] = sum(box.values())
                    return out
                return original(x, t)

            method.train_logits = measured  # type: ignore[method-assign]
            c, h, w = learner.backbone_info.input_size
            g = torch.Generator().manual_seed(1)
            x = torch.randint(0, 256, (2 * per_class, c, h, w), generator=g, dtype=torch.uint8)
            y = torch.tensor([100] * per_class + [101] * per_class)
            record = learner.learn_task(TensorDataset(x, y), (100, 101))
            per_step[name].append(record["train_time_s"] / record["steps"])  # steps after train.min_steps
            per_task[name].append(record["task_time_s"])
    med = {k: statistics.median(v) for k, v in per_step.items()}
    task = {k: statistics.median(v) for k, v in per_task.items()}
    if only:
        return {"ms_per_step": {k: v * 1e3 for k, v in med.items()}, "task_s": task, "task_s_rounds": per_task,
                "images_per_task": 2 * per_class, "activation_mib": {k: v / 2**20 for k, v in saved.items()},
                "task_over_inflora_all_images": {k: v / task["inflora-all-images"] for k, v in task.items()}
                if "inflora-all-images" in task else {}}
    return {
        "ms_per_step": {k: v * 1e3 for k, v in med.items()},
        "task_s": task,
        "images_per_task": 2 * per_class,
        "task_duallora_over_full_passes": task["duallora"] / task["duallora-full-passes"],
        "task_duallora_over_inflora": task["duallora"] / task["inflora"],
        "task_duallora_over_inflora_all_images": task["duallora"] / task["inflora-all-images"],
        "task_duallora_v1_over_inflora": task["duallora-v1"] / task["inflora"],
        "task_duallora_over_duallora_v1": task["duallora"] / task["duallora-v1"],
        "duallora_over_seq_lora": med["duallora"] / med["seq-lora"],
        "duallora_over_inflora": med["duallora"] / med["inflora"],
        "activation_mib": {k: v / 2**20 for k, v in saved.items()},
        "activation_duallora_over_seq_lora": saved["duallora"] / saved["seq-lora"],
    }


def _note(box: dict[int, int], t: torch.Tensor) -> torch.Tensor:
    """Record a saved tensor's storage size (each storage once)."""
    try:
        box[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    except RuntimeError:
        pass
    return t


def statistics_share(tasks: int, per_class: int, epochs: int) -> dict:
    """(task time - training time) / training time per task, DualLoRA at the given epochs.

    The statistics passes see ``method.stat_images`` images of each task (default 2000) while
    training sees all of them, so the share depends on the task's size: measure it at the default
    benchmark's (6000 images per class, 2 classes per task).
    """
    learner = learner_after("duallora", tasks, per_class, epochs, [])
    shares = [(r["task_time_s"] - r["train_time_s"]) / r["train_time_s"] for r in learner.history]
    return {"per_task": shares, "mean": statistics.mean(shares), "epochs": epochs,
            "images_per_task": 2 * per_class, "stat_images": learner.cfg.method.stat_images,
            "train_time_s": [r["train_time_s"] for r in learner.history],
            "statistics_time_s": [r["task_time_s"] - r["train_time_s"] for r in learner.history]}


def machine() -> dict:
    """Python and torch versions, torch threads and CPU of this run, for every JSON it writes."""
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}


def write_result(result: dict, output: Path) -> None:
    """Write every figure of ``result`` to the JSON file ``output`` and say where."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {output} ({result['wall_time_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5, help="tasks learned before inference is timed")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (batch 1 uses 4x)")
    parser.add_argument("--train-rounds", type=int, default=3, help="rounds of the training-step comparison")
    parser.add_argument("--task-images", type=int, default=12000,
                        help="images per task for the statistics share (the default benchmark has 12000)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for the statistics share (None: the config default)")
    parser.add_argument("--whole-task", type=int, default=None, metavar="IMAGES",
                        help="only compare a whole task's time (statistics passes included) at this many images per "
                             "task: DualLoRA, DualLoRA with full statistics passes, InfLoRA (both statistics sizes)")
    parser.add_argument("--inference-only", action="store_true",
                        help="only time inference (batch 1 and 64) of every compared method's inference path")
    parser.add_argument("--variants", default=None,
                        help="--inference-only: comma-separated variants to time (duallora and frozen always; "
                             "default: every one)")
    parser.add_argument("--backbone", default=None,
                        help="--inference-only: backbone.name (default: the shipped one; e.g. "
                             "vit_tiny_patch4_32.duallora_tinyimagenet100)")
    parser.add_argument("--classes-per-task", type=int, default=2,
                        help="--inference-only: classes per task (the Tiny-ImageNet presets have 10)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 on a shared machine; None: torch default)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "speed.json",
                        help="JSON file for every figure")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # random images at 1 epoch: the loss is not meant to fall; the adapters' structure decides the cost
    warnings.filterwarnings("ignore", category=TrainingBudgetWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or load_config(None).train.epochs
    t0 = time.perf_counter()
    if args.whole_task:
        only = ["duallora", "duallora-full-passes", "inflora", "inflora-all-images"]
        result = {"machine": machine(),
                  "whole_task": training_step(args.train_rounds, per_class=args.whole_task // 2, only=only)}
        result["wall_time_s"] = time.perf_counter() - t0
        wt = result["whole_task"]
        print(f"task 2 of {wt['images_per_task']} images, medians over {args.train_rounds} round(s):")
        for k in only:
            print(f"  {k:22s} whole task {wt['task_s'][k]:8.1f} s  ({wt['task_over_inflora_all_images'][k]:.3f} of "
                  f"inflora-all-images), {wt['ms_per_step'][k]:.0f} ms per training step")
        write_result(result, args.output)
        return 0
    # variant -> (method, overrides): every method of the comparison tables with a distinct inference path
    variants = {"duallora": ("duallora", []), "duallora-v1": ("duallora", V1), "frozen": ("frozen", []),
                "inflora": ("inflora", []),
                "l2p": ("l2p", []), "sd-lora": ("sd-lora", []), "seq-lora": ("seq-lora", []),
                "frozen-posterior": ("frozen", ["method.task_posterior=gate"]),
                "inflora-posterior": ("inflora", ["method.task_posterior=gate"]),
                "fecam": ("fecam", []), "ranpac": ("ranpac", []), "ncm-gate": ("ncm-gate", [])}
    if args.inference_only:
        chosen = set(args.variants.split(",")) | {"duallora", "frozen"} if args.variants else set(variants)
        unknown = chosen - set(variants)
        if unknown:
            parser.error(f"unknown variant(s) {sorted(unknown)}; choose among {sorted(variants)}")
        backbone = [f"backbone.name={args.backbone}"] if args.backbone else []
        learners = {n: learner_after(m, args.tasks, 8, 1, extra + backbone, args.classes_per_task)
                    for n, (m, extra) in variants.items() if n in chosen}
        result = {"machine": machine(), "tasks": args.tasks, "classes_per_task": args.classes_per_task,
                  "backbone": args.backbone or load_config(None).backbone.name,
                  "inference": inference(learners, args.repeats)}
        result["wall_time_s"] = time.perf_counter() - t0
        for batch in ("batch_1", "batch_64"):
            inf = result["inference"][batch]
            print(f"{batch}: DualLoRA / frozen backbone {inf['duallora_over_backbone']:.3f} (<= 1.15), "
                  + (f"/ L2P {inf['duallora_over_l2p']:.3f} (<= 0.60), " if "duallora_over_l2p" in inf else "")
                  + f"/ frozen method {inf['duallora_over_frozen']:.3f}; with full distances (before 2026-12-07) "
                  f"/ frozen backbone {inf['duallora_full_distances_over_backbone']:.3f}")
            print("  time / frozen: " + ", ".join(f"{k} {v:.2f}" for k, v in inf["over_frozen"].items()))
        write_result(result, args.output)
        return 0
    learners = {n: learner_after(m, args.tasks, 8, 1, extra) for n, (m, extra) in variants.items()}
    result = {
        "machine": machine(),
        "tasks": args.tasks,
        "inference": inference(learners, args.repeats),
        "training": training_step(args.train_rounds, per_class=512),
        "statistics": statistics_share(2, args.task_images // 2, epochs),
    }
    result["wall_time_s"] = time.perf_counter() - t0
    inf, tr, st = result["inference"], result["training"], result["statistics"]
    rows = [
        ("inference, batch 1: DualLoRA / frozen backbone", inf["batch_1"]["duallora_over_backbone"], "<= 1.15"),
        ("inference, batch 64: DualLoRA / frozen backbone", inf["batch_64"]["duallora_over_backbone"], "<= 1.15"),
        ("inference, batch 1: DualLoRA / frozen (backbone + heads)", inf["batch_1"]["duallora_over_frozen"], ""),
        ("inference, batch 64: DualLoRA / frozen (backbone + heads)", inf["batch_64"]["duallora_over_frozen"], ""),
        ("inference, batch 1: DualLoRA / L2P", inf["batch_1"]["duallora_over_l2p"], "<= 0.60"),
        ("inference, batch 64: DualLoRA / L2P", inf["batch_64"]["duallora_over_l2p"], "<= 0.60"),
        ("inference, batch 1: DualLoRA / InfLoRA", inf["batch_1"]["duallora_over_inflora"], ""),
        ("inference, batch 64: DualLoRA / InfLoRA", inf["batch_64"]["duallora_over_inflora"], ""),
        ("training step: DualLoRA / seq-lora", tr["duallora_over_seq_lora"], "<= 1.10"),
        ("training step: DualLoRA / InfLoRA", tr["duallora_over_inflora"], ""),
        ("whole task (statistics + training + memory): DualLoRA / InfLoRA", tr["task_duallora_over_inflora"],
         "<= 1.00"),
        ("whole task: DualLoRA / InfLoRA with statistics over every image (official)",
         tr["task_duallora_over_inflora_all_images"], "<= 1.00"),
        ("whole task: DualLoRA / DualLoRA with every statistics pass over every block",
         tr["task_duallora_over_full_passes"], ""),
        ("whole task: DualLoRA / DualLoRA with the defaults until 2026-12-07 (duallora-v1)",
         tr["task_duallora_over_duallora_v1"], ""),
        ("whole task: duallora-v1 / InfLoRA", tr["task_duallora_v1_over_inflora"], ""),
        ("activation memory: DualLoRA / seq-lora", tr["activation_duallora_over_seq_lora"], ""),
        (f"statistics + memory update / training time ({epochs} epochs, {args.task_images} images/task)",
         st["mean"], "<= 0.10"),
    ]
    print(f"{'measure':78s} {'ratio':>7s}  target")
    for name, value, target in rows:
        print(f"{name:78s} {value:7.3f}  {target}")
    print("ms per image (batch 64): " + ", ".join(f"{k} {v:.3f}" for k, v in inf["batch_64"]["ms_per_image"].items()))
    print("inference time / frozen (batch 64): "
          + ", ".join(f"{k} {v:.2f}" for k, v in inf["batch_64"]["over_frozen"].items()))
    print("ms per training step: " + ", ".join(f"{k} {v:.1f}" for k, v in tr["ms_per_step"].items()))
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
