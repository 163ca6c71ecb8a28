"""``l2p``: learning to prompt (Wang et al., CVPR 2022, arXiv 2112.08654), prompt-tuning variant.

Its prompted forward is built from timm's ``VisionTransformer`` pieces (``patch_embed``,
``_pos_embed``, ``blocks``, ``norm``, ``forward_head``); its key-matching loss goes through the
:meth:`~duallora.methods.base.ContinualMethod.loss` hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from duallora.errors import ConfigError, TrainingError
from duallora.methods.base import ContinualMethod, Inference, TaskContext, posterior_from_probs
from duallora.methods.options import Option, non_negative, positive_int
from duallora.methods.registry import register_method
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig


def _top_k_in_pool(key: str, value: Any, cfg: Any) -> Optional[str]:
    """A positive ``prompt_top_k`` of at most ``prompt_pool`` prompts."""
    return positive_int(key, value, cfg) or (
        f"method.{key}={value} must not exceed method.prompt_pool={cfg.prompt_pool}"
        if value > cfg.prompt_pool else None)


@register_method
class L2P(ContinualMethod):
    """L2P: learning to prompt (Wang et al., CVPR 2022, arXiv 2112.08654), prompt-tuning variant.

    A pool of ``prompt_pool`` prompts (each ``prompt_length`` tokens of width D) with one key each.

    1. Query pass: the frozen backbone (no prompt) gives the image's class-token feature ``q(x)``.
    2. Selection: the ``prompt_top_k`` keys with the highest cosine similarity to ``q(x)``, per image
       (so an image gets the same prompts in any batch).
    3. Prompted pass: the selected prompts are inserted after the class token (after the position
       embedding, so prompts carry none) and the sequence runs through the blocks; the mean of the
       prompt tokens' final features (after the final norm) feeds the heads (``head_type=prompt``).
    4. Training: prompts, keys and the task's head; loss = cross-entropy over the task's classes +
       ``prompt_key_weight`` * mean over images of sum over selected keys of ``(1 - cos(q(x), k))``
       (the surrogate key-matching loss). The pool is shared and trained in every task.
    5. Inference: both passes, plain concatenated logits: two forward passes per image, against
       DualLoRA's one (the speed comparison of method.md).

    Source of every setting: the PyTorch reimplementation the field compares against
    (JH-LEE-KR/l2p-pytorch, ``configs/cifar100_l2p.py``, ``prompt.py``, ``vision_transformer.py``,
    ``engine.py``): pool 10, length 5, top-k 5, ``pull_constraint_coeff`` 0.1, prompts and keys
    ``nn.init.uniform_`` (U(0, 1)), ``head_type=prompt`` (mean of the prompt tokens' outputs), logits
    of other tasks' classes masked (``train_mask``: cross-entropy over the task's classes), Adam,
    lr ``0.03 * batch / 256``, constant schedule, gradient clipping 1.0 (``train.grad_clip``), 5
    epochs. The optimiser settings are ``train.*`` keys: the comparison specs
    (``configs/compare/*.yaml``) set them for the ``l2p`` variant.
    Reproduced: pool, keys, per-image top-N cosine selection, prompt prepending (prompt tuning), the
    surrogate loss with its weight, initialisation, the prompt-token head, frozen backbone, two-pass
    inference, per-task classifiers trained on their own classes.
    Not reproduced: ``batchwise_prompt`` (the reimplementation replaces each image's prompts by the
    batch's most frequent ones, which makes a prediction depend on the other images of its batch; we
    keep the selection per image), the JAX original's variants (length 10, top-k 4, U[0, 0.01),
    weight 1.0), and ViT-B/16 at 224 px.
    """

    name = "l2p"

    @classmethod
    def min_classes_per_task(cls, cfg: Any) -> int:
        """2: plain concatenated heads, a one-class head never learns (see ``PosteriorHeads``)."""
        return 2

    uses_adapters = False
    options = {
        "prompt_pool": Option(10, "l2p: prompts (and keys) in the pool", check=positive_int),
        "prompt_length": Option(5, "l2p: tokens per prompt", check=positive_int),
        "prompt_top_k": Option(5, "l2p: prompts chosen per image (top-N by key cosine similarity), <= prompt_pool",
                               check=_top_k_in_pool),
        "prompt_key_weight": Option(0.1, "l2p: weight of the surrogate key-matching loss", check=non_negative),
    }

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        if cfg.prompt_top_k > cfg.prompt_pool:
            raise ConfigError(f"method.prompt_top_k={cfg.prompt_top_k} exceeds method.prompt_pool={cfg.prompt_pool}")
        bb = model.backbone
        for attr in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm"):
            if not hasattr(bb, attr):
                raise ConfigError(f"l2p needs a timm VisionTransformer backbone; it has no {attr!r}")
        D = model.embed_dim
        w = next(bb.parameters())
        g = self.task_generator(0, 2)
        # nn.init.uniform_ in the reimplementation: U(0, 1) for prompts and keys
        self.prompts = nn.Parameter(torch.empty(cfg.prompt_pool, cfg.prompt_length, D).uniform_(0, 1, generator=g)
                                    .to(device=w.device, dtype=w.dtype))
        self.keys = nn.Parameter(torch.empty(cfg.prompt_pool, D).uniform_(0, 1, generator=g)
                                 .to(device=w.device, dtype=w.dtype))
        self._key_loss: Optional[torch.Tensor] = None

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
        """Prompted pass: features (B, D), the mean final (normed) output of the prompt tokens, with
        prompts ``idx`` (B, k) inserted after the class token (``head_type=prompt``)."""
        bb = self.model.backbone
        t = bb._pos_embed(bb.patch_embed(self.model.normalize(x)))
        p = self.prompts[idx].reshape(x.shape[0], -1, self.prompts.shape[-1]).to(t.dtype)
        k = int(getattr(bb, "num_prefix_tokens", 1))
        t = torch.cat([t[:, :k], p, t[:, k:]], dim=1)
        t = bb.norm(bb.blocks(bb.norm_pre(bb.patch_drop(t))))
        feats = t[:, k:k + p.shape[1]].mean(dim=1)
        fc_norm = getattr(bb, "fc_norm", None)
        return fc_norm(feats) if fc_norm is not None else feats

    def begin_task(self, ctx: TaskContext) -> dict:
        self._sync_device()
        return super().begin_task(ctx)

    def param_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """The task's head, the prompt pool and the keys (shared, trained in every task)."""
        groups = super().param_groups(task)
        groups["adapters"] += [self.prompts, self.keys]
        return groups

    def train_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Both passes; keeps the step's key-matching loss for :meth:`loss`."""
        sim, idx = self.select(self.query(x))
        logits = self.model.head_logits(self.prompted_features(x, idx), task)
        self._key_loss = (1.0 - sim.gather(1, idx)).sum(1).mean()
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, task: int) -> torch.Tensor:
        """Cross-entropy over the task's classes + ``prompt_key_weight`` * the key-matching loss of
        the :meth:`train_logits` call that made ``logits`` (step 4 above).

        Raises:
            TrainingError: no :meth:`train_logits` call preceded it.
        """
        key_loss, self._key_loss = self._key_loss, None
        if key_loss is None:
            raise TrainingError("L2P.loss needs the key similarities of this step's train_logits call")
        return F.cross_entropy(logits, labels) + self.cfg.prompt_key_weight * key_loss

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> Inference:
        """Query pass, per-image prompt selection, prompted pass; plain concatenated logits."""
        _, idx = self.select(self.query(x))
        logits = self.model.head_logits(self.prompted_features(x, idx))
        probs = torch.softmax(logits, dim=1)
        return Inference(probs, posterior_from_probs(probs, self.model.head_sizes))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Heads, the prompt pool and the keys."""
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
