from __future__ import annotations

from pathlib import Path

import typer

from cli.options import BaseConfig, Device, Dtype, Seed

NAME = "sample"


def run(base: Path = typer.Option(None, "--base", help="base model: a diffusers folder or a .safetensors file"),
        base_config: Path = BaseConfig,
        concept: Path = typer.Option(None, "--concept", help="one concept package (with --base)"),
        model: Path = typer.Option(None, "--model", help="a FUSED folder written by `mixshow fuse`"),
        fused_lora: Path = typer.Option(None, "--fused-lora", help="a fused_lora.safetensors (with --base)"),
        prompt: str = typer.Option(..., "--prompt", help="prompt; <TOK> is the concept's words with --concept, "
                                                         "<name> a fused concept by its package name"),
        negative: str = typer.Option("", "--negative", help="negative prompt"),
        seed: int = Seed,
        steps: int = typer.Option(20, "--steps"),
        guidance: float = typer.Option(7.5, "--guidance"),
        height: int = typer.Option(512, "--height"),
        width: int = typer.Option(512, "--width"),
        scheduler: str = typer.Option("dpm++", "--scheduler", help="dpm++ | ddim | euler"),
        lora_weight: float = typer.Option(1.0, "--lora-scale", help="multiplier on the concept's LoRA (--concept)"),
        out: Path = typer.Option(..., "--out", help="image file to write (.png)"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Generate an image: one concept (--base + --concept) or fused concepts (--model, or --base + --fused-lora)."""
    import contextlib

    from rich import print

    from shared.atomic import write_image_atomic
    from shared.base import load_base
    from shared.device import parse_device, parse_dtype
    from shared.errors import UserError
    from shared.fused_model import apply_fused_lora, expand_prompt, load_fused
    from shared.lora import lora_scale
    from shared.package import apply_concept
    from shared.sampling import generate

    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    modes = [model is not None, concept is not None, fused_lora is not None]
    if sum(modes) != 1 or (model is None and base is None):
        raise UserError("give --base with --concept or --fused-lora, or --model FUSED alone")
    dev, dt = parse_device(device), parse_dtype(dtype)
    scale = contextlib.nullcontext()
    if model is not None:
        pipe, encoder, concepts = load_fused(model, dev, dt)
        text = expand_prompt(prompt, concepts)
    else:
        pipe = load_base(base, dev, dt, base_config)
        if concept is not None:
            meta, encoder = apply_concept(pipe, concept)
            text = prompt.replace("<TOK>", meta.phrase)
            scale = lora_scale([pipe.unet, pipe.text_encoder], lora_weight)
        else:
            encoder, concepts = apply_fused_lora(pipe, fused_lora)
            text = expand_prompt(prompt, concepts)
    with scale:
        image = generate(pipe, encoder, [text], negative, seed, steps, guidance, height, width, scheduler)[0]
    write_image_atomic(out, image)
    print(f"wrote {out}  ({text!r}, seed {seed})")
