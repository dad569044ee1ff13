"""SDXL-shaped bases: the tiny SDXL folder is a real diffusers SDXL pipeline, the one loader recognises it and
fingerprints both text encoders, and the verbs that do not handle SDXL yet refuse it clearly."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from fixtures.tiny_base import make_tiny_base
from shared.base import load_base
from shared.errors import UserError


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", arch="sdxl")


def test_tiny_sdxl_base_is_an_sdxl_pipeline(sdxl_base):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert max(unet.transformer_layers_per_block) > 1
    assert unet.projection_class_embeddings_input_dim == (pipe.text_encoder_2.config.projection_dim
                                                          + 6 * unet.addition_time_embed_dim)
    image = pipe("a red ball", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0


def test_load_base_recognises_sdxl_and_fingerprints_both_encoders(sdxl_base, tmp_path):
    base = load_base(sdxl_base, sdxl=True)
    assert base.arch == "sdxl" and base.text_encoder_2 is not None and base.tokenizer_2 is not None
    assert load_base(sdxl_base, sdxl=True).fingerprint == base.fingerprint
    # the same folder with one weight of the second text encoder changed: another base
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    with torch.no_grad():
        pipe.text_encoder_2.get_input_embeddings().weight[5] += 0.5
    pipe.save_pretrained(tmp_path / "changed", safe_serialization=True)
    assert load_base(tmp_path / "changed", sdxl=True).fingerprint != base.fingerprint


def test_verbs_without_sdxl_support_refuse_an_sdxl_base(sdxl_base):
    with pytest.raises(UserError, match="is an SDXL base"):
        load_base(sdxl_base)


def test_the_sd_tiny_base_stays_sd(tiny_base):
    assert load_base(tiny_base).arch == "sd"


def test_kohya_keys_for_sdxl_load_in_diffusers_and_give_the_same_weights(sdxl_base, tmp_path):
    """A LoRA on both text encoders and the UNet in kohya keys (`lora_te1_`, `lora_te2_`, `lora_unet_`, with
    `.alpha`): diffusers' SDXL `load_lora_weights` reads it and fusing it gives W0 + scale * B @ A everywhere."""
    from safetensors.torch import save_file

    from shared.exchange import to_kohya

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
    generator = torch.Generator().manual_seed(0)
    lora, expected = {}, {}
    for prefix, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(suffixes):
                down = torch.randn(2, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, 2, generator=generator) * 0.1
                lora[f"{prefix}.{name}.lora_A.weight"], lora[f"{prefix}.{name}.lora_B.weight"] = down, up
                expected[prefix, name] = module.weight.detach() + 0.5 * up @ down
    kohya = to_kohya(lora, 0.5, sdxl=True)
    assert {k.split("_", 2)[1] for k in kohya} == {"unet", "te1", "te2"}
    save_file(kohya, str(tmp_path / "lora.safetensors"))
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    pipe.fuse_lora()
    for (prefix, name), weight in expected.items():
        got = models[prefix].get_submodule(name)
        got = got.base_layer.weight if hasattr(got, "base_layer") else got.weight
        assert float((got.detach() - weight).norm() / weight.norm()) <= 1e-5, (prefix, name)
