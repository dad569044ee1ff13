"""Layer-wise embeddings: token layout, slices, and the processor that hands layer k its slice."""

from __future__ import annotations

import pytest
import torch

from shared.base import load_base
from shared.edlora import (
    LayerwiseTextEncoder,
    TokenMap,
    add_tokens,
    check_new_words,
    cross_attention_layers,
    install_layer_processors,
    layer_token_names,
    take_layer,
)
from shared.errors import UserError


def _concept_base(tiny_base, words=("<zz1>", "<zz2>")):
    base = load_base(tiny_base)
    n = len(cross_attention_layers(base.unet))
    tmap = TokenMap(n, {w: layer_token_names(w, n) for w in words})
    gen = torch.Generator().manual_seed(0)
    add_tokens(base.tokenizer, base.text_encoder, tmap, {w: torch.randn(n, 32, generator=gen) for w in words})
    return base, LayerwiseTextEncoder(base.tokenizer, base.text_encoder, tmap), n


def test_layer_count_comes_from_the_unet(tiny_base):
    base = load_base(tiny_base)
    attn2 = [n for n, _ in base.unet.named_modules() if n.endswith("attn2")]
    layers = cross_attention_layers(base.unet)
    assert sorted(layers) == sorted(attn2) and len(layers) >= 4
    assert layers[0].startswith("down_blocks") and layers[-1].startswith("up_blocks")


def test_concept_prompt_slices_differ_plain_prompt_slices_do_not(tiny_base):
    base, enc, n = _concept_base(tiny_base)
    length = base.tokenizer.model_max_length
    states = enc.encode(["a photo of <zz1> <zz2> on the beach", "a photo of a dog"])
    assert states.shape == (2, n * length, 32)
    slices = [take_layer(states, k, n, length) for k in range(n)]
    for k in range(1, n):
        assert not torch.equal(slices[k][0], slices[0][0])
        assert torch.equal(slices[k][1], slices[0][1])


def test_each_cross_attention_layer_reads_only_its_own_slice(tiny_base):
    base, enc, n = _concept_base(tiny_base)
    install_layer_processors(base.unet, base.tokenizer.model_max_length)
    layers = cross_attention_layers(base.unet)
    keys: dict[str, torch.Tensor] = {}
    hooks = [base.unet.get_submodule(f"{name}.to_k").register_forward_hook(
        lambda m, a, out, name=name: keys.__setitem__(name, out.detach().clone())) for name in layers]
    states = enc.encode(["a photo of <zz1> <zz2>"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base.unet(latents, 500, states)
        reference = dict(keys)
        length = base.tokenizer.model_max_length
        for k in range(n):
            bumped = states.clone()
            bumped[:, k * length:(k + 1) * length] += 0.5
            base.unet(latents, 500, bumped)
            changed = [name for name in layers if not torch.equal(keys[name], reference[name])]
            assert changed == [layers[k]]
    for h in hooks:
        h.remove()


def test_processor_refuses_states_of_the_wrong_length():
    with pytest.raises(ValueError, match="positions"):
        take_layer(torch.zeros(1, 5 * 77 + 1, 8), 0, 5, 77)
    assert take_layer(torch.zeros(1, 77, 8), 3, 5, 77).shape == (1, 77, 8)


@pytest.mark.parametrize("word", ["dog", "<zz1>_0", "Upper", "two words", ""])
def test_new_words_must_be_new(tiny_base, word):
    base, _, n = _concept_base(tiny_base)
    with pytest.raises(UserError):
        check_new_words(base.tokenizer, [word] if word else [], n, "tiny")
