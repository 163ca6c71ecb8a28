"""Frozen pre-trained Vision Transformer backbones.

Two kinds of backbone:

* Any timm ``VisionTransformer`` by its full name with the pretrained tag, e.g.
  ``vit_base_patch16_224.augreg_in21k`` (field-lessons.md, lesson 1). Weights come from a local file
  (``weights=PATH``, .safetensors or .pth) or, where the network allows, from the Hugging Face hub.
* The project's own offline default ``vit_tiny_patch7_28.duallora_mnist``: a small timm
  ``VisionTransformer`` (28x28x1 input, patch 7, width 192, depth 6, 3 heads) pre-trained on MNIST by
  ``duallora pretrain`` and shipped inside the package (see docs/pretraining.md).

Every backbone is returned frozen (``requires_grad=False``, eval mode) together with a
:class:`BackboneInfo` that records its name and the sha256 of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from duallora.errors import BackboneError

SHIPPED_NAME = "vit_tiny_patch7_28.duallora_mnist"
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_WEIGHTS = WEIGHTS_DIR / "vit_tiny_patch7_28_mnist.safetensors"
SHIPPED_RECORD = WEIGHTS_DIR / "vit_tiny_patch7_28_mnist.json"

#: Architecture of the shipped backbone (timm ``VisionTransformer`` keyword arguments).
SHIPPED_ARCH: dict[str, Any] = dict(
    img_size=28, patch_size=7, in_chans=1, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0
)
#: Input normalisation of the shipped backbone (MNIST pixel statistics, values in [0, 1]).
SHIPPED_MEAN = (0.1307,)
SHIPPED_STD = (0.3081,)


@dataclass
class BackboneInfo:
    """What identifies a backbone in a run's record.

    Attributes:
        name: full model name with pretrained tag.
        weights_path: local weights file, or None when fetched from the hub.
        sha256: hex sha256 of the weights file (``sha256_of="file"``) or of the loaded state dict
            (``sha256_of="state_dict"``, hub weights whose file is not at hand).
        input_size: (channels, height, width) the backbone expects.
        mean, std: per-channel normalisation applied to images in [0, 1].
        embed_dim: width of the final features.
    """

    name: str
    weights_path: Optional[str]
    sha256: str
    sha256_of: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """Hex sha256 over a module's parameters and buffers (sorted names, float32 bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_shipped_architecture() -> nn.Module:
    """The shipped backbone's architecture with random weights and no classifier (num_classes=0)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, **SHIPPED_ARCH)


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist; pass an existing file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(
            f"cannot read weights file {str(path)!r} ({type(exc).__name__}: {exc}); "
            "expected a .safetensors file or a .pth state dict"
        ) from exc
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {str(path)!r} does not hold a state dict")
    return state


def _create_shipped(weights: Optional[str]) -> tuple[nn.Module, BackboneInfo]:
    path = Path(weights) if weights else SHIPPED_WEIGHTS
    if weights and not path.is_file():
        raise BackboneError(f"weights file {weights!r} does not exist; pass an existing .safetensors/.pth file")
    if not path.is_file():
        raise BackboneError(
            f"the shipped backbone weights {str(path)!r} are missing; regenerate them with "
            "`duallora pretrain` (see docs/pretraining.md) or pass backbone.weights=PATH"
        )
    model = build_shipped_architecture()
    state = {k: v.float() for k, v in _load_state_file(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"weights file {str(path)!r} does not fit {SHIPPED_NAME}: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    info = BackboneInfo(
        name=SHIPPED_NAME,
        weights_path=str(path),
        sha256=file_sha256(path),
        sha256_of="file",
        input_size=(SHIPPED_ARCH["in_chans"], SHIPPED_ARCH["img_size"], SHIPPED_ARCH["img_size"]),
        mean=SHIPPED_MEAN,
        std=SHIPPED_STD,
        embed_dim=SHIPPED_ARCH["embed_dim"],
    )
    return _freeze(model), info


def _create_timm(name: str, weights: Optional[str], pretrained: bool) -> tuple[nn.Module, BackboneInfo]:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        family = "_".join(arch.split("_")[:2])
        close = timm.list_models(f"{family}*")[:8] or timm.list_models(f"{arch.split('_')[0]}_*")[:8]
        raise BackboneError(
            f"unknown backbone {name!r}: timm has no model {arch!r}"
            + (f"; similar names: {', '.join(close)}" if close else "")
            + f"; the offline default is {SHIPPED_NAME}"
        )
    if pretrained and "." not in name and weights is None:
        raise BackboneError(
            f"backbone {name!r} has no pretrained tag; use the full timm name, e.g. "
            f"{arch}.augreg_in21k (the same name means different weights in different repos)"
        )
    try:
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise BackboneError(f"weights file {weights!r} does not exist; pass an existing file")
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path))
            )
        else:
            if pretrained and not hub_reachable():
                raise BackboneError(
                    f"cannot download the weights of {name!r}: the Hugging Face hub is not reachable "
                    f"(offline); download them elsewhere and pass backbone.weights=/path/to/model.safetensors "
                    f"(or use the offline default {SHIPPED_NAME})"
                )
            model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except BackboneError:
        raise
    except Exception as exc:
        if weights is None and pretrained:
            raise BackboneError(
                f"cannot download the weights of {name!r} ({type(exc).__name__}); without internet, "
                f"download them elsewhere and pass backbone.weights=/path/to/model.safetensors "
                f"(or use the offline default {SHIPPED_NAME})"
            ) from exc
        raise BackboneError(f"cannot build backbone {name!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"backbone {name!r} is a {type(model).__name__}; duallora needs a timm VisionTransformer"
        )
    cfg = model.pretrained_cfg or {}
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    mean = tuple(float(m) for m in cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(s) for s in cfg.get("std", (0.5, 0.5, 0.5)))
    if weights is not None:
        sha, sha_of, wpath = file_sha256(weights), "file", str(weights)
    else:
        sha, sha_of, wpath = state_dict_sha256(model), "state_dict", None
    info = BackboneInfo(
        name=name,
        weights_path=wpath,
        sha256=sha,
        sha256_of=sha_of,
        input_size=input_size,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        embed_dim=int(model.embed_dim),
    )
    return _freeze(model), info


def create_backbone(
    name: str, weights: Optional[str] = None, *, pretrained: bool = True
) -> tuple[nn.Module, BackboneInfo]:
    """Build a frozen ViT backbone without a classifier.

    Args:
        name: ``vit_tiny_patch7_28.duallora_mnist`` (shipped) or a timm model name with its tag.
        weights: local weights file (.safetensors or .pth); skips any download.
        pretrained: False builds random weights (tests and smoke runs only).

    Returns:
        ``(model, info)``: the frozen ``VisionTransformer`` (``model.forward_features(x)`` maps
        ``(B, C, H, W)`` images to ``(B, N, D)`` tokens) and its :class:`BackboneInfo`.

    Raises:
        BackboneError: unknown name, missing/unreadable weights, or weights that cannot be
            downloaded (with how to supply a local file).
    """
    if name == SHIPPED_NAME:
        if not pretrained:
            model = build_shipped_architecture()
            info = BackboneInfo(
                name=SHIPPED_NAME + "(random)",
                weights_path=None,
                sha256=state_dict_sha256(model),
                sha256_of="state_dict",
                input_size=(1, 28, 28),
                mean=SHIPPED_MEAN,
                std=SHIPPED_STD,
                embed_dim=SHIPPED_ARCH["embed_dim"],
            )
            return _freeze(model), info
        return _create_shipped(weights)
    return _create_timm(name, weights, pretrained)


def shipped_record() -> dict[str, Any]:
    """The JSON record written by ``duallora pretrain`` for the shipped weights ({} if absent)."""
    if SHIPPED_RECORD.is_file():
        return json.loads(SHIPPED_RECORD.read_text())
    return {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether weights can be fetched from the Hugging Face hub (fail fast instead of ~50 s of retries).

    False when ``HF_HUB_OFFLINE`` is set; True when a proxy is configured (it is then up to the proxy);
    otherwise a TCP connection to the hub's endpoint (``HF_ENDPOINT``) decides.
    """
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
