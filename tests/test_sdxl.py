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
