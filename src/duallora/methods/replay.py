"""Replayed statistics passes: a task's tokens entering the first block it can change, kept for its later passes.

DualLoRA passes over a task's images three times outside training (docs/method.md, "Learning task t"): the
statistics before training (steps 1-3), the memory after it (step 6) and the class statistics under the
inference gating (step 7). The blocks below the first adapted block never change (at the defaults, with
``protect_gate``, that is every block but the last), so the later passes need to run only the blocks from
there on. :class:`TokenReplay` records, during the first pass, each batch's tokens entering that block, its
labels and the mean ``norm1`` tokens of the blocks below it (the gate's and the class statistics' features
there), and hands them back in the same batches and order; :meth:`AdaptedViT.features_from` runs the rest.
The statistics are the same numbers as with every block run again (tests/test_replay.py).

Memory: images x tokens x width x 4 bytes for float32 tokens (12,000 images of 50 tokens of width 192, the
default benchmark's task: 440 MiB), held from the first pass to the end of the task. A task whose tokens
exceed ``max_mib`` (default :data:`MAX_MIB`) is not recorded and its later passes run every block, as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from duallora.model import AdaptedViT

#: tokens kept per task at most (MiB); above it the later passes run every block (docs/performance.md)
MAX_MIB = 2048


@dataclass
class ReplayBatch:
    """One recorded batch: ``tokens`` (B, N, D) entering block ``TokenReplay.block``, local labels ``y``
    (B,) and ``early``: the mean ``norm1`` tokens (B, D) of blocks ``0 .. block - 1``, in block order."""

    tokens: torch.Tensor
    y: torch.Tensor
    early: list[torch.Tensor]


class TokenReplay:
    """The batches of one task's first statistics pass, replayed from block ``block`` (module docstring).

    Args:
        model: the adapted model (hooks go on ``backbone.blocks``).
        block: the first block whose output may change during the task (> 0).
        max_mib: the most tokens kept (MiB); above it nothing is kept and :attr:`complete` stays false.

    Raises:
        ValueError: ``block`` is not in ``1 .. depth - 1``.
    """

    def __init__(self, model: AdaptedViT, block: int, max_mib: float = MAX_MIB) -> None:
        depth = len(model.backbone.blocks)
        if not 0 < block < depth:
            raise ValueError(f"replay block {block} outside 1..{depth - 1}: nothing to skip")
        self.model = model
        self.block = block
        self.max_bytes = int(max_mib * 2**20)
        self.batches: list[ReplayBatch] = []
        #: true once a whole pass was recorded within ``max_mib``; only then are batches replayed
        self.complete = False
        self._bytes = 0
        self._dropped = False

    @contextmanager
    def record(self) -> Iterator[Callable[[torch.Tensor], None]]:
        """While active, each forward pass of the model is kept; call the yielded ``close(y)`` with the
        batch's labels after its forward pass. A pass left by an exception is not :attr:`complete`."""
        self.batches.clear()
        self.complete = False
        self._bytes = 0
        self._dropped = False
        pending: dict = {"early": {}}
        blocks = self.model.backbone.blocks

        def keep_tokens(module: torch.nn.Module, args: tuple) -> None:
            pending["tokens"] = args[0].detach()

        def make_norm_hook(b: int):
            def hook(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
                pending["early"][b] = out.mean(dim=1).detach()  # as capture_gate_tokens computes it
            return hook

        def close(y: torch.Tensor) -> None:
            tokens = pending.pop("tokens")
            early = [pending["early"].pop(b) for b in range(self.block)]
            if self._dropped:
                return
            self._bytes += tokens.nbytes
            if self._bytes > self.max_bytes:
                self._dropped = True
                self.batches.clear()
                return
            self.batches.append(ReplayBatch(tokens, y, early))

        hooks = [blocks[self.block].register_forward_pre_hook(keep_tokens)]
        hooks += [blocks[b].norm1.register_forward_hook(make_norm_hook(b)) for b in range(self.block)]
        try:
            yield close
            self.complete = not self._dropped
        finally:
            for h in hooks:
                h.remove()

    @staticmethod
    def seed(parts: list[torch.Tensor], blocks: list[int], batch: ReplayBatch) -> None:
        """Append to ``parts`` the recorded mean ``norm1`` tokens of those ``blocks`` below the replay block,
        as :func:`~duallora.methods.posterior.capture_gate_tokens`'s hooks on them would have."""
        parts.extend(batch.early[b] for b in blocks if b < len(batch.early))
