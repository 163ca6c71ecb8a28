"""Class-incremental scenarios: a dataset's classes cut into equal tasks of disjoint classes.

Vocabulary:

* **label id**: the dataset's own label (``dataset.targets``), an index into ``dataset.classes``.
* **class order**: the label ids in the order they are learned.
* **position** (global output index): a label's index in the class order; task ``t`` owns
  positions ``[t * classes_per_task, (t + 1) * classes_per_task)``.
* **local index**: position minus the task's offset, i.e. the index within the task's head.

:func:`scenario_from_config` builds the scenario of a run's ``data`` config (every data key, and the
``data.evaluate_on`` split as the test side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from duallora.data.base import ImageDataset
from duallora.data.datasets import load_dataset
from duallora.errors import DataError


@dataclass(frozen=True)
class Task:
    """One task of a scenario.

    Attributes:
        index: task index ``t`` (0-based).
        classes: dataset label ids of this task, in class order.
        offset: position of its first class in the class order (its first global output index).
    """

    index: int
    classes: tuple[int, ...]
    offset: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _valid_choices(key: str, n: int) -> str:
    """``"num_tasks must divide the 10 classes: choose one of 1, 2, 5, 10"`` (every valid value, listed)."""
    return f"{key} must divide the {n} classes: choose one of {', '.join(str(d) for d in _divisors(n))}"


def _as_long(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.long()
    return torch.as_tensor(np.asarray(values), dtype=torch.int64)


def _cap_indices(indices: np.ndarray, cap: Optional[int], seed: int, split_code: int, label: int) -> list[int]:
    """At most ``cap`` of ``indices`` (sorted), chosen with a generator seeded by (seed, split, label)."""
    if cap is None or len(indices) <= cap:
        return sorted(int(i) for i in indices)
    rng = np.random.default_rng([seed, split_code, label])
    chosen = rng.choice(len(indices), size=cap, replace=False)
    return sorted(int(indices[i]) for i in chosen)


def _indices_per_class(targets: torch.Tensor, num_classes: int) -> list[np.ndarray]:
    t = targets.cpu().numpy().astype(np.int64)
    order = np.argsort(t, kind="stable")
    counts = np.bincount(t, minlength=num_classes)
    return list(np.split(order, np.cumsum(counts)[:-1]))


class ClassIncrementalScenario:
    """A train/test dataset pair cut into ``num_tasks`` tasks with equal numbers of classes.

    Args:
        train, test: datasets with the same ``classes``.
        num_tasks: number of tasks; or give ``classes_per_task`` (both: they must agree).
        classes_per_task: classes in each task.
        seed: seeds the class-order shuffle and the per-class caps.
        class_order: explicit class order (a permutation of ``range(len(train.classes))``).
        shuffle_classes: without ``class_order``: True = ``numpy.random.default_rng(seed).permutation``,
            False = natural order ``0, 1, ...``.
        train_per_class, test_per_class: keep at most this many images per class, chosen with a
            generator seeded by ``(seed, split, label id)`` (same seed, same subset), sorted by index.

    Attributes:
        class_order: label ids in learning order.
        tasks: the :class:`Task` list.
        num_classes, num_tasks, classes_per_task: sizes.

    Raises:
        DataError: neither or disagreeing ``num_tasks``/``classes_per_task``, more tasks than classes,
            classes not divisible into equal tasks, a ``class_order`` that is not a permutation of
            the label ids, train/test with different classes, or a task with a class that has no
            train or no test images.
    """

    def __init__(
        self,
        train: ImageDataset,
        test: ImageDataset,
        *,
        num_tasks: Optional[int] = None,
        classes_per_task: Optional[int] = None,
        seed: int = 0,
        class_order: Optional[Sequence[int]] = None,
        shuffle_classes: bool = True,
        train_per_class: Optional[int] = None,
        test_per_class: Optional[int] = None,
    ) -> None:
        if list(train.classes) != list(test.classes):
            raise DataError(
                f"train and test datasets have different classes ({len(train.classes)} vs "
                f"{len(test.classes)} names, or in another order); load both splits of one dataset"
            )
        self.train = train
        self.test = test
        self.seed = int(seed)
        self.shuffle_classes = bool(shuffle_classes)
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        n = len(train.classes)
        self.num_classes = n
        self.num_tasks, self.classes_per_task = self._resolve_sizes(n, num_tasks, classes_per_task)
        for key, cap in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
            if cap is not None and cap < 1:
                raise DataError(f"{key}={cap} must be >= 1 (or None for all images)")

        if class_order is not None:
            self.class_order = self._check_order(list(class_order), n)
        elif shuffle_classes:
            self.class_order = [int(c) for c in np.random.default_rng(self.seed).permutation(n)]
        else:
            self.class_order = list(range(n))

        cpt = self.classes_per_task
        self.tasks = [
            Task(index=t, classes=tuple(self.class_order[t * cpt : (t + 1) * cpt]), offset=t * cpt)
            for t in range(self.num_tasks)
        ]
        self._position = torch.empty(n, dtype=torch.int64)
        self._position[torch.tensor(self.class_order, dtype=torch.int64)] = torch.arange(n)
        self._order = torch.tensor(self.class_order, dtype=torch.int64)
        self._train_idx, self._test_idx = self._task_indices()

    def _task_indices(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per task, the (capped) indices into ``train`` and ``test``; every class must have images in both."""
        train_pc = _indices_per_class(self.train.targets, self.num_classes)
        test_pc = _indices_per_class(self.test.targets, self.num_classes)
        train_idx: list[list[int]] = []
        test_idx: list[list[int]] = []
        for task in self.tasks:
            for split, per_class in (("train", train_pc), (getattr(self.test, "split", None) or "test", test_pc)):
                empty = [c for c in task.classes if len(per_class[c]) == 0]
                if empty:
                    names = [self.train.classes[c] for c in empty]
                    raise DataError(
                        f"task {task.index} (classes {list(task.classes)}) has no {split} images of "
                        f"class {empty} {names}; every class needs train and test images (check the "
                        "data folder, or data.test_fraction for an imagefolder without train/test "
                        "folders, or data.validation_fraction: a class needs at least 2 images to be split)"
                    )
            train_idx.append(sorted(
                i for c in task.classes for i in _cap_indices(train_pc[c], self.train_per_class, self.seed, 0, c)
            ))
            test_idx.append(sorted(
                i for c in task.classes for i in _cap_indices(test_pc[c], self.test_per_class, self.seed, 1, c)
            ))
        return train_idx, test_idx

    # ------------------------------------------------------------------------------ validation

    @staticmethod
    def _resolve_sizes(n: int, num_tasks: Optional[int], cpt: Optional[int]) -> tuple[int, int]:
        if num_tasks is None and cpt is None:
            raise DataError("set num_tasks or classes_per_task")
        if num_tasks is not None and num_tasks < 1:
            raise DataError(f"num_tasks={num_tasks} must be >= 1")
        if cpt is not None and cpt < 1:
            raise DataError(f"classes_per_task={cpt} must be >= 1")
        if num_tasks is not None and cpt is not None and num_tasks * cpt != n:
            raise DataError(
                f"num_tasks={num_tasks} and classes_per_task={cpt} disagree: the dataset has {n} "
                f"classes, not {num_tasks * cpt}; set only one of them"
            )
        if num_tasks is not None:
            if num_tasks > n:
                raise DataError(
                    f"num_tasks={num_tasks} is more than the {n} classes; each task needs at least one "
                    f"class, and {_valid_choices('num_tasks', n)}"
                )
            if n % num_tasks:
                raise DataError(
                    f"{n} classes cannot be split into {num_tasks} equal tasks; "
                    f"{_valid_choices('num_tasks', n)}"
                )
            return num_tasks, n // num_tasks
        assert cpt is not None
        if cpt > n:
            raise DataError(
                f"classes_per_task={cpt} is more than the {n} classes; {_valid_choices('classes_per_task', n)}"
            )
        if n % cpt:
            raise DataError(
                f"{n} classes cannot be split into tasks of {cpt} classes; "
                f"{_valid_choices('classes_per_task', n)}"
            )
        return n // cpt, cpt

    @staticmethod
    def _check_order(order: list[Any], n: int) -> list[int]:
        try:
            ints = [int(c) for c in order]
        except (TypeError, ValueError) as exc:
            raise DataError(f"class_order={order!r} must be a list of integer label ids") from exc
        if any(i != c for i, c in zip(ints, order)):
            raise DataError(f"class_order={order!r} must be a list of integer label ids")
        unknown = sorted({c for c in ints if not 0 <= c < n})
        dup = sorted({c for c in ints if ints.count(c) > 1})
        missing = sorted(set(range(n)) - set(ints))
        if unknown or dup or missing:
            parts = []
            if unknown:
                parts.append(f"unknown ids {unknown}")
            if dup:
                parts.append(f"duplicate ids {dup}")
            if missing:
                parts.append(f"missing ids {missing}")
            raise DataError(
                f"class_order must be a permutation of the label ids 0..{n - 1}: "
                + ", ".join(parts)
            )
        return ints

    def _check_task(self, t: int) -> int:
        t = int(t)
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task {t} does not exist; tasks are 0..{self.num_tasks - 1}")
        return t

    def _check_labels(self, labels: torch.Tensor, what: str) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(
                f"{what} must lie in [0, {self.num_classes}); got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    # -------------------------------------------------------------------------------- mappings

    def position_of(self, labels: Any) -> torch.Tensor:
        """Dataset label ids -> positions in the class order (global output indices).

        Args:
            labels: int64 tensor (any shape, any device), array, list or int.

        Returns:
            int64 tensor of the same shape and device.

        Raises:
            DataError: a label id outside ``[0, num_classes)``.
        """
        lab = _as_long(labels)
        self._check_labels(lab, "label ids")
        return self._position.to(lab.device)[lab]

    def task_of(self, labels: Any) -> torch.Tensor:
        """Dataset label ids -> index of the task that owns them (same shape, int64)."""
        return torch.div(self.position_of(labels), self.classes_per_task, rounding_mode="floor")

    def local_index(self, labels: Any) -> torch.Tensor:
        """Dataset label ids -> index within their task's head (position - task offset)."""
        return self.position_of(labels) % self.classes_per_task

    def label_of_position(self, positions: Any) -> torch.Tensor:
        """Positions in the class order -> dataset label ids (inverse of :meth:`position_of`).

        Raises:
            DataError: a position outside ``[0, num_classes)``.
        """
        pos = _as_long(positions)
        self._check_labels(pos, "positions")
        return self._order.to(pos.device)[pos]

    @property
    def class_names(self) -> list[str]:
        """Class names in class order."""
        return [self.train.classes[c] for c in self.class_order]

    # -------------------------------------------------------------------------------- datasets

    def train_indices(self, t: int) -> list[int]:
        """Indices into ``train`` of task ``t``'s images (after caps), ascending."""
        return list(self._train_idx[self._check_task(t)])

    def test_indices(self, t: int) -> list[int]:
        """Indices into ``test`` of task ``t``'s images (after caps), ascending."""
        return list(self._test_idx[self._check_task(t)])

    def train_dataset(self, t: int) -> Dataset:
        """Train images of task ``t``: a ``Subset`` yielding ``(uint8 (C,H,W), label id)``."""
        return Subset(self.train, self.train_indices(t))

    def test_dataset(self, t: int) -> Dataset:
        """Test images of task ``t``: a ``Subset`` yielding ``(uint8 (C,H,W), label id)``."""
        return Subset(self.test, self.test_indices(t))

    def seen_test_dataset(self, t: int) -> Dataset:
        """Test images of tasks ``0..t`` mixed, ascending by index (a ``Subset`` of ``test``)."""
        t = self._check_task(t)
        return Subset(self.test, sorted(i for k in range(t + 1) for i in self._test_idx[k]))

    # ---------------------------------------------------------------------------------- record

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description: dataset, folder, split identity, seed, class order and names, sizes,
        per-task counts."""
        names = self.train.classes
        return {
            "dataset": getattr(self.train, "name", None),
            "root": getattr(self.train, "source", None),
            "split": getattr(self.train, "split_info", None),
            "seed": self.seed,
            "num_classes": self.num_classes,
            "num_tasks": self.num_tasks,
            "classes_per_task": self.classes_per_task,
            "shuffle_classes": self.shuffle_classes,
            "train_per_class": self.train_per_class,
            "test_per_class": self.test_per_class,
            "class_order": list(self.class_order),
            "class_names": [names[c] for c in self.class_order],
            "tasks": [
                {
                    "index": task.index,
                    "classes": list(task.classes),
                    "class_names": [names[c] for c in task.classes],
                    "offset": task.offset,
                    "train_count": len(self._train_idx[task.index]),
                    "test_count": len(self._test_idx[task.index]),
                }
                for task in self.tasks
            ],
        }

    def record(self) -> dict[str, Any]:
        """The data part of a run's reproducibility record (JSON-able).

        Dataset name and folder, the split's identity (kind, name, split files with sha256, hashes of the
        resolved image lists, counts; ``None`` for datasets without one), the transforms, class order,
        and the images per task after caps.
        """
        train_counts = [len(ix) for ix in self._train_idx]
        test_counts = [len(ix) for ix in self._test_idx]
        record = {
            "dataset": getattr(self.train, "name", None),
            "root": getattr(self.train, "source", None),
            "split": getattr(self.train, "split_info", None),
            "transform": {
                "train": getattr(self.train, "transform_info", None),
                "test": getattr(self.test, "transform_info", None),
            },
            "seed": self.seed,
            "num_classes": self.num_classes,
            "num_tasks": self.num_tasks,
            "classes_per_task": self.classes_per_task,
            "class_order": list(self.class_order),
            "train_images_per_task": train_counts,
            "test_images_per_task": test_counts,
            "train_images": sum(train_counts),
            "test_images": sum(test_counts),
            "dataset_images": {"train": len(self.train), "test": len(self.test)},
        }
        if getattr(self.test, "split", None) == "validation":  # the test side is the validation split
            record["evaluate_on"] = "validation"
        return record

    def __repr__(self) -> str:
        return (
            f"ClassIncrementalScenario({getattr(self.train, 'name', None)!r}, tasks={self.num_tasks}, "
            f"classes_per_task={self.classes_per_task}, order={self.class_order})"
        )


def scenario_from_config(data: Any, *, seed: int, image_size: tuple[int, int], channels: int,
                         transform: Any = None) -> ClassIncrementalScenario:
    """The scenario of a run's ``data`` config section (:class:`~duallora.config.DataConfig`).

    Loads the training split and, as the test side, the ``data.evaluate_on`` split (``test``, or
    ``validation``: the held-out share ``data.validation_fraction`` of the training images) with
    every data key (``classes``, ``validation_fraction``, split lists, ...), then cuts them into tasks.

    Args:
        data: the ``data`` section; seed: the run seed.
        image_size, channels: the backbone's input; transform: its transform settings (benchmarks).

    Raises:
        DataError: as :func:`~duallora.data.datasets.load_dataset` and :class:`ClassIncrementalScenario`.
    """
    kw = dict(root=data.root, image_size=image_size, channels=channels, seed=seed, test_fraction=data.test_fraction,
              check_images=data.check_images, split_train=data.split_train, split_test=data.split_test,
              split_sha256=data.split_sha256, transform=transform, augment=data.augment, classes=data.classes,
              validation_fraction=data.validation_fraction)
    train = load_dataset(data.dataset, "train", **kw)
    test = load_dataset(data.dataset, data.evaluate_on, **kw)
    return ClassIncrementalScenario(
        train, test, num_tasks=data.num_tasks, classes_per_task=data.classes_per_task, seed=seed,
        class_order=list(data.class_order) if data.class_order is not None else None,
        shuffle_classes=data.shuffle_classes, train_per_class=data.train_per_class, test_per_class=data.test_per_class,
    )
