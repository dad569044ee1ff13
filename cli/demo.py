from __future__ import annotations

from pathlib import Path

import typer

NAME = "demo"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_CONCEPTS = ("crescent", "band-square", "arrow")  # the three the ablation's single clients learn best
# The clients' own training settings are the world's (world.concepts.CONCEPT_TRAINING) but for steps and
# resolution, which the round sets: each client chooses its own, as in a real federation.
ROUND_SETS = ("steps", "resolution")
PRESERVE_PROMPTS = 32


def run(out: Path = typer.Option(Path("demo-out"), "--out", help="demo folder (created; must be new or empty)"),
        base: Path = typer.Option(ASSETS / "shapes-base", "--base", help="the base (default: the committed "
                                                                          "shapes base)"),
        evaluator: Path = typer.Option(ASSETS / "world-evaluator", "--evaluator"),
        arch: str = typer.Option("sd", "--arch", help="sd: the base given (the committed shapes base by default); "
                                 "sdxl: a tiny SDXL-shaped base built from config into OUT/base unless --base is "
                                 "given (random weights: the images show no concepts, the evaluator finds none)"),
        steps: int = typer.Option(700, "--steps", help="training steps per client"),
        seeds: int = typer.Option(4, "--seeds", help="seeds of the final scene the evaluator judges"),
        device: str = typer.Option("cpu", "--device")) -> None:
    """The embedded default: 3 world concepts federated on the shapes base in a real Flower simulation (train,
    Grams, upload, fuse, publish), pulled back verified, then judged: single-client vs fused, and by region."""
    import json
    import os
    import time

    import yaml
    from rich.console import Console

    from cli.simulation import run_demo_round
    from fixtures.tiny_base import make_tiny_base
    from sample.regional import Box
    from sample.scene import Region, Scene, overlay, render
    from server.report import table_of
    from server.settings import RoundSettings
    from shared.atomic import check_fresh_output
    from shared.base import load_base
    from shared.checkpoints import pull
    from shared.errors import InvalidArgument
    from shared.fused_model import expand_prompt, load_fused
    from shared.package import apply_concept
    from shared.sampling import generate, image_grid
    from shared.storage import open_store
    from shared.validate import number
    from world.concepts import CONCEPT_TRAINING, make_world_concepts
    from world.evaluator import Judge
    from world.scenes import ordinary_prompts

    number("seeds", seeds, 1, 64, integer=True)
    console = Console()
    start = time.time()
    check_fresh_output(out, "out")
    if arch not in ("sd", "sdxl"):
        raise InvalidArgument("arch", f"{arch!r} is neither sd nor sdxl")
    judge = Judge(evaluator)
    base = Path(base).resolve()
    build_tiny = arch == "sdxl" and base == (ASSETS / "shapes-base").resolve()
    if not build_tiny and load_base(base, sdxl=True).arch != arch:  # a wrong base fails before anything starts
        raise InvalidArgument("arch", f"the base {base} is not an {arch} base; give the --arch that matches it")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    if build_tiny:  # the tiny base's vocabulary has none of the world's class words (shape, badge, sign)
        base = make_tiny_base(out / "base", arch="sdxl")
        console.print("[bold]tiny SDXL base[/] (random weights) in OUT/base; the concepts' class word is 'toy'")
    concepts = make_world_concepts(out / "concepts", list(DEMO_CONCEPTS), images=12)
    training = out / "client-training.yaml"
    training.write_text(yaml.safe_dump({k: v for k, v in CONCEPT_TRAINING.items() if k not in ROUND_SETS}))
    nodes = [{"name": c["name"], "data-dir": str(out / "concepts" / c["folder"]), "words": " ".join(c["words"]),
              "class-word": "toy" if build_tiny else c["class_word"], "base": str(base),
              "work-dir": str(out / "clients" / c["name"]),
              "device": device, "train-config": str(training)} for c in concepts]
    store_url = f"file://{out / 'store'}"
    preserve = out / "preserve-prompts.txt"  # ordinary world captions: the fused model keeps the base on them
    preserve.write_text("\n".join(ordinary_prompts(PRESERVE_PROMPTS)) + "\n")
    settings = RoundSettings.from_config({"store": store_url, "base": str(base), "min-clients": 3, "wait": 60,
                                          "steps": steps, "resolution": 64, "stats-samples": 4,
                                          "preserve-prompts": str(preserve)})
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    console.print(f"[bold]federation round[/]: 3 simulated clients, store {store_url}")
    result = run_demo_round(settings, nodes, out)
    console.print(f"round {result['round_id']}: published {result['published']} in {result['seconds']} s")
    manifest = pull(open_store(store_url), out / "pulled", "latest")
    console.print(table_of(json.loads((out / "pulled" / "fusion_report.json").read_text())))
    model, encoder, fused = load_fused(out / "pulled", device)
    names = [c["name"] for c in concepts]
    rows, labels = [], []
    for name in names:  # each concept: its own client's model, then the fused model, same seeds
        package = next((out / "clients" / name).glob(f"*/{name}"))
        single = load_base(base, device, sdxl=True)
        _, single_encoder = apply_concept(single, package)
        words = " ".join(next(c for c in concepts if c["name"] == name)["words"])
        own = generate(single, single_encoder, [f"a photo of a {words}"] * 4, seed=1, steps=20, guidance=4.0,
                       height=64, width=64)
        merged = generate(model, encoder, [expand_prompt(f"a photo of a <{name}>", fused)] * 4, seed=1, steps=20,
                          guidance=4.0, height=64, width=64)
        rows.append(own + merged)
        found_own = sum(v["concept"] == name for v in judge.labels(own))
        found_fused = sum(v["concept"] == name for v in judge.labels(merged))
        labels.append(f"<{name}>")
        console.print(f"<{name}> found in {found_own}/4 single-client samples, {found_fused}/4 fused")
    image_grid(rows, labels, ["single client"] * 4 + ["fused"] * 4).save(out / "single_vs_fused.png")
    boxes = [Box(0.0, 0.0, 1.0, 0.34), Box(0.0, 0.33, 1.0, 0.67), Box(0.0, 0.66, 1.0, 1.0)]
    places = ("on the left", "in the centre", "on the right")
    prompt = "a photo of " + " and ".join(f"a <{n}> {p}" for n, p in zip(names, places))
    scenes = [Scene(prompt=prompt, seed=seed, steps=20, guidance=4.0, height=64, width=64,
                    regions=[Region(f"a photo of a <{n}>", b) for n, b in zip(names, boxes)]) for seed in range(seeds)]
    images = [render(model, encoder, s, lambda text: expand_prompt(text, fused))[0] for s in scenes]
    overlay(images[0], scenes[0]).save(out / "scene_overlay.png")
    image_grid([images], ["by region"], [f"seed {s}" for s in range(seeds)]).save(out / "scene.png")
    for name, box in zip(names, boxes):
        hits = sum(v["concept"] == name for v in judge.labels(images, [(box.top, box.left, box.bottom, box.right)]
                                                              * len(images)))
        console.print(f"<{name}> found in its box in {hits}/{seeds} seeds")
    console.print(f"pulled {manifest.version} ({len(manifest.files)} files, all sha256-verified) to {out / 'pulled'}")
    console.print(f"grids: {out / 'single_vs_fused.png'}, {out / 'scene.png'}; regions: {out / 'scene_overlay.png'}"
                  f"   total {time.time() - start:.0f} s")
