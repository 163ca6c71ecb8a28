"""Synthetic data and a tiny random ViT shared by the method and baseline tests."""

import torch
from torch.utils.data import TensorDataset

from duallora.backbones import BackboneInfo, state_dict_sha256

TASKS = [(7, 3), (0, 9), (5, 1)]
#: Training overrides for the tiny synthetic tasks (one thread: a second busy thread on a shared CPU
#: slows torch down 100-fold).
SMALL_TRAINING = [
    "train.progress=false",
    "train.min_steps=0",  # tiny tasks train exactly train.epochs (the budget rule: tests/test_budget.py)
    "train.max_batch_fraction=null",
    "train.epochs=1",
    "train.batch_size=10",
    "train.eval_batch_size=64",
    "train.device=cpu",
    "train.lr=0.01",
    "train.threads=1",
]


def small_backbone(seed: int = 0, dim: int = 32, depth: int = 2):
    """A random timm ViT (28x28x1, patch 7 -> 16 patches + class token), frozen, with its record."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=dim, depth=depth,
                              num_heads=2, num_classes=0)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    info = BackboneInfo(name=f"test_vit_{dim}x{depth}", weights_path=None, sha256=state_dict_sha256(model),
                        sha256_of="state_dict", input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), embed_dim=dim)
    return model, info


def pattern(c: int) -> torch.Tensor:
    """Class ``c``'s template: a fixed random on/off pixel pattern (28, 28), one per class id."""
    g = torch.Generator().manual_seed(1000 + c)
    return (torch.rand(28, 28, generator=g) > 0.5).float()


def make_data(classes, per_class: int, seed: int = 0) -> TensorDataset:
    """uint8 images (N, 1, 28, 28): the class pattern at 200 plus uniform noise in [0, 40)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in classes:
        base = pattern(c) * 200.0
        noise = torch.rand(per_class, 28, 28, generator=g) * 40.0
        xs.append((base + noise).clamp(0, 255).to(torch.uint8).unsqueeze(1))
        ys.append(torch.full((per_class,), c, dtype=torch.long))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def images_of(ds: TensorDataset) -> torch.Tensor:
    """The uint8 images (N, 1, 28, 28) of a synthetic dataset."""
    return ds.tensors[0]
