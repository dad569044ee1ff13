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


def test_an_sdxl_kohya_lora_imports_with_both_text_encoders(sdxl_base, tmp_path, monkeypatch, capsys):
    """A kohya SDXL LoRA (lora_unet_ / lora_te1_ / lora_te2_ keys, made with PEFT on the tiny SDXL base) becomes
    a package whose every layer, in the UNet and both text encoders, gives back the file's update, with the
    trigger word in both tokenizers."""
    from peft import LoraConfig, get_peft_model_state_dict

    from shared.exchange import to_kohya
    from shared.package import apply_concept, read_package

    base = load_base(sdxl_base, sdxl=True)
    torch.manual_seed(6)
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    base.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    lora, updates = {}, {}
    for _, _, encoder in base.text_models():
        encoder.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=text_targets, init_lora_weights=False))
    for prefix, model in [("unet", base.unet)] + [(p, e) for p, _, e in base.text_models()]:
        state = get_peft_model_state_dict(model)
        if prefix != "unet":
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        lora |= {f"{prefix}.{k}": v for k, v in state.items()}
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                updates[f"{prefix}.{name}"] = module.get_delta_weight("default").detach().float()
    kohya = to_kohya(lora, 2.0, sdxl=True)  # alpha / rank = 2, as the PEFT adapters were made
    assert any(k.startswith("lora_te2_") for k in kohya) and any(k.startswith("lora_te1_") for k in kohya)
    save_file(kohya, str(tmp_path / "sdxl.safetensors"))
    pkg = tmp_path / "imported"
    code, _, err = run_mixshow(["import-lora", tmp_path / "sdxl.safetensors", "--base", sdxl_base, "--trigger",
                                "<sdxw>", "--class-word", "toy", "--name", "outside-xl", "--out", pkg],
                               monkeypatch, capsys)
    assert code == 0, err
    meta, tensors = read_package(pkg)
    assert meta.encoders == 2 and meta.text_modules_2 and "emb_2.<sdxw>" in tensors
    fresh = load_base(sdxl_base, sdxl=True)
    apply_concept(fresh, pkg)
    models = {"unet": fresh.unet, "text_encoder": fresh.text_encoder, "text_encoder_2": fresh.text_encoder_2}
    assert {q.split(".", 1)[0] for q in updates} == set(models)
    for qual, update in updates.items():
        model_name, module = qual.split(".", 1)
        got = models[model_name].get_submodule(module).get_delta_weight("default").float()
        assert float((got.detach() - update).norm() / update.norm()) <= 1e-5, qual
    for (_, tokenizer, encoder), (_, _, original) in zip(fresh.text_models(), load_base(sdxl_base, sdxl=True)
                                                         .text_models()):
        new, (toy,) = tokenizer.convert_tokens_to_ids("<sdxw>_0"), tokenizer("toy", add_special_tokens=False).input_ids
        assert new != tokenizer.unk_token_id  # the trigger is a token of each tokenizer, initialised from "toy"
        rows = encoder.get_input_embeddings().weight
        assert torch.equal(rows[new], original.get_input_embeddings().weight[toy])
