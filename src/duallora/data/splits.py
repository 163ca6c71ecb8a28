"""Split rules and split lists: the seeded per-class split, split list files, their records and hashes.

* :func:`split_files`: the deterministic stratified rule of ``imagefolder`` and ImageNet-R/A without
  split lists.
* :func:`read_split_file` / :func:`resolve_entries` / :func:`labels_from_lists`: split lists
  (CODA-Prompt's YAML, ``<path> <label>`` text lines) resolved under a data folder.
* :func:`list_sha256`, :func:`files_record`, :func:`check_split_sha256`: the split's identity in a
  run's record, and pinning the split files by their sha256 (``data.split_sha256``).
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

import yaml

from duallora.backbones import file_sha256
from duallora.errors import DataError

YAML_SUFFIXES = (".yaml", ".yml")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def held_out_count(n: int, fraction: float) -> int:
    """``round_half_up(fraction * n)``, at least 1 and at most ``n - 1``; 0 when ``n < 2``."""
    if n < 2:
        return 0
    return min(max(round_half_up(fraction * n), 1), n - 1)


def split_files(
    files: Sequence[str], classname: str, *, seed: int, test_fraction: float
) -> tuple[list[str], list[str]]:
    """Split one class's files into (train, test), deterministically.

    The file names are sorted, shuffled with ``random.Random(f"{seed}:{classname}")`` and the first
    ``round_half_up(test_fraction * n)`` go to test (at least 1 and at most ``n - 1`` when ``n >= 2``;
    none when ``n == 1``). Both returned lists are sorted.
    """
    ordered = sorted(files)
    n = len(ordered)
    if n < 2:
        return ordered, []
    n_test = held_out_count(n, test_fraction)
    shuffled = list(ordered)
    random.Random(f"{seed}:{classname}").shuffle(shuffled)
    return sorted(shuffled[n_test:]), sorted(shuffled[:n_test])


def as_list(value: Any) -> list[str]:
    """None, a path or a list of paths -> a list of strings."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


# ----------------------------------------------------------------------------------- split lists


def _read_yaml_split(p: Path) -> list[tuple[str, int]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(p, "r", encoding="utf-8") as f:
            content = yaml.load(f, Loader=loader)
    except Exception as exc:
        raise DataError(f"split file {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(content, dict) or "data" not in content or "targets" not in content:
        raise DataError(
            f"split file {str(p)!r} must be YAML with keys `data:` (list of image paths) and "
            "`targets:` (list of integer labels), as CODA-Prompt's imagenet-r_train.yaml"
        )
    data, targets = content["data"], content["targets"]
    if not isinstance(data, list) or not isinstance(targets, list) or len(data) != len(targets):
        raise DataError(
            f"split file {str(p)!r}: `data` and `targets` must be lists of equal length "
            f"(got {type(data).__name__} of {len(data) if isinstance(data, list) else '?'} and "
            f"{type(targets).__name__} of {len(targets) if isinstance(targets, list) else '?'})"
        )
    out = []
    for i, (d, t) in enumerate(zip(data, targets)):
        if not isinstance(d, str) or isinstance(t, bool) or not isinstance(t, int):
            raise DataError(f"split file {str(p)!r}: entry {i} ({d!r}, {t!r}) is not (path, integer label)")
        out.append((d, int(t)))
    return out


def _read_text_split(p: Path) -> list[tuple[str, int]]:
    out = []
    with open(p, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = s.rsplit(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                out.append((parts[0], int(parts[1])))
            except ValueError:
                raise DataError(
                    f"split file {str(p)!r}, line {lineno}: {s[:80]!r} is not '<image path> <integer label>'"
                ) from None
    return out


def read_split_file(path: str | Path) -> list[tuple[str, int]]:
    """Read a split list: ``(image path as written, label)`` per image, in file order.

    Formats:
        * ``.yaml``/``.yml``: a mapping with ``data`` (list of paths) and ``targets`` (list of int
          labels of equal length), as CODA-Prompt's ``dataloaders/splits/imagenet-r_train.yaml``.
        * anything else: text, one ``<path> <label>`` per line (DomainNet's ``<domain>_train.txt``);
          blank lines and lines starting with ``#`` are skipped.

    Raises:
        DataError: missing file or malformed content (names the file and the line/entry).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"split file {str(path)!r} does not exist; pass an existing file "
                        "(data.split_train / data.split_test)")
    if p.suffix.lower() in YAML_SUFFIXES:
        return _read_yaml_split(p)
    return _read_text_split(p)


def _find_entry(root: Path, parts: list[str], k_common: Optional[int]) -> tuple[Optional[Path], Optional[int]]:
    """The file of one split-list entry under ``root`` (leading folders dropped until found), and the drop count."""
    if k_common is not None and len(parts) - k_common >= 1:
        cand = root.joinpath(*parts[k_common:])
        if cand.is_file():
            return cand, k_common
    for k in range(0, max(len(parts) - 1, 1)):
        cand = root.joinpath(*parts[k:])
        if cand.is_file():
            return cand, k if k_common is None else k_common
    return None, k_common


def resolve_entries(root: Path, entries: Sequence[str], what: str, name: str, layout: str = "") -> list[Path]:
    """Image paths of a split list, resolved under ``root``.

    An entry ``a/b/c/class/file.jpg`` is looked up as ``root/a/b/c/class/file.jpg``, then with leading
    folders dropped (``root/b/c/...``, ..., ``root/class/file.jpg``): the first that exists. The number
    of dropped folders found for the first entry is tried first for the others. Absolute entries
    that exist are used as they are.

    Args:
        layout: the dataset's expected layout, appended to the error.

    Raises:
        DataError: entries whose image is not found (count and examples, and the layout).
    """
    out: list[Path] = []
    missing: list[str] = []
    k_common: Optional[int] = None
    for e in entries:
        e_posix = e.replace("\\", "/")
        pe = Path(e_posix)
        if pe.is_absolute() and pe.is_file():
            out.append(pe)
            continue
        parts = [s for s in PurePosixPath(e_posix).parts if s not in ("/", ".")]
        found, k_common = _find_entry(root, parts, k_common)
        if found is None:
            missing.append(e)
        else:
            out.append(found)
    if missing:
        examples = ", ".join(repr(m) for m in missing[:5])
        raise DataError(
            f"{name}: {len(missing):,} of the {len(entries):,} images listed in {what} are not under "
            f"data.root={str(root)!r} (e.g. {examples}); point data.root at the folder that holds them\n{layout}"
        )
    return out


def labels_from_lists(
    name: str, per_split: dict[str, list[tuple[Path, int]]]
) -> tuple[list[str], dict[str, list[tuple[str, int]]], str]:
    """Classes and label ids from split lists that give labels (each label = one class folder).

    Returns:
        the class names (folder names, by label), the items per split with labels ranked to 0..K-1,
        and the rule as recorded (``"the split lists' labels"``, with ``ranked`` when they were not contiguous).
    """
    name_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for items in per_split.values():
        for path, label in items:
            cls = path.parent.name
            prev = name_of.setdefault(label, cls)
            if prev != cls:
                raise DataError(
                    f"{name}: the split lists give label {label} to images of two class folders, "
                    f"{prev!r} and {cls!r} ({str(path)!r}); lists and folders disagree"
                )
            prev_label = label_of.setdefault(cls, label)
            if prev_label != label:
                raise DataError(
                    f"{name}: class folder {cls!r} has images with labels {prev_label} and {label} in the split "
                    "lists; lists and folders disagree"
                )
    labels = sorted(name_of)
    rank = {lab: i for i, lab in enumerate(labels)}
    classes = [name_of[lab] for lab in labels]
    out = {split: [(str(p), rank[lab]) for p, lab in items] for split, items in per_split.items()}
    contiguous = labels == list(range(len(labels)))
    rule = ("the split lists' labels" if contiguous
            else "the split lists' labels, ranked to 0..K-1 (they were not contiguous)")
    return classes, out, rule


# ---------------------------------------------------------------------------------------- records


def list_sha256(root: Path, items: Sequence[tuple[str, int]]) -> str:
    """sha256 over ``"<path relative to root>\\t<label id>\\n"`` lines (root-independent identity)."""
    h = hashlib.sha256()
    for path, label in items:
        try:
            rel = Path(path).relative_to(root).as_posix()
        except ValueError:
            rel = Path(path).as_posix()
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def files_record(pairs: Sequence[tuple[str, Path]]) -> list[dict[str, str]]:
    """``[{"role", "path", "sha256"}, ...]`` of the split files read (the record's ``split.files``)."""
    return [{"role": role, "path": str(p), "sha256": file_sha256(p)} for role, p in pairs]


def check_split_sha256(name: str, split_info: Optional[dict[str, Any]], expected: Any) -> None:
    """Compare ``data.split_sha256`` with the sha256 of the split files read (``split_info["files"]``).

    Raises:
        DataError: hashes given but no split file read, another number of hashes than files, or a
            file whose sha256 differs (naming it).
    """
    want = as_list(expected)
    if not want:
        return
    files = list((split_info or {}).get("files") or [])
    have = [f["sha256"] for f in files]
    listing = "; ".join(f"{f['path']} {f['sha256']}" for f in files) or "none"
    if not have:
        split_name = (split_info or {}).get("name", "this dataset's split")
        raise DataError(
            f"{name}: data.split_sha256 is set but this split ({split_name}) reads no split "
            f"files to check; remove it, or pass data.split_train/data.split_test"
        )
    if len(want) != len(have):
        raise DataError(
            f"{name}: data.split_sha256 has {len(want)} hashes but {len(have)} split files are read "
            f"(in this order: {listing})"
        )
    for w, f in zip(want, files):
        if w.lower() != f["sha256"]:
            raise DataError(
                f"{name}: sha256 of split file {f['path']!r} is {f['sha256']}, not the expected {w} "
                "(data.split_sha256); another version of the split?"
            )
