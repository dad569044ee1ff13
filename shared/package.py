"""The concept package: what one client's training produces and uploads.

    PKG/concept.json        metadata (see docs/formats.md)
    PKG/edlora.safetensors  emb.<word> [n_layers, hidden]; text_encoder.* / unet.* LoRA tensors

`apply_concept` loads a package onto a base: adds the layer-wise tokens, injects the LoRA
adapters and installs the layer-slice attention processors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.base import Base
from shared.edlora import (
    LayerwiseTextEncoder,
    TokenMap,
    add_tokens,
    check_new_words,
    cross_attention_layers,
    install_layer_processors,
    layer_token_names,
)
from shared.errors import UserError
from shared.lora import add_lora, import_lora

FORMAT_VERSION = 1
META_FILE, WEIGHTS_FILE = "concept.json", "edlora.safetensors"
DEFAULT_TEMPLATES = ("photo of a {}", "a {}", "a close-up of {}", "a good photo of the {}",
                     "a {} on the grass", "a {} in a room", "a painting of {}", "a rendering of a {}")


@dataclass
class ConceptMeta:
    """Contents of concept.json."""

    name: str
    words: list[str]
    class_word: str
    n_layers: int
    layerwise: bool
    rank: int
    alpha: float
    unet_modules: list[str]
    text_modules: list[str]
    prompt_templates: list[str]
    base_fingerprint: str
    training: dict
    format_version: int = FORMAT_VERSION

    @property
    def lora_scale(self) -> float:
        """s in dW = s * B @ A."""
        return self.alpha / self.rank

    @property
    def phrase(self) -> str:
        """What `<TOK>` expands to: the concept's words joined by spaces."""
        return " ".join(self.words)

    def prompts(self) -> list[str]:
        return [t.format(self.phrase) for t in self.prompt_templates]

    def to_json(self) -> str:
        data = dict(self.__dict__, lora_scale=self.lora_scale)
        return json.dumps(data, indent=2)


def save_package(folder: Path, meta: ConceptMeta, tensors: dict[str, torch.Tensor]) -> None:
    """Write the two package files into `folder` (the caller stages the folder atomically)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "mixshow-edlora", "format_version": str(FORMAT_VERSION)})
    (folder / META_FILE).write_text(meta.to_json())


def read_package(folder: Path) -> tuple[ConceptMeta, dict[str, torch.Tensor]]:
    """Read and check a package folder; every problem is a UserError naming the file."""
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise UserError(f"concept package {folder} has no {path.name}: is it a package made by `mixshow train`?")
    try:
        data = json.loads(meta_path.read_text())
        data.pop("lora_scale", None)
        meta = ConceptMeta(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{meta_path} is not a valid concept.json: {exc}") from exc
    if meta.format_version != FORMAT_VERSION:
        raise UserError(f"{meta_path} has format_version {meta.format_version}; this mixshow reads {FORMAT_VERSION}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights_path} cannot be read as safetensors ({exc}); the file is damaged") from exc
    for word in meta.words:
        emb = tensors.get(f"emb.{word}")
        if emb is None or emb.ndim != 2 or emb.shape[0] != meta.n_layers:
            raise UserError(f"{weights_path}: emb.{word} missing or not [n_layers={meta.n_layers}, hidden]")
    return meta, tensors


def token_map_for(meta: ConceptMeta) -> TokenMap:
    """Token names for a package's words: one per layer, or a single one in plain-LoRA mode."""
    n = meta.n_layers if meta.layerwise else 1
    return TokenMap(meta.n_layers, {w: layer_token_names(w, n) for w in meta.words})


def apply_concept(base: Base, folder: Path, check_fingerprint: bool = True) -> tuple[ConceptMeta, LayerwiseTextEncoder]:
    """Load a concept package onto `base` in place; return its metadata and a layer-wise text encoder."""
    meta, tensors = read_package(folder)
    if check_fingerprint and meta.base_fingerprint != base.fingerprint:
        raise UserError(f"concept package {folder} was trained on base {meta.base_fingerprint[:12]}, but the base "
                        f"{base.source} is {base.fingerprint[:12]}: use the base it was trained on")
    layers = cross_attention_layers(base.unet)
    if len(layers) != meta.n_layers:
        raise UserError(f"concept package {folder} has {meta.n_layers} layer embeddings but the base's UNet has "
                        f"{len(layers)} cross-attention layers")
    check_new_words(base.tokenizer, meta.words, meta.n_layers, base.source)
    token_map = token_map_for(meta)
    rows = {w: tensors[f"emb.{w}"][: len(token_map.words[w])] for w in meta.words}
    add_tokens(base.tokenizer, base.text_encoder, token_map, rows)
    try:
        for model, prefix, modules in ((base.text_encoder, "text_encoder", meta.text_modules),
                                       (base.unet, "unet", meta.unet_modules)):
            if modules:
                add_lora(model, modules, meta.rank, meta.alpha)
                import_lora(model, tensors, prefix)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"the LoRA of package {folder} does not fit the base {base.source}: {exc}") from exc
    install_layer_processors(base.unet, base.tokenizer.model_max_length)
    return meta, LayerwiseTextEncoder(base.tokenizer, base.text_encoder, token_map)
