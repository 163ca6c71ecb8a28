"""torchrun with 2 CPU processes (gloo) learns like one process; the batch order matches torch's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from duallora.backbones import SHIPPED_WEIGHTS
from duallora.cli import app
from duallora.distributed import GlobalBatchSampler

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SMALL = ["train.min_steps=0", "train.max_batch_fraction=null", "data.train_per_class=40", "data.test_per_class=10",
         "train.epochs=2", "train.progress=false", "train.batch_size=16", "train.threads=1"]


def test_single_process_batches_equal_a_shuffled_dataloader():
    data = TensorDataset(torch.arange(37))
    ref = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
    ours = DataLoader(data, batch_sampler=GlobalBatchSampler(37, 8, torch.Generator().manual_seed(5)))
    for _ in range(3):  # several epochs: the generator must advance the same way
        assert [b[0].tolist() for b in ref] == [b[0].tolist() for b in ours]


def test_two_processes_split_each_global_batch(monkeypatch):
    import duallora.distributed as d

    parts = []
    for r in range(2):
        monkeypatch.setattr(d, "rank", lambda r=r: r)
        monkeypatch.setattr(d, "world_size", lambda: 2)
        parts.append(list(GlobalBatchSampler(10, 4, torch.Generator().manual_seed(1))))
    monkeypatch.setattr(d, "rank", lambda: 0)
    monkeypatch.setattr(d, "world_size", lambda: 1)
    whole = list(GlobalBatchSampler(10, 4, torch.Generator().manual_seed(1)))
    assert len(parts[0]) == len(parts[1]) == len(whole) == 3
    for a, b, w in zip(parts[0], parts[1], whole):
        assert sorted(a + b) == sorted(w) and not set(a) & set(b)


@pytest.mark.skipif(not (SHIPPED_WEIGHTS.is_file() and FMNIST.is_file()),
                    reason="needs the shipped weights and the Fashion-MNIST files")
def test_torchrun_two_processes_match_one(tmp_path):
    one = tmp_path / "one"
    r = CliRunner().invoke(app, ["run", "-o", str(one), *SMALL])
    assert r.exit_code == 0, r.output
    two = tmp_path / "two"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "duallora", "run", "-o", str(two), *SMALL],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m2["class_order"] == m1["class_order"]
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert [h["memory_size"] for h in h2] == [h["memory_size"] for h in h1]
    assert abs(m2["final_accuracy"] - m1["final_accuracy"]) <= 1.0
    # only rank 0 wrote: one run folder, no leftovers
    assert not Path(str(two) + ".partial").exists()


def _drift_on_shard(rank: int, world: int, store: str, data: dict, out: str) -> None:
    import torch.distributed as dist

    from duallora.signatures import TaskSignatures, semantic_drift

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        sig = TaskSignatures(3, ridge=1e-6)
        sig.load("s.", data["state"])
        before, after = data["before"][rank::world], data["after"][rank::world]  # this process's shard
        torch.save(semantic_drift(before, after, sig, bandwidth=0.5), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_semantic_drift_under_two_processes_equals_one(tmp_path):
    from duallora.signatures import TaskSignatures, semantic_drift

    g = torch.Generator().manual_seed(0)
    sig = TaskSignatures(3, ridge=1e-6)
    acc = TaskSignatures.new_accumulator(2, 3)
    TaskSignatures.accumulate(acc, torch.randn(40, 3, generator=g, dtype=torch.float64), torch.arange(40) % 2)
    sig.add_task(acc)
    before = torch.randn(11, 3, generator=g, dtype=torch.float64)
    after = before + torch.randn(11, 3, generator=g, dtype=torch.float64)
    want = semantic_drift(before, after, sig, bandwidth=0.5)
    data = {"state": sig.state("s."), "before": before, "after": after}
    torch.multiprocessing.spawn(_drift_on_shard, args=(2, str(tmp_path / "store"), data, str(tmp_path / "drift")),
                                nprocs=2)
    for rank in range(2):
        assert torch.allclose(torch.load(tmp_path / f"drift.{rank}"), want, atol=1e-12)
