from __future__ import annotations

from pathlib import Path

import typer

from cli.options import BaseConfig, Device, Dtype, package_fuser

NAME = "sample"


def run(config: Path = typer.Option(None, "--config", help="a scene YAML (docs/sampling.md); flags below then only "
                                                           "name the model if the YAML does not"),
        base: Path = typer.Option(None, "--base", help="base model: a diffusers folder or a .safetensors file"),
        base_config: Path = BaseConfig,
        concept: list[Path] = typer.Option(None, "--concept", help="concept package(s) with --base (several are "
                                                                   "fused in memory first)"),
        model: Path = typer.Option(None, "--model", help="a FUSED folder written by `mixshow fuse`"),
        fused_lora: Path = typer.Option(None, "--fused-lora", help="a fused_lora.safetensors (with --base)"),
        prompt: str = typer.Option(None, "--prompt", help="global prompt; <name> is a concept by its package name "
                                                          "(<TOK> also works with one --concept)"),
        negative: str = typer.Option(None, "--negative", help="negative prompt"),
        region: list[str] = typer.Option(None, "--region", help="'top,left,bottom,right:prompt' (fractions), "
                                                                "repeatable"),
        condition: list[str] = typer.Option(None, "--condition",
                                            help="'t2i-adapter|controlnet:MODEL_DIR:IMAGE[:WEIGHT]', repeatable; "
                                                 "WEIGHT in [0, 10] (default 1); the image is resized to the "
                                                 "output and must have its aspect ratio"),
        seed: int = typer.Option(None, "--seed", help="0 .. 2^32-1 (default 0)"),
        steps: int = typer.Option(None, "--steps", help="denoising steps, 1 .. 1000 (default 20)"),
        guidance: float = typer.Option(None, "--guidance", help="classifier-free guidance, 1 (none) .. 100 "
                                                                "(default 7.5)"),
        height: int = typer.Option(None, "--height", help="8 .. 4096, a multiple of 2 x the VAE factor (default 512)"),
        width: int = typer.Option(None, "--width", help="as --height (default 512)"),
        scheduler: str = typer.Option(None, "--scheduler", help="dpm++ (default) | ddim | euler"),
        batch: int = typer.Option(None, "--batch", help="images per scene (1 .. 64), seeds from one latent draw"),
        lora_weight: float = typer.Option(1.0, "--lora-scale", help="multiplier in [0, 4] on one --concept's LoRA "
                                                                    "(0: the base weights)"),
        out: Path = typer.Option(..., "--out", help="image to write (.png); a batch writes NAME_0.png ..., "
                                                    "regions add NAME_overlay.png"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Generate images: one or several concepts, regions with boxes, T2I-Adapter / ControlNet conditions."""
    import contextlib

    from rich import print

    from sample.models import load_scene_model
    from sample.scene import overlay, preflight, read_scene, render, scene_from_dict
    from shared.atomic import write_image_atomic
    from shared.device import parse_device, parse_dtype
    from shared.errors import UserError

    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the path of the image to write")
    flags = {"prompt": prompt, "negative": negative, "seed": seed, "steps": steps, "guidance": guidance,
             "height": height, "width": width, "scheduler": scheduler, "batch": batch}
    if config is not None:
        given = [f"--{k}" for k, v in flags.items() if v is not None] + (["--region"] if region else []) + \
                (["--condition"] if condition else [])
        if given:
            raise UserError(f"--config {config} describes the scene; drop {', '.join(given)} (or edit the YAML)")
        scene = read_scene(config)
    else:
        if prompt is None:
            raise UserError("give --prompt, or --config scene.yaml")
        data = {k: v for k, v in flags.items() if v is not None}
        data["regions"] = [parse_region(r) for r in region or []]
        data["conditions"] = [parse_condition(c) for c in condition or []]
        scene = scene_from_dict(data, "flags")
    for key, value in (("model", model), ("base", base), ("fused_lora", fused_lora)):
        if value is not None:
            setattr(scene, key, value)
    if concept:
        scene.concepts = list(concept)
    preflight(scene)  # condition folders and images, before any model is loaded
    dev = parse_device(device)
    loaded = load_scene_model(scene, dev, parse_dtype(dtype), base_config, lora_weight, package_fuser(dev, base_config))
    expand = loaded.expand
    with loaded.scale or contextlib.nullcontext():
        images = render(loaded.base, loaded.encoder, scene, expand, show_progress=True)
    names = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}.png") for i in range(len(images))]
    for path, image in zip(names, images):
        write_image_atomic(path, image)
    print(f"wrote {', '.join(str(p) for p in names)}  ({expand(scene.prompt)!r}, seed {scene.seed}, "
          f"{len(scene.regions)} region(s), {len(scene.conditions)} condition(s))")
    if scene.regions:
        path = out.with_name(f"{out.stem}_overlay.png")
        write_image_atomic(path, overlay(images[0], scene))
        print(f"wrote {path} (the boxes and their prompts)")


def parse_region(text: str) -> dict:
    """'top,left,bottom,right:prompt' -> the YAML form of a region."""
    from sample.regional import Box
    from shared.errors import UserError

    box, sep, prompt = text.partition(":")
    if not sep or not prompt.strip():
        raise UserError(f"--region {text!r} must be 'top,left,bottom,right:prompt'")
    try:
        values = [float(v) for v in box.split(",")]
    except ValueError:
        raise UserError(f"--region {text!r}: the box must be four numbers 'top,left,bottom,right'") from None
    Box.parse(values, f"--region {text!r}: box")
    return {"box": values, "prompt": prompt.strip()}


def parse_condition(text: str) -> dict:
    """'type:model:image[:weight]' -> the YAML form of a condition."""
    from shared.errors import UserError

    kind, _, rest = text.partition(":")
    model, _, rest = rest.partition(":")
    image, _, weight = rest.rpartition(":")
    if weight and not image:  # no weight given: everything after the model is the image
        image, weight = weight, ""
    else:
        try:
            float(weight)
        except ValueError:  # the image path itself holds a ':'
            image, weight = rest, ""
    if not kind or not model or not image:
        raise UserError(f"--condition {text!r} must be 'type:MODEL_DIR:IMAGE[:WEIGHT]'")
    item = {"type": kind, "model": model, "image": image}
    if weight:
        from sample.conditions import check_weight

        item["weight"] = check_weight(float(weight), f"--condition {text!r}: weight")
    return item
