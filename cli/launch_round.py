from __future__ import annotations

from pathlib import Path

import typer

NAME = "round"


def run(superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink"),
        store: str = typer.Option(..., "--store", help="s3://bucket/prefix or file:///path"),
        base: Path = typer.Option(..., "--base", help="the base model, as the server sees it"),
        min_clients: int = typer.Option(None, "--min-clients", help="fewest valid packages that make a version"),
        timeout: float = typer.Option(None, "--timeout", help="seconds to wait for the clients' replies"),
        wait: float = typer.Option(None, "--wait", help="seconds to wait for --min-clients nodes to connect"),
        steps: int = typer.Option(None, "--steps", help="training steps per client (0: the clients' default)"),
        resolution: int = typer.Option(None, "--resolution", help="training resolution (0: the clients' default)"),
        stats_samples: int = typer.Option(None, "--stats-samples", help="images sampled per client for its Grams "
                                                                       "(0: the clients' default)"),
        retrain: bool = typer.Option(None, "--retrain/--reuse", help="clients retrain even if they have a package"),
        max_upload_mb: float = typer.Option(None, "--max-upload-mb", help="refuse a client's file over this size "
                                                                          "before downloading it (default 1024)"),
        remove: list[str] = typer.Option(None, "--remove", help="a concept to remove at this round (repeat for "
                                                                "each); the latest version must hold it"),
        signing_key: Path = typer.Option(None, "--signing-key", help="Ed25519 private key (PEM) that signs the "
                                                                     "published version (deploy/make-certs.sh)"),
        preserve_prompts: Path = typer.Option(None, "--preserve-prompts", help="prompts (a file, one per line, "
                                              "read by the ServerApp) the federation's first fusion keeps the "
                                              "base's behaviour on"),
        root_cert: Path = typer.Option(None, "--root-cert", help="CA certificate of the SuperLink's TLS"),
        insecure: bool = typer.Option(False, "--insecure", help="plain-text connection (tests, loopback)")) -> None:
    """Launch a fusion round on a SuperLink and follow it to the end. Settings not given come from the app's
    pyproject.toml ([tool.flwr.app.config])."""
    from rich import print

    from server.launch import launch_round
    from server.settings import RoundSettings
    from shared.storage import open_store

    given = {"store": store, "base": str(Path(base).resolve()), "min-clients": min_clients, "timeout": timeout,
             "wait": wait, "steps": steps, "resolution": resolution, "stats-samples": stats_samples,
             "retrain": retrain, "signing-key": str(signing_key.resolve()) if signing_key else None,
             "max-upload-mb": max_upload_mb, "remove": ",".join(remove) if remove else None,
             "preserve-prompts": str(preserve_prompts.resolve()) if preserve_prompts else None}
    given = {k: v for k, v in given.items() if v is not None}
    settings = RoundSettings.from_config(given)  # checked here, before anything starts
    open_store(store)  # a wrong store fails here, not inside the round
    record = launch_round(superlink, given, root_cert, insecure, timeout=settings.wait + settings.timeout + 600)
    print(f"round finished: {record['status']}")
