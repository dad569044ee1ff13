from __future__ import annotations

from pathlib import Path

import typer

from cli.options import Base, BaseConfig, Device, Dtype, Seed

NAME = "sample"


def run(base: Path = Base, base_config: Path = BaseConfig,
        concept: Path = typer.Option(..., "--concept", help="a concept package folder"),
        prompt: str = typer.Option(..., "--prompt", help="prompt; <TOK> stands for the concept's words"),
        negative: str = typer.Option("", "--negative", help="negative prompt"),
        seed: int = Seed,
        steps: int = typer.Option(20, "--steps"),
        guidance: float = typer.Option(7.5, "--guidance"),
        height: int = typer.Option(512, "--height"),
        width: int = typer.Option(512, "--width"),
        scheduler: str = typer.Option("dpm++", "--scheduler", help="dpm++ | ddim | euler"),
        lora_weight: float = typer.Option(1.0, "--lora-scale", help="multiplier on the concept's LoRA"),
        out: Path = typer.Option(..., "--out", help="image file to write (.png)"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Generate an image of one concept with its layer-wise embeddings."""
    from rich import print

    from shared.atomic import write_image_atomic
    from shared.base import load_base
    from shared.device import parse_device, parse_dtype
    from shared.errors import UserError
    from shared.lora import lora_scale
    from shared.package import apply_concept
    from shared.sampling import generate

    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    model = load_base(base, parse_device(device), parse_dtype(dtype), base_config)
    meta, encoder = apply_concept(model, concept)
    text = prompt.replace("<TOK>", meta.phrase)
    with lora_scale([model.unet, model.text_encoder], lora_weight):
        image = generate(model, encoder, [text], negative, seed, steps, guidance, height, width, scheduler)[0]
    write_image_atomic(out, image)
    print(f"wrote {out}  ({text!r}, seed {seed})")
