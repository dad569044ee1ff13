"""Regional sampling cost on the tiny base: seconds per denoising step, plain vs 1, 3 and 5 regions.

    python bench/regional.py [--size 256] [--reps 5] [--steps 4 12] [--device cpu]

Per configuration, a render at two step counts; seconds per step = (t(long) - t(short)) / (long - short),
which leaves out text encoding, VAE decoding and set-up. Configurations are interleaved within each
repetition (the machine is shared and noisy) and the median over repetitions is printed, with the
ratio to the plain pipeline. Goal: 3 regions <= 1.5x plain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fixtures.tiny_base import make_tiny_base  # noqa: E402
from sample.regional import Box  # noqa: E402
from sample.scene import Region, Scene, regional_processors, render  # noqa: E402
from shared.base import load_base  # noqa: E402
from shared.edlora import LayerwiseTextEncoder, TokenMap, cross_attention_layers  # noqa: E402

GOAL = 1.5
BOXES = (Box(0.0, 0.0, 0.5, 0.5), Box(0.0, 0.5, 0.5, 1.0), Box(0.5, 0.0, 1.0, 0.5), Box(0.5, 0.5, 1.0, 1.0),
         Box(0.25, 0.25, 0.75, 0.75))
PROMPTS = ("a red toy", "a blue ball", "a green cube", "a yellow house", "a white cat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 12), metavar=("SHORT", "LONG"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    short, long = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_base(Path(tmp) / "tiny-sd")
        base = load_base(folder, torch.device(args.device), torch.float32)
    regional_processors(base)
    encoder = LayerwiseTextEncoder(base.tokenizer, base.text_encoder, TokenMap(len(cross_attention_layers(base.unet))))
    configs = {"plain": 0, "1 region": 1, "3 regions": 3, "5 regions": 5}

    def scene(regions: int, steps: int) -> Scene:
        return Scene(prompt="a photo of a garden", negative="blurry", steps=steps, height=args.size, width=args.size,
                     regions=[Region(PROMPTS[i], BOXES[i]) for i in range(regions)])

    def timed(regions: int, steps: int) -> float:
        t = time.perf_counter()
        render(base, encoder, scene(regions, steps), output_type="latent")
        return time.perf_counter() - t

    print(f"regional bench: torch {torch.__version__}, {torch.get_num_threads()} threads, tiny base, "
          f"{args.size}x{args.size} px, DPM-Solver++, {args.reps} interleaved repetitions, per-step time from "
          f"renders of {short} and {long} steps", flush=True)
    for regions in configs.values():  # warm-up
        timed(regions, short)
    per_step: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.reps):
        for name, regions in configs.items():
            per_step[name].append((timed(regions, long) - timed(regions, short)) / (long - short))
    plain = statistics.median(per_step["plain"])
    for name, values in per_step.items():
        median = statistics.median(values)
        goal = f" | goal <= {GOAL}x: {'met' if median / plain <= GOAL else 'MISSED'}" if name == "3 regions" else ""
        print(f"{name:>9}: {median * 1e3:7.1f} ms/step (range {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}), "
              f"ratio to plain {median / plain:.2f}x{goal}", flush=True)


if __name__ == "__main__":
    main()
