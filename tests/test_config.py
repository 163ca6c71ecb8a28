"""Config loading: presets, overrides, and every kind of bad key or value rejected with its name."""

from pathlib import Path

import pytest
import yaml

from duallora.config import MethodConfig, RunConfig, from_dict, load_config, to_dict, to_yaml
from duallora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_default_benchmark():
    cfg = load_config(None)
    assert cfg.data.dataset == "fashion-mnist"
    assert cfg.data.num_tasks == 5
    assert cfg.method.name == "duallora"
    assert cfg.backbone.name == "vit_tiny_patch7_28.duallora_mnist"
    assert cfg.method.adapted_modules == ["qkv"]


def test_default_preset_equals_defaults():
    assert load_config(ROOT / "configs" / "default.yaml") == load_config(None)


def test_every_preset_loads():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for p in presets:
        assert isinstance(load_config(p), RunConfig)


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["train.epochs=3", "train.lr=0.01", "seed=7", "method.adapted_modules=[qkv,fc1]",
                             "data.class_order=[1,0,3,2,5,4,7,6,9,8]"])
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 0.01
    assert cfg.seed == 7
    assert cfg.method.adapted_modules == ["qkv", "fc1"]
    assert cfg.data.class_order == [1, 0, 3, 2, 5, 4, 7, 6, 9, 8]


def test_yaml_and_dict_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=1", "method.gate=hard", "method.protect_gate=false"])
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["foo=1"], "unknown config key 'foo'"),
        (["train.bogus=1"], "unknown config key 'train.bogus'"),
        (["train.epochs=many"], "train.epochs"),
        (["train.epochs=0"], "train.epochs=0 must be a positive integer"),
        (["method.name=l2x"], "method.name='l2x' is not supported"),
        (["data.dataset=cifar"], "data.dataset='cifar' is not supported"),
        (["method.gate=sometimes"], "method.gate"),
        (["method.adapted_modules=[qkv,head]"], "'head'"),
        (["method.energy_threshold_end=1.5"], "energy_threshold_end"),
        (["train.lr=-1"], "train.lr"),
        (["train.weight_decay=-1"], "train.weight_decay=-1.0 must be >= 0"),
        (["train.momentum=2"], "train.momentum=2.0 must lie in [0, 1)"),
        (["data.num_tasks=0"], "data.num_tasks=0"),
        (["method.name=frozen", "method.rank_residual=4"], "method 'frozen' does not use it"),
        (["method.name=seq-lora", "method.gate=hard"], "method 'seq-lora' does not use it"),
        (["train.epochs"], "not of the form key=value"),
        (["method.shrinkage=ledoit"], "choose one of none, oas"),
        (["method.shrinkage="], "'method.shrinkage' in the command-line overrides: it cannot be empty or null"),
        (["method.adapted_modules=qkv"], "it takes a list, e.g. method.adapted_modules=[a,b]"),
    ],
)
def test_bad_config_is_rejected_with_its_name(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


def test_posterior_options_of_head_methods_count_only_with_the_gate_posterior(tmp_path):
    # frozen, seq-lora, inflora and sd-lora read gate_layer, tau_id, ridge and shrinkage only for their task
    # posterior: with task_posterior=heads a changed value would be ignored, so it is an error naming the fix
    for name in ("frozen", "seq-lora", "inflora", "sd-lora"):
        with pytest.raises(ConfigError, match="reads it only with method.task_posterior=gate"):
            load_config(None, [f"method.name={name}", "method.shrinkage=oas"])
    with pytest.raises(ConfigError, match="method.gate_layer is set"):
        load_config(None, ["method.name=frozen", "method.gate_layer=5"])
    cfg = load_config(None, ["method.name=frozen", "method.task_posterior=gate", "method.shrinkage=oas",
                             "method.gate_layer=5"])
    assert (cfg.method.shrinkage, cfg.method.gate_layer) == ("oas", 5)
    # a DualLoRA config file (its own gate_layer -1, shrinkage auto) reused for a heads method: reset, not kept
    saved = tmp_path / "dl.yaml"
    saved.write_text("method:\n  name: duallora\n  gate_layer: -1\n  shrinkage: auto\n")
    cfg = load_config(saved, ["method.name=frozen"])
    assert (cfg.method.gate_layer, cfg.method.shrinkage) == (MethodConfig().gate_layer, MethodConfig().shrinkage)
    cfg = load_config(saved, ["method.name=frozen", "method.task_posterior=gate"])
    assert (cfg.method.gate_layer, cfg.method.shrinkage) == (-1, "auto")  # read by the posterior: kept


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config(p)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(p)


def test_preset_keys_for_other_methods_are_reset_not_errors(tmp_path):
    # the CIFAR-100 preset tunes the memory thresholds for duallora/inflora; other methods still run on it
    preset = Path(__file__).parent.parent / "configs" / "cifar100_10tasks.yaml"
    tuned = load_config(preset)
    assert tuned.method.energy_threshold_end != MethodConfig().energy_threshold_end
    for name in ("frozen", "fecam", "l2p", "seq-lora", "joint"):
        cfg = load_config(preset, [f"method.name={name}"])
        assert cfg.method.energy_threshold_end == MethodConfig().energy_threshold_end
        assert cfg.data == tuned.data and cfg.train == tuned.train  # the rest of the preset holds
    assert load_config(preset, ["method.name=inflora"]).method.energy_threshold_end == tuned.method.energy_threshold_end
    with pytest.raises(ConfigError, match="does not use it"):  # on the command line it is still an error
        load_config(preset, ["method.name=fecam", "method.energy_threshold_end=0.9"])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)


def test_a_config_file_given_as_override_hints_at_config_option():
    with pytest.raises(ConfigError, match="use --config configs/default.yaml"):
        load_config(None, ["configs/default.yaml"])


# ------------------------------------------------------------------ non-finite floats (issue 9)

NON_FINITE = ["nan", "inf", "-inf", ".nan", "-.inf", "1e999"]


def test_float_keys_are_found_from_the_field_types():
    from duallora.config import float_keys

    keys = float_keys()
    for key in ("train.lr", "train.head_lr", "train.weight_decay", "train.momentum", "data.test_fraction",
                "data.crop_pct", "method.tau_id", "method.ridge", "method.energy_threshold_start",
                "method.confidence_threshold", "method.prompt_key_weight"):
        assert key in keys
    assert "train.epochs" not in keys and "seed" not in keys and "data.split_train" not in keys
    assert all(isinstance(getattr(getattr(RunConfig(), k.split(".")[0]), k.split(".")[1]), (float, type(None)))
               for k in keys)


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_learning_rate_is_rejected(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.lr={value}"])
    shown = "nan" if "nan" in value else ("-inf" if value.startswith("-") else "inf")
    assert str(err.value) == (
        f"train.lr={shown} is not a finite number (NaN and infinity are not allowed); "
        "set train.lr to a finite value, e.g. train.lr=0.0005 (its default)"
    )


def test_every_float_key_rejects_nan_and_infinity():
    from duallora.config import float_keys

    for key in float_keys():
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError) as err:
                load_config(None, [f"{key}={value}"])
            assert str(err.value).startswith(f"{key}={value} is not a finite number"), (key, value, str(err.value))
            assert f"set {key} to a finite value" in str(err.value)


def test_non_finite_in_a_file_or_stored_config_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method:\n  tau_id: .nan\n")
    with pytest.raises(ConfigError, match=r"^method\.tau_id=nan is not a finite number.*method\.tau_id=0\.02"):
        load_config(p)
    stored = to_dict(load_config(None))
    stored["data"]["crop_pct"] = float("inf")
    with pytest.raises(ConfigError, match=r"^data\.crop_pct=inf is not a finite number.*data\.crop_pct=null"):
        from_dict(stored)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_refuses_non_finite_lr_before_writing(tmp_path, value):
    from typer.testing import CliRunner

    from duallora.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "-o", str(out), f"train.lr={value}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: train.lr={value} is not a finite number (NaN and infinity are not allowed); "
        "set train.lr to a finite value, e.g. train.lr=0.0005 (its default)"
    ]
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not Path(str(out) + ".partial").exists()
    assert list(tmp_path.iterdir()) == []


def test_check_images_key():
    assert load_config(None).data.check_images is True
    assert load_config(None, ["data.check_images=false"]).data.check_images is False
    with pytest.raises(ConfigError, match="data.check_images"):
        load_config(None, ["data.check_images=maybe"])


def test_missing_keys_skips_options_the_runs_method_does_not_read(tmp_path):
    import yaml

    from duallora.config import load_config, missing_keys, to_yaml

    path = tmp_path / "config.yaml"
    stored = yaml.safe_load(to_yaml(load_config(None, [])))  # a duallora run
    del stored["method"]["ranpac_dim"]  # ranpac's option, added after the run: duallora never read it
    del stored["method"]["stat_images"]  # duallora's own option: the run predates it
    path.write_text(yaml.safe_dump(stored))
    assert missing_keys(path) == ["method.stat_images"]
    stored["method"]["name"] = "fecam"  # fecam reads neither
    path.write_text(yaml.safe_dump(stored))
    assert missing_keys(path) == []


def test_an_override_whose_value_is_not_yaml_names_it_and_the_quoting_that_works():
    with pytest.raises(ConfigError, match=r"override 'method.adapted_modules=\[blocks.*is not valid YAML.*quote"):
        load_config(None, [r"method.adapted_modules=[blocks\.[0-2]\.attn\.qkv]"])
    with pytest.raises(ConfigError, match=r"override 'train.lr=\{'"):
        load_config(None, ["train.lr={"])
    cfg = load_config(None, [r"method.adapted_modules=['blocks\.[0-2]\.attn\.qkv']"])
    assert cfg.method.adapted_modules == [r"blocks\.[0-2]\.attn\.qkv"]


def test_a_run_folders_config_is_read_as_stored(tmp_path):
    from duallora.config import is_run_config

    old = to_dict(load_config(None, ["method.gate_layer=2", "method.stat_images=2000"]))
    for key in ("class_tau", "shrinkage", "class_scores", "protect_gate"):  # keys added after the run was made
        del old["method"][key]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    assert not is_run_config(run / "config.yaml")  # a preset: DualLoRA's own defaults fill the missing keys
    assert load_config(run / "config.yaml").method.class_tau == 0.001
    (run / "metrics.json").write_text("{}")
    assert is_run_config(run / "config.yaml") and not is_run_config(None)
    m = load_config(run / "config.yaml", stored=True).method
    assert (m.class_tau, m.shrinkage, m.class_scores, m.protect_gate) == (None, "none", "heads", False)


def test_every_kept_run_stays_reusable_by_the_current_schema():
    # a key added to the schema must not make the kept comparison runs (docs/results) look like another config:
    # either its default is the old behaviour (COMPATIBLE_ADDITIONS) or the kept runs must be re-made
    from duallora.config import missing_keys

    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    configs = sorted(root.glob("*/runs/*/seed-*/config.yaml"))
    assert len(configs) > 100
    missing = {str(p.relative_to(root)): missing_keys(p) for p in configs}
    assert {path: keys for path, keys in missing.items() if keys} == {}
