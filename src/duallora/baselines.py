"""Baselines in the same framework: InfLoRA, SD-LoRA, L2P, SimpleCIL, FeCAM and a joint upper bound.

Every baseline is a small :class:`~duallora.methods.ContinualMethod` plugged into the shared training
loop (:class:`~duallora.training.ContinualLearner`): the same frozen backbone, data, per-task heads
(where the method has heads), optimiser and evaluation as ``duallora``, ``frozen`` and ``seq-lora``.
Each class docstring cites its paper and says what is and is not reproduced. They register
themselves in :data:`~duallora.methods.METHODS` (``method.name``):

==============  ==============================================================================
``inflora``     a LoRA branch per task on the attention key/value outputs, down-projection fixed
                orthogonal to a GPM memory, up-projection trained (Liang and Li, CVPR 2024)
``sd-lora``     earlier tasks' normalised LoRA directions fixed, their magnitudes and the new
                LoRA learned (Wu et al., ICLR 2025)
``l2p``         a prompt pool with keys, prompts chosen per image by a query pass, prepended in a
                second, prompted pass (Wang et al., CVPR 2022)
``simplecil``   frozen backbone, cosine classifier on class prototypes (Zhou et al., 2023)
``fecam``       frozen backbone, Mahalanobis classifier with a pooled covariance (Goswami et al.,
                NeurIPS 2023)
``joint``       one LoRA and the heads trained on the data of every task seen so far: an upper
                bound, NOT continual and NOT rehearsal-free
==============  ==============================================================================

Low-rank branches of InfLoRA and SD-LoRA (:class:`LowRankBranches`) are added to the output of the
wrapped linear layers with a forward hook (no forked model code); L2P builds its prompted forward
from timm's ``VisionTransformer`` pieces (``patch_embed``, ``_pos_embed``, ``blocks``, ``norm``,
``forward_head``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, Dataset

from duallora import distributed
from duallora.config import MethodConfig
from duallora.errors import ConfigError, TrainingError
from duallora.memory import GramAccumulator, SubspaceMemory, energy_threshold
from duallora.methods import METHODS, ContinualMethod, Inference, TaskContext, posterior_from_probs
from duallora.model import AdaptedViT
from duallora.signatures import TaskSignatures

Rows = Optional[tuple[tuple[int, int], ...]]


def _generator(method: ContinualMethod, task: int, stream: int) -> torch.Generator:
    """The generator for task ``task``'s initialisations: ``ContinualMethod.task_generator(task,
    stream)`` where the base class has it (seeded per task), else the method's one generator."""
    make = getattr(method, "task_generator", None)
    if make is not None:
        return make(task, stream)
    return getattr(method, "generator")


# ============================================================================ low-rank branches
class LowRankBranches(nn.Module):
    """Low-rank branches summed into the output of one linear layer (attached by a forward hook).

    For input tokens ``h`` (..., d_in) the hooked layer returns::

        y = layer(h) + sum_j (alpha_j / n_j) * B_j A_j h        (only on the output rows ``rows``)

    with ``A_j`` (r_j, d_in), ``B_j`` (len(rows), r_j), a magnitude ``alpha_j`` (a 0-dim parameter)
    and a fixed normaliser ``n_j`` (1 unless a method sets it, e.g. SD-LoRA's ``||B_j A_j||_F``).

    Args:
        layer: the linear layer (``in_features``/``out_features``, e.g. an ``AdaptedLinear``).
        rows: output rows the branches write to, as ``((lo, hi), ...)`` ranges; None = every row.
    """

    def __init__(self, layer: nn.Module, rows: Rows = None) -> None:
        super().__init__()
        self.in_features = int(getattr(layer, "in_features"))
        self.out_features = int(getattr(layer, "out_features"))
        self.rows = rows
        self.num_rows = self.out_features if rows is None else sum(hi - lo for lo, hi in rows)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.alpha = nn.ParameterList()
        self.norms: list[float] = []
        self.tasks: list[int] = []
        self._index: Optional[torch.Tensor] = None
        self.handle = layer.register_forward_hook(self._hook)

    def __len__(self) -> int:
        return len(self.tasks)

    def add(self, task: int, A: torch.Tensor, B: Optional[torch.Tensor] = None, train_A: bool = False,
            alpha: float = 1.0, norm: float = 1.0) -> tuple[nn.Parameter, nn.Parameter]:
        """Append task ``task``'s branch: ``A`` (r, d_in) as given, ``B`` as given or zeros (trained).

        Returns:
            ``(A, B)`` parameters; ``A`` trains only with ``train_A``, ``B`` always trains (freeze it
            with :meth:`freeze`); ``alpha`` is fixed until a method makes it trainable.

        Raises:
            ValueError: ``A`` or ``B`` of the wrong shape.
        """
        if A.ndim != 2 or A.shape[1] != self.in_features:
            raise ValueError(f"A must be (r, {self.in_features}), got {tuple(A.shape)}")
        r = A.shape[0]
        if B is None:
            B = torch.zeros(self.num_rows, r, dtype=A.dtype, device=A.device)
        if B.shape != (self.num_rows, r):
            raise ValueError(f"B must be ({self.num_rows}, {r}), got {tuple(B.shape)}")
        pa = nn.Parameter(A.contiguous(), requires_grad=train_A)
        pb = nn.Parameter(B.contiguous())
        self.A.append(pa)
        self.B.append(pb)
        self.alpha.append(nn.Parameter(torch.tensor(float(alpha), dtype=A.dtype, device=A.device),
                                       requires_grad=False))
        self.norms.append(float(norm))
        self.tasks.append(int(task))
        return pa, pb

    def freeze(self, j: int) -> None:
        """Stop gradients to branch ``j``'s factors (its task is over)."""
        self.A[j].requires_grad_(False)
        self.B[j].requires_grad_(False)

    def _rows_index(self, device: torch.device) -> torch.Tensor:
        if self._index is None or self._index.device != device:
            assert self.rows is not None
            self._index = torch.cat([torch.arange(lo, hi) for lo, hi in self.rows]).to(device)
        return self._index

    def delta(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """The summed branch output (..., len(rows)) for input ``h``, or None without branches."""
        live = [j for j in range(len(self.tasks)) if self.A[j].shape[0] > 0]
        if not live:
            return None
        A = torch.cat([self.A[j] for j in live], dim=0)  # (R, d_in)
        B = torch.cat([self.B[j] for j in live], dim=1)  # (rows, R)
        coef = torch.cat([(self.alpha[j] / self.norms[j]).reshape(1).expand(self.A[j].shape[0]) for j in live])
        return F.linear(F.linear(h, A) * coef.to(h.dtype), B)

    def _hook(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
        d = self.delta(inputs[0])
        if d is None:
            return None
        if self.rows is None:
            return out + d
        return out.index_add(out.ndim - 1, self._rows_index(out.device), d.to(out.dtype))

    # ------------------------------------------------------------------ state
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors that rebuild the branches exactly (``{prefix}{j}.A|B|alpha|norm``, ``{prefix}tasks``)."""
        out: dict[str, torch.Tensor] = {}
        for j in range(len(self.tasks)):
            out[f"{prefix}{j}.A"] = self.A[j].detach()
            out[f"{prefix}{j}.B"] = self.B[j].detach()
            out[f"{prefix}{j}.alpha"] = self.alpha[j].detach().reshape(1)
            out[f"{prefix}{j}.norm"] = torch.tensor([self.norms[j]], dtype=torch.float64)
        if self.tasks:
            out[f"{prefix}tasks"] = torch.tensor(self.tasks, dtype=torch.int64)
        return {k: v.cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load(self, prefix: str, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
             trainable_alpha: bool = False) -> None:
        """Restore :meth:`state` output into empty branches; every factor frozen."""
        if self.tasks:
            raise ValueError("load needs empty branches")
        if f"{prefix}tasks" not in tensors:
            return
        for j, task in enumerate(tensors[f"{prefix}tasks"].tolist()):
            A = tensors[f"{prefix}{j}.A"].to(device=device, dtype=dtype)
            B = tensors[f"{prefix}{j}.B"].to(device=device, dtype=dtype)
            self.add(int(task), A, B, alpha=float(tensors[f"{prefix}{j}.alpha"][0]),
                     norm=float(tensors[f"{prefix}{j}.norm"][0]))
            self.freeze(j)
            # the magnitude is restored bit-for-bit (a Python float round trip is exact)
            self.alpha[j].requires_grad_(trainable_alpha)


def _qkv_rows(name: str, out_features: int, parts: Sequence[int]) -> Rows:
    """Output rows of the q (0), k (1), v (2) parts of a timm ``attn.qkv`` layer; None for other layers."""
    if not name.endswith("attn.qkv"):
        return None
    if out_features % 3:
        raise ConfigError(f"{name} has {out_features} outputs, not 3 x width; cannot find its q, k, v rows")
    d = out_features // 3
    return tuple((p * d, (p + 1) * d) for p in parts)


class _BranchMethod(ContinualMethod):
    """Shared machinery: one :class:`LowRankBranches` per adapted layer, saved with the heads."""

    parts: Sequence[int] = (0, 1, 2)

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        if not model.adapted:
            raise ConfigError(f"method {self.name!r} needs at least one adapted layer (method.adapted_modules)")
        self.branches: dict[str, LowRankBranches] = {
            name: LowRankBranches(layer, _qkv_rows(name, layer.out_features, self.parts))
            for name, layer in model.adapted_layers()
        }
        # registered (for .to / .parameters) under names without dots
        self.branch_modules = nn.ModuleDict({n.replace(".", "_"): b for n, b in self.branches.items()})

    def _weight(self, name: str) -> torch.Tensor:
        return self.model.adapted[name].base.weight

    def _current(self, task: int) -> list[tuple[LowRankBranches, int]]:
        return [(b, b.tasks.index(task)) for b in self.branches.values() if task in b.tasks]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        for name, b in self.branches.items():
            out.update(b.state(f"branches.{name}."))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        for name, b in self.branches.items():
            w = self._weight(name)
            b.load(f"branches.{name}.", tensors, w.device, w.dtype, trainable_alpha=self._trainable_alpha)

    _trainable_alpha = False


# ============================================================================ InfLoRA
class InfLoRA(_BranchMethod):
    """InfLoRA: interference-free low-rank adaptation (Liang and Li, CVPR 2024, arXiv 2404.00228).

    Every adapted layer (default: the attention ``qkv`` of every block) gets one LoRA branch per task,
    written to the key and value outputs only (the last 2/3 of timm's fused ``qkv`` rows; the query
    rows are untouched, as InfLoRA adapts ``W_k`` and ``W_v``)::

        y = W h + sum_{j <= t} B_j A_j h

    * ``A_t`` (r, d_in), the dimensionality-reduction matrix, is designed before task t and fixed:
      the top-r eigenvectors of the task's input Gram matrix projected away from the memory ``M``
      (:meth:`SubspaceMemory.orthogonal_directions`), so ``A_t M = 0``: training ``B_t`` cannot change
      the outputs for inputs in span ``M`` (the old tasks' inputs, up to the energy left out).
    * ``B_t`` (rows, r), the dimensionality-increasing matrix, starts at zero and is trained on task t
      only, with the task's head (cross-entropy over the task's classes).
    * After task t the memory grows with the GPM energy criterion (threshold ``eps_t`` rising from
      ``energy_threshold_start`` to ``energy_threshold_end``) on the inputs of the updated model.
    * All branches stay on for every image (no gates, no task identity); inference is one pass with
      plain concatenated logits (softmax over all seen classes).

    Reproduced: the fixed, memory-orthogonal down-projection from the input statistics, the trained
    up-projection from zero, k/v-only adaptation, the energy-threshold memory, the branch sum
    (equivalent to merging), per-task classifiers trained on their own classes, rank ``rank_orthogonal``.
    Not reproduced: DualGPM's choice of storing the memory or its complement (we always store ``M``;
    the subspace is the same), the paper's ViT-B/16 setting and its 50 epochs with Adam 5e-4 (the
    shared loop's settings are used), and the classifier-alignment variants some follow-ups add.
    """

    name = "inflora"
    parts = (1, 2)  # k, v

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.memories = {n: SubspaceMemory(layer.in_features) for n, layer in model.adapted_layers()}

    @torch.no_grad()
    def _grams(self, ctx: TaskContext, desc: str) -> dict[str, torch.Tensor]:
        """Input Gram matrix (all tokens) of every adapted layer over the task's data, current model."""
        acc = {n: GramAccumulator(layer.in_features, "all") for n, layer in self.model.adapted_layers()}
        for name, layer in self.model.adapted_layers():
            layer.recorder = acc[name].update
        try:
            for x, _ in ctx.progress(ctx.stats_loader, desc):
                self.model.features(x.to(ctx.device))
        finally:
            for _, layer in self.model.adapted_layers():
                layer.recorder = None
        # sums: add up the torchrun processes' shards before any eigendecomposition
        return {n: distributed.all_reduce_sum_(a.gram) for n, a in acc.items()}

    def begin_task(self, ctx: TaskContext) -> dict:
        grams = self._grams(ctx, f"task {ctx.task + 1} statistics")
        ranks: dict[str, int] = {}
        for name, b in self.branches.items():
            A = self.memories[name].orthogonal_directions(grams[name], self.cfg.rank_orthogonal)
            w = self._weight(name)
            b.add(ctx.task, A.to(device=w.device, dtype=w.dtype))
            ranks[name] = int(A.shape[0])
        super().begin_task(ctx)
        return {"inflora_rank": ranks}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups(task)
        groups["adapters"] += [b.B[j] for b, j in self._current(task) if b.A[j].shape[0] > 0]
        return groups

    def end_task(self, ctx: TaskContext) -> dict:
        for b, j in self._current(ctx.task):
            b.freeze(j)
        super().end_task(ctx)
        grams = self._grams(ctx, f"task {ctx.task + 1} memory")
        eps = energy_threshold(ctx.task, ctx.num_tasks, self.cfg.energy_threshold_start,
                               self.cfg.energy_threshold_end)
        info: dict = {"energy_threshold": eps, "memory_added": {}, "memory_size": {}}
        for name, mem in self.memories.items():
            info["memory_added"][name] = mem.grow(grams[name], eps)
            info["memory_size"][name] = mem.size
        return info

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        for name, mem in self.memories.items():
            out[f"memory.{name}.basis"] = mem.state()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        for name, mem in self.memories.items():
            mem.load(tensors[f"memory.{name}.basis"])


# ============================================================================ SD-LoRA
class SDLoRA(_BranchMethod):
    """SD-LoRA: scalable decoupled LoRA (Wu et al., ICLR 2025, arXiv 2501.13198).

    Every adapted layer (default: the attention ``qkv``) carries, while task t is learned::

        y = W h + sum_{j < t} alpha_j * (B_j A_j) / ||B_j A_j||_F  +  B_t A_t

    written to the query and value outputs (timm's fused ``qkv`` rows of q and v; SD-LoRA builds on
    LoRA-ViT, which adapts ``W_q`` and ``W_v``).

    * Directions of earlier tasks, ``(B_j A_j) / ||B_j A_j||_F``, are fixed (``A_j``, ``B_j`` and the
      norm frozen after task j).
    * Magnitudes ``alpha_j`` of every earlier task (one scalar per task per layer) are learned in every
      later task, together with the new task's LoRA (``A_t`` Kaiming-uniform, ``B_t`` zero, both
      trained) and head.
    * At the end of task t its branch becomes a fixed direction with magnitude
      ``alpha_t = ||B_t A_t||_F``, so the function is unchanged by the change of parameterisation.
    * No gates, no task identity: all directions are on for every image; inference is one pass with
      plain concatenated logits.

    Simplifications (documented, deliberate):

    * The paper writes the new task's term as ``alpha_t * B_t A_t / ||B_t A_t||_F`` already while it is
      learned. With ``B_t = 0`` at the start that quotient is 0/0 (the official code divides by
      ``||B|| ||A||`` with a zero ``B``); we learn ``B_t A_t`` unnormalised during its own task, which
      spans the same updates, and split it into magnitude and direction when the task ends. Gradient
      dynamics during task t differ from the paper's.
    * One LoRA per layer writes to both q and v rows (one shared ``A``, one magnitude); the official
      code has separate q and v LoRAs and normalises with ``||B|| ||A||`` instead of ``||B A||_F``.
    * One magnitude per task per layer (the brief's reading); the official code's magnitudes are
      per task.
    * The variants SD-LoRA-RR (rank reduction) and SD-LoRA-KD (knowledge distillation) are not
      implemented; rank = ``rank_orthogonal``; the shared loop's optimiser and epochs are used.
    """

    name = "sd-lora"
    parts = (0, 2)  # q, v
    _trainable_alpha = True

    def begin_task(self, ctx: TaskContext) -> dict:
        r = self.cfg.rank_orthogonal
        g = _generator(self, ctx.task, 1)
        for name, b in self.branches.items():
            w = self._weight(name)
            bound = 1.0 / math.sqrt(b.in_features)
            A = torch.empty(r, b.in_features, dtype=w.dtype).uniform_(-bound, bound, generator=g)
            b.add(ctx.task, A.to(w.device), train_A=True)
        super().begin_task(ctx)
        return {}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups(task)
        for b in self.branches.values():
            for j, t in enumerate(b.tasks):
                if t == task:
                    groups["adapters"] += [b.A[j], b.B[j]]
                else:
                    groups["adapters"].append(b.alpha[j])
        return groups

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict:
        norms: dict[str, float] = {}
        for name, b in self.branches.items():
            j = b.tasks.index(ctx.task)
            b.freeze(j)
            n = float(torch.linalg.matrix_norm(b.B[j].double() @ b.A[j].double()))
            a = b.alpha[j]
            if n > 0:
                b.norms[j] = n
                b.alpha[j] = nn.Parameter(torch.tensor(n, dtype=a.dtype, device=a.device))
            else:  # nothing learned: a zero direction with magnitude 0
                b.alpha[j] = nn.Parameter(torch.zeros((), dtype=a.dtype, device=a.device))
            norms[name] = n
        super().end_task(ctx)
        return {"sdlora_magnitude": norms}


# ============================================================================ L2P
class _AddAuxLoss(torch.autograd.Function):
    """Identity on ``logits`` whose backward also sends gradient 1 to the scalar ``aux``.

    The shared loop minimises ``cross_entropy(train_logits(x), y)``; returning
    ``_AddAuxLoss.apply(logits, aux)`` makes it minimise ``cross_entropy + aux`` (the reported loss
    stays the cross-entropy). Used for L2P's key-matching loss.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.aux_shape = aux.shape
        return logits.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, torch.ones(ctx.aux_shape, dtype=grad.dtype, device=grad.device)


class L2P(ContinualMethod):
    """L2P: learning to prompt (Wang et al., CVPR 2022, arXiv 2112.08654), prompt-tuning variant.

    A pool of ``prompt_pool`` prompts (each ``prompt_length`` tokens of width D) with one key each.

    1. Query pass: the frozen backbone (no prompt) gives the image's class-token feature ``q(x)``.
    2. Selection: the ``prompt_top_k`` keys with the highest cosine similarity to ``q(x)``, per image
       (so an image gets the same prompts in any batch).
    3. Prompted pass: the selected prompts are inserted after the class token (after the position
       embedding, so prompts carry none) and the sequence runs through the blocks; the class token's
       final feature feeds the heads.
    4. Training: prompts, keys and the task's head; loss = cross-entropy over the task's classes +
       ``prompt_key_weight`` * mean over images of sum over selected keys of ``(1 - cos(q(x), k))``
       (the surrogate key-matching loss). The pool is shared and trained in every task.
    5. Inference: both passes, plain concatenated logits: two forward passes per image, against
       DualLoRA's one (the speed comparison of method.md).

    Reproduced: pool, keys, per-image top-N cosine selection, prompt prepending (prompt tuning), the
    surrogate loss with its weight, frozen backbone, two-pass inference, per-task classifiers
    trained on their own classes (L2P masks the logits of other tasks' classes).
    Not reproduced: the optional batch-wise prompt-frequency penalty, the classifier on the average of
    the prompt tokens' outputs (we use the class token), prompt initialisation details beyond
    uniform(-1, 1), and the paper's ViT-B/16 training schedule.
    """

    name = "l2p"
    adapted_by_default = False

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        if cfg.prompt_top_k > cfg.prompt_pool:
            raise ConfigError(f"method.prompt_top_k={cfg.prompt_top_k} exceeds method.prompt_pool={cfg.prompt_pool}")
        bb = model.backbone
        for attr in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head"):
            if not hasattr(bb, attr):
                raise ConfigError(f"l2p needs a timm VisionTransformer backbone; it has no {attr!r}")
        D = model.embed_dim
        w = next(bb.parameters())
        g = _generator(self, 0, 2)
        self.prompts = nn.Parameter(torch.empty(cfg.prompt_pool, cfg.prompt_length, D).uniform_(-1, 1, generator=g)
                                    .to(device=w.device, dtype=w.dtype))
        self.keys = nn.Parameter(torch.empty(cfg.prompt_pool, D).uniform_(-1, 1, generator=g)
                                 .to(device=w.device, dtype=w.dtype))

    def _sync_device(self) -> None:
        w = next(self.model.backbone.parameters())
        if self.prompts.device != w.device:
            self.prompts.data = self.prompts.data.to(w.device)
            self.keys.data = self.keys.data.to(w.device)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Query pass: class-token features (B, D) of the frozen, unprompted backbone."""
        return self.model.features(x)

    def select(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity (B, pool) of queries to keys and the top-k prompt indices (B, k), per image."""
        qn = F.normalize(q, dim=1)
        kn = F.normalize(self.keys, dim=1)
        sim = (qn[:, None, :] * kn[None, :, :]).sum(-1)  # a per-row reduction: batch-independent
        idx = sim.detach().topk(self.cfg.prompt_top_k, dim=1).indices
        return sim, idx

    def prompted_features(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Prompted pass: features (B, D) with prompts ``idx`` (B, k) inserted after the class token."""
        bb = self.model.backbone
        t = bb._pos_embed(bb.patch_embed(self.model.normalize(x)))
        p = self.prompts[idx].reshape(x.shape[0], -1, self.prompts.shape[-1]).to(t.dtype)
        k = int(getattr(bb, "num_prefix_tokens", 1))
        t = torch.cat([t[:, :k], p, t[:, k:]], dim=1)
        t = bb.norm(bb.blocks(bb.norm_pre(bb.patch_drop(t))))
        return bb.forward_head(t, pre_logits=True)

    def begin_task(self, ctx: TaskContext) -> dict:
        self._sync_device()
        return super().begin_task(ctx)

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups(task)
        groups["adapters"] += [self.prompts, self.keys]
        return groups

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        sim, idx = self.select(self.query(x))
        logits = self.model.head_logits(self.prompted_features(x, idx), task)
        key_loss = (1.0 - sim.gather(1, idx)).sum(1).mean()
        return _AddAuxLoss.apply(logits, self.cfg.prompt_key_weight * key_loss)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        _, idx = self.select(self.query(x))
        logits = self.model.head_logits(self.prompted_features(x, idx))
        probs = torch.softmax(logits, dim=1)
        return Inference(probs, posterior_from_probs(probs, self.model.head_sizes))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out["l2p.prompts"] = self.prompts.detach().cpu().contiguous()
        out["l2p.keys"] = self.keys.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self._sync_device()
        self.prompts.copy_(tensors["l2p.prompts"])
        self.keys.copy_(tensors["l2p.keys"])


# ============================================================================ training-free classifiers
class _StatisticsClassifier(ContinualMethod):
    """Frozen backbone, no head, nothing trained: ``end_task`` gathers class statistics of the final
    features, ``infer`` classifies with them. ``param_groups`` is empty, so the shared loop runs no
    epoch for these methods."""

    adapted_by_default = False

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.sizes: list[int] = []

    def begin_task(self, ctx: TaskContext) -> dict:
        return {}

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        return {"adapters": [], "head": []}

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        raise TrainingError(f"{self.name} trains nothing; the training loop must skip methods without parameters")

    @torch.no_grad()
    def _class_sums(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        acc = TaskSignatures.new_accumulator(ctx.num_classes, self.model.embed_dim)
        for x, y in ctx.progress(ctx.stats_loader, f"task {ctx.task + 1} statistics"):
            TaskSignatures.accumulate(acc, self.model.features(x.to(ctx.device)), y)
        for tensor in acc.values():  # sums over the torchrun processes' shards
            distributed.all_reduce_sum_(tensor)
        if (acc["n"] <= 0).any():
            raise TrainingError(f"task {ctx.task + 1}: every class needs at least one training image")
        return acc

    def end_task(self, ctx: TaskContext) -> dict:
        self.sizes.append(ctx.num_classes)
        self.tasks_learned = ctx.task + 1
        return {}

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        probs = torch.softmax(self.class_logits(self.model.features(x)), dim=1)
        return Inference(probs, posterior_from_probs(probs, self.sizes))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out["classes_per_task"] = torch.tensor(self.sizes, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.sizes = [int(v) for v in tensors["classes_per_task"].tolist()]


class SimpleCIL(_StatisticsClassifier):
    """SimpleCIL: prototype classifier on a frozen pre-trained model (Zhou et al., "Revisiting
    Class-Incremental Learning with Pre-Trained Models: Generalizability and Adaptivity are All You
    Need", IJCV 2024, arXiv 2303.07338).

    After each task, the prototype of each of its classes is the mean of the frozen backbone's final
    features of its training images. Prediction: the class with the highest cosine similarity to the
    image's feature; probabilities ``softmax(cos / tau_id)`` over all seen classes (the temperature
    changes confidences and the task posterior, never the predicted class). No training at all.

    Reproduced: frozen backbone, class-mean prototypes, cosine classifier. Not reproduced: APER
    (the adapted-model variant of the same paper); the paper's ViT-B/16 backbone.
    """

    name = "simplecil"

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.prototypes = torch.zeros(0, model.embed_dim, dtype=torch.float64)

    def end_task(self, ctx: TaskContext) -> dict:
        acc = self._class_sums(ctx)
        self.prototypes = torch.cat([self.prototypes, acc["sum"] / acc["n"][:, None]])
        return super().end_task(ctx)

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        protos = F.normalize(self.prototypes, dim=1).to(device=feats.device, dtype=feats.dtype)
        return F.normalize(feats, dim=1) @ protos.T / self.cfg.tau_id

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out["prototypes"] = self.prototypes.clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.prototypes = tensors["prototypes"].to(torch.float64).clone()


class FeCAM(_StatisticsClassifier):
    """FeCAM: feature covariance-aware metric (Goswami et al., NeurIPS 2023, arXiv 2309.14062).

    Frozen backbone; after each task, the class means of its final features and their within-class
    scatter (added to a covariance pooled over every class so far; :class:`TaskSignatures`).
    Prediction: the class with the smallest squared Mahalanobis distance (per dimension, with the
    pooled covariance plus a small ridge ``ridge``); probabilities ``softmax(-d / tau_id)``.
    No training.

    Reproduced: frozen backbone, prototypes, Mahalanobis distance with a covariance from the training
    statistics only (no images kept). Not reproduced: FeCAM's per-class covariance matrices with
    covariance shrinkage, correlation normalisation and Tukey's power transform of the features (its
    many-shot setting); we use one pooled covariance (the common-covariance variant) and a relative
    ridge.
    """

    name = "fecam"

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        self.signatures = TaskSignatures(model.embed_dim, score="mahalanobis", tau=cfg.tau_id, ridge=cfg.ridge)

    def end_task(self, ctx: TaskContext) -> dict:
        self.signatures.add_task(self._class_sums(ctx))
        return super().end_task(ctx)

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        return -self.signatures.class_distances(feats) / self.cfg.tau_id

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out.update(self.signatures.state("signatures.final."))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.signatures.load("signatures.final.", tensors)


# ============================================================================ joint (upper bound)
class _Shifted(Dataset):
    """A task's dataset with task-local labels shifted to class-order positions."""

    def __init__(self, base: Dataset, offset: int) -> None:
        self.base, self.offset = base, offset

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, int(y) + self.offset


class Joint(ContinualMethod):
    """Joint training: the upper bound, NOT a continual and NOT a rehearsal-free method.

    It keeps a reference to the training data of every task it has seen. At task t it trains, from
    scratch (fresh LoRA of rank ``rank_orthogonal`` on the adapted layers, re-initialised heads), one
    LoRA and the heads of tasks 1..t on the union of the tasks' data, with cross-entropy over all seen
    classes (the heads concatenated are one classifier over them). Evaluation after each task then
    shows what the same backbone, adapters and budget (``train.epochs`` over the union) reach with all
    the data at once. Inference: plain concatenated logits.

    It needs the training loop to iterate the union: the loop asks :meth:`training_set` for the data
    of the epoch loop. A loaded checkpoint predicts, but cannot learn further tasks (the data of
    earlier tasks is not in the checkpoint).
    """

    name = "joint"

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        if not model.adapted:
            raise ConfigError("method 'joint' needs at least one adapted layer (method.adapted_modules)")
        self.datasets: dict[int, Dataset] = {}
        self.sizes: list[int] = []
        self._union_task: Optional[int] = None

    def begin_task(self, ctx: TaskContext) -> dict:
        g = _generator(self, ctx.task, 1)
        for _, layer in self.model.adapted_layers():
            layer.add_lora(self.cfg.rank_orthogonal, g)
        bound = 1.0 / self.model.embed_dim ** 0.5
        g = _generator(self, ctx.task, 2)
        with torch.no_grad():
            for head in self.model.heads:
                head.weight.uniform_(-bound, bound, generator=g)
                head.bias.uniform_(-bound, bound, generator=g)
                head.requires_grad_(True)
        self.sizes = self.model.head_sizes + [ctx.num_classes]
        self._union_task = None
        return super().begin_task(ctx)

    def training_set(self, data: Dataset, task: int) -> Dataset:
        """The epoch loop's data for ``task``: every seen task's data, labels = class-order positions.

        Raises:
            TrainingError: the data of an earlier task is not at hand (e.g. after loading a checkpoint).
        """
        self.datasets[task] = data
        missing = [j for j in range(task) if j not in self.datasets]
        if missing:
            raise TrainingError(f"joint needs the training data of every earlier task; tasks {missing} are "
                                "missing (a loaded joint checkpoint cannot learn further tasks)")
        offsets = [sum(self.sizes[:j]) for j in range(task + 1)]
        self._union_task = task
        return ConcatDataset([_Shifted(self.datasets[j], offsets[j]) for j in range(task + 1)])

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        adapters: list[nn.Parameter] = []
        for _, layer in self.model.adapted_layers():
            assert layer.lora_A is not None and layer.lora_B is not None
            adapters += [layer.lora_A, layer.lora_B]
        return {"adapters": adapters, "head": [p for h in self.model.heads for p in h.parameters()]}

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        if self._union_task != task:
            raise TrainingError("joint trains on the union of all tasks' data: the training loop must take its "
                                "data from Joint.training_set")
        return self.model.head_logits(self.model.features(x))  # all seen classes

    def end_task(self, ctx: TaskContext) -> dict:
        for head in self.model.heads:
            head.requires_grad_(False)
        self.tasks_learned = ctx.task + 1
        seen = sum(len(d) for j, d in self.datasets.items() if j <= ctx.task)  # type: ignore[arg-type]
        return {"joint_train_images": seen}


BASELINES: dict[str, type[ContinualMethod]] = {
    m.name: m for m in (InfLoRA, SDLoRA, L2P, SimpleCIL, FeCAM, Joint)
}
METHODS.update(BASELINES)
