"""Pre-train a timm ``VisionTransformer`` from scratch on any data source and class list.

This is how the project makes its offline stand-ins for ImageNet pre-training (docs/pretraining.md).
The recipe is the usual one for ViTs trained from scratch on small data (DeiT, Touvron et al. 2021;
"How to train your ViT", Steiner et al. 2022), scaled to a CPU:

* batched, device-side augmentation (:func:`augment_batch`): random-resized crop (scale and aspect
  ratio ranges), horizontal flip, optional RandAugment (torchvision, per image) and optional
  mixup / cutmix (timm's :class:`timm.data.Mixup`);
* AdamW, linear warm-up over the first ``warmup_epochs`` then cosine decay to 0 (per step), label
  smoothing, stochastic depth (``drop_path``);
* ``train.device``-style device choice (``auto``: CUDA, then MPS, then CPU) and bf16/fp16 autocast;
* a checkpoint after every epoch (weights, optimizer, schedule position, RNG state), so a killed run
  resumes where it stopped and ends with the same weights as an uninterrupted one (tested);
* the output: the backbone's state dict in float16 (``.safetensors``, no head) and a ``.json`` record
  (recipe, data and its sha256, class list, top-1 per epoch on the held-out images, wall time, the
  file's sha256), both written atomically.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from duallora.devices import select_device
from duallora.errors import TrainingError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_VERSION = 1


@dataclass
class PretrainRecipe:
    """Everything that determines a pre-training run (recorded in the output's JSON).

    Attributes:
        name: the backbone's full name, ``<architecture>.<tag>`` (e.g.
            ``vit_tiny_patch4_32.duallora_tinyimagenet100``).
        dataset, root, classes: the data source (:func:`duallora.data.datasets.load_dataset` name),
            its files, and the class list (a named list such as ``tiny-imagenet-pretrain`` or ids).
        image_size, channels, patch_size, embed_dim, depth, num_heads, mlp_ratio: the timm
            ``VisionTransformer`` (square input of ``image_size`` pixels).
        epochs, batch_size, lr, weight_decay, warmup_epochs, label_smoothing, drop_path: optimisation.
        crop_scale, crop_ratio: random-resized crop ranges (area fraction; aspect ratio).
        flip: random horizontal flip with probability 0.5.
        randaugment: torchvision RandAugment ``(num_ops, magnitude)`` per image, or None.
        mixup, cutmix: timm Mixup alphas (0 = off).
        mean, std: input normalisation of images in [0, 1].
        seed: seeds the initialisation, the batch order and every augmentation draw.
        train_per_class, test_per_class: caps per class (quick runs); None = all.
        init_from: None (random initialisation), or a backbone ``.safetensors`` file (its ``.json``
            record beside it, as this function writes) whose weights start the run: a further
            warm-up + cosine cycle of ``epochs`` epochs over an earlier run (a warm restart, Loshchilov
            & Hutter 2017). The classifier head starts anew (backbone files hold no head); the output
            record keeps the earlier run's record under ``"continues"`` and sums the epochs and wall times.
    """

    name: str = "vit_tiny_patch4_32.duallora_tinyimagenet100"
    dataset: str = "tiny-imagenet"
    root: Optional[str] = None
    classes: Any = "tiny-imagenet-pretrain"
    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment: Optional[tuple[int, int]] = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    seed: int = 0
    train_per_class: Optional[int] = None
    test_per_class: Optional[int] = None
    init_from: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def architecture(self) -> dict[str, Any]:
        """timm ``VisionTransformer`` keyword arguments (without ``drop_path_rate``)."""
        return dict(
            img_size=self.image_size, patch_size=self.patch_size, in_chans=self.channels,
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        )

    def validate(self) -> None:
        """Raise :class:`TrainingError` naming the first setting out of range."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a finite number > 0"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must lie in [0, epochs]"),
            (0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)"),
            (0 <= self.drop_path < 1, "drop_path must lie in [0, 1)"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale must satisfy 0 < lo <= hi <= 1"),
            (0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio must satisfy 0 < lo <= hi"),
            (self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"),
            (self.embed_dim % self.num_heads == 0, "embed_dim must be a multiple of num_heads"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
            (self.train_per_class is None or self.train_per_class >= 1, "train_per_class must be >= 1 or null"),
            (self.test_per_class is None or self.test_per_class >= 1, "test_per_class must be >= 1 or null"),
            (self.init_from is None or Path(self.init_from).is_file(),
             f"init_from={self.init_from!r} is not a file; give a backbone .safetensors file or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(f"pretraining recipe: {message}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("crop_scale", "crop_ratio", "randaugment", "mean", "std"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


def recipe_from_settings(settings: list[str], base: Optional[PretrainRecipe] = None) -> PretrainRecipe:
    """A recipe from ``key=value`` settings over ``base`` (default: :class:`PretrainRecipe`'s defaults).

    Values are read as YAML (``epochs=20``, ``crop_scale=[0.35,1.0]``, ``randaugment=[2,9]``,
    ``classes=null``); lists become tuples where the field is a tuple.

    Raises:
        TrainingError: a setting without ``=``, an unknown key (the message lists the keys), or a
            value of the wrong kind.
    """
    import dataclasses

    import yaml

    values = (base or PretrainRecipe()).to_dict()
    names = [f.name for f in dataclasses.fields(PretrainRecipe)]
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep:
            raise TrainingError(f"pretraining setting {item!r} is not key=value (keys: {', '.join(names)})")
        if key not in names:
            raise TrainingError(f"unknown pretraining setting {key!r}; the recipe's keys are {', '.join(names)}")
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise TrainingError(f"pretraining setting {item!r}: cannot read the value ({exc})") from exc
    for key in ("crop_scale", "crop_ratio", "randaugment", "mean", "std"):
        if isinstance(values[key], list):
            values[key] = tuple(values[key])
    values = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return PretrainRecipe(**values)
    except TypeError as exc:
        raise TrainingError(f"pretraining settings: {exc}") from exc


_NUMERIC_KEYS = {f.name: type(f.default) for f in __import__("dataclasses").fields(PretrainRecipe)
                 if type(f.default) in (int, float) and not isinstance(f.default, bool)}


def _coerce(key: str, value: Any) -> Any:
    """``value`` as the number the recipe field ``key`` holds (YAML reads ``5e-4`` as a string).

    Raises:
        TrainingError: a numeric field given something that is not a finite number of its kind.
    """
    kind = _NUMERIC_KEYS.get(key)
    if kind is None or value is None:
        return value
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (kind is int and number != int(number)):
        wanted = "an integer" if kind is int else "a finite number"
        raise TrainingError(f"pretraining setting {key}={value!r}: expected {wanted}")
    return int(number) if kind is int else number


# ------------------------------------------------------------------------------------ augmentation


def augment_batch(
    images: torch.Tensor,
    recipe: PretrainRecipe,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random-resized crop and horizontal flip of a batch, as one ``grid_sample`` call.

    Args:
        images: float ``(B, C, H, W)`` (any device).
        recipe: its ``crop_scale``, ``crop_ratio``, ``flip`` and ``image_size`` are used.
        generator: a CPU generator; all random draws come from it (deterministic given its state).

    Returns:
        float ``(B, C, S, S)`` with ``S = recipe.image_size``: each image's crop (area fraction in
        ``crop_scale``, aspect ratio in ``crop_ratio``, log-uniform, clipped to the image) resized
        bilinearly, mirrored with probability 0.5 when ``flip``.
    """
    b = images.shape[0]
    lo, hi = recipe.crop_scale
    area = lo + (hi - lo) * torch.rand(b, generator=generator)
    log_r = torch.empty(b).uniform_(math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]), generator=generator)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the full width / height
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=generator) - 1)  # centre in [-(1-w), 1-w]
    cy = (1 - h) * (2 * torch.rand(b, generator=generator) - 1)
    sx = w.clone()
    if recipe.flip:
        sx = torch.where(torch.rand(b, generator=generator) < 0.5, -sx, sx)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(images.device, images.dtype)
    size = (b, images.shape[1], recipe.image_size, recipe.image_size)
    grid = F.affine_grid(theta, size, align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _randaugment(images: torch.Tensor, ops: tuple[int, int], seed: int) -> torch.Tensor:
    """torchvision RandAugment on each ``uint8`` image of ``(B, C, H, W)`` (seeded per batch)."""
    from torchvision.transforms import v2

    aug = v2.RandAugment(num_ops=int(ops[0]), magnitude=int(ops[1]))
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return torch.stack([aug(img) for img in images])
    finally:
        torch.set_rng_state(state)


# ------------------------------------------------------------------------------------------ model


class _Classifier(nn.Module):
    """A backbone plus a linear head on its pooled (class-token) features."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.embed_dim), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True))


def build_vit(recipe: PretrainRecipe, drop_path: float = 0.0) -> nn.Module:
    """The timm ``VisionTransformer`` of ``recipe`` with no classifier head (``num_classes=0``)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, drop_path_rate=drop_path, **recipe.architecture())


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise TrainingError(f"precision={precision!r}; use fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=dtype)


def _normalise(x: torch.Tensor, recipe: PretrainRecipe) -> torch.Tensor:
    mean = torch.tensor(recipe.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(recipe.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def evaluate_top1(model: nn.Module, dataset: Any, recipe: PretrainRecipe, device: torch.device,
                  precision: str = "fp32", batch: int = 500) -> float:
    """Top-1 accuracy (percent) of ``model`` on every image of ``dataset`` (no augmentation)."""
    model.eval()
    images, targets = dataset.images, dataset.targets
    correct = 0
    for s in range(0, images.shape[0], batch):
        x = _normalise(images[s : s + batch].to(device).float() / 255.0, recipe)
        with _autocast(device, precision):
            logits = model(x)
        correct += int((logits.float().argmax(1).cpu() == targets[s : s + batch]).sum())
    return 100.0 * correct / max(1, images.shape[0])


# ------------------------------------------------------------------------------------ checkpoints


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` into a temporary file beside it, then rename.

    The file is made readable by everyone (safetensors creates 0600 files; shipped weights must be
    readable); the temporary file never remains, also when ``write`` fails."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def checkpoint_path(output: Path) -> Path:
    """Where a run writing ``output`` keeps its resumable checkpoint: ``<output>.checkpoint.pt``."""
    return output.with_name(output.name + ".checkpoint.pt")


def _cap_per_class(dataset: Any, cap: int, seed: int) -> Any:
    """At most ``cap`` items per class of an in-memory dataset (a seeded draw, kept in item order)."""
    from duallora.data.datasets import TensorImageDataset

    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(len(dataset.classes)):
        members = torch.nonzero(dataset.targets == c).flatten()
        keep.append(members[torch.randperm(members.numel(), generator=gen)[:cap]])
    idx = torch.cat(keep).sort().values
    out = TensorImageDataset(dataset.images[idx], dataset.targets[idx], dataset.classes, name=dataset.name,
                             source=dataset.source)
    if hasattr(dataset, "wnids"):
        out.wnids = dataset.wnids
    return out


def _load_data(recipe: PretrainRecipe) -> tuple[Any, Any]:
    """The recipe's training and test splits as in-memory datasets at ``image_size``."""
    size = (recipe.image_size, recipe.image_size)
    if recipe.dataset == "tiny-imagenet":
        from duallora.data.sources.tiny_imagenet import load_tiny_imagenet

        if recipe.root is None:
            raise TrainingError("tiny-imagenet needs its archive or folder: add the recipe setting root=PATH "
                                "(e.g. root=../shared/data/tiny-imagenet-200-32px.zip)")
        kw = dict(classes=recipe.classes, image_size=size, channels=recipe.channels)
        train = load_tiny_imagenet("train", recipe.root, **kw)
        test = load_tiny_imagenet("test", recipe.root, **kw)
    else:
        from duallora.data.datasets import load_dataset

        train = load_dataset(recipe.dataset, "train", root=recipe.root, image_size=size, channels=recipe.channels)
        test = load_dataset(recipe.dataset, "test", root=recipe.root, image_size=size, channels=recipe.channels)
    if recipe.train_per_class is not None:
        train = _cap_per_class(train, recipe.train_per_class, recipe.seed)
    if recipe.test_per_class is not None:
        test = _cap_per_class(test, recipe.test_per_class, recipe.seed + 1)
    return train, test


def pretrain_vit(
    recipe: PretrainRecipe,
    output: Path | str,
    *,
    device: str = "auto",
    precision: str = "bf16",
    threads: Optional[int] = None,
    resume: bool = True,
    progress: bool = True,
    stop_after_epoch: Optional[int] = None,
) -> dict[str, Any]:
    """Pre-train ``recipe``'s ViT and write ``output`` (fp16 safetensors) and its ``.json`` record.

    Args:
        recipe: the run's settings (validated first).
        output: the ``.safetensors`` file; the record goes to ``output.with_suffix(".json")`` and the
            per-epoch checkpoint to :func:`checkpoint_path`.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the forward passes.
        threads: torch CPU threads; None = torch's default.
        resume: continue from the checkpoint beside ``output`` when its recipe equals ``recipe``.
        progress: a tqdm bar per epoch and one line per epoch.
        stop_after_epoch: stop (checkpoint written, no weights) after this epoch: for tests of resume.

    Returns:
        The JSON record (``name``, ``architecture``, ``recipe``, ``data``, ``data_sha256``,
        ``classes``, ``top1`` (percent, of the float16 weights, on the test split of the classes),
        ``top1_per_epoch``, ``train_loss_per_epoch``, ``wall_time_s`` (summed over resumed sessions),
        ``sha256``, ``dtype``, versions, ``device``, ``precision``, ``threads``), or for a stopped run
        ``{"stopped_after_epoch": N}``.

    Raises:
        TrainingError: a bad recipe, a non-finite loss, or a checkpoint of another recipe.
        DataError: the data cannot be read.
    """
    import timm
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    recipe.validate()
    output = Path(output)
    if threads is not None:
        torch.set_num_threads(int(threads))
    dev = select_device(device)
    train, test = _load_data(recipe)
    torch.manual_seed(recipe.seed)
    model = _Classifier(build_vit(recipe, recipe.drop_path), len(train.classes)).to(dev)
    earlier = _load_init(model.backbone, recipe) if recipe.init_from is not None else None
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    n = len(train)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warmup = int(recipe.warmup_epochs * steps_per_epoch)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    mixer = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        from timm.data import Mixup

        mixer = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                      label_smoothing=recipe.label_smoothing, num_classes=len(train.classes))
    state: dict[str, Any] = {"epoch": 0, "top1": [], "loss": [], "wall": 0.0}
    ckpt = checkpoint_path(output)
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        held = {k: v for k, v in saved.get("recipe", {}).items() if k != "root"}  # the data may have moved
        given = {k: v for k, v in recipe.to_dict().items() if k != "root"}
        if held != given:
            diff = ", ".join(f"{k}: checkpoint {held.get(k)!r}, given {given.get(k)!r}"
                             for k in sorted(set(held) | set(given)) if held.get(k) != given.get(k))
            raise TrainingError(
                f"{ckpt} belongs to another recipe ({diff}); run with the recipe it holds, or delete it to start over"
            )
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        if progress:
            print(f"pretrain: resuming after epoch {state['epoch']} from {ckpt}", flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    images, targets = train.images, train.targets
    for epoch in range(state["epoch"], recipe.epochs):
        t0 = time.time()
        model.train()
        gen = torch.Generator().manual_seed(recipe.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"pretrain epoch {epoch + 1}/{recipe.epochs}",
                   disable=not progress, leave=False, mininterval=5)
        running = 0.0
        for i in bar:
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            x8 = images[idx]
            if recipe.randaugment is not None:
                x8 = _randaugment(x8, recipe.randaugment, int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            x = augment_batch(x8.to(dev).float() / 255.0, recipe, gen)
            x = _normalise(x, recipe)
            y = targets[idx].to(dev)
            if mixer is not None:
                x, y_soft = mixer(x, y)
            with _autocast(dev, precision):
                logits = model(x)
            if mixer is not None:
                loss = torch.sum(-y_soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"pretraining loss became {loss.item()} at epoch {epoch + 1}, step {i}; lower the lr "
                    f"(now {recipe.lr}) and start over (delete {ckpt})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
            if i % 20 == 0:
                bar.set_postfix(loss=f"{running:.3f}")
        top1 = evaluate_top1(model, test, recipe, dev, precision)
        state["epoch"] = epoch + 1
        state["top1"].append(round(top1, 2))
        state["loss"].append(round(running, 4))
        state["wall"] += time.time() - t0
        atomic_write(ckpt, lambda p: torch.save(
            {"version": CHECKPOINT_VERSION, "recipe": recipe.to_dict(), "model": model.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "state": state}, p))
        if progress:
            print(f"pretrain epoch {epoch + 1}/{recipe.epochs}: train loss {running:.4f}, top-1 {top1:.2f}% "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < recipe.epochs:
            return {"stopped_after_epoch": epoch + 1}

    state16 = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.backbone.state_dict().items()}
    model.backbone.load_state_dict({k: v.float() for k, v in state16.items()})
    top1 = evaluate_top1(model, test, recipe, dev, "fp32")
    atomic_write(output, lambda p: save_file(state16, str(p), metadata={"name": recipe.name}))
    from duallora.backbones import file_sha256

    record: dict[str, Any] = {
        "name": recipe.name,
        "architecture": recipe.architecture(),
        "recipe": recipe.to_dict(),
        "data": f"{recipe.dataset}: {len(train)} training / {len(test)} test images of {len(train.classes)} classes",
        "data_sha256": _data_sha256(recipe),
        "classes": list(getattr(train, "wnids", train.classes)),
        "class_names": list(train.classes),
        "mean": list(recipe.mean),
        "std": list(recipe.std),
        "epochs": recipe.epochs,
        "top1": round(top1, 2),
        "top1_per_epoch": state["top1"],
        "train_loss_per_epoch": state["loss"],
        "wall_time_s": round(state["wall"], 1),
        "sha256": file_sha256(output),
        "dtype": "float16",
        "device": str(dev),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }
    if earlier is not None:
        record["cycle_epochs"] = recipe.epochs
        record["cycle_wall_time_s"] = record["wall_time_s"]
        record["epochs"] = recipe.epochs + int(earlier.get("epochs", 0))
        record["wall_time_s"] = round(record["wall_time_s"] + float(earlier.get("wall_time_s", 0.0)), 1)
        record["continues"] = {k: v for k, v in earlier.items() if k not in ("classes", "class_names")}
    atomic_write(output.with_suffix(".json"), lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    ckpt.unlink(missing_ok=True)
    if progress:
        print(f"pretrain: top-1 {top1:.2f}% -> {output} (sha256 {record['sha256'][:12]}...)", flush=True)
    return record


def _load_init(backbone: nn.Module, recipe: PretrainRecipe) -> dict[str, Any]:
    """Load ``recipe.init_from``'s weights into ``backbone``; return the earlier run's JSON record.

    Raises:
        TrainingError: the file's tensors do not fit the recipe's architecture, or its record is
            missing or of another architecture.
    """
    from safetensors.torch import load_file

    path = Path(str(recipe.init_from))
    rec_path = path.with_suffix(".json")
    if not rec_path.is_file():
        raise TrainingError(f"init_from: {path} has no record {rec_path} beside it (written by duallora pretrain)")
    earlier = json.loads(rec_path.read_text())
    if earlier.get("architecture") != recipe.architecture():
        raise TrainingError(
            f"init_from: {path} is a {earlier.get('architecture')} backbone, the recipe builds "
            f"{recipe.architecture()}; set the recipe's image_size/patch_size/embed_dim/depth/num_heads to match"
        )
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise TrainingError(f"init_from: {path} does not fit the recipe's architecture ({exc})") from exc
    return earlier


def _data_sha256(recipe: PretrainRecipe) -> Optional[str]:
    if recipe.dataset == "tiny-imagenet" and recipe.root is not None:
        from duallora.data.sources.tiny_imagenet import archive_sha256

        return archive_sha256(recipe.root)
    return None
