"""The `mixshow` command: one verb per module in cli/, user errors printed on one line with exit code 2."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import click  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.text import Text  # noqa: E402

from cli import (  # noqa: E402
    demo,
    eval_clip,
    eval_concepts,
    eval_fidelity,
    export,
    export_single_file,
    fuse,
    import_lora,
    join,
    launch_round,
    make_shapes_base,
    make_tiny_base,
    make_toy_concepts,
    make_world_concepts,
    make_world_evaluator,
    pull,
    registry,
    sample,
    stats,
    train,
    withdraw,
)
from shared.errors import InvalidArgument, UserError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated multi-concept customization of Stable Diffusion (Mix-of-Show).")
VERBS = (demo, make_tiny_base, make_shapes_base, make_world_evaluator, make_world_concepts, make_toy_concepts,
         export_single_file, export, import_lora, train, stats, fuse, sample, join, launch_round, withdraw, pull,
         registry)
for module in VERBS:
    app.command(module.NAME, help=module.run.__doc__)(module.run)
evaluate = typer.Typer(no_args_is_help=True, help="Evaluate fused models.")
for module in (eval_fidelity, eval_clip, eval_concepts):
    evaluate.command(module.NAME, help=module.run.__doc__)(module.run)
app.add_typer(evaluate, name="eval")

err = Console(stderr=True, highlight=False, soft_wrap=True)
FLAGS = {"from_dir": "--from", "lora_weight": "--lora-scale", "json_out": "--json", "packing": "--pack",
         "kv_rows": "--kv-rows", "format": "--format", "base_config": "--base-config", "class_word": "--class-word",
         "sample_prompts": "--preview-prompts", "sample_steps": "--preview-steps", "sample_scales": "--preview-scales"}


def flag(argument: str) -> str:
    """The command-line flag of a library argument."""
    return FLAGS.get(argument, "--" + argument.replace("_", "-"))


def message(exc: UserError) -> str:
    text = f"{flag(exc.argument)}: {exc.message}" if isinstance(exc, InvalidArgument) else str(exc)
    return " ".join(text.splitlines())


def fail(text: str, code: int = 2) -> None:
    """One line on stderr, printed literally (no markup is interpreted in `text`), then exit."""
    err.print(Text.assemble(("error:", "bold red"), " ", text))
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a UserError or a usage error is one `error:` line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        fail(message(exc))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message())
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print(Text("interrupted: rerun the same command to resume from the last checkpoint", style="yellow"))
        sys.exit(130)


if __name__ == "__main__":
    main()
