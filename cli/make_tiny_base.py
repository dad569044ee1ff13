from __future__ import annotations

from pathlib import Path

import typer

NAME = "make-tiny-base"


def run(out: Path = typer.Argument(..., help="folder to create"),
        seed: int = typer.Option(0, "--seed", help="weight initialisation seed"),
        arch: str = typer.Option("sd", "--arch", help="sd (SD 1.x-shaped) | sdxl (SDXL-shaped: two text encoders)"),
        dtype: str = typer.Option("float32", "--dtype", help="dtype the weights are stored in: float32 | float16 "
                                                             "(the same values either way)")) -> None:
    """Write a tiny SD-1.x- or SDXL-shaped diffusers base folder built from config (for tests and the demo)."""
    from rich import print

    from fixtures.tiny_base import make_tiny_base
    from shared.base import load_base
    from shared.device import parse_dtype

    make_tiny_base(out, seed=seed, dtype=parse_dtype(dtype), arch=arch)
    print(f"tiny {arch} base written to {out} (fingerprint {load_base(out, sdxl=True).fingerprint[:16]})")
