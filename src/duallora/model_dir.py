"""A model that keeps learning: a model directory, its versions, and learning a folder as the next task.

``duallora learn MODEL_DIR FOLDER`` (and :meth:`ContinualModel.learn`) learns the classes of FOLDER
(one subfolder per class, :mod:`duallora.task_folder`) as the next task of the model in MODEL_DIR,
creating the model on first use from a config (defaults as in ``duallora run``). The layout
(format 1, docs/model-directory.md)::

    MODEL_DIR/model.json                       format, format_version, current, versions, last_version
    MODEL_DIR/versions/0001/model.safetensors  what the method keeps after the version's task (no image, no path)
    MODEL_DIR/versions/0001/version.json       the version's record: parent, task, classes, images, data hash, times
    MODEL_DIR/versions/0001/evaluations.json   evaluations of this version (``duallora evaluate``), when any
    MODEL_DIR/.lock                            the lock file (``flock``) of learn/rollback

Versions are atomic: a learn writes ``versions/.staging-<pid>/``, renames it to ``versions/NNNN`` and
then replaces ``model.json`` (write to a temporary file, fsync, rename), the single commit point. A
learn that stops before that rename (Ctrl-C, SIGTERM, ``kill -9``, an error) leaves ``model.json``,
hence the model, exactly as it was; the next learn removes what it left
(:func:`~duallora.model_format.remove_leftovers`).
A second learn or rollback while one runs gets a clear error (``flock`` on ``.lock``, released by the
kernel when the process dies, so a killed learn never leaves a stale lock).

A run folder of ``duallora run`` is read as a model directory whose versions are its tasks
(:func:`run_history`): ``predict --version K``, ``history`` and ``evaluate`` work on it too.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from duallora.errors import CheckpointError, ConfigError, DataError
from duallora.model_format import (  # noqa: F401  (re-exported: the model directory's public names)
    CHECKPOINT,
    EVALUATIONS,
    FORMAT,
    FORMAT_VERSION,
    LOCK,
    MODEL_FILE,
    RECORD,
    STAGING_PREFIX,
    VERSIONS,
    VersionInfo,
    elapsed,
    is_model_dir,
    leftovers_only,
    locked,
    next_version_number,
    now_iso,
    read_model_file,
    remove_leftovers,
    version_dir,
    version_info,
    version_record,
)

#: Config keys an existing model's learn may change: how it trains and runs, not what it is.
CHANGEABLE = ("train.", "data.check_images", "data.num_workers", "seed")
#: Config keys fixed when a model is created: a learn whose config changes one is refused. Other keys
#: (``data.dataset``, ``data.root``, ...) do not apply to learning a folder and are ignored.
FIXED = ("backbone.", "method.", "data.num_tasks", "data.classes_per_task")

Echo = Callable[[str], None]

# ------------------------------------------------------------------------------------------ the model


class ContinualModel:
    """A model directory: versions of one continual learner, each after one more task.

    Open (or plan to create) one with :meth:`open`; :meth:`learn` adds a version, :meth:`predict_files`,
    :meth:`evaluate` and :meth:`learner` use the current version (or the one asked for), :meth:`history`
    lists them, :meth:`rollback` makes an earlier one current. See the module docstring for the layout.

    Example::

        model = ContinualModel.open("my-model", overrides=["train.epochs=1"])
        model.learn("new-classes/")                      # version 1 (the model is created here)
        model.learn("more-classes/")                     # version 2
        print(model.predict_files(["photo.png"])[0].class_name)
        print(model.evaluate("labelled-test/")["accuracy"])
        model.rollback(1)
    """

    def __init__(self, root: Path, config_items: Sequence[str] = (), config_file: Optional[Path] = None) -> None:
        self.root = Path(root)
        self.config_items = list(config_items)
        self.config_file = Path(config_file) if config_file is not None else None

    @classmethod
    def open(cls, root: str | Path, config: Optional[str | Path] = None,
             overrides: Sequence[str] = ()) -> "ContinualModel":
        """A model directory to use; it is created by the first :meth:`learn` if it does not exist.

        Args:
            root: the model directory.
            config: a YAML preset for a new model (or one that only changes training keys of an
                existing one; see :data:`CHANGEABLE`).
            overrides: ``key=value`` config overrides, as for ``duallora run``.

        Raises:
            CheckpointError: ``root`` exists, is not empty and is not a model directory, or its
                ``model.json`` is of a newer format.
        """
        root = Path(root)
        if root.exists():
            if not root.is_dir():
                raise CheckpointError(f"{str(root)!r} is a file; give a folder for the model directory")
            if is_model_dir(root):
                read_model_file(root)
            elif (root / "checkpoints").is_dir() or (root / "metrics.json").is_file():
                raise CheckpointError(f"{str(root)!r} is a run folder of `duallora run`: history, predict --version "
                                      "and evaluate read it, but it cannot learn further; start a model directory with "
                                      "`duallora learn NEW_MODEL_DIR FOLDER`")
            elif not leftovers_only(root):
                raise CheckpointError(f"{str(root)!r} is not empty and is not a duallora model directory; give a new "
                                      "or empty folder for a new model (nothing in it was changed)")
        return cls(root, list(overrides), Path(config) if config is not None else None)

    # ------------------------------------------------------------------ reading
    @property
    def exists(self) -> bool:
        """Whether the model has at least one version (``model.json`` exists)."""
        return is_model_dir(self.root)

    def model_file(self) -> dict[str, Any]:
        """The checked ``model.json`` (:func:`read_model_file`)."""
        return read_model_file(self.root)

    @property
    def current(self) -> int:
        """The current version's number."""
        return int(self.model_file()["current"])

    def _resolve(self, version: Optional[int]) -> int:
        data = self.model_file()
        if version is None:
            return int(data["current"])
        if int(version) not in data["versions"]:
            raise CheckpointError(f"{self.root} has no version {version}; its versions are "
                                  f"{', '.join(str(v) for v in data['versions'])} (duallora history {self.root})")
        return int(version)

    def checkpoint(self, version: Optional[int] = None) -> Path:
        """The checkpoint file of ``version`` (None = current)."""
        return version_dir(self.root, self._resolve(version)) / CHECKPOINT

    def record(self, version: Optional[int] = None) -> dict[str, Any]:
        """The ``version.json`` record of ``version`` (None = current), with its evaluations."""
        return version_record(self.root, self._resolve(version))

    def history(self) -> list[VersionInfo]:
        """Every committed version, oldest first (:class:`VersionInfo`)."""
        data = self.model_file()
        return [version_info(version_record(self.root, int(v)), int(data["current"])) for v in data["versions"]]

    def class_names(self, version: Optional[int] = None) -> dict[int, str]:
        """``{class id: name}`` of every class the version knows."""
        return {int(c["id"]): str(c["name"]) for c in self.record(version)["classes"]}

    def learner(self, version: Optional[int] = None, overrides: Sequence[str] = ()) -> Any:
        """The :class:`~duallora.training.ContinualLearner` of ``version`` (None = current).

        Args:
            overrides: inference options (``duallora.predict.EVALUATE_OVERRIDE_KEYS``: device, threads,
                precision, batch size).
        """
        from duallora import config as config_mod
        from duallora.backbones import create_backbone
        from duallora.predict import inference_overrides
        from duallora.training import ContinualLearner

        ckpt = self.checkpoint(version)
        _, meta = ContinualLearner.read_checkpoint(ckpt)
        stored = meta["config"]
        stored["train"]["progress"] = False
        for key, value in inference_overrides(list(overrides)).items():
            section, name = key.split(".", 1)
            stored[section][name] = value
        cfg = config_mod.from_dict(stored)
        return ContinualLearner.load(ckpt, backbone=create_backbone(cfg.backbone.name, cfg.backbone.weights), cfg=cfg)

    def predictor(self, version: Optional[int] = None, overrides: Sequence[str] = ()) -> Any:
        """A :class:`~duallora.predict.Predictor` of ``version`` with the model's class names."""
        from duallora.predict import Predictor

        number = self._resolve(version)
        return Predictor(self.learner(number, overrides), self.checkpoint(number), self.class_names(number))

    def predict_files(self, files: Sequence[str | Path], *, top_k: int = 3, version: Optional[int] = None) -> list:
        """Predict image files (:meth:`duallora.predict.Predictor.predict_files`); unreadable files raise.

        Returns:
            one :class:`~duallora.predict.ImagePrediction` per file, in order.

        Raises:
            DataError: a file cannot be read as an image.
        """
        result = self.predictor(version).predict_files([Path(f) for f in files], top_k=top_k)
        if result.errors:
            path, message = result.errors[0]
            raise DataError(f"cannot read {path} ({message})")
        return result.predictions

    def evaluate(self, folder: str | Path, *, version: Optional[int] = None, output: Optional[Path] = None,
                 record: bool = True, overrides: Sequence[str] = (), convert_channels: bool = False) -> dict[str, Any]:
        """Evaluate a version on a labelled folder of known classes
        (:func:`~duallora.folder_evaluation.evaluate_folder`).

        Args:
            record: add the result to the version's evaluations (``history`` shows the latest); while another
                process holds the lock it is not recorded: ``result["recorded"]`` is False and
                ``result["not_recorded"]`` says why.
            output: also write ``evaluation.json`` and ``confusion_matrix.png`` into this new folder.
            convert_channels: accept images whose channels differ from the backbone's.

        Raises:
            DataError: the folder's classes are not all known to the version, or bad images.
        """
        from duallora.folder_evaluation import evaluate_folder, record_evaluation, write_evaluation

        number = self._resolve(version)
        result = evaluate_folder(self.predictor(number, overrides), self.record(number), folder,
                                 convert_channels=convert_channels)
        result["version"] = number
        if output is not None:
            write_evaluation(Path(output), result)
        result["recorded"] = False
        if record:
            try:
                with locked(self.root, f"duallora evaluate {self.root}"):
                    record_evaluation(version_dir(self.root, number), result)
                result["recorded"] = True
            except CheckpointError:  # a learn or rollback holds the lock: the result stands, unrecorded
                result["not_recorded"] = (f"not recorded in the history of {self.root}: another duallora process "
                                          "(a learn or rollback) holds the model directory's lock; the result is "
                                          "complete")
        return result

    # ------------------------------------------------------------------ changing
    def rollback(self, version: int, *, prune: bool = False) -> list[int]:
        """Make ``version`` current; with ``prune`` delete the versions numbered after it.

        Returns:
            the versions deleted.

        Raises:
            CheckpointError: no such version, or another process holds the lock.
        """
        from duallora.reporting import write_json_atomic

        with locked(self.root, f"duallora rollback {self.root} {version}"):
            data = self.model_file()
            number = self._resolve(version)
            self.record(number)  # the version's files must be readable before it becomes current
            _checkpoint_metadata(version_dir(self.root, number) / CHECKPOINT)
            gone = [int(v) for v in data["versions"] if int(v) > number] if prune else []
            data["last_version"] = max([int(data.get("last_version", 0))] + [int(v) for v in data["versions"]])
            data["current"] = number
            data["versions"] = [int(v) for v in data["versions"] if int(v) not in gone]
            write_json_atomic(self.root / MODEL_FILE, data)  # the commit point
            for v in gone:
                shutil.rmtree(version_dir(self.root, v), ignore_errors=True)
            return gone

    def learn(self, folder: str | Path, *, eval_folder: Optional[str | Path] = None, convert_channels: bool = False,
              echo: Echo = print) -> VersionInfo:
        """Learn the classes of ``folder`` as the next task and commit them as a new version.

        The new version's parent is the current one (after a rollback, the version rolled back to).
        Everything is checked before training (:mod:`duallora.task_folder`, the config against the
        model's); on any error or interruption the model stays exactly as it was.

        Args:
            folder: one subfolder of images per class, none of them a class the model knows.
            eval_folder: a labelled folder of known classes (these and earlier ones) evaluated after
                learning, recorded with the version (``history`` shows the accuracy).
            convert_channels: accept grey images for an RGB backbone (and colour for a grey one).
            echo: where progress lines go.

        Returns:
            the new version.

        Raises:
            DataError: bad folder (see :mod:`duallora.task_folder`), a class the model knows already.
            ConfigError: a config that changes the backbone, the method or its settings of an
                existing model, or a bad config.
            CheckpointError: another learn runs on this directory, or a damaged directory.
            DualLoRAError subclasses from training (e.g. a diverged loss).
            KeyboardInterrupt: interrupted; the model is unchanged.
        """
        from duallora.model_learning import learn_version

        top = self.root.absolute()  # the topmost folder this learn creates (None: the model folder existed)
        created: Optional[Path] = None
        while not top.exists():
            created, top = top, top.parent
        lock_existed = (self.root / LOCK).exists()
        before = self.current if self.exists else None
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with locked(self.root, f"duallora learn {self.root} {folder}"):
                if is_model_dir(self.root):
                    read_model_file(self.root)  # a damaged model.json stops here, before anything is removed
                remove_leftovers(self.root)
                return learn_version(self, Path(folder), eval_folder=eval_folder,
                                     convert_channels=convert_channels, echo=echo)
        except KeyboardInterrupt as exc:
            self._clean_failed_first(created, lock_existed)
            now = self.current if self.exists else None
            if now != before:  # stopped after the commit: the new version is complete and current
                message = f"interrupted after version {now} of {self.root} was committed; it is the current version"
            elif now is None:
                message = f"interrupted; no model was created in {self.root}"
            else:
                message = f"interrupted; the model in {self.root} is unchanged (current version {now})"
            raise KeyboardInterrupt(message) from exc
        except BaseException:
            self._clean_failed_first(created, lock_existed)
            raise

    def _clean_failed_first(self, created: Optional[Path], lock_existed: bool) -> None:
        """After a failed first learn, remove what it made (the folders it created, or its lock file and
        ``versions/`` in a folder that was empty): leave nothing behind."""
        if not is_model_dir(self.root):
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif not lock_existed:
                (self.root / LOCK).unlink(missing_ok=True)
                shutil.rmtree(self.root / VERSIONS, ignore_errors=True)

    def config_for_learn(self) -> tuple[Any, Optional[dict[str, Any]]]:
        """``(config of the next learn, model.json or None for a new model)``.

        A new model's config is the preset (or the defaults) with the overrides; an existing model's is
        its stored config with the changeable keys (:data:`CHANGEABLE`) of the preset and overrides.

        Raises:
            ConfigError: a bad config, or one that changes the backbone, method or method settings of an
                existing model.
        """
        from duallora import config as config_mod
        from duallora.methods import get_method

        given = config_mod.load_config(self.config_file, self.config_items)
        if not self.exists:
            if not get_method(given.method.name).learns_without_old_images:
                raise ConfigError(f"method {given.method.name!r} needs the images of every earlier task to learn a "
                                  "new one (a non-continual reference), and a model directory keeps no image; "
                                  "choose a continual method (e.g. method.name=duallora)")
            if given.data.augment:
                raise ConfigError("data.augment=true is not supported for image folders (as in `duallora run` "
                                  "with data.dataset=imagefolder); leave it out")
            d = config_mod.to_dict(given)
            d["data"]["dataset"] = "imagefolder"
            d["data"]["root"] = None
            return config_mod.from_dict(d), None
        data = self.model_file()
        stored = config_mod.to_dict(config_mod.from_dict(self.record()["config"]))
        if self.config_file is None and not self.config_items:
            return config_mod.from_dict(stored), data
        new = config_mod.to_dict(given)
        asked = set(_explicit_keys(self.config_file, self.config_items))
        changed = []
        for key in sorted(asked):
            section, _, name = key.partition(".")
            old_value = stored.get(section, {}).get(name) if name else stored.get(section)
            new_value = new.get(section, {}).get(name) if name else new.get(section)
            if old_value == new_value:
                continue
            if key.startswith(FIXED):
                changed.append(f"{key} ({old_value!r} -> {new_value!r})")
                continue
            if not key.startswith(CHANGEABLE):
                continue
            if name:
                stored[section][name] = new_value
            else:
                stored[section] = new_value
        if changed:
            raise ConfigError(
                f"the config given changes {', '.join(changed)} of the model in {self.root}; an existing model's "
                "backbone, method, method settings and data.num_tasks are fixed when it is created. Keep them (train.* "
                "keys, seed and data.check_images may change), or start a new model directory")
        return config_mod.from_dict(stored), data


def _explicit_keys(config_file: Optional[Path], items: Sequence[str]) -> list[str]:
    """Dotted keys a preset file and ``key=value`` items set explicitly."""
    keys = [item.split("=", 1)[0].strip() for item in items if "=" in item]
    if config_file is not None:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True) or {}
        for section, value in raw.items():
            if isinstance(value, dict):
                keys += [f"{section}.{k}" for k in value]
            else:
                keys.append(str(section))
    return keys


# ------------------------------------------------------------------------------------------ run folders


def _checkpoint_metadata(path: Path) -> dict[str, Any]:
    """A checkpoint's duallora metadata without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["duallora"])
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}: {exc})") from exc


def run_history(path: str | Path) -> list[VersionInfo]:
    """The versions of a ``duallora run`` folder: version K is its ``task_K`` checkpoint.

    ``accuracy`` is the mean accuracy over the tasks seen after task K (the run's accuracy-matrix row).

    Raises:
        CheckpointError: neither a model directory nor a run folder with checkpoints.
    """
    from duallora.config import from_dict
    from duallora.predict import class_names_for
    from duallora.runner import find_checkpoints

    files = find_checkpoints(Path(path))
    out: list[VersionInfo] = []
    for k, f in enumerate(files, start=1):
        meta = _checkpoint_metadata(f)
        classes = [int(c) for c in meta["task_classes"][-1]]
        names, _ = class_names_for(Path(path), from_dict(meta["config"]), classes)
        task_record = (meta.get("history") or [{}])[-1]
        rows = (meta.get("extra") or {}).get("accuracy_rows") or []
        accuracy = sum(rows[-1]) / len(rows[-1]) if rows and rows[-1] else None
        out.append(VersionInfo(number=k, parent=k - 1 or None, task=len(meta["task_classes"]),
                               classes_added=[names[c] for c in classes],
                               images=int(task_record.get("train_images", 0)),
                               created=datetime.fromtimestamp(f.stat().st_mtime, timezone.utc)
                               .replace(microsecond=0).isoformat(),
                               learn_time_s=task_record.get("task_time_s"), data_sha256=None, accuracy=accuracy,
                               current=k == len(files), record={"checkpoint": str(f)}))
    return out


def model_history(path: str | Path) -> list[VersionInfo]:
    """The versions of a model directory (:meth:`ContinualModel.history`) or of a run folder (:func:`run_history`).

    Raises:
        CheckpointError: neither.
    """
    if is_model_dir(path):
        return ContinualModel.open(path).history()
    if not Path(path).exists():
        raise CheckpointError(f"no model directory or run folder at {str(path)!r}; create a model with "
                              f"`duallora learn {path} FOLDER`")
    from duallora.runner import derived_source

    if (source := derived_source(Path(path))) is not None:
        raise CheckpointError(f"{path} was made by duallora compare from the checkpoints of {source} and has no "
                              f"versions of its own: `duallora history {source}` lists them")
    if Path(path).is_dir() and not (Path(path) / "checkpoints").is_dir():
        raise CheckpointError(f"{str(path)!r} is neither a duallora model directory (no {MODEL_FILE}) nor a run "
                              "folder (no checkpoints/); create a model with `duallora learn MODEL_DIR FOLDER`")
    return run_history(path)


def refuse_inside_model(output: Optional[str | Path]) -> None:
    """Refuse an output path inside a model directory (its files are duallora's alone).

    Raises:
        ConfigError: ``output`` lies in (or is) a folder holding a ``model.json``.
    """
    if output is None:
        return
    p = Path(output).absolute()
    for folder in [p, *p.parents]:
        if is_model_dir(folder):
            raise ConfigError(f"--output {output} lies inside the model directory {folder}, whose files only duallora "
                              "writes; give a path outside it (nothing was written)")
