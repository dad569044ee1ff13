"""Export a Stable Diffusion 1.x or SDXL diffusers folder as one original-layout `.safetensors` checkpoint.

The file uses the key layout of the original checkpoints (CompVis/LDM for SD 1.x, Stability's SGM for
SDXL), so tools that expect a single "model.ckpt"-style file (and diffusers' own `from_single_file`) can
read it:

* `model.diffusion_model.*`: the UNet (`input_blocks`, `middle_block`, `output_blocks`, `time_embed`, `out`;
  SDXL's pooled-text and size embedding as `label_emb.0`);
* `first_stage_model.*`: the VAE (`encoder.down.N.block.M`, `mid.attn_1.{q,k,v,proj_out}` as 1x1 convs, ...);
* SD 1.x: `cond_stage_model.transformer.text_model.*`, the CLIP text encoder;
* SDXL: `conditioner.embedders.0.transformer.text_model.*` (the CLIP ViT-L encoder, as is) and
  `conditioner.embedders.1.model.*` (the second, OpenCLIP-layout encoder: `transformer.resblocks.N` with
  one `attn.in_proj_weight` holding q, k and v, `ln_final`, `positional_embedding`, `text_projection`).

Tensors are renamed, the VAE attention projections reshaped to `[C, C, 1, 1]`, and for the OpenCLIP
encoder q/k/v stacked and the projection transposed: exact operations, so `from_single_file(out,
config=folder)` gives back the folder's weights bit for bit. The renaming is computed from the UNet and
VAE configs (number of blocks, `layers_per_block`, which blocks have attentions), so any SD-1.x- or
SDXL-shaped model works, whatever its size.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D parameter names -> LDM ResBlock names (UNet only; the VAE keeps the names).
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + size conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}

# CLIPTextModel(WithProjection) layer parts -> OpenCLIP resblock parts (q/k/v are stacked apart).
_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")

_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

_VAE_ATTN_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}

_UNET_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_UNET_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)")
_VAE_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _split_param(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def _rename_part(rest: str, parts: Mapping[str, str]) -> str:
    """Rename the module part of `rest` ('conv1.weight') through `parts`, keeping unknown names."""
    module, param = _split_param(rest)
    return f"{parts.get(module, module)}.{param}"


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        # LDM numbers input/output blocks with one stride for all levels, so levels must agree.
        if len(set(layers)) != 1:
            raise ValueError(f"per-level layers_per_block {layers} has no LDM layout")
        layers = layers[0]
    return int(layers)


def _unet_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of one diffusers UNet key."""
    layers = _layers_per_block(config)
    levels = len(config["block_out_channels"])
    module, param = _split_param(key)
    if module in _UNET_TOP_LEVEL:
        return f"{_UNET_TOP_LEVEL[module]}.{param}"

    if m := _UNET_DOWN.fullmatch(key):
        level, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        # input_blocks.0 is conv_in; each level then has `layers` (resnet[, attention]) pairs
        # and, except the last level, one downsampler.
        first = 1 + level * (layers + 1)
        if kind == "resnets" and idx < layers:
            return f"input_blocks.{first + idx}.0.{_rename_part(rest, _UNET_RESNET_PARTS)}"
        if kind == "attentions" and idx < layers and "CrossAttn" in config["down_block_types"][level]:
            return f"input_blocks.{first + idx}.1.{rest}"
        if kind == "downsamplers" and idx == 0 and level < levels - 1 and rest.startswith("conv."):
            return f"input_blocks.{first + layers}.0.op.{rest.removeprefix('conv.')}"

    elif m := _UNET_UP.fullmatch(key):
        level, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        # Up levels have one more resnet than down levels; the upsampler sits in the level's last
        # output block, after the attention when there is one.
        first = level * (layers + 1)
        has_attn = "CrossAttn" in config["up_block_types"][level]
        if kind == "resnets" and idx <= layers:
            return f"output_blocks.{first + idx}.0.{_rename_part(rest, _UNET_RESNET_PARTS)}"
        if kind == "attentions" and idx <= layers and has_attn:
            return f"output_blocks.{first + idx}.1.{rest}"
        if kind == "upsamplers" and idx == 0 and level < levels - 1 and rest.startswith("conv."):
            return f"output_blocks.{first + layers}.{2 if has_attn else 1}.{rest}"

    elif m := _UNET_MID.fullmatch(key):
        kind, idx, rest = m[1], int(m[2]), m[3]
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"mid block type {config.get('mid_block_type')} has no SD 1.x LDM layout")
        # middle_block is resnet, transformer, resnet.
        if kind == "resnets" and idx in (0, 1):
            return f"middle_block.{2 * idx}.{_rename_part(rest, _UNET_RESNET_PARTS)}"
        if kind == "attentions" and idx == 0:
            return f"middle_block.1.{rest}"

    raise ValueError(f"UNet key {key!r} has no SD 1.x LDM name for this config")


def unet_ldm_names(keys: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """Map diffusers UNet2DConditionModel state-dict keys to full LDM keys (`model.diffusion_model.*`).

    `config` is the UNet's config (as in its `config.json`). Raises ValueError for a key that the
    SD 1.x layout has no place for (e.g. class or addition embeddings).
    """
    return {key: UNET_PREFIX + _unet_key(key, config) for key in keys}


def _vae_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of one diffusers AutoencoderKL key."""
    levels = len(config["block_out_channels"])
    module, param = _split_param(key)
    if module in _VAE_TOP_LEVEL:
        return f"{_VAE_TOP_LEVEL[module]}.{param}"

    if m := _VAE_DOWN.fullmatch(key):
        level, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"encoder.down.{level}.block.{idx}.{_rename_part(rest, _VAE_RESNET_PARTS)}"
        if idx == 0 and rest.startswith("conv."):
            return f"encoder.down.{level}.downsample.{rest}"

    elif m := _VAE_UP.fullmatch(key):
        # LDM numbers decoder levels from the lowest resolution up, diffusers in execution order.
        level, kind, idx, rest = levels - 1 - int(m[1]), m[2], int(m[3]), m[4]
        if level < 0:
            raise ValueError(f"VAE key {key!r} is beyond the config's {levels} levels")
        if kind == "resnets":
            return f"decoder.up.{level}.block.{idx}.{_rename_part(rest, _VAE_RESNET_PARTS)}"
        if idx == 0 and rest.startswith("conv."):
            return f"decoder.up.{level}.upsample.{rest}"

    elif m := _VAE_MID.fullmatch(key):
        part, kind, idx, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets" and idx in (0, 1):
            return f"{part}.mid.block_{idx + 1}.{_rename_part(rest, _VAE_RESNET_PARTS)}"
        attn_module, param = _split_param(rest)
        if kind == "attentions" and idx == 0 and attn_module in _VAE_ATTN_PARTS:
            return f"{part}.mid.attn_1.{_VAE_ATTN_PARTS[attn_module]}.{param}"

    raise ValueError(f"VAE key {key!r} has no SD 1.x LDM name for this config")


def vae_ldm_names(keys: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """Map diffusers AutoencoderKL state-dict keys to full LDM keys (`first_stage_model.*`)."""
    return {key: VAE_PREFIX + _vae_key(key, config) for key in keys}


def text_encoder_ldm_names(keys: Iterable[str], prefix: str = TEXT_PREFIX) -> dict[str, str]:
    """Map CLIPTextModel state-dict keys to `<prefix>text_model.*` (SD 1.x: `cond_stage_model.transformer.`).

    Accepts both the transformers 5 layout (`embeddings.*`, no `text_model.` level) and the older
    one (`text_model.embeddings.*`).
    """
    return {key: prefix + (key if key.startswith("text_model.") else f"text_model.{key}") for key in keys}


def open_clip_state_dict(text_encoder_2: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (a CLIPTextModelWithProjection state dict) in OpenCLIP's layout, with the
    `conditioner.embedders.1.model.` prefix: per layer the q, k, v projections stacked into `attn.in_proj_*`
    (in that order), and `text_projection` stored transposed (OpenCLIP multiplies `x @ P`)."""
    out: dict[str, torch.Tensor] = {}
    stacked: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in text_encoder_2.items():
        plain = key.removeprefix("text_model.")
        if plain == "text_projection.weight":
            out["text_projection"] = tensor.T
        elif plain in _OPEN_CLIP_TOP_LEVEL:
            out[_OPEN_CLIP_TOP_LEVEL[plain]] = tensor
        elif plain == "embeddings.position_ids":
            continue  # a buffer, not a weight
        elif (m := _CLIP_LAYER.fullmatch(plain)) and m[2] in ("self_attn.q_proj", "self_attn.k_proj",
                                                               "self_attn.v_proj"):
            stacked.setdefault((int(m[1]), m[3]), {})[m[2][-6]] = tensor
        elif m and m[2] in _OPEN_CLIP_LAYER_PARTS:
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER_PARTS[m[2]]}.{m[3]}"] = tensor
        else:
            raise ValueError(f"text_encoder_2 key {key!r} has no OpenCLIP name")
    for (layer, param), parts in stacked.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"text_encoder_2 layer {layer} lacks one of its q, k, v {param}s")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {SDXL_OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def _is_vae_attn_projection(ldm_key: str) -> bool:
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


def to_ldm_state_dict(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder_2: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Combine diffusers component state dicts into one LDM-layout state dict (SGM's SDXL layout when
    `text_encoder_2` is given).

    Tensors are passed through unchanged except the VAE mid-block attention projections, which
    LDM stores as 1x1 conv weights `[C, C, 1, 1]` (diffusers keeps them as linear `[C, C]`), and the
    second text encoder (`open_clip_state_dict`).
    Works on meta tensors too, which is how the key mapping is checked without real weights.
    """
    out: dict[str, torch.Tensor] = {}
    sdxl = text_encoder_2 is not None
    text_names = text_encoder_ldm_names(text_encoder, SDXL_TEXT_PREFIX if sdxl else TEXT_PREFIX)
    parts = [(unet_ldm_names(unet, unet_config), unet), (vae_ldm_names(vae, vae_config), vae),
             (text_names, text_encoder)]
    if sdxl:
        second = open_clip_state_dict(text_encoder_2)
        parts.append(({key: key for key in second}, second))
    for names, tensors in parts:
        for key, ldm_key in names.items():
            if ldm_key in out:
                raise ValueError(f"two tensors map to {ldm_key!r}")
            tensor = tensors[key]
            if _is_vae_attn_projection(ldm_key) and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            out[ldm_key] = tensor
    return out


def _load_component(folder: Path) -> dict[str, torch.Tensor]:
    """Load the safetensors weights of one component folder (single file or sharded)."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return load_file(folder / name)
    for index in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(folder / shard))
            return state
    raise UserError(f"no safetensors weights in {folder}: expected a diffusers component folder")


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: expected a diffusers Stable Diffusion 1.x or SDXL folder")
    return json.loads(path.read_text())


def export_single_file(folder: Path, out: Path) -> Path:
    """Write the SD 1.x or SDXL diffusers pipeline at `folder` as one original-layout `.safetensors` file.

    Reads `unet/`, `vae/`, `text_encoder/` (and SDXL's `text_encoder_2/`), weights and configs, renames
    every tensor to its original key and writes the result atomically (temporary file beside `out`, then
    rename), with safetensors metadata `{"format": "pt"}`. Returns `out`.
    `StableDiffusionPipeline` (or `StableDiffusionXLPipeline`)`.from_single_file(out, config=folder)`
    restores the same tensors.
    """
    folder, out = Path(folder), Path(out)
    sdxl = (folder / "text_encoder_2").is_dir()
    state = to_ldm_state_dict(
        unet=_load_component(folder / "unet"),
        vae=_load_component(folder / "vae"),
        text_encoder=_load_component(folder / "text_encoder"),
        unet_config=_load_config(folder / "unet"),
        vae_config=_load_config(folder / "vae"),
        text_encoder_2=_load_component(folder / "text_encoder_2") if sdxl else None,
    )
    # safetensors refuses non-contiguous tensors.
    state = {k: v.contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out
