"""What the kohya / textual-inversion export keeps of each concept, on the shapes base, judged by the evaluator.

    python bench/export_fidelity.py [--packages ablation-out/edlora] [--seeds 16] [--out export-out]

Fuses the ED-LoRA packages (trained by bench/ablation.py, or trained here when missing), then samples each
concept's prompt "a photo of a <C>" three ways with the same seeds (DPM-Solver++ 20 steps, guidance 4):
mixshow's own layer-wise sampling of the fused model, and plain diffusers (`StableDiffusionPipeline` of the
base + `load_lora_weights` of the kohya export + `load_textual_inversion`) with each word's layer tokens
collapsed by their mean and by the middle layer's. Prints the share of samples in which the evaluator finds
the concept, per concept and way; writes export-fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: E402

from server.fuse import fuse  # noqa: E402
from shared.fused_model import expand_prompt, load_fused  # noqa: E402
from shared.sampling import generate  # noqa: E402
from world.concepts import CONCEPTS  # noqa: E402
from world.evaluator import Judge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, GUIDANCE = 20, 4.0


def plain_diffusers(base: Path, export: Path, names: list[str], seeds: int) -> dict[str, list]:
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(export), weight_name="lora.safetensors")
    out = {}
    for name in names:
        pipe.load_textual_inversion(str(export / "embeddings" / f"{name}.safetensors"), token=f"<{name}>")
        images = []
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(1000 + seed)
            images += pipe(f"a photo of a <{name}>", num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64,
                           width=64, generator=generator).images
        out[name] = images
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "shapes-base")
    parser.add_argument("--evaluator", type=Path, default=ROOT / "assets" / "world-evaluator")
    parser.add_argument("--packages", type=Path, default=Path("ablation-out") / "edlora")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("export-out"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    judge = Judge(args.evaluator)
    names = [c.name for c in CONCEPTS if (args.packages / c.name / "stats.safetensors").is_file()]
    packages = [args.packages / n for n in names]
    if not names:
        raise SystemExit(f"packages with stats not found under {args.packages}: run bench/ablation.py first")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    fused = args.packages / "fused-gradient"  # the ablation's own gradient fusion of these packages, if there
    if not (fused / "concepts.json").is_file():
        fused = args.out / "fused"
        if not fused.exists():
            fuse(args.base, packages, fused, show_progress=False)
    base, encoder, records = load_fused(fused)
    rows: dict[str, dict[str, float]] = {n: {} for n in names}
    for name in names:
        images = []
        for seed in range(args.seeds):
            images += generate(base, encoder, [expand_prompt(f"a photo of a <{name}>", records)], seed=1000 + seed,
                               steps=STEPS, guidance=GUIDANCE, height=64, width=64)
        rows[name]["mixshow layer-wise"] = sum(v["concept"] == name for v in judge.labels(images)) / len(images)
    for how in ("mean", "middle"):
        export = args.out / f"kohya-{how}"
        if not export.exists():
            subprocess.run([sys.executable, "-m", "cli", "export", "--model", str(fused), "--format", "kohya",
                            "--collapse", how, "--out", str(export)], check=True, cwd=ROOT)
        for name, images in plain_diffusers(args.base, export, names, args.seeds).items():
            found = sum(v["concept"] == name for v in judge.labels(images))
            rows[name][f"diffusers + kohya, {how}"] = found / len(images)
    columns = list(next(iter(rows.values())))
    print(f"concept presence (evaluator), {args.seeds} seeds, 'a photo of a <C>', DPM-Solver++ {STEPS} steps, "
          f"guidance {GUIDANCE}, {len(names)} concepts fused by gradient fusion ({fused}):")
    print(f"{'concept':14s}" + "".join(f"{c:>28s}" for c in columns))
    for name, row in rows.items():
        print(f"{name:14s}" + "".join(f"{row[c]:>28.2f}" for c in columns))
    means = {c: sum(r[c] for r in rows.values()) / len(rows) for c in columns}
    print(f"{'mean':14s}" + "".join(f"{means[c]:>28.2f}" for c in columns))
    (args.out / "export-fidelity.json").write_text(json.dumps({"rows": rows, "means": means, "seeds": args.seeds},
                                                              indent=1))


if __name__ == "__main__":
    main()
