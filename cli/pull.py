from __future__ import annotations

from pathlib import Path

import typer

NAME = "pull"


def run(out: Path = typer.Option(..., "--out", help="folder to create"),
        store: str = typer.Option(None, "--store", help="s3://bucket/prefix or file:///path"),
        registry: str = typer.Option(None, "--registry", help="HOST:PORT of a mixshow registry"),
        version: str = typer.Option("latest", "--version"),
        lora_only: bool = typer.Option(False, "--lora-only", help="only fused_lora.safetensors + concepts.json")
        ) -> None:
    """Download a fused version, verifying every file's sha256; refuses a corrupt or partial version."""
    from rich import print

    from shared.checkpoints import pull, pull_from_registry
    from shared.errors import UserError
    from shared.storage import open_store

    if (store is None) == (registry is None):
        raise UserError("give exactly one of --store URL and --registry HOST:PORT")
    if store:
        manifest = pull(open_store(store), out, version, lora_only)
    else:
        manifest = pull_from_registry(registry, out, version, lora_only)
    print(f"pulled {manifest.version} ({', '.join(manifest.concepts)}) to {out}, every sha256 verified")
