from __future__ import annotations

from pathlib import Path

import typer

from cli.options import Device, Dtype

NAME = "fidelity"


def run(model: list[Path] = typer.Option(..., "--model", help="a FUSED folder (repeat to compare methods)"),
        concept: list[Path] = typer.Option(..., "--concept", help="a concept package (repeat for each)"),
        base: Path = typer.Option(None, "--base", help="base model (default: the one the first model was fused on)"),
        seed: int = typer.Option(0, "--seed"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Per concept: ||ε_fused − ε_single|| / ||ε_single − ε_base|| on the concept's prompts (0 = identical)."""
    from rich.console import Console
    from rich.table import Table

    from sample.evaluation import fidelity
    from shared.device import parse_device, parse_dtype
    from shared.fused_model import read_concepts

    results = fidelity(model, concept, base, parse_device(device), parse_dtype(dtype), seed)
    table = Table(title="end-to-end fidelity: ||ε_fused − ε_single|| / ||ε_single − ε_base|| (lower is better)")
    table.add_column("concept")
    labels = [f"{m.name} ({read_concepts(m)['method']})" for m in model]
    for label in labels:
        table.add_column(label, justify="right")
    for name, row in results.items():
        table.add_row(name, *["-" if v != v else f"{v:.4f}" for v in row.values()])
    Console().print(table)
