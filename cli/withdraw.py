from __future__ import annotations

from pathlib import Path

import typer

NAME = "withdraw"


def run(name: str = typer.Option(..., "--name", help="this client's name (its concept's name), as given to join"),
        work_dir: Path = typer.Option(Path.home() / ".mixshow" / "client", "--work-dir",
                                      help="the client's work folder, as given to join"),
        undo: bool = typer.Option(False, "--undo", help="take the withdrawal back (the next round adds the concept "
                                                        "again)")) -> None:
    """Withdraw this client's concept from the federation: at the next round the client replies that it
    withdraws, and the server removes the concept (only a concept this node itself contributed)."""
    from rich import print

    from client.round import withdrawal_marker
    from shared.atomic import write_bytes_atomic

    marker = withdrawal_marker(work_dir, name)
    if undo:
        marker.unlink(missing_ok=True)
        print(f"{name}: withdrawal taken back; the next round adds the concept again")
        return
    write_bytes_atomic(marker, b"withdrawn\n")
    print(f"{name}: withdrawn; the next round removes the concept (the SuperNode must take part in it)")
