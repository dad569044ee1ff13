from __future__ import annotations

from pathlib import Path

import typer

from cli.options import BaseConfig, Device, Dtype, package_fuser

NAME = "concepts"


def run(model: Path = typer.Option(None, "--model", help="a FUSED folder"),
        base: Path = typer.Option(None, "--base", help="a base (with --fused-lora or --package)"),
        base_config: Path = BaseConfig,
        fused_lora: Path = typer.Option(None, "--fused-lora", help="a fused_lora.safetensors (with --base)"),
        package: list[Path] = typer.Option(None, "--package", help="concept package(s) with --base"),
        concept: list[str] = typer.Option(..., "--concept", help="a world concept the model holds, by its name"),
        scene: Path = typer.Option(None, "--scene", help="a scene YAML whose regions name the concepts"),
        evaluator: Path = typer.Option(Path("assets/world-evaluator"), "--evaluator"),
        seeds: int = typer.Option(8, "--seeds"), steps: int = typer.Option(20, "--steps"),
        guidance: float = typer.Option(4.0, "--guidance"),
        grid: Path = typer.Option(Path("concepts.png"), "--grid", help="the labelled PNG grid to write"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Per concept, the share of seeded samples of "a photo of a <NAME>" in which the world evaluator finds it
    (with --scene: found inside its own region's box), and a labelled grid of the samples."""
    from rich.console import Console
    from rich.table import Table

    from sample.models import load_scene_model
    from sample.scene import Scene, read_scene, render
    from shared.atomic import write_image_atomic
    from shared.device import parse_device, parse_dtype
    from shared.errors import InvalidArgument
    from shared.sampling import check_setting, image_grid
    from shared.validate import number
    from world.evaluator import CONCEPT_LABELS, Judge

    number("seeds", seeds, 1, 1000, integer=True)
    check_setting("steps", steps)
    check_setting("guidance", guidance)
    unknown = [c for c in concept if c not in CONCEPT_LABELS[1:]]
    if unknown:
        raise InvalidArgument("concept", f"{unknown[0]!r} is not a world concept ({', '.join(CONCEPT_LABELS[1:])})")
    if grid.suffix.lower() != ".png":
        raise InvalidArgument("grid", f"{grid} must end in .png")
    judge = Judge(evaluator)
    layout = read_scene(scene) if scene else None
    dev = parse_device(device)
    spec = Scene(prompt="", model=model, base=base, fused_lora=fused_lora, concepts=list(package or []))
    loaded = load_scene_model(spec, dev, parse_dtype(dtype), base_config, fuser=package_fuser(dev, base_config))
    rows, table = [], Table(title=f"world evaluator's verdict over {seeds} seeds")
    for column in ("concept", "found", "share"):
        table.add_column(column, justify="left" if column == "concept" else "right")
    for name in concept:
        if layout is not None:
            region = next((r for r in layout.regions if f"<{name}>" in r.prompt), None)
            if region is None:
                raise InvalidArgument("scene", f"{scene} has no region naming <{name}>")
            images = [render(loaded.base, loaded.encoder, Scene(**{**layout.__dict__, "seed": layout.seed + s,
                                                                   "batch": 1}), loaded.expand)[0]
                      for s in range(seeds)]
            boxes = [(region.box.top, region.box.left, region.box.bottom, region.box.right)] * seeds
        else:
            images = [render(loaded.base, loaded.encoder, Scene(prompt=f"a photo of a <{name}>", seed=s, steps=steps,
                                                                guidance=guidance, height=64, width=64),
                             loaded.expand)[0] for s in range(seeds)]
            boxes = None
        found = sum(v["concept"] == name for v in judge.labels(images, boxes))
        table.add_row(name, f"{found}/{seeds}" + (" in its box" if layout else ""), f"{found / seeds:.2f}")
        rows.append(images)
    Console().print(table)
    write_image_atomic(grid, image_grid(rows, list(concept), [f"seed {s}" for s in range(seeds)]))
    Console().print(f"wrote {grid}")
