from __future__ import annotations

from pathlib import Path

import typer

NAME = "make-world-concepts"


def run(out: Path = typer.Argument(..., help="folder to create"),
        concept: list[str] = typer.Option(None, "--concept", help="a concept name (repeatable; default: all)"),
        images: int = typer.Option(12, "--images", help="images per concept (8-200)"),
        seed: int = typer.Option(0, "--seed")) -> None:
    """Write concept folders of the shapes world that its base cannot describe (new shapes, emblems), with
    <TOK> captions and true masks, plus concepts.json."""
    from rich import print

    from shared.errors import InvalidArgument
    from world.concepts import BY_NAME, make_world_concepts

    unknown = [c for c in concept or [] if c not in BY_NAME]
    if unknown:
        raise InvalidArgument("concept", f"{unknown[0]!r} is not a world concept (known: {', '.join(BY_NAME)})")
    for record in make_world_concepts(out, list(concept or []) or None, images, seed):
        print(f"{out / record['folder']}: words {' '.join(record['words'])}  class {record['class_word']}")
