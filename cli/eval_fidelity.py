from __future__ import annotations

from pathlib import Path

import typer

from cli.options import Device, Dtype

NAME = "fidelity"


def run(model: list[Path] = typer.Option(..., "--model", help="a FUSED folder (repeat to compare methods)"),
        concept: list[Path] = typer.Option(..., "--concept", help="a concept package (repeat for each)"),
        base: Path = typer.Option(None, "--base", help="base model (default: the one the first model was fused on)"),
        seed: int = typer.Option(0, "--seed", help="0 .. 2^32-1"),
        json_out: Path = typer.Option(None, "--json", help="also write the ratios here (null where a model lacks "
                                                           "the concept)"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Per concept: ||ε_fused − ε_single|| / ||ε_single − ε_base|| on the concept's prompts (0 = identical)."""
    from rich.console import Console
    from rich.table import Table

    from sample.evaluation import fidelity, unique_labels
    from shared.atomic import write_bytes_atomic
    from shared.device import parse_device, parse_dtype
    from shared.errors import UserError
    from shared.fused_model import read_concepts
    from shared.sampling import check_setting
    from shared.validate import dumps_json

    check_setting("seed", seed)
    if json_out is not None and json_out.is_dir():
        raise UserError(f"--json {json_out} is a folder: give the path of the JSON file to write")
    labels = [f"{label} ({read_concepts(m)['method']})" for label, m in zip(unique_labels(model), model)]
    results = fidelity(model, concept, base, parse_device(device), parse_dtype(dtype), seed)
    table = Table(title="end-to-end fidelity: ||ε_fused − ε_single|| / ||ε_single − ε_base|| (lower is better)",
                  caption="-: the model does not hold this concept")
    table.add_column("concept")
    for label in labels:
        table.add_column(label, justify="right")
    for name, row in results.items():
        table.add_row(name, *["-" if v != v else f"{v:.4f}" for v in row.values()])
    Console().print(table)
    if json_out is not None:
        data = {"models": {label: str(m) for label, m in zip(unique_labels(model), model)}, "ratios": results}
        write_bytes_atomic(json_out, dumps_json(data, indent=2).encode())
        Console().print(f"wrote {json_out}")
