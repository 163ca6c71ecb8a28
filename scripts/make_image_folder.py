"""Write a dataset duallora can read as an image folder of the kind users bring: ``OUT/train/<class>/*.png``
and ``OUT/test/<class>/*.png``, a few training images per class.

The small-data case of issue 13 ("about 16 training images per class, 20 or more classes per task"), built
from Tiny-ImageNet's continual half (the classes the shipped Tiny-ImageNet backbone never saw)::

    python scripts/make_image_folder.py runs/ti-small --train-per-class 16 \\
        data.dataset=tiny-imagenet data.root=PATH/tiny-imagenet-200-32px.zip data.classes=tiny-imagenet-continual
    duallora run data.dataset=imagefolder data.root=runs/ti-small data.num_tasks=5 \\
        backbone.name=vit_tiny_patch4_32.duallora_tinyimagenet100

Any ``data.*`` key of a run config selects the source (dataset, root, classes). The training images of a
class are a seeded random choice (``--seed``) of its training split; the test images are the first
``--test-per-class`` of its test split (all by default). Class folders are named after the dataset's
class names (made file-system safe, the class id appended where two names collide). The folder is written
to ``OUT.partial`` and renamed to ``OUT`` when complete; an existing ``OUT`` is never touched (error).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from duallora.config import load_config
from duallora.data.datasets import load_dataset
from duallora.errors import DualLoRAError


def safe_names(names: list[str]) -> list[str]:
    """File-system-safe, unique folder names (a name's later duplicates get ``-<index>``)."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or f"class_{i}"
        candidate = base if base not in seen else f"{base}-{i}"
        seen.add(candidate)
        out.append(candidate)
    return out


def write_split(dataset, folder: Path, names: list[str], per_class: int | None, seed: int | None) -> int:
    """Write up to ``per_class`` images of each class of ``dataset`` as PNG files; returns the count."""
    targets = np.asarray([int(dataset.targets[i]) for i in range(len(dataset))])
    rng = np.random.default_rng(seed) if seed is not None else None
    written = 0
    for label, name in enumerate(names):
        idx = np.flatnonzero(targets == label)
        if rng is not None:
            idx = rng.permutation(idx)
        if per_class is not None:
            idx = idx[:per_class]
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(idx):
            image = dataset[int(i)][0]
            arr = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            mode = "L" if arr.shape[2] == 1 else "RGB"
            Image.fromarray(arr.squeeze(2) if mode == "L" else arr, mode).save(folder / name / f"{k:04d}.png")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the folder to create (must not exist)")
    parser.add_argument("--train-per-class", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=None, help="default: every test image")
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of training images")
    parser.add_argument("--image-size", type=int, default=32, help="side of the written (square) images, pixels")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--config", default=None, help="a run config whose data section selects the source")
    parser.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.dataset=tiny-imagenet")
    args = parser.parse_intermixed_args(argv)
    if args.output.exists():
        print(f"error: {args.output} exists; choose a new folder (nothing there is changed)", file=sys.stderr)
        return 2
    if args.train_per_class < 1:
        print("error: --train-per-class must be at least 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        d = cfg.data
        kw = dict(root=d.root, image_size=(args.image_size, args.image_size), channels=args.channels,
                  seed=cfg.seed, test_fraction=d.test_fraction,
                  check_images=d.check_images, split_train=d.split_train, split_test=d.split_test,
                  split_sha256=d.split_sha256, transform=None, augment=False, classes=d.classes,
                  validation_fraction=0.0)
        train = load_dataset(d.dataset, "train", **kw)
        test = load_dataset(d.dataset, "test", **kw)
    except DualLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = safe_names(list(train.classes))
    stage = args.output.with_name(args.output.name + ".partial")
    if stage.exists():
        print(f"error: {stage} exists (an interrupted earlier call?); remove it or choose another output",
              file=sys.stderr)
        return 2
    try:
        n_train = write_split(train, stage / "train", names, args.train_per_class, args.seed)
        n_test = write_split(test, stage / "test", names, args.test_per_class, None)
        os.replace(stage, args.output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # only what this call created
        raise
    print(f"wrote {args.output}: {len(names)} classes, {n_train} training and {n_test} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
