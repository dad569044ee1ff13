"""Fused checkpoints on the user side: load a FUSED folder, or a base + fused_lora.safetensors,
and address each concept by its package name in prompts (`a <red-circle> next to a <blue-square>`).

Files (written by `mixshow fuse`, see docs/formats.md):
    FUSED/concepts.json            concepts: name, words, token names, prompts, hashes, base fingerprint
    FUSED/fused_lora.safetensors   the exact fused change as a LoRA + every concept's layer-wise tokens
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shared.base import Base, load_base
from shared.edlora import (
    TOKEN_LAYOUTS,
    LayerwiseTextEncoder,
    LayerwiseTextEncoderXL,
    TokenMap,
    add_tokens,
    install_layer_processors,
)
from shared.errors import UserError
from shared.package import EMBEDDING_KINDS, layerwise_encoder
from shared.validate import check_tensors, parse_json, read_json

CONCEPTS_FILE, LORA_FILE = "concepts.json", "fused_lora.safetensors"
STATE_FILE = "fusion_state.safetensors"  # the float64 sufficient statistics: only the server needs them
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


def parse_concepts(data: object, where: str) -> dict:
    """concepts.json's contents, checked: the fields every reader relies on, with their types."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a JSON object")
    for key, kind in (("method", str), ("n_layers", int), ("base_fingerprint", str), ("concepts", list)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise UserError(f"{where}: field {key!r} is missing or not {kind.__name__}; was it written by "
                            "`mixshow fuse`?")
    names = set()
    for i, c in enumerate(data["concepts"]):
        ok = isinstance(c, dict) and isinstance(c.get("name"), str) and NAME_PATTERN.match(c["name"]) and \
            isinstance(c.get("tokens"), dict) and all(isinstance(q, str) and isinstance(t, list) and t and
                                                     all(isinstance(n, str) for n in t)
                                                     for q, t in c["tokens"].items())
        if not ok:
            raise UserError(f"{where}: concept #{i} lacks a valid name or token list")
        if c["name"] in names:
            raise UserError(f"{where}: concept {c['name']!r} appears twice")
        names.add(c["name"])
    data[BARRED_KEY] = operator_removals(data, where)
    return data


BARRED_KEY = "removed_by_operator"  # a round's record of the concepts the operator removed, carried forward


def operator_removals(info: dict, where: str) -> list[dict]:
    """The version's record of concepts the operator removed ({name, client} each), checked; [] when none."""
    barred = info.get(BARRED_KEY, [])
    if not isinstance(barred, list) or not all(isinstance(b, dict) and isinstance(b.get("name"), str) and
                                               isinstance(b.get("client"), str) for b in barred):
        raise UserError(f"{where}: {BARRED_KEY} must be a list of {{name, client}} objects")
    return [{"name": b["name"], "client": b["client"]} for b in barred]


def read_concepts(folder: Path) -> dict:
    path = Path(folder) / CONCEPTS_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {CONCEPTS_FILE}: is it a folder written by `mixshow fuse`?")
    return parse_concepts(read_json(path, "fused model file"), str(path))


def token_layout(info: dict, where: str) -> str:
    layout = info.get("token_layout", "block")
    if layout not in TOKEN_LAYOUTS:
        raise UserError(f"{where}: token_layout {layout!r} is not one of {', '.join(TOKEN_LAYOUTS)}")
    return layout


def load_fused(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> tuple[Base, LayerwiseTextEncoder | LayerwiseTextEncoderXL, list[dict]]:
    """A fused diffusers folder (SD 1.x or SDXL) with layer-wise processors installed; returns (base, encoder,
    concepts)."""
    info = read_concepts(folder)
    base = load_base(folder, device, dtype, sdxl=True)
    tmap = token_map_of(info["concepts"], info["n_layers"])
    for _, tokenizer, _ in base.text_models():
        missing = [n for names in tmap.words.values() for n in names if n not in tokenizer.get_vocab()]
        if missing:
            raise UserError(f"{folder}: a tokenizer lacks the concept token {missing[0]!r} that {CONCEPTS_FILE} "
                            "names")
    install_layer_processors(base.unet, base.tokenizer.model_max_length,
                             layout=token_layout(info, str(Path(folder) / CONCEPTS_FILE)))
    return base, layerwise_encoder(base, tmap), info["concepts"]


def read_fused_lora(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(concepts info, tensors) of a fused_lora.safetensors, checked: format, valid metadata, finite float
    tensors, an (A, B) pair for every adapted layer and an embedding for every concept word."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read fused LoRA {path}: {exc}") from exc
    if meta.get("format") != "mixshow-fused-lora":
        raise UserError(f"{path} is not a fused LoRA written by `mixshow fuse`")
    info = parse_concepts(parse_json(meta.get("concepts", ""), f"the metadata of {path}"), f"the metadata of {path}")
    check_tensors(tensors, str(path), (torch.float32, torch.float16, torch.bfloat16))
    for key in tensors:
        if key.startswith(tuple(f"{kind}." for kind in EMBEDDING_KINDS)):
            continue
        pair = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
        if not key.endswith((".lora_A.weight", ".lora_B.weight")) or pair not in tensors or \
                not key.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
            raise UserError(f"{path}: tensor {key!r} is not half of a LoRA pair of a text encoder or the UNet")
    kinds = EMBEDDING_KINDS if any(k.startswith("emb_2.") for k in tensors) else EMBEDDING_KINDS[:1]
    for c in info["concepts"]:
        for q in c["tokens"]:
            for kind in kinds:
                emb = tensors.get(f"{kind}.{q}")
                if emb is None or emb.ndim != 2 or emb.shape[0] < len(c["tokens"][q]):
                    raise UserError(f"{path}: the embedding {kind} of {q!r} is missing or has too few rows")
    return info, tensors


def apply_fused_lora(base: Base, path: Path) -> tuple[LayerwiseTextEncoder, list[dict]]:
    """Put a fused_lora.safetensors onto `base` in place: tokens, then the LoRA merged by diffusers
    (`load_lora_weights` + `fuse_lora`), then the layer-wise processors."""
    info, tensors = read_fused_lora(path)
    if info["base_fingerprint"] != base.fingerprint:
        raise UserError(f"{path} was fused on base {info['base_fingerprint'][:12]}, but {base.source} is "
                        f"{base.fingerprint[:12]}")
    tmap = token_map_of(info["concepts"], info["n_layers"])
    kinds = EMBEDDING_KINDS[:len(base.text_models())]
    if any(k.startswith("emb_2.") for k in tensors) != (len(kinds) == 2):
        raise UserError(f"{path} was fused for {'two text encoders' if len(kinds) == 1 else 'one text encoder'}, "
                        f"the base {base.source} has {len(kinds)}")
    for (_, tokenizer, encoder), kind in zip(base.text_models(), kinds):
        rows = {w: tensors[f"{kind}.{w}"][: len(names)] for w, names in tmap.words.items()}
        add_tokens(tokenizer, encoder, tmap, rows)
    merge_lora_tensors(base, {k: v for k, v in tensors.items() if not k.startswith(tuple(f"{kind}." for kind in
                                                                                       EMBEDDING_KINDS))}, str(path))
    install_layer_processors(base.unet, base.tokenizer.model_max_length, layout=token_layout(info, str(path)))
    return layerwise_encoder(base, tmap), info["concepts"]


@torch.no_grad()
def merge_lora_tensors(base: Base, tensors: dict[str, torch.Tensor], where: str) -> None:
    """W = W0 + lora_B @ lora_A for every `<model>.<module>.lora_A.weight` in `tensors`, through diffusers'
    LoRA loader (its PEFT-format keys are ours): the adapter is loaded, fused into the weights and unloaded."""
    pipe = base.pipeline()
    lora = {k: v.to(base.dtype) for k, v in tensors.items()}
    try:
        pipe.load_lora_weights(lora, adapter_name="mixshow-fused")
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{where} does not fit the base {base.source}: {exc}") from exc
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["mixshow-fused"])
    pipe.unload_lora_weights()
