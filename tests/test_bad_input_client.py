"""Bad input to `mixshow train` and `mixshow stats`: one clear error line, exit 2, nothing written anywhere.

Also the other side of the image rules: every pixel mode the dataset accepts is read correctly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.dataset import BACKGROUND, MIN_SIDE, load_examples
from shared.images import to_rgb
from tests.badinput import assert_clean_error
from tests.conftest import TOY_WORDS, tiny_config

WORDS, CLASS_WORD = TOY_WORDS["red-circle"]
FAST = ["--steps", "2", "--resolution", "64", "--preview", "none"]


def _save(path: Path, image: Image.Image, fmt: str | None = None) -> None:
    image.save(path, format=fmt)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge(path: Path) -> None:
    Image.new("1", (8000, 8000)).save(path)  # 64 Mpx, a few kB on disk


def _float_image(d: Path) -> None:
    (d / "00.png").unlink()
    (d / "00_mask.png").unlink()
    (d / "00.txt").rename(d / "00f.txt")
    values = np.full((64, 64), 200.0, dtype=np.float32)  # 0..255 values in a float image: ambiguous, refused
    _save(d / "00f.tif", Image.fromarray(values), "TIFF")


def _int_image(d: Path) -> None:
    (d / "00.png").unlink()
    (d / "00_mask.png").unlink()
    (d / "00.txt").rename(d / "00i.txt")
    _save(d / "00i.tif", Image.fromarray(np.full((64, 64), 70000, dtype=np.int32)), "TIFF")


def _lab_image(d: Path) -> None:
    (d / "00.png").unlink()
    (d / "00_mask.png").unlink()
    (d / "00.txt").rename(d / "00l.txt")
    _save(d / "00l.tif", Image.new("LAB", (64, 64)), "TIFF")


# case id: (how to spoil a copy of the red-circle folder, expected text in the error line)
DATA_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "caption not utf-8": (lambda d: (d / "00.txt").write_bytes(b"a photo of a <TOK> \xff\xfe"), "is not UTF-8"),
    "caption empty": (lambda d: (d / "01.txt").write_text("  \n"), "is empty"),
    "caption without <TOK>": (lambda d: (d / "02.txt").write_text("a photo of a toy"), "does not contain <TOK>"),
    "caption missing": (lambda d: (d / "03.txt").unlink(), "missing caption"),
    "truncated png": (lambda d: _truncate(d / "00.png"), "cannot read image"),
    "not an image": (lambda d: (d / "01.png").write_bytes(b"GIF89a nonsense"), "cannot read image"),
    "decompression bomb": (lambda d: _huge(d / "02.png"), "more than the limit"),
    "image too small": (lambda d: (d / "03_mask.png").unlink() or
                        Image.new("RGB", (16, 16), "red").save(d / "03.png"), f"smaller than {MIN_SIDE}"),
    "float image out of range": (_float_image, "outside [0, 1]"),
    "32-bit image out of range": (_int_image, "outside the 16-bit range"),
    "unsupported pixel mode": (_lab_image, "pixel mode LAB"),
    "mask with three channels": (lambda d: Image.new("RGB", (64, 64), "white").save(d / "04_mask.png"),
                                 "must be one channel"),
    "mask of another size": (lambda d: Image.new("L", (48, 48), 255).save(d / "05_mask.png"),
                             "must be the size of their image"),
    "mask all black": (lambda d: Image.new("L", (64, 64), 0).save(d / "05_mask.png"), "all black"),
    "truncated mask": (lambda d: _truncate(d / "04_mask.png"), "cannot read mask"),
    "no images": (lambda d: [p.unlink() for p in d.glob("*.png")], "holds no images"),
}

# case id: (YAML text, expected text)
CONFIG_CASES: dict[str, tuple[bytes | str, str]] = {
    "yaml lr_unet nan": ("lr_unet: .nan\n", "setting lr_unet: nan is not finite"),
    "yaml steps negative": ("steps: -3\n", "setting steps: -3 is outside"),
    "yaml steps fractional": ("steps: 1.5\n", "setting steps: 1.5 is not an integer"),
    "yaml batch_size boolean": ("batch_size: true\n", "setting batch_size: True is not an integer"),
    "yaml resolution 63": ("resolution: 63\n", "setting resolution: 63 is outside"),
    "yaml resolution 100": ("resolution: 100\n", "setting resolution: 100 is not a multiple of 8"),
    "yaml targets a string": ("unet_targets: attn1.to_q\n", "setting unet_targets: 'attn1.to_q' is not a list"),
    "yaml sample_scales nan": ("sample_scales: [0.0, .nan]\n", "setting sample_scales: nan is not finite"),
    "yaml templates not strings": ("templates: [1, 2]\n", "setting templates: [1, 2] is not a list"),
    "yaml template without {}": ("templates: ['a photo']\n", "must contain {}"),
    "yaml lr a word": ("lr_text: fast\n", "setting lr_text: 'fast' is not a number"),
    "yaml mixed_precision": ("mixed_precision: fp8\n", "must be no, fp16 or bf16"),
    "yaml preview": ("preview: sometimes\n", "setting preview: 'sometimes' must be auto, none, end"),
    "yaml preview and sample_every": ("preview: end\nsample_every: 3\n", "give preview or sample_every"),
    "yaml unknown key": ("learning_rate: 0.1\n", "unknown setting 'learning_rate'"),
    "yaml not utf-8": (b"steps: 3 # \xff\n", "is not UTF-8"),
    "yaml invalid": ("steps: [3\n", "is not valid YAML"),
    "yaml not a mapping": ("- steps\n- 3\n", "must be a mapping"),
}

# case id: (extra flags, expected text)
FLAG_CASES: dict[str, tuple[list[str], str]] = {
    "--steps 0": (["--steps", "0"], "--steps: 0 is outside"),
    "--steps negative": (["--steps", "-3"], "--steps: -3 is outside"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size: 0 is outside"),
    "--resolution 72 for this base": (["--resolution", "72"], "--resolution: 72 is not a multiple of 16"),
    "--resolution 32": (["--resolution", "32"], "--resolution: 32 is outside"),
    "--rank 0": (["--rank", "0"], "--rank: 0 is outside"),
    "--seed negative": (["--seed", "-5"], "--seed: -5 is outside"),
    "--checkpoint-every negative": (["--checkpoint-every", "-1"], "--checkpoint-every: -1 is outside"),
    "--sample-every negative": (["--sample-every", "-2"], "--sample-every: -2 is outside"),
    "--preview every 0": (["--preview", "every 0"], "--preview: 'every 0': N must be at least 1"),
    "--preview and --sample-every": (["--preview", "end", "--sample-every", "2"], "--preview: give preview or"),
    "--mixed-precision fp16 on cpu": (["--mixed-precision", "fp16"], "fp16 needs a CUDA device"),
    "--stats-source bogus": (["--stats", "--stats-source", "bogus"], "--stats-source: 'bogus' must be"),
    "--steps not a number": (["--steps", "many"], "'many' is not a valid integer"),
}


def _data(toys: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(toys / "red-circle", data)
    return data


def _train(base: Path, data: Path, out: Path, *extra, words: str = " ".join(WORDS)) -> list:
    fast = FAST if "--sample-every" not in extra else FAST[:-2]  # --sample-every is the old form of --preview
    return ["train", "--base", base, "--data", data, "--words", words, "--class-word", CLASS_WORD, "--out", out,
            *fast, *extra]


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_train_refuses_bad_data(case, tiny_base, toys, tmp_path, monkeypatch, capsys):
    spoil, expect = DATA_CASES[case]
    data = _data(toys, tmp_path)
    spoil(data)
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    out = tmp_path / "out" / "pkg"
    assert_clean_error(_train(base, data, out), tmp_path, expect, monkeypatch, capsys, out=out)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_train_refuses_bad_config(case, tiny_base, toys, tmp_path, monkeypatch, capsys):
    text, expect = CONFIG_CASES[case]
    data = _data(toys, tmp_path)
    config = tmp_path / "train.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    out = tmp_path / "pkg"
    line = assert_clean_error([*_train(base, data, out), "--config", config], tmp_path, expect, monkeypatch, capsys,
                              out=out)
    if case.startswith("yaml") and "--" not in expect:
        assert str(config) in line  # the file is named, not a flag


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_train_refuses_bad_flags(case, tiny_base, toys, tmp_path, monkeypatch, capsys):
    extra, expect = FLAG_CASES[case]
    data = _data(toys, tmp_path)
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    out = tmp_path / "pkg"
    assert_clean_error(_train(base, data, out, *extra), tmp_path, expect, monkeypatch, capsys, out=out)


OTHER_TRAIN_CASES = {
    "no words": ({"words": ""}, "--words: is empty"),
    "upper-case word": ({"words": "<Aa1>"}, "must be one lower-case word"),
    "out below a file": ({"out": "afile/pkg"}, "is a file"),
    "missing config file": ({"config": "nope.yaml"}, "cannot read config"),
}


@pytest.mark.parametrize("case", list(OTHER_TRAIN_CASES))
def test_train_refuses_other_bad_arguments(case, tiny_base, toys, tmp_path, monkeypatch, capsys):
    kw, expect = OTHER_TRAIN_CASES[case]
    data = _data(toys, tmp_path)
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / kw.get("out", "pkg")
    args = _train(base, data, out, words=kw.get("words", " ".join(WORDS)))
    if "config" in kw:
        args += ["--config", tmp_path / kw["config"]]
    assert_clean_error(args, tmp_path, expect, monkeypatch, capsys, out=out)


def test_train_stops_when_the_loss_diverges(tiny_base, toys, tmp_path, monkeypatch, capsys):
    """lr_unet 1e30 is a valid number; the loss turns Inf or NaN within a few steps and nothing is written."""
    data = _data(toys, tmp_path)
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    config = tmp_path / "train.yaml"
    config.write_text("lr_unet: 1.0e+30\nlr_text: 1.0e+30\nlr_embedding: 1.0e+30\n")
    out = tmp_path / "pkg"
    line = assert_clean_error([*_train(base, data, out), "--steps", "6", "--config", config], tmp_path,
                              "training diverged at step", monkeypatch, capsys, out=out)
    assert "lower the learning rates" in line and not out.with_name("pkg.work").exists()


# --- mixshow stats ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_package(tiny_base, toys, tmp_path_factory) -> Path:
    """A real 2-step package (no stats), to spoil copies of."""
    from client.train import train_concept

    out = tmp_path_factory.mktemp("small") / "red"
    return train_concept(tiny_base, toys / "red-circle", WORDS, CLASS_WORD, out, tiny_config(steps=2),
                         show_progress=False)[0]


def _bad_meta(pkg: Path) -> None:
    (pkg / "concept.json").write_text("{not json")


def _bad_resolution(pkg: Path) -> None:
    meta = json.loads((pkg / "concept.json").read_text())
    meta["training"]["resolution"] = "big"
    (pkg / "concept.json").write_text(json.dumps(meta))


STATS_CASES: dict[str, tuple[list[str], Callable[[Path], None] | None, str]] = {
    "--source bogus": (["--source", "bogus"], None, "--source: 'bogus' must be 'sample' or 'train'"),
    "--samples 0": (["--samples", "0"], None, "--samples: 0 is outside"),
    "--samples negative": (["--samples", "-4"], None, "--samples: -4 is outside"),
    "--steps 0": (["--steps", "0"], None, "--steps: 0 is outside"),
    "--seed negative": (["--seed", "-1"], None, "--seed: -1 is outside"),
    "--pack bogus": (["--pack", "zip"], None, "--pack: 'zip' is not one of"),
    "--source train without --data": (["--source", "train"], None, "--data: source 'train' needs"),
    "--data not a folder": (["--source", "train", "--data", "{tmp}/nothing"], None, "--data:"),
    "--data with a bad caption": (["--source", "train", "--data", "{tmp}/data"], None, "does not contain <TOK>"),
    "package is an empty folder": ([], lambda p: [f.unlink() for f in p.iterdir()], "has no concept.json"),
    "package concept.json not json": ([], _bad_meta, "is not valid JSON"),
    "package weights truncated": ([], lambda p: _truncate(p / "edlora.safetensors"), "cannot be read as safetensors"),
    "package training.resolution damaged": ([], _bad_resolution, "training.resolution 'big'"),
}


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_stats_refuses_bad_input(case, tiny_base, toys, small_package, tmp_path, monkeypatch, capsys):
    extra, spoil, expect = STATS_CASES[case]
    pkg = tmp_path / "pkg"
    shutil.copytree(small_package, pkg)
    if spoil:
        spoil(pkg)
    data = _data(toys, tmp_path)
    (data / "00.txt").write_text("no placeholder here")
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    args = ["stats", "--base", base, "--concept", pkg, "--steps", "2",
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    assert_clean_error(args, tmp_path, expect, monkeypatch, capsys)
    assert not (pkg / "stats.safetensors").exists()


def test_stats_refuses_a_package_of_another_base(small_package, tmp_path, monkeypatch, capsys):
    from fixtures.tiny_base import make_tiny_base

    other = make_tiny_base(tmp_path / "other-base", seed=1)
    pkg = tmp_path / "pkg"
    shutil.copytree(small_package, pkg)
    assert_clean_error(["stats", "--base", other, "--concept", pkg, "--steps", "2"], tmp_path, "trained on base",
                       monkeypatch, capsys)


# --- what the dataset accepts, and how ----------------------------------------------------------------------


def _rgb_of(tmp_path: Path, image: Image.Image, name: str = "x.png", fmt: str | None = None, **save) -> np.ndarray:
    path = tmp_path / name
    image.save(path, format=fmt, **save)
    with Image.open(path) as opened:
        opened.load()
        return np.asarray(to_rgb(opened, path))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = _rgb_of(tmp_path, Image.fromarray(values))
    assert Image.open(tmp_path / "x.png").mode == "I;16"
    expected = np.round(values / 257).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) == 256  # a full ramp, not all white


def test_sixteen_bit_big_endian_tiff_and_int_and_float_images(tmp_path):
    ramp = np.round(np.linspace(0, 65535, 64 * 64)).reshape(64, 64).astype(np.int64)
    big = Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes())
    assert np.array_equal(_rgb_of(tmp_path, big, "b.tif", "TIFF")[..., 1], np.round(ramp / 257).astype(np.uint8))
    as_int = _rgb_of(tmp_path, Image.fromarray(ramp.astype(np.int32)), "i.tif", "TIFF")
    assert np.array_equal(as_int[..., 0], np.round(ramp / 257).astype(np.uint8))
    unit = np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(np.float32)
    as_float = _rgb_of(tmp_path, Image.fromarray(unit), "f.tif", "TIFF")
    assert np.array_equal(as_float[..., 0], np.round(unit.astype(np.float64) * 255).astype(np.uint8))


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))
    rgb = _rgb_of(tmp_path, rgba)
    assert tuple(rgb[10, 10]) == (0, 0, 255) and tuple(rgb[10, 50]) == BACKGROUND
    half = _rgb_of(tmp_path, Image.new("LA", (64, 64), (0, 128)), "la.png")
    assert tuple(half[0, 0]) == (127, 127, 127)
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 64, 32))
    p = _rgb_of(tmp_path, palette, "p.png", transparency=0)
    assert tuple(p[5, 5]) == BACKGROUND and tuple(p[50, 5]) == (0, 255, 0)


def test_cmyk_bilevel_and_grey_images(tmp_path):
    cmyk = _rgb_of(tmp_path, Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "c.jpg")
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1].max() < 60  # red
    bilevel = Image.new("1", (64, 64), 0)
    bilevel.paste(1, (0, 0, 32, 64))
    one = _rgb_of(tmp_path, bilevel, "1.png")
    assert tuple(one[0, 0]) == (255, 255, 255) and tuple(one[0, 63]) == (0, 0, 0)
    assert tuple(_rgb_of(tmp_path, Image.new("L", (64, 64), 77), "l.png")[3, 3]) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), "red")
    image.paste((0, 0, 255), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = tmp_path / "data"
    data.mkdir()
    image.save(data / "a.jpg", exif=exif, quality=95)
    (data / "a.txt").write_text("a photo of a <TOK>")
    [example] = load_examples(data)
    assert example.pixels.shape == (3, 80, 40)  # upright: taller than wide
    top = (example.pixels[:, 5, 20] + 1) * 127.5
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after rotating clockwise


def test_sixteen_bit_mask_and_utf8_bom_caption(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "green").save(data / "a.png")
    mask = np.zeros((64, 64), dtype=np.uint16)
    mask[:, :32] = 65535
    Image.fromarray(mask).save(data / "a_mask.png")
    (data / "a.txt").write_bytes("\ufeffune photo d'un <TOK> été".encode())
    [example] = load_examples(data)
    assert example.caption == "une photo d'un <TOK> été"
    assert torch.equal(example.mask[0, :, :32], torch.ones(64, 32)) and example.mask[0, :, 32:].sum() == 0


JOIN_CASES = {
    "--name with a path": (["--name", "../evil"], "--name: '../evil' must be"),
    "--port 0": (["--port", "0"], "--port: 0 is outside"),
    "--words empty": (["--words", ""], "--words: is empty"),
    "data with a bad caption": (["--data", "{tmp}/spoilt"], "does not contain <TOK>"),
}


@pytest.mark.parametrize("case", list(JOIN_CASES))
def test_join_refuses_bad_input_before_starting_a_supernode(case, tiny_base, toys, tmp_path, monkeypatch, capsys):
    extra, expect = JOIN_CASES[case]
    data = _data(toys, tmp_path)
    spoilt = tmp_path / "spoilt"
    shutil.copytree(data, spoilt)
    (spoilt / "00.txt").write_text("a toy")
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    args = ["join", "--superlink", "127.0.0.1:1", "--insecure", "--data", data, "--words", " ".join(WORDS),
            "--class-word", CLASS_WORD, "--base", base, "--work-dir", tmp_path / "work",
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    assert_clean_error(args, tmp_path, expect, monkeypatch, capsys)


def test_join_with_a_package_refuses_bad_input(trained, tiny_base, tmp_path, monkeypatch, capsys):
    pkg, _ = trained
    common = ["join", "--superlink", "127.0.0.1:1", "--insecure", "--base", tiny_base, "--work-dir", tmp_path / "w"]
    assert_clean_error([*common, "--package", pkg, "--words", "<a1>"], tmp_path, "--package or --data", monkeypatch,
                       capsys)
    assert_clean_error([*common, "--words", "<a1>", "--class-word", "toy"], tmp_path, "--data is required",
                       monkeypatch, capsys)
    (tmp_path / "not-a-package").mkdir()
    assert_clean_error([*common, "--package", tmp_path / "not-a-package"], tmp_path, "not-a-package", monkeypatch,
                       capsys)
