"""The Flower ServerApp: one fusion round per run, settings from the run config."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from server.round import run_round  # noqa: E402
from server.settings import RoundSettings  # noqa: E402

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_round(grid, RoundSettings.from_config(dict(context.run_config)))
