"""Preservation (docs/fusion.md): Grams of ordinary prompts through the base model, added to the fusion with
target W0, so that the fused model keeps what the base did on prompts that name no concept.

Without them the closed form is pinned only where the concepts have data; with several concepts whose inputs
are nearly alike, it extrapolates their differences onto every other input (on the shapes base, five fused world
concepts took single-object prompts from 89 % right to 9 %, and 32 ordinary captions kept 86 %; docs/world.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from shared.base import Base
from shared.edlora import TokenMap, cross_attention_layers
from shared.errors import UserError
from shared.grams import GramRecorder
from shared.package import layerwise_encoder
from shared.sampling import generate
from shared.validate import read_text

GENERIC_PROMPTS = ("a photo of a dog", "a painting of a house", "a red car on the road", "a man in a room",
                   "a woman on the beach", "a cat on the grass", "a city street at night", "a tree in the snow")
MAX_PROMPTS = 1024  # each prompt is sampled once through the base while its Grams are recorded
MAX_PROMPT_CHARS = 1000


def check_prompts(prompts: Sequence[str], where: str) -> list[str]:
    """The preservation prompts as a list: 1 to MAX_PROMPTS texts, none empty, none too long, no NUL."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise UserError(f"{where}: give between 1 and {MAX_PROMPTS} preservation prompts")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"{where} has {len(prompts)} prompts; at most {MAX_PROMPTS} are sampled (keep the ones "
                        "that matter)")
    out = []
    for i, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: prompt {i} is empty or not text")
        if len(prompt) > MAX_PROMPT_CHARS or "\x00" in prompt:
            raise UserError(f"{where}: prompt {i} is longer than {MAX_PROMPT_CHARS} characters or holds a NUL")
        out.append(prompt.strip())
    return out


def read_prompt_file(path: Path) -> list[str]:
    """A preservation prompt file: UTF-8 text, one prompt per line (blank lines and lines starting with # are
    skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preservation prompt file {path} is not a file")
    lines = [line.strip() for line in read_text(path, "preservation prompt file").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"preservation prompt file {path} holds no prompt: write one prompt per line")
    return check_prompts(prompts, f"preservation prompt file {path}")


def preservation_grams(base: Base, sites: dict[str, dict[str, list[str]]], prompts: list[str], resolution: int,
                       steps: int = 20) -> dict[str, torch.Tensor]:
    """Ĝ of `prompts` through the base model, at every client-side site (target: W0): the text encoders' (both
    on SDXL) while the prompts are encoded, the UNet's while the base samples them (8 at a time)."""
    plain = layerwise_encoder(base, TokenMap(len(cross_attention_layers(base.unet))))
    models = [(prefix, encoder) for prefix, _, encoder in base.text_models()]
    out = {}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        recorders = {prefix: stack.enter_context(GramRecorder(model, list(sites.get(prefix, {}))))
                     for prefix, model in models}
        plain.encode(prompts)
        with GramRecorder(base.unet, list(sites.get("unet", {}))) as unet_recorder:
            for start in range(0, len(prompts), 8):
                generate(base, plain, prompts[start:start + 8], seed=start, steps=steps, height=resolution,
                         width=resolution)
        for prefix, rec in {**recorders, "unet": unet_recorder}.items():
            out.update({f"{prefix}.{s}": rec.grams[s] / rec.rows[s] for s in rec.grams})
    return out
