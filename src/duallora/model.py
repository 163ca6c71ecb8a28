"""A frozen timm ViT with adapted linear layers and one classification head per task.

:class:`AdaptedViT` wraps the backbone in place (like PEFT, no forked model file): the linear layers
that ``adapted_modules`` names are replaced by :class:`~duallora.adapters.AdaptedLinear`. Entries are
placement names (``qkv`` = ``blocks.i.attn.qkv``, ``proj`` = ``blocks.i.attn.proj``,
``fc1``/``fc2`` = ``blocks.i.mlp.fc1``/``fc2``; the table is :mod:`duallora.placements`), module path
suffixes (``attn.qkv``) or regular expressions (``blocks\\.[0-5]\\.attn\\.qkv``), at any depth
inside ``backbone.blocks``. Heads are ``nn.Linear(D, C_t)`` on the backbone's pre-logits feature (the
class token after the final norm for timm's default ``global_pool="token"``); at inference they are
concatenated in task order, so output index = position in the class order.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from duallora.adapters import AdaptedLinear, ParameterCache
from duallora.placements import find_layers


class AdaptedSite(NamedTuple):
    """One adapted layer: ``name`` its module path in the backbone (``blocks.3.attn.qkv``, also the
    checkpoint key prefix ``adapters.<name>.``), ``block`` its index in ``backbone.blocks`` (found by
    walking the blocks, never parsed from the name) and the ``layer``."""

    name: str
    block: int
    layer: AdaptedLinear


class AdaptedViT(nn.Module):
    """Frozen ViT + adapted layers + per-task heads.

    Args:
        backbone: a frozen timm ``VisionTransformer`` with ``num_classes=0``.
        mean, std: per-channel input normalisation for images in [0, 1].
        adapted_modules: ``method.adapted_modules`` entries (placement names, module paths, regular
            expressions; :mod:`duallora.placements`); empty = no adapted layer.

    Raises:
        ConfigError: an entry that matches no linear layer of ``backbone.blocks`` (the message names
            the placements and real module paths).

    Inputs to :meth:`features` are uint8 images (B, C, H, W) in [0, 255] or floats in [0, 1].

    **Adapted layers.** :meth:`adapted_sites` gives every adapted layer as an :class:`AdaptedSite`
    ``(name, block, layer)``, in forward order; :meth:`adapted_layers` the ``(name, layer)`` pairs;
    :meth:`block_of` a layer's block index. Methods take layers and block indices from here only.

    **Attaching low-rank branches** (two mechanisms, both on the same adapted layers):

    * a new method should use :class:`~duallora.methods.branches.LowRankBranches` (through
      :class:`~duallora.methods.branches.BranchMethod`, as ``inflora`` and ``sd-lora`` do): any
      number of per-task branches ``alpha_j / n_j * B_j A_j``, on all or some output rows, owned and
      saved by the method (``branches.<name>.``) and added by a forward hook, so the method needs no
      change to the shared layer class or its checkpoint format;
    * :class:`~duallora.adapters.AdaptedLinear`'s own branches (orthogonal adapter merged into ``W``,
      per-image gated residual adapters, one plain LoRA) are for what needs exactly those:
      ``duallora``, and the single LoRA of ``seq-lora`` and ``joint``; their numerics and checkpoint
      names (``adapters.<name>.``) are fixed, and a new kind of branch there is an edit of that class.

    Either way ``layer.recorder`` (AdaptedLinear) sees each adapted layer's input for statistics
    passes; hooked branches add to the output of ``AdaptedLinear.forward``, its own branches included.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 adapted_modules: Sequence[str] = ("qkv",)) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.adapted: dict[str, AdaptedLinear] = {}
        self._sites: list[AdaptedSite] = []
        blocks = backbone.blocks
        matches = find_layers(blocks, list(adapted_modules), leaf=(AdaptedLinear,)) if adapted_modules else []
        for match in matches:  # forward order
            if isinstance(match.module, AdaptedLinear):  # wrapped by an earlier AdaptedViT: left alone
                continue
            parent_path, _, attr = match.path.rpartition(".")
            parent = backbone.get_submodule(parent_path)
            wrapped = AdaptedLinear(match.module)
            setattr(parent, attr, wrapped)
            self.adapted[match.path] = wrapped
            self._sites.append(AdaptedSite(match.path, match.block, wrapped))
        self._block_of = {site.name: site.block for site in self._sites}
        self.heads = nn.ModuleList()
        self._head_stack = ParameterCache()

    # ------------------------------------------------------------------ layers
    def adapted_sites(self) -> Iterator[AdaptedSite]:
        """:class:`AdaptedSite` ``(name, block, layer)`` of every adapted layer, in forward order."""
        return iter(self._sites)

    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLinear]]:
        """(name, layer) of every adapted layer, in forward order."""
        return iter(self.adapted.items())

    def block_of(self, name: str) -> int:
        """Index in ``backbone.blocks`` of adapted layer ``name``.

        Raises:
            KeyError: ``name`` is not an adapted layer.
        """
        return self._block_of[name]

    def add_head(self, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
        """Append a head ``nn.Linear(D, num_classes)`` for the next task and return it."""
        head = nn.Linear(self.embed_dim, num_classes)
        if generator is not None:
            bound = 1.0 / self.embed_dim ** 0.5
            with torch.no_grad():
                head.weight.uniform_(-bound, bound, generator=generator)
                head.bias.uniform_(-bound, bound, generator=generator)
        p = next(self.backbone.parameters())
        head = head.to(device=p.device, dtype=p.dtype)
        self.heads.append(head)
        self._head_stack.clear()
        return head

    @property
    def head_sizes(self) -> list[int]:
        return [h.out_features for h in self.heads]

    # ------------------------------------------------------------------ forward
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) or float in [0, 1] -> normalised float input."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = x.to(self.mean.dtype)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features (B, D) of images ``x`` (B, C, H, W)."""
        tokens = self.backbone.forward_features(self.normalize(x))
        return self.backbone.forward_head(tokens, pre_logits=True)

    def features_from(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        """Pre-logits features (B, D) from the tokens (B, N, D) entering ``backbone.blocks[block]``.

        The tail of :meth:`features` (blocks ``block..``, the final norm, the head's pooling), the same
        operations in the same order: ``features_from(t, b)`` equals ``features(x)`` where ``t`` is what
        ``features(x)`` fed block ``b``. Statistics passes use it to replay a task's images from the
        first block that can change (DualLoRA, docs/performance.md, "Replayed statistics passes").

        Raises:
            IndexError: ``block`` is not a block index of the backbone.
        """
        blocks = self.backbone.blocks
        if not 0 <= block < len(blocks):
            raise IndexError(f"block {block} outside the backbone's {len(blocks)} blocks")
        for blk in blocks[block:]:
            tokens = blk(tokens)
        return self.backbone.forward_head(self.backbone.norm(tokens), pre_logits=True)

    def head_logits(self, feats: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits of one task's head (B, C_t), or of all heads concatenated (B, sum C_t)."""
        if task is not None:
            return self.heads[task](feats)
        weight, bias = self._stacked_heads()
        return F.linear(feats, weight, bias)

    def _stacked_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's weight (sum C_t, D) and bias (sum C_t,) stacked; one matrix product at
        inference instead of one per task. Cached without autograd, keyed on the parameters'
        identity and in-place version counters (an optimiser step or a load rebuilds it)."""
        params = [p for h in self.heads for p in (h.weight, h.bias)]
        return self._head_stack.get(
            params, lambda: (torch.cat([h.weight for h in self.heads]), torch.cat([h.bias for h in self.heads])),
            cacheable=not torch.is_grad_enabled())

    def set_fixed_gates(self, task: int | None) -> None:
        """Gate the residual adapters for every image alike: task ``task`` on, others off.

        ``None`` switches fixed gates off, so layers use their dynamic ``gate_fn``.
        """
        for _, layer in self.adapted_layers():
            if task is None:
                layer.fixed_gates = None
            else:
                g = torch.tensor([1.0 if t == task else 0.0 for t in layer.res_tasks],
                                 device=layer.base.weight.device, dtype=layer.base.weight.dtype)
                layer.fixed_gates = g
