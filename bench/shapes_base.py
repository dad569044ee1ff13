"""Prompt adherence of the committed shapes base, judged by the committed world evaluator.

    python bench/shapes_base.py [--base assets/shapes-base] [--evaluator assets/world-evaluator] [--samples 200]

Samples seeded single-object prompts ("a red striped circle on the left") with DPM-Solver++ (20 steps by
default) and prints the share whose colour, shape and both the evaluator finds right, and the share of
"on the left/right" prompts whose object stands on that side; writes a labelled grid PNG beside.
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

from shared.base import load_base  # noqa: E402
from shared.sampling import image_grid  # noqa: E402
from world.adherence import measure  # noqa: E402
from world.evaluator import Judge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "assets" / "shapes-base")
    parser.add_argument("--evaluator", type=Path, default=ROOT / "assets" / "world-evaluator")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("shapes-base-adherence"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base, judge = load_base(args.base), Judge(args.evaluator)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for guidance in args.guidance:
        start = time.monotonic()
        result, images, prompts = measure(base, judge, args.samples, args.seed, args.steps, guidance)
        seconds = time.monotonic() - start
        results[str(guidance)] = {**result.__dict__, "seconds": round(seconds, 1)}
        print(f"guidance {guidance}: {result.samples} single-object prompts, DPM-Solver++ {args.steps} steps: colour "
              f"{result.colour:.1%}, shape {result.shape:.1%}, both {result.both:.1%}; position (left/right) "
              f"{result.position:.1%} of {result.position_samples}  ({seconds:.0f} s)")
        rows = [images[i:i + 8] for i in range(0, min(32, len(images)), 8)]
        image_grid(rows, [f"#{i}" for i in range(0, min(32, len(images)), 8)],
                   [p[:18] for p in prompts[:8]]).save(args.out / f"adherence-g{guidance}.png")
    (args.out / "adherence.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
