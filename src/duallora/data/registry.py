"""The registry of data sources (``data.dataset`` names) and of named class lists (``data.classes``).

A data source is a :class:`DataSource` subclass registered under its ``data.dataset`` name::

    from duallora.data.registry import DataSource, LoadRequest, StandIn, register_source

    @register_source("my-data")
    class MyData(DataSource):
        def load(self, req: LoadRequest) -> ImageDataset:
            ...  # read req.split ("train" or "test") from req.root at req.image_size, req.channels

        def standin(self, folder: Path) -> StandIn:
            ...  # write a tiny copy in the source's layout (the registry-driven tests load it)

:func:`~duallora.data.datasets.load_dataset` finds the source by name, checks the options against its
capabilities (the class attributes below), calls :meth:`DataSource.load`, and applies what every
dataset shares: the class restriction (``data.classes``), the validation split
(``data.validation_fraction``), training augmentation and the split-file pins (``data.split_sha256``).
The config's ``data.dataset`` choices are :func:`source_names`; built-in sources are registered when
:mod:`duallora.data` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from duallora.data.base import ImageDataset
from duallora.data.transforms import TransformConfig
from duallora.errors import DataError


@dataclass(frozen=True)
class LoadRequest:
    """What :meth:`DataSource.load` is asked for (checked by ``load_dataset`` against the source's capabilities).

    Attributes:
        split: ``"train"`` or ``"test"`` (the validation split is carved from ``"train"`` by ``load_dataset``).
        root: the data folder or file (``data.root``); None = the source's default location, if any.
        image_size: ``(H, W)`` of the returned images; channels: 1 or 3.
        seed: the run seed (seeded splits of sources that draw their own test split).
        test_fraction: held-out share per class of such sources (``uses_test_fraction``).
        split_train, split_test: split list files (``split_lists`` sources; empty otherwise).
        transform: the backbone's transform settings (``benchmark`` sources), or None.
        augment: apply training augmentation (only ever True for ``split="train"`` of ``augments`` sources).
        check_images: check every image file up front (sources that read image files).
        classes: ``data.classes`` (``selects_classes`` sources only; None otherwise).
    """

    split: str
    root: Optional[str] = None
    image_size: tuple[int, int] = (28, 28)
    channels: int = 1
    seed: int = 0
    test_fraction: float = 0.2
    split_train: tuple[str, ...] = ()
    split_test: tuple[str, ...] = ()
    transform: Optional[TransformConfig] = None
    augment: bool = False
    check_images: bool = True
    classes: Any = None


@dataclass
class StandIn:
    """A tiny copy of a source's data, written by :meth:`DataSource.standin`, and what loading it gives.

    Attributes:
        root: the ``data.root`` to load it from.
        num_classes: classes of both splits.
        train, test: images in each split (with the default ``test_fraction`` 0.2 and seed 0).
        options: further ``load_dataset`` keyword arguments it needs (e.g. split lists).
    """

    root: Path
    num_classes: int
    train: int
    test: int
    options: dict[str, Any] = field(default_factory=dict)


class DataSource:
    """One ``data.dataset``: how to read it, and what it takes.

    Capabilities (class attributes; ``load_dataset`` and the config refuse options a source does not take):
        benchmark: one of the paper family's benchmarks: items go through the backbone's timm
            transform (``data.crop_pct``), training augmentation is applied to the full-resolution
            image by the source itself, counts are compared with the real dataset's.
        augments: :meth:`load` applies training augmentation itself (else ``load_dataset`` wraps
            the training split in :class:`~duallora.data.transforms.AugmentedDataset`).
        split_lists: takes split list files (``data.split_train`` / ``data.split_test``).
        split_files: records the split files it reads (``split_info["files"]`` with sha256), so that
            ``data.split_sha256`` can pin them.
        uses_test_fraction: draws its test split per class with ``data.test_fraction``.
        selects_classes: :meth:`load` applies ``data.classes`` itself (e.g. reads only those
            classes); else ``load_dataset`` restricts the loaded dataset.
        description: one line for listings.
    """

    name: str = ""
    description: str = ""
    benchmark: bool = False
    augments: bool = False
    split_lists: bool = False
    split_files: bool = False
    uses_test_fraction: bool = False
    selects_classes: bool = False

    def load(self, req: LoadRequest) -> ImageDataset:  # pragma: no cover - abstract
        """One split (``req.split``) as an :class:`ImageDataset` at ``req.image_size`` and ``req.channels``.

        Raises:
            DataError: missing or malformed data, naming what was expected and where.
        """
        raise NotImplementedError

    def standin(self, folder: Path) -> StandIn:
        """Write a tiny copy of the data in the source's own layout under ``folder`` (for the tests)."""
        raise NotImplementedError(f"data source {self.name!r} has no stand-in; implement DataSource.standin")


_SOURCES: dict[str, DataSource] = {}
S = TypeVar("S", bound=type)


def register_source(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`DataSource` subclass (an instance of it) as ``data.dataset=name``.

    Raises:
        ValueError: a name that is empty or not lowercase, one already registered, or a class that
            is not a :class:`DataSource`.
    """
    if not name or name != name.strip().lower():
        raise ValueError(f"data source name {name!r} must be a non-empty lowercase name")

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, DataSource)):
            raise ValueError(f"register_source({name!r}) decorates a DataSource subclass, not {cls!r}")
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} is already registered ({type(_SOURCES[name]).__name__})")
        source = cls()
        source.name = name
        _SOURCES[name] = source
        return cls

    return decorate


def unregister_source(name: str) -> None:
    """Remove a registered source (no error when it is not registered)."""
    _SOURCES.pop(name, None)


def source_names() -> tuple[str, ...]:
    """Every registered ``data.dataset`` name, in registration order."""
    return tuple(_SOURCES)


def get_source(name: str) -> DataSource:
    """The source registered as ``name`` (case-insensitive).

    Raises:
        DataError: no such source (lists the registered ones).
    """
    key = name.lower() if isinstance(name, str) else name
    source = _SOURCES.get(key)
    if source is None:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(_SOURCES)}")
    return source


# ---------------------------------------------------------------------------------- class lists


_CLASS_LISTS: dict[str, tuple[str, ...]] = {}


def register_class_list(name: str, classes: tuple[str, ...] | list[str]) -> None:
    """Make ``data.classes=name`` stand for ``classes`` (class names or ids, in label order).

    Raises:
        ValueError: the name is taken by another list.
    """
    chosen = tuple(str(c) for c in classes)
    if _CLASS_LISTS.get(name, chosen) != chosen:
        raise ValueError(f"class list {name!r} is already registered with other classes")
    _CLASS_LISTS[name] = chosen


def class_list_names() -> tuple[str, ...]:
    """Every named class list, in registration order."""
    return tuple(_CLASS_LISTS)


def class_list(name: str) -> tuple[str, ...]:
    """The classes of a named list.

    Raises:
        DataError: no list of that name (lists the known ones).
    """
    if name not in _CLASS_LISTS:
        raise DataError(
            f"unknown class list {name!r}; use one of {', '.join(_CLASS_LISTS) or '(none registered)'} "
            "or a list of class names or ids"
        )
    return _CLASS_LISTS[name]
