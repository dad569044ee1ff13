"""Base loading (folder and single file), fingerprints, and the CLI's handling of bad input."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from cli.main import main
from fixtures.tiny_base import WORDS
from shared.base import load_base
from shared.edlora import LayerwiseTextEncoder, TokenMap
from shared.ldm_export import export_single_file
from shared.sampling import generate
from tests.conftest import TOY_WORDS


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mixshow", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_base_has_sd_shape_and_single_token_words(tiny_base):
    base = load_base(tiny_base)
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
    assert len(base.unet.config.block_out_channels) >= 2
    assert base.tokenizer.model_max_length == 77
    for word in WORDS:
        assert len(base.tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_single_file_base_gives_same_fingerprint_and_image(tiny_base, tmp_path):
    ckpt = export_single_file(tiny_base, tmp_path / "tiny.safetensors")
    folder, single = load_base(tiny_base), load_base(ckpt, config=tiny_base)
    assert folder.fingerprint == single.fingerprint
    images = []
    for base in (folder, single):
        enc = LayerwiseTextEncoder(base.tokenizer, base.text_encoder, TokenMap(1))
        images.append(generate(base, enc, ["a red ball on the grass"], seed=5, steps=4, height=64, width=64)[0])
    assert images[0].tobytes() == images[1].tobytes()


def test_fingerprint_changes_with_the_weights(tiny_base, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    from safetensors.torch import load_file, save_file

    path = next((copy / "unet").glob("*.safetensors"))
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("to_q.weight"))
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(path))
    assert load_base(copy).fingerprint != load_base(tiny_base).fingerprint


def _train_args(base, data, out, words="<clia1> <clia2>", cls="toy"):
    return ["train", "--base", str(base), "--data", str(data), "--words", words, "--class-word", cls,
            "--out", str(out), "--steps", "2", "--resolution", "64", "--preview", "none"]


def _copy_concept(toys, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toys / "red-circle", data)
    return data


BAD_INPUTS = {
    "missing caption": (lambda d: (d / "00.txt").unlink(), {}, "missing caption"),
    "empty data folder": (lambda d: [p.unlink() for p in d.iterdir()], {}, "holds no images"),
    "unreadable image": (lambda d: (d / "01.png").write_bytes(b"not a png"), {}, "cannot read image"),
    "word in tokenizer": (None, {"words": "<clia1> dog"}, "already in the tokenizer"),
    "class word not one token": (None, {"cls": "zebra"}, "not one"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_train_bad_input_one_line_exit_2_nothing_written(case, tiny_base, toys, tmp_path, monkeypatch, capsys):
    spoil, kw, message = BAD_INPUTS[case]
    data = _copy_concept(toys, tmp_path)
    if spoil:
        spoil(data)
    out = tmp_path / "out" / "pkg"
    code, _, err = run_cli(_train_args(tiny_base, data, out, **kw), monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out.exists() and not out.with_name("pkg.work").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_base_missing_component(tiny_base, toys, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    shutil.rmtree(broken / "vae")
    out = tmp_path / "pkg"
    code, _, err = run_cli(_train_args(broken, toys / "red-circle", out), monkeypatch, capsys)
    assert code == 2 and "missing component 'vae'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_out_is_an_existing_package(tiny_base, toys, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "concept.json").write_text(json.dumps({"name": "other"}))
    code, _, err = run_cli(_train_args(tiny_base, toys / "red-circle", out), monkeypatch, capsys)
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["concept.json"]


def test_yaml_config_unknown_key(tiny_base, toys, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("steps: 3\nlearning_rate: 0.1\n")
    code, _, err = run_cli([*_train_args(tiny_base, toys / "red-circle", tmp_path / "p"), "--config", str(cfg)],
                           monkeypatch, capsys)
    assert code == 2 and "unknown setting 'learning_rate'" in err


def test_cli_train_then_sample_is_deterministic(tiny_base, toys, tmp_path, monkeypatch, capsys):
    words, cls = TOY_WORDS["blue-square"]
    cfg = tmp_path / "train.yaml"
    cfg.write_text("sample_steps: 2\ntemplates: ['photo of a {}']\ncheckpoint_every: 0\n")
    pkg = tmp_path / "pkg"
    args = _train_args(tiny_base, toys / "blue-square", pkg, " ".join(words), cls)
    code, out, err = run_cli([*args, "--config", str(cfg), "--stats"], monkeypatch, capsys)
    assert code == 0, err
    assert (pkg / "stats.safetensors").is_file()
    images = []
    for name in ("a.png", "b.png"):
        code, _, err = run_cli(["sample", "--base", str(tiny_base), "--concept", str(pkg), "--prompt",
                                "a <TOK> on a beach", "--steps", "3", "--height", "64", "--width", "64",
                                "--seed", "7", "--out", str(tmp_path / name)], monkeypatch, capsys)
        assert code == 0, err
        images.append((tmp_path / name).read_bytes())
    assert images[0] == images[1]


def test_sample_rejects_package_from_another_base(tiny_base, trained, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other-base"
    from fixtures.tiny_base import make_tiny_base

    make_tiny_base(other, seed=1)
    pkg, _ = trained
    code, _, err = run_cli(["sample", "--base", str(other), "--concept", str(pkg), "--prompt", "a <TOK>",
                            "--out", str(tmp_path / "x.png")], monkeypatch, capsys)
    assert code == 2 and "trained on base" in err and not (tmp_path / "x.png").exists()


def test_device_flag_is_checked(tiny_base, trained, tmp_path, monkeypatch, capsys):
    pkg, _ = trained
    bad = "cuda" if not torch.cuda.is_available() else "nonsense"
    code, _, err = run_cli(["sample", "--base", str(tiny_base), "--concept", str(pkg), "--prompt", "a <TOK>",
                            "--device", bad, "--out", str(tmp_path / "x.png")], monkeypatch, capsys)
    assert code == 2 and "--device" in err
