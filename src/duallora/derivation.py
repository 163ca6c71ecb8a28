"""Runs derived from a finished run's checkpoints instead of trained again.

A config that trains the same model as a finished run's (:func:`inference_only_change`: DualLoRA's
calibration and task-identity scores, or a head method's own-statistics task posterior,
:func:`statistics_keys`) is made by loading each task checkpoint of that run under the new config
and evaluating it as the run would have after that task (:func:`derive_run`); ``duallora compare``
does this for every such variant (docs/compare.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from duallora import config as config_mod
from duallora.config import RunConfig
from duallora.data.scenarios import ClassIncrementalScenario
from duallora.errors import CheckpointError
from duallora.reporting import RunDirectory, write_json_atomic, write_text_atomic
from duallora.run_records import RESUME_IGNORED_KEYS, RunState, class_order_record, config_differences
from duallora.runner import Echo, evaluate_each, find_checkpoints, run_metrics, write_outputs
from duallora.training import ContinualLearner

#: DualLoRA method keys that change only how a trained model predicts, when the task posterior is the
#: shared gate's (``gate=shared``, ``task_id_features`` auto/gate): no training step, statistics pass or
#: stored tensor depends on them (the signatures keep means, scatter and subspace bases for every score).
INFERENCE_ONLY_KEYS = {("method", "calibration"), ("method", "confidence_threshold"),
                       ("method", "task_id_score"), ("method", "tau_id"), ("method", "class_scores"),
                       ("method", "class_tau"), ("method", "shrinkage")}

#: Keys of :data:`INFERENCE_ONLY_KEYS` that set the gate's task posterior, which training reads in two cases:
#: ``head_over_gate`` (the loss sees the gate's class scores) and class statistics of the adapted model
#: with residual adapters (``class_scores`` stats / heads+stats: gathered under the inference gating).
GATING_KEYS = {("method", "task_id_score"), ("method", "tau_id"), ("method", "shrinkage")}


def statistics_keys(cfg: RunConfig) -> set[tuple[str, str]]:
    """The ``method.*`` keys of ``cfg``'s method that change only statistics gathered after training
    and the prediction (the method class's ``derived_keys``, e.g. ``task_posterior`` of the head
    methods, :mod:`duallora.methods.posterior`); empty for other methods."""
    from duallora.methods.registry import get_method

    return {("method", k) for k in getattr(get_method(cfg.method.name), "derived_keys", ())}


def inference_only_change(a: RunConfig, b: RunConfig) -> bool:
    """Whether runs of ``a`` and ``b`` train the same model and differ only in how it predicts.

    True when both are ``duallora`` with the shared gate as task posterior and every key outside
    :data:`INFERENCE_ONLY_KEYS` (and :data:`RESUME_IGNORED_KEYS`) is equal (outside it less
    :data:`GATING_KEYS` where training read the gate's posterior), or both are the same
    method and differ only in its :func:`statistics_keys`; a run of ``b`` then equals the checkpoints
    of a run of ``a`` evaluated under ``b`` (:func:`derive_run`; for statistics keys with the
    statistics gathered again from each checkpoint).
    """
    if a.method.name == b.method.name and (keys := statistics_keys(a)):
        return not config_differences(a, b, RESUME_IGNORED_KEYS | keys)
    for cfg in (a, b):
        if cfg.method.name != "duallora" or cfg.method.gate != "shared" or cfg.method.task_id_features == "final":
            return False
    from duallora.methods.duallora import ADAPTED_CLASS_SCORES

    if (a.method.class_scores in ADAPTED_CLASS_SCORES) != (b.method.class_scores in ADAPTED_CLASS_SCORES):
        return False  # the adapted model's class statistics are gathered in training, or not at all
    ignored = INFERENCE_ONLY_KEYS
    if any(cfg.method.head_over_gate or (cfg.method.class_scores in ADAPTED_CLASS_SCORES and cfg.method.use_residual)
           for cfg in (a, b)):
        ignored = ignored - GATING_KEYS  # the gate's posterior shaped what was trained or gathered
    return not config_differences(a, b, RESUME_IGNORED_KEYS | ignored)


def derive_run(source: Path, cfg: RunConfig, output: Path, *, overwrite: bool = False,
               echo: Echo = print) -> dict[str, Any]:
    """A run of ``cfg`` made from a finished run of a config that trains the same model.

    Every task checkpoint of ``source`` is loaded with ``cfg`` (an inference-only change, see
    :func:`inference_only_change`) and evaluated as the run would have after that task; the run
    folder written to ``output`` has the same files as :func:`run_experiment`'s except the
    checkpoints (they would equal ``source``'s), and ``metrics.json`` names ``derived_from`` (the
    source folder, relative to ``output``) and ``derived_keys`` (the keys such a change may touch).
    Its ``train_time_s`` is the source's (the same training), its evaluation times are measured.

    Raises:
        CheckpointError: ``source`` is not a finished run, lacks checkpoints, or its config is not an
            inference-only change away from ``cfg``; and as :func:`run_experiment` for ``output``.
    """
    wall_start = time.perf_counter()
    source = Path(source)
    if not (source / "metrics.json").is_file():
        raise CheckpointError(f"{source} is not a finished run (no metrics.json)")
    stored = config_mod.load_config(source / "config.yaml", stored=True)
    if not inference_only_change(stored, cfg):
        raise CheckpointError(f"{source} trained a different model than the config given; run it instead")
    files = find_checkpoints(source / "checkpoints")
    source_metrics = json.loads((source / "metrics.json").read_text())
    if len(files) != source_metrics["num_tasks"]:
        raise CheckpointError(f"{source} has {len(files)} checkpoints for {source_metrics['num_tasks']} tasks")
    rundir = RunDirectory(Path(output), overwrite=overwrite, runs_only=True, protect=[cfg.data.root, source])
    try:
        return _derive_into(rundir, source, files, source_metrics, cfg, output, echo, wall_start)
    finally:
        rundir.release()


def _derive_into(rundir: RunDirectory, source: Path, files: list[Path], source_metrics: dict[str, Any],
                 cfg: RunConfig, output: Path, echo: Echo, wall_start: float) -> dict[str, Any]:
    """Evaluate ``source``'s checkpoints under ``cfg`` into ``rundir`` and publish it (:func:`derive_run`)."""
    state = RunState()
    learner = scenario = None
    statistics = _PosteriorStatistics()
    for _, learner, scenario, ev, seconds in evaluate_each(files, lambda meta: cfg, cfg.train.progress,  # noqa: B007
                                                            prepare=statistics):
        state.add_evaluation(ev, seconds)
        echo(f"task {len(state.rows)}/{len(files)}: accuracy per task {[round(a, 2) for a in ev['accuracy']]}, "
             f"task-id {ev['task_id_accuracy']:.2f}%")
    assert scenario is not None and learner is not None
    stage = rundir.path
    write_text_atomic(stage / "config.yaml", config_mod.to_yaml(cfg))
    write_json_atomic(stage / "class_order.json", class_order_record(scenario))
    # the same training as the source's, plus the statistics passes gathered again (if any)
    state.train_time = float(source_metrics["train_time_s"]) + statistics.seconds
    metrics = run_metrics(cfg, scenario, learner.backbone_info, state)
    keys = statistics_keys(cfg) or INFERENCE_ONLY_KEYS
    metrics.update({"wall_time_s": time.perf_counter() - wall_start, "resumed_after_task": None,
                    "device": str(learner.device), "world_size": 1,
                    "derived_from": os.path.relpath(source, Path(output)),
                    "derived_keys": sorted(f"{a}.{b}" for a, b in keys),
                    "derived_statistics_time_s": statistics.seconds})
    write_outputs(stage, cfg, scenario, metrics, learner.history)
    metrics["output"] = str(rundir.commit())
    return metrics


class _PosteriorStatistics:
    """``prepare`` step of :func:`evaluate_each` for a derived run: a method with a task posterior of
    its own statistics (:class:`~duallora.methods.posterior.PosteriorHeads`, ``task_posterior=gate``)
    gets the statistics of every task again, each from the checkpoint of its own task (as
    ``end_task`` gathered them), carried from one checkpoint to the next; checkpoints in task order.
    ``seconds`` sums the statistics passes."""

    def __init__(self) -> None:
        self.carry: dict[str, torch.Tensor] = {}
        self.seconds = 0.0

    def __call__(self, learner: ContinualLearner, scenario: ClassIncrementalScenario) -> None:
        from duallora.methods.posterior import GatePosterior, PosteriorHeads

        method = learner.method
        if not isinstance(method, PosteriorHeads) or method.posterior is None:
            return
        t0 = time.perf_counter()
        t = len(learner.task_classes) - 1
        method.posterior = GatePosterior(method.model, method.cfg)  # whatever the checkpoint held
        if t > 0:
            if not self.carry:
                raise CheckpointError("the statistics of a derived run are gathered checkpoint by checkpoint "
                                      "from the first task; pass the whole run folder")
            method.load_posterior_state(self.carry)
        with learner.autocast():
            method.add_posterior_task(learner.task_context(scenario.train_dataset(t), t))
        self.carry = method.posterior_state()
        self.seconds += time.perf_counter() - t0


