"""Tiny stand-ins of the benchmark datasets in their real layouts and split-file formats.

Used by the tests and by ``python benchmarks/standins.py`` (docs/benchmarks.md, "Try every preset
here"): a few 8x8 images per class whose colour encodes the label, so that every loader, split rule,
record and preset runs end to end on a machine without the real data.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from duallora.data.benchmarks import DOMAINNET_DOMAINS


def png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    """Write a one-colour RGB PNG (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def color(label: int, i: int = 0) -> tuple[int, int, int]:
    """The stand-in colour of image ``i`` of class ``label``."""
    return (40 * label + 20, 10 * i, 200 - 40 * label)


def make_cifar(root: Path, n_classes: int = 4, n_train: int = 3, n_test: int = 2) -> Path:
    """torchvision's cifar-100-python layout: train/test/meta pickles; pixel value = f(label)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{c}" for c in range(n_classes)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["all"]}, f)
    for split, per in (("train", n_train), ("test", n_test)):
        labels = [c for c in range(n_classes) for _ in range(per)]
        data = np.stack([np.full(3072, 30 * c + 10, dtype=np.uint8) for c in labels])
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels),
                         "filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": split}, f)
    return root


def make_wnid_folders(root: Path, n_classes: int = 4, per_class: int = 5) -> list[str]:
    """Hendrycks' imagenet-r/imagenet-a layout: ROOT/<wnid>/<style>_<i>.png (+ a README)."""
    wnids = [f"n0{c:07d}" for c in range(1, n_classes + 1)]
    for c, w in enumerate(wnids):
        for i in range(per_class):
            png(root / w / f"art_{i}.png", color(c, i))
    (root / "README.txt").write_text("not an image")
    return wnids


def make_coda_yaml(root: Path, wnids: list[str], out: Path, per_class: int = 5) -> tuple[Path, Path]:
    """CODA-Prompt's imagenet-r_train.yaml / _test.yaml: `data:` paths under data/imagenet-r/{train,test}/,
    `targets:` labels that are NOT the sorted-folder order (here reversed)."""
    data = {"train": [], "test": []}
    targets = {"train": [], "test": []}
    for c, w in enumerate(wnids):
        label = len(wnids) - 1 - c
        for i in range(per_class):
            split = "test" if i == 0 else "train"
            folder = "test" if i % 2 else "train"  # CODA's paths mix both folder names in one list
            data[split].append(f"data/imagenet-r/{folder}/{w}/art_{i}.png")
            targets[split].append(label)
    files = []
    for split in ("train", "test"):
        p = out / f"imagenet-r_{split}.yaml"
        p.write_text(yaml.safe_dump({"data": data[split], "targets": targets[split]}, default_flow_style=False))
        files.append(p)
    return files[0], files[1]


def make_domainnet(root: Path, n_classes: int = 3, n_train: int = 2, n_test: int = 1,
                   domains: tuple[str, ...] = DOMAINNET_DOMAINS) -> list[str]:
    """DomainNet: ROOT/<domain>/<class>/<domain>_<c>_<i>.png and ROOT/<domain>_{train,test}.txt."""
    classes = ["aircraft_carrier", "airplane", "zebra", "The_Eiffel_Tower"][:n_classes]
    label_of = {c: i for i, c in enumerate(sorted(classes, key=str.lower))}  # DomainNet: alphabetical ids
    for d in domains:
        for split, rng in (("train", range(n_train)), ("test", range(n_train, n_train + n_test))):
            lines = []
            for c in classes:
                for i in rng:
                    rel = f"{d}/{c}/{d}_{label_of[c]:03d}_{i:06d}.png"
                    png(root / rel, color(label_of[c], i))
                    lines.append(f"{rel} {label_of[c]}")
            (root / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
    return classes


def make_cub(root: Path, n_classes: int = 4, per_class: int = 4) -> Path:
    """CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}."""
    folder = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    img_id = 1
    for c in range(1, n_classes + 1):
        name = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {name}")
        for i in range(per_class):
            rel = f"{name}/Bird_{c}_{i:04d}.png"
            png(folder / "images" / rel, color(c - 1, i))
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c}")
            split.append(f"{img_id} {1 if i % 2 == 0 else 0}")
            img_id += 1
    for name, lines in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                        ("classes", classes)):
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder
