"""Continual-learning methods as small classes with a few hooks (in the spirit of Mammoth).

A method owns an :class:`~duallora.model.AdaptedViT` and answers five hooks that the shared training
loop (:mod:`duallora.training`) calls:

* :meth:`ContinualMethod.begin_task` before training task t (statistics passes, new adapters, head);
* :meth:`ContinualMethod.param_groups` the parameters to train for task t;
* :meth:`ContinualMethod.train_logits` task-local logits (B, C_t) for the cross-entropy;
* :meth:`ContinualMethod.end_task` after training (merge, freeze, memory and statistics update);
* :meth:`ContinualMethod.infer` one forward pass at test time, no task label: class probabilities
  over all seen classes and a task posterior.

Methods are looked up in :data:`METHODS` by their config name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from duallora.config import MethodConfig
from duallora.memory import GramAccumulator, SubspaceMemory, energy_threshold
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures

Progress = Callable[[Iterable, str], Iterable]


@dataclass
class TaskContext:
    """What a hook knows about the task at hand.

    Attributes:
        task: 0-based index of the task.
        num_classes: C_t, classes of this task.
        num_tasks: T if known (for the energy-threshold schedule), else None.
        stats_loader: iterable of ``(images uint8 (B, C, H, W), local labels (B,))`` over the task's
            training data, without augmentation.
        device: where the model lives.
        progress: wraps an iterable with a progress bar: ``progress(iterable, description)``.
    """

    task: int
    num_classes: int
    num_tasks: Optional[int]
    stats_loader: Iterable
    device: torch.device
    progress: Progress


@dataclass
class Inference:
    """Output of one forward pass over a batch of B images.

    Attributes:
        probs: (B, C) probability of each seen class, columns in class-order position.
        task_posterior: (B, T) probability of each seen task.
    """

    probs: torch.Tensor
    task_posterior: torch.Tensor


def _class_task_index(sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def posterior_from_probs(probs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Sum class probabilities (B, C) per task -> (B, T)."""
    idx = _class_task_index(sizes, probs.device)
    out = torch.zeros(probs.shape[0], len(sizes), device=probs.device, dtype=probs.dtype)
    return out.index_add_(1, idx, probs)


class ContinualMethod(nn.Module):
    """Base class: frozen backbone, one head per task trained on its own classes.

    Args:
        model: the wrapped backbone; its adapted layers are those the method needs.
        cfg: the method section of the run config.
        seed: seeds head (and adapter) initialisation.
    """

    name = "base"
    adapted_by_default = True

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.tasks_learned = 0

    # hooks -------------------------------------------------------------------------
    def begin_task(self, ctx: TaskContext) -> dict:
        """Prepare task ``ctx.task``: add its head. Returns facts worth logging."""
        self.model.add_head(ctx.num_classes, self.generator)
        return {}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters for ``task``: ``{"adapters": [...], "head": [...]}``."""
        return {"adapters": [], "head": list(self.model.heads[task].parameters())}

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task-local logits (B, C_t) of images ``x`` (B, C, H, W)."""
        return self.model.head_logits(self.model.features(x), task)

    def end_task(self, ctx: TaskContext) -> dict:
        """Finish ``ctx.task``: freeze its head. Returns facts worth logging."""
        for p in self.model.heads[ctx.task].parameters():
            p.requires_grad_(False)
        self.tasks_learned = ctx.task + 1
        return {}

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        """Plain concatenated logits -> softmax; task posterior = class probabilities summed per task."""
        logits = self.model.head_logits(self.model.features(x))
        probs = torch.softmax(logits, dim=1)
        return Inference(probs, posterior_from_probs(probs, self.model.head_sizes))

    # state -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned so far, as CPU tensors (heads, adapters, memory, statistics)."""
        out: dict[str, torch.Tensor] = {}
        for t, head in enumerate(self.model.heads):
            out[f"heads.{t}.weight"] = head.weight.detach().cpu().contiguous()
            out[f"heads.{t}.bias"] = head.bias.detach().cpu().contiguous()
        for name, layer in self.model.adapted_layers():
            out.update(layer.adapter_state(f"adapters.{name}."))
        out["tasks_learned"] = torch.tensor([self.tasks_learned], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` output into a freshly built method (same config and backbone)."""
        t = 0
        while f"heads.{t}.weight" in tensors:
            head = self.model.add_head(tensors[f"heads.{t}.weight"].shape[0])
            head.weight.copy_(tensors[f"heads.{t}.weight"])
            head.bias.copy_(tensors[f"heads.{t}.bias"])
            head.requires_grad_(False)
            t += 1
        for name, layer in self.model.adapted_layers():
            layer.load_adapter_state(f"adapters.{name}.", tensors)
        self.tasks_learned = int(tensors["tasks_learned"][0])


class Frozen(ContinualMethod):
    """Reference: frozen backbone, per-task linear heads, plain concatenated logits, no adapters."""

    name = "frozen"
    adapted_by_default = False


class SeqLoRA(ContinualMethod):
    """Reference: one plain LoRA adapter (rank ``rank_orthogonal``) fine-tuned on each task in turn.

    No memory, no projection, no calibration: it shows what the DualLoRA machinery adds. The LoRA
    factors keep training across tasks; each task's head is trained during its task only.
    """

    name = "seq-lora"

    def begin_task(self, ctx: TaskContext) -> dict:
        if ctx.task == 0 or self.model.adapted and next(iter(self.model.adapted.values())).lora_A is None:
            for _, layer in self.model.adapted_layers():
                if layer.lora_A is None:
                    layer.add_lora(self.cfg.rank_orthogonal, self.generator)
        return super().begin_task(ctx)

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups(task)
        for _, layer in self.model.adapted_layers():
            assert layer.lora_A is not None and layer.lora_B is not None
            groups["adapters"] += [layer.lora_A, layer.lora_B]
        return groups


class DualLoRA(ContinualMethod):
    """DualLoRA: orthogonal + residual adapters, subspace memory, dynamic gates, calibrated output.

    Implements method.md ("Learning task t" steps 1-7, "Inference: one forward pass"):

    1. statistics pass over D_t (no gradients, all gates 0): Gram matrix ``G_t`` per adapted layer;
    2. ``A_o`` = top-r_o eigenvectors of ``(I - M M^T) G_t (I - M M^T)``, ``B_o = 0`` trained;
    3. for t >= 2, ``P_t`` = top-r_r eigenvectors of ``M M^T G_t M M^T``, ``B_t = 0`` trained;
    4. head_t, ``B_o``, ``B_t`` trained with cross-entropy over C_t, gate of task t = 1, others 0;
    5. merge ``W <- W + B_o A_o``, freeze ``B_t`` and head_t;
    6. statistics pass with the updated model, grow ``M`` to energy threshold eps_t;
    7. class means and pooled within-class scatter per gate layer (mean token entering the layer)
       and for the final features (:class:`~duallora.signatures.TaskSignatures`).

    At inference every adapted layer gates task j's residual adapter per image with
    ``g_j = p(j | x)`` from its own statistics; the output is calibrated with the final-feature task
    posterior: ``p(y | x) = p(task(y) | x) * softmax_{task(y)}(logits)`` (``calibration="product"``).
    """

    name = "duallora"

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.memories = {name: SubspaceMemory(layer.in_features) for name, layer in model.adapted_layers()}
        kw = dict(score=cfg.task_id_score, tau=cfg.tau_id, ridge=cfg.ridge, subspace_dims=cfg.subspace_dims)
        self.signatures: dict[str, TaskSignatures] = {"final": TaskSignatures(model.embed_dim, **kw)}
        if cfg.use_residual:
            for name, layer in model.adapted_layers():
                self.signatures[name] = TaskSignatures(layer.in_features, **kw)
        self.last_info: dict = {}
        self._shared_gate: Optional[torch.Tensor] = None

    # statistics ----------------------------------------------------------------------
    @torch.no_grad()
    def _statistics_pass(self, ctx: TaskContext, grams: bool, signatures: bool, desc: str):
        layers = dict(self.model.adapted_layers())
        G = {n: GramAccumulator(l.in_features, self.cfg.stat_tokens) for n, l in layers.items()} if grams else {}
        acc = {}
        if signatures:
            acc = {s: TaskSignatures.new_accumulator(ctx.num_classes, sig.dim) for s, sig in self.signatures.items()}
        current: dict[str, torch.Tensor] = {}

        def make_recorder(name: str):
            def record(h: torch.Tensor) -> None:
                if name in G:
                    G[name].update(h)
                if name in acc:
                    TaskSignatures.accumulate(acc[name], h.mean(dim=1), current["y"])
            return record

        for name, layer in layers.items():
            layer.recorder = make_recorder(name)
        try:
            for x, y in ctx.progress(ctx.stats_loader, desc):
                current["y"] = y
                feats = self.model.features(x.to(ctx.device, non_blocking=True))
                if signatures:
                    TaskSignatures.accumulate(acc["final"], feats, y)
        finally:
            for layer in layers.values():
                layer.recorder = None
        return {n: g.gram for n, g in G.items()}, acc

    def begin_task(self, ctx: TaskContext) -> dict:
        t = ctx.task
        cfg = self.cfg
        info: dict = {"orthogonal_rank": {}, "residual_rank": {}}
        self.model.set_fixed_gates(t)
        need_residual = cfg.use_residual and t > 0
        if cfg.use_orthogonal or need_residual:
            grams, _ = self._statistics_pass(ctx, grams=True, signatures=False, desc=f"task {t + 1} statistics")
            for name, layer in self.model.adapted_layers():
                mem = self.memories[name]
                if cfg.use_orthogonal:
                    A = mem.orthogonal_directions(grams[name], cfg.rank_orthogonal)
                    layer.add_orthogonal(A.float())
                    info["orthogonal_rank"][name] = int(A.shape[0])
                if need_residual:
                    P = mem.inside_directions(grams[name], cfg.rank_residual)
                    if P.shape[1] > 0:
                        layer.add_residual(t, P.float())
                    info["residual_rank"][name] = int(P.shape[1])
        self.model.set_fixed_gates(t)  # the new residual (if any) is on for the whole task
        super().begin_task(ctx)
        return info

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups(task)
        for _, layer in self.model.adapted_layers():
            if layer.orth_B is not None:
                groups["adapters"].append(layer.orth_B)
            if task in layer.res_tasks:
                groups["adapters"].append(layer.res_B[layer.res_tasks.index(task)])
        return groups

    def end_task(self, ctx: TaskContext) -> dict:
        t = ctx.task
        for _, layer in self.model.adapted_layers():
            layer.merge_orthogonal()
            layer.freeze_residuals()
        super().end_task(ctx)
        self.model.set_fixed_gates(t)
        grams, acc = self._statistics_pass(ctx, grams=True, signatures=True, desc=f"task {t + 1} memory")
        eps = energy_threshold(t, ctx.num_tasks, self.cfg.energy_threshold_start, self.cfg.energy_threshold_end)
        info = {"energy_threshold": eps, "memory_added": {}, "memory_size": {}}
        for name in self.memories:
            info["memory_added"][name] = self.memories[name].grow(grams[name], eps)
            info["memory_size"][name] = self.memories[name].size
        for site, a in acc.items():
            self.signatures[site].add_task(a)
        self.model.set_fixed_gates(None)
        self.last_info = info
        return info

    # inference -----------------------------------------------------------------------
    def _gate_fn(self, name: str, index: int, layer_tasks: list[int]):
        sig = self.signatures[name]
        cfg = self.cfg
        shared_at = cfg.gate_layer if cfg.gate_layer >= 0 else len(self.memories) + cfg.gate_layer

        def gate(h: torch.Tensor) -> torch.Tensor:
            if cfg.gate == "shared" and index > shared_at and self._shared_gate is not None:
                post = self._shared_gate
            else:
                post = sig.task_posterior(h.mean(dim=1))
                if cfg.gate == "hard":
                    post = torch.nn.functional.one_hot(post.argmax(1), post.shape[1]).to(post.dtype)
                if cfg.gate == "shared" and index == shared_at:
                    self._shared_gate = post
            return post[:, layer_tasks]

        return gate

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        self.model.set_fixed_gates(None)
        for i, (name, layer) in enumerate(self.model.adapted_layers()):
            layer.gate_fn = self._gate_fn(name, i, list(layer.res_tasks)) if layer.res_tasks else None
        self._shared_gate = None
        try:
            feats = self.model.features(x)
        finally:
            for _, layer in self.model.adapted_layers():
                layer.gate_fn = None
            self._shared_gate = None
        logits = self.model.head_logits(feats)
        sizes = self.model.head_sizes
        posterior = self.signatures["final"].task_posterior(feats)
        return Inference(calibrate(logits, posterior, sizes, self.cfg.calibration, self.cfg.confidence_threshold),
                         posterior)

    # state ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        for name, mem in self.memories.items():
            out[f"memory.{name}.basis"] = mem.state()
        for site, sig in self.signatures.items():
            out.update(sig.state(f"signatures.{site}."))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        for name, mem in self.memories.items():
            mem.load(tensors[f"memory.{name}.basis"])
        for site, sig in self.signatures.items():
            sig.load(f"signatures.{site}.", tensors)


def calibrate(logits: torch.Tensor, posterior: torch.Tensor, sizes: list[int], mode: str,
              threshold: float = 0.9) -> torch.Tensor:
    """Calibrated class probabilities (method.md, "Calibrated output").

    Args:
        logits: (B, C) concatenated head logits, classes grouped by task in task order.
        posterior: (B, T) task posterior p(j | x).
        sizes: classes per task, ``sum(sizes) == C``.
        mode: ``none`` (softmax over all logits), ``product``
            (``p(task(y) | x) * softmax over the classes of task(y)``), or ``hard`` (when
            ``max_j p(j | x) >= threshold``, only the predicted task's classes keep probability
            (its within-task softmax); otherwise ``product``).

    Returns:
        (B, C) probabilities; rows sum to 1.

    Raises:
        ValueError: unknown mode.
    """
    if mode == "none":
        return torch.softmax(logits, dim=1)
    if mode not in ("product", "hard"):
        raise ValueError(f"unknown calibration {mode!r}")
    within = torch.cat([torch.softmax(chunk, dim=1) for chunk in logits.split(sizes, dim=1)], dim=1)
    idx = _class_task_index(sizes, logits.device)
    probs = within * posterior[:, idx]
    if mode == "hard":
        conf, pred = posterior.max(dim=1)
        sure = conf >= threshold
        hard = within * (idx[None, :] == pred[:, None]).to(within.dtype)
        probs = torch.where(sure[:, None], hard, probs)
    return probs


METHODS: dict[str, type[ContinualMethod]] = {m.name: m for m in (DualLoRA, Frozen, SeqLoRA)}


def build_method(model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> ContinualMethod:
    """Instantiate the method named ``cfg.name``.

    Raises:
        KeyError: unknown name (the config validation rejects it earlier with a clear message).
    """
    return METHODS[cfg.name](model, cfg, seed)
