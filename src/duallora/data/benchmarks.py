"""The paper family's benchmarks: CIFAR-100, ImageNet-R, ImageNet-A, DomainNet, CUB-200-2011.

Every loader reads a local ``root`` (only ``cifar100`` with no root may download, with torchvision's
own tooling, where the network allows); a missing or malformed root is a :class:`DataError` that
shows the expected layout (:data:`BENCHMARKS` ``[name].layout``). Image and class counts are checked
against the real dataset's and a mismatch is a :class:`DataCountWarning` with the numbers (a subset
or another version of the data would not be comparable with published results).

Large datasets load lazily: a list of files, each image opened with PIL in ``__getitem__`` and turned
into a ``uint8 (C, H, W)`` tensor at the backbone's input size by timm's transform
(:mod:`duallora.data.transforms`); CIFAR-100 (180 MB of 32x32 pixels) is held in memory and resized
per item. Nothing is normalised here: the model normalises with its backbone's mean and std.

Splits (the record of every run names the one used, with sha256 hashes):

* ``cifar100``: the official train/test pickles (50,000 / 10,000).
* ``imagenet-r``, ``imagenet-a``: split lists given by ``split_train``/``split_test`` (CODA-Prompt's
  YAML files, or text lists such as LAE's ``train_list.txt``/``val_list.txt``), else ``ROOT/train`` and ``ROOT/test`` folders, else a deterministic
  stratified split: per class, file names sorted, shuffled with ``random.Random(f"{seed}:{class}")``
  and the first ``round_half_up(test_fraction * n)`` held out (:func:`~duallora.data.datasets.split_files`,
  the rule of ``imagefolder``), recorded as ``stratified-80/20 seed S``.
* ``domainnet``: DomainNet's own ``<domain>_train.txt``/``<domain>_test.txt`` lists (all six domains,
  class-incremental over the 345 classes), or the lists given by ``split_train``/``split_test``.
* ``cub200``: the official ``train_test_split.txt`` (5,994 / 5,794).

Label ids: from the split lists' labels where a list gives them (ranked, so 0..K-1; each label must
name exactly one class folder), else the index of the class (folder) name in sorted order, as
torchvision's ``ImageFolder`` does. Class names are the folder names (WordNet ids for ImageNet-R/A).
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import re
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

import numpy as np
import torch

from duallora.data.datasets import DOWNLOAD_DIR, IMAGE_EXTENSIONS, ImageDataset, pil_to_8bit, split_files
from duallora.data.transforms import (
    TransformConfig,
    build_transform,
    default_transform_config,
    describe_transform,
    to_uint8_chw,
)
from duallora.backbones import file_sha256  # noqa: F401 (re-exported: split files are hashed the same way)
from duallora.errors import DataError


class DataCountWarning(UserWarning):
    """The data found differs in image or class count from the real benchmark."""


WNID = re.compile(r"^n\d{8}$")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the real dataset looks like.

    Attributes:
        name: the ``data.dataset`` name.
        num_classes: classes of the real dataset.
        train, test: images per split of the standard split (None: no fixed split).
        total: all images (train + test).
        per_split_kinds: split kinds to which ``train``/``test`` apply (e.g. not to a stratified split).
        task_layouts: numbers of tasks the papers use (equal classes per task).
        layout: the expected folder layout (shown in errors).
        source: where to get the data.
    """

    name: str
    num_classes: int
    train: Optional[int]
    test: Optional[int]
    total: int
    per_split_kinds: tuple[str, ...]
    task_layouts: tuple[int, ...]
    layout: str
    source: str


_CIFAR_LAYOUT = """cifar100 expects torchvision's CIFAR-100 python version in data.root:
  ROOT/cifar-100-python/train   pickle: 'data' (50000 x 3072 uint8), 'fine_labels'
  ROOT/cifar-100-python/test    pickle: 'data' (10000 x 3072 uint8), 'fine_labels'
  ROOT/cifar-100-python/meta    pickle: 'fine_label_names' (100 names)
(ROOT may also be the cifar-100-python folder itself). Get cifar-100-python.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html and unpack it in ROOT, or leave data.root unset:
then ~/.cache/duallora/data is used, downloaded there by torchvision where the network allows."""

_IMAGENET_R_LAYOUT = """{name} expects the {title} images ({tar}), one folder per WordNet id, in data.root:
  ROOT/n01443537/<image>.jpg ...   ({classes} folders, {total:,} images; then split per class, seeded)
or a pre-split copy:
  ROOT/train/n01443537/...  and  ROOT/test/n01443537/...
and optionally split lists for the published split (data.split_train=FILE data.split_test=FILE):
  YAML with `data:` (image paths) and `targets:` (labels), CODA-Prompt's format, or text lines
  "<path> <label>" such as LAE's train_list.txt / val_list.txt (used by InfLoRA); paths are resolved
  under ROOT (leading folders such as data/{name}/train/ are dropped until the file is found)."""

_DOMAINNET_LAYOUT = """domainnet expects DomainNet (cleaned version) in data.root: the six domain folders
and DomainNet's own split lists
  ROOT/clipart/aircraft_carrier/clipart_001_000001.jpg ...  (also infograph, painting, quickdraw,
                                                             real, sketch; 345 class folders each)
  ROOT/clipart_train.txt, ROOT/clipart_test.txt, ...         lines "clipart/aircraft_carrier/... 0"
or other lists given explicitly: data.split_train=[FILE,...] data.split_test=[FILE,...] (text lists
"<path> <label>", or YAML `data:`/`targets:` such as InfLoRA's domainnet_train.yaml)."""

_CUB_LAYOUT = """cub200 expects CUB-200-2011 (CUB_200_2011.tgz) in data.root:
  ROOT/CUB_200_2011/images.txt              "<image id> <class folder>/<file>.jpg"
  ROOT/CUB_200_2011/image_class_labels.txt  "<image id> <class id 1..200>"
  ROOT/CUB_200_2011/train_test_split.txt    "<image id> <1 = train, 0 = test>"
  ROOT/CUB_200_2011/classes.txt             "<class id> <class name>"
  ROOT/CUB_200_2011/images/001.Black_footed_Albatross/<file>.jpg ...
(ROOT may also be the CUB_200_2011 folder itself)."""

BENCHMARKS: dict[str, BenchmarkSpec] = {
    "cifar100": BenchmarkSpec(
        "cifar100", 100, 50_000, 10_000, 60_000, ("official",), (10, 5, 20), _CIFAR_LAYOUT,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
    "imagenet-r": BenchmarkSpec(
        "imagenet-r", 200, 24_000, 6_000, 30_000, ("files", "folders"), (5, 10, 20),
        _IMAGENET_R_LAYOUT.format(name="imagenet-r", title="ImageNet-R", tar="Hendrycks et al., imagenet-r.tar",
                                  classes=200, total=30_000),
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
    ),
    "imagenet-a": BenchmarkSpec(
        "imagenet-a", 200, None, None, 7_500, (), (10,),
        _IMAGENET_R_LAYOUT.format(name="imagenet-a", title="ImageNet-A", tar="Hendrycks et al., imagenet-a.tar",
                                  classes=200, total=7_500),
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
    ),
    "domainnet": BenchmarkSpec(
        "domainnet", 345, 409_832, 176_743, 586_575, ("official",), (5,), _DOMAINNET_LAYOUT,
        "http://ai.bu.edu/M3SDA/ (cleaned version: <domain>.zip, <domain>_train.txt, <domain>_test.txt)",
    ),
    "cub200": BenchmarkSpec(
        "cub200", 200, 5_994, 5_794, 11_788, ("official",), (10,), _CUB_LAYOUT,
        "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    ),
}
BENCHMARK_DATASETS = tuple(BENCHMARKS)
#: Datasets whose split can be given by data.split_train / data.split_test.
SPLIT_FILE_DATASETS = ("imagenet-r", "imagenet-a", "domainnet")


# ------------------------------------------------------------------------------------ datasets


class BenchmarkDataset(ImageDataset):
    """A benchmark split: lazy items through a timm transform to ``uint8 (C, H, W)``.

    Attributes (besides :class:`ImageDataset`'s):
        split_info: the split's identity (kind, name, files with sha256, list hashes, counts).
        transform_info: the transform's steps, its settings and whether it augments.
    """

    split_info: dict[str, Any]
    transform_info: dict[str, Any]

    def _setup(self, targets: Sequence[int], classes: Sequence[str], tc: TransformConfig, augment: bool,
               name: str, source: str, split_info: dict[str, Any]) -> None:
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.classes = list(classes)
        self.image_size = tc.image_size
        self.channels = tc.channels
        self.name = name
        self.source = source
        self.split_info = split_info
        self.transform = build_transform(tc, augment=augment)
        self.transform_info = {"augment": augment, "settings": tc.to_dict(),
                               "steps": describe_transform(self.transform)}

    def _pil(self, index: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        im = self._pil(index)
        out = self.transform(im)
        return to_uint8_chw(out, self.channels, self.image_size, f"{self.name} item {index}"), int(self.targets[index])


class FileListDataset(BenchmarkDataset):
    """Images given by file paths, opened with PIL on access (nothing is held in memory).

    Raises (in ``__getitem__``):
        DataError: an image cannot be read (names the file).
    """

    def __init__(self, files: Sequence[str], targets: Sequence[int], classes: Sequence[str], *,
                 transform: TransformConfig, augment: bool, name: str, source: str,
                 split_info: dict[str, Any]) -> None:
        self.files = [str(f) for f in files]
        self._setup(targets, classes, transform, augment, name, source, split_info)

    def _pil(self, index: int) -> Any:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as opened:
                im = pil_to_8bit(opened, self.channels)
                return im.copy() if im is opened else im  # decode before the file is closed
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise DataError(
                f"{self.name}: cannot read image {path!r} ({type(exc).__name__}: {exc}); replace the file "
                "with an intact copy"
            ) from exc


class ArrayImageDataset(BenchmarkDataset):
    """Images held as a ``uint8 (N, H, W, 3)`` array (CIFAR-100), transformed per item."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str], *,
                 transform: TransformConfig, augment: bool, name: str, source: str,
                 split_info: dict[str, Any]) -> None:
        self.images = images
        self._setup(targets, classes, transform, augment, name, source, split_info)

    def _pil(self, index: int) -> Any:
        from PIL import Image

        im = Image.fromarray(self.images[index])
        return im.convert("L") if self.channels == 1 else im


# ------------------------------------------------------------------------------------- helpers


def _list_sha256(root: Path, items: Sequence[tuple[str, int]]) -> str:
    """sha256 over ``"<path relative to root>\\t<label id>\\n"`` lines (root-independent identity)."""
    h = hashlib.sha256()
    for path, label in items:
        try:
            rel = Path(path).relative_to(root).as_posix()
        except ValueError:
            rel = Path(path).as_posix()
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def _layout_error(name: str, problem: str) -> DataError:
    return DataError(f"{name}: {problem}\n{BENCHMARKS[name].layout}")


def _need_root(name: str, root: Optional[str]) -> Path:
    if root is None:
        raise _layout_error(name, "needs data.root=FOLDER (no default location, no download)")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise _layout_error(name, f"data.root={root!r} does not exist or is not a folder")
    return base


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def check_counts(name: str, num_classes: int, n_train: int, n_test: int, kind: str, where: str) -> list[str]:
    """Compare with the real dataset's counts; warn (:class:`DataCountWarning`) on a mismatch.

    Returns:
        the mismatches found (also recorded in the split record), empty when all agree.
    """
    spec = BENCHMARKS[name]
    problems = []
    if num_classes != spec.num_classes:
        problems.append(f"{num_classes} classes (expected {spec.num_classes})")
    if n_train + n_test != spec.total:
        problems.append(f"{n_train + n_test:,} images (expected {spec.total:,})")
    if kind in spec.per_split_kinds:
        if spec.train is not None and n_train != spec.train:
            problems.append(f"{n_train:,} train images (expected {spec.train:,})")
        if spec.test is not None and n_test != spec.test:
            problems.append(f"{n_test:,} test images (expected {spec.test:,})")
    if problems:
        warnings.warn(
            f"{name}: found {', '.join(problems)} in {where}; a subset or another version of the "
            "dataset gives results that are not comparable with published numbers",
            DataCountWarning,
            stacklevel=3,
        )
    return problems


# ------------------------------------------------------------------------------- split lists


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
        raise DataError(f"split file {str(path)!r} does not exist; pass an existing file (data.split_train / data.split_test)")
    if p.suffix.lower() in YAML_SUFFIXES:
        import yaml

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


def resolve_entries(root: Path, entries: Sequence[str], what: str, name: str) -> list[Path]:
    """Image paths of a split list, resolved under ``root``.

    An entry ``a/b/c/class/file.jpg`` is looked up as ``root/a/b/c/class/file.jpg``, then with leading
    folders dropped (``root/b/c/...``, ..., ``root/class/file.jpg``): the first that exists. The number
    of dropped folders found for the first entry is tried first for the others. Absolute entries
    that exist are used as they are.

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
        found: Optional[Path] = None
        if k_common is not None and len(parts) - k_common >= 1:
            cand = root.joinpath(*parts[k_common:])
            if cand.is_file():
                found = cand
        if found is None:
            for k in range(0, max(len(parts) - 1, 1)):
                cand = root.joinpath(*parts[k:])
                if cand.is_file():
                    found = cand
                    if k_common is None:
                        k_common = k
                    break
        if found is None:
            missing.append(e)
        else:
            out.append(found)
    if missing:
        examples = ", ".join(repr(m) for m in missing[:5])
        raise _layout_error(
            name,
            f"{len(missing):,} of the {len(entries):,} images listed in {what} are not under "
            f"data.root={str(root)!r} (e.g. {examples}); point data.root at the folder that holds them",
        )
    return out


def _labels_from_lists(
    name: str, per_split: dict[str, list[tuple[Path, int]]]
) -> tuple[list[str], dict[str, list[tuple[str, int]]], str]:
    """Classes and label ids from split lists that give labels (each label = one class folder)."""
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


# ------------------------------------------------------------------------------------ indexes


@dataclass
class _Index:
    """Both splits of one benchmark, as built once per process (cached)."""

    classes: list[str]
    items: dict[str, Any]  # split -> list[(path, label)] or (images array, labels)
    split_info: dict[str, Any]
    source: str
    arrays: bool = False
    files: list[dict[str, str]] = field(default_factory=list)


def _files_record(pairs: Sequence[tuple[str, Path]]) -> list[dict[str, str]]:
    return [{"role": role, "path": str(p), "sha256": file_sha256(p)} for role, p in pairs]


def _index_from_lists(name: str, base: Path, train_files: list[str], test_files: list[str], kind: str,
                      label: str) -> _Index:
    per_split: dict[str, list[tuple[Path, int]]] = {}
    for split, files in (("train", train_files), ("test", test_files)):
        entries: list[tuple[str, int]] = []
        for f in files:
            entries += read_split_file(f)
        if not entries:
            raise _layout_error(name, f"the {split} split lists {files} hold no images")
        paths = resolve_entries(base, [e for e, _ in entries], " + ".join(Path(f).name for f in files), name)
        per_split[split] = [(p, lab) for p, (_, lab) in zip(paths, entries)]
    classes, items, rule = _labels_from_lists(name, per_split)
    files_rec = _files_record([("train", Path(f).expanduser()) for f in train_files]
                              + [("test", Path(f).expanduser()) for f in test_files])
    info = {
        "kind": kind,
        "name": label,
        "files": files_rec,
        "label_ids": rule,
    }
    return _Index(classes, items, info, str(base), files=files_rec)


def _scan_wnid_folders(name: str, folder: Path) -> dict[str, list[Path]]:
    dirs = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    wnids = [d for d in dirs if WNID.match(d.name)]
    if not wnids:
        shown = ", ".join(d.name for d in dirs[:8]) or "none"
        raise _layout_error(name, f"{str(folder)!r} has no WordNet-id class folders (nXXXXXXXX); folders found: {shown}")
    out = {}
    for d in wnids:
        files = sorted((p for p in d.rglob("*") if _is_image(p)), key=lambda p: p.as_posix())
        if not files:
            raise _layout_error(name, f"class folder {str(d)!r} has no images (extensions {' '.join(IMAGE_EXTENSIONS)})")
        out[d.name] = files
    return out


def _index_wnid(name: str, root: Optional[str], split_train: list[str], split_test: list[str], seed: int,
                test_fraction: float) -> _Index:
    base = _need_root(name, root)
    if split_train or split_test:
        label = "split lists " + ", ".join(Path(f).name for f in split_train + split_test)
        return _index_from_lists(name, base, split_train, split_test, "files", label)
    train_dir, test_dir = base / "train", base / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        per = {"train": _scan_wnid_folders(name, train_dir), "test": _scan_wnid_folders(name, test_dir)}
        a, b = set(per["train"]), set(per["test"])
        if a != b:
            raise _layout_error(name, f"train/ and test/ hold different classes (only in train: {sorted(a - b)[:5]}, "
                                      f"only in test: {sorted(b - a)[:5]})")
        classes = sorted(a)
        items = {s: [(str(p), i) for i, c in enumerate(classes) for p in per[s][c]] for s in per}
        info = {"kind": "folders", "name": "train/ and test/ folders", "files": [],
                "label_ids": "index of the class folder name in sorted order"}
        return _Index(classes, items, info, str(base))
    per_class = _scan_wnid_folders(name, base)
    classes = sorted(per_class)
    items = {"train": [], "test": []}
    for i, c in enumerate(classes):
        rel = [p.relative_to(base).as_posix() for p in per_class[c]]
        tr, te = split_files(rel, c, seed=seed, test_fraction=test_fraction)
        items["train"] += [(str(base / f), i) for f in tr]
        items["test"] += [(str(base / f), i) for f in te]
    pct = round(100 * (1 - test_fraction))
    info = {
        "kind": "stratified",
        "name": f"stratified-{pct}/{100 - pct} seed {seed}",
        "files": [],
        "seed": seed,
        "test_fraction": test_fraction,
        "rule": "per class: relative paths sorted, shuffled with random.Random(f'{seed}:{class}'), the first "
                "round_half_up(test_fraction * n) to test (at least 1 and at most n - 1)",
        "label_ids": "index of the class folder name in sorted order",
    }
    return _Index(classes, items, info, str(base))


def _index_domainnet(root: Optional[str], split_train: list[str], split_test: list[str]) -> _Index:
    name = "domainnet"
    base = _need_root(name, root)
    if split_train or split_test:
        label = "split lists " + ", ".join(Path(f).name for f in split_train + split_test)
        return _index_from_lists(name, base, split_train, split_test, "files", label)
    present = {d: ((base / f"{d}_train.txt").is_file(), (base / f"{d}_test.txt").is_file()) for d in DOMAINNET_DOMAINS}
    missing = [f"{d}_{s}.txt" for d, (tr, te) in present.items() for s, ok in (("train", tr), ("test", te)) if not ok]
    if missing:
        raise _layout_error(name, f"data.root={str(base)!r} lacks DomainNet's split lists {missing}; put them there "
                                  "or pass data.split_train/data.split_test")
    index = _index_from_lists(
        name, base, [str(base / f"{d}_train.txt") for d in DOMAINNET_DOMAINS],
        [str(base / f"{d}_test.txt") for d in DOMAINNET_DOMAINS], "official",
        "DomainNet's <domain>_train.txt / <domain>_test.txt, all six domains",
    )
    return index


def _cub_folder(base: Path) -> Optional[Path]:
    for c in (base / "CUB_200_2011", base):
        if (c / "images.txt").is_file():
            return c
    return None


def _read_id_table(path: Path, name: str) -> dict[int, str]:
    if not path.is_file():
        raise _layout_error(name, f"{str(path)!r} is missing")
    out: dict[int, str] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            parts = s.split(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                out[int(parts[0])] = parts[1]
            except ValueError:
                raise _layout_error(name, f"{str(path)!r}, line {lineno}: {s[:80]!r} is not '<id> <value>'") from None
    return out


def _index_cub(root: Optional[str]) -> _Index:
    name = "cub200"
    base = _need_root(name, root)
    folder = _cub_folder(base)
    if folder is None:
        raise _layout_error(name, f"no images.txt in data.root={str(base)!r} or its CUB_200_2011/ folder")
    tables = {}
    for key in ("images", "image_class_labels", "train_test_split", "classes"):
        tables[key] = _read_id_table(folder / f"{key}.txt", name)
    images, labels, is_train, class_names = (tables[k] for k in ("images", "image_class_labels", "train_test_split", "classes"))
    if set(images) != set(labels) or set(images) != set(is_train):
        raise _layout_error(name, "images.txt, image_class_labels.txt and train_test_split.txt list different image ids")
    try:
        class_ids = sorted(class_names)
        rank = {cid: i for i, cid in enumerate(class_ids)}
        label_id = {img: rank[int(labels[img])] for img in images}
        train_flag = {img: int(is_train[img]) for img in images}
    except (KeyError, ValueError) as exc:
        raise _layout_error(name, f"image_class_labels.txt or train_test_split.txt holds a bad value ({exc})") from None
    img_dir = folder / "images"
    ids = sorted(images)
    paths = resolve_entries(img_dir, [images[i] for i in ids], "images.txt", name)
    items: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for img, p in zip(ids, paths):
        items["train" if train_flag[img] == 1 else "test"].append((str(p), label_id[img]))
    files_rec = _files_record([("split", folder / "train_test_split.txt"), ("images", folder / "images.txt"),
                               ("labels", folder / "image_class_labels.txt"), ("classes", folder / "classes.txt")])
    info = {"kind": "official", "name": "CUB-200-2011 train_test_split.txt", "files": files_rec,
            "label_ids": "class id - 1 (classes.txt order)"}
    return _Index([class_names[c] for c in class_ids], items, info, str(folder), files=files_rec)


# ------------------------------------------------------------------------------------ CIFAR-100


_CIFAR_FILES = ("train", "test", "meta")
CIFAR_URL_HOST = "www.cs.toronto.edu"


def _cifar_folder(base: Path) -> Optional[Path]:
    for c in (base / "cifar-100-python", base):
        if all((c / f).is_file() for f in _CIFAR_FILES):
            return c
    return None


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_cifar100() -> Path:
    from torchvision import datasets as tvd

    if not _reachable(CIFAR_URL_HOST):
        raise DataError(
            f"cifar100: no local files in {str(DOWNLOAD_DIR / 'cifar-100-python')!r} and {CIFAR_URL_HOST} is not "
            "reachable (offline); download cifar-100-python.tar.gz elsewhere, unpack it and pass data.root=FOLDER\n"
            + _CIFAR_LAYOUT
        )
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    try:
        tvd.CIFAR100(root=str(DOWNLOAD_DIR), train=True, download=True)
    except Exception as exc:
        raise DataError(f"cifar100: the torchvision download into {str(DOWNLOAD_DIR)!r} failed ({type(exc).__name__}: "
                        f"{exc}); pass data.root=FOLDER with the files\n{_CIFAR_LAYOUT}") from exc
    folder = _cifar_folder(DOWNLOAD_DIR)
    if folder is None:
        raise DataError(f"cifar100: the download into {str(DOWNLOAD_DIR)!r} did not produce cifar-100-python/")
    return folder


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise _layout_error("cifar100", f"cannot read {str(path)!r} as a CIFAR-100 pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise _layout_error("cifar100", f"{str(path)!r} does not hold a dict")
    return obj


def _index_cifar100(root: Optional[str]) -> _Index:
    name = "cifar100"
    if root is not None:
        base = _need_root(name, root)
        folder = _cifar_folder(base)
        if folder is None:
            raise _layout_error(name, f"data.root={str(base)!r} lacks cifar-100-python/{{train,test,meta}}")
    else:
        folder = _cifar_folder(DOWNLOAD_DIR) or _download_cifar100()
    meta = _unpickle(folder / "meta")
    classes = meta.get("fine_label_names")
    if not isinstance(classes, list) or not classes:
        raise _layout_error(name, f"{str(folder / 'meta')!r} has no 'fine_label_names' list")
    items = {}
    for split in ("train", "test"):
        d = _unpickle(folder / split)
        if "data" not in d or "fine_labels" not in d:
            raise _layout_error(name, f"{str(folder / split)!r} lacks 'data' or 'fine_labels'")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
            raise _layout_error(name, f"{str(folder / split)!r}: 'data' {data.shape} and 'fine_labels' {labels.shape} "
                                      "are not (N, 3072) and (N,)")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise _layout_error(name, f"{str(folder / split)!r} has labels outside 0..{len(classes) - 1}")
        images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        items[split] = (images, labels)
    files_rec = _files_record([(f, folder / f) for f in _CIFAR_FILES])
    info = {"kind": "official", "name": "CIFAR-100 train/test (torchvision cifar-100-python)", "files": files_rec,
            "label_ids": "fine_labels"}
    return _Index([str(c) for c in classes], items, info, str(folder), arrays=True, files=files_rec)


# ------------------------------------------------------------------------------------- public


def _stamp(paths: Sequence[Optional[str]]) -> tuple:
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = Path(p).expanduser().stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _cached_index(name: str, root: Optional[str], split_train: tuple[str, ...], split_test: tuple[str, ...],
                  seed: int, test_fraction: float, stamp: tuple) -> _Index:
    if name == "cifar100":
        index = _index_cifar100(root)
    elif name in ("imagenet-r", "imagenet-a"):
        index = _index_wnid(name, root, list(split_train), list(split_test), seed, test_fraction)
    elif name == "domainnet":
        index = _index_domainnet(root, list(split_train), list(split_test))
    elif name == "cub200":
        index = _index_cub(root)
    else:  # pragma: no cover - guarded by load_benchmark
        raise DataError(f"unknown benchmark {name!r}")
    n_train = len(index.items["train"][1]) if index.arrays else len(index.items["train"])
    n_test = len(index.items["test"][1]) if index.arrays else len(index.items["test"])
    index.split_info["counts"] = {"train": n_train, "test": n_test, "classes": len(index.classes)}
    if not index.arrays:
        base = Path(index.source)
        index.split_info["list_sha256"] = {s: _list_sha256(base, index.items[s]) for s in ("train", "test")}
    index.split_info["count_mismatches"] = check_counts(
        name, len(index.classes), n_train, n_test, index.split_info["kind"], index.source
    )
    return index


def clear_cache() -> None:
    """Forget the indexes built so far (they are rebuilt on the next load)."""
    _cached_index.cache_clear()


def _check_sha256(name: str, index: _Index, expected: Any) -> None:
    want = _as_list(expected)
    if not want:
        return
    have = [f["sha256"] for f in index.files]
    listing = "; ".join(f"{f['path']} {f['sha256']}" for f in index.files) or "none"
    if not have:
        raise DataError(
            f"{name}: data.split_sha256 is set but this split ({index.split_info['name']}) reads no split "
            f"files to check; remove it, or pass data.split_train/data.split_test"
        )
    if len(want) != len(have):
        raise DataError(
            f"{name}: data.split_sha256 has {len(want)} hashes but {len(have)} split files are read "
            f"(in this order: {listing})"
        )
    for w, f in zip(want, index.files):
        if w.lower() != f["sha256"]:
            raise DataError(
                f"{name}: sha256 of split file {f['path']!r} is {f['sha256']}, not the expected {w} "
                "(data.split_sha256); another version of the split?"
            )


def load_benchmark(
    name: str,
    split: str,
    *,
    root: Optional[str] = None,
    image_size: tuple[int, int] = (224, 224),
    channels: int = 3,
    seed: int = 0,
    test_fraction: float = 0.2,
    split_train: Any = None,
    split_test: Any = None,
    split_sha256: Any = None,
    transform: Optional[TransformConfig] = None,
    augment: bool = False,
) -> BenchmarkDataset:
    """One split of a benchmark as a lazy :class:`BenchmarkDataset`.

    Args:
        name: one of :data:`BENCHMARK_DATASETS`.
        split: ``"train"`` or ``"test"``.
        root: the data folder (see :data:`BENCHMARKS` ``[name].layout``); None only for ``cifar100``.
        image_size, channels: used when ``transform`` is None (bilinear, crop_pct 1.0).
        seed, test_fraction: the stratified split of imagenet-r/imagenet-a without split lists.
        split_train, split_test: split list file(s) (str or list of str), both or neither;
            imagenet-r, imagenet-a and domainnet only.
        split_sha256: expected sha256 of every split file read, in the order of the record's
            ``split.files`` (str or list); a mismatch is an error.
        transform: the backbone's transform settings (:func:`~duallora.data.transforms.resolve_transform_config`).
        augment: random resized crop + flip; applied to the ``train`` split only.

    Raises:
        DataError: missing/malformed root (with the expected layout), unreadable or inconsistent split
            lists, a sha256 mismatch, or options the dataset does not take.
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    tr, te = _as_list(split_train), _as_list(split_test)
    if (tr or te) and name not in SPLIT_FILE_DATASETS:
        raise DataError(f"{name}: split lists (data.split_train/split_test) are not used by this dataset; remove them")
    if bool(tr) != bool(te):
        raise DataError(f"{name}: give both data.split_train and data.split_test, or neither")
    tc = transform if transform is not None else default_transform_config(image_size, channels)
    key_paths = [root, *tr, *te]
    index = _cached_index(name, None if root is None else str(root), tuple(tr), tuple(te), int(seed),
                          float(test_fraction), _stamp(key_paths))
    _check_sha256(name, index, split_sha256)
    aug = bool(augment) and split == "train"
    info = dict(index.split_info)
    if index.arrays:
        images, labels = index.items[split]
        return ArrayImageDataset(images, labels, index.classes, transform=tc, augment=aug, name=name,
                                 source=index.source, split_info=info)
    items = index.items[split]
    return FileListDataset([p for p, _ in items], [t for _, t in items], index.classes, transform=tc, augment=aug,
                           name=name, source=index.source, split_info=info)
