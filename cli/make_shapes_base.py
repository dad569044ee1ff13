from __future__ import annotations

from pathlib import Path

import typer

NAME = "make-shapes-base"


def run(out: Path = typer.Option(..., "--out", help="folder to create (the trained diffusers pipeline)"),
        steps: int = typer.Option(None, "--steps", help="UNet + text-encoder steps (default 7500)"),
        vae_steps: int = typer.Option(None, "--vae-steps", help="autoencoder steps (default 1000)"),
        decoder_steps: int = typer.Option(None, "--decoder-steps", help="decoder-only steps (default 800)"),
        minutes: float = typer.Option(None, "--minutes", help="time budget of the autoencoder and UNet phases "
                                                             "(default 52)"),
        seed: int = typer.Option(None, "--seed"),
        work: Path = typer.Option(None, "--work", help="checkpoint folder (default OUT.work); rerun to resume")
        ) -> None:
    """Train the shapes base from scratch on the shapes world (CPU, resumable) and write it as a diffusers folder."""
    import dataclasses
    import time

    from rich import print

    from shared.atomic import check_fresh_output
    from world.shapes_base import BaseTraining, make_shapes_base

    given = {"steps": steps, "vae_steps": vae_steps, "decoder_steps": decoder_steps, "minutes": minutes, "seed": seed}
    cfg = dataclasses.replace(BaseTraining(), **{k: v for k, v in given.items() if v is not None}).check()
    check_fresh_output(out, "out")
    start = time.monotonic()
    record = make_shapes_base(out, cfg, work)
    print(f"shapes base written to {out}: {record['steps']} UNet steps, final loss {record['final_loss']:.4f}, "
          f"{time.monotonic() - start:.0f} s this run")
