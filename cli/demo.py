from __future__ import annotations

from pathlib import Path

import typer

NAME = "demo"


def run(out: Path = typer.Option(Path("demo-out"), "--out", help="demo folder (created; must be new or empty)"),
        base: Path = typer.Option(None, "--base", help="a base to use instead of building the tiny one"),
        steps: int = typer.Option(150, "--steps", help="training steps per client"),
        resolution: int = typer.Option(64, "--resolution"),
        device: str = typer.Option("cpu", "--device")) -> None:
    """The embedded default: tiny base, 3 toy clients in a real Flower simulation, fuse, publish, pull, sample."""
    import os
    import time

    from rich.console import Console

    from cli.simulation import run_demo_round
    from fixtures.tiny_base import make_tiny_base
    from fixtures.toy_concepts import make_toy_concepts
    from sample.regional import Box
    from sample.scene import Region, Scene, overlay, render
    from server.report import table_of
    from server.settings import RoundSettings
    from shared.atomic import check_fresh_output
    from shared.checkpoints import pull
    from shared.fused_model import expand_prompt, load_fused
    from shared.sampling import generate, image_grid
    from shared.storage import open_store

    console = Console()
    start = time.time()
    check_fresh_output(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    base = base.resolve() if base else make_tiny_base(out / "tiny-sd")
    concepts = make_toy_concepts(out / "toys", 3, images=6, size=resolution)
    nodes = [{"name": c["name"], "data-dir": str(out / "toys" / c["folder"]), "words": " ".join(c["words"]),
              "class-word": c["class_word"], "base": str(base), "work-dir": str(out / "clients" / c["name"]),
              "device": device} for c in concepts]
    store_url = f"file://{out / 'store'}"
    settings = RoundSettings.from_config({"store": store_url, "base": str(base), "min-clients": 3, "wait": 60,
                                          "steps": steps, "resolution": resolution, "stats-samples": 2})
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    console.print(f"[bold]federation round[/]: 3 simulated clients, store {store_url}")
    result = run_demo_round(settings, nodes, out)
    console.print(f"round {result['round_id']}: published {result['published']} in {result['seconds']} s")
    store = open_store(store_url)
    manifest = pull(store, out / "pulled", "latest")
    import json

    console.print(table_of(json.loads((out / "pulled" / "fusion_report.json").read_text())))
    model, encoder, fused = load_fused(out / "pulled", device)
    prompts = [f"a photo of a <{c['name']}>" for c in fused]
    images = generate(model, encoder, [expand_prompt(p, fused) for p in prompts], seed=1, steps=20,
                      height=resolution, width=resolution)
    boxes = [Box(0.0, 0.0, 0.55, 0.5), Box(0.0, 0.5, 0.55, 1.0), Box(0.45, 0.25, 1.0, 0.75)]
    scene = Scene(prompt="a photo of " + " and ".join(f"a <{c['name']}>" for c in fused), seed=1, steps=20,
                  height=resolution, width=resolution,
                  regions=[Region(f"a photo of a <{c['name']}>", box) for c, box in zip(fused, boxes)])
    together = render(model, encoder, scene, lambda text: expand_prompt(text, fused))[0]
    overlay(together, scene).save(out / "scene_overlay.png")
    image_grid([[*images, together]], ["fused model"], [p[:28] for p in prompts] + ["all three, by region"]
               ).save(out / "samples.png")
    console.print(f"pulled {manifest.version} ({len(manifest.files)} files, all sha256-verified) to {out / 'pulled'}")
    console.print(f"samples: {out / 'samples.png'}, regions: {out / 'scene_overlay.png'}   "
                  f"total {time.time() - start:.0f} s")
