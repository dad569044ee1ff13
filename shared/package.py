"""The concept package: what one client's training produces and uploads.

    PKG/concept.json        metadata (see docs/formats.md)
    PKG/edlora.safetensors  emb.<word> [n_layers, hidden]; text_encoder.* / unet.* LoRA tensors;
                            on SDXL also emb_2.<word> [n_layers, hidden_2] and text_encoder_2.* LoRA tensors

`apply_concept` loads a package onto a base: adds the layer-wise tokens, injects the LoRA
adapters and installs the layer-slice attention processors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shared.errors import UserError
from shared.names import TOKEN_LAYOUTS
from shared.stats_file import STATS_FILE
from shared.tensor_files import save_tensors
from shared.validate import check_tensors, read_json

# What needs a base (diffusers, transformers, PEFT) is imported inside the functions that take one: reading,
# checking and writing a package then stays light, and a client reusing its package in a round starts in a
# fraction of the time (importing them costs ~7 s on a 2-core machine, and Flower starts a process per round).
if TYPE_CHECKING:
    from shared.base import Base
    from shared.edlora import LayerwiseTextEncoder, LayerwiseTextEncoderXL, TokenMap

FORMAT_VERSION = 1
EMBEDDING_KINDS = ("emb", "emb_2")  # key prefixes of a word's rows for the first and (SDXL) second text encoder
META_FILE, WEIGHTS_FILE = "concept.json", "edlora.safetensors"
PACKAGE_FILES = (META_FILE, WEIGHTS_FILE, STATS_FILE)  # what a client uploads, in this order
DEFAULT_TEMPLATES = ("photo of a {}", "a {}", "a close-up of {}", "a good photo of the {}",
                     "a {} on the grass", "a {} in a room", "a painting of {}", "a rendering of a {}")


def fill_template(template: str, phrase: str) -> str:
    """A prompt template with its one `{}` replaced by the concept's phrase (other braces stay as written)."""
    return template.replace("{}", phrase, 1)


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
    encoders: int = 1  # text encoders the concept's tokens live in: 2 on SDXL
    text_modules_2: list[str] = dataclasses.field(default_factory=list)  # SDXL's second encoder's LoRA layers
    token_layout: str = "block"  # what a layer-wise token stands for (shared.edlora.TOKEN_LAYOUTS)

    def embedding_keys(self, word: str) -> list[str]:
        """The package keys of `word`'s rows: one per text encoder."""
        return [f"{kind}.{word}" for kind in EMBEDDING_KINDS[:self.encoders]]

    def lora_groups(self) -> list[tuple[str, list[str]]]:
        """(model prefix, its adapted modules) for every model the package holds a LoRA of."""
        groups = [("text_encoder", self.text_modules)]
        if self.encoders == 2:
            groups.append(("text_encoder_2", self.text_modules_2))
        return groups + [("unet", self.unet_modules)]

    @property
    def lora_scale(self) -> float:
        """s in dW = s * B @ A."""
        return self.alpha / self.rank

    @property
    def phrase(self) -> str:
        """What `<TOK>` expands to: the concept's words joined by spaces."""
        return " ".join(self.words)

    def prompts(self) -> list[str]:
        return [fill_template(t, self.phrase) for t in self.prompt_templates]

    def to_json(self) -> str:
        data = dict(self.__dict__, lora_scale=self.lora_scale)
        for key in ("encoders", "text_modules_2", "token_layout"):  # SD 1.x packages read as before SDXL
            if data[key] == _OPTIONAL[key]:
                del data[key]
        return json.dumps(data, indent=2)


def save_package(folder: Path, meta: ConceptMeta, tensors: dict[str, torch.Tensor]) -> None:
    """Write the two package files into `folder` (the caller stages the folder atomically)."""
    check_tensors(tensors, f"package {folder}")
    save_tensors(folder / WEIGHTS_FILE, tensors,
                 metadata={"format": "mixshow-edlora", "format_version": str(FORMAT_VERSION)})
    (folder / META_FILE).write_text(meta.to_json())


_FIELDS = {"name": str, "words": list, "class_word": str, "n_layers": int, "layerwise": bool, "rank": int,
           "alpha": (int, float), "unet_modules": list, "text_modules": list, "prompt_templates": list,
           "base_fingerprint": str, "training": dict, "format_version": int, "encoders": int,
           "text_modules_2": list, "token_layout": str}
_OPTIONAL = {"format_version": FORMAT_VERSION, "encoders": 1, "text_modules_2": [], "token_layout": "block"}


def parse_meta(data: object, where: Path) -> ConceptMeta:
    """concept.json's contents as a ConceptMeta, every field checked for type and range."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a JSON object, not {type(data).__name__}")
    data = dict(data)
    data.pop("lora_scale", None)
    unknown = sorted(set(data) - set(_FIELDS))
    missing = sorted(k for k in _FIELDS if k not in data and k not in _OPTIONAL)
    if unknown or missing:
        problem = f"unknown field {unknown[0]!r}" if unknown else f"missing field {missing[0]!r}"
        raise UserError(f"{where}: {problem}; is it a concept.json written by `mixshow train`?")
    for key, kind in _FIELDS.items():
        value = data.get(key, _OPTIONAL.get(key))
        bad_bool = kind is int and isinstance(value, bool)
        if not isinstance(value, kind) or bad_bool:
            raise UserError(f"{where}: field {key!r} is {type(value).__name__}, expected "
                            f"{getattr(kind, '__name__', 'number')}")
    for key in ("words", "unet_modules", "text_modules", "text_modules_2", "prompt_templates"):
        if not all(isinstance(v, str) and v for v in data.get(key, [])):
            raise UserError(f"{where}: field {key!r} must be a list of non-empty strings")
    if not data["words"]:
        raise UserError(f"{where}: field 'words' is empty")
    if not all(t.count("{}") == 1 for t in data["prompt_templates"]) or not data["prompt_templates"]:
        raise UserError(f"{where}: every prompt template must contain {{}} exactly once")
    if not re.fullmatch(r"[0-9a-f]{64}", data["base_fingerprint"]):
        raise UserError(f"{where}: base_fingerprint is not a sha256")
    for key, low in (("n_layers", 1), ("rank", 1)):
        if data[key] < low or data[key] > 4096:
            raise UserError(f"{where}: field {key!r} = {data[key]} is out of range")
    if not math.isfinite(data["alpha"]) or data["alpha"] <= 0:
        raise UserError(f"{where}: field 'alpha' = {data['alpha']} must be a finite positive number")
    if data.get("encoders", 1) not in (1, 2) or (data.get("encoders", 1) == 1 and data.get("text_modules_2")):
        raise UserError(f"{where}: field 'encoders' must be 1 or 2 (2 only with text_modules_2 for SDXL's second "
                        "text encoder)")
    if data.get("token_layout", "block") not in TOKEN_LAYOUTS:
        raise UserError(f"{where}: field 'token_layout' must be one of {', '.join(TOKEN_LAYOUTS)}")
    return ConceptMeta(**data)


def read_package(folder: Path) -> tuple[ConceptMeta, dict[str, torch.Tensor]]:
    """Read and check a package folder; every problem is a UserError naming the file.

    Checked: concept.json's fields and types; edlora.safetensors readable, every tensor float32 and
    finite, exactly the embeddings of its words and the LoRA pair (A: rank x d_in, B: d_out x rank)
    of every module it lists.
    """
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise UserError(f"concept package {folder} is not a folder")
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise UserError(f"concept package {folder} has no {path.name}: is it a package made by `mixshow train`?")
    meta = parse_meta(read_json(meta_path, "concept file"), meta_path)
    if meta.format_version != FORMAT_VERSION:
        raise UserError(f"{meta_path} has format_version {meta.format_version}; this mixshow reads {FORMAT_VERSION}")
    try:
        # owned copies: load_file's tensors are views of the file's mapping, which then stays mapped (and in the
        # reader's memory) as long as any one of them lives, e.g. a fused concept's embedding rows
        tensors = {key: tensor.clone() for key, tensor in load_file(str(weights_path)).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights_path} cannot be read as safetensors ({exc}); the file is damaged") from exc
    check_tensors(tensors, str(weights_path))
    expected = {key for w in meta.words for key in meta.embedding_keys(w)}
    for key in expected:
        emb = tensors.get(key)
        if emb is None or emb.ndim != 2 or emb.shape[0] != meta.n_layers:
            raise UserError(f"{weights_path}: {key} missing or not [n_layers={meta.n_layers}, hidden]")
    for model, modules in meta.lora_groups():
        for module in modules:
            a, b = f"{model}.{module}.lora_A.weight", f"{model}.{module}.lora_B.weight"
            A, B = tensors.get(a), tensors.get(b)
            if A is None or B is None or A.ndim != 2 or B.ndim != 2 or A.shape[0] != meta.rank or \
                    B.shape[1] != meta.rank:
                raise UserError(f"{weights_path}: the LoRA of {model}.{module} is missing or not of rank {meta.rank}")
            expected.update((a, b))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UserError(f"{weights_path} holds tensor {extra[0]!r}, which {META_FILE} does not describe")
    return meta, tensors


def check_against_base(meta: ConceptMeta, tensors: dict[str, torch.Tensor], base: Base, where: Path) -> None:
    """The package fits `base`: same fingerprint, same layer count, every LoRA the shape of its layer."""
    from shared.edlora import token_slots

    if meta.base_fingerprint != base.fingerprint:
        raise UserError(f"concept package {where} was trained on base {meta.base_fingerprint[:12]}, but the base "
                        f"{base.source} is {base.fingerprint[:12]}: use the base it was trained on")
    if meta.encoders != len(base.text_models()):
        raise UserError(f"concept package {where} was made for {meta.encoders} text encoder(s), the base {base.source} "
                        f"has {len(base.text_models())}")
    layers = max(token_slots(base.unet, meta.token_layout)) + 1
    if layers != meta.n_layers:
        raise UserError(f"concept package {where} has {meta.n_layers} layer embeddings but the base's UNet has "
                        f"{layers} cross-attention layers (token layout {meta.token_layout})")
    for (_, _, encoder), suffix in zip(base.text_models(), ("", "_2")):
        hidden = encoder.get_input_embeddings().weight.shape[1]
        for word in meta.words:
            width = tensors[f"emb{suffix}.{word}"].shape[1]
            if width != hidden:
                raise UserError(f"concept package {where}: emb{suffix}.{word} is {width} wide, the base's token "
                                f"embeddings are {hidden}")
    models = {"unet": base.unet} | {prefix: encoder for prefix, _, encoder in base.text_models()}
    for model_name, modules in meta.lora_groups():
        model = models[model_name]
        for module in modules:
            try:
                layer = model.get_submodule(module)
            except AttributeError:
                raise UserError(f"package {where}: the base has no layer {model_name}.{module}") from None
            if not isinstance(layer, torch.nn.Linear):
                raise UserError(f"package {where}: {model_name}.{module} is not a linear layer of the base")
            A = tensors[f"{model_name}.{module}.lora_A.weight"]
            B = tensors[f"{model_name}.{module}.lora_B.weight"]
            if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
                raise UserError(f"package {where}: LoRA of {model_name}.{module} has shapes (B, A) = "
                                f"{(tuple(B.shape), tuple(A.shape))}, the base layer is {tuple(layer.weight.shape)}")


def token_map_for(meta: ConceptMeta) -> TokenMap:
    """Token names for a package's words: one per layer, or a single one in plain-LoRA mode."""
    from shared.edlora import TokenMap, layer_token_names

    n = meta.n_layers if meta.layerwise else 1
    return TokenMap(meta.n_layers, {w: layer_token_names(w, n) for w in meta.words})


def layerwise_encoder(base: Base, token_map: TokenMap) -> LayerwiseTextEncoder | LayerwiseTextEncoderXL:
    """The base's layer-wise text encoder for `token_map` (both encoders on SDXL)."""
    from shared.edlora import LayerwiseTextEncoder, LayerwiseTextEncoderXL

    if base.text_encoder_2 is None:
        return LayerwiseTextEncoder(base.tokenizer, base.text_encoder, token_map)
    return LayerwiseTextEncoderXL(*(LayerwiseTextEncoder(tokenizer, encoder, token_map, penultimate=True)
                                    for _, tokenizer, encoder in base.text_models()))


def apply_concept(base: Base, folder: Path) -> tuple[ConceptMeta, LayerwiseTextEncoder | LayerwiseTextEncoderXL]:
    """Load a concept package onto `base` in place; return its metadata and a layer-wise text encoder."""
    from shared.edlora import add_tokens, check_new_words, install_layer_processors
    from shared.lora import add_lora, import_lora

    meta, tensors = read_package(folder)
    check_against_base(meta, tensors, base, Path(folder))
    for _, tokenizer, _ in base.text_models():
        check_new_words(tokenizer, meta.words, meta.n_layers, base.source)
    token_map = token_map_for(meta)
    for (_, tokenizer, encoder), kind in zip(base.text_models(), EMBEDDING_KINDS):
        rows = {w: tensors[f"{kind}.{w}"][: len(token_map.words[w])] for w in meta.words}
        add_tokens(tokenizer, encoder, token_map, rows)
    models = {"unet": base.unet} | {prefix: encoder for prefix, _, encoder in base.text_models()}
    try:
        for prefix, modules in meta.lora_groups():
            if modules:
                add_lora(models[prefix], modules, meta.rank, meta.alpha)
                import_lora(models[prefix], tensors, prefix)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"the LoRA of package {folder} does not fit the base {base.source}: {exc}") from exc
    install_layer_processors(base.unet, base.tokenizer.model_max_length, layout=meta.token_layout)
    return meta, layerwise_encoder(base, token_map)
