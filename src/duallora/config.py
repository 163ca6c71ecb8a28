"""Run configuration: a typed schema, YAML presets and ``key=value`` overrides.

The schema is a tree of dataclasses validated by OmegaConf: an unknown key, a value of the wrong type
or a value outside its allowed set is a :class:`~duallora.errors.ConfigError`, never silently dropped
(field-lessons.md, lesson 7). Keys that the chosen method does not use must keep their defaults;
setting one is an error too (see :func:`check_method_keys`).

The ``method`` section is derived from the method registry (:mod:`duallora.methods.registry`):
:data:`MethodConfig` has ``name`` plus every option a registered method declares, ``CHOICES`` holds
the registered names and each option's choices, :data:`METHOD_KEYS` which method reads which key, and
each option's own check and the chosen method's ``validate_config`` run in :func:`validate`. All of
it is rebuilt whenever a method is registered, so no other file lists methods.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: F401
from omegaconf.errors import OmegaConfBaseException

from duallora.data import registry as data_registry
from duallora.errors import ConfigError
from duallora.methods import registry as method_registry
from duallora.methods.options import ADAPTABLE_MODULES, Option

__all__ = ["ADAPTABLE_MODULES"]  # re-exported from duallora.methods.options

DEFAULT_BACKBONE = "vit_tiny_patch7_28.duallora_mnist"


@dataclass
class DataConfig:
    """Which data and how it is cut into tasks (class-incremental)."""

    #: a registered data source (duallora.data.registry): mnist | fashion-mnist | imagefolder | cifar100 |
    #: imagenet-r | imagenet-a | domainnet | cub200 | tiny-imagenet
    dataset: str = "fashion-mnist"
    root: Optional[str] = None  #: local data folder (or archive); None = the dataset's default local files
    num_tasks: Optional[int] = 5  #: number of tasks (classes split evenly)
    classes_per_task: Optional[int] = None  #: alternative to num_tasks
    class_order: Optional[list[int]] = None  #: explicit class order (dataset label ids); else seeded shuffle
    shuffle_classes: bool = True  #: shuffle the class order with the run seed (False = natural order)
    train_per_class: Optional[int] = None  #: cap on training images per class (seeded), for quick runs
    test_per_class: Optional[int] = None  #: cap on test images per class (seeded)
    test_fraction: float = 0.2  #: imagefolder without train/test folders: held-out share per class
    #: only these classes: a list of class names or ids as the dataset labels them (tiny-imagenet: WordNet
    #: ids) or label ids, or a named list (tiny-imagenet-continual | tiny-imagenet-pretrain); label ids
    #: become 0..len-1 in its order; None = all
    classes: Any = None
    #: per class, this share of the training images (seeded, before train_per_class) is a validation
    #: split, never trained on; 0 = none
    validation_fraction: float = 0.0
    #: test | validation: the split evaluated after each task (validation needs validation_fraction > 0)
    evaluate_on: str = "test"
    num_workers: int = 0  #: DataLoader worker processes
    #: imagenet-r | imagenet-a | domainnet: split list file(s) of the training images (str or list; YAML
    #: data/targets or "path label" lines)
    split_train: Any = None
    split_test: Any = None  #: the test images' split list file(s); give both or neither
    #: expected sha256 of each split file read (str or list, in the record's split.files order; for
    #: tiny-imagenet the archive); mismatch = error
    split_sha256: Any = None
    #: training augmentation: random resized crop + horizontal flip (train split only; output stays uint8)
    augment: bool = False
    #: benchmarks: evaluation centre-crop fraction; None = the backbone's timm config (1.0 for the shipped one)
    crop_pct: Optional[float] = None
    #: imagefolder and the file-based benchmarks: check every image file (non-empty, header readable by
    #: PIL) when loading, before training; false = skip
    check_images: bool = True


@dataclass
class BackboneConfig:
    """The frozen pre-trained ViT."""

    name: str = DEFAULT_BACKBONE  #: full timm name with pretrained tag, or the shipped default
    weights: Optional[str] = None  #: local .safetensors/.pth file with the weights (no download then)


#: ``method.name`` when none is given.
DEFAULT_METHOD = "duallora"

#: The method section (built by :func:`_build_method_config`; rebuilt when the registry changes).
MethodConfig: type


def _build_method_config(options: dict[str, Option]) -> type:
    """The ``MethodConfig`` dataclass: ``name`` and one field per option, in registry order.

    Classes are cached by the options' signatures, so unregistering a method registered for a while
    (a test's) gives back the very class from before, and configs made before and after compare equal.
    """
    key = tuple((k, opt.signature()) for k, opt in options.items())
    if key in _METHOD_CONFIG_CLASSES:
        return _METHOD_CONFIG_CLASSES[key]
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=DEFAULT_METHOD))]
    fields += [(k, opt.type, opt.field()) for k, opt in options.items()]
    cls = dataclasses.make_dataclass("MethodConfig", fields)
    cls.__module__, cls.__qualname__ = __name__, "MethodConfig"  # pickles as duallora.config.MethodConfig
    readers = {k: [n for n in method_registry.method_names() if k in method_registry.method_options(n)]
               for k in options}
    lines = [f"    name: the method: {' | '.join(method_registry.method_names())} (default {DEFAULT_METHOD})."]
    own = {k: [f"{n}: {method_registry.get_method(n).option_defaults[k]!r}" for n in readers[k]
               if k in method_registry.get_method(n).option_defaults] for k in options}
    lines += [f"    {k}: {opt.help} (default {opt.default!r}"
              f"{''.join('; ' + d for d in own[k])}; read by {', '.join(readers[k])})."
              for k, opt in options.items()]
    cls.__doc__ = ("The continual-learning method and its options (method.md), derived from the methods' "
                   "declarations (duallora.methods).\n\nAttributes:\n" + "\n".join(lines) + "\n")
    _METHOD_CONFIG_CLASSES[key] = cls
    return cls


_METHOD_CONFIG_CLASSES: dict[tuple, type] = {}


def _default_method_config() -> Any:
    """A default method section of the current :data:`MethodConfig`."""
    return MethodConfig()


@dataclass
class TrainConfig:
    """Optimisation per task; every key is honoured exactly."""

    epochs: int = 2  #: least epochs per task (raised to reach min_steps)
    batch_size: int = 128  #: images per step (capped by max_batch_fraction on small tasks)
    #: least optimizer steps per task: epochs = max(epochs, ceil(min_steps / steps per epoch)); 0 = off
    min_steps: int = 100
    #: batch <= max(8, this share of the task's training images), in equal batches; None = no cap
    max_batch_fraction: Optional[float] = 0.25
    optimizer: str = "adam"  #: adam | adamw | sgd
    lr: float = 5e-4
    head_lr: Optional[float] = None  #: learning rate of the task heads; None = lr
    weight_decay: float = 0.0
    momentum: float = 0.9  #: sgd only
    scheduler: str = "cosine"  #: cosine | constant (per step, over all epochs of a task)
    #: clip the global L2 norm of the trained parameters' gradients to this (L2's 1.0); None = no clipping
    grad_clip: Optional[float] = None
    eval_batch_size: int = 256
    device: str = "auto"  #: auto | cpu | cuda | cuda:N | mps
    threads: Optional[int] = None  #: torch CPU threads; None = torch default
    progress: bool = True  #: show progress bars
    #: fp32 | bf16 | fp16 (autocast for training, statistics passes and inference; fp16 on CUDA only)
    precision: str = "fp32"
    compile: bool = False  #: torch.compile the training forward (GPU runs; slow to start on a CPU)
    tensorboard: bool = False  #: write TensorBoard logs to <run>/tensorboard/ (pip install duallora[tensorboard])


@dataclass
class RunConfig:
    """The whole run: seed, data, backbone, method, training."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=_default_method_config)
    train: TrainConfig = field(default_factory=TrainConfig)


#: Allowed values per dotted key; the ``method.*`` entries (the registered names, each option's
#: choices) are derived from the registry and come first.
CHOICES: dict[str, tuple[str, ...]] = {
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.scheduler": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
}
#: Method keys each method reads (its declared ``options``); a non-default value of any other method
#: key is an error. Derived from the registry.
METHOD_KEYS: dict[str, set[str]] = {}


def _derive_method_schema() -> None:
    """(Re)build :data:`MethodConfig`, the ``method.*`` entries of :data:`CHOICES` and
    :data:`METHOD_KEYS` from the registry (in place for the dicts, so imported references stay live)."""
    global MethodConfig
    options = method_registry.all_options()
    MethodConfig = _build_method_config(options)
    rest = {k: v for k, v in CHOICES.items() if not k.startswith("method.")}
    CHOICES.clear()
    CHOICES["method.name"] = method_registry.method_names()
    CHOICES.update({f"method.{k}": opt.choices for k, opt in options.items() if opt.choices})
    CHOICES.update(rest)
    METHOD_KEYS.clear()
    METHOD_KEYS.update({n: set(method_registry.method_options(n)) for n in method_registry.method_names()})


_derive_method_schema()
method_registry.add_listener(_derive_method_schema)


def validate_method(method: Any) -> None:
    """Check the method section: every registered option's own check (whatever the chosen method,
    like any schema range check), then the chosen method's ``validate_config``.

    Raises:
        ConfigError: naming the key, the bad value and what is allowed.
    """
    for key, opt in method_registry.all_options().items():
        opt.validate(key, method)
    method_registry.get_method(method.name).validate_config(method)


def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _holds_float(tp: Any) -> bool:
    """True for ``float`` and for types built from it (``Optional[float]``, ``list[float]``, unions)."""
    return tp is float or any(_holds_float(arg) for arg in typing.get_args(tp))


def float_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every float option of the schema, found from the dataclass field types.

    Args:
        cls: the dataclass to walk (sections are walked recursively); default the whole :class:`RunConfig`.
        prefix: prepended to the keys (``"train."`` for a section).

    Returns:
        e.g. ``["data.test_fraction", ..., "train.lr", "train.head_lr", ...]``, in schema order.
    """
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += float_keys(tp, f"{prefix}{f.name}.")
        elif _holds_float(tp):
            out.append(f"{prefix}{f.name}")
    return out


def _not_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_not_finite(v) for v in value)
    return False


def check_finite(cfg: RunConfig) -> None:
    """Reject NaN and +/-infinity in every float option (:func:`float_keys`).

    YAML and the overrides accept ``nan``, ``.inf``, ``-inf`` and overflowing literals (``1e999``) as
    floats; none of them is a usable setting, and they would otherwise fail deep in training (or, for
    NaN, pass every ``<``/``>`` range check).

    Raises:
        ConfigError: naming the first such key, its value and a finite value to use instead.
    """
    default = RunConfig()
    for key in float_keys():
        value = _get(cfg, key)
        if _not_finite(value):
            fallback = _get(default, key)
            example = "null (its default)" if fallback is None else f"{fallback!r} (its default)"
            raise ConfigError(
                f"{key}={value!r} is not a finite number (NaN and infinity are not allowed); "
                f"set {key} to a finite value, e.g. {key}={example}"
            )


def validate(cfg: RunConfig) -> RunConfig:
    """Check value ranges and combinations of a resolved config.

    Raises:
        ConfigError: naming the key, the bad value and what is allowed.
    """
    check_finite(cfg)
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be an integer in [0, 2**32)")
    if cfg.train.grad_clip is not None and not cfg.train.grad_clip > 0:
        raise ConfigError(f"train.grad_clip={cfg.train.grad_clip} must be > 0 (or null for no clipping)")
    if cfg.train.threads is not None and cfg.train.threads < 1:
        raise ConfigError(f"train.threads={cfg.train.threads} must be >= 1 (or null for torch's default)")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not supported; choose one of {', '.join(allowed)}")
    if cfg.data.dataset not in data_registry.source_names():
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} is not supported; choose one of "
                          f"{', '.join(data_registry.source_names())}")
    validate_method(cfg.method)
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if cfg.train.min_steps < 0:
        raise ConfigError(f"train.min_steps={cfg.train.min_steps} must be >= 0 (0 = train exactly train.epochs)")
    fraction = cfg.train.max_batch_fraction
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"train.max_batch_fraction={fraction} must lie in (0, 1] "
                          "(share of a task's training images per batch), or be null for no cap")
    if cfg.train.lr <= 0 or (cfg.train.head_lr is not None and cfg.train.head_lr <= 0):
        raise ConfigError("train.lr and train.head_lr must be > 0")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={cfg.train.weight_decay} must be >= 0 (0 = none)")
    if not 0.0 <= cfg.train.momentum < 1.0:
        raise ConfigError(f"train.momentum={cfg.train.momentum} must lie in [0, 1) (SGD's momentum, e.g. 0.9)")
    if cfg.data.num_tasks is None and cfg.data.classes_per_task is None:
        raise ConfigError("set data.num_tasks or data.classes_per_task")
    if cfg.data.num_tasks is not None and cfg.data.num_tasks < 1:
        raise ConfigError(f"data.num_tasks={cfg.data.num_tasks} must be >= 1")
    if cfg.data.classes_per_task is not None and cfg.data.classes_per_task < 1:
        raise ConfigError(f"data.classes_per_task={cfg.data.classes_per_task} must be >= 1")
    for key in ("train_per_class", "test_per_class"):
        value = getattr(cfg.data, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value} must be >= 1 (or null for all images)")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={cfg.data.test_fraction} must lie in (0, 1)")
    validate_data_split(cfg)
    validate_data_selection(cfg)
    check_method_keys(cfg)
    return cfg


def _str_list(key: str, value: Any) -> list[str]:
    """None, a string or a list of strings -> list of strings (ConfigError otherwise)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(
            f"data.{key}={value!r} must be a file path or a list of them (quote values that look like numbers)"
        )
    return list(items)


def _sources_with(flag: str) -> list[str]:
    """The registered data sources whose capability ``flag`` is set (:class:`~duallora.data.registry.DataSource`)."""
    return [n for n in data_registry.source_names() if getattr(data_registry.get_source(n), flag)]


def validate_data_split(cfg: RunConfig) -> None:
    """Check the split keys against the chosen data source's capabilities: split lists, their sha256, crop_pct.

    Raises:
        ConfigError: a malformed value, or a key the chosen dataset does not use.
    """
    import re

    d = cfg.data
    source = data_registry.get_source(d.dataset)
    train = _str_list("split_train", d.split_train)
    test = _str_list("split_test", d.split_test)
    hashes = _str_list("split_sha256", d.split_sha256)
    if (train or test) and not source.split_lists:
        raise ConfigError(
            f"data.split_train/split_test are set but data.dataset={d.dataset!r} does not use split lists "
            f"(only {', '.join(_sources_with('split_lists'))}); remove them"
        )
    if bool(train) != bool(test):
        raise ConfigError("give both data.split_train and data.split_test, or neither")
    if hashes and not source.split_files:
        raise ConfigError(
            f"data.split_sha256 is set but data.dataset={d.dataset!r} reads no split files "
            f"(only {', '.join(_sources_with('split_files'))}); remove it"
        )
    for h in hashes:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", h):
            raise ConfigError(f"data.split_sha256 entry {h!r} is not a sha256 (64 hex digits)")
    if d.crop_pct is not None:
        if not source.benchmark:
            raise ConfigError(
                f"data.crop_pct is set but data.dataset={d.dataset!r} resizes without cropping "
                f"(crop_pct is for {', '.join(_sources_with('benchmark'))}); remove it"
            )
        if not 0.0 < d.crop_pct <= 1.0:
            raise ConfigError(f"data.crop_pct={d.crop_pct} must lie in (0, 1]")


def validate_data_selection(cfg: RunConfig) -> None:
    """Check ``data.classes``, ``data.validation_fraction`` and ``data.evaluate_on``.

    Whether the listed classes exist is checked when the data is loaded (a DataError naming them).

    Raises:
        ConfigError: a malformed class list, an unknown list name, a class listed twice, a fraction
            outside [0, 1), or ``evaluate_on=validation`` without a validation split.
    """
    d = cfg.data
    named = data_registry.class_list_names()
    if isinstance(d.classes, str):
        if d.classes not in named:
            raise ConfigError(
                f"data.classes={d.classes!r} is not a named class list (choose one of {', '.join(named)}); "
                f"to name classes give a list, e.g. data.classes=[{d.classes}]"
            )
    elif d.classes is not None:
        entries = d.classes if isinstance(d.classes, (list, tuple)) else None
        if not entries or not all((isinstance(e, str) and e) or (type(e) is int and e >= 0) for e in entries):
            raise ConfigError(
                f"data.classes={d.classes!r} must be a non-empty list of class names or ids (strings) or label ids "
                f"(integers >= 0), a named list ({', '.join(named)}), or null for every class"
            )
        twice = sorted({repr(e) for e in entries if entries.count(e) > 1})
        if twice:
            raise ConfigError(f"data.classes lists {', '.join(twice)} more than once (a class twice); "
                              "list each class once")
    if not 0.0 <= d.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={d.validation_fraction} must lie in [0, 1) "
                          "(share of each class's training images held out; 0 = no validation split)")
    if d.evaluate_on not in ("test", "validation"):
        raise ConfigError(f"data.evaluate_on={d.evaluate_on!r} is not supported; choose one of test, validation")
    if d.evaluate_on == "validation" and d.validation_fraction == 0.0:
        raise ConfigError("data.evaluate_on=validation needs a validation split: set data.validation_fraction "
                          "(e.g. 0.1, the share of each class's training images held out)")


def check_method_keys(cfg: RunConfig) -> None:
    """Reject method options that the chosen method would ignore.

    Raises:
        ConfigError: when a key outside ``METHOD_KEYS[cfg.method.name]`` differs from its default.
    """
    used = METHOD_KEYS.get(cfg.method.name, set())
    inactive = _inactive_options(cfg)
    default = MethodConfig()
    for f in dataclasses.fields(MethodConfig):
        if f.name == "name" or (f.name in used and f.name not in inactive):
            continue
        if getattr(cfg.method, f.name) != getattr(default, f.name):
            if f.name in inactive:
                raise ConfigError(
                    f"method.{f.name} is set but method {cfg.method.name!r} reads it only with "
                    f"{inactive[f.name]}; remove it or add {inactive[f.name]}"
                )
            raise ConfigError(
                f"method.{f.name} is set but method {cfg.method.name!r} does not use it; "
                f"remove it (keys used by {cfg.method.name}: {', '.join(sorted(used)) or 'none'})"
            )


def _inactive_options(cfg: RunConfig) -> dict[str, str]:
    """The chosen method's options that it does not read under ``cfg.method`` (``inactive_options`` of its
    class); empty for an unknown method name (left to :func:`validate`'s own error)."""
    if cfg.method.name not in method_registry.method_names():
        return {}
    return method_registry.get_method(cfg.method.name).inactive_options(cfg.method)


def _friendly(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "Key" in type(exc).__name__ or "not in struct" in msg:
        return ConfigError(
            f"unknown config key {key!r} in {source}; `duallora run --print-config` lists the valid keys "
            "(commented in configs/default.yaml)"
        )
    if "Incompatible value 'None'" in msg:
        return ConfigError(f"invalid value for {key!r} in {source}: it cannot be empty or null; "
                           "`duallora run --print-config` shows its default and configs/default.yaml its choices")
    if "is not a ListConfig" in msg:
        return ConfigError(f"invalid value for {key!r} in {source}: it takes a list, e.g. {key}=[a,b] "
                           "(quote the whole override in a shell)")
    return ConfigError(f"invalid value for {key!r} in {source}: {msg}")


#: Keys added after runs were made whose default is exactly the behaviour from before they existed
#: (no clipping; plain concatenated heads): a stored run without them is the run with their default.
COMPATIBLE_ADDITIONS = frozenset({"train.grad_clip", "method.task_posterior", "method.classifier_alignment",
                                  "method.ncm_final", "method.class_scores",
                                  "method.protect_gate", "method.head_over_gate", "method.drift_compensation",
                                  "method.class_tau", "method.shrinkage", "method.stat_replay_mib"})


def missing_keys(path: str | Path) -> list[str]:
    """Dotted keys of the current schema that a stored run config (YAML) does not set.

    A run folder's ``config.yaml`` lists every key; keys it lacks were added after the run was made,
    so the run used the behaviour from before that key existed, which the key's current default need
    not reproduce (reuse and resume treat such runs as different). A ``method.*`` key that the run's
    method does not read (another method's option, added later) is not counted: it cannot have
    changed that run. Nor is a key of :data:`COMPATIBLE_ADDITIONS`: its default is the old behaviour.

    Raises:
        ConfigError: the file cannot be read or parsed.
    """
    try:
        raw = OmegaConf.to_container(OmegaConf.load(Path(path)))
    except Exception as exc:  # yaml errors come in many types
        raise ConfigError(f"cannot parse config file {str(path)!r}: {exc}") from exc
    raw = raw if isinstance(raw, dict) else {}
    out = []
    hints = typing.get_type_hints(RunConfig)  # the current MethodConfig for the method section
    for f in dataclasses.fields(RunConfig):
        section_type = hints[f.name]
        if not dataclasses.is_dataclass(section_type):  # a plain key (seed)
            if f.name not in raw:
                out.append(f.name)
            continue
        section = raw.get(f.name) if isinstance(raw.get(f.name), dict) else {}
        reads = METHOD_KEYS.get(section.get("name")) if f.name == "method" else None
        out += [f"{f.name}.{g.name}" for g in dataclasses.fields(section_type)
                if g.name not in section and (reads is None or g.name in reads or g.name == "name")]
    return [k for k in out if k not in COMPATIBLE_ADDITIONS]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, stored: bool = False) -> RunConfig:
    """Build a validated :class:`RunConfig` from defaults, an optional YAML file and overrides.

    The chosen method gets its own defaults (``option_defaults``) for the keys neither the file nor an
    override sets, unless ``stored``.

    Args:
        path: YAML preset (same tree as :class:`RunConfig`); None = defaults only.
        overrides: ``key=value`` strings with dotted keys, e.g. ``["train.epochs=1", "seed=3"]``.
        stored: ``path`` is a run's stored ``config.yaml``: a key it lacks was added after the run
            and takes its declared default (the behaviour from before it existed,
            :data:`COMPATIBLE_ADDITIONS`), not the method's own default.

    Raises:
        ConfigError: missing/unreadable file, unknown key, wrong type or out-of-range value.
    """
    schema = OmegaConf.structured(RunConfig)
    merged = schema
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; presets live in configs/")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as exc:  # yaml errors come in many types
            raise ConfigError(f"cannot parse config file {str(p)!r}: {exc}") from exc
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"config file {str(p)!r} must be a mapping of sections (seed, data, backbone, "
                              "method, train), like configs/default.yaml; it holds a list")
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as exc:
            raise _friendly(exc, str(p)) from exc
    if overrides:
        for item in overrides:
            if "=" not in item:
                hint = f"; to read a config file use --config {item}" if item.endswith((".yaml", ".yml")) else ""
                raise ConfigError(
                    f"override {item!r} is not of the form key=value (e.g. train.epochs=1){hint}"
                )
        for item in overrides:  # a value YAML cannot parse (e.g. an unquoted regex in a list) names its override
            try:
                OmegaConf.from_dotlist([item])
            except OmegaConfBaseException:
                pass  # reported with its key by the merge below
            except Exception as exc:  # yaml's parser and scanner errors
                raise ConfigError(
                    f"override {item!r}: its value is not valid YAML ({str(exc).splitlines()[0]}); quote values "
                    "and list entries that hold brackets, braces, colons or backslashes, e.g. "
                    "\"method.adapted_modules=['blocks\\.[0-2]\\.attn\\.qkv']\"") from None
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise _friendly(exc, "the command-line overrides") from exc
    if not stored:
        merged = _apply_method_defaults(merged, file_cfg if path is not None else None, overrides or [])
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, RunConfig)
    _reset_unused_file_keys(cfg, overrides or [])
    return validate(cfg)


def is_run_config(path: str | Path | None) -> bool:
    """Whether ``path`` is a run folder's stored ``config.yaml`` (the folder also holds the run's
    ``class_order.json`` or ``metrics.json``): read it with ``load_config(path, stored=True)`` so that a run
    made before a key existed is re-run as it was (README, "re-run it with `duallora run --config DIR/config.yaml`")."""
    if path is None:
        return False
    p = Path(path)
    return p.name == "config.yaml" and any((p.parent / m).is_file() for m in ("class_order.json", "metrics.json"))


def _apply_method_defaults(merged: DictConfig, file_cfg: Optional[DictConfig], overrides: list[str]) -> DictConfig:
    """Give the chosen method its own defaults (``option_defaults`` of its class) for the keys that
    neither the file's ``method`` section nor an override sets; every other key keeps the option's
    declared default. Unknown method names are left to :func:`validate`."""
    name = merged.method.name
    if name not in method_registry.method_names():
        return merged
    own = method_registry.get_method(name).option_defaults
    if not own:
        return merged
    given = {item.split("=", 1)[0].strip() for item in overrides}
    section = file_cfg.get("method") if file_cfg is not None else None
    if isinstance(section, DictConfig):
        given |= {f"method.{k}" for k in section.keys()}
    unset = {k: v for k, v in own.items() if f"method.{k}" not in given}
    return OmegaConf.merge(merged, {"method": unset}) if unset else merged


def _reset_unused_file_keys(cfg: RunConfig, overrides: list[str]) -> None:
    """Reset method keys that the chosen method does not read to their defaults, unless an override
    sets them: a preset tuned for DualLoRA (e.g. ``energy_threshold_end: 1.0``) then serves every
    method (``--config configs/cifar100_10tasks.yaml method.name=fecam``), while an override of a key
    the method ignores stays an error (:func:`check_method_keys`)."""
    used = METHOD_KEYS.get(cfg.method.name, set()) - set(_inactive_options(cfg))
    given = {item.split("=", 1)[0].strip() for item in overrides}
    default = MethodConfig()
    for f in dataclasses.fields(MethodConfig):
        if f.name != "name" and f.name not in used and f"method.{f.name}" not in given:
            setattr(cfg.method, f.name, getattr(default, f.name))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists (for YAML/JSON output and checkpoints)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text that :func:`load_config` reads back to an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of :func:`to_dict`, validated.

    Raises:
        ConfigError: as :func:`load_config`.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise _friendly(exc, "the stored config") from exc
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, RunConfig)
    return validate(cfg)
