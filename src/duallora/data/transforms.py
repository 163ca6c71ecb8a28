"""Input transforms from the backbone's own timm data config, returning ``uint8`` images.

The contract of every dataset in this package holds here too: an item is a ``uint8`` tensor
``(C, H, W)`` at the backbone's input size; the model normalises (``mean``/``std`` of the backbone),
never the data pipeline. The transforms are timm's own (``timm.data.create_transform`` with
``use_prefetcher=True``, which ends in ``MaybePILToTensor`` instead of ``ToTensor + Normalize``):

* evaluation (and training without augmentation): resize the shorter side to
  ``size / crop_pct`` with the backbone's interpolation, then centre-crop ``size``;
* training with ``augment=True``: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))``
  with the backbone's interpolation and a horizontal flip (p = 0.5); no colour jitter.

``interpolation`` and ``crop_pct`` come from the backbone's timm pretrained config
(``vit_base_patch16_224.augreg_in21k``: bicubic, crop_pct 0.9, i.e. resize 248 then crop 224);
``crop_pct`` can be overridden (``data.crop_pct``; 0.875 = the papers' ``Resize(256) + CenterCrop(224)``,
1.0 = InfLoRA's CIFAR-100 ``Resize(224)``). Backbones timm does not know (the shipped
``vit_tiny_patch7_28.duallora_mnist``) use bilinear and crop_pct 1.0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from duallora.data.base import ImageDataset
from duallora.errors import DataError

#: Interpolation and crop used when the backbone has no timm pretrained config.
DEFAULT_INTERPOLATION = "bilinear"
DEFAULT_CROP_PCT = 1.0
#: Scale range of the training RandomResizedCrop (timm's and torchvision's default).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class TransformConfig:
    """How images become backbone inputs.

    Attributes:
        input_size: ``(channels, height, width)`` of the backbone.
        interpolation: PIL interpolation name (``bilinear``, ``bicubic``, ...).
        crop_pct: evaluation centre-crop fraction (resize the shorter side to ``size / crop_pct``).
        mean, std: the backbone's normalisation (applied by the model; recorded here for reference).
        source: where the values came from (``timm pretrained_cfg of NAME`` or ``default``).
    """

    input_size: tuple[int, int, int]
    interpolation: str = DEFAULT_INTERPOLATION
    crop_pct: float = DEFAULT_CROP_PCT
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    source: str = "default"

    @property
    def channels(self) -> int:
        return int(self.input_size[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.input_size[1]), int(self.input_size[2])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


def default_transform_config(image_size: Sequence[int], channels: int) -> TransformConfig:
    """Bilinear, crop_pct 1.0 at ``image_size`` (for callers without a backbone name)."""
    h, w = (int(s) for s in image_size)
    return TransformConfig(input_size=(int(channels), h, w))


def resolve_transform_config(
    backbone_name: str,
    input_size: Sequence[int],
    *,
    crop_pct: Optional[float] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> TransformConfig:
    """The transform settings of a backbone, from timm's pretrained config where timm knows it.

    Args:
        backbone_name: full timm name with tag (``vit_base_patch16_224.augreg_in21k``) or any other
            name (then the defaults: bilinear, crop_pct 1.0).
        input_size: ``(C, H, W)`` the backbone expects (from :class:`~duallora.backbones.BackboneInfo`).
        crop_pct: overrides the evaluation crop fraction, in (0, 1].
        mean, std: the backbone's normalisation (recorded only).

    Raises:
        DataError: ``crop_pct`` outside (0, 1].
    """
    c, h, w = (int(s) for s in input_size)
    interpolation, pct, source = DEFAULT_INTERPOLATION, DEFAULT_CROP_PCT, "default"
    try:
        import timm.models
        from timm.data import resolve_data_config

        pcfg = timm.models.get_pretrained_cfg(backbone_name)
        if pcfg is None and "." in backbone_name:
            pcfg = timm.models.get_pretrained_cfg(backbone_name.split(".")[0])
    except Exception:  # unknown names raise in some timm versions
        pcfg = None
    if pcfg is not None:
        data_cfg = resolve_data_config({}, pretrained_cfg=pcfg.to_dict())
        interpolation = str(data_cfg.get("interpolation") or DEFAULT_INTERPOLATION)
        pct = float(data_cfg.get("crop_pct") or DEFAULT_CROP_PCT)
        source = f"timm pretrained_cfg of {backbone_name}"
    if crop_pct is not None:
        if not 0.0 < float(crop_pct) <= 1.0:
            raise DataError(f"crop_pct={crop_pct} must lie in (0, 1]")
        pct = float(crop_pct)
        source += f", crop_pct={pct} from the config"
    return TransformConfig(
        input_size=(c, h, w),
        interpolation=interpolation,
        crop_pct=pct,
        mean=tuple(float(m) for m in (mean if mean is not None else (0.5,) * c)),
        std=tuple(float(s) for s in (std if std is not None else (0.5,) * c)),
        source=source,
    )


def build_transform(tc: TransformConfig, *, augment: bool) -> Callable[[Any], torch.Tensor]:
    """A timm transform from a PIL image (mode ``L`` or ``RGB``) to ``uint8 (C, H, W)``.

    Args:
        tc: the settings.
        augment: random resized crop + horizontal flip (training); else resize + centre crop.
    """
    from timm.data import create_transform

    return create_transform(
        input_size=tc.input_size,
        is_training=augment,
        scale=RRC_SCALE,
        ratio=RRC_RATIO,
        hflip=0.5,
        color_jitter=None,
        interpolation=tc.interpolation,
        crop_pct=tc.crop_pct,
        mean=tc.mean,
        std=tc.std,
        use_prefetcher=True,  # ends in MaybePILToTensor: uint8, no normalisation
    )


def describe_transform(transform: Any) -> list[str]:
    """One line per step of a (Compose) transform, for the run record."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return [repr(transform)]
    return [repr(t) for t in steps]


def to_uint8_chw(x: Any, channels: int, image_size: tuple[int, int], what: str) -> torch.Tensor:
    """Check a transform's output: a ``uint8`` tensor ``(channels, H, W)``."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dtype != torch.uint8 or tuple(x.shape) != (channels, *image_size):
        raise DataError(
            f"{what}: the transform produced {x.dtype} {tuple(x.shape)}, expected uint8 "
            f"{(channels, *image_size)}"
        )
    return x


class AugmentedDataset(ImageDataset):
    """Training augmentation on top of any :class:`ImageDataset` (its uint8 output -> PIL -> timm).

    Used for the datasets that resize in their own loader (mnist, fashion-mnist, imagefolder); the
    benchmark datasets augment the full-resolution image instead. Exposes the base's ``targets``,
    ``classes``, ``image_size``, ``channels``, ``name`` and ``source``.
    """

    def __init__(self, base: ImageDataset, tc: TransformConfig) -> None:
        self.base = base
        self._tc = tc
        self.targets = base.targets
        self.classes = base.classes
        self.class_ids = base.class_ids
        self.image_size = base.image_size
        self.channels = base.channels
        self.name = base.name
        self.source = base.source
        self.split = base.split
        tc = TransformConfig(
            input_size=(base.channels, *base.image_size), interpolation=tc.interpolation,
            crop_pct=1.0, mean=tc.mean, std=tc.std, source=tc.source,
        )
        self.transform = build_transform(tc, augment=True)
        self.transform_info = {
            "augment": True,
            "applied_to": "the loader's resized uint8 image",
            "steps": describe_transform(self.transform),
        }
        for key in ("split_info",):
            if hasattr(base, key):
                setattr(self, key, getattr(base, key))

    def select(self, indices: Sequence[int], targets: Optional[Sequence[int]] = None,
               classes: Optional[Sequence[str]] = None, class_ids: Optional[Sequence[str]] = None) -> ImageDataset:
        """The base's selection (:meth:`ImageDataset.select`), augmented the same way."""
        return AugmentedDataset(self.base.select(indices, targets, classes, class_ids), self._tc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.functional import to_pil_image

        img, label = self.base[index]
        out = self.transform(to_pil_image(img))
        return to_uint8_chw(out, self.channels, self.image_size, f"{self.name} item {index}"), label
