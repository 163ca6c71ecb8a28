"""Run configuration: a typed schema, YAML presets and ``key=value`` overrides.

The schema is a tree of dataclasses validated by OmegaConf: an unknown key, a value of the wrong type
or a value outside its allowed set is a :class:`~duallora.errors.ConfigError`, never silently dropped
(field-lessons.md, lesson 7). Keys that the chosen method does not use must keep their defaults;
setting one is an error too (see :func:`check_method_keys`).
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

from duallora.errors import ConfigError

DEFAULT_BACKBONE = "vit_tiny_patch7_28.duallora_mnist"


@dataclass
class DataConfig:
    """Which data and how it is cut into tasks (class-incremental)."""

    dataset: str = "fashion-mnist"  #: mnist | fashion-mnist | imagefolder | cifar100 | imagenet-r | imagenet-a | domainnet | cub200
    root: Optional[str] = None  #: local data folder; None = the dataset's default local files
    num_tasks: Optional[int] = 5  #: number of tasks (classes split evenly)
    classes_per_task: Optional[int] = None  #: alternative to num_tasks
    class_order: Optional[list[int]] = None  #: explicit class order (dataset label ids); else seeded shuffle
    shuffle_classes: bool = True  #: shuffle the class order with the run seed (False = natural order)
    train_per_class: Optional[int] = None  #: cap on training images per class (seeded), for quick runs
    test_per_class: Optional[int] = None  #: cap on test images per class (seeded)
    test_fraction: float = 0.2  #: imagefolder without train/test folders: held-out share per class
    num_workers: int = 0  #: DataLoader worker processes
    split_train: Any = None  #: imagenet-r | imagenet-a | domainnet: split list file(s) of the training images (str or list; YAML data/targets or "path label" lines)
    split_test: Any = None  #: the test images' split list file(s); give both or neither
    split_sha256: Any = None  #: expected sha256 of each split file read (str or list, in the record's split.files order); mismatch = error
    augment: bool = False  #: training augmentation: random resized crop + horizontal flip (train split only; output stays uint8)
    crop_pct: Optional[float] = None  #: benchmarks: evaluation centre-crop fraction; None = the backbone's timm config (1.0 for the shipped one)
    check_images: bool = True  #: imagefolder and the file-based benchmarks: check every image file (non-empty, header readable by PIL) when loading, before training; false = skip



@dataclass
class BackboneConfig:
    """The frozen pre-trained ViT."""

    name: str = DEFAULT_BACKBONE  #: full timm name with pretrained tag, or the shipped default
    weights: Optional[str] = None  #: local .safetensors/.pth file with the weights (no download then)


@dataclass
class MethodConfig:
    """The continual-learning method and its options (method.md)."""

    name: str = "duallora"  #: duallora | frozen | seq-lora | inflora | sd-lora | l2p | simplecil | fecam | joint
    adapted_modules: list[str] = field(default_factory=lambda: ["qkv"])  #: qkv | proj | fc1 | fc2
    rank_orthogonal: int = 10  #: r_o, rank of the orthogonal adapter (also the LoRA rank of seq-lora, inflora, sd-lora, joint)
    rank_residual: int = 10  #: r_r, rank of each task's residual adapter (capped by memory dim)
    use_orthogonal: bool = True  #: ablation switch: train the orthogonal adapter
    use_residual: bool = True  #: ablation switch: train residual adapters (t >= 2)
    energy_threshold_start: float = 0.95  #: eps_1 of the GPM energy criterion
    energy_threshold_end: float = 0.99  #: eps_T; eps_t rises linearly in between
    stat_tokens: str = "all"  #: all | cls: tokens that feed the memory's Gram matrices
    stat_images: Optional[int] = 2000  #: images per task seen by the statistics passes (a seeded random subset); None = all
    gate: str = "shared"  #: shared | soft | hard: dynamic-memory gate type
    gate_layer: int = 2  #: gate=shared: gate from the mean tokens entering blocks 0..gate_layer; residual adapters in blocks >= gate_layer
    task_id_features: str = "auto"  #: auto | gate | final: task posterior used for calibration (auto: gate when gate=shared, else final)
    task_id_score: str = "mahalanobis"  #: mahalanobis | cosine | subspace
    subspace_dims: int = 32  #: q, directions per task for task_id_score=subspace
    tau_id: float = 0.02  #: temperature of the task posterior (on squared distances per dimension)
    ridge: float = 1e-4  #: ridge added to the pooled covariance, relative to its mean eigenvalue
    calibration: str = "product"  #: none | product | hard
    confidence_threshold: float = 0.9  #: gamma for calibration=hard
    prompt_pool: int = 10  #: l2p: prompts (and keys) in the pool
    prompt_length: int = 5  #: l2p: tokens per prompt
    prompt_top_k: int = 5  #: l2p: prompts chosen per image (top-N by key cosine similarity)
    prompt_key_weight: float = 0.1  #: l2p: weight of the surrogate key-matching loss


@dataclass
class TrainConfig:
    """Optimisation per task; every key is honoured exactly."""

    epochs: int = 2  #: least epochs per task (raised to reach min_steps)
    batch_size: int = 128  #: images per step (capped by max_batch_fraction on small tasks)
    min_steps: int = 100  #: least optimizer steps per task: epochs = max(epochs, ceil(min_steps / steps per epoch)); 0 = off
    max_batch_fraction: Optional[float] = 0.25  #: batch <= max(8, this share of the task's training images), in equal batches; None = no cap
    optimizer: str = "adam"  #: adam | adamw | sgd
    lr: float = 5e-4
    head_lr: Optional[float] = None  #: learning rate of the task heads; None = lr
    weight_decay: float = 0.0
    momentum: float = 0.9  #: sgd only
    scheduler: str = "cosine"  #: cosine | constant (per step, over all epochs of a task)
    eval_batch_size: int = 256
    device: str = "auto"  #: auto | cpu | cuda | cuda:N | mps
    threads: Optional[int] = None  #: torch CPU threads; None = torch default
    progress: bool = True  #: show progress bars
    precision: str = "fp32"  #: fp32 | bf16 | fp16 (autocast for training, statistics passes and inference; fp16 on CUDA only)
    compile: bool = False  #: torch.compile the training forward (GPU runs; slow to start on a CPU)
    tensorboard: bool = False  #: write TensorBoard logs to <run>/tensorboard/ (pip install duallora[tensorboard])


@dataclass
class RunConfig:
    """The whole run: seed, data, backbone, method, training."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "method.name": ("duallora", "frozen", "seq-lora", "inflora", "sd-lora", "l2p", "simplecil", "fecam", "joint"),
    "method.stat_tokens": ("all", "cls"),
    "method.gate": ("shared", "soft", "hard"),
    "method.task_id_features": ("auto", "gate", "final"),
    "method.task_id_score": ("mahalanobis", "cosine", "subspace"),
    "method.calibration": ("none", "product", "hard"),
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.scheduler": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
}
ADAPTABLE_MODULES = ("qkv", "proj", "fc1", "fc2")

#: Keys of the l2p prompt pool (duallora does not read them).
L2P_KEYS = {"prompt_pool", "prompt_length", "prompt_top_k", "prompt_key_weight"}

#: Method keys each method reads; a non-default value of any other method key is an error.
METHOD_KEYS: dict[str, set[str]] = {
    "duallora": {f.name for f in dataclasses.fields(MethodConfig)} - {"name"} - L2P_KEYS,
    "frozen": set(),
    "seq-lora": {"adapted_modules", "rank_orthogonal"},
    # baselines (duallora.baselines)
    "inflora": {"adapted_modules", "rank_orthogonal", "energy_threshold_start", "energy_threshold_end", "stat_images"},
    "sd-lora": {"adapted_modules", "rank_orthogonal"},
    "l2p": set(L2P_KEYS),
    "simplecil": {"tau_id"},
    "fecam": {"tau_id", "ridge"},
    "joint": {"adapted_modules", "rank_orthogonal"},
}


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
    if cfg.train.threads is not None and cfg.train.threads < 1:
        raise ConfigError(f"train.threads={cfg.train.threads} must be >= 1 (or null for torch's default)")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not supported; choose one of {', '.join(allowed)}")
    from duallora.data.datasets import DATASETS

    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} is not supported; choose one of {', '.join(DATASETS)}")
    for mod in cfg.method.adapted_modules:
        if mod not in ADAPTABLE_MODULES:
            raise ConfigError(
                f"method.adapted_modules contains {mod!r}; allowed: {', '.join(ADAPTABLE_MODULES)}"
            )
    if not cfg.method.adapted_modules and cfg.method.name != "frozen":
        raise ConfigError("method.adapted_modules is empty; name at least one of qkv, proj, fc1, fc2")
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "method.rank_orthogonal": cfg.method.rank_orthogonal,
        "method.rank_residual": cfg.method.rank_residual,
        "method.subspace_dims": cfg.method.subspace_dims,
        "method.prompt_pool": cfg.method.prompt_pool,
        "method.prompt_length": cfg.method.prompt_length,
        "method.prompt_top_k": cfg.method.prompt_top_k,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if cfg.method.stat_images is not None and cfg.method.stat_images < 1:
        raise ConfigError(f"method.stat_images={cfg.method.stat_images} must be a positive integer or null (all images)")
    if cfg.train.min_steps < 0:
        raise ConfigError(f"train.min_steps={cfg.train.min_steps} must be >= 0 (0 = train exactly train.epochs)")
    fraction = cfg.train.max_batch_fraction
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"train.max_batch_fraction={fraction} must lie in (0, 1] "
                          "(share of a task's training images per batch), or be null for no cap")
    if cfg.train.lr <= 0 or (cfg.train.head_lr is not None and cfg.train.head_lr <= 0):
        raise ConfigError("train.lr and train.head_lr must be > 0")
    if cfg.method.task_id_features == "gate" and cfg.method.gate != "shared":
        raise ConfigError("method.task_id_features=gate needs method.gate=shared; use task_id_features=final or auto")
    if cfg.method.tau_id <= 0:
        raise ConfigError(f"method.tau_id={cfg.method.tau_id} must be > 0")
    for key in ("energy_threshold_start", "energy_threshold_end"):
        value = getattr(cfg.method, key)
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"method.{key}={value} must lie in (0, 1]")
    if not 0.0 <= cfg.method.confidence_threshold <= 1.0:
        raise ConfigError("method.confidence_threshold must lie in [0, 1]")
    if cfg.method.prompt_top_k > cfg.method.prompt_pool:
        raise ConfigError(f"method.prompt_top_k={cfg.method.prompt_top_k} must not exceed "
                          f"method.prompt_pool={cfg.method.prompt_pool}")
    if cfg.method.prompt_key_weight < 0:
        raise ConfigError(f"method.prompt_key_weight={cfg.method.prompt_key_weight} must be >= 0")
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


def validate_data_split(cfg: RunConfig) -> None:
    """Check the benchmark keys: split lists, their sha256, crop_pct.

    Raises:
        ConfigError: a malformed value, or a key the chosen dataset does not use.
    """
    import re

    from duallora.data.benchmarks import BENCHMARK_DATASETS, SPLIT_FILE_DATASETS

    d = cfg.data
    train = _str_list("split_train", d.split_train)
    test = _str_list("split_test", d.split_test)
    hashes = _str_list("split_sha256", d.split_sha256)
    if (train or test) and d.dataset not in SPLIT_FILE_DATASETS:
        raise ConfigError(
            f"data.split_train/split_test are set but data.dataset={d.dataset!r} does not use split lists "
            f"(only {', '.join(SPLIT_FILE_DATASETS)}); remove them"
        )
    if bool(train) != bool(test):
        raise ConfigError("give both data.split_train and data.split_test, or neither")
    if hashes and d.dataset not in BENCHMARK_DATASETS:
        raise ConfigError(
            f"data.split_sha256 is set but data.dataset={d.dataset!r} reads no split files "
            f"(only {', '.join(BENCHMARK_DATASETS)}); remove it"
        )
    for h in hashes:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", h):
            raise ConfigError(f"data.split_sha256 entry {h!r} is not a sha256 (64 hex digits)")
    if d.crop_pct is not None:
        if d.dataset not in BENCHMARK_DATASETS:
            raise ConfigError(
                f"data.crop_pct is set but data.dataset={d.dataset!r} resizes without cropping "
                f"(crop_pct is for {', '.join(BENCHMARK_DATASETS)}); remove it"
            )
        if not 0.0 < d.crop_pct <= 1.0:
            raise ConfigError(f"data.crop_pct={d.crop_pct} must lie in (0, 1]")


def check_method_keys(cfg: RunConfig) -> None:
    """Reject method options that the chosen method would ignore.

    Raises:
        ConfigError: when a key outside ``METHOD_KEYS[cfg.method.name]`` differs from its default.
    """
    used = METHOD_KEYS.get(cfg.method.name, set())
    default = MethodConfig()
    for f in dataclasses.fields(MethodConfig):
        if f.name == "name" or f.name in used:
            continue
        if getattr(cfg.method, f.name) != getattr(default, f.name):
            raise ConfigError(
                f"method.{f.name} is set but method {cfg.method.name!r} does not use it; "
                f"remove it (keys used by {cfg.method.name}: {', '.join(sorted(used)) or 'none'})"
            )


def _friendly(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "Key" in type(exc).__name__ or "not in struct" in msg:
        return ConfigError(
            f"unknown config key {key!r} in {source}; `duallora run --print-config` lists the valid keys "
            "(commented in configs/default.yaml)"
        )
    return ConfigError(f"invalid value for {key!r} in {source}: {msg}")


def missing_keys(path: str | Path) -> list[str]:
    """Dotted keys of the current schema that a stored run config (YAML) does not set.

    A run folder's ``config.yaml`` lists every key; keys it lacks were added after the run was made,
    so the run used the behaviour from before that key existed, which the key's current default need
    not reproduce (reuse and resume treat such runs as different).

    Raises:
        ConfigError: the file cannot be read or parsed.
    """
    try:
        raw = OmegaConf.to_container(OmegaConf.load(Path(path)))
    except Exception as exc:  # yaml errors come in many types
        raise ConfigError(f"cannot parse config file {str(path)!r}: {exc}") from exc
    raw = raw if isinstance(raw, dict) else {}
    out = []
    for f in dataclasses.fields(RunConfig):
        factory = f.default_factory
        if factory is dataclasses.MISSING or not dataclasses.is_dataclass(factory):  # a plain key (seed)
            if f.name not in raw:
                out.append(f.name)
            continue
        section = raw.get(f.name) if isinstance(raw.get(f.name), dict) else {}
        out += [f"{f.name}.{g.name}" for g in dataclasses.fields(factory) if g.name not in section]
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from defaults, an optional YAML file and overrides.

    Args:
        path: YAML preset (same tree as :class:`RunConfig`); None = defaults only.
        overrides: ``key=value`` strings with dotted keys, e.g. ``["train.epochs=1", "seed=3"]``.

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
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise _friendly(exc, "the command-line overrides") from exc
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, RunConfig)
    _reset_unused_file_keys(cfg, overrides or [])
    return validate(cfg)


def _reset_unused_file_keys(cfg: RunConfig, overrides: list[str]) -> None:
    """Reset method keys that the chosen method does not read to their defaults, unless an override
    sets them: a preset tuned for DualLoRA (e.g. ``energy_threshold_end: 1.0``) then serves every
    method (``--config configs/cifar100_10tasks.yaml method.name=fecam``), while an override of a key
    the method ignores stays an error (:func:`check_method_keys`)."""
    used = METHOD_KEYS.get(cfg.method.name, set())
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
