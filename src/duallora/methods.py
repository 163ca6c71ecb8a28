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

from duallora import distributed
from duallora.config import MethodConfig
from duallora.errors import ConfigError
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
        self.seed = seed
        self.tasks_learned = 0

    def task_generator(self, task: int, stream: int = 0) -> torch.Generator:
        """A generator seeded by (seed, task, stream): initialisations of task t do not depend on
        what ran before, so a run resumed at task t initialises exactly like an uninterrupted one."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + task * 101 + stream)

    # hooks -------------------------------------------------------------------------
    def begin_task(self, ctx: TaskContext) -> dict:
        """Prepare task ``ctx.task``: add its head. Returns facts worth logging."""
        self.model.add_head(ctx.num_classes, self.task_generator(ctx.task))
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
            gen = self.task_generator(ctx.task, stream=1)
            for _, layer in self.model.adapted_layers():
                if layer.lora_A is None:
                    layer.add_lora(self.cfg.rank_orthogonal, gen)
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
    7. class means and pooled within-class scatter at the gate site(s) (mean token entering the
       layer) and, for ``task_id_features="final"``, of the final features
       (:class:`~duallora.signatures.TaskSignatures`).

    Gates (``gate``):

    * ``shared`` (default): one posterior ``p(j | x)`` per image, computed at the first adapted layer
      of block ``gate_layer`` from features that no residual adapter has touched; residual adapters
      sit only in blocks ``>= gate_layer`` and all use it. Its features are the mean tokens entering
      the first adapted layer of each block ``0..gate_layer``, concatenated. Measured on the default benchmark, this
      avoids the self-reinforcing errors of per-layer gates (docs/method.md, "Measured decisions").
    * ``soft`` / ``hard``: every adapted layer computes its own posterior (or its argmax) from its
      own statistics, residual adapters in every block (method.md's literal reading).

    The output is calibrated with a task posterior (``task_id_features``: ``gate`` = the shared
    gate's posterior, ``final`` = final-feature statistics gathered under the inference gating):
    ``p(y | x) = p(task(y) | x) * softmax_{task(y)}(logits)`` (``calibration="product"``).

    Raises:
        ConfigError: ``gate_layer`` outside the backbone's blocks.
    """

    name = "duallora"

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        names = [n for n, _ in model.adapted_layers()]
        depth = len(getattr(model.backbone, "blocks"))
        self.block_of = {n: int(n.split(".")[1]) for n in names}
        self.memories = {n: SubspaceMemory(layer.in_features) for n, layer in model.adapted_layers()}
        kw = dict(score=cfg.task_id_score, tau=cfg.tau_id, ridge=cfg.ridge, subspace_dims=cfg.subspace_dims)
        layers = dict(model.adapted_layers())
        if cfg.gate == "shared":
            gate_block = cfg.gate_layer if cfg.gate_layer >= 0 else depth + cfg.gate_layer
            if not 0 <= gate_block < depth:
                raise ConfigError(f"method.gate_layer={cfg.gate_layer} is outside the backbone's {depth} blocks")
            # the gate reads the mean token entering the first adapted layer of blocks 0..gate_block
            self.gate_inputs = [next(n for n in names if self.block_of[n] == b) for b in range(gate_block + 1)]
            self.gate_site: Optional[str] = self.gate_inputs[-1]
            self.residual_sites = [n for n in names if self.block_of[n] >= gate_block]
            gate_dim = sum(layers[n].in_features for n in self.gate_inputs)
            self.signatures: dict[str, TaskSignatures] = {"gate": TaskSignatures(gate_dim, **kw)}
        else:
            self.gate_inputs = []
            self.gate_site = None
            self.residual_sites = names
            gate_sites = names if cfg.use_residual else []
            self.signatures = {n: TaskSignatures(layers[n].in_features, **kw) for n in gate_sites}
        self.task_id_features = cfg.task_id_features
        if self.task_id_features == "auto":
            self.task_id_features = "gate" if cfg.gate == "shared" else "final"
        if self.task_id_features == "final":
            self.signatures["final"] = TaskSignatures(model.embed_dim, **kw)
        self.last_info: dict = {}
        self._shared: Optional[torch.Tensor] = None
        self._gate_fns: Optional[tuple[tuple, dict]] = None

    # statistics ----------------------------------------------------------------------
    @torch.no_grad()
    def _statistics_pass(self, ctx: TaskContext, grams: bool, sites: list[str], desc: str,
                         dynamic: bool = False):
        """One pass over the task's data: Gram matrices per adapted layer and/or class statistics.

        ``sites`` names the signature sites to accumulate (adapted layer names and/or ``final``);
        ``dynamic`` runs with the inference gating instead of the fixed gates.
        """
        layers = dict(self.model.adapted_layers())
        G = {n: GramAccumulator(l.in_features, self.cfg.stat_tokens) for n, l in layers.items()} if grams else {}
        acc = {s: TaskSignatures.new_accumulator(ctx.num_classes, self.signatures[s].dim) for s in sites}
        current: dict[str, torch.Tensor] = {}
        gate_parts: dict[str, torch.Tensor] = {}
        want_gate = "gate" in acc

        def make_recorder(name: str):
            def record(h: torch.Tensor) -> None:
                if name in G:
                    G[name].update(h)
                if name in acc:
                    TaskSignatures.accumulate(acc[name], h.mean(dim=1), current["y"])
                if want_gate and name in self.gate_inputs:
                    gate_parts[name] = h.mean(dim=1)
            return record

        for name, layer in layers.items():
            if name in G or name in acc or (want_gate and name in self.gate_inputs):
                layer.recorder = make_recorder(name)
        try:
            for x, y in ctx.progress(ctx.stats_loader, desc):
                current["y"] = y
                x = x.to(ctx.device, non_blocking=True)
                feats = self._dynamic_features(x) if dynamic else self.model.features(x)
                if "final" in acc:
                    TaskSignatures.accumulate(acc["final"], feats, y)
                if want_gate:
                    z = torch.cat([gate_parts[n] for n in self.gate_inputs], dim=1)
                    TaskSignatures.accumulate(acc["gate"], z, y)
        finally:
            for layer in layers.values():
                layer.recorder = None
        # statistics are sums: add up the processes' shards before any eigendecomposition
        for g in G.values():
            distributed.all_reduce_sum_(g.gram)
        for a in acc.values():
            for tensor in a.values():
                distributed.all_reduce_sum_(tensor)
        return {n: g.gram for n, g in G.items()}, acc

    def begin_task(self, ctx: TaskContext) -> dict:
        t = ctx.task
        cfg = self.cfg
        info: dict = {"orthogonal_rank": {}, "residual_rank": {}}
        self.model.set_fixed_gates(t)
        need_residual = cfg.use_residual and t > 0
        if cfg.use_orthogonal or need_residual:
            grams, _ = self._statistics_pass(ctx, grams=True, sites=[], desc=f"task {t + 1} statistics")
            for name, layer in self.model.adapted_layers():
                mem = self.memories[name]
                if cfg.use_orthogonal:
                    A = mem.orthogonal_directions(grams[name], cfg.rank_orthogonal)
                    layer.add_orthogonal(A.float())
                    info["orthogonal_rank"][name] = int(A.shape[0])
                if need_residual and name in self.residual_sites:
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
        layer_sites = [s for s in self.signatures if s != "final"]
        grams, acc = self._statistics_pass(ctx, grams=True, sites=layer_sites, desc=f"task {t + 1} memory")
        eps = energy_threshold(t, ctx.num_tasks, self.cfg.energy_threshold_start, self.cfg.energy_threshold_end)
        info = {"energy_threshold": eps, "memory_added": {}, "memory_size": {}}
        for name in self.memories:
            info["memory_added"][name] = self.memories[name].grow(grams[name], eps)
            info["memory_size"][name] = self.memories[name].size
        for site, a in acc.items():
            self.signatures[site].add_task(a)
        self.model.set_fixed_gates(None)
        if "final" in self.signatures:
            # final-feature statistics under the gating used at inference (task t's own gate
            # statistics are in place now), so that they describe what inference will see
            _, acc = self._statistics_pass(ctx, grams=False, sites=["final"], desc=f"task {t + 1} signatures",
                                           dynamic=True)
            self.signatures["final"].add_task(acc["final"])
        self.last_info = info
        return info

    # inference -----------------------------------------------------------------------
    def _gate_fn(self, name: str, layer_tasks: list[int]):
        cfg = self.cfg
        index = torch.tensor(layer_tasks, device=self.model.adapted[name].base.weight.device)

        def gate(h: torch.Tensor) -> torch.Tensor:
            if cfg.gate == "shared":
                post = self._shared  # set by the gate site's recorder (see _dynamic_features)
                if post is None:
                    raise RuntimeError(f"{name} runs before the gate site {self.gate_site}")
            else:
                post = self.signatures[name].task_posterior(h.mean(dim=1))
                if cfg.gate == "hard":
                    post = torch.nn.functional.one_hot(post.argmax(1), post.shape[1]).to(post.dtype)
            n_known = post.shape[1]
            if layer_tasks[-1] < n_known:  # inference: every residual's task has its statistics
                return post.index_select(1, index)
            # a task whose statistics are not in yet (during its own end_task pass) has gate 0
            cols = [post[:, j] if j < n_known else torch.zeros_like(post[:, 0]) for j in layer_tasks]
            return torch.stack(cols, dim=1)

        return gate

    def _dynamic_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final features (B, D) with every residual adapter gated per image (inference mode)."""
        self.model.set_fixed_gates(None)
        inputs = [self.model.adapted[n] for n in self.gate_inputs]
        previous = [layer.recorder for layer in inputs]
        parts: list[torch.Tensor] = []
        if inputs:
            sig = self.signatures["gate"]

            def make_gate_recorder(i: int):
                def record(h: torch.Tensor) -> None:
                    # mean tokens entering blocks 0..gate_layer, before any residual adapter acts
                    if previous[i] is not None:
                        previous[i](h)
                    parts.append(h.mean(dim=1))
                    if i == len(inputs) - 1:
                        self._shared = sig.task_posterior(torch.cat(parts, dim=1))
                return record

            for i, layer in enumerate(inputs):
                layer.recorder = make_gate_recorder(i)
        key = (x.device,) + tuple(tuple(layer.res_tasks) for _, layer in self.model.adapted_layers())
        if self._gate_fns is None or self._gate_fns[0] != key:  # built once per residual structure
            self._gate_fns = (key, {name: self._gate_fn(name, list(layer.res_tasks))
                                    for name, layer in self.model.adapted_layers() if layer.res_tasks})
        for name, layer in self.model.adapted_layers():
            layer.gate_fn = self._gate_fns[1].get(name)
        self._shared = None
        try:
            return self.model.features(x)
        finally:
            for _, layer in self.model.adapted_layers():
                layer.gate_fn = None
            for layer, rec in zip(inputs, previous):
                layer.recorder = rec

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        feats = self._dynamic_features(x)
        if self.task_id_features == "gate":
            posterior = self._shared
            assert posterior is not None
        else:
            posterior = self.signatures["final"].task_posterior(feats)
        self._shared = None
        logits = self.model.head_logits(feats)
        sizes = self.model.head_sizes
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
    if len(set(sizes)) == 1:  # equal task sizes: one softmax over a (B, T, C_t) view
        B, T = logits.shape[0], len(sizes)
        within3 = torch.softmax(logits.reshape(B, T, sizes[0]), dim=2)
        within = within3.view(B, -1)
        if mode == "product":
            return (within3 * posterior[:, :, None]).view(B, -1)
    else:
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
# the baselines (InfLoRA, SD-LoRA, L2P, SimpleCIL, FeCAM, joint) register themselves in METHODS
from duallora import baselines as _baselines  # noqa: E402,F401


def build_method(model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> ContinualMethod:
    """Instantiate the method named ``cfg.name``.

    Raises:
        KeyError: unknown name (the config validation rejects it earlier with a clear message).
    """
    return METHODS[cfg.name](model, cfg, seed)
