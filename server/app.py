"""The Flower ServerApp: one fusion round per run, settings from the run config."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from server.round import RoundSettings, run_round  # noqa: E402


def settings_from(run_config: dict) -> RoundSettings:
    cfg = dict(run_config)
    return RoundSettings(store=str(cfg["store"]), base=Path(str(cfg["base"])),
                         min_clients=int(cfg.get("min-clients", 2)), timeout=float(cfg.get("timeout", 600)),
                         wait=float(cfg.get("wait", 120)), steps=int(cfg.get("steps", 0)),
                         resolution=int(cfg.get("resolution", 0)), stats_samples=int(cfg.get("stats-samples", 0)),
                         retrain=bool(cfg.get("retrain", False)), round_id=str(cfg.get("round-id", "")))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_round(grid, settings_from(context.run_config))
