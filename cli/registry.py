from __future__ import annotations

import typer

NAME = "registry"


def run(store: str = typer.Option(..., "--store", help="s3://bucket/prefix or file:///path"),
        port: int = typer.Option(50051, "--port"), host: str = typer.Option("0.0.0.0", "--host")) -> None:
    """Serve the CheckpointRegistry gRPC service over a store (list, get, watch fused versions)."""
    from rich import print

    from server.registry import serve
    from shared.storage import open_store

    server = serve(open_store(store), port, host)
    print(f"registry for {store} on {host}:{server.mixshow_port}")
    server.wait_for_termination()
