"""benchmarks/standins.py builds a stand-in for every benchmark and a command for every preset."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("standins_script", ROOT / "benchmarks" / "standins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_preset_has_a_stand_in_and_a_command(tmp_path, capsys):
    script = load_script()
    presets = {p.name for p in (ROOT / "configs").glob("*.yaml")} - {"default.yaml"}
    assert set(script.PRESETS) == presets
    assert script.main([str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for preset in presets:
        assert f"configs/{preset}" in out
    for name in ("cifar100", "imagenet-r", "imagenet-a", "domainnet", "cub200"):
        assert (tmp_path / "standin-data" / name).is_dir()
    assert (tmp_path / "standin-data" / "tiny_vit.safetensors").is_file()
    assert script.main([str(tmp_path), "--dry-run"]) == 0  # again on the same folder: rebuilt, no error
