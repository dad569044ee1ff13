"""The method's ablation on images, on the committed shapes base, judged by the committed world evaluator.

    python bench/ablation.py [--quick] [--out ablation-out]

Trains world concepts as ED-LoRA and as plain LoRA, computes their Grams, and measures with the evaluator:
- single client: presence on "a photo of <C>", on "<C> on the left" (and on the left), and on
  "<C> on the left and a yellow square on the right" (is the square right too?);
- after fusing all concepts: each concept's presence and retention (fused / single), for gradient fusion,
  weight averaging and summing, ED-LoRA vs LoRA, beside the identity-loss report's mean;
- leakage: how often a fused model shows a concept when the prompt names another concept or none;
- the base kept: single-object prompts naming no concept, colour and shape both right, for each fused model
  and for the base itself (gradient fusion with and without preservation prompts, server.preservation);
- composition: 2 and 3 concepts in one image, regional sampling vs the plain prompt: the share of samples
  in which every concept is found in its own box.
Prints one table; writes ablation.json and a PNG grid into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from client.config import TrainConfig  # noqa: E402
from client.stats import compute_stats  # noqa: E402
from client.train import train_concept  # noqa: E402
from sample.regional import Box  # noqa: E402
from sample.scene import Region, Scene, render  # noqa: E402
from server.fuse import fuse  # noqa: E402
from shared.base import load_base  # noqa: E402
from shared.fused_model import expand_prompt, load_fused  # noqa: E402
from shared.package import apply_concept  # noqa: E402
from shared.sampling import generate, image_grid  # noqa: E402
from world.adherence import measure  # noqa: E402
from world.concepts import CONCEPT_TRAINING, CONCEPTS, make_world_concepts  # noqa: E402
from world.evaluator import Judge  # noqa: E402
from world.scenes import ordinary_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LEFT, RIGHT = Box(0.0, 0.0, 1.0, 0.5), Box(0.0, 0.5, 1.0, 1.0)
THIRDS = (Box(0.0, 0.0, 1.0, 0.34), Box(0.0, 0.33, 1.0, 0.67), Box(0.0, 0.66, 1.0, 1.0))
GUIDANCE, STEPS = 4.0, 20
PRESERVE = 32  # ordinary world captions whose Grams keep the base (what `mixshow demo` federates with)
BASE_PROMPTS = 64  # single-object prompts that measure how much of the base a fused model keeps
METHODS = {"gradient": ("gradient", PRESERVE), "gradient-nopres": ("gradient", 0), "average": ("average", 0),
           "sum": ("sum", 0)}


def box_tuple(box: Box) -> tuple[float, float, float, float]:
    return (box.top, box.left, box.bottom, box.right)


def share(hits: list[bool]) -> float:
    return sum(hits) / max(1, len(hits))


def sample(base, encoder, prompts: list[str], seeds: int) -> list:
    return generate(base, encoder, [p for p in prompts for _ in range(seeds)], seed=11, steps=STEPS,
                    guidance=GUIDANCE, height=64, width=64)


def single_client(judge: Judge, base_path: Path, pkg: Path, concept, seeds: int, grid: list) -> dict:
    base = load_base(base_path)
    meta, encoder = apply_concept(base, pkg)
    words = meta.phrase
    photo = sample(base, encoder, [f"a photo of a {words}"], seeds)
    left = sample(base, encoder, [f"a photo of a {words} on the left"], seeds)
    pair = sample(base, encoder, [f"a photo of a {words} on the left and a yellow square on the right"], seeds)
    grid.append(photo[:4] + pair[:4])
    found = [v["concept"] == concept.name for v in judge.labels(photo)]
    on_left = [v["concept"] == concept.name for v in judge.labels(left, [box_tuple(LEFT)] * len(left))]
    square = [v["shape"] == "square" and v["colour"] == "yellow"
              for v in judge.labels(pair, [box_tuple(RIGHT)] * len(pair))]
    pair_left = [v["concept"] == concept.name for v in judge.labels(pair, [box_tuple(LEFT)] * len(pair))]
    return {"presence": share(found), "left": share(on_left), "pair_concept": share(pair_left),
            "pair_square": share(square)}


def fused_measures(judge: Judge, folder: Path, names: list[str], seeds: int) -> dict:
    base, encoder, records = load_fused(folder)
    presence, leakage = {}, {}
    for name in names:
        images = sample(base, encoder, [expand_prompt(f"a photo of a <{name}>", records)], seeds)
        verdicts = judge.labels(images)
        presence[name] = share([v["concept"] == name for v in verdicts])
        for other in names:  # a prompt for `name` showing `other`
            if other != name:
                leakage.setdefault(other, []).extend(v["concept"] == other for v in verdicts)
    plain = judge.labels(sample(base, encoder, ["a photo of a shape"], seeds))
    for name in names:
        leakage[name].extend(v["concept"] == name for v in plain)
    kept = measure(base, judge, count=BASE_PROMPTS)[0].both
    return {"presence": presence, "leakage": {n: share(h) for n, h in leakage.items()}, "base_kept": kept}


def composition(judge: Judge, folder: Path, names: list[str], seeds: int, regional: bool) -> float:
    base, encoder, records = load_fused(folder)
    boxes = (LEFT, RIGHT) if len(names) == 2 else THIRDS
    places = ("on the left", "on the right") if len(names) == 2 else ("on the left", "in the centre", "on the right")
    prompt = "a photo of " + " and ".join(f"a <{n}> {p}" for n, p in zip(names, places))
    hits = []
    for seed in range(seeds):
        scene = Scene(prompt=prompt, seed=100 + seed, steps=STEPS, guidance=GUIDANCE, height=64, width=64,
                      regions=[Region(f"a photo of a <{n}>", b) for n, b in zip(names, boxes)] if regional else [])
        image = render(base, encoder, scene, lambda t: expand_prompt(t, records))[0]
        verdicts = judge.labels([image] * len(names), [box_tuple(b) for b in boxes])
        hits.append(all(v["concept"] == n for v, n in zip(verdicts, names)))
    return share(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "shapes-base")
    parser.add_argument("--evaluator", type=Path, default=ROOT / "assets" / "world-evaluator")
    parser.add_argument("--quick", action="store_true", help="2 concepts, 40 steps, 2 seeds: a smoke run")
    parser.add_argument("--concepts", type=int, default=None, help=f"how many world concepts (default all "
                        f"{len(CONCEPTS)})")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("ablation-out"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    n_concepts = args.concepts or (2 if args.quick else len(CONCEPTS))
    steps = args.steps or (40 if args.quick else CONCEPT_TRAINING["steps"])
    seeds = args.seeds or (2 if args.quick else 8)
    concepts = list(CONCEPTS[:n_concepts])
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    judge, start = Judge(args.evaluator), time.monotonic()
    data = out / "data"
    if not data.exists():
        make_world_concepts(data, [c.name for c in concepts], images=12)
    result: dict = {"settings": {"concepts": [c.name for c in concepts], "train_steps": steps, "seeds": seeds,
                                 "guidance": GUIDANCE, "sampler_steps": STEPS, "preserve_prompts": PRESERVE},
                    "modes": {}}
    grid_rows: list = []
    result["base_kept"] = measure(load_base(args.base), judge, count=BASE_PROMPTS)[0].both
    for mode in ("edlora", "lora"):
        packages = []
        for k, concept in enumerate(concepts):
            pkg = out / mode / concept.name
            if not pkg.exists():
                print(f"[{time.monotonic() - start:5.0f} s] training {mode} {concept.name} ({steps} steps)", flush=True)
                train_concept(args.base, data / concept.name, list(concept.words), concept.class_word, pkg,
                              TrainConfig(**{**CONCEPT_TRAINING, "steps": steps, "preview": "none", "seed": k,
                                             "checkpoint_every": 0, "layerwise": mode == "edlora"}),
                              show_progress=False)
                compute_stats(load_base(args.base), pkg, samples=4, steps=STEPS, seed=k, show_progress=False)
            packages.append(pkg)
        print(f"[{time.monotonic() - start:5.0f} s] sampling the {mode} single-client models", flush=True)
        singles = {c.name: single_client(judge, args.base, p, c, seeds, grid_rows) for c, p in zip(concepts, packages)}
        fused = {}
        for method, (how, preserve) in METHODS.items():
            folder = out / mode / f"fused-{method}"
            print(f"[{time.monotonic() - start:5.0f} s] {mode}: fusing by {method} and sampling", flush=True)
            report = fuse(args.base, packages, folder, method=how, preserve=preserve, show_progress=False,
                          preserve_prompts=ordinary_prompts(PRESERVE) if preserve else None) \
                if not folder.exists() else json.loads((folder / "fusion_report.json").read_text())
            measures = fused_measures(judge, folder, [c.name for c in concepts], seeds)
            measures["retention"] = {n: measures["presence"][n] / singles[n]["presence"] if singles[n]["presence"]
                                     else None for n in singles}
            measures["identity_loss"] = {n: report["concepts"][n]["mean"].get("fused") for n in singles}
            if method == "gradient" and len(concepts) >= 2:
                names = [c.name for c in concepts]
                measures["composition"] = {
                    f"{k} regional": composition(judge, folder, names[:k], seeds, True) for k in (2, 3)
                    if k <= len(names)}
                measures["composition"].update({
                    f"{k} plain": composition(judge, folder, names[:k], seeds, False) for k in (2, 3)
                    if k <= len(names)})
            fused[method] = measures
        result["modes"][mode] = {"single": singles, "fused": fused}
    result["seconds"] = round(time.monotonic() - start, 1)
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    image_grid(grid_rows, [f"{m}: {c.name}" for m in ("edlora", "lora") for c in concepts],
               ["photo"] * 4 + ["+ yellow square"] * 4).save(out / "ablation-single.png")
    print_table(result)


def print_table(result: dict) -> None:
    table = Table(title=f"ablation on the shapes base ({result['seconds']:.0f} s): presence = share of samples in "
                        "which the evaluator finds the concept")
    for column in ("mode", "concept", "single", "left", "+square", "gradient", "grad nopres", "average", "sum",
                   "retain grad", "retain avg", "id-loss grad", "leak grad"):
        table.add_column(column, justify="left" if column in ("mode", "concept") else "right")
    for mode, data in result["modes"].items():
        for name, single in data["single"].items():
            f = data["fused"]
            ret = [f[m]["retention"][name] for m in ("gradient", "average")]
            table.add_row(mode, name, f"{single['presence']:.2f}", f"{single['left']:.2f}",
                          f"{single['pair_square']:.2f}", *[f"{f[m]['presence'][name]:.2f}" for m in
                                                           ("gradient", "gradient-nopres", "average", "sum")],
                          *["-" if r is None else f"{r:.2f}" for r in ret],
                          f"{f['gradient']['identity_loss'][name]:.3f}", f"{f['gradient']['leakage'][name]:.2f}")
    Console(width=200).print(table)
    for mode, data in result["modes"].items():
        print(f"{mode} base kept (single-object prompts naming no concept, colour and shape both right; the base "
              f"itself {result['base_kept']:.2f}): " + ", ".join(f"{m} {data['fused'][m]['base_kept']:.2f}"
                                                               for m in METHODS))
    for mode, data in result["modes"].items():
        comp = data["fused"]["gradient"].get("composition", {})
        print(f"{mode} composition (every concept in its own box): " +
              ", ".join(f"{k} {v:.2f}" for k, v in comp.items()))


if __name__ == "__main__":
    main()
