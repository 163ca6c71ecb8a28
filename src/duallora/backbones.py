"""Frozen pre-trained Vision Transformer backbones.

Two kinds of backbone:

* Any timm ``VisionTransformer`` by its full name with the pretrained tag, e.g.
  ``vit_base_patch16_224.augreg_in21k`` (field-lessons.md, lesson 1). Weights come from a local file
  (``weights=PATH``, .safetensors or .pth) or, where the network allows, from the Hugging Face hub.
* The project's own shipped backbones (:data:`SHIPPED`, docs/pretraining.md): the offline default
  ``vit_tiny_patch7_28.duallora_mnist`` (28x28x1 input, patch 7, width 192, depth 6, 3 heads,
  pre-trained on MNIST) and the natural-image ``vit_tiny_patch4_32.duallora_tinyimagenet100``
  (32x32x3, patch 4, pre-trained on the pre-training half of Tiny-ImageNet), both small timm
  ``VisionTransformer`` models shipped inside the package.

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

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ShippedBackbone:
    """A backbone this project pre-trained and ships inside the package (docs/pretraining.md).

    Attributes:
        name: full name ``<architecture>.<tag>``.
        weights: the float16 ``.safetensors`` file (state dict of a timm ``VisionTransformer``, no head).
        record: the JSON record written beside it by the pre-training run.
        arch: timm ``VisionTransformer`` keyword arguments.
        mean, std: per-channel input normalisation of images in [0, 1].
    """

    name: str
    weights: Path
    record: Path
    arch: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]


#: The shipped backbones by name: adding one is one entry here plus its two files in ``weights/``.
SHIPPED: dict[str, ShippedBackbone] = {
    b.name: b
    for b in (
        ShippedBackbone(
            "vit_tiny_patch7_28.duallora_mnist", WEIGHTS_DIR / "vit_tiny_patch7_28_mnist.safetensors",
            WEIGHTS_DIR / "vit_tiny_patch7_28_mnist.json",
            dict(img_size=28, patch_size=7, in_chans=1, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
            (0.1307,), (0.3081,),
        ),
        ShippedBackbone(
            "vit_tiny_patch4_32.duallora_tinyimagenet100",
            WEIGHTS_DIR / "vit_tiny_patch4_32_tinyimagenet100.safetensors",
            WEIGHTS_DIR / "vit_tiny_patch4_32_tinyimagenet100.json",
            dict(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        ),
    )
}

#: The offline default backbone (MNIST-pre-trained) and its files.
SHIPPED_NAME = "vit_tiny_patch7_28.duallora_mnist"
SHIPPED_WEIGHTS = SHIPPED[SHIPPED_NAME].weights
SHIPPED_RECORD = SHIPPED[SHIPPED_NAME].record
#: Architecture of the default shipped backbone (timm ``VisionTransformer`` keyword arguments).
SHIPPED_ARCH: dict[str, Any] = SHIPPED[SHIPPED_NAME].arch
#: Input normalisation of the default shipped backbone (MNIST pixel statistics, values in [0, 1]).
SHIPPED_MEAN = SHIPPED[SHIPPED_NAME].mean
SHIPPED_STD = SHIPPED[SHIPPED_NAME].std
#: The natural-image shipped backbone (pre-trained on the pre-training half of Tiny-ImageNet).
TINY_IMAGENET_NAME = "vit_tiny_patch4_32.duallora_tinyimagenet100"


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


def build_shipped_architecture(name: str = SHIPPED_NAME) -> nn.Module:
    """A shipped backbone's architecture with random weights and no classifier (num_classes=0)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, **SHIPPED[name].arch)


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


def _shipped_info(spec: ShippedBackbone, name: str, weights_path: Optional[str], sha256: str,
                  sha256_of: str) -> BackboneInfo:
    a = spec.arch
    return BackboneInfo(name=name, weights_path=weights_path, sha256=sha256, sha256_of=sha256_of,
                        input_size=(a["in_chans"], a["img_size"], a["img_size"]), mean=spec.mean, std=spec.std,
                        embed_dim=a["embed_dim"])


def _create_shipped(spec: ShippedBackbone, weights: Optional[str]) -> tuple[nn.Module, BackboneInfo]:
    path = Path(weights) if weights else spec.weights
    if weights and not path.is_file():
        raise BackboneError(f"weights file {weights!r} does not exist; pass an existing .safetensors/.pth file")
    if not path.is_file():
        raise BackboneError(
            f"the shipped backbone weights {str(path)!r} are missing; regenerate them with the command in "
            f"docs/pretraining.md for {spec.name} (`duallora pretrain`, with `--recipe vit root=PATH` for "
            "the Tiny-ImageNet one) or pass backbone.weights=PATH"
        )
    model = build_shipped_architecture(spec.name)
    state = {k: v.float() for k, v in _load_state_file(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape: weights of another architecture
        first = " ".join(str(exc).split())[:300]
        raise BackboneError(f"weights file {str(path)!r} does not fit {spec.name} (another architecture?): "
                            f"{first}; pass the weights of this backbone, or its name in backbone.name") from exc
    if missing or unexpected:
        raise BackboneError(
            f"weights file {str(path)!r} does not fit {spec.name}: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return _freeze(model), _shipped_info(spec, spec.name, str(path), file_sha256(path), "file")


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
    if name in SHIPPED:
        spec = SHIPPED[name]
        if not pretrained:
            model = build_shipped_architecture(name)
            return _freeze(model), _shipped_info(spec, name + "(random)", None, state_dict_sha256(model), "state_dict")
        return _create_shipped(spec, weights)
    return _create_timm(name, weights, pretrained)


def shipped_record(name: str = SHIPPED_NAME) -> dict[str, Any]:
    """The JSON record written by ``duallora pretrain`` for a shipped backbone's weights ({} if absent)."""
    path = SHIPPED[name].record
    if path.is_file():
        return json.loads(path.read_text())
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
