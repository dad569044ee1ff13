from __future__ import annotations

from pathlib import Path

import typer

from cli.options import BaseConfig, Device

NAME = "fuse"


def run(base: Path = typer.Option(None, "--base", help="base model (default with --from: the one it was fused on)"),
        base_config: Path = BaseConfig,
        concept: list[Path] = typer.Option(None, "--concept", help="a concept package (repeat for each)"),
        out: Path = typer.Option(..., "--out", help="FUSED folder to create"),
        method: str = typer.Option("gradient", "--method", help="gradient | average | sum"),
        lam: float = typer.Option(None, "--lam", help="regulariser, relative to the mean eigenvalue of S "
                                                      "(docs/fusion.md); default 1e-4"),
        preserve: int = typer.Option(None, "--preserve", help="add the Grams of N preservation prompts through the "
                                                             "base, with target W0 (default: 0, or every prompt of "
                                                             "--preserve-prompts)"),
        preserve_prompts: Path = typer.Option(None, "--preserve-prompts", help="a UTF-8 file of preservation "
                                              "prompts, one per line (default: 8 generic ones, docs/fusion.md)"),
        from_dir: Path = typer.Option(None, "--from", help="update this FUSED folder instead of starting afresh"),
        add: list[Path] = typer.Option(None, "--add", help="with --from: a package to add"),
        remove: list[str] = typer.Option(None, "--remove", help="with --from: a concept name to withdraw"),
        kv_rows: str = typer.Option("all", "--kv-rows", help="text positions whose features fuse cross-attention "
                                                            "k/v: all (default) or concept (concept + end tokens)"),
        lora_dtype: str = typer.Option("float16", "--lora-dtype", help="fused_lora.safetensors: float16 (default) "
                                                                      "| float32 | bfloat16"),
        dtype: str = typer.Option(None, "--dtype", help="the fused folder's weights: float16 | bfloat16 | float32 "
                                                        "(default: the dtype the base is stored in)"),
        device: str = Device) -> None:
    """Fuse concept packages into one model in closed form (or add/withdraw concepts of a fused model)."""
    from rich.console import Console

    from server.fuse import fuse
    from server.preservation import read_prompt_file
    from server.report import table_of
    from shared.device import parse_device, parse_dtype
    from shared.errors import UserError
    from shared.fusion import DEFAULT_LAM

    packages = list(concept or []) + list(add or [])
    if add and not from_dir:
        raise UserError("--add needs --from FUSED (to fuse from scratch, use --concept)")
    if not packages and not remove:
        raise UserError("give at least one --concept PKG")
    prompts = read_prompt_file(preserve_prompts) if preserve_prompts is not None else None
    if preserve is None:
        preserve = len(prompts) if prompts else 0
    report = fuse(base, packages, out, method, DEFAULT_LAM if lam is None else lam, preserve, parse_device(device),
                  base_config=base_config, from_dir=from_dir, remove=list(remove or []), kv_rows=kv_rows,
                  out_dtype=None if dtype is None else parse_dtype(dtype),
                  lora_dtype=parse_dtype(lora_dtype, "lora_dtype"), preserve_prompts=prompts)
    console = Console()
    console.print(table_of(report))
    console.print(f"fused model written to {out} (report: {out / 'fusion_report.png'})")
