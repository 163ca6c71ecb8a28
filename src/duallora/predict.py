"""Predict the classes of image files with a trained run (``duallora predict``).

:func:`load_predictor` rebuilds the learner of a run folder's last checkpoint (or of one checkpoint
file) and finds its class names; :meth:`Predictor.predict_files` reads image files exactly as the
run's dataset reads its images and predicts them in batches, without task labels::

    predictor = load_predictor("runs/my-run")
    result = predictor.predict_files(find_images(["photos/"]).files, top_k=3)
    print(format_csv(result.predictions, top_k=3))

Images are converted as in training: ``imagefolder``, ``mnist`` and ``fashion-mnist`` runs read a
file as :class:`~duallora.data.datasets.ImageFolderDataset` does (PIL mode ``L`` or ``RGB`` for the
backbone's channels, bilinear antialiased resize to its input size); the benchmark datasets
(``cifar100``, ``imagenet-r``, ...) as their evaluation split does (the backbone's timm transform:
resize the shorter side to ``size / crop_pct``, centre crop). The dataset classes themselves read
the files, so a fix to how they open images applies here too.

Tasks are numbered from 1 in every output, as in the lines ``duallora run`` prints
(``task 1/5 ...``) and the checkpoint names (``task_1.safetensors``).

This module also holds the ``key=value`` overrides that ``duallora evaluate`` accepts
(:data:`EVALUATE_OVERRIDE_KEYS`, :func:`inference_overrides`): options that change how a trained
model is run, never the model.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from duallora.errors import CheckpointError, ConfigError, DataError

#: Keys ``duallora evaluate`` accepts as ``key=value`` overrides: they change where and how fast a
#: trained model is evaluated, not the model (``train.precision`` changes the arithmetic of inference,
#: so results may differ in the last digits).
EVALUATE_OVERRIDE_KEYS = (
    "train.eval_batch_size",
    "train.threads",
    "train.device",
    "train.precision",
    "train.progress",
    "data.root",
    "data.num_workers",
    "data.evaluate_on",
)


def inference_overrides(items: Sequence[str], allowed: Sequence[str] = EVALUATE_OVERRIDE_KEYS) -> dict[str, Any]:
    """Parse ``key=value`` overrides limited to ``allowed`` keys into ``{dotted key: typed value}``.

    Values are typed and checked as :func:`duallora.config.load_config` does (``train.threads=0`` and
    ``train.precision=fp8`` are errors); a later item for the same key wins.

    Raises:
        ConfigError: an item that is not ``key=value``, an unknown key, a key outside ``allowed``
            (naming the allowed ones) or a bad value.
    """
    from duallora import config as config_mod

    items = list(items)
    keys: list[str] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.eval_batch_size=512)")
        key = item.split("=", 1)[0].strip()
        if key not in allowed:
            what = ("is an unknown config key" if not _is_config_key(key)
                    else "cannot be overridden: it would change the trained model, its data or how it predicts")
            raise ConfigError(
                f"{key} {what}; re-evaluating a trained run accepts only {', '.join(allowed)} "
                "(to evaluate another calibration or task-identity score of a duallora run, use "
                "`duallora compare`, which derives such variants from its checkpoints)"
            )
        if key not in keys:
            keys.append(key)
    if not items:
        return {}
    cfg = config_mod.load_config(None, items)
    return {key: _get(cfg, key) for key in keys}


def _is_config_key(dotted: str) -> bool:
    from duallora.config import RunConfig

    obj: Any = RunConfig()
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------------------ images


@dataclass
class ImageList:
    """Image files found under the paths given, in the order given (folders sorted, recursively).

    Attributes:
        files: image files to predict (each once).
        missing: ``(path, reason)`` for paths that do not exist.
    """

    files: list[Path] = field(default_factory=list)
    missing: list[tuple[Path, str]] = field(default_factory=list)


def find_images(paths: Sequence[str | Path]) -> ImageList:
    """Expand image files and folders into the files to predict.

    A file is taken whatever its extension (it was named on purpose); a folder contributes every
    file below it, recursively, with an image extension (``IMAGE_EXTENSIONS`` of
    :mod:`duallora.data.datasets`, case-insensitive), hidden files and folders excluded, sorted.
    A file reached twice is listed once.

    Raises:
        DataError: no image file at all (names the paths and the accepted extensions), or none of
            the paths exists.
    """
    from duallora.data.datasets import IMAGE_EXTENSIONS

    out = ImageList()
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.files.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*")
                if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
            for q in found:
                add(q)
        elif p.exists():
            add(p)
        else:
            out.missing.append((p, "no such file or folder"))
    if not out.files and not out.missing:
        raise DataError(f"no image files in {', '.join(str(p) for p in paths)} "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if not out.files:  # nothing that exists: bad input, not a partly failed prediction
        raise DataError(f"none of the paths given exists: {', '.join(str(p) for p, _ in out.missing)}; "
                        "give image files or folders")
    return out


# ------------------------------------------------------------------------------------------ model


@dataclass
class TopClass:
    """One of an image's ``k`` most probable classes."""

    class_id: int
    class_name: str
    probability: float


@dataclass
class ImagePrediction:
    """The prediction for one image file.

    Attributes:
        path: the file.
        class_id: predicted dataset label id (as in ``class_order.json``).
        class_name: its name.
        task: predicted task, numbered from 1 (``argmax_j p(j | x)``; with calibration it is the
            task of the predicted class, without calibration it may differ).
        task_confidence: ``max_j p(j | x)``, the learner's confidence in that task, in [0, 1].
        top_k: the most probable classes, most probable first (``top_k[0]`` is the prediction;
            equal probabilities, e.g. 0 for the classes of a task the image surely is not in, in
            class order).
    """

    path: Path
    class_id: int
    class_name: str
    task: int
    task_confidence: float
    top_k: list[TopClass]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``path`` as a string)."""
        return {"path": str(self.path), "class_id": self.class_id, "class_name": self.class_name,
                "task": self.task, "task_confidence": self.task_confidence,
                "top_k": [{"class_id": c.class_id, "class_name": c.class_name, "probability": c.probability}
                          for c in self.top_k]}


@dataclass
class PredictResult:
    """Predictions of the readable files and ``(path, message)`` for each unreadable one."""

    predictions: list[ImagePrediction]
    errors: list[tuple[Path, str]]


def resolve_checkpoint(path: str | Path) -> tuple[Path, Optional[Path], Optional[Path]]:
    """The checkpoint to predict with: ``(checkpoint file, run folder or None, config file or None)``.

    A run folder (finished, or an interrupted ``DIR.partial``) gives its last ``task_K.safetensors``;
    a checkpoint file gives itself, and its run folder when it lies in ``RUN/checkpoints/``. A run made
    by ``duallora compare`` from another run's checkpoints (``derived_from`` in its ``metrics.json``)
    gives the source's last checkpoint and its own ``config.yaml``, which predicts as that run did.
    The config file is None when the checkpoint's stored config applies.

    Raises:
        CheckpointError: no checkpoint found.
    """
    from duallora.runner import derived_source, find_checkpoints

    p = Path(path)
    if (source := derived_source(p)) is not None:
        return find_checkpoints(source)[-1], p, p / "config.yaml"
    if not p.exists() and Path(str(p) + ".partial").is_dir():  # an interrupted run: its finished tasks
        p = Path(str(p) + ".partial")
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} is neither a checkpoint file nor a run folder")
    files = find_checkpoints(p)
    ckpt = files[-1]
    if p.is_file():
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    else:
        run = p.parent if p.name == "checkpoints" else p
    return ckpt, run, None


def class_names_for(run: Optional[Path], cfg: Any, labels: Sequence[int]) -> tuple[dict[int, str], Optional[str]]:
    """Names of the dataset label ids ``labels``: ``({label id: name}, warning or None)``.

    From the run's ``class_order.json`` (written when the run starts); else the fixed names of
    ``mnist``/``fashion-mnist``; else the label ids themselves, with a warning saying so.
    """
    from duallora.data.datasets import FASHION_MNIST_CLASSES, MNIST_CLASSES

    if run is not None:
        record = run / "class_order.json"
        try:
            data = json.loads(record.read_text())
            names = dict(zip((int(c) for c in data["class_order"]), (str(n) for n in data["class_names"])))
        except (OSError, ValueError, KeyError, TypeError):
            names = {}
        if names and all(int(c) in names for c in labels):
            return {int(c): names[int(c)] for c in labels}, None
    fixed = {"mnist": MNIST_CLASSES, "fashion-mnist": FASHION_MNIST_CLASSES}.get(cfg.data.dataset)
    if fixed is not None and all(0 <= int(c) < len(fixed) for c in labels):
        return {int(c): fixed[int(c)] for c in labels}, None
    where = f"{run / 'class_order.json'}" if run is not None else "class_order.json beside the checkpoint"
    return ({int(c): str(int(c)) for c in labels},
            f"no class names found ({where} is missing or does not list the checkpoint's classes); "
            "class names are the dataset label ids")


class Predictor:
    """A trained learner with its class names and the image reader of its run's dataset.

    Build it with :func:`load_predictor`.

    Attributes:
        learner: the :class:`~duallora.training.ContinualLearner`.
        checkpoint: the checkpoint file it was loaded from.
        class_names: ``{dataset label id: name}`` of every seen class.
        warnings: notes for the user (e.g. class names that could not be found).
    """

    def __init__(self, learner: Any, checkpoint: Path, class_names: dict[int, str],
                 warnings: Optional[list[str]] = None) -> None:
        self.learner = learner
        self.checkpoint = checkpoint
        self.class_names = class_names
        self.warnings = list(warnings or [])

    def reader(self, files: Sequence[Path]) -> Callable[[int], torch.Tensor]:
        """``read(i)``: file ``i`` as the backbone's ``uint8 (C, H, W)`` input, read as the run's
        dataset reads its images (module docstring).

        Raises (from ``read``):
            DataError: the file cannot be read as an image.
        """
        from duallora.data.benchmarks import FileListDataset
        from duallora.data.datasets import BENCHMARK_DATASETS, ImageFolderDataset
        from duallora.data.transforms import resolve_transform_config

        cfg = self.learner.cfg
        info = self.learner.backbone_info
        channels, height, width = (int(v) for v in info.input_size)
        if cfg.data.dataset in BENCHMARK_DATASETS:
            tc = resolve_transform_config(cfg.backbone.name, info.input_size, crop_pct=cfg.data.crop_pct,
                                          mean=info.mean, std=info.std)
            dataset: Any = FileListDataset([str(f) for f in files], [0] * len(files), ["?"], transform=tc,
                                           augment=False, name="predict", source="", split_info={})
        else:
            dataset = ImageFolderDataset(list(files), [0] * len(files), ["?"], image_size=(height, width),
                                         channels=channels)
        return lambda i: dataset[i][0]

    def predict_files(self, files: Sequence[Path], *, top_k: int = 3, batch_size: Optional[int] = None,
                      on_error: Optional[Callable[[Path, str], None]] = None) -> PredictResult:
        """Predict every readable file in batches; unreadable files are reported, not fatal.

        Args:
            files: image files.
            top_k: how many of the most probable classes each prediction lists (at most the number
                of seen classes).
            batch_size: images per forward pass; None = the run's ``train.eval_batch_size``.
            on_error: called with ``(path, message)`` for each file that cannot be read, as it happens.

        Returns:
            the predictions in the order of ``files`` (unreadable ones left out) and the errors
            (the message names the reader's error, e.g. ``UnidentifiedImageError: ...``).
        """
        from PIL import Image

        if top_k < 1:
            raise ConfigError(f"--top-k {top_k} must be at least 1")
        batch_size = batch_size or self.learner.cfg.train.eval_batch_size
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size} must be at least 1")
        files = [Path(f) for f in files]
        read = self.reader(files)
        preds: list[ImagePrediction] = []
        errors: list[tuple[Path, str]] = []
        batch: list[tuple[Path, torch.Tensor]] = []
        for i, path in enumerate(files):
            try:
                batch.append((path, read(i)))
            except (DataError, OSError, ValueError, Image.DecompressionBombError) as exc:
                cause = exc.__cause__ if isinstance(exc, DataError) and exc.__cause__ is not None else exc
                message = f"{type(cause).__name__}: {cause}" if cause is not exc or not isinstance(exc, DataError) \
                    else str(exc)
                errors.append((path, message))
                if on_error is not None:
                    on_error(path, message)
            if len(batch) == batch_size or (i == len(files) - 1 and batch):
                preds += self._predict_batch(batch, top_k)
                batch = []
        return PredictResult(preds, errors)

    def _predict_batch(self, batch: list[tuple[Path, torch.Tensor]], top_k: int) -> list[ImagePrediction]:
        out = self.learner.predict(torch.stack([x for _, x in batch]))
        seen = self.learner.seen_labels
        k = min(top_k, out.probs.shape[1])
        # a stable descending sort puts the first of equal maxima first, as argmax does
        probs, order = torch.sort(out.probs.float(), dim=1, descending=True, stable=True)
        result = []
        for row, (path, _) in enumerate(batch):
            label = int(out.labels[row])
            top = [TopClass(seen[int(j)], self.class_names[seen[int(j)]], float(p))
                   for p, j in zip(probs[row, :k], order[row, :k])]
            result.append(ImagePrediction(path=path, class_id=label, class_name=self.class_names[label],
                                          task=int(out.tasks[row]) + 1,
                                          task_confidence=float(out.confidence[row]), top_k=top))
        return result


def load_predictor(path: str | Path, *, device: Optional[str] = None, threads: Optional[int] = None,
                   precision: Optional[str] = None, batch_size: Optional[int] = None) -> Predictor:
    """Load a run folder's last checkpoint (or a checkpoint file) for prediction.

    Args:
        path: run folder, its ``checkpoints/`` folder or a ``task_K.safetensors`` file
            (see :func:`resolve_checkpoint`).
        device: ``train.device`` to run on (``auto``, ``cpu``, ``cuda``, ...); None = the run's.
        threads: torch CPU threads; None = the run's ``train.threads``.
        precision: ``train.precision`` of inference (``fp32``, ``bf16``, ``fp16``); None = the run's.
        batch_size: stored as ``train.eval_batch_size`` (the default of :meth:`Predictor.predict_files`).

    Raises:
        CheckpointError, BackboneError, TrainingError, ConfigError: no or unreadable checkpoint, its
        backbone cannot be rebuilt, an unavailable device, a bad option.
    """
    from duallora import config as config_mod
    from duallora.backbones import create_backbone
    from duallora.training import ContinualLearner

    ckpt, run, config_file = resolve_checkpoint(path)
    _, meta = ContinualLearner.read_checkpoint(ckpt)
    if config_file is not None:
        stored = config_mod.to_dict(config_mod.load_config(config_file, stored=True))
    else:
        stored = meta["config"]
    stored["train"]["progress"] = False
    items = []
    if device is not None:
        items.append(f"train.device={device}")
    if threads is not None:
        items.append(f"train.threads={threads}")
    if precision is not None:
        items.append(f"train.precision={precision}")
    if batch_size is not None:
        items.append(f"train.eval_batch_size={batch_size}")
    for key, value in inference_overrides(items).items():
        section, name = key.split(".", 1)
        stored[section][name] = value
    cfg = config_mod.from_dict(stored)
    learner = ContinualLearner.load(ckpt, backbone=create_backbone(cfg.backbone.name, cfg.backbone.weights), cfg=cfg)
    if not learner.task_classes:
        raise CheckpointError(f"{ckpt} holds no learned task")
    names, warning = class_names_for(run, cfg, learner.seen_labels)
    return Predictor(learner, ckpt, names, [warning] if warning else [])


# ------------------------------------------------------------------------------------------ output

#: Leading CSV columns; ``top1_class, top1_prob, ..., topK_class, topK_prob`` follow.
CSV_COLUMNS = ("path", "class_id", "class_name", "task", "task_confidence")


def format_csv(predictions: Sequence[ImagePrediction], top_k: int) -> str:
    """One header line and one row per image: :data:`CSV_COLUMNS`, then ``topI_class, topI_prob`` for
    I = 1..K (K = ``top_k``, or fewer when the model knows fewer classes); probabilities to 6 decimals."""
    k = min([top_k] + [len(p.top_k) for p in predictions]) if predictions else top_k
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(CSV_COLUMNS) + [f"top{i}_{c}" for i in range(1, k + 1) for c in ("class", "prob")])
    for p in predictions:
        row: list[Any] = [str(p.path), p.class_id, p.class_name, p.task, f"{p.task_confidence:.6f}"]
        for c in p.top_k[:k]:
            row += [c.class_name, f"{c.probability:.6f}"]
        writer.writerow(row)
    return buf.getvalue()


def format_json(predictions: Sequence[ImagePrediction], errors: Sequence[tuple[Path, str]] = (),
                checkpoint: Optional[Path] = None) -> str:
    """``{"checkpoint", "predictions": [...], "errors": [{"path", "error"}]}`` as indented JSON."""
    data = {"checkpoint": str(checkpoint) if checkpoint is not None else None,
            "predictions": [p.to_dict() for p in predictions],
            "errors": [{"path": str(path), "error": message} for path, message in errors]}
    return json.dumps(data, indent=2) + "\n"
