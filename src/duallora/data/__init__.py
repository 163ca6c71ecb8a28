"""Datasets and class-incremental scenarios.

* :func:`load_dataset` reads MNIST, Fashion-MNIST, an image folder or one of the paper family's
  benchmarks (CIFAR-100, ImageNet-R, ImageNet-A, DomainNet, CUB-200; :mod:`duallora.data.benchmarks`)
  into an :class:`ImageDataset`.
* :class:`ClassIncrementalScenario` cuts a train/test pair into tasks of disjoint classes.
* :mod:`duallora.data.transforms`: the backbone's timm transforms (uint8 output, optional augmentation).
"""

from duallora.data.datasets import (
    BENCHMARK_DATASETS,
    DATASETS,
    ImageDataset,
    ImageFolderDataset,
    TensorImageDataset,
    load_dataset,
)
from duallora.data.scenarios import ClassIncrementalScenario, Task

__all__ = [
    "BENCHMARK_DATASETS",
    "DATASETS",
    "ImageDataset",
    "ImageFolderDataset",
    "TensorImageDataset",
    "load_dataset",
    "ClassIncrementalScenario",
    "Task",
]
