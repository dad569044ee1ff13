from __future__ import annotations

from pathlib import Path

import typer

NAME = "export-single-file"


def run(folder: Path = typer.Argument(..., help="a diffusers SD-1.x or SDXL pipeline folder"),
        out: Path = typer.Argument(..., help="the .safetensors file to write (original LDM key layout)")) -> None:
    """Write a diffusers base folder as one original-layout checkpoint that from_single_file reads back."""
    from rich import print

    from shared.ldm_export import export_single_file

    export_single_file(folder, out)
    print(f"wrote {out}")
