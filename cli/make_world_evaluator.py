from __future__ import annotations

from pathlib import Path

import typer

NAME = "make-world-evaluator"


def run(out: Path = typer.Option(..., "--out", help="folder to create (evaluator.safetensors)"),
        steps: int = typer.Option(3000, "--steps"), batch_size: int = typer.Option(64, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
        workers: int = typer.Option(2, "--workers", help="processes rendering the training batches (0: this one); "
                                                         "the weights do not depend on it")) -> None:
    """Train the shapes world's evaluator (concept / shape / colour of an image or a box) on renders, most of
    them degraded as generated images are."""
    from rich import print

    from shared.atomic import check_fresh_output
    from world.evaluator import train_evaluator

    check_fresh_output(out, "out")
    record = train_evaluator(out, steps, batch_size, seed=seed, workers=workers)
    accuracy = ", ".join(f"{k} {v:.1%}" for k, v in record["accuracy"].items())
    degraded = ", ".join(f"{k} {v:.1%}" for k, v in record["accuracy_degraded"].items())
    print(f"evaluator written to {out} in {record['seconds']:.0f} s; held-out accuracy on clean renders: {accuracy}; "
          f"on degraded renders: {degraded}")
