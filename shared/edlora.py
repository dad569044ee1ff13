"""Embedding-decomposed LoRA: layer-wise concept tokens and the attention processor that reads them.

A concept word gets one token per cross-attention layer of the UNet. A prompt is encoded
once per layer (concept words swapped for that layer's token), and the copies are joined
along the sequence axis: text states have shape (B, n_layers * L, D). Cross-attention
layer k reads slice k through `LayerSliceProcessor`. Prompts without concept words give
identical slices, and identical rows are encoded only once.

Where an attention module holds several transformer blocks (SDXL: 70 blocks in 11 modules), the token
layout chooses what a "layer" is: one token per cross-attention block ("block"), or one per attention
module, its blocks sharing it ("module"). On SD 1.x each module holds one block and the two coincide.
SDXL's states join both encoders' penultimate hidden states per token (B, n_layers * L, D1 + D2), and its
pooled embedding is the second encoder's projected output for the first layer's copy of the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from shared.errors import InvalidArgument, UserError
from shared.names import TOKEN_LAYOUTS

RANDOM_INIT_STD = 0.013


def cross_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Names of the UNet's cross-attention modules in forward order (down, mid, up)."""
    names = [n for n, m in unet.named_modules()
             if isinstance(m, Attention) and m.is_cross_attention and n.endswith("attn2")]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: order[n.split(".")[0]])




def token_slots(unet: UNet2DConditionModel, layout: str = "block") -> list[int]:
    """For each cross-attention block (in `cross_attention_layers` order), the index of the token it reads."""
    if layout not in TOKEN_LAYOUTS:
        raise InvalidArgument("token_layout", f"{layout!r} is not one of {', '.join(TOKEN_LAYOUTS)}")
    layers = cross_attention_layers(unet)
    if layout == "block":
        return list(range(len(layers)))
    modules: dict[str, int] = {}
    return [modules.setdefault(name.split(".transformer_blocks.")[0], len(modules)) for name in layers]


def resolve_token_layout(unet: UNet2DConditionModel, setting: str) -> str:
    """The layout a training setting means on this UNet. 'auto' is one token per attention module where some
    module holds several transformer blocks (SDXL: 11 tokens instead of 70; measured the cheaper to train,
    docs/sdxl.md), else one per block (SD 1.x, where the two are the same slices: packages as before)."""
    if setting != "auto":
        token_slots(unet, setting)  # checks the name
        return setting
    return "module" if token_slots(unet, "module") != token_slots(unet, "block") else "block"


def layer_token_names(word: str, n_layers: int) -> list[str]:
    """Tokenizer entries for one concept word: `<word>_0` ... `<word>_{n-1}`."""
    return [f"{word}_{k}" for k in range(n_layers)]


@dataclass
class TokenMap:
    """Which tokenizer entries stand for each concept word, layer by layer."""

    n_layers: int
    words: dict[str, list[str]] = field(default_factory=dict)  # word -> token names (n_layers, or 1)

    def layer_ids(self, tokenizer: CLIPTokenizer) -> dict[str, list[int]]:
        ids = {}
        for word, names in self.words.items():
            ids[word] = [tokenizer.convert_tokens_to_ids(n) for n in names]
        return ids


def check_new_words(tokenizer: CLIPTokenizer, words: list[str], n_layers: int, where: str) -> None:
    """Refuse words that are empty, contain spaces or upper case, or already exist in the tokenizer."""
    vocab = tokenizer.get_vocab()
    if not words:
        raise InvalidArgument("words", "is empty: give the concept's new words, e.g. '<cat1> <cat2>'")
    if len(set(words)) != len(words):
        raise InvalidArgument("words", f"{' '.join(words)} repeats a word")
    for word in words:
        if not word or re.search(r"\s", word) or word != word.lower():
            raise InvalidArgument("words", f"concept word {word!r} must be one lower-case word without spaces, "
                                           "e.g. '<cat1>'")
        clash = [n for n in [word, f"{word}</w>", *layer_token_names(word, n_layers)] if n in vocab]
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1:
            clash.append(tokenizer.convert_ids_to_tokens(ids)[0])
        if clash:
            raise UserError(f"concept word {word!r} is already in the tokenizer of {where} (as {clash[0]!r}): "
                            "choose a new word such as '<mycat1>'")


def class_word_embedding(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, class_word: str) -> torch.Tensor:
    """The input embedding of `class_word`, which must be exactly one token."""
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise InvalidArgument("class_word", f"{class_word!r} is {len(ids)} tokens ({' '.join(pieces)}), not one: "
                        "choose a single-token word such as 'dog', 'cat', 'man'")
    return text_encoder.get_input_embeddings().weight[ids[0]].detach().clone()


def embedding_scale(text_encoder: CLIPTextModel) -> tuple[float, float]:
    """(mean row norm, RMS of the entries) of the text encoder's token embeddings: the scale in which a new
    token's initialisation, learning rate and norm limit are set."""
    weight = text_encoder.get_input_embeddings().weight.detach().float()
    return float(weight.norm(dim=-1).mean()), float(weight.pow(2).mean().sqrt())


def add_tokens(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, token_map: TokenMap,
               rows: dict[str, torch.Tensor]) -> None:
    """Add every token of `token_map` to the tokenizer and write its embedding row (rows[word]: [n, D])."""
    names = [n for ns in token_map.words.values() for n in ns]
    tokenizer.add_tokens(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for word, ids in token_map.layer_ids(tokenizer).items():
            weight[ids] = rows[word].to(weight)


class ConceptEmbedding(torch.nn.Module):
    """The trainable rows of a concept's tokens, spliced into the text encoder's embedding output.

    The embedding matrix itself never trains, so every other row stays bitwise unchanged;
    `sync()` copies the trained rows into the matrix for saving and sampling.
    """

    def __init__(self, text_encoder: CLIPTextModel, first_id: int, count: int):
        super().__init__()
        self.embedding = text_encoder.get_input_embeddings()
        self.first_id, self.count = first_id, count
        init = self.embedding.weight[first_id:first_id + count].detach().float().clone()
        self.rows = torch.nn.Parameter(init)
        self._hook = self.embedding.register_forward_hook(self._splice)

    def _splice(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        local = ids - self.first_id
        inside = (local >= 0) & (local < self.count)
        if not bool(inside.any()):
            return output
        picked = self.rows[local.clamp(0, self.count - 1)].to(output.dtype)
        return torch.where(inside[..., None], picked, output)

    @torch.no_grad()
    def sync(self) -> None:
        self.embedding.weight[self.first_id:self.first_id + self.count] = self.rows.to(self.embedding.weight)

    def remove(self) -> None:
        self.sync()
        self._hook.remove()


class LayerwiseTextEncoder:
    """Encode prompts into layer-wise text states (B, n_layers * L, D): the encoder's last hidden state (SD 1.x),
    or with `penultimate` its next-to-last hidden layer's output (what SDXL reads)."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, token_map: TokenMap,
                 penultimate: bool = False):
        self.tokenizer, self.text_encoder, self.map = tokenizer, text_encoder, token_map
        self.penultimate = penultimate
        n = token_map.n_layers
        lut = torch.arange(len(tokenizer)).repeat(n, 1)  # lut[k, id]: the id layer k reads instead of id
        self.first_names = {}
        for word, ids in token_map.layer_ids(tokenizer).items():
            self.first_names[word] = token_map.words[word][0]
            for k in range(n):
                lut[k, ids[0]] = ids[k % len(ids)]
        self.lut = lut
        self.concept_ids = torch.tensor(sorted({i for ids in token_map.layer_ids(tokenizer).values() for i in ids}))
        # longest words first, so a word that is a prefix of another never splits it
        self._words = sorted(self.first_names, key=len, reverse=True)

    def to_text(self, prompt: str) -> str:
        for word in self._words:
            prompt = prompt.replace(word, f" {self.first_names[word]} ")
        return " ".join(prompt.split())

    def input_ids(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, n_layers, L) for every layer's copy of every prompt."""
        ids = self.tokenizer([self.to_text(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.lut[:, ids].permute(1, 0, 2)

    def concept_mask(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) True where a concept token stands (positions are the same in every layer's copy)."""
        ids = self.input_ids(prompts)[:, 0]
        return torch.isin(ids, self.concept_ids)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_with_output(prompts)[0]

    def encode_with_output(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer-wise states (B, n * L, D), the model's first output (pooled or projected) for each prompt's
        first-layer copy (B, P))."""
        ids = self.input_ids(prompts)
        b, n, length = ids.shape
        unique, inverse = torch.unique(ids.reshape(b * n, length), dim=0, return_inverse=True)
        out = self.text_encoder(unique.to(self.text_encoder.device), output_hidden_states=self.penultimate)
        states = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        inverse = inverse.to(states.device)
        first = (out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)[inverse.view(b, n)[:, 0]]
        return states[inverse].reshape(b, n * length, states.shape[-1]), first


class LayerwiseTextEncoderXL:
    """SDXL's two encoders, layer-wise: `encode` gives the states (B, n * L, D1 + D2) the UNet reads,
    `encode_with_pooled` also the pooled embedding (B, P) its time embedding reads."""

    def __init__(self, first: LayerwiseTextEncoder, second: LayerwiseTextEncoder):
        if first.map.n_layers != second.map.n_layers:
            raise ValueError("the two encoders' token maps have different layer counts")
        self.first, self.second = first, second
        self.map, self.tokenizer = first.map, first.tokenizer

    def input_ids(self, prompts: list[str]) -> torch.Tensor:
        """The first tokenizer's ids (B, n_layers, L): positions are the same in both (one BPE vocabulary)."""
        return self.first.input_ids(prompts)

    def concept_mask(self, prompts: list[str]) -> torch.Tensor:
        return self.first.concept_mask(prompts)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_with_pooled(prompts)[0]

    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states_1, _ = self.first.encode_with_output(prompts)
        states_2, pooled = self.second.encode_with_output(prompts)
        return torch.cat([states_1, states_2.to(states_1.device)], dim=-1), pooled


def sdxl_time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image generated at its own size: (original size, crop top-left,
    target size) per sample, (batch, 6)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1)


def added_conditions(pooled: torch.Tensor | None, height: int, width: int, device: torch.device,
                     dtype: torch.dtype) -> dict | None:
    """The UNet's `added_cond_kwargs` for SDXL (pooled embedding + size micro-conditioning); None on SD 1.x."""
    if pooled is None:
        return None
    return {"text_embeds": pooled.to(device, dtype),
            "time_ids": sdxl_time_ids(height, width, pooled.shape[0]).to(device, dtype)}


@dataclass
class AttentionCapture:
    """Collects, per cross-attention layer, the attention map of the concept tokens (B, Q)."""

    token_mask: torch.Tensor  # (B, L) bool
    maps: list[torch.Tensor] = field(default_factory=list)


def take_layer(states: torch.Tensor, index: int, n_layers: int, length: int) -> torch.Tensor:
    """Slice layer `index` out of layer-wise text states; plain (B, L, D) states pass through."""
    seq = states.shape[1]
    if seq == length:
        return states
    if seq != n_layers * length:
        raise ValueError(f"text states have {seq} positions; expected {length} or {n_layers}x{length}")
    return states[:, index * length:(index + 1) * length]


class LayerSliceProcessor(AttnProcessor2_0):
    """Cross-attention processor for layer `index`: attends to its own slice of the text states."""

    def __init__(self, index: int, n_layers: int, length: int):
        super().__init__()
        self.index, self.n_layers, self.length = index, n_layers, length
        self.capture: AttentionCapture | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is not None:
            encoder_hidden_states = take_layer(encoder_hidden_states, self.index, self.n_layers, self.length)
        if self.capture is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self._with_capture(attn, hidden_states, encoder_hidden_states)

    def _with_capture(self, attn: Attention, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, heads = hidden.shape[0], attn.heads
        query = attn.head_to_batch_dim(attn.to_q(hidden))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # (B*heads, Q, L)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        probs = probs.view(batch, heads, *probs.shape[1:]).mean(1)  # (B, Q, L)
        mask = self.capture.token_mask.to(probs.device, probs.dtype)  # (B, L)
        self.capture.maps.append((probs * mask[:, None]).sum(-1) / mask.sum(-1, keepdim=True).clamp(min=1))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install_layer_processors(unet: UNet2DConditionModel, length: int, make=LayerSliceProcessor,
                             layout: str = "block") -> list[LayerSliceProcessor]:
    """Give every cross-attention block its slice processor, `make(slot, n_slots, length)` (its token slot under
    `layout`, see `token_slots`); self-attention keeps SDPA."""
    layers = cross_attention_layers(unet)
    slots = token_slots(unet, layout)
    procs = dict(unet.attn_processors)
    made = []
    for layer, slot in zip(layers, slots):
        made.append(make(slot, max(slots) + 1, length))
        procs[f"{layer}.processor"] = made[-1]
    unet.set_attn_processor(procs)
    return made


def attention_regulariser(capture: AttentionCapture, masks: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between each layer's concept attention map (max-normalised) and the mask.

    `masks` is (B, 1, H, W) in [0, 1]; each map (B, Q) is reshaped to its layer's grid.
    """
    losses = []
    height, width = masks.shape[-2:]
    for amap in capture.maps:
        scale = (height * width / amap.shape[1]) ** 0.5
        h, w = round(height / scale), round(width / scale)
        grid = amap.view(-1, 1, h, w)
        grid = grid / grid.amax(dim=(2, 3), keepdim=True).clamp(min=1e-8)
        target = F.interpolate(masks.to(grid), size=(h, w), mode="area")
        losses.append(F.mse_loss(grid, target))
    return torch.stack(losses).mean()
