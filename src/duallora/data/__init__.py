"""Datasets and class-incremental scenarios.

* :func:`load_dataset` reads MNIST, Fashion-MNIST or an image folder into an :class:`ImageDataset`.
* :class:`ClassIncrementalScenario` cuts a train/test pair into tasks of disjoint classes.
"""

from duallora.data.datasets import (
    DATASETS,
    ImageDataset,
    ImageFolderDataset,
    TensorImageDataset,
    load_dataset,
)
from duallora.data.scenarios import ClassIncrementalScenario, Task

__all__ = [
    "DATASETS",
    "ImageDataset",
    "ImageFolderDataset",
    "TensorImageDataset",
    "load_dataset",
    "ClassIncrementalScenario",
    "Task",
]
