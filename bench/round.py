"""Rounds with many clients: Flower's simulation runtime, the tiny base, a few training steps per client.

    python bench/round.py [--clients 5 20 50] [--steps 4]

For each N (each in a fresh process), one round of N virtual SuperNodes (each trains its own concept,
records its Grams and uploads to a file:// store) and the server's part (verify every upload, fuse, publish).
Prints the round's wall time, the time of the server's own work, and the server's peak memory during that
work above the process's resident size just before it (sampled every 20 ms; the simulation runs the
ServerApp in this process, the clients in Ray workers). The server's memory should not grow with N beyond
its per-site fusion state: Grams are read one concept at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sampler(threading.Thread):
    """Resident memory of this process, every 20 ms: (monotonic time, MiB)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            self.samples.append((time.monotonic(), rss_mib()))
            time.sleep(0.02)


def child(n: int, steps: int, work: Path) -> dict:
    import server.round as rounds
    from cli.simulation import run_demo_round
    from fixtures.tiny_base import make_tiny_base
    from fixtures.toy_concepts import make_toy_concepts
    from server.settings import RoundSettings

    base = make_tiny_base(work / "tiny-sd")
    make_toy_concepts(work / "toys", 1, images=4, size=64)
    data = next(p for p in (work / "toys").iterdir() if p.is_dir())
    training = work / "client-training.yaml"
    training.write_text("lr_unet: 1.0e-3\nlr_text: 1.0e-4\ntemplates: ['photo of a {}']\n")
    nodes = [{"name": f"client-{i:02d}", "data-dir": str(data), "words": f"<c{i:02d}a> <c{i:02d}b>",
              "class-word": "toy", "base": str(base), "work-dir": str(work / "clients" / f"c{i:02d}"),
              "train-config": str(training)} for i in range(n)]
    settings = RoundSettings.from_config({"store": f"file://{work / 'store'}", "base": str(base), "min-clients": n,
                                          "wait": 300, "timeout": 7200, "steps": steps, "resolution": 64,
                                          "stats-samples": 1})
    marks: dict[str, float] = {}
    original = rounds.Changes.take

    def take(self, *args, **kwargs):  # the server's work starts with the first reply it checks
        marks.setdefault("server_start", time.monotonic())
        return original(self, *args, **kwargs)

    rounds.Changes.take = take
    sampler = Sampler()
    sampler.start()
    start = time.monotonic()
    result = run_demo_round(settings, nodes, work)
    end = time.monotonic()
    sampler.running = False
    sampler.join()
    begin = marks.get("server_start", end)
    before = [mib for t, mib in sampler.samples if t < begin]
    during = [mib for t, mib in sampler.samples if t >= begin]
    return {"clients": n, "published": result["published"], "wall_s": round(end - start, 1),
            "server_s": result.get("server_seconds", {}), "rss_before_mib": round(before[-1] if before else 0, 1),
            "peak_above_mib": round(max(during, default=0) - (before[-1] if before else 0), 1),
            **state_bytes(work / "store")}


def state_bytes(store: Path) -> dict:
    """MiB of the published fusion state's per-site sums S (independent of N) and of its per-concept terms
    (each concept's LoRA factors and A·Ĝ rows, float64: what an incremental fusion must keep, O(N)), and of the
    published fused LoRA (rank N·r)."""
    from safetensors import safe_open

    from shared.fused_model import LORA_FILE, STATE_FILE

    sizes = {"state_S_mib": 0.0, "state_terms_mib": 0.0, "fused_lora_mib": 0.0}
    states = sorted(store.rglob(STATE_FILE))
    if states:
        with safe_open(str(states[-1]), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                part = f.get_slice(key)
                kind = "state_S_mib" if key.startswith("S.") else "state_terms_mib"
                sizes[kind] += math.prod(part.get_shape()) * ITEM_BYTES[part.get_dtype()] / 2**20
    loras = sorted(store.rglob(LORA_FILE))
    if loras:
        sizes["fused_lora_mib"] = loras[-1].stat().st_size / 2**20
    return {k: round(v, 2) for k, v in sizes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.work)), flush=True)
        return
    for n in args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([sys.executable, __file__, "--child", str(n), "--steps", str(args.steps), "--work",
                                  tmp], capture_output=True, text=True, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{n} clients: the round failed\n{run.stdout[-1500:]}\n{run.stderr[-1500:]}")
                continue
            r = json.loads(line[len("RESULT "):])
            work = sum(r["server_s"].values())
            print(f"{n:3d} clients, {args.steps} steps each: round {r['wall_s']:.0f} s wall; server's own work "
                  f"{work:.1f} s (verify {r['server_s'].get('verify', 0):.1f} + fuse {r['server_s'].get('fuse', 0):.1f}"
                  f" + publish {r['server_s'].get('publish', 0):.1f}); server peak memory +{r['peak_above_mib']:.0f} "
                  f"MiB over {r['rss_before_mib']:.0f} MiB resident before its work; published {r['published']}; "
                  f"its fusion state: per-site sums {r['state_S_mib']:.1f} MiB, per-concept terms "
                  f"{r['state_terms_mib']:.1f} MiB ({1024 * r['state_terms_mib'] / n:.0f} KiB per client); fused "
                  f"LoRA {r['fused_lora_mib']:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
