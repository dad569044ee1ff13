from __future__ import annotations

from pathlib import Path

import typer

NAME = "make-toy-concepts"


def run(out: Path = typer.Argument(..., help="folder to create"),
        n: int = typer.Option(3, "--n", help="number of concepts"),
        images: int = typer.Option(6, "--images", help="images per concept"),
        size: int = typer.Option(64, "--size", help="image side in pixels"),
        seed: int = typer.Option(0, "--seed")) -> None:
    """Write N visibly distinct toy concept folders (image + <TOK> caption + mask) and concepts.json."""
    from rich import print

    from fixtures.toy_concepts import make_toy_concepts

    for c in make_toy_concepts(out, n, images, size, seed):
        print(f"{out / c['folder']}: {c['colour']} {c['texture']} {c['shape']}  words {' '.join(c['words'])}  "
              f"class {c['class_word']}")
