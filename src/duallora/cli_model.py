"""The model-directory commands of the ``duallora`` command line: ``learn``, ``history``, ``rollback``.

Registered on the Typer app by :func:`register` (called from :mod:`duallora.cli`); ``predict`` and
``evaluate`` in :mod:`duallora.cli` accept model directories too. A user error exits 2 with one line
``error: ...`` (:func:`duallora.cli.user_errors`); an interrupted learn exits 130 (Ctrl-C) or 143 (SIGTERM)
and leaves the model as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer


def format_history(versions: list[Any]) -> str:
    """The ``duallora history`` table: one line per version, the current one marked ``*``."""
    lines = [f"{'':1} {'version':>7} {'parent':>6} {'task':>4} {'images':>7} {'learn s':>8} {'accuracy':>8}  "
             f"{'created':<25} classes added"]
    for v in versions:
        acc = f"{v.accuracy:.2f}" if v.accuracy is not None else "-"
        secs = f"{v.learn_time_s:.1f}" if v.learn_time_s is not None else "-"
        parent = str(v.parent) if v.parent is not None else "-"
        lines.append(f"{'*' if v.current else '':1} {v.number:>7} {parent:>6} {v.task:>4} {v.images:>7} {secs:>8} "
                     f"{acc:>8}  {v.created:<25} {', '.join(v.classes_added)}")
    return "\n".join(lines)


def register(app: typer.Typer, user_errors: Callable, terminate_as_interrupt: Callable) -> None:
    """Add ``learn``, ``history`` and ``rollback`` to ``app``."""

    @app.command(context_settings={"allow_extra_args": False})
    @user_errors
    def learn(
        model_dir: Path = typer.Argument(..., metavar="MODEL_DIR",
                                         help="The model directory (created on first use)."),
        folder: Path = typer.Argument(..., metavar="FOLDER",
                                      help="One subfolder of images per new class, named after the class."),
        overrides: Optional[List[str]] = typer.Argument(
            None, metavar="[KEY=VALUE]...",
            help="Config overrides, e.g. train.epochs=2 method.name=fecam (backbone and method only for a new model)."),
        config: Optional[Path] = typer.Option(
            None, "--config", "-c", help="YAML preset for a new model, e.g. configs/tiny_imagenet_10tasks.yaml."),
        eval_folder: Optional[Path] = typer.Option(
            None, "--eval", help="A labelled folder of known classes to evaluate right after learning (recorded)."),
        convert_channels: bool = typer.Option(
            False, "--convert-channels",
            help="Accept grey images for an RGB backbone (or colour ones for a grey backbone), converted when read."),
        progress: Optional[bool] = typer.Option(
            None, "--progress/--no-progress", help="Show or hide progress bars (sets train.progress)."),
    ) -> None:
        """Learn the classes in FOLDER as the next task of the model in MODEL_DIR.

        The first learn creates the model from the config (defaults as in `duallora run`: DualLoRA on the
        shipped MNIST backbone; --config/KEY=VALUE to choose). Every learn writes a new version and switches
        to it only when complete: an interrupted or failed learn leaves the model exactly as it was.

        Example: duallora learn my-model new-classes/ --eval labelled-test/
        """
        from duallora.model_dir import ContinualModel

        items = list(overrides or [])
        if progress is not None:
            items.append(f"train.progress={str(progress).lower()}")
        model = ContinualModel.open(model_dir, config=config, overrides=items)
        with terminate_as_interrupt():
            model.learn(folder, eval_folder=eval_folder, convert_channels=convert_channels, echo=typer.echo)

    @app.command()
    @user_errors
    def history(
        model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A model directory or a run folder."),
        as_json: bool = typer.Option(False, "--json", help="Print the version records as JSON."),
    ) -> None:
        """List the versions of a model: classes added, images, learn time, accuracy if evaluated.

        The current version is marked *. On a run folder of `duallora run`, its tasks are the versions.
        """
        from duallora.model_dir import model_history

        versions = model_history(model_dir)
        if as_json:
            typer.echo(json.dumps([{k: v for k, v in vars(x).items() if k != "record"} for x in versions], indent=2))
        else:
            typer.echo(format_history(versions))

    @app.command()
    @user_errors
    def rollback(
        model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="The model directory."),
        version: int = typer.Argument(..., metavar="VERSION", help="The version to make current."),
        prune: bool = typer.Option(False, "--prune", help="Delete the versions numbered after VERSION."),
    ) -> None:
        """Make VERSION the current version (an earlier one, or back to a later one); the others are kept
        (listed by history) unless --prune deletes those numbered after VERSION.

        The next learn starts from VERSION and gets a number no version had before.
        """
        from duallora.model_dir import ContinualModel, read_model_file

        read_model_file(model_dir)
        gone = ContinualModel.open(model_dir).rollback(version, prune=prune)
        typer.echo(f"version {version} of {model_dir} is current"
                   + (f"; deleted version(s) {', '.join(map(str, gone))}" if gone else ""))
