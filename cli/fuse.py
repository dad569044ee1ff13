from __future__ import annotations

from pathlib import Path

import typer

from cli.options import BaseConfig, Device, Dtype

NAME = "fuse"


def run(base: Path = typer.Option(None, "--base", help="base model (default with --from: the one it was fused on)"),
        base_config: Path = BaseConfig,
        concept: list[Path] = typer.Option(None, "--concept", help="a concept package (repeat for each)"),
        out: Path = typer.Option(..., "--out", help="FUSED folder to create"),
        method: str = typer.Option("gradient", "--method", help="gradient | average | sum"),
        lam: float = typer.Option(None, "--lam", help="regulariser, relative to the mean eigenvalue of S "
                                                      "(docs/fusion.md); default 1e-4"),
        preserve: int = typer.Option(0, "--preserve", help="add the Gram of N generic prompts with target W0"),
        from_dir: Path = typer.Option(None, "--from", help="update this FUSED folder instead of starting afresh"),
        add: list[Path] = typer.Option(None, "--add", help="with --from: a package to add"),
        remove: list[str] = typer.Option(None, "--remove", help="with --from: a concept name to withdraw"),
        kv_rows: str = typer.Option("all", "--kv-rows", help="text positions whose features fuse cross-attention "
                                                            "k/v: all (default) or concept (concept + end tokens)"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Fuse concept packages into one model in closed form (or add/withdraw concepts of a fused model)."""
    from rich.console import Console

    from server.fuse import fuse
    from server.report import table_of
    from shared.device import parse_device, parse_dtype
    from shared.errors import UserError
    from shared.fusion import DEFAULT_LAM

    packages = list(concept or []) + list(add or [])
    if add and not from_dir:
        raise UserError("--add needs --from FUSED (to fuse from scratch, use --concept)")
    if not packages and not remove:
        raise UserError("give at least one --concept PKG")
    report = fuse(base, packages, out, method, DEFAULT_LAM if lam is None else lam, preserve, parse_device(device),
                  parse_dtype(dtype), base_config, from_dir, list(remove or []), kv_rows)
    console = Console()
    console.print(table_of(report))
    console.print(f"fused model written to {out} (report: {out / 'fusion_report.png'})")
