"""Export to the formats other tools read: kohya / diffusers LoRA files and textual-inversion embeddings, loaded
back through diffusers' own loaders."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from shared.base import load_base
from shared.exchange import collapse
from shared.fused_model import read_fused_lora
from tests.badinput import assert_clean_error, run_mixshow


def plain_pipeline(folder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)


def largest_relative_gap(model: torch.nn.Module, reference: torch.nn.Module, keys: list[str]) -> float:
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    return max(float((ours[k] - theirs[k]).norm() / theirs[k].norm()) for k in keys)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exported_lora_loads_in_diffusers_and_gives_the_fused_weights(fmt, fused_three, tiny_base, tmp_path,
                                                                      monkeypatch, capsys):
    out = tmp_path / fmt
    code, stdout, err = run_mixshow(["export", "--model", fused_three["gradient"], "--format", fmt, "--out", out],
                                    monkeypatch, capsys)
    assert code == 0, err
    lora_file = out / ("lora.safetensors" if fmt == "kohya" else "pytorch_lora_weights.safetensors")
    keys = load_file(str(lora_file))
    if fmt == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys), list(keys)[:3]
        assert any(k.endswith(".alpha") for k in keys) and not any(k.startswith("lora_te1_") for k in keys)
    pipe = plain_pipeline(tiny_base)
    pipe.load_lora_weights(str(out), weight_name=lora_file.name)  # diffusers' own (kohya) conversion
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = load_base(fused_three["gradient"])
    info, tensors = read_fused_lora(fused_three["gradient"] / "fused_lora.safetensors")
    for model, reference, prefix in ((pipe.unet, fused.unet, "unet."), (pipe.text_encoder, fused.text_encoder,
                                                                         "text_encoder.")):
        adapted = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] + ".weight" for k in tensors
                          if k.startswith(prefix) and ".lora_A." in k})
        assert adapted
        assert largest_relative_gap(model, reference, adapted) <= 1e-5
    # every concept's textual inversion loads, one vector per word, each the mean of its layer tokens
    for concept in info["concepts"]:
        name = concept["name"]
        pipe.load_textual_inversion(str(out / "embeddings" / f"{name}.safetensors"), token=f"<{name}>")
        table = pipe.text_encoder.get_input_embeddings().weight
        ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in (f"<{name}>", f"<{name}>_1")]
        for row, q in zip(ids, concept["tokens"]):
            assert torch.allclose(table[row], collapse(tensors[f"emb.{q}"].float()).to(table), atol=1e-6)
    notes = (out / "triggers.txt").read_text()
    assert all(c["name"] in notes for c in info["concepts"]) and "mean over the layers" in notes


def test_a_package_exports_with_its_own_scale(trained, tiny_base, tmp_path, monkeypatch, capsys):
    pkg, _ = trained
    out = tmp_path / "pkg"
    code, _, err = run_mixshow(["export", "--concept", pkg, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    pipe = plain_pipeline(tiny_base)
    pipe.load_lora_weights(str(out), weight_name="lora.safetensors")
    pipe.fuse_lora()
    from shared.package import apply_concept

    base = load_base(tiny_base)
    apply_concept(base, pkg)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = base.unet.get_submodule(module)
    merged = layer.base_layer.weight + layer.get_delta_weight("default")
    theirs = pipe.unet.get_submodule(module).weight
    assert float((theirs - merged).norm() / merged.norm()) <= 1e-5


def test_export_refuses_bad_input(fused_three, tmp_path, monkeypatch, capsys):
    assert_clean_error(["export", "--out", tmp_path / "o"], tmp_path, "exactly one of --model", monkeypatch, capsys)
    assert_clean_error(["export", "--model", fused_three["gradient"], "--format", "ckpt", "--out", tmp_path / "o"],
                       tmp_path, "--format: 'ckpt' is not one of kohya, diffusers", monkeypatch, capsys,
                       out=tmp_path / "o")
    assert_clean_error(["export", "--model", tmp_path, "--out", tmp_path / "o"], tmp_path, "fused_lora",
                       monkeypatch, capsys, out=tmp_path / "o")
