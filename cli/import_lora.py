from __future__ import annotations

from pathlib import Path

import typer

from cli.options import Base, BaseConfig, words_list

NAME = "import-lora"


def run(file: Path = typer.Argument(..., help="a LoRA .safetensors (kohya / AUTOMATIC1111 / Civitai, or diffusers / "
                                              "PEFT keys), or a folder holding one"),
        base: Path = Base, base_config: Path = BaseConfig,
        trigger: str = typer.Option(..., "--trigger", help="the concept's words, new to the base, e.g. '<ohwx>'"),
        class_word: str = typer.Option(..., "--class-word", help="one-token class word, e.g. dog"),
        name: str = typer.Option(..., "--name", help="the package's (concept's) name"),
        out: Path = typer.Option(..., "--out", help="package folder to create")) -> None:
    """Turn an existing LoRA into a plain-LoRA concept package (then `mixshow stats` and fuse it)."""
    from rich import print

    from client.imported import import_lora
    from shared.atomic import check_fresh_output

    check_fresh_output(out, "out")
    pkg, report = import_lora(file, base, words_list(trigger), class_word, name, out, base_config)
    worst = sorted(report.dropped.items(), key=lambda kv: -kv[1])[:3]
    dropped = (f"; dropped {len(report.dropped)} layers mixshow does not fuse, {report.dropped_share:.1%} of the "
               f"LoRA's update norm (largest: {', '.join(f'{m} {s:.1%}' for m, s in worst)})") if report.dropped else ""
    print(f"package written to {pkg}: {report.kept} attention layers at rank {report.rank}{dropped}. Next: "
          f"mixshow stats --base BASE --concept {pkg}")
