from __future__ import annotations

from pathlib import Path

import typer

from cli.options import BaseConfig, Device, Dtype

NAME = "clip"
DEFAULT_PROMPTS = ("a photo of a {}", "a {} on the beach", "a painting of a {}")


def run(clip: Path = typer.Option(..., "--clip", help="a local transformers CLIPModel folder"),
        model: Path = typer.Option(None, "--model", help="a FUSED folder"),
        base: Path = typer.Option(None, "--base", help="base model (with --fused-lora)"),
        base_config: Path = BaseConfig,
        fused_lora: Path = typer.Option(None, "--fused-lora", help="a fused_lora.safetensors (with --base)"),
        concept: list[str] = typer.Option(..., "--concept", help="NAME=REFERENCE_IMAGES_DIR, repeat for each concept"),
        prompt: list[str] = typer.Option(None, "--prompt", help="a template with {} for the concept, repeatable "
                                                                f"(default: {'; '.join(DEFAULT_PROMPTS)})"),
        seeds: int = typer.Option(2, "--seeds", help="images per prompt (seeds 0..N-1), 1 .. 1000"),
        steps: int = typer.Option(20, "--steps", help="denoising steps, 1 .. 1000"),
        guidance: float = typer.Option(7.5, "--guidance", help="classifier-free guidance, 1 (none) .. 100"),
        size: int = typer.Option(512, "--size", help="image height and width (a multiple of 2 x the VAE factor)"),
        scheduler: str = typer.Option("dpm++", "--scheduler", help="dpm++ | ddim | euler"),
        json_out: Path = typer.Option(None, "--json", help="write every score here (default: print only)"),
        device: str = Device, dtype: str = Dtype) -> None:
    """CLIP text-alignment (2.5·max(cos, 0) vs the prompt with the class word) and image-alignment (mean cosine vs
    the concept's reference images), per concept over prompts x seeds."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from sample.clip_eval import ClipScorer, reference_images
    from sample.models import load_scene_model
    from sample.scene import Scene, render
    from shared.atomic import write_bytes_atomic
    from shared.device import parse_device, parse_dtype
    from shared.errors import UserError
    from shared.sampling import check_scheduler, check_setting, check_size
    from shared.validate import dumps_json, number

    if model is None and (base is None or fused_lora is None):
        raise UserError("give the model to score: --model FUSED, or --base BASE with --fused-lora FILE")
    pairs = []
    for item in concept:
        name, sep, folder = item.partition("=")
        name = name.strip().strip("<>")
        if not sep or not name or not folder:
            raise UserError(f"--concept {item!r} must be NAME=REFERENCE_IMAGES_DIR")
        if name in {n for n, _ in pairs}:
            raise UserError(f"--concept {name} is given twice: name each concept once")
        pairs.append((name, Path(folder)))
    number("seeds", seeds, 1, 1000, integer=True)
    check_setting("steps", steps)
    check_setting("guidance", guidance)
    check_setting("height", size, "size")
    check_scheduler(scheduler)
    templates = list(prompt or DEFAULT_PROMPTS)
    for t in templates:
        if t.count("{}") != 1:
            raise UserError(f"--prompt {t!r} must contain {{}} exactly once (where the concept goes)")
    if json_out is not None and json_out.is_dir():
        raise UserError(f"--json {json_out} is a folder: give the path of the JSON file to write")
    references = {name: reference_images(folder) for name, folder in pairs}
    dev, dt = parse_device(device), parse_dtype(dtype)
    scorer = ClipScorer(clip, dev, dt)
    loaded = load_scene_model(Scene(prompt="", model=model, base=base, fused_lora=fused_lora), dev, dt, base_config)
    check_size(loaded.base, size, size, ("size", "size"))  # the base's own steps, before any sampling
    records = {c["name"]: c for c in loaded.concepts}
    for name, _folder in pairs:  # every name checked before any sampling
        if name not in records:
            raise UserError(f"--concept {name}: the model lacks this concept (it has: "
                            f"{', '.join(sorted(records))})")
    results: dict = {"clip": str(clip), "model": str(model or fused_lora), "concepts": {}}
    progress = Progress(*Progress.get_default_columns(), transient=True)
    task = progress.add_task("sampling and scoring", total=len(pairs) * len(templates) * seeds)
    progress.start()
    for name, _folder in pairs:
        class_word = records[name]["class_word"]
        ref = scorer.images(references[name])
        rows = []
        for template in templates:
            text, plain = template.replace("{}", f"<{name}>"), template.replace("{}", class_word)
            for seed in range(seeds):
                scene = Scene(prompt=text, seed=seed, steps=steps, guidance=guidance, height=size, width=size,
                              scheduler=scheduler)
                image = render(loaded.base, loaded.encoder, scene, loaded.expand)[0]
                rows.append({"prompt": text, "class_prompt": plain, "seed": seed,
                             "text_alignment": float(scorer.text_alignment([image], plain)[0]),
                             "image_alignment": float(scorer.image_alignment([image], ref)[0])})
                progress.advance(task)
        results["concepts"][name] = {
            "images": len(rows), "references": len(references[name]),
            "text_alignment": sum(r["text_alignment"] for r in rows) / len(rows),
            "image_alignment": sum(r["image_alignment"] for r in rows) / len(rows), "samples": rows}
    progress.stop()
    table = Table(title=f"CLIP scores ({clip.name}; text: 2.5·max(cos, 0) vs the class-word prompt; "
                        "image: mean cosine vs references)")
    for column in ("concept", "images", "text-alignment", "image-alignment"):
        table.add_column(column, justify="left" if column == "concept" else "right")
    for name, r in results["concepts"].items():
        table.add_row(name, str(r["images"]), f"{r['text_alignment']:.4f}", f"{r['image_alignment']:.4f}")
    Console().print(table)
    if json_out is not None:
        write_bytes_atomic(json_out, dumps_json(results, indent=2).encode())
        Console().print(f"wrote {json_out}")

