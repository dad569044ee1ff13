"""The model a scene samples from (shared by `mixshow sample` and `mixshow eval clip`): a fused folder, a base
plus fused_lora.safetensors, a base plus concept packages (one applied as trained, several fused in memory),
or a bare base. Returns the pipeline parts, the text encoder, and how prompts name concepts."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import InvalidArgument, UserError
from shared.validate import number

MAX_LORA_SCALE = 4.0  # 0 = the base weights, 1 = as trained; far beyond 1 the LoRA only breaks the model


@dataclass
class SceneModel:
    """A loaded model: the pipeline parts, the concept records prompts may name, and how they are expanded."""

    base: object
    encoder: object
    concepts: list[dict]
    expand: Callable[[str], str]
    scale: contextlib.AbstractContextManager | None = None  # the LoRA-scale context of one applied package


def fused(base, encoder, concepts: list[dict]) -> SceneModel:
    """A model whose concepts are addressed `<name>` (a fused folder or fused_lora, or a bare base)."""
    from shared.fused_model import expand_prompt

    return SceneModel(base, encoder, concepts, lambda text: expand_prompt(text, concepts))


Fuser = Callable[[Path, list[Path], Path], None]  # (base, packages, out folder): writes a fused folder


def load_scene_model(scene, device: torch.device, dtype: torch.dtype, base_config: Path | None = None,
                     lora_weight: float = 1.0, fuser: Fuser | None = None) -> SceneModel:
    """The model `scene`'s model fields name; several packages are fused first by `fuser`. `lora_weight`
    scales the LoRA of one package applied to a base (anything but 1 is refused for other models)."""
    from shared.base import load_base
    from shared.edlora import TokenMap, cross_attention_layers, install_layer_processors
    from shared.fused_model import apply_fused_lora, load_fused
    from shared.lora import lora_scale
    from shared.package import apply_concept, layerwise_encoder

    lora_weight = float(number("lora_weight", lora_weight, 0.0, MAX_LORA_SCALE))
    single = scene.model is None and scene.base is not None and scene.fused_lora is None and len(scene.concepts) == 1
    if lora_weight != 1.0 and not single:
        raise InvalidArgument("lora_weight", f"{lora_weight:g} would be ignored: it scales the LoRA of one concept "
                              "package applied to a base; a fused model, a fused LoRA or several packages carry "
                              "their own scales")
    if scene.model is not None:
        if scene.base is not None or scene.fused_lora is not None or scene.concepts:
            raise InvalidArgument("model", "give a fused model alone, or a base with a fused LoRA or concept packages")
        return fused(*load_fused(scene.model, device, dtype))
    if scene.base is None:
        raise InvalidArgument("model", "name a model: a fused folder, or a base (with packages or a fused LoRA)")
    if scene.fused_lora is not None and scene.concepts:
        raise InvalidArgument("fused_lora", "give a fused LoRA or concept packages with the base, not both")
    if len(scene.concepts) > 1:
        return fuse_in_memory(scene, device, dtype, fuser)
    base = load_base(scene.base, device, dtype, base_config, sdxl=True)
    if scene.fused_lora is not None:
        return fused(base, *apply_fused_lora(base, scene.fused_lora))
    if scene.concepts:
        meta, encoder = apply_concept(base, scene.concepts[0])
        return SceneModel(base, encoder, [{"name": meta.name, "class_word": meta.class_word}],
                          single_concept_expander(meta),
                          lora_scale([base.unet, *(encoder for _, _, encoder in base.text_models())], lora_weight))
    n_layers = len(cross_attention_layers(base.unet))
    install_layer_processors(base.unet, base.tokenizer.model_max_length)
    return fused(base, layerwise_encoder(base, TokenMap(n_layers)), [])


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


def fuse_in_memory(scene, device: torch.device, dtype: torch.dtype, fuser: Fuser | None) -> SceneModel:
    """Several packages on a base: `fuser` (the server's fusion, handed down by the caller) writes a fused
    folder into a temporary place, which is read whole into memory."""
    from shared.fused_model import load_fused

    if fuser is None:
        raise InvalidArgument("concept", "several packages must be fused first: fuse them, then sample the result")
    with tempfile.TemporaryDirectory(prefix="mixshow-scene-") as tmp:
        folder = Path(tmp) / "fused"
        fuser(Path(scene.base), list(scene.concepts), folder)
        return fused(*load_fused(folder, device, dtype))  # every weight is read into memory here
