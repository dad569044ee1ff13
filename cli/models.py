"""The model a scene samples from (shared by `mixshow sample` and `mixshow eval clip`): a fused folder, a base
plus fused_lora.safetensors, a base plus concept packages (one applied as trained, several fused in memory),
or a bare base. Returns the pipeline parts, the text encoder, and how prompts name concepts."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from shared.errors import UserError


def load_scene_model(scene, device: torch.device, dtype: torch.dtype, base_config: Path | None = None,
                     lora_weight: float = 1.0):
    """(base, encoder, expand, LoRA-scale context or None) for `scene`'s model fields."""
    from shared.base import load_base
    from shared.edlora import LayerwiseTextEncoder, TokenMap, cross_attention_layers, install_layer_processors
    from shared.fused_model import apply_fused_lora, expand_prompt, load_fused
    from shared.lora import lora_scale
    from shared.package import apply_concept

    if scene.model is not None:
        if scene.base is not None or scene.fused_lora is not None or scene.concepts:
            raise UserError("give a fused --model alone, or --base with --fused-lora or --concept")
        base, encoder, concepts = load_fused(scene.model, device, dtype)
        return base, encoder, lambda text: expand_prompt(text, concepts), None
    if scene.base is None:
        raise UserError("name a model: --model FUSED, or --base BASE (with --concept PKG... or --fused-lora FILE)")
    if scene.fused_lora is not None and scene.concepts:
        raise UserError("give --fused-lora or --concept with --base, not both")
    if len(scene.concepts) > 1:
        return fuse_in_memory(scene, device, dtype, base_config)
    base = load_base(scene.base, device, dtype, base_config)
    if scene.fused_lora is not None:
        encoder, concepts = apply_fused_lora(base, scene.fused_lora)
        return base, encoder, lambda text: expand_prompt(text, concepts), None
    if scene.concepts:
        meta, encoder = apply_concept(base, scene.concepts[0])
        scale = lora_scale([base.unet, base.text_encoder], lora_weight)
        return base, encoder, single_concept_expander(meta), scale
    n_layers = len(cross_attention_layers(base.unet))
    install_layer_processors(base.unet, base.tokenizer.model_max_length)
    encoder = LayerwiseTextEncoder(base.tokenizer, base.text_encoder, TokenMap(n_layers))
    return base, encoder, lambda text: expand_prompt(text, []), None


def single_concept_expander(meta):
    """Prompts for one package: `<TOK>` or `<name>` become its words, which may also be written as they are."""
    import re

    def expand(text: str) -> str:
        text = text.replace("<TOK>", meta.phrase).replace(f"<{meta.name}>", meta.phrase)
        unknown = [w for w in re.findall(r"<[^<>\s/]+>", text) if w not in meta.words]
        if unknown:
            raise UserError(f"prompt names concept {unknown[0]}, which this model lacks (it has: <{meta.name}>, "
                            f"written <TOK> or {meta.phrase})")
        return text
    return expand


def fuse_in_memory(scene, device: torch.device, dtype: torch.dtype, base_config: Path | None):
    """Several packages on a base: gradient fusion (the defaults of `mixshow fuse`) into a temporary folder."""
    from server.fuse import fuse
    from shared.fused_model import expand_prompt, load_fused

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mixshow-scene-"))) / "fused"
        fuse(scene.base, list(scene.concepts), folder, device=device, base_config=base_config, show_progress=False)
        base, encoder, concepts = load_fused(folder, device, dtype)  # every weight is read into memory here
    return base, encoder, lambda text: expand_prompt(text, concepts), None
