"""The `mixshow` command: one verb per module in cli/, user errors printed on one line with exit code 2."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from cli import (  # noqa: E402
    demo,
    eval_clip,
    eval_fidelity,
    export_single_file,
    fuse,
    join,
    launch_round,
    make_tiny_base,
    make_toy_concepts,
    pull,
    registry,
    sample,
    stats,
    train,
)
from shared.errors import UserError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated multi-concept customization of Stable Diffusion (Mix-of-Show).")
VERBS = (demo, make_tiny_base, make_toy_concepts, export_single_file, train, stats, fuse, sample, join, launch_round,
         pull, registry)
for module in VERBS:
    app.command(module.NAME, help=module.run.__doc__)(module.run)
evaluate = typer.Typer(no_args_is_help=True, help="Evaluate fused models.")
for module in (eval_fidelity, eval_clip):
    evaluate.command(module.NAME, help=module.run.__doc__)(module.run)
app.add_typer(evaluate, name="eval")

err = Console(stderr=True)


def main() -> None:
    """Entry point: run the app, turning UserError into one red line and exit code 2."""
    try:
        app()
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: rerun the same command to resume from the last checkpoint")
        sys.exit(130)


if __name__ == "__main__":
    main()
