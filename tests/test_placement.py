"""Adapter placement as data (issue 10): one table of named placements, PEFT-style module patterns
(an exact path, a suffix, a regular expression, at any depth), block indices supplied by the model.

Tiny random ViTs (tests/synthetic.py, 2 blocks of width 32) and the shipped architecture with random
weights; only a few tests train, one task of a few images.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from duallora.adapters import AdaptedLinear
from duallora.backbones import create_backbone
from duallora.config import load_config
from duallora.errors import ConfigError
from duallora.methods.options import ADAPTABLE_MODULES
from duallora.model import AdaptedViT
from duallora.placements import (
    PLACEMENTS,
    find_layers,
    placement_names,
    register_placement,
    unregister_placement,
)
from duallora.training import ContinualLearner
from tests.synthetic import SMALL_TRAINING, TASKS, images_of, make_data, small_backbone

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("qkv", "proj", "fc1", "fc2")
LAYERS_OF_BLOCK = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # forward order in a timm Block


def adapted(entries, backbone=None) -> AdaptedViT:
    model, info = backbone or small_backbone()
    return AdaptedViT(model, info.mean, info.std, entries)


def names(model: AdaptedViT) -> list[str]:
    return [n for n, _ in model.adapted_layers()]


def learner_for(overrides, backbone=None, num_tasks: int = 1) -> ContinualLearner:
    gate = [] if any(o.startswith("method.name=") for o in overrides) else ["method.gate_layer=1"]  # 2 blocks
    cfg = load_config(None, SMALL_TRAINING + gate + list(overrides))
    return ContinualLearner(cfg, num_tasks=num_tasks, backbone=backbone or small_backbone(),
                            device=torch.device("cpu"))


def old_placement(depth: int, modules) -> list[str]:
    """The adapted-layer list of the hard-coded placement this table replaced (``MODULE_PATHS``)."""
    old = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    return [f"blocks.{i}.{old[k]}" for i in range(depth) for k in old if k in modules]


@pytest.fixture
def extra_placement():
    register_placement("attn_out", "attn.proj", help="attention output projection")
    try:
        yield "attn_out"
    finally:
        unregister_placement("attn_out")


# ---------------------------------------------------------------------- the table
def test_builtin_table_is_the_only_list_of_names():
    assert placement_names()[:4] == BUILTIN
    assert {n: PLACEMENTS[n].patterns for n in BUILTIN} == {n: (p,) for n, p in zip(BUILTIN, LAYERS_OF_BLOCK)}
    assert tuple(ADAPTABLE_MODULES) == placement_names()  # config's name is a live view, not a copy


# ---------------------------------------------------------------------- how layers are named
@pytest.mark.parametrize("entries", [["qkv"], ["attn.qkv"], [r"blocks\.\d+\.attn\.qkv"], [".*qkv"],
                                     ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]],
                         ids=["name", "suffix", "regex", "loose-regex", "exact-paths"])
def test_names_suffixes_regexes_and_paths_find_the_same_layers(entries):
    model = adapted(entries)
    assert names(model) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert all(isinstance(layer, AdaptedLinear) for _, layer in model.adapted_layers())
    assert isinstance(model.backbone.blocks[0].attn.qkv, AdaptedLinear)
    assert isinstance(model.backbone.blocks[0].attn.proj, nn.Linear)


@pytest.mark.parametrize("entries, expected", [
    (["blocks.1.mlp.fc2"], ["blocks.1.mlp.fc2"]),
    ([r"blocks\.[1]\.attn\.(qkv|proj)"], ["blocks.1.attn.qkv", "blocks.1.attn.proj"]),
    (["mlp.fc2", "qkv", "attn.qkv", "qkv"],  # order of the entries and repeats do not matter
     ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"]),
    ([r"blocks\.0\..*"], [f"blocks.0.{p}" for p in LAYERS_OF_BLOCK]),  # non-linear matches are not layers
])
def test_paths_and_regexes_select_single_layers_in_forward_order(entries, expected):
    assert names(adapted(entries)) == expected


def test_layers_at_any_depth_inside_a_block():
    model, info = small_backbone()
    for block in model.blocks:  # nest fc1 one level deeper: blocks.i.mlp.fc1.0
        block.mlp.fc1 = nn.Sequential(block.mlp.fc1)
    x = images_of(make_data([7], 2))
    with torch.no_grad():
        before = AdaptedViT(model, info.mean, info.std, ()).features(x)
    for entries in (["mlp.fc1.0"], [r".*\.fc1\.\d"], ["blocks.0.mlp.fc1.0", "blocks.1.mlp.fc1.0"]):
        model_i, info_i = small_backbone()
        for block in model_i.blocks:
            block.mlp.fc1 = nn.Sequential(block.mlp.fc1)
        m = AdaptedViT(model_i, info_i.mean, info_i.std, entries)
        assert names(m) == ["blocks.0.mlp.fc1.0", "blocks.1.mlp.fc1.0"]
        assert [s.block for s in m.adapted_sites()] == [0, 1]
        assert isinstance(model_i.blocks[1].mlp.fc1[0], AdaptedLinear)
        with torch.no_grad():
            assert torch.equal(m.features(x), before)  # a fresh adapter changes nothing


# ---------------------------------------------------------------------- block indices from the model
def test_block_indices_come_from_walking_the_blocks():
    model = adapted([r"blocks\.1\.attn\.qkv", "mlp.fc1"])
    sites = list(model.adapted_sites())
    assert [(s.name, s.block) for s in sites] == [("blocks.0.mlp.fc1", 0), ("blocks.1.attn.qkv", 1),
                                                 ("blocks.1.mlp.fc1", 1)]
    for site in sites:
        assert model.block_of(site.name) == site.block
        assert site.layer is model.adapted[site.name]
        assert any(m is site.layer for m in model.backbone.blocks[site.block].modules())
    assert list(model.adapted_layers()) == [(s.name, s.layer) for s in sites]

    # find_layers on its own: (block, path, module), each layer once
    blocks = small_backbone()[0].blocks
    found = find_layers(blocks, ["fc2", r"blocks\.1\.mlp\.fc2"])
    assert [(m.block, m.path) for m in found] == [(0, "blocks.0.mlp.fc2"), (1, "blocks.1.mlp.fc2")]
    assert found[1].module is blocks[1].mlp.fc2


def test_duallora_takes_block_indices_from_the_model():
    learner = learner_for(["method.gate_layer=1", r"method.adapted_modules=[blocks\.1\.attn\.qkv,mlp.fc2]"])
    method = learner.method
    assert method.block_of == {"blocks.0.mlp.fc2": 0, "blocks.1.attn.qkv": 1, "blocks.1.mlp.fc2": 1}
    # the shared gate reads the norm1 tokens of blocks 0..1 whatever the placement; residuals in blocks >= 1
    assert method.gate_blocks == [0, 1] and method.signatures["gate"].dim == 2 * learner.model.embed_dim
    assert method.residual_sites == ["blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    # adapters only at or above the gate layer: fine (nothing trained moves the gate's features)
    above = learner_for(["method.gate_layer=0", r"method.adapted_modules=[blocks\.1\.attn\.qkv]"])
    assert above.method.gate_blocks == [0]
    # adapters only below the gate layer: no residual adapter could exist, said before anything trains
    with pytest.raises(ConfigError, match="there would be no residual adapter"):
        learner_for(["method.gate_layer=1", r"method.adapted_modules=[blocks\.0\.attn\.qkv]"])
    assert learner_for(["method.gate_layer=1", r"method.adapted_modules=[blocks\.0\.attn\.qkv]",
                        "method.use_residual=false", "method.protect_gate=false"]).method.residual_sites == []
    with pytest.raises(ConfigError, match="DualLoRA would adapt nothing.*protect_gate=false"):
        learner_for(["method.gate_layer=1", r"method.adapted_modules=[blocks\.0\.attn\.qkv]",
                     "method.use_residual=false"])
    with pytest.raises(ConfigError, match="gate_layer=5"):
        learner_for(["method.gate_layer=5"])


def test_branch_methods_hook_the_same_layers():
    learner = learner_for(["method.name=inflora", r"method.adapted_modules=[blocks\.1\.attn\.qkv,fc1]"])
    assert list(learner.method.branches) == names(learner.model)
    rows = {n: b.rows for n, b in learner.method.branches.items()}
    assert rows == {"blocks.0.mlp.fc1": None, "blocks.1.attn.qkv": ((32, 64), (64, 96)),
                    "blocks.1.mlp.fc1": None}


# ---------------------------------------------------------------------- errors
def test_pattern_that_matches_nothing_names_real_paths():
    cfg = load_config(None, SMALL_TRAINING + ["method.adapted_modules=[qkv,attn.qkvx]"])  # fine without a model
    with pytest.raises(ConfigError) as err:
        ContinualLearner(cfg, num_tasks=1, backbone=small_backbone(), device=torch.device("cpu"))
    message = str(err.value)
    assert "'attn.qkvx' matches no linear layer" in message
    assert "qkv, proj, fc1, fc2" in message
    assert "blocks.0.attn.qkv, blocks.0.attn.proj, blocks.0.mlp.fc1, blocks.0.mlp.fc2" in message

    with pytest.raises(ConfigError) as err:
        adapted([r"blocks\.9\..*"])
    assert r"entry 'blocks\.9\..*' matches no linear layer" in str(err.value)
    with pytest.raises(ConfigError, match=r"matches only blocks\.0\.attn \(Attention\).*not nn\.Linear"):
        adapted(["blocks.0.attn"])  # a module that is not a linear layer


@pytest.mark.parametrize("entry, fragment", [
    ("head", "'head' is not a placement name (registered: qkv, proj, fc1, fc2"),
    (r"blocks\.[0", "not a valid regular expression"),
])
def test_unknown_names_and_bad_patterns_are_refused_by_the_config(entry, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"method.adapted_modules=[qkv,'{entry}']"])
    assert f"method.adapted_modules contains '{entry}'" in str(err.value)
    assert fragment in str(err.value)


def test_empty_placement_names_the_table(extra_placement):
    with pytest.raises(ConfigError, match="name at least one placement \\(qkv, proj, fc1, fc2, attn_out\\)"):
        load_config(None, ["method.adapted_modules=[]"])


@pytest.mark.parametrize("args, fragment", [
    (("qkv", "attn.qkv"), "already registered"),
    (("attn.out", "attn.proj"), "no dot"),
    (("nothing",), "at least one"),
    (("bad", "qkv"), "is a name, not a module path"),
    (("bad", "attn.[q"), "not a valid regular expression"),
])
def test_register_placement_refuses_bad_declarations(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        register_placement(*args)
    assert placement_names()[:4] == BUILTIN and "bad" not in PLACEMENTS


# ---------------------------------------------------------------------- a new named placement
def test_registered_placement_works_through_load_config_and_the_learner(extra_placement):
    assert extra_placement in ADAPTABLE_MODULES
    learner = learner_for([f"method.adapted_modules=[qkv,{extra_placement}]", "method.protect_gate=false"])
    assert names(learner.model) == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv",
                                    "blocks.1.attn.proj"]
    assert names(learner.model) == names(adapted(["qkv", "proj"]))
    record = learner.learn_task(make_data(TASKS[0], 4), TASKS[0])
    assert record["trained"] and len(learner.method.memories) == 4


def test_unregistered_placement_is_refused_again(extra_placement):
    unregister_placement(extra_placement)
    try:
        with pytest.raises(ConfigError, match="'attn_out' is not a placement name"):
            load_config(None, ["method.adapted_modules=[attn_out]"])
    finally:
        register_placement("attn_out", "attn.proj")  # for the fixture's own unregistering


# ---------------------------------------------------------------------- unchanged behaviour
@pytest.mark.parametrize("arch", ["small", "shipped"])
def test_existing_configs_adapt_the_same_layers_as_before(arch):
    def backbone():
        if arch == "small":
            return small_backbone()
        torch.manual_seed(0)
        return create_backbone("vit_tiny_patch7_28.duallora_mnist", pretrained=False)

    model, info = backbone()
    depth = len(model.blocks)
    shipped = {tuple((yaml.safe_load(p.read_text()).get("method") or {}).get("adapted_modules", ["qkv"]))
               for p in sorted((ROOT / "configs").glob("*.yaml"))}
    combos = {c for k in range(1, 5) for c in itertools.permutations(BUILTIN, k)} | shipped
    for combo in sorted(combos):
        assert names(adapted(list(combo), backbone())) == old_placement(depth, combo), combo
    assert names(adapted((), backbone())) == []


def test_checkpoint_names_do_not_depend_on_how_layers_are_named():
    first = learner_for(["method.name=seq-lora", "method.adapted_modules=[qkv,fc2]"])
    first.learn_task(make_data(TASKS[0], 4), TASKS[0])
    state = first.method.state_tensors()
    assert {k.rsplit(".lora.", 1)[0] for k in state if ".lora." in k} == {
        f"adapters.blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "mlp.fc2")}
    second = learner_for(["method.name=seq-lora", r"method.adapted_modules=[attn.qkv,'blocks\.\d\.mlp\.fc2']"])
    second.method.load_state_tensors(state)
    x = images_of(make_data(TASKS[0], 2, seed=5))
    assert torch.equal(second.method.infer(x).probs, first.method.infer(x).probs)
