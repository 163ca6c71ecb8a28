"""``load_dataset``: one split of any registered data source, with what every dataset shares.

The data sources (``data.dataset`` names) are registered in :mod:`duallora.data.registry` by the
modules of :mod:`duallora.data.sources`: ``mnist``, ``fashion-mnist`` (IDX files), ``imagefolder``
(class folders), the paper family's benchmarks ``cifar100``, ``imagenet-r``, ``imagenet-a``,
``domainnet``, ``cub200`` (lazy, timm transforms, split records; :mod:`duallora.data.benchmarks`)
and ``tiny-imagenet`` (zip or folder). :func:`load_dataset` finds the source by name, refuses
options it does not take, lets it read the split and then applies, to any source:

1. ``classes``: only the listed classes, relabelled ``0..len - 1`` in the list's order
   (:mod:`duallora.data.selection`);
2. ``validation_fraction``: a seeded per-class share of the training images held out as the
   ``"validation"`` split (never in ``"train"``);
3. ``split_sha256``: the split files read must have these sha256;
4. ``augment``: training augmentation of the ``"train"`` split (sources that do not augment
   themselves are wrapped in :class:`~duallora.data.transforms.AugmentedDataset`).

This module also re-exports the names other modules import from it (datasets, image helpers, the
IDX and image-folder loaders' constants).
"""

from __future__ import annotations

from typing import Any, Optional

from duallora.data.base import (  # noqa: F401 (re-exported)
    DOWNLOAD_DIR,
    HIGH_BIT_MODES,
    IMAGE_EXTENSIONS,
    MAX_PRECONVERT_BYTES,
    ImageDataset,
    SelectedDataset,
    TensorImageDataset,
    check_image_files,
    check_size,
    convert_images,
    pil_to_8bit,
)
from duallora.data.registry import DataSource, LoadRequest, get_source, source_names
from duallora.data.selection import carve_validation, note_classes, restrict_classes
from duallora.data.sources.idx import (  # noqa: F401 (re-exported; the private names for tests/test_budget.py)
    _IDX_FILES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SYSTEM_DIR,
    MNIST_CLASSES,
    _find_idx,
    _locate_idx,
    read_idx,
)
from duallora.data.sources.imagefolder import ImageFolderDataset  # noqa: F401 (re-exported)
from duallora.data.splits import as_list, check_split_sha256, split_files  # noqa: F401 (split_files re-exported)
from duallora.data.transforms import AugmentedDataset, default_transform_config
from duallora.errors import DataError

#: Every ``data.dataset`` name registered when this module was imported (the built-in sources), in
#: registration order; :func:`~duallora.data.registry.source_names` also lists sources registered later.
DATASETS: tuple[str, ...] = source_names()
#: The paper family's benchmarks (``DataSource.benchmark``: timm transforms, ``data.crop_pct``).
BENCHMARK_DATASETS: tuple[str, ...] = tuple(n for n in DATASETS if get_source(n).benchmark)
#: Datasets whose split can be given by ``data.split_train`` / ``data.split_test``.
SPLIT_FILE_DATASETS: tuple[str, ...] = tuple(n for n in DATASETS if get_source(n).split_lists)
#: The real benchmarks' counts and layouts (:class:`~duallora.data.benchmarks.BenchmarkSpec`) by name.
BENCHMARKS = {n: get_source(n).spec for n in BENCHMARK_DATASETS}
#: The splits :func:`load_dataset` serves (``"validation"`` needs ``validation_fraction > 0``).
SPLITS = ("train", "validation", "test")


def _names_with(flag: str) -> str:
    return ", ".join(n for n in source_names() if getattr(get_source(n), flag))


def _check_options(source: DataSource, split: str, test_fraction: float, split_train: list[str],
                   split_test: list[str], split_sha256: Any, validation_fraction: float) -> None:
    """Refuse options the source does not take, and out-of-range values (:func:`load_dataset`)."""
    name = source.name
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train', 'validation' or 'test'")
    if source.uses_test_fraction and not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must lie in (0, 1)")
    if (split_train or split_test) and not source.split_lists:
        raise DataError(f"{name}: split lists (data.split_train/split_test) are not used by this dataset (only by "
                        f"{_names_with('split_lists')}); remove them")
    if bool(split_train) != bool(split_test):
        raise DataError(f"{name}: give both data.split_train and data.split_test, or neither")
    if as_list(split_sha256) and not source.split_files:
        raise DataError(f"{name}: data.split_sha256 pins split files, but this dataset reads none (only "
                        f"{_names_with('split_files')} do); remove it")
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction} must lie in [0, 1) (0 = no validation split)")
    if split == "validation" and not validation_fraction:
        raise DataError("the validation split needs validation_fraction > 0 (data.validation_fraction: the share "
                        "of each class's training images held out)")


def load_dataset(
    name: str,
    split: str,
    *,
    root: Optional[str] = None,
    image_size: tuple[int, int] = (28, 28),
    channels: int = 1,
    seed: int = 0,
    test_fraction: float = 0.2,
    split_train: Any = None,
    split_test: Any = None,
    split_sha256: Any = None,
    transform: Any = None,
    augment: bool = False,
    check_images: bool = True,
    classes: Any = None,
    validation_fraction: float = 0.0,
) -> ImageDataset:
    """Load one split of a dataset.

    Args:
        name: a registered source (:func:`~duallora.data.registry.source_names`; case-insensitive).
        split: ``"train"``, ``"validation"`` (with ``validation_fraction``) or ``"test"``.
        root: data folder (or file); None = the source's default local files, where it has them.
        image_size: ``(H, W)`` of the returned images.
        channels: 1 (grayscale) or 3 (RGB).
        seed: the run seed: the per-class test split of sources that draw one (imagefolder without
            train/test folders, imagenet-r/imagenet-a without split lists) and the validation split.
        test_fraction: those sources' held-out share per class, in (0, 1).
        split_train, split_test: split list files (sources with ``split_lists``: imagenet-r,
            imagenet-a, domainnet), both or neither.
        split_sha256: expected sha256 of every split file read, in the order of the record's
            ``split.files`` (sources with ``split_files``); a mismatch is an error.
        transform: a :class:`~duallora.data.transforms.TransformConfig` (the backbone's interpolation and
            crop); benchmarks only, None = bilinear resize at ``image_size``.
        augment: training augmentation (random resized crop + flip) for the ``train`` split; the
            benchmarks augment the full-resolution image, the other datasets their resized image.
        check_images: sources that read image files: check every file up front with
            :func:`~duallora.data.base.check_image_files`, so that an empty or corrupt file is an
            error before training rather than when training reaches it.
        classes: ``data.classes``: None (all), a named class list, or a list of class names, class
            ids (e.g. WordNet ids) or label ids; the label ids become ``0..len - 1`` in its order.
        validation_fraction: ``data.validation_fraction``: per class, this share of the training
            images is the ``"validation"`` split and left out of ``"train"``; 0 = none.

    Returns:
        An :class:`ImageDataset` whose items are ``(uint8 (channels, H, W), int label)``; its
        ``split`` attribute is ``split``.

    Raises:
        DataError: unknown name or split, options the source does not take, missing files (with
            where they were looked for and how to supply them), unknown classes (named), a sha256
            mismatch, or (``check_images``) image files that are empty or unreadable.
    """
    source = get_source(name)
    tr, te = as_list(split_train), as_list(split_test)
    _check_options(source, split, test_fraction, tr, te, split_sha256, validation_fraction)
    size = check_size(image_size, channels)
    req = LoadRequest(split="test" if split == "test" else "train", root=root, image_size=size, channels=channels,
                      seed=seed, test_fraction=test_fraction, split_train=tuple(tr), split_test=tuple(te),
                      transform=transform, augment=bool(augment) and split == "train" and source.augments,
                      check_images=check_images, classes=classes if source.selects_classes else None)
    dataset = source.load(req)
    check_split_sha256(source.name, getattr(dataset, "split_info", None), split_sha256)
    if classes is not None:
        dataset = note_classes(dataset, classes) if source.selects_classes else restrict_classes(dataset, classes)
    if validation_fraction and split != "test":
        dataset = carve_validation(dataset, split, validation_fraction, seed)
    if augment and split == "train" and not source.augments:
        tc = transform if transform is not None else default_transform_config(size, channels)
        dataset = AugmentedDataset(dataset, tc)
    dataset.split = split
    return dataset
