"""The method registry (issue 10, "one method, one file"): every registered method through the learner,
the config derived from the registry, and a new method added from this file alone.

Tiny random ViTs (3 blocks, so DualLoRA's default ``gate_layer=2`` fits) and synthetic images; every
method runs with its defaults.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from duallora import config
from duallora.config import from_dict, load_config, to_dict, to_yaml
from duallora.errors import ConfigError
from duallora.methods import (
    METHODS,
    ContinualMethod,
    Option,
    build_method,
    get_method,
    method_names,
    method_options,
    register_method,
    unregister_method,
)
from duallora.methods.options import SHRINKAGE, TAU_ID, positive_int
from duallora.methods.registry import all_options, method_defaults
from duallora.training import ContinualLearner
from tests.synthetic import SMALL_TRAINING, TASKS, images_of, make_data, small_backbone

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("duallora", "frozen", "seq-lora", "inflora", "sd-lora", "l2p", "simplecil", "fecam", "ranpac", "ncm-gate",
           "joint")


def tiny_backbone():
    return small_backbone(4, depth=3)


def learner_for(overrides, num_tasks: int = 2) -> ContinualLearner:
    cfg = load_config(None, SMALL_TRAINING + list(overrides))
    return ContinualLearner(cfg, num_tasks=num_tasks, backbone=tiny_backbone(), device=torch.device("cpu"))


# ---------------------------------------------------------------------- every registered method
@pytest.mark.parametrize("method", method_names())
def test_every_method_learns_reloads_and_predicts_each_image_on_its_own(method, tmp_path):
    cls = get_method(method)
    learner = learner_for([f"method.name={method}"])
    assert type(learner.method) is cls
    assert bool(learner.model.adapted) == cls.uses_adapters
    for t, classes in enumerate(TASKS[:2]):
        record = learner.learn_task(make_data(classes, 10, seed=t), classes)
        assert record["trained"] is cls.trains
        assert bool(record["epoch_loss"]) is cls.trains
    x = images_of(make_data([c for cls_ in TASKS[:2] for c in cls_], 3, seed=9))
    full = learner.predict(x)
    assert full.probs.shape == (12, 4)
    assert torch.allclose(full.probs.sum(1), torch.ones(12), atol=1e-5)
    # the same predictions in another order, one image at a time and among other images
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = learner.predict(x[perm])
    assert torch.equal(shuffled.labels, full.labels[perm]) and torch.equal(shuffled.tasks, full.tasks[perm])
    assert torch.allclose(shuffled.probs, full.probs[perm], atol=1e-5)
    for i in range(len(x)):
        alone = learner.predict(x[i: i + 1])
        assert alone.labels.item() == full.labels[i].item()
        assert torch.allclose(alone.probs[0], full.probs[i], atol=1e-5)
    mixed = learner.predict(torch.cat([images_of(make_data((2, 4, 6), 2, seed=5)), x[:1]]))
    assert torch.allclose(mixed.probs[-1], full.probs[0], atol=1e-5)
    # saved and reloaded: identical predictions
    path = learner.save(tmp_path / "ckpt.safetensors")
    loaded = ContinualLearner.load(path, device=torch.device("cpu"), backbone=tiny_backbone())
    assert type(loaded.method) is cls
    got = loaded.predict(x)
    assert torch.equal(got.probs, full.probs) and torch.equal(got.labels, full.labels)
    assert torch.equal(got.confidence, full.confidence)


def test_builtin_methods_register_in_their_documented_order():
    assert method_names() == BUILTIN
    assert tuple(METHODS) == BUILTIN
    with pytest.raises(TypeError):
        METHODS["x"] = ContinualMethod  # type: ignore[index]  # a read-only view


def test_config_is_derived_from_the_registry():
    assert config.CHOICES["method.name"] == method_names()
    assert config.METHOD_KEYS == {n: set(method_options(n)) for n in method_names()}
    fields = [f.name for f in dataclasses.fields(config.MethodConfig)]
    assert fields == ["name"] + list(all_options())
    defaults = config.MethodConfig()
    for key, option in all_options().items():
        assert option.help and option.type is not None
        assert getattr(defaults, key) == option.default
        if option.choices:
            assert config.CHOICES[f"method.{key}"] == option.choices
    # a key shared by several methods is one declaration
    assert method_options("inflora")["rank_orthogonal"] is method_options("duallora")["rank_orthogonal"]
    assert get_method("l2p").uses_adapters is False and get_method("fecam").trains is False


def test_default_yaml_lists_every_method_key_in_schema_order():
    """Every method key is in configs/default.yaml in schema order: set, or commented out (``# key:``)
    exactly when some method has its own default for it; the file then gives every method its defaults."""
    text = (ROOT / "configs" / "default.yaml").read_text()
    raw = yaml.safe_load(text)
    section = text.split("\nmethod:\n", 1)[1].split("\ntrain:\n", 1)[0]
    listed = [m.group(2) for m in re.finditer(r"^  (# )?(\w+):", section, flags=re.M)]
    commented = {m.group(1) for m in re.finditer(r"^  # (\w+):", section, flags=re.M)}
    assert listed == [f.name for f in dataclasses.fields(config.MethodConfig)]
    per_method = {k for n in METHODS for k in get_method(n).option_defaults}
    assert commented == per_method == {"gate_layer", "protect_gate", "stat_images", "class_scores", "class_tau",
                                       "shrinkage"}
    assert set(raw["method"]) == set(listed) - commented
    for name in METHODS:
        assert load_config(ROOT / "configs" / "default.yaml", [f"method.name={name}"]) == \
            load_config(None, [f"method.name={name}"]), name


def test_each_method_gets_its_own_defaults_unless_the_config_sets_the_key(tmp_path):
    # DualLoRA's own defaults (docs/method.md, "Defaults"); the declared defaults for the others
    ours = load_config(None).method
    assert (ours.gate_layer, ours.protect_gate, ours.class_scores, ours.class_tau, ours.stat_images, ours.shrinkage) \
        == (-1, True, "stats", 0.001, None, "auto")
    assert method_defaults("duallora")["gate_layer"] == -1 and method_defaults("ncm-gate")["gate_layer"] == 2
    ncm = load_config(None, ["method.name=ncm-gate"]).method
    assert (ncm.gate_layer, ncm.shrinkage) == (2, "none")
    assert load_config(None, ["method.name=inflora"]).method.stat_images == 2000
    assert load_config(None, ["method.name=frozen", "method.task_posterior=gate"]).method.gate_layer == 2
    # an override or a file key wins, whatever its value (also the declared default)
    assert load_config(None, ["method.gate_layer=2", "method.protect_gate=false"]).method.gate_layer == 2
    preset = tmp_path / "p.yaml"
    preset.write_text("method:\n  class_scores: heads\n  stat_images: 2000\n")
    cfg = load_config(preset).method
    assert (cfg.class_scores, cfg.stat_images, cfg.class_tau) == ("heads", 2000, 0.001)
    # a stored config is read as stored: a key it lacks means the declared default (the behaviour before it)
    stored = to_dict(load_config(None))
    del stored["method"]["class_scores"]
    assert from_dict(stored).method.class_scores == "heads"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert load_config(tmp_path / "config.yaml", stored=True).method.class_scores == "heads"
    assert load_config(tmp_path / "config.yaml").method.class_scores == "stats"  # as a preset
    # a method's own default that conflicts with another key set by the user names the fix
    with pytest.raises(ConfigError, match="DualLoRA's default.*add method.protect_gate=false"):
        load_config(None, ["method.gate=soft"])
    assert load_config(None, ["method.gate=soft", "method.protect_gate=false"]).method.gate == "soft"


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="method.name='nope' is not supported; choose one of duallora, frozen"):
        get_method("nope")
    with pytest.raises(ConfigError, match="method.name='nope' is not supported"):
        load_config(None, ["method.name=nope"])


def test_baselines_module_still_re_exports_the_classes():
    from duallora import baselines

    assert baselines.BASELINES == {n: METHODS[n] for n in ("inflora", "sd-lora", "l2p", "simplecil", "fecam", "joint")}
    assert baselines.L2P is METHODS["l2p"]


# ---------------------------------------------------------------------- declarations the registry refuses
def _method(name: str, **attrs) -> type:
    return type(f"M_{name.replace('-', '_')}", (ContinualMethod,), {"name": name, **attrs})


@pytest.mark.parametrize("cls, error, fragment", [
    (_method("duallora", uses_adapters=False), ValueError, "already registered"),
    (type("NoName", (ContinualMethod,), {"uses_adapters": False}), ValueError, "own class attribute name"),
    (_method("x-tau", uses_adapters=False, options={"tau_id": Option(0.5, "other default")}), ValueError,
     "share one declaration"),
    (_method("x-adapters", options={}), ValueError, "uses_adapters=True but adapted_modules is not"),
    (_method("x-key", uses_adapters=False, options={"name": Option(1, "reserved")}), ValueError,
     "cannot be a method option"),
    (_method("x-type", uses_adapters=False, options={"k": 3}), TypeError, "must be an Option"),
    (_method("x-own", uses_adapters=False, options={"tau_id": TAU_ID}, option_defaults={"ridge": 1.0}), ValueError,
     "option_defaults sets 'ridge', which is not among its options"),
    (_method("x-choice", uses_adapters=False, options={"shrinkage": SHRINKAGE}, option_defaults={"shrinkage": "lw"}),
     ValueError, "option_defaults\\['shrinkage'\\]='lw' is not one of"),
    (int, TypeError, "ContinualMethod subclass"),
])
def test_bad_declarations_are_refused(cls, error, fragment):
    with pytest.raises(error, match=fragment):
        register_method(cls)
    assert method_names() == BUILTIN


def test_an_option_needs_a_type_it_can_derive_and_a_default_among_its_choices():
    assert Option(3, "x").type is int and Option(True, "x").type is bool and Option("a", "x").type is str
    with pytest.raises(TypeError, match="explicit type"):
        Option(None, "x")
    with pytest.raises(TypeError, match="not one of its choices"):
        Option("c", "x", choices=("a", "b"))


# ---------------------------------------------------------------------- a new method, from this file only
class ToyPenalty(ContinualMethod):
    """Frozen backbone and per-task heads, like ``frozen``, whose loss adds ``toy_option`` x 1e-3 x
    the squared norm of the task's head weight (a stand-in for an EWC-like regulariser)."""

    name = "toy"
    uses_adapters = False
    options = {"toy_option": Option(1, "toy: weight of the head's L2 penalty, in units of 1e-3", check=positive_int),
               "tau_id": TAU_ID}  # a shared key: declared once, read by several methods

    def loss(self, logits, labels, images, task):
        penalty = self.model.heads[task].weight.pow(2).sum()
        return super().loss(logits, labels, images, task) + 1e-3 * self.cfg.toy_option * penalty


@pytest.fixture
def toy():
    before = config.MethodConfig
    register_method(ToyPenalty)
    try:
        yield ToyPenalty
    finally:
        unregister_method("toy")
    assert config.MethodConfig is before  # the schema is back: configs made before compare equal


def test_a_method_registered_from_a_test_runs_through_config_and_learner(toy, tmp_path):
    cfg = load_config(None, SMALL_TRAINING + ["method.name=toy", "method.toy_option=3"])
    assert cfg.method.toy_option == 3 and "toy" in config.CHOICES["method.name"]
    assert "toy_option: 3" in to_yaml(cfg)  # --print-config shows it
    assert from_dict(to_dict(cfg)) == cfg
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    learner = ContinualLearner(cfg, num_tasks=2, backbone=tiny_backbone(), device=torch.device("cpu"))
    assert isinstance(learner.method, ToyPenalty) and learner.model.adapted == {}
    calls = []
    orig = learner.method.loss

    def spy(logits, labels, images, task):
        out = orig(logits, labels, images, task)
        ce = torch.nn.functional.cross_entropy(logits, labels)
        calls.append(float((out - ce).detach()))
        return out

    learner.method.loss = spy  # type: ignore[method-assign]
    for t, classes in enumerate(TASKS[:2]):
        learner.learn_task(make_data(classes, 10, seed=t), classes)
    assert calls and all(c > 0 for c in calls)  # the penalty was trained on
    pred = learner.predict(images_of(make_data([7, 3, 0, 9], 2, seed=3)))
    assert torch.allclose(pred.probs.sum(1), torch.ones(8), atol=1e-5)
    loaded = ContinualLearner.load(learner.save(tmp_path / "toy.safetensors"), device=torch.device("cpu"),
                                   backbone=tiny_backbone())
    assert loaded.cfg.method.toy_option == 3 and isinstance(loaded.method, ToyPenalty)
    # its key is checked like any other
    with pytest.raises(ConfigError, match="method.toy_option=0 must be a positive integer"):
        load_config(None, ["method.name=toy", "method.toy_option=0"])
    with pytest.raises(ConfigError, match="method.toy_option is set but method 'duallora' does not use it"):
        load_config(None, ["method.toy_option=3"])
    assert load_config(None, ["method.name=toy", "method.tau_id=0.5"]).method.tau_id == 0.5
    with pytest.raises(ConfigError, match="method 'toy' does not use it"):
        load_config(None, ["method.name=toy", "method.gate=hard"])
    # a preset's keys for other methods are reset for it, as for every method
    preset = load_config(ROOT / "configs" / "cifar100_10tasks.yaml", ["method.name=toy"])
    assert preset.method.energy_threshold_end == config.MethodConfig().energy_threshold_end


def test_an_unregistered_method_is_gone_from_the_config(toy):
    unregister_method("toy")
    try:
        with pytest.raises(ConfigError, match="method.name='toy' is not supported"):
            load_config(None, ["method.name=toy"])
        with pytest.raises(ConfigError, match="unknown config key 'method.toy_option'"):
            load_config(None, ["method.toy_option=3"])
    finally:
        register_method(ToyPenalty)  # for the fixture's own unregistering


def test_build_method_reports_unknown_names():
    model, info = tiny_backbone()
    from duallora.model import AdaptedViT

    cfg = load_config(None).method
    method = build_method(AdaptedViT(model, info.mean, info.std, cfg.adapted_modules), cfg)
    assert method.name == "duallora"
    with pytest.raises(ConfigError, match="not supported"):
        build_method(AdaptedViT(model, info.mean, info.std, ()), dataclasses.replace(cfg, name="nope"))
