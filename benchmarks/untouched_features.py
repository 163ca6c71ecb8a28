"""Which features of the *untouched* backbone identify the task best? Training-free, on validation data.

For a benchmark config, extracts once per image of the training and evaluation splits (the backbone as
loaded, no adapter) the mean ``norm1`` tokens of every block (what DualLoRA's shared gate reads, block by
block) and the final feature, then, task after task (class-incremental, no images kept: only class means
and a pooled within-class covariance, :class:`~duallora.signatures.TaskSignatures`), reports after the last
task for several feature sets:

* task-identity accuracy of the Mahalanobis task posterior (min distance over a task's classes);
* final accuracy of the Mahalanobis nearest class mean (pooled covariance) over every seen class.

It answers, before any training, where statistics that no adapter moves can come from and how good they are
(issue 13: "statistics that survive the adapters"). Evaluate on validation data (``data.evaluate_on``) when
the answer chooses a default.

Usage::

    python benchmarks/untouched_features.py --config configs/tiny_imagenet_10tasks.yaml \\
        data.root=PATH/tiny-imagenet-200-32px.zip data.evaluate_on=validation --output runs/untouched.json
    python benchmarks/untouched_features.py data.train_per_class=2000 data.validation_fraction=0.1 \\
        data.evaluate_on=validation          # the default benchmark
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from duallora.config import load_config
from duallora.methods.posterior import capture_gate_tokens
from duallora.runner import build_scenario
from duallora.signatures import TaskSignatures
from duallora.training import ContinualLearner


@torch.no_grad()
def extract(learner: ContinualLearner, dataset, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: gate tokens of every block (N, depth, D), final features (N, D), labels (N,)."""
    model = learner.model
    blocks = list(range(len(model.backbone.blocks)))
    tokens, finals, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch, shuffle=False):
        with capture_gate_tokens(model, blocks) as parts:
            f = model.features(x)
        tokens.append(torch.stack(parts, dim=1).float())
        finals.append(f.float())
        labels.append(torch.as_tensor(y))
    return torch.cat(tokens), torch.cat(finals), torch.cat(labels)


def feature_sets(depth: int) -> dict[str, tuple[list[int], bool]]:
    """name -> (blocks whose gate tokens are concatenated, with the final feature)."""
    sets = {f"block {b}": ([b], False) for b in range(depth)}
    sets.update({f"blocks 0-{b}": (list(range(b + 1)), False) for b in range(1, depth)})
    sets["final"] = ([], True)
    sets[f"blocks 0-{depth - 1} + final"] = (list(range(depth)), True)
    return sets


def assemble(tokens: torch.Tensor, final: torch.Tensor, blocks: list[int], with_final: bool) -> torch.Tensor:
    parts = [tokens[:, b] for b in blocks] + ([final] if with_final else [])
    return torch.cat(parts, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a run config (default: the default benchmark)")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["train.progress=false", "train.device=cpu"] + args.overrides)
    start = time.perf_counter()
    learner = ContinualLearner(cfg, num_tasks=cfg.data.num_tasks)
    scenario = build_scenario(cfg, learner.backbone_info)
    depth = len(learner.model.backbone.blocks)
    sets = feature_sets(depth)
    sigs = {name: None for name in sets}
    evals = []
    for task in scenario.tasks:
        tok, fin, y = extract(learner, scenario.train_dataset(task.index), args.batch)
        local = scenario.local_index(y)
        for name, (blocks, with_final) in sets.items():
            z = assemble(tok, fin, blocks, with_final)
            if sigs[name] is None:
                sigs[name] = TaskSignatures(z.shape[1], score="mahalanobis", tau=cfg.method.tau_id,
                                            ridge=cfg.method.ridge)
            acc = TaskSignatures.new_accumulator(len(task.classes), z.shape[1])
            TaskSignatures.accumulate(acc, z, local)
            sigs[name].add_task(acc)
        evals.append(extract(learner, scenario.test_dataset(task.index), args.batch))
    tok = torch.cat([e[0] for e in evals])
    fin = torch.cat([e[1] for e in evals])
    y = torch.cat([e[2] for e in evals])
    true_task, true_pos = scenario.task_of(y), scenario.position_of(y)
    rows = {}
    for name, (blocks, with_final) in sets.items():
        z = assemble(tok, fin, blocks, with_final)
        task_acc = (sigs[name].task_distances(z).argmin(1) == true_task).double().mean().item() * 100
        class_acc = (sigs[name].class_distances(z).argmin(1) == true_pos).double().mean().item() * 100
        rows[name] = {"dim": z.shape[1], "task_id_accuracy": task_acc, "ncm_final_accuracy": class_acc}
    elapsed = time.perf_counter() - start
    print(f"{cfg.data.dataset}, {cfg.data.num_tasks} tasks, backbone {cfg.backbone.name}, split "
          f"{cfg.data.evaluate_on}, {y.numel()} images, {elapsed:.0f} s")
    print(f"{'features':<24} {'dim':>5} {'task-id %':>10} {'NCM final %':>12}")
    for name, r in rows.items():
        print(f"{name:<24} {r['dim']:>5} {r['task_id_accuracy']:>10.2f} {r['ncm_final_accuracy']:>12.2f}")
    if args.output is not None:
        record = {"config": args.config, "overrides": args.overrides, "evaluate_on": cfg.data.evaluate_on,
                  "images": y.numel(), "seconds": elapsed, "torch": torch.__version__,
                  "threads": args.threads, "rows": rows}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
