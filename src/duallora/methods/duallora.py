"""DualLoRA: orthogonal + residual adapters, a subspace memory, dynamic gates, calibrated output.

The method this project implements (arXiv 2411.00623), as specified in docs/method.md; its options
are declared here (``DualLoRA.options``) and documented in ``MethodConfig``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from duallora import distributed
from duallora.errors import ConfigError
from duallora.memory import GramAccumulator, SubspaceMemory, energy_threshold
from duallora.methods.base import ContinualMethod, Inference, TaskContext
from duallora.methods.calibration import calibrate
from duallora.methods.options import (
    ADAPTED_MODULES,
    ENERGY_THRESHOLD_END,
    ENERGY_THRESHOLD_START,
    GATE_LAYER,
    RANK_ORTHOGONAL,
    RIDGE,
    SHRINKAGE,
    STAT_IMAGES,
    TAU_ID,
    Option,
    non_negative,
    positive_int,
    positive_or_null,
    probability,
)
from duallora.methods.posterior import capture_gate_tokens, gate_blocks
from duallora.methods.registry import register_method
from duallora.methods.replay import MAX_MIB, ReplayBatch, TokenReplay
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures, semantic_drift

if TYPE_CHECKING:
    from duallora.config import MethodConfig


def _gate_for_class_scores(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``class_scores=heads+gate`` reads the shared gate's class statistics: only with ``gate=shared``."""
    if value == "heads+gate" and cfg.gate != "shared":
        return f"method.class_scores={value} needs method.gate=shared; use class_scores=heads"
    return None


def _protect_needs_shared(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``protect_gate`` protects the shared gate's features: only with ``gate=shared``."""
    if value and cfg.gate != "shared":
        return ("method.protect_gate=true (DualLoRA's default) needs method.gate=shared: per-layer gates read every "
                "adapted layer; with method.gate=soft or hard add method.protect_gate=false")
    return None


def _head_over_gate_needs(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``head_over_gate`` trains heads on top of the gate's class scores: they must be fixed before training
    (``protect_gate``) and used at inference (``class_scores=heads+gate``)."""
    if value and not (cfg.gate == "shared" and cfg.protect_gate and cfg.class_scores == "heads+gate"):
        return ("method.head_over_gate=true needs method.gate=shared, method.protect_gate=true and "
                "method.class_scores=heads+gate (the gate's class scores, fixed before training, used at inference)")
    return None


#: ``class_scores`` values that read the class statistics of the adapted model (site ``classes``), gathered
#: in ``end_task``: a run without them cannot be derived into one with them.
ADAPTED_CLASS_SCORES = ("stats", "heads+stats")


def _drift_needs_stats(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``drift_compensation`` moves the adapted model's class statistics: only with them."""
    if value and cfg.class_scores not in ADAPTED_CLASS_SCORES:
        return "method.drift_compensation=true needs method.class_scores=stats or heads+stats"
    return None


def _gate_for_features(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``task_id_features=gate`` reads the shared gate's posterior: only with ``gate=shared``."""
    if value == "gate" and cfg.gate != "shared":
        return "method.task_id_features=gate needs method.gate=shared; use task_id_features=final or auto"
    return None


@register_method
class DualLoRA(ContinualMethod):
    """DualLoRA: orthogonal + residual adapters, subspace memory, dynamic gates, calibrated output.

    Implements method.md ("Learning task t" steps 1-7, "Inference: one forward pass"):

    1. statistics pass over D_t (no gradients, all gates 0): Gram matrix ``G_t`` per adapted layer;
    2. ``A_o`` = top-r_o eigenvectors of ``(I - M M^T) G_t (I - M M^T)``, ``B_o = 0`` trained;
    3. for t >= 2, ``P_t`` = top-r_r eigenvectors of ``M M^T G_t M M^T``, ``B_t = 0`` trained;
    4. head_t, ``B_o``, ``B_t`` trained with cross-entropy over C_t, gate of task t = 1, others 0;
    5. merge ``W <- W + B_o A_o``, freeze ``B_t`` and head_t;
    6. statistics pass with the updated model, grow ``M`` to energy threshold eps_t;
    7. class means and pooled within-class scatter of the gate features (shared gate: mean norm1
       tokens of blocks ``0..gate_layer``; per-layer gates: mean token entering each layer) and, for
       ``task_id_features="final"``, of the final features (:class:`~duallora.signatures.TaskSignatures`).

    Gates (``gate``):

    * ``shared`` (default; with DualLoRA's defaults ``gate_layer=-1`` and ``protect_gate``: features of every
      block, adapters in the last block only): one posterior ``p(j | x)`` per image, computed at block ``gate_layer``'s
      first LayerNorm from features that no residual adapter has touched; residual adapters sit only
      in blocks ``>= gate_layer`` and all use it. Its features are the mean ``norm1`` output tokens
      of blocks ``0..gate_layer``, concatenated (B, (L+1) D): the features of ``ncm-gate`` and of the
      head methods' ``task_posterior=gate``, whatever the placement (for the default ``qkv`` placement
      they are the adapted layers' inputs). With adapters only in blocks ``>= gate_layer`` nothing
      trained moves them. Measured on the default benchmark, this avoids the self-reinforcing errors
      of per-layer gates (docs/method.md, "Measured decisions").
    * ``soft`` / ``hard``: every adapted layer computes its own posterior (or its argmax) from its
      own statistics, residual adapters in every block (method.md's literal reading).

    Within-task class scores (``class_scores``): the heads' logits; plus the gate's class scores
    ``-d_c / tau_id`` (``heads+gate``); or Mahalanobis class scores of the *adapted* model's features (every
    block's mean ``norm1`` tokens and the final feature, ``ncm-all``'s feature set, gathered under the
    inference gating at the end of each task), alone (``stats``) or added to the logits (``heads+stats``),
    as ``-d_c / class_tau`` (DualLoRA's default ``stats`` at ``class_tau=0.001``; ``class_tau=None``: ``tau_id``).
    The class scores' temperature sets how sharp the within-task softmax is next to the task posterior in the
    ``product`` calibration: too soft,
    and a confident wrong task with well separated classes outweighs the true task with look-alike classes
    (docs/method.md, "The class scores' temperature").

    The output is calibrated with a task posterior (``task_id_features``: ``gate`` = the shared
    gate's posterior, ``final`` = final-feature statistics gathered under the inference gating):
    ``p(y | x) = p(task(y) | x) * softmax_{task(y)}(logits)`` (``calibration="product"``).

    Raises:
        ConfigError: ``gate_layer`` outside the backbone's blocks, or (``gate=shared`` with residual
            adapters) no adapted layer in blocks ``>= gate_layer``.
    """

    name = "duallora"
    options = {
        "adapted_modules": ADAPTED_MODULES,
        "rank_orthogonal": RANK_ORTHOGONAL,
        "rank_residual": Option(10, "r_r, rank of each task's residual adapter (capped by the memory's dimension)",
                                check=positive_int, rank=True),
        "use_orthogonal": Option(True, "ablation switch: train the orthogonal adapter"),
        "use_residual": Option(True, "ablation switch: train residual adapters (t >= 2)"),
        "energy_threshold_start": ENERGY_THRESHOLD_START,
        "energy_threshold_end": ENERGY_THRESHOLD_END,
        "stat_tokens": Option("all", "tokens that feed the memory's Gram matrices: all | cls", choices=("all", "cls")),
        "stat_images": STAT_IMAGES,
        "stat_replay_mib": Option(MAX_MIB, "MiB of tokens a task may keep from its first statistics pass so that its "
                                           "later passes run only the blocks from the first adapted one on (the same "
                                           "statistics, fewer blocks; 0: every block each pass; methods/replay.py)",
                                  check=non_negative),
        "gate": Option("shared", "dynamic-memory gate type: shared | soft | hard",
                       choices=("shared", "soft", "hard")),
        "gate_layer": GATE_LAYER,
        "protect_gate": Option(False, "gate=shared: adapters (orthogonal and residual) only in blocks >= gate_layer, "
                                      "so nothing trained moves the gate's features (its task posterior stays "
                                      "ncm-gate's on the untouched backbone)", check=_protect_needs_shared),
        "task_id_features": Option("auto", "task posterior used for calibration: auto | gate | final "
                                           "(auto: gate when gate=shared, else final)",
                                   choices=("auto", "gate", "final"), check=_gate_for_features),
        "task_id_score": Option("mahalanobis", "task-identity score: mahalanobis | cosine | subspace",
                                choices=("mahalanobis", "cosine", "subspace")),
        "subspace_dims": Option(32, "q, directions per task for task_id_score=subspace", check=positive_int),
        "tau_id": TAU_ID,
        "ridge": RIDGE,
        "shrinkage": SHRINKAGE,
        "calibration": Option("product", "calibrated output: none | product | hard",
                              choices=("none", "product", "hard")),
        "confidence_threshold": Option(0.9, "gamma for calibration=hard", check=probability),
        "class_scores": Option("heads", "within-task class scores: heads | heads+gate (head logits plus -d_c / tau_id "
                                        "of the shared gate's class statistics) | stats (-d_c / tau_id of class "
                                        "statistics of the adapted model: every block's mean norm1 tokens and the "
                                        "final feature, gathered at the end of each task) | heads+stats",
                               choices=("heads", "heads+gate") + ADAPTED_CLASS_SCORES, check=_gate_for_class_scores),
        "class_tau": Option(None, "class_scores=stats|heads+stats: temperature of the class scores -d_c / class_tau "
                                  "(d_c: squared Mahalanobis distance per dimension of the adapted model's class "
                                  "statistics); null = tau_id", type=Optional[float], check=positive_or_null),
        "drift_compensation": Option(False, "class_scores=stats|heads+stats: move old classes' stored means by "
                                            "the drift of the new task's features across its training (semantic "
                                            "drift compensation, Yu et al. CVPR 2020); one more statistics pass "
                                            "per task",
                                     check=_drift_needs_stats),
        "head_over_gate": Option(False, "train each task's head (and adapters) on head logits plus the gate's class "
                                        "scores, so they learn a correction of the training-free scores; needs "
                                        "protect_gate and class_scores=heads+gate", check=_head_over_gate_needs),
    }
    #: DualLoRA's own defaults (2026-12-07; chosen on validation data, docs/method.md "Defaults"): the shared
    #: gate reads every block (``gate_layer=-1``) and no adapter moves it (adapters in the last block only),
    #: class scores from the adapted model's statistics over every training image at ``class_tau=0.001``,
    #: covariance shrinkage while the statistics rest on few images. The options' declared defaults stay
    #: the behaviour of configs stored before these existed (and ``ncm-gate``'s and the heads' gate).
    option_defaults = {"gate_layer": -1, "protect_gate": True, "class_scores": "stats", "class_tau": 0.001,
                       "stat_images": None, "shrinkage": "auto"}

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        names = [n for n, _ in model.adapted_layers()]
        self.block_of = {site.name: site.block for site in model.adapted_sites()}  # from the model, not names
        kw = dict(score=cfg.task_id_score, tau=cfg.tau_id, ridge=cfg.ridge, subspace_dims=cfg.subspace_dims,
                  shrinkage=cfg.shrinkage)
        layers = dict(model.adapted_layers())
        if cfg.gate == "shared":
            # the gate reads the mean norm1 tokens of blocks 0..gate_block (ncm-gate's features), whatever
            # the placement: blocks without adapted layers included
            self.gate_blocks = gate_blocks(model, cfg.gate_layer)
            gate_block = self.gate_blocks[-1]
            self.residual_sites = [n for n in names if self.block_of[n] >= gate_block]
            if cfg.use_residual and not self.residual_sites:
                raise ConfigError(f"method.gate=shared puts residual adapters in blocks >= {gate_block} "
                                  f"(method.gate_layer={cfg.gate_layer}), but method.adapted_modules adapts only "
                                  f"blocks {sorted(set(self.block_of.values()))}: there would be no residual "
                                  "adapter; adapt a later block, lower method.gate_layer, or set "
                                  "method.use_residual=false" + (" (with method.protect_gate=false: protect_gate "
                                                                 "keeps the orthogonal adapters there too)"
                                                                 if cfg.protect_gate else ""))
            # protect_gate: layers below the gate carry no adapter (nor memory): the gate's features never move
            self.adapter_sites = [n for n in names if not cfg.protect_gate or self.block_of[n] >= gate_block]
            if not self.adapter_sites:
                raise ConfigError(f"method.protect_gate=true keeps adapters in blocks >= {gate_block} only "
                                  f"(method.gate_layer={cfg.gate_layer}), but method.adapted_modules adapts only "
                                  f"blocks {sorted(set(self.block_of.values()))}: DualLoRA would adapt nothing; "
                                  "adapt a later block, lower method.gate_layer, or set method.protect_gate=false")
            gate_dim = model.embed_dim * len(self.gate_blocks)
            self.signatures: dict[str, TaskSignatures] = {"gate": TaskSignatures(gate_dim, **kw)}
        else:
            self.gate_blocks = []
            self.adapter_sites = names
            self.residual_sites = names
            gate_sites = names if cfg.use_residual else []
            self.signatures = {n: TaskSignatures(layers[n].in_features, **kw) for n in gate_sites}
        self.memories = {n: SubspaceMemory(layers[n].in_features) for n in self.adapter_sites}
        self.task_id_features = cfg.task_id_features
        if self.task_id_features == "auto":
            self.task_id_features = "gate" if cfg.gate == "shared" else "final"
        if self.task_id_features == "final":
            self.signatures["final"] = TaskSignatures(model.embed_dim, **kw)
        # class_scores=stats / heads+stats: every block's mean norm1 tokens and the final feature under the
        # inference gating (ncm-all's features, read from the adapted model), gathered at the end of each task
        self.class_blocks = list(range(len(model.backbone.blocks))) if cfg.class_scores in ADAPTED_CLASS_SCORES else []
        if self.class_blocks:
            self.signatures["classes"] = TaskSignatures(model.embed_dim * (len(self.class_blocks) + 1),
                                                        score="mahalanobis", tau=cfg.tau_id, ridge=cfg.ridge,
                                                        shrinkage=cfg.shrinkage)
        #: temperature of the adapted statistics' class scores (``class_tau``, docs/method.md)
        self.class_tau = cfg.tau_id if cfg.class_tau is None else cfg.class_tau
        #: the first block any adapter sits in: the later statistics passes of a task replay from it
        #: (methods/replay.py; 0 = nothing below it to skip)
        self.replay_block = min(self.block_of[n] for n in self.adapter_sites) if self.adapter_sites else 0
        self._replay: Optional[TokenReplay] = None
        self.last_info: dict = {}
        self._shared: Optional[torch.Tensor] = None
        self._gate_z: Optional[torch.Tensor] = None
        self._gate_fns: Optional[tuple[tuple, dict]] = None
        self._before: Optional[torch.Tensor] = None  # drift_compensation: (N, D_c) features before the task

    # statistics ----------------------------------------------------------------------
    @torch.no_grad()
    def _statistics_pass(self, ctx: TaskContext, grams: bool, sites: list[str], desc: str,
                         dynamic: bool = False, keep: Optional[list] = None, record: bool = False):
        """One pass over the task's data: Gram matrices per adapted layer and/or class statistics.

        ``sites`` names the signature sites to accumulate (adapted layer names, ``final``, ``classes``);
        ``dynamic`` runs with the inference gating instead of the fixed gates; ``keep`` (with ``classes``)
        receives each batch's class features (B, D_c), in the loader's (fixed) order. ``record`` keeps the
        tokens entering :attr:`replay_block` for the task's later passes, which then run only the blocks
        from there on (methods/replay.py: the same statistics, fewer blocks).
        """
        layers = dict(self.model.adapted_layers())
        G = ({n: GramAccumulator(lay.in_features, self.cfg.stat_tokens) for n, lay in layers.items()
              if n in self.memories} if grams else {})
        acc = {s: TaskSignatures.new_accumulator(ctx.num_classes, self.signatures[s].dim) for s in sites}
        current: dict[str, torch.Tensor] = {}
        want_gate = "gate" in acc
        want_classes = "classes" in acc

        def make_recorder(name: str):
            def record(h: torch.Tensor) -> None:
                if name in G:
                    G[name].update(h)
                if name in acc:
                    TaskSignatures.accumulate(acc[name], h.mean(dim=1), current["y"])
            return record

        for name, layer in layers.items():
            if name in G or name in acc:
                layer.recorder = make_recorder(name)
        replay = self._replay
        recording = replay.record() if record and replay is not None else nullcontext(None)
        replaying = not record and replay is not None and replay.complete
        try:
            with capture_gate_tokens(self.model, self.gate_blocks if want_gate else []) as gate_parts, \
                    capture_gate_tokens(self.model, self.class_blocks if want_classes else []) as class_parts, \
                    recording as close:
                for item in ctx.progress(replay.batches if replaying else ctx.stats_loader, desc):
                    gate_parts.clear()
                    class_parts.clear()
                    if replaying:  # the blocks below replay_block as recorded, the rest run again
                        y = current["y"] = item.y
                        TokenReplay.seed(gate_parts, self.gate_blocks if want_gate else [], item)
                        TokenReplay.seed(class_parts, self.class_blocks if want_classes else [], item)
                        feats = (self._dynamic_features(None, replay=item) if dynamic
                                 else self.model.features_from(item.tokens, self.replay_block))
                    else:
                        x, y = item
                        x = x.to(ctx.device, non_blocking=True)
                        current["y"] = y
                        feats = self._dynamic_features(x) if dynamic else self.model.features(x)
                        if close is not None:
                            close(y)
                    if "final" in acc:
                        TaskSignatures.accumulate(acc["final"], feats, y)
                    if want_gate:
                        TaskSignatures.accumulate(acc["gate"], torch.cat(gate_parts, dim=1), y)
                    if want_classes:
                        z = torch.cat(class_parts + [feats], dim=1)
                        TaskSignatures.accumulate(acc["classes"], z, y)
                        if keep is not None:
                            keep.append(z.detach().double().cpu())
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
        """Steps 1-3 of method.md, "Learning task t": a statistics pass (fixed gates: task t on), the
        orthogonal adapter ``A_o`` outside the memory and, for t >= 2, the residual adapter ``P_t``
        inside it, then task t's head. Returns ``orthogonal_rank`` / ``residual_rank`` per layer."""
        t = ctx.task
        cfg = self.cfg
        info: dict = {"orthogonal_rank": {}, "residual_rank": {}}
        self._before = None
        self._replay = None  # never a batch of an earlier task
        if cfg.drift_compensation and t > 0:
            # the task's class features through the model as it stands (inference gating), before any change
            kept: list[torch.Tensor] = []
            self._statistics_pass(ctx, grams=False, sites=["classes"], desc=f"task {t + 1} features before",
                                  dynamic=True, keep=kept)
            self._before = torch.cat(kept)
        self.model.set_fixed_gates(t)
        need_residual = cfg.use_residual and t > 0
        early = ["gate"] if cfg.head_over_gate else []  # protected gate: its statistics do not change in training
        if cfg.use_orthogonal or need_residual or early:
            if self.replay_block > 0 and cfg.stat_replay_mib > 0:
                self._replay = TokenReplay(self.model, self.replay_block, cfg.stat_replay_mib)
            grams, acc = self._statistics_pass(ctx, grams=True, sites=early, desc=f"task {t + 1} statistics",
                                               record=True)
            if early:
                self.signatures["gate"].add_task(acc["gate"])
            for name, layer in self.model.adapted_layers():
                if name not in self.memories:  # below a protected gate: no adapter
                    continue
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
        """Step 4: the head, ``B_o`` of every adapted layer and task t's residual ``B_t``."""
        groups = super().param_groups(task)
        for _, layer in self.model.adapted_layers():
            if layer.orth_B is not None:
                groups["adapters"].append(layer.orth_B)
            if task in layer.res_tasks:
                groups["adapters"].append(layer.res_B[layer.res_tasks.index(task)])
        return groups

    def end_task(self, ctx: TaskContext) -> dict:
        """Steps 5-7: merge ``W <- W + B_o A_o``, freeze task t's adapters and head, grow the memory
        from a statistics pass of the updated model (energy threshold eps_t), add task t's class
        statistics at the gate site(s) (and of the final features under the inference gating).
        Returns ``energy_threshold``, ``memory_added`` and ``memory_size`` per layer."""
        t = ctx.task
        for _, layer in self.model.adapted_layers():
            layer.merge_orthogonal()
            layer.freeze_residuals()
        super().end_task(ctx)
        self.model.set_fixed_gates(t)
        layer_sites = [s for s in self.signatures
                       if s not in ("final", "classes") and not (s == "gate" and self.cfg.head_over_gate)]
        grams, acc = self._statistics_pass(ctx, grams=True, sites=layer_sites, desc=f"task {t + 1} memory")
        eps = energy_threshold(t, ctx.num_tasks, self.cfg.energy_threshold_start, self.cfg.energy_threshold_end)
        info = {"energy_threshold": eps, "memory_added": {}, "memory_size": {}}
        for name in self.memories:
            info["memory_added"][name] = self.memories[name].grow(grams[name], eps)
            info["memory_size"][name] = self.memories[name].size
        for site, a in acc.items():
            self.signatures[site].add_task(a)
        self.model.set_fixed_gates(None)
        late = [s for s in ("final", "classes") if s in self.signatures]
        if late:
            # final-feature (and class) statistics under the gating used at inference (task t's own gate
            # statistics are in place now), so that they describe what inference will see
            kept: list[torch.Tensor] = []  # the task's class features, kept only for drift compensation
            _, acc = self._statistics_pass(ctx, grams=False, sites=late, desc=f"task {t + 1} signatures",
                                           dynamic=True, keep=kept if self._before is not None else None)
            if self._before is not None:
                # old classes' means follow the drift of this task's features (before the task's own means join)
                sig = self.signatures["classes"]
                sig.shift_means(semantic_drift(self._before, torch.cat(kept), sig))
                self._before = None
            for site in late:
                self.signatures[site].add_task(acc[site])
        self._replay = None  # the task's kept tokens go
        self.last_info = info
        return info

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task-local logits (B, C_t); with ``head_over_gate`` plus the gate's class scores ``-d_c / tau_id``
        of the task's classes (statistics added in :meth:`begin_task`; no gradient flows into them). The
        distances are taken up to a constant of each row (``relative=True``), which the task's cross-entropy
        ignores: O(D C) per image instead of a D x D product (docs/performance.md)."""
        if not self.cfg.head_over_gate:
            return super().train_logits(x, task)
        with capture_gate_tokens(self.model, self.gate_blocks) as parts:
            feats = self.model.features(x)
        logits = self.model.head_logits(feats, task)
        lo = sum(self.model.head_sizes[:task])
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = torch.cat(parts, dim=1).detach().float()
            d = self.signatures["gate"].class_distances(z, relative=True)[:, lo:lo + logits.shape[1]]
        return logits - (d / self.cfg.tau_id).to(logits.dtype)

    # inference -----------------------------------------------------------------------
    def _gate_fn(self, name: str, layer_tasks: list[int]):
        """Layer ``name``'s gate function: its input (B, N, d_in) -> gates (B, J) of its J residual
        adapters (tasks ``layer_tasks``), per image (method.md, "Dynamic memory gates")."""
        cfg = self.cfg
        index = torch.tensor(layer_tasks, device=self.model.adapted[name].base.weight.device)

        def gate(h: torch.Tensor) -> torch.Tensor:
            if cfg.gate == "shared":
                post = self._shared  # set by the gate site's recorder (see _dynamic_features)
                if post is None:
                    raise RuntimeError(f"{name} runs before the shared gate (block {self.gate_blocks[-1]})")
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

    def _dynamic_features(self, x: Optional[torch.Tensor], replay: Optional[ReplayBatch] = None) -> torch.Tensor:
        """Final features (B, D) of images ``x`` (B, C, H, W) with every residual adapter gated per image
        (inference mode); or, with ``replay``, of a recorded batch from :attr:`replay_block` on."""
        self.model.set_fixed_gates(None)
        self._shared = None
        hooks = []
        if self.gate_blocks:
            sig = self.signatures["gate"]
            parts: list[torch.Tensor] = []
            last = self.gate_blocks[-1]
            if replay is not None:
                TokenReplay.seed(parts, self.gate_blocks, replay)
                if last < self.replay_block:  # the whole gate lies below the replayed blocks
                    self._gate_z = torch.cat(parts, dim=1)
                    self._shared = sig.task_posterior(self._gate_z)

            def make_gate_hook(block: int):
                def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
                    # mean norm1 tokens of blocks 0..gate_layer, before any residual adapter acts
                    parts.append(out.mean(dim=1))
                    if block == last:
                        self._gate_z = torch.cat(parts, dim=1)
                        self._shared = sig.task_posterior(self._gate_z)
                return hook

            blocks = self.model.backbone.blocks
            first = self.replay_block if replay is not None else 0
            hooks = [blocks[b].norm1.register_forward_hook(make_gate_hook(b)) for b in self.gate_blocks if b >= first]
        device = replay.tokens.device if replay is not None else x.device
        key = (device,) + tuple(tuple(layer.res_tasks) for _, layer in self.model.adapted_layers())
        if self._gate_fns is None or self._gate_fns[0] != key:  # built once per residual structure
            self._gate_fns = (key, {name: self._gate_fn(name, list(layer.res_tasks))
                                    for name, layer in self.model.adapted_layers() if layer.res_tasks})
        for name, layer in self.model.adapted_layers():
            layer.gate_fn = self._gate_fns[1].get(name)
        try:
            if replay is not None:
                return self.model.features_from(replay.tokens, self.replay_block)
            return self.model.features(x)
        finally:
            for _, layer in self.model.adapted_layers():
                layer.gate_fn = None
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        """One forward pass (method.md, "Inference: one forward pass"): residual adapters gated per
        image, the task posterior (B, T) from the shared gate or the final features, and the output
        calibrated with it (:func:`~duallora.methods.calibration.calibrate`)."""
        with capture_gate_tokens(self.model, self.class_blocks) as class_parts:
            feats = self._dynamic_features(x)
        if self.task_id_features == "gate":
            posterior = self._shared
            assert posterior is not None
        else:
            posterior = self.signatures["final"].task_posterior(feats)
        logits = self.model.head_logits(feats)
        if self.cfg.class_scores == "heads+gate":
            # product of experts within each task: softmax(logits) * softmax(-d_c / tau_id), renormalised
            assert self._gate_z is not None
            d = self.signatures["gate"].class_distances(self._gate_z, relative=True)  # up to a row constant
            logits = logits - d.to(logits.dtype) / self.cfg.tau_id
        elif self.class_blocks:
            with torch.autocast(device_type=x.device.type, enabled=False):
                z = torch.cat(class_parts + [feats], dim=1).float()
                d = self.signatures["classes"].class_distances(z, relative=True)  # up to a row constant
            scores = -(d / self.class_tau).to(logits.dtype)
            logits = scores if self.cfg.class_scores == "stats" else logits + scores
        self._shared = self._gate_z = None
        sizes = self.model.head_sizes
        return Inference(calibrate(logits, posterior, sizes, self.cfg.calibration, self.cfg.confidence_threshold),
                         posterior)

    # state ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Heads and adapters (base class), the memory bases and the task signatures."""
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
