"""Datasets and class-incremental scenarios.

* :func:`load_dataset` reads one split of any registered data source (MNIST, Fashion-MNIST, an image
  folder, the paper family's benchmarks CIFAR-100, ImageNet-R, ImageNet-A, DomainNet, CUB-200, and
  Tiny-ImageNet; :mod:`duallora.data.sources`) into an :class:`ImageDataset`, optionally restricted to
  some classes and with a validation split held out of the training images.
* :func:`register_source` adds a data source (:mod:`duallora.data.registry`).
* :class:`ClassIncrementalScenario` cuts a train/test pair into tasks of disjoint classes;
  :func:`scenario_from_config` builds one from a run's ``data`` config.
* :mod:`duallora.data.transforms`: the backbone's timm transforms (uint8 output, optional augmentation).
"""

from duallora.data.base import ImageDataset, TensorImageDataset
from duallora.data.datasets import BENCHMARK_DATASETS, DATASETS, ImageFolderDataset, load_dataset
from duallora.data.registry import DataSource, LoadRequest, StandIn, get_source, register_source, source_names
from duallora.data.scenarios import ClassIncrementalScenario, Task, scenario_from_config

__all__ = [
    "BENCHMARK_DATASETS",
    "DATASETS",
    "DataSource",
    "ImageDataset",
    "ImageFolderDataset",
    "LoadRequest",
    "StandIn",
    "TensorImageDataset",
    "get_source",
    "load_dataset",
    "register_source",
    "source_names",
    "ClassIncrementalScenario",
    "Task",
    "scenario_from_config",
]
