"""LoRAs trained elsewhere become concept packages: diffusers / PEFT and kohya files, stats, fusion."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.base import load_base
from tests.badinput import assert_clean_error, run_mixshow


@pytest.mark.slow  # two imports, their stats, two fusions
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_an_outside_lora_imports_gets_stats_and_fuses(layout, outside_lora, tiny_base, three_packages, tmp_path,
                                                      monkeypatch, capsys):
    from client.stats import compute_stats
    from server.fuse import fuse
    from shared.package import apply_concept

    root, updates = outside_lora
    source = root / "diffusers" if layout == "diffusers" else root / "kohya.safetensors"
    pkg = tmp_path / "imported"
    code, out, err = run_mixshow(["import-lora", source, "--base", tiny_base, "--trigger", "<ohwx>", "--class-word",
                                  "toy", "--name", "outside", "--out", pkg], monkeypatch, capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "dropped" in text and "conv1" in text, text
    base = load_base(tiny_base)
    apply_concept(base, pkg)
    for qual, update in updates.items():
        if "conv1" in qual:
            continue
        model_name, module = qual.split(".", 1)
        layer = (base.unet if model_name == "unet" else base.text_encoder).get_submodule(module)
        got = layer.get_delta_weight("default").float()
        assert float((got - update).norm() / update.norm()) <= 1e-5, qual
    compute_stats(load_base(tiny_base), pkg, samples=1, steps=4, show_progress=False)
    report = fuse(tiny_base, [pkg, three_packages[0]], tmp_path / "fused", show_progress=False)
    assert set(report["concepts"]) == {"outside", "red-circle"}


def test_bad_loras_are_one_clear_error(outside_lora, tiny_base, tmp_path, monkeypatch, capsys):
    root, _ = outside_lora
    kohya = load_file(str(root / "kohya.safetensors"))
    other = {k: torch.randn(v.shape[0], v.shape[1] + 8) if k.endswith("lora_down.weight") and "attn1_to_q" in k
             else v for k, v in kohya.items()}  # a LoRA for a base with other widths
    save_file(other, str(tmp_path / "other-base.safetensors"))
    save_file({"model.diffusion_model.foo.weight": torch.ones(2, 2)}, str(tmp_path / "unknown.safetensors"))
    (tmp_path / "pickle.ckpt").write_bytes(b"not read")
    common = ["--base", tiny_base, "--class-word", "toy", "--name", "x", "--out", tmp_path / "pkg"]
    cases = [
        (["import-lora", tmp_path / "other-base.safetensors", "--trigger", "<ohwx>", *common], "does not fit the base"),
        (["import-lora", tmp_path / "unknown.safetensors", "--trigger", "<ohwx>", *common], "key layout"),
        (["import-lora", root / "kohya.safetensors", "--trigger", "toy", *common], "already in the tokenizer"),
        (["import-lora", tmp_path / "pickle.ckpt", "--trigger", "<ohwx>", *common], "not a .safetensors file"),
    ]
    for args, expect in cases:
        assert_clean_error(args, tmp_path, expect, monkeypatch, capsys, out=tmp_path / "pkg")
