from __future__ import annotations

from pathlib import Path

import typer

NAME = "pull"


def run(out: Path = typer.Option(..., "--out", help="folder to create"),
        store: str = typer.Option(None, "--store", help="s3://bucket/prefix or file:///path"),
        registry: str = typer.Option(None, "--registry", help="HOST:PORT of a mixshow registry"),
        version: str = typer.Option("latest", "--version"),
        lora_only: bool = typer.Option(False, "--lora-only", help="only fused_lora.safetensors + concepts.json"),
        model_only: bool = typer.Option(False, "--model-only", help="the fused folder without fused_lora.safetensors "
                                                                     "(the folder is a whole model by itself)"),
        with_state: bool = typer.Option(False, "--with-state", help="also the fusion state (what a server needs to "
                                                                     "build later rounds on this version)"),
        trust: Path = typer.Option(None, "--trust", help="the server's version-signing public key (PEM): refuse a "
                                                         "version it did not sign"),
        registry_ca: Path = typer.Option(None, "--registry-ca", help="CA certificate of the registry's TLS"),
        registry_cert: Path = typer.Option(None, "--registry-cert", help="client certificate, if the registry asks"),
        registry_key: Path = typer.Option(None, "--registry-key", help="client key, if the registry asks"),
        registry_token_file: Path = typer.Option(None, "--registry-token-file", help="bearer token, if the registry "
                                                                                     "asks (first line of the file)"),
        insecure: bool = typer.Option(False, "--insecure", help="reach the registry in plain text (loopback, tests)")
        ) -> None:
    """Download a fused version, verifying every file's sha256; refuses a corrupt or partial version."""
    from rich import print

    from shared.checkpoints import pull, pull_from_registry
    from shared.errors import UserError
    from shared.registry_client import RegistryAccess, read_token
    from shared.signing import load_trusted_key
    from shared.storage import open_store

    if (store is None) == (registry is None):
        raise UserError("give exactly one of --store URL and --registry HOST:PORT")
    if with_state and lora_only:
        raise UserError("give --with-state or --lora-only, not both")
    if model_only and lora_only:
        raise UserError("give --model-only or --lora-only, not both")
    trusted = load_trusted_key(trust) if trust else None
    access = None
    if registry:
        if registry_ca is None and not insecure:
            raise UserError("the registry is reached over TLS: give --registry-ca CA.pem (or --insecure for a "
                            "plain-text registry on loopback)")
        if (registry_cert is None) != (registry_key is None):
            raise UserError("give --registry-cert and --registry-key together")
        access = RegistryAccess(registry_ca, registry_cert, registry_key,
                                read_token(registry_token_file) if registry_token_file else None)
    if store:
        manifest = pull(open_store(store), out, version, lora_only, with_state, trusted, model_only)
    else:
        manifest = pull_from_registry(registry, out, version, lora_only, with_state, trusted, access, model_only)
    signed = f", signature verified (key {manifest.signing_key_id})" if trusted else ""
    print(f"pulled {manifest.version} ({', '.join(manifest.concepts)}) to {out}, every sha256 verified{signed}")
