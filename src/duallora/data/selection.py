"""What every dataset shares after its source has read it: a class restriction and a validation split.

* ``data.classes`` (:func:`resolve_classes`, :func:`restrict_classes`): keep only the listed classes,
  given by name or identifier (``dataset.classes`` / ``dataset.class_ids``, e.g. Tiny-ImageNet's
  WordNet ids), by label id, or as a named list (:func:`~duallora.data.registry.class_list`); label
  ids become ``0..len - 1`` in the list's order.
* ``data.validation_fraction`` (:func:`validation_split`, :func:`carve_validation`): per class, a
  seeded share of the training images is held out as the validation split and never trained on.
  The rule: a class's item indices (in dataset order) are shuffled with
  ``random.Random(f"validation:{seed}:{class name}")`` and the first
  ``round_half_up(fraction * n)`` (at least 1, at most ``n - 1``; none for a class of one image)
  are validation. It depends only on the seed, the class's images and its name: not on
  ``data.train_per_class`` (applied afterwards, by the scenario, to what is left) nor on which other
  classes were kept.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import numpy as np
import torch

from duallora.data.base import ImageDataset
from duallora.data.registry import class_list
from duallora.data.splits import held_out_count
from duallora.errors import DataError

#: Entries of the classes a dataset has, shown in an unknown-class error.
MAX_SHOWN_CLASSES = 8


def _shown(values: Sequence[Any]) -> str:
    more = f", ... ({len(values)} in all)" if len(values) > MAX_SHOWN_CLASSES else ""
    return ", ".join(repr(v) for v in values[:MAX_SHOWN_CLASSES]) + more


def resolve_classes(selection: Any, names: Sequence[str], ids: Optional[Sequence[str]] = None,
                    what: str = "the dataset") -> list[int]:
    """The label ids that ``selection`` (``data.classes``) names, in its order.

    Args:
        selection: None (every class, in label order); a named class list (a string); or a list
            whose entries are class names (``names``), class identifiers (``ids``, e.g. WordNet ids),
            or label ids (ints).
        names: the class names (index = label id); ids: the class identifiers, or None.
        what: the dataset, for the messages.

    Raises:
        DataError: an unknown list name, entries that name no class (all of them are named), an
            empty selection, or a class selected twice.
    """
    if selection is None:
        return list(range(len(names)))
    entries = list(class_list(selection)) if isinstance(selection, str) else list(selection)
    if not entries:
        raise DataError("data.classes is an empty list; list at least one class, or set it to null for all")
    by_key: dict[str, int] = {str(n): i for i, n in enumerate(names)}
    by_key.update({str(k): i for i, k in enumerate(ids or [])})
    chosen: list[int] = []
    unknown: list[Any] = []
    for e in entries:
        if isinstance(e, (int, np.integer)) and not isinstance(e, bool):
            label = int(e) if 0 <= int(e) < len(names) else None
        else:
            label = by_key.get(str(e))
        if label is None:
            unknown.append(e)
        else:
            chosen.append(label)
    if unknown:
        kinds = "class names or ids" if ids else "class names"
        raise DataError(
            f"data.classes names classes that {what} does not have: {', '.join(repr(u) for u in unknown)}; "
            f"use its {kinds} ({_shown(list(ids or names))}) or label ids 0..{len(names) - 1}"
        )
    twice = sorted({names[c] for c in chosen if chosen.count(c) > 1})
    if twice:
        raise DataError(f"data.classes lists a class twice: {', '.join(repr(t) for t in twice)}")
    return chosen


def restrict_classes(dataset: ImageDataset, selection: Any) -> ImageDataset:
    """The items of the classes ``selection`` names (:func:`resolve_classes`), relabelled ``0..len - 1``.

    Items keep their order. The dataset's ``split_info`` (an empty one for datasets without)
    gains ``"classes"``: the selection as given, and the kept classes.
    """
    chosen = resolve_classes(selection, dataset.classes, dataset.class_ids, repr(dataset.name or "the dataset"))
    new_label = np.full(len(dataset.classes), -1, dtype=np.int64)
    new_label[np.asarray(chosen, dtype=np.int64)] = np.arange(len(chosen))
    mapped = new_label[dataset.targets.cpu().numpy().astype(np.int64)]
    keep = np.flatnonzero(mapped >= 0)
    ids = None if dataset.class_ids is None else [dataset.class_ids[c] for c in chosen]
    out = dataset.select(keep.tolist(), mapped[keep], [dataset.classes[c] for c in chosen], ids)
    return note_classes(out, selection)


def note_classes(dataset: ImageDataset, selection: Any) -> ImageDataset:
    """Record a class selection in ``dataset.split_info["classes"]`` (a copy; an empty record for datasets without).

    Returns:
        ``dataset``, whose classes are the selected ones.
    """
    info = dict(getattr(dataset, "split_info", None) or {})
    info["classes"] = {"selection": selection if isinstance(selection, str) else list(selection),
                       "kept": list(dataset.class_ids or dataset.classes), "label_ids": "the order of data.classes"}
    dataset.split_info = info
    return dataset


def validation_split(targets: torch.Tensor, classes: Sequence[str], fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """``(train indices, validation indices)``, both ascending, by the rule of the module docstring."""
    labels = targets.cpu().numpy().astype(np.int64)
    train: list[int] = []
    val: list[int] = []
    for c in range(len(classes)):
        members = np.flatnonzero(labels == c).tolist()
        shuffled = list(members)
        random.Random(f"validation:{seed}:{classes[c]}").shuffle(shuffled)
        n_val = held_out_count(len(members), fraction)
        val += shuffled[:n_val]
        train += shuffled[n_val:]
    return sorted(train), sorted(val)


def carve_validation(dataset: ImageDataset, part: str, fraction: float, seed: int) -> ImageDataset:
    """The ``part`` (``"train"`` or ``"validation"``) of a training split cut by :func:`validation_split`.

    Both parts record ``split_info["validation"]``: the fraction, seed, rule and image counts.
    """
    train_idx, val_idx = validation_split(dataset.targets, dataset.classes, fraction, seed)
    out = dataset.select(train_idx if part == "train" else val_idx)
    info = dict(getattr(dataset, "split_info", None) or {})
    info["validation"] = {
        "fraction": fraction, "seed": seed,
        "rule": "per class: item indices shuffled with random.Random(f'validation:{seed}:{class name}'), the "
                "first round_half_up(fraction * n) held out (at least 1 and at most n - 1), before "
                "data.train_per_class",
        "images": {"train": len(train_idx), "validation": len(val_idx)},
    }
    out.split_info = info
    return out
