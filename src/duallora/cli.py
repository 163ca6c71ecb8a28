"""The ``duallora`` command line (also ``python -m duallora``).

Commands: ``run`` (learn a class-incremental scenario), ``compare`` (several methods/ablations x seeds
with a summary), ``evaluate`` (re-evaluate saved checkpoints), ``predict`` (classify image files with a
trained run or a model directory), ``pretrain`` (regenerate the shipped MNIST-pre-trained backbone), and the
model-directory commands ``learn``, ``history``, ``rollback`` (:mod:`duallora.cli_model`). A user error prints one line
``error: ...`` naming the cause and the fix and exits with status 2; an interrupted run exits 130
(Ctrl-C, SIGINT) or 143 (SIGTERM: ``run`` and ``compare`` treat it as Ctrl-C and name the command that
continues the unfinished run).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer

from duallora.errors import DualLoRAError, DualLoRAWarning

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=(
        "DualLoRA: rehearsal-free class-incremental learning of a frozen pre-trained ViT with "
        "orthogonal + residual low-rank adapters, a subspace memory and calibrated task identity."
    ),
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


#: The signal that :func:`terminate_as_interrupt` turned into KeyboardInterrupt (empty: none, or Ctrl-C).
_TERMINATED: list[int] = []


@contextlib.contextmanager
def terminate_as_interrupt():
    """While inside, SIGTERM (``kill PID``) interrupts like Ctrl-C: it raises KeyboardInterrupt.

    The run then stops the way Ctrl-C stops it (the unfinished run is kept and the command that
    continues it is printed), and :func:`user_errors` exits with 143 instead of 130. A second SIGTERM
    while the first is handled is ignored. The previous handler is restored on leaving; outside the
    main thread (where handlers cannot be set) nothing changes.
    """
    def handler(signum, frame):
        if not _TERMINATED:
            _TERMINATED.append(signum)
            raise KeyboardInterrupt

    _TERMINATED.clear()
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread of the interpreter
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def user_errors(fn: Callable) -> Callable:
    """Turn DualLoRAError into a one-line message and exit 2; Ctrl-C into exit 130, SIGTERM into 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _TERMINATED.clear()
        try:
            return fn(*args, **kwargs)
        except DualLoRAError as exc:
            _fail(str(exc))
        except OSError as exc:  # unwritable output, missing folder, a folder where a file is expected
            _fail(f"{exc.strerror or exc}: {exc.filename or ''}; check the path and its permissions")
        except KeyboardInterrupt as exc:
            # run_experiment names the unfinished run's folder; elsewhere nothing was half-written
            message = str(exc) or "interrupted; earlier outputs are untouched"
            if _TERMINATED:
                name = signal.Signals(_TERMINATED[0]).name
                if message.startswith("interrupted"):
                    message = f"terminated by {name}" + message[len("interrupted"):]
                _fail(message, 128 + _TERMINATED[0])
            _fail(message, 130)

    return wrapper


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def run(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Config overrides as key=value with dotted keys, e.g. train.epochs=1 method.name=frozen seed=3."
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML preset, e.g. configs/default.yaml or configs/cifar100_10tasks.yaml."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Run folder (default: runs/<method>-<dataset>-...-<time>)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing run folder (only once this run succeeds)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the interrupted run in this folder after its last finished task "
        "(its own config is used; a --config/overrides that differ from it are refused)."),
    progress: Optional[bool] = typer.Option(
        None, "--progress/--no-progress",
        help="Show or hide progress bars (sets train.progress; default: the config's)."),
) -> None:
    """Learn tasks one after another and evaluate after each without task labels.

    With no arguments: DualLoRA on Fashion-MNIST in 5 tasks of 2 classes on the shipped
    MNIST-pre-trained ViT (a few minutes on 2 CPU cores). Writes config.yaml, class_order.json,
    metrics.json, accuracy_matrix.csv/.png, accuracy_curve.png, history.json and a checkpoint per task.
    """
    from duallora.config import is_run_config, load_config, to_yaml
    from duallora.errors import ConfigError

    if progress is not None:  # last, so it wins over a train.progress=... among the overrides
        overrides = list(overrides or []) + [f"train.progress={str(progress).lower()}"]
    given = config is not None or bool(overrides)
    if resume is not None and resume.name.endswith(".partial"):  # the staging folder itself was given
        resume = resume.with_name(resume.name[: -len(".partial")])
    if resume is not None and print_config and not (Path(str(resume) + ".partial") / "config.yaml").is_file():
        raise ConfigError(f"no interrupted run in {resume} (looked for {resume}.partial/config.yaml); "
                          f"a finished run's config is {resume}/config.yaml")
    if resume is not None and config is None and overrides:
        # overrides on a resumed run apply to the run's own config (and must not change its results)
        stored = Path(str(resume) + ".partial") / "config.yaml"
        cfg = load_config(stored if stored.is_file() else None, overrides, stored=stored.is_file())
    elif resume is not None and not given:
        stored = Path(str(resume) + ".partial") / "config.yaml"
        cfg = None
        if print_config and stored.is_file():
            cfg = load_config(stored, stored=True)
    else:
        cfg = load_config(config, overrides or [], stored=is_run_config(config))
    if print_config:
        typer.echo(to_yaml(cfg if cfg is not None else load_config(None)))
        return
    from duallora.reporting import format_metrics_table
    from duallora.runner import run_experiment

    protect = [config] if config is not None else []  # --overwrite must not delete the config file read
    with terminate_as_interrupt():
        if resume is not None:
            if output is not None and Path(output) != Path(resume):
                raise ConfigError("--resume DIR continues DIR; do not pass a different --output")
            metrics = run_experiment(cfg, resume, resume=True, echo=typer.echo, protect=protect)
        else:
            command = (["--config", str(config)] if config is not None else []) + list(overrides or [])
            metrics = run_experiment(cfg, output, overwrite=overwrite, echo=typer.echo, protect=protect,
                                     command=command)
    if "output" in metrics:  # under torchrun only rank 0 writes and reports
        typer.echo(format_metrics_table(metrics))
        typer.echo(f"outputs written to {metrics['output']}")


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def compare(
    args: Optional[List[str]] = typer.Argument(
        None, metavar="[SPEC] KEY=VALUE",
        help="A compare spec file (YAML, e.g. configs/compare/default.yaml), then config overrides key=value "
        "applied to every variant after the spec's own `overrides` (e.g. train.threads=1)."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Compare folder: runs/<variant>/seed-<s>/ and the summary."),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Seeds for every variant, e.g. 0,1,2 (replaces the spec's)."),
    only: Optional[List[str]] = typer.Option(
        None, "--only", help="Run only these variants, e.g. --only duallora,fecam (the summary still lists "
        "the others' finished runs)."),
    methods: Optional[str] = typer.Option(
        None, "--methods",
        help="Instead of a spec: one variant method.name=X per method, e.g. duallora,fecam,frozen."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Rerun runs whose existing folder has a different config (or an unfinished run "
        "of a different config); finished runs of the same config are still reused."),
    progress: Optional[bool] = typer.Option(
        None, "--progress/--no-progress", help="Show or hide progress bars (default: the config's train.progress)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (variant, seed, folder, reused/to run) and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print each run's per-task lines."),
    derive: bool = typer.Option(True, "--derive/--no-derive",
                                help="Make variants that differ only in inference options (DualLoRA's calibration, "
                                     "task_id_score, tau_id, confidence_threshold; a head method's task_posterior) "
                                     "from a finished run's checkpoints instead of training the same model again "
                                     "(--no-derive: train every run)."),
    summary_only: bool = typer.Option(False, "--summary-only",
                                      help="Run nothing: rewrite the summary from the finished runs (the others "
                                           "show as missing seeds)."),
) -> None:
    """Run several methods or DualLoRA ablations over several seeds and summarise them.

    Every variant x seed is an ordinary run folder DIR/runs/<variant>/seed-<s>. All configs are
    composed and validated before anything runs. A finished run of the same config is reused, an
    interrupted one resumed; a failed run is reported and the others go on (exit status 1 at the end).
    After every run DIR/runs.csv, summary.csv, summary.md and comparison.png are rewritten.

    Examples:

    duallora compare configs/compare/default.yaml -o runs/compare train.threads=1

    duallora compare --methods duallora,fecam,frozen --seeds 0,1 -o runs/quick train.epochs=1
    """
    from duallora.compare import load_spec, parse_names, parse_seeds, run_compare, spec_from_methods
    from duallora.errors import ConfigError

    items = list(args or [])
    paths = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    if len(paths) > 1:
        raise ConfigError(f"give one compare spec file, not {len(paths)} ({', '.join(paths)}); overrides are key=value")
    seed_list = parse_seeds(seeds) if seeds is not None else None
    if methods is not None:
        if paths:
            raise ConfigError(f"give a spec file ({paths[0]}) or --methods, not both; "
                              "use --only to run some of a spec's variants")
        spec = spec_from_methods(parse_names([methods]), seed_list or (0,))
    elif paths:
        spec = load_spec(paths[0])
    else:
        raise ConfigError("nothing to compare: give a spec file (e.g. configs/compare/default.yaml) "
                          "or --methods duallora,frozen")
    if progress is not None:
        overrides.append(f"train.progress={str(progress).lower()}")
    again = _compare_command(items, output, seeds, only, methods, overwrite, progress, verbose, derive)
    try:
        with terminate_as_interrupt():
            result = run_compare(spec, output, seeds=seed_list, extra_overrides=overrides, only=parse_names(only),
                                 derive=derive, overwrite=overwrite, dry_run=dry_run, echo=typer.echo, verbose=verbose,
                                 summary_only=summary_only)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; finished runs are kept in {output}; the same command continues "
                                f"with the unfinished ones: `{again}`") from None
    if result.failed:
        failed = ", ".join(f"{v} seed {s}" for v, s, _ in result.failed)
        _fail(f"{len(result.failed)} of {len(result.planned)} runs failed ({failed}); the summary in {output} "
              "covers the finished runs; fix the cause and rerun the same command to run the rest", 1)


def _compare_command(items: List[str], output: Path, seeds: Optional[str], only: Optional[List[str]],
                     methods: Optional[str], overwrite: bool, progress: Optional[bool], verbose: bool,
                     derive: bool) -> str:
    """The ``duallora compare`` command line of these options (what continues an interrupted compare)."""
    parts = ["duallora", "compare", *items, "--output", str(output)]
    if methods is not None:
        parts += ["--methods", methods]
    if seeds is not None:
        parts += ["--seeds", seeds]
    for name in only or []:
        parts += ["--only", name]
    if overwrite:
        parts.append("--overwrite")
    if progress is not None:
        parts.append("--progress" if progress else "--no-progress")
    if verbose:
        parts.append("--verbose")
    if not derive:
        parts.append("--no-derive")
    return shlex.join(parts)


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def evaluate(
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[MODEL_DIR FOLDER] [KEY=VALUE]...",
        help="Overrides that do not change the model: train.eval_batch_size, train.threads, train.device, "
        "train.precision, train.progress, data.root, data.num_workers, data.evaluate_on "
        "(e.g. train.device=cuda train.eval_batch_size=1024; data.evaluate_on=test gives the test numbers "
        "of a run evaluated on validation)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Run folder, its checkpoints/ folder or one task_K.safetensors file."),
    version: Optional[int] = typer.Option(
        None, "--version", min=1, help="MODEL_DIR FOLDER: the model version to evaluate (default: current)."),
    record: bool = typer.Option(
        True, "--record/--no-record", help="MODEL_DIR FOLDER: add the result to the version's history."),
    convert_channels: bool = typer.Option(
        False, "--convert-channels", help="MODEL_DIR FOLDER: accept images whose channels differ from the backbone's."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Data folder if it moved since the run."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="--checkpoint: also write the metrics to this new JSON file; MODEL_DIR FOLDER: "
        "write evaluation.json and confusion_matrix.png into this new folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Re-evaluate a run's checkpoints on its test data, or a model on a labelled folder (MODEL_DIR FOLDER).

    A run folder re-evaluates every task's checkpoint, which rebuilds the accuracy matrix and every
    metric of metrics.json. KEY=VALUE overrides change only where and how the stored model runs
    (device, threads, batch size, precision, data folder, loader workers); any other key is refused.

    With two paths, MODEL_DIR FOLDER, a model directory's version (or a run folder's last task) is
    evaluated on a labelled folder of known classes (one subfolder per class, named as learned):
    accuracy, per-class and per-task accuracy, task-identity accuracy; with --output DIR also
    evaluation.json and confusion_matrix.png in the new folder DIR.

    Example: duallora evaluate --checkpoint runs/my-run train.device=cuda train.eval_batch_size=1024

    Example: duallora evaluate my-model labelled-test/ -o my-eval
    """
    from duallora.errors import ConfigError
    from duallora.predict import inference_overrides
    from duallora.reporting import format_metrics_table, write_json_atomic
    from duallora.runner import evaluate_checkpoints

    paths = [o for o in (overrides or []) if "=" not in o]
    if paths:
        if len(paths) != 2 or checkpoint is not None:
            raise ConfigError("give either MODEL_DIR FOLDER (a model on a labelled folder) or --checkpoint RUN "
                              f"(a run on its own test data), not {' '.join(paths)}")
        _evaluate_folder(Path(paths[0]), Path(paths[1]), version, output, record,
                         [o for o in (overrides or []) if "=" in o], convert_channels)
        return
    if checkpoint is None:
        raise ConfigError("give MODEL_DIR FOLDER or --checkpoint RUN (see duallora evaluate --help)")

    if output is not None and (output.is_dir() or output.name == "metrics.json"):
        raise ConfigError(f"--output {output} must be a new JSON file (not a folder, not a run's metrics.json)")
    if output is not None and output.exists():
        raise ConfigError(f"--output {output} already exists; give a new file name (nothing is overwritten)")
    values = inference_overrides(overrides or [])
    if "data.root" in values:  # the same as --data-root
        root = values.pop("data.root")
        if data_root is not None and str(root) != data_root:
            raise ConfigError(f"--data-root {data_root} and data.root={root} disagree; give one of them")
        data_root = root
    if "train.progress" in values:  # the same as --progress/--no-progress
        progress = bool(values.pop("train.progress"))
    extra = {"overrides": values} if values else {}
    metrics = evaluate_checkpoints(checkpoint, echo=typer.echo, progress=progress, data_root=data_root, **extra)
    typer.echo(format_metrics_table(metrics))
    if metrics.get("matches_stored_record") is None and "data.evaluate_on" in values:
        typer.echo(f"evaluated on the {metrics['evaluated_on']} split, not the run's own: "
                   "nothing stored to compare with")
    diff = metrics.get("max_difference_to_metrics_json")
    if diff is not None:
        if diff < 1e-9:
            typer.echo("the re-evaluated accuracy matrix equals the run's metrics.json")
        else:
            typer.echo(f"warning: the re-evaluated accuracy matrix differs from the run's metrics.json by up to "
                       f"{diff:.2f} points: were the data (--data-root), the code or the run's files changed?",
                       err=True)
    if output is not None:
        write_json_atomic(output, metrics)
        typer.echo(f"metrics written to {output}")


@app.command()
@user_errors
def predict(
    checkpoint: Path = typer.Argument(
        ..., metavar="MODEL_OR_RUN",
        help="Model directory (its current version), run folder (its last checkpoints/task_K.safetensors) or one "
             "checkpoint file."),
    images: List[Path] = typer.Argument(
        ..., metavar="IMAGES...",
        help="Image files and folders (searched recursively for .png .jpg .jpeg .bmp .gif .webp)."),
    top_k: int = typer.Option(
        3, "--top-k", "-k", min=1, help="How many of the most probable classes to list per image."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the table to this file (atomically) instead of stdout."),
    fmt: str = typer.Option("csv", "--format", "-f", help="csv (one row per image) or json."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Images per forward pass (default: the run's train.eval_batch_size)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default: the run's train.threads)."),
    device: Optional[str] = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: the run's train.device)."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="fp32, bf16 or fp16 (CUDA) (default: the run's train.precision)."),
    version: Optional[int] = typer.Option(
        None, "--version", min=1,
        help="Model version to predict with (a model directory's version, a run folder's task; default: current)."),
) -> None:
    """Predict the class of image files with a model directory or a trained run, without task labels.

    Images are read and converted as the run's dataset reads its images (mode L or RGB for the
    backbone's channels, resized to its input size; the benchmarks' timm resize and centre crop).
    One row per image: path, class_id (a run's dataset label id; a model directory's class number, in the
    order classes were learned), class_name, task (the most probable task,
    numbered from 1 as in the run's output), task_confidence (its probability, max_j p(task j | image)),
    then topI_class and topI_prob for the K most probable classes (class probabilities p(y | image),
    the run's calibration applied).

    Files that cannot be read are listed on stderr as `error: cannot read PATH (...)`; the others are
    still predicted and written, and the exit status is 1. Exit status 2: a bad run, checkpoint or
    option, or no image files at all.

    Example: duallora predict runs/my-run photos/ extra.png --top-k 5 -o predictions.csv
    """
    from duallora.errors import ConfigError
    from duallora.predict import find_images, format_csv, format_json
    from duallora.reporting import write_text_atomic

    fmt = fmt.lower()
    if fmt not in ("csv", "json"):
        raise ConfigError(f"--format {fmt} is not supported; use csv or json")
    if output is not None and output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name, e.g. {output / ('predictions.' + fmt)}")
    if output is not None and output.exists() and output.suffix.lower() not in (".csv", ".json", ".tsv", ".txt"):
        raise ConfigError(f"--output {output} exists and is not a .csv/.json table (a checkpoint or an image?); "
                          "give a new file name (nothing was overwritten)")
    from duallora.model_dir import refuse_inside_model

    refuse_inside_model(output)
    found = find_images(images)
    predictor = _predictor(checkpoint, version, device=device, threads=threads, precision=precision,
                           batch_size=batch_size)
    for warning in predictor.warnings:
        typer.echo(f"warning: {warning}", err=True)
    errors = list(found.missing)
    for path, reason in found.missing:
        typer.echo(f"error: cannot read {path} ({reason})", err=True)
    result = predictor.predict_files(
        found.files, top_k=top_k,
        on_error=lambda path, reason: typer.echo(f"error: cannot read {path} ({reason})", err=True))
    errors += result.errors
    text = (format_csv(result.predictions, top_k) if fmt == "csv"
            else format_json(result.predictions, errors, predictor.checkpoint))
    if output is not None:
        write_text_atomic(output, text)
        n = len(result.predictions)
        typer.echo(f"{n} prediction{'' if n == 1 else 's'} ({predictor.checkpoint}) written to {output}", err=True)
    else:
        typer.echo(text, nl=False)
    if errors:
        if not result.predictions:
            _fail(f"none of the {len(errors)} files could be read (listed above); nothing was predicted", 1)
        _fail(f"{len(errors)} of {len(errors) + len(result.predictions)} files could not be read (listed above); "
              "the others were predicted", 1)


def _evaluate_folder(model_dir: Path, folder: Path, version: Optional[int], output: Optional[Path], record: bool,
                     overrides: List[str], convert_channels: bool = False) -> None:
    """``duallora evaluate MODEL_DIR FOLDER``: print the accuracies, write JSON and PNG with ``--output``."""
    from duallora.errors import ConfigError
    from duallora.folder_evaluation import evaluate_folder, write_evaluation
    from duallora.model_dir import ContinualModel, is_model_dir, refuse_inside_model

    if output is not None and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output {output} exists and is not an empty folder; give a new folder")
    refuse_inside_model(output)
    if is_model_dir(model_dir):
        result = ContinualModel.open(model_dir).evaluate(folder, version=version, output=output, record=record,
                                                         overrides=overrides, convert_channels=convert_channels)
    else:  # a run folder: its last (or --version) task, class names from class_order.json
        predictor = _predictor(model_dir, version)
        task_of = {c: t + 1 for t, cs in enumerate(predictor.learner.task_classes) for c in cs}
        rec = {"classes": [{"id": c, "name": predictor.class_names[c], "task": task_of[c]}
                           for c in predictor.learner.seen_labels]}
        result = evaluate_folder(predictor, rec, folder, convert_channels=convert_channels)
        if output is not None:
            write_evaluation(output, result)
    typer.echo(f"accuracy {result['accuracy']:.2f}% on {result['images']} images of {folder} "
               f"(task-id {result['task_id_accuracy']:.2f}%)")
    typer.echo("per task: " + ", ".join(f"task {t} {a:.2f}%" for t, a in result["per_task_accuracy"].items()))
    typer.echo("per class: " + ", ".join(f"{c} {a:.1f}%" for c, a in result["per_class_accuracy"].items()))
    if output is not None:
        typer.echo(f"written: {output / 'evaluation.json'}, {output / 'confusion_matrix.png'}")
    if result.get("not_recorded"):
        typer.echo(f"warning: {result['not_recorded']}", err=True)


def _predictor(path: Path, version: Optional[int], **options):
    """A Predictor of a model directory's version, or of a run folder's (task ``version``'s) checkpoint."""
    from duallora.model_dir import ContinualModel, is_model_dir
    from duallora.predict import load_predictor

    if not Path(path).exists() and not Path(str(path) + ".partial").is_dir():
        from duallora.errors import CheckpointError

        raise CheckpointError(f"no model directory, run folder or checkpoint at {str(path)!r}; create a model with "
                              f"`duallora learn {path} FOLDER` or train a run with `duallora run -o {path}`")
    if is_model_dir(path):
        items = [f"train.{'eval_batch_size' if k == 'batch_size' else k}={v}"
                 for k, v in options.items() if v is not None]
        return ContinualModel.open(path).predictor(version, items)
    if version is not None:
        from duallora.errors import CheckpointError
        from duallora.runner import derived_source, find_checkpoints

        source = derived_source(path)
        if source is not None:
            raise CheckpointError(f"{path} was made by duallora compare from the checkpoints of {source} (its own "
                                  "config.yaml changes only how they predict) and has no task checkpoints of its "
                                  f"own: predict its last task without --version, or pick a version of {source}")
        files = find_checkpoints(path)
        if version > len(files):
            raise CheckpointError(f"{path} has {len(files)} task checkpoints; --version {version} does not exist")
        path = files[version - 1]
    return load_predictor(path, **options)


@app.command()
@user_errors
def pretrain(
    settings: Optional[List[str]] = typer.Argument(
        None, help="--recipe vit: recipe settings key=value (fields of duallora.pretraining.PretrainRecipe), "
                   "e.g. root=PATH epochs=15 embed_dim=192 classes=tiny-imagenet-pretrain."),
    recipe: str = typer.Option(
        "mnist", "--recipe",
        help="mnist: the MNIST backbone's recipe (shipped default; options --epochs ... below); vit: the "
             "general ViT recipe (any data source, class list, size; defaults = the shipped Tiny-ImageNet "
             "backbone's), changed by KEY=VALUE settings."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o",
        help="Weights file to write (.safetensors); a .json record is written beside it. Default: "
             "runs/pretrain/<name>.safetensors."),
    epochs: int = typer.Option(4, min=1, help="--recipe mnist: epochs over MNIST's 60k training images."),
    batch_size: int = typer.Option(128, min=1, help="--recipe mnist: batch size."),
    lr: float = typer.Option(1e-3, min=0.0, help="--recipe mnist: peak learning rate."),
    seed: int = typer.Option(0, help="--recipe mnist: seed (vit: the seed=N setting)."),
    train_per_class: Optional[int] = typer.Option(None, min=1, help="--recipe mnist: cap on training images "
                                                  "per class (quick runs)."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
    device: str = typer.Option("auto", help="--recipe vit: auto | cpu | cuda | cuda:N | mps."),
    precision: str = typer.Option("bf16", help="--recipe vit: fp32 | bf16 | fp16 autocast."),
) -> None:
    """Pre-train a small ViT: the MNIST default backbone, or any timm VisionTransformer (--recipe vit).

    To regenerate the shipped weights (docs/pretraining.md):

    duallora pretrain --output src/duallora/weights/vit_tiny_patch7_28_mnist.safetensors --epochs 4 --seed 0

    duallora pretrain --recipe vit root=PATH/tiny-imagenet-200-32px.zip --threads 1 --output
    src/duallora/weights/vit_tiny_patch4_32_tinyimagenet100.safetensors

    A --recipe vit run keeps a checkpoint after every epoch beside its output and continues from it
    when started again with the same recipe.
    """
    if recipe == "mnist":
        if settings:
            _fail(f"--recipe mnist takes no KEY=VALUE settings (got {' '.join(settings)}); use --recipe vit")
        from duallora.pretrain import pretrain as do_pretrain

        out = output or Path("runs/pretrain/vit_tiny_patch7_28_mnist.safetensors")
        record = do_pretrain(out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             train_per_class=train_per_class, threads=threads)
    elif recipe == "vit":
        from duallora.pretraining import pretrain_vit, recipe_from_settings

        spec = recipe_from_settings(list(settings or []))
        out = output or Path("runs/pretrain") / f"{spec.name.replace('.', '_')}.safetensors"
        record = pretrain_vit(spec, out, device=device, precision=precision, threads=threads)
    else:
        _fail(f"--recipe {recipe!r}: choose mnist or vit")
    typer.echo(json.dumps(record, indent=2))


def _register_model_commands() -> None:
    from duallora.cli_model import register

    register(app, user_errors, terminate_as_interrupt)


_register_model_commands()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """duallora's own warnings as one ``warning: ...`` line on stderr; others as Python shows them."""
    if issubclass(category, DualLoRAWarning):
        print(f"warning: {message}", file=file if file is not None else sys.stderr, flush=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``duallora`` script."""
    warnings.showwarning = _show_warning
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="duallora")
    finally:
        warnings.showwarning = _python_show_warning


if __name__ == "__main__":  # pragma: no cover
    main()
