from __future__ import annotations

from pathlib import Path

import typer

NAME = "registry"


def run(store: str = typer.Option(..., "--store", help="s3://bucket/prefix or file:///path"),
        port: int = typer.Option(50051, "--port"), host: str = typer.Option("0.0.0.0", "--host"),
        certfile: Path = typer.Option(None, "--certfile", help="TLS certificate (PEM, e.g. deploy/certs/registry.crt)"),
        keyfile: Path = typer.Option(None, "--keyfile", help="TLS key (PEM)"),
        client_ca: Path = typer.Option(None, "--client-ca", help="require a client certificate signed by this CA"),
        token_file: Path = typer.Option(None, "--token-file", help="require this bearer token (first line of the "
                                                                    "file) to list and pull"),
        insecure: bool = typer.Option(False, "--insecure", help="serve plain text (loopback, tests)"),
        list_versions: bool = typer.Option(False, "--list", help="print the versions' lineage (parent, added, "
                                                                 "replaced, removed) and exit")) -> None:
    """Serve the CheckpointRegistry gRPC service over a store (list, get, watch fused versions), over TLS."""
    from rich import print

    from server.registry import RegistrySecurity, serve
    from shared.errors import UserError
    from shared.registry_client import read_token
    from shared.storage import open_store

    opened = open_store(store)
    if list_versions:
        from rich.console import Console

        from shared.checkpoints import lineage, lineage_table

        Console().print(lineage_table(lineage(opened), opened.url))
        return
    if (certfile is None) != (keyfile is None):
        raise UserError("give --certfile and --keyfile together")
    if certfile is None and not insecure:
        raise UserError("the registry serves over TLS: give --certfile and --keyfile (or --insecure for plain text "
                        "on loopback)")
    if certfile is None and (client_ca or token_file):
        raise UserError("--client-ca and --token-file need TLS (--certfile, --keyfile): a token sent in plain text "
                        "is no secret")
    security = RegistrySecurity(certfile, keyfile, client_ca, read_token(token_file) if token_file else None) \
        if certfile else None
    server = serve(opened, port, host, security=security)
    how = "TLS" + (", client certificates" if client_ca else "") + (", token" if token_file else "") \
        if security else "plain text"
    print(f"registry for {store} on {host}:{server.mixshow_port} ({how})")
    server.wait_for_termination()
