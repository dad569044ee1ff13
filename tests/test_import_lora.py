"""LoRAs trained elsewhere become concept packages: diffusers / PEFT and kohya files, stats, fusion."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from shared.base import load_base
from shared.exchange import to_kohya
from tests.badinput import assert_clean_error, run_mixshow

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]  # conv1: a resnet layer mixshow does not fuse


@pytest.fixture(scope="module")
def outside_lora(tiny_base, tmp_path_factory):
    """A LoRA made with PEFT on the tiny base (random, so every layer changes), saved in diffusers' format and,
    converted, in kohya's; with the update of every attention layer it makes."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("outside")
    base = load_base(tiny_base)
    torch.manual_seed(5)
    # scale 1 (alpha = rank): diffusers' own file format carries no alpha
    base.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False))
    base.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "out_proj"], init_lora_weights=False))
    unet_state = get_peft_model_state_dict(base.unet)
    text_state = {k if k.startswith("text_model.") else f"text_model.{k}": v  # CLIPTextModel's module names
                  for k, v in get_peft_model_state_dict(base.text_encoder).items()}
    StableDiffusionPipeline.save_lora_weights(root / "diffusers", unet_lora_layers=unet_state,
                                              text_encoder_lora_layers=text_state, safe_serialization=True)
    updates = {}
    for prefix, model in (("unet", base.unet), ("text_encoder", base.text_encoder)):
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                updates[f"{prefix}.{name}"] = module.get_delta_weight("default").detach().float()
    kohya = to_kohya({f"unet.{k}": v for k, v in unet_state.items()}, 1.0)  # kohya's alpha = scale x rank
    kohya |= to_kohya({f"text_encoder.{k}": v for k, v in text_state.items()}, 1.0)
    save_file(kohya, str(root / "kohya.safetensors"))
    return root, updates


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
