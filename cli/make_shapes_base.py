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
        stop_at_step: int = typer.Option(None, "--stop-at-step", help="pause when the UNet phase reaches this "
                                         "step (only checkpoints are written); rerun without it to go on, "
                                         "ending with the same weights as one run straight through"),
        work: Path = typer.Option(None, "--work", help="checkpoint folder (default OUT.work); rerun to resume")
        ) -> None:
    """Train the shapes base from scratch on the shapes world (CPU, resumable) and write it as a diffusers folder."""
    import dataclasses
    import time

    from rich import print

    from shared.atomic import check_fresh_output
    from shared.validate import number
    from world.shapes_base import BaseTraining, make_shapes_base

    given = {"steps": steps, "vae_steps": vae_steps, "decoder_steps": decoder_steps, "minutes": minutes, "seed": seed}
    cfg = dataclasses.replace(BaseTraining(), **{k: v for k, v in given.items() if v is not None}).check()
    if stop_at_step is not None:
        number("stop_at_step", stop_at_step, 1, cfg.steps, integer=True)
    check_fresh_output(out, "out")
    start = time.monotonic()
    record = make_shapes_base(out, cfg, work, stop_at_step=stop_at_step)
    if record.get("paused"):
        print(f"paused at UNet step {record['steps']} of {cfg.steps}; checkpoints in {work or f'{out}.work'} "
              "(rerun the same command without --stop-at-step to go on)")
        return
    print(f"shapes base written to {out}: {record['steps']} UNet steps, final loss {record['final_loss']:.4f}, "
          f"{time.monotonic() - start:.0f} s this run")
