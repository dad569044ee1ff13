"""Fused checkpoints on the user side: load a FUSED folder, or a base + fused_lora.safetensors,
and address each concept by its package name in prompts (`a <red-circle> next to a <blue-square>`).

Files (written by `mixshow fuse`, see docs/formats.md):
    FUSED/concepts.json            concepts: name, words, token names, prompts, hashes, base fingerprint
    FUSED/fused_lora.safetensors   the exact fused change as a LoRA + every concept's layer-wise tokens
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shared.base import Base, load_base
from shared.edlora import LayerwiseTextEncoder, TokenMap, add_tokens, install_layer_processors
from shared.errors import UserError
from shared.fusion import apply_lowrank

CONCEPTS_FILE, LORA_FILE = "concepts.json", "fused_lora.safetensors"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def qualified(name: str, word: str) -> str:
    """The collision-free word a concept's word becomes in a fused model."""
    return f"{name}/{word}"


def token_map_of(concepts: list[dict], n_layers: int) -> TokenMap:
    tmap = TokenMap(n_layers)
    for c in concepts:
        tmap.words.update(c["tokens"])
    return tmap


def expand_prompt(prompt: str, concepts: list[dict]) -> str:
    """Replace every `<name>` by that concept's qualified words; unknown `<...>` names are an error."""
    by_name = {c["name"]: " ".join(c["tokens"]) for c in concepts}

    def swap(match: re.Match) -> str:
        name = match.group(1)
        if name in by_name:
            return by_name[name]
        if NAME_PATTERN.match(name) and "/" not in name:
            known = ", ".join(f"<{n}>" for n in by_name)
            raise UserError(f"prompt names concept <{name}>, which this model lacks (it has: {known})")
        return match.group(0)

    return re.sub(r"(?<!/)<([^<>\s/]+)>", swap, prompt)


def read_concepts(folder: Path) -> dict:
    path = Path(folder) / CONCEPTS_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {CONCEPTS_FILE}: is it a folder written by `mixshow fuse`?")
    return json.loads(path.read_text())


def load_fused(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> tuple[Base, LayerwiseTextEncoder, list[dict]]:
    """A fused diffusers folder with layer-wise processors installed; returns (base, encoder, concepts)."""
    info = read_concepts(folder)
    base = load_base(folder, device, dtype)
    install_layer_processors(base.unet, base.tokenizer.model_max_length)
    tmap = token_map_of(info["concepts"], info["n_layers"])
    return base, LayerwiseTextEncoder(base.tokenizer, base.text_encoder, tmap), info["concepts"]


def apply_fused_lora(base: Base, path: Path) -> tuple[LayerwiseTextEncoder, list[dict]]:
    """Put a fused_lora.safetensors onto `base` in place: tokens, merged weights, processors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read fused LoRA {path}: {exc}") from exc
    if meta.get("format") != "mixshow-fused-lora":
        raise UserError(f"{path} is not a fused LoRA written by `mixshow fuse`")
    info = json.loads(meta["concepts"])
    if info["base_fingerprint"] != base.fingerprint:
        raise UserError(f"{path} was fused on base {info['base_fingerprint'][:12]}, but {base.source} is "
                        f"{base.fingerprint[:12]}")
    tmap = token_map_of(info["concepts"], info["n_layers"])
    rows = {w: tensors[f"emb.{w}"][: len(names)] for w, names in tmap.words.items()}
    add_tokens(base.tokenizer, base.text_encoder, tmap, rows)
    merge_lora_tensors(base, tensors)
    install_layer_processors(base.unet, base.tokenizer.model_max_length)
    return LayerwiseTextEncoder(base.tokenizer, base.text_encoder, tmap), info["concepts"]


@torch.no_grad()
def merge_lora_tensors(base: Base, tensors: dict[str, torch.Tensor]) -> None:
    """W = W0 + lora_B @ lora_A for every `<model>.<module>.lora_A.weight` in `tensors`."""
    models = {"text_encoder": base.text_encoder, "unet": base.unet}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        model_name, _, module = key[: -len(".lora_A.weight")].partition(".")
        layer = models[model_name].get_submodule(module)
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        layer.weight.copy_(apply_lowrank(layer.weight, up, down))
