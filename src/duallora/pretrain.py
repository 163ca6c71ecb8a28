"""Pre-train the shipped offline backbone ``vit_tiny_patch7_28.duallora_mnist`` on MNIST.

The recipe (also in docs/pretraining.md) that produced ``src/duallora/weights/``:

* architecture: :func:`duallora.backbones.build_shipped_architecture` (timm ``VisionTransformer``,
  28x28x1 input, patch 7, width 192, depth 6, 3 heads, class token) plus a linear head
  ``nn.Linear(192, 10)`` on the class-token features;
* data: MNIST train (60k) / test (10k) at 28x28x1, pixels ``(x / 255 - 0.1307) / 0.3081``;
* augmentation: each training image shifted by a random integer translation in ``[-2, 2]`` pixels
  per axis (zero fill);
* optimiser: AdamW (lr 1e-3, weight decay 0.05, betas (0.9, 0.999)), batch 128, linear warm-up over
  the first 5% of steps then cosine decay to 0 (per step), cross-entropy, 4 epochs, seed 0;
* output: the backbone's state dict (no head) in float16 as ``.safetensors`` plus a ``.json`` record
  with the measured test accuracy (of the float16 weights) and the file's sha256.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from duallora import backbones
from duallora.errors import TrainingError
from duallora.pretraining import atomic_write

WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05
MAX_SHIFT = 2


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 1, 28, 28)`` -> float32 normalised with the shipped MNIST mean/std."""
    mean = torch.tensor(backbones.SHIPPED_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(backbones.SHIPPED_STD).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean) / std


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of ``x`` ``(B, C, H, W)`` by its own random integer offset.

    Offsets are drawn uniformly from ``[-max_shift, max_shift]`` per axis; vacated pixels are 0.

    Returns:
        A tensor of the same shape and dtype.
    """
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows, cols]


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbones.SHIPPED_ARCH["embed_dim"]), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(x)  # (B, 1 + 16, 192)
        pooled = self.backbone.forward_head(feats, pre_logits=True)  # (B, 192) class token
        return self.head(pooled)


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for s in range(0, images.shape[0], batch):
        logits = model(_normalise(images[s : s + batch]))
        correct += int((logits.argmax(dim=1) == targets[s : s + batch]).sum())
    return 100.0 * correct / max(1, images.shape[0])


def _subset(dataset: Any, per_class: Optional[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or at most ``per_class`` per class, seeded) images ``(N,1,28,28)`` and targets ``(N,)``."""
    images, targets = dataset.images, dataset.targets
    if per_class is None:
        return images, targets
    idx = []
    gen = torch.Generator().manual_seed(seed)
    for c in range(len(dataset.classes)):
        members = torch.nonzero(targets == c).flatten()
        pick = members[torch.randperm(members.numel(), generator=gen)[:per_class]]
        idx.append(pick.sort().values)
    sel = torch.cat(idx).sort().values
    return images[sel], targets[sel]


def pretrain(
    output: Path | str,
    *,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    train_per_class: Optional[int] = None,
    test_per_class: Optional[int] = None,
    threads: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pre-train the shipped backbone on MNIST and write its weights and record.

    Recipe: see the module docstring. Regenerate the shipped weights with
    ``duallora pretrain --output src/duallora/weights/vit_tiny_patch7_28_mnist.safetensors
    --epochs 4 --seed 0`` (about 2 minutes per epoch on 2 CPU cores).

    Args:
        output: ``.safetensors`` file to write (parent folders are created); the record goes to
            ``output.with_suffix(".json")``. Both are written atomically (temp file + rename).
        epochs, batch_size, lr, seed: optimisation settings; the result is deterministic given
            ``seed`` (and the torch build / thread count).
        train_per_class, test_per_class: use at most this many MNIST images per class (seeded),
            for quick tests; None = all 60k / 10k.
        threads: torch CPU threads (``torch.set_num_threads``); None = torch default.
        progress: show tqdm progress bars.

    Returns:
        The record written to the JSON file: ``name``, ``architecture``, ``data``, ``epochs``,
        ``batch_size``, ``lr``, ``seed``, ``test_accuracy`` (percent, of the float16 weights),
        ``sha256`` (of the .safetensors file), ``torch_version``, ``timm_version``,
        ``wall_time_s``, ``dtype`` (plus ``weight_decay``, ``warmup_fraction``, ``max_shift``,
        ``train_images``, ``test_images``, ``final_train_loss``).

    Raises:
        DataError: MNIST files not found (see :func:`duallora.data.load_dataset`).
        TrainingError: a non-finite loss, or epochs/batch_size/lr out of range.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise TrainingError(f"epochs={epochs}, batch_size={batch_size} must be >= 1 and lr={lr} > 0")
    output = Path(output)
    start = time.time()
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = _load_mnist(train_per_class, test_per_class, seed)

    model = _Classifier(backbones.build_shipped_architecture())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    sched = _warmup_cosine(opt, epochs * steps_per_epoch)
    last_loss = float("nan")
    for epoch in range(epochs):
        last_loss = _train_epoch(model, opt, sched, x_train, y_train, gen, batch_size=batch_size, epoch=epoch,
                                 epochs=epochs, progress=progress)
        if progress:
            print(f"pretrain epoch {epoch + 1}/{epochs}: train loss {last_loss:.4f}", flush=True)

    state16, acc = _float16_weights_and_accuracy(model, x_test, y_test)
    _save_weights(output, state16)
    full = train_per_class is None and test_per_class is None
    record = _record(output, full=full, train_images=int(x_train.shape[0]), test_images=int(x_test.shape[0]),
                     epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, last_loss=last_loss, acc=acc,
                     start=start)
    json_path = output.with_suffix(".json")
    atomic_write(json_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    if progress:
        print(f"pretrain: test accuracy {acc:.2f}% -> {output} (sha256 {record['sha256'][:12]}...)")
    return record


def _load_mnist(train_per_class: Optional[int], test_per_class: Optional[int],
                seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """MNIST train and test images ``(N, 1, 28, 28)`` uint8 and targets, each capped per class
    (:func:`_subset`, seeded with ``seed`` and ``seed + 1``).

    Raises:
        DataError: MNIST files not found.
    """
    from duallora.data.datasets import load_dataset

    train_ds = load_dataset("mnist", "train", image_size=(28, 28), channels=1)
    test_ds = load_dataset("mnist", "test", image_size=(28, 28), channels=1)
    return _subset(train_ds, train_per_class, seed), _subset(test_ds, test_per_class, seed + 1)


def _warmup_cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over ``total`` steps: linear warm-up over the first :data:`WARMUP_FRACTION`,
    then cosine decay to 0."""
    warmup = max(1, int(WARMUP_FRACTION * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                 x_train: torch.Tensor, y_train: torch.Tensor, gen: torch.Generator, *, batch_size: int,
                 epoch: int, epochs: int, progress: bool) -> float:
    """One epoch over the shuffled training images (random shifts, cross-entropy, one scheduler step per
    batch); returns the running (exponentially smoothed) training loss at its end.

    Raises:
        TrainingError: a non-finite loss.
    """
    from tqdm.auto import tqdm

    model.train()
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    perm = torch.randperm(x_train.shape[0], generator=gen)
    bar = tqdm(
        range(steps_per_epoch), desc=f"pretrain epoch {epoch + 1}/{epochs}", disable=not progress,
        leave=False,
    )
    running = 0.0
    for i in bar:
        idx = perm[i * batch_size : (i + 1) * batch_size]
        x = random_translate(x_train[idx], MAX_SHIFT, gen)
        loss = F.cross_entropy(model(_normalise(x)), y_train[idx])
        if not torch.isfinite(loss):
            raise TrainingError(
                f"pretraining loss became {loss.item()} at epoch {epoch + 1}, step {i}; "
                "lower --lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
        if i % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    return running


def _float16_weights_and_accuracy(model: _Classifier, x_test: torch.Tensor,
                                  y_test: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """The backbone's state dict in float16 and the test accuracy of exactly those (shipped) weights:
    the model's backbone is loaded with them rounded back to float32."""
    state16 = {k: v.detach().to(torch.float16).contiguous() for k, v in model.backbone.state_dict().items()}
    model.backbone.load_state_dict({k: v.float() for k, v in state16.items()})
    return state16, _accuracy(model, x_test, y_test)


def _save_weights(output: Path, state16: dict[str, torch.Tensor]) -> None:
    """Write the float16 state dict as ``.safetensors`` (named in its metadata), atomically."""
    from safetensors.torch import save_file

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        output, lambda p: save_file(state16, str(p), metadata={"name": backbones.SHIPPED_NAME})
    )


def _record(output: Path, *, full: bool, train_images: int, test_images: int, epochs: int, batch_size: int,
            lr: float, seed: int, last_loss: float, acc: float, start: float) -> dict[str, Any]:
    """The ``.json`` record of the written weights (see :func:`pretrain`'s Returns)."""
    import timm

    return {
        "name": backbones.SHIPPED_NAME,
        "architecture": dict(backbones.SHIPPED_ARCH),
        "data": "MNIST train 60k / test 10k"
        if full
        else f"MNIST subset: train {train_images} / test {test_images}",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": WEIGHT_DECAY,
        "warmup_fraction": WARMUP_FRACTION,
        "max_shift": MAX_SHIFT,
        "seed": seed,
        "train_images": train_images,
        "test_images": test_images,
        "final_train_loss": round(last_loss, 5),
        "test_accuracy": round(acc, 2),
        "sha256": backbones.file_sha256(output),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(time.time() - start, 1),
        "dtype": "float16",
    }
