"""Tests for shared.ldm_export: diffusers folder -> one LDM-layout .safetensors file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from fixtures.tiny_base import make_tiny_base
from shared.ldm_export import (
    export_single_file,
    text_encoder_ldm_names,
    to_ldm_state_dict,
    unet_ldm_names,
)

WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ldm")
    base = make_tiny_base(tmp / "base")
    out = export_single_file(base, tmp / "out" / "tiny.safetensors")
    return base, out


def test_from_single_file_restores_every_tensor(exported: tuple[Path, Path]) -> None:
    base, out = exported
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(base), local_files_only=True)
    for name, weights in WEIGHTS.items():
        expected = load_file(base / name / weights)
        got = getattr(pipe, name).state_dict()
        # from_single_file does not report missing keys: they would stay on the meta device.
        assert set(got) == set(expected), name
        for key, tensor in expected.items():
            assert got[key].device.type == "cpu", (name, key)
            assert got[key].dtype == tensor.dtype, (name, key)
            assert torch.equal(got[key], tensor), (name, key)


def test_file_layout_metadata_and_detection(exported: tuple[Path, Path]) -> None:
    _, out = exported
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    state = load_file(out)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in state)
    assert infer_diffusers_model_type(state) == "v1"
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left behind


def _sd15_shaped_meta() -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768)  # otherwise the defaults are SD 1.5's
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig())  # defaults are ViT-L/14's text tower
    return unet, vae, text_encoder


def test_sd15_shaped_mapping_round_trips_through_diffusers_converters() -> None:
    unet, vae, text_encoder = _sd15_shaped_meta()
    u, v, t = unet.state_dict(), vae.state_dict(), text_encoder.state_dict()
    ldm = to_ldm_state_dict(u, v, t, dict(unet.config), dict(vae.config))
    assert len(ldm) == len(u) + len(v) + len(t)
    assert infer_diffusers_model_type(ldm) == "v1"
    # Landmarks of the original SD 1.x checkpoints.
    for key in (
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    ):
        assert key in ldm, key

    back_clip = {k.removeprefix("text_model."): x for k, x in convert_ldm_clip_checkpoint(ldm).items()}
    for expected, back in (
        (u, convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
        (v, convert_ldm_vae_checkpoint(ldm, dict(vae.config))),
        (t, back_clip),
    ):
        assert set(back) == set(expected)
        assert {k: back[k].shape for k in back} == {k: x.shape for k, x in expected.items()}


def test_unmappable_unet_key_is_refused() -> None:
    unet, _, _ = _sd15_shaped_meta()
    with pytest.raises(ValueError, match="class_embedding"):
        unet_ldm_names(["class_embedding.linear_1.weight"], dict(unet.config))


def test_text_encoder_names_accept_both_transformers_layouts() -> None:
    names = text_encoder_ldm_names(
        ["embeddings.position_embedding.weight", "text_model.final_layer_norm.bias"]
    )
    assert list(names.values()) == [
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.bias",
    ]
