"""Image files on disk: every PIL mode to 8 bits by scaling (16-bit greyscale is not clipped), and the
up-front check that refuses empty or corrupt image files before training (issue 9)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from duallora.data import base
from duallora.data.datasets import check_image_files, load_dataset, pil_to_8bit
from duallora.data.sources.wnid import make_wnid_folders
from duallora.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::duallora.data.benchmarks.DataCountWarning")

H, W = 4, 64
GRADIENT16 = np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)  # 0 .. 65535
EXPECTED8 = np.rint(GRADIENT16 / 257.0).astype(np.uint8)  # 65535 -> 255, 257 -> 1, 128 -> 0


@pytest.fixture(autouse=True)
def _fresh_check_cache(monkeypatch):
    monkeypatch.setattr(base, "_CHECKED", set())


def _one_image_folder(root: Path, name: str, im: Image.Image, **save) -> Path:
    """root/train/x/NAME and root/test/x/NAME: a one-class imagefolder holding one image per split."""
    for split in ("train", "test"):
        (root / split / "x").mkdir(parents=True, exist_ok=True)
        im.save(root / split / "x" / name, **save)
    return root


def _load_one(root: Path, channels: int, size=(H, W)) -> np.ndarray:
    d = load_dataset("imagefolder", "test", root=str(root), image_size=size, channels=channels)
    x, _ = d[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (channels, *size)
    return x.numpy()


# ------------------------------------------------------------------------------- 16-bit and modes


def test_16bit_png_is_scaled_not_binarised(tmp_path):
    im = Image.fromarray(GRADIENT16)
    assert im.mode == "I;16"
    root = _one_image_folder(tmp_path, "g.png", im)
    with Image.open(root / "test" / "x" / "g.png") as reread:
        assert reread.mode == "I;16"  # what PIL opens a 16-bit greyscale PNG as
    gray = _load_one(root, channels=1)[0]
    assert np.abs(gray.astype(int) - EXPECTED8.astype(int)).max() <= 1
    np.testing.assert_array_equal(gray, EXPECTED8)  # exact: round(v / 257)
    assert len(np.unique(gray)) > 200  # a gradient, not the 0/255 of PIL's clipping convert("L")
    rgb = _load_one(root, channels=3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[c], EXPECTED8)


def test_16bit_png_resized_keeps_its_scale(tmp_path):
    flat = np.full((8, 8), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    root = _one_image_folder(tmp_path, "f.png", Image.fromarray(flat))
    assert np.unique(_load_one(root, channels=1, size=(4, 4))).tolist() == [128]


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2"),
                                         ("I", "=i4")])
def test_high_bit_integer_modes_divide_by_257(mode, dtype):
    im = Image.frombytes(mode, (W, H), GRADIENT16.astype(dtype).tobytes())
    assert im.mode == mode
    np.testing.assert_array_equal(np.asarray(im), GRADIENT16)
    out = pil_to_8bit(im, 1)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), EXPECTED8)
    rgb = pil_to_8bit(im, 3)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb)[..., 1], EXPECTED8)


def test_mode_i_outside_16_bits_is_clipped():
    im = Image.fromarray(np.array([[-5, 0, 65535, 100000]], dtype=np.int32))
    assert np.asarray(pil_to_8bit(im, 1)).tolist() == [[0, 0, 255, 255]]


def test_float_mode_is_scaled_from_unit_range():
    values = np.array([[0.0, 0.25, 0.5, 1.0, 1.5, -0.1, np.nan]], dtype=np.float32)
    im = Image.fromarray(values)
    assert im.mode == "F"
    assert np.asarray(pil_to_8bit(im, 1)).tolist() == [[0, 64, 128, 255, 255, 0, 0]]


def _rgb_base() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "mode, name, save",
    [
        ("L", "a.png", {}),
        ("RGB", "a.png", {}),
        ("1", "a.png", {}),
        ("1", "a.bmp", {}),
        ("P", "a.png", {}),
        ("P", "a.gif", {}),
        ("LA", "a.png", {}),
        ("RGBA", "a.png", {}),
        ("RGBA", "a.webp", {"lossless": True}),
        ("CMYK", "a.jpg", {"quality": 95}),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_8bit_modes_load_as_pil_converts_them(tmp_path, mode, name, save, channels):
    base = _rgb_base()
    im = base.convert(mode) if mode != "LA" else base.convert("L").convert("LA")
    if mode in ("LA", "RGBA"):
        im.putalpha(Image.fromarray(np.full((H, W), 77, dtype=np.uint8)))  # alpha is dropped, not composited
    root = _one_image_folder(tmp_path, name, im, **save)
    with Image.open(root / "test" / "x" / name) as reread:
        assert reread.mode == mode
        expected = np.asarray(reread.convert("L" if channels == 1 else "RGB"))
    got = _load_one(root, channels)
    got = got[0] if channels == 1 else got.transpose(1, 2, 0)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", ["La", "RGBa", "PA", "YCbCr", "HSV", "RGBX"])
def test_other_modes_convert(mode):
    base = _rgb_base().convert("RGBA")
    im = base.convert(mode) if mode != "La" else base.convert("LA").convert("La")
    assert im.mode == mode
    for channels, target in ((1, "L"), (3, "RGB")):
        out = pil_to_8bit(im, channels)
        assert out.mode == target and out.size == (W, H)


def test_same_mode_is_returned_as_is():
    im = Image.new("L", (3, 2), 9)
    assert pil_to_8bit(im, 1) is im


# -------------------------------------------------------------------------------- up-front check


def _good_png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (6, 6), value).save(path)


def _bad_folder(root: Path) -> tuple[Path, Path]:
    """Flat imagefolder (split by test_fraction) with one zero-byte .png and one garbage .jpg."""
    for c in ("a", "b"):
        for i in range(4):
            _good_png(root / c / f"{i}.png", 10 * i)
    empty = root / "a" / "empty.png"
    empty.write_bytes(b"")
    garbage = root / "b" / "broken.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return empty, garbage


@pytest.mark.parametrize("split", ["train", "test"])
def test_corrupt_and_empty_images_are_refused_when_loading(tmp_path, split):
    empty, garbage = _bad_folder(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", split, root=str(tmp_path))
    msg = str(err.value)
    assert msg.startswith("imagefolder: 2 of 10 image files cannot be read: ")
    assert f"{str(empty)!r} (empty file (0 bytes))" in msg
    assert f"{str(garbage)!r} (" in msg  # both splits are checked at once: both files are named
    assert "remove or replace them, or set data.check_images=false to skip this check" in msg


def test_check_off_builds_the_dataset(tmp_path):
    empty, garbage = _bad_folder(tmp_path)
    train = load_dataset("imagefolder", "train", root=str(tmp_path), check_images=False)
    test = load_dataset("imagefolder", "test", root=str(tmp_path), check_images=False)
    assert len(train) + len(test) == 10
    assert {empty, garbage} <= set(train.files) | set(test.files)


def test_truncated_png_is_found(tmp_path):
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(full, "PNG")
    path = tmp_path / "t.png"
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(DataError, match=r"1 of 1 image files cannot be read: .*t\.png"):
        check_image_files([path], "imagefolder")


def test_many_bad_files_are_counted_and_the_first_ten_listed(tmp_path):
    paths = []
    for i in range(13):
        p = tmp_path / f"bad{i:02d}.png"
        p.write_bytes(b"")
        paths.append(p)
    _good_png(tmp_path / "good.png")
    with pytest.raises(DataError) as err:
        check_image_files([*paths, tmp_path / "good.png"], "imagefolder")
    msg = str(err.value)
    assert msg.startswith("imagefolder: 13 of 14 image files cannot be read: ")
    assert msg.count("(empty file (0 bytes))") == 10
    assert "bad09.png" in msg and "bad10.png" not in msg
    assert "; and 3 more; remove or replace them" in msg


def test_good_files_pass_and_are_checked_once(tmp_path, monkeypatch):
    for i in range(3):
        _good_png(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    calls = []
    real = base._image_problem
    monkeypatch.setattr(base, "_image_problem", lambda p: calls.append(p) or real(p))
    check_image_files(files, "imagefolder")
    check_image_files(files, "imagefolder")
    assert len(calls) == 3  # the second call found the same files unchanged
    files[0].write_bytes(b"")  # a changed file is checked again
    with pytest.raises(DataError, match="0.png' \\(empty file"):
        check_image_files(files, "imagefolder")


def test_benchmark_files_are_checked(tmp_path):
    root = tmp_path / "imagenet-r"
    wnids = make_wnid_folders(root, n_classes=2, per_class=4)
    bad = root / wnids[1] / "art_0.png"
    bad.write_bytes(b"")
    splits = []
    for split in ("train", "test"):
        try:
            load_dataset("imagenet-r", split, root=str(root), image_size=(8, 8), channels=3)
        except DataError as exc:
            splits.append(split)
            assert str(exc).startswith(f"imagenet-r ({split} split): 1 of ")
            assert f"{str(bad)!r} (empty file (0 bytes))" in str(exc)
            assert "data.check_images=false" in str(exc)
    assert len(splits) == 1  # the file is in one of the two splits
    d = load_dataset("imagenet-r", splits[0], root=str(root), image_size=(8, 8), channels=3, check_images=False)
    assert str(bad) in d.files


def test_run_refuses_bad_images_before_training(tmp_path):
    from typer.testing import CliRunner

    from duallora.backbones import SHIPPED_WEIGHTS
    from duallora.cli import app

    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip("shipped backbone weights missing")
    data = tmp_path / "imgs"
    empty, garbage = _bad_folder(data)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "-o", str(out), "data.dataset=imagefolder", f"data.root={data}",
                                      "data.num_tasks=1", "train.progress=false"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: imagefolder: 2 of 10 image files cannot be read: ")
    assert str(empty) in lines[0] and str(garbage) in lines[0] and "data.check_images=false" in lines[0]
    assert not out.exists() and not Path(str(out) + ".partial").exists()
