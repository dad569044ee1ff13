"""The embedded default: a whole federation on one machine through Flower's simulation runtime.

Three virtual SuperNodes each train one toy concept and compute its Grams, upload to a
file:// store, and reply with manifests; the ServerApp verifies, fuses and publishes; then
the fused version is pulled back and sampled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.round import NodeSettings, take_part
from server.round import RoundSettings, run_round
from shared.errors import UserError
from shared.round_messages import manifest_reply, read_round_config


def demo_apps(settings: RoundSettings, nodes: list[dict], outcome_file: Path) -> tuple[ServerApp, ClientApp]:
    """A ServerApp running one round with `settings`, and a ClientApp whose node i is `nodes[i]`."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome = run_round(grid, settings)
        outcome_file.write_text(json.dumps({"published": outcome.published, "clients": outcome.clients,
                                            "round_id": outcome.round_id, "server_seconds": outcome.seconds}))

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        node = NodeSettings.from_node_config(nodes[int(context.node_config["partition-id"])])
        return manifest_reply(take_part(read_round_config(msg), node), msg)

    return server_app, client_app


def run_demo_round(settings: RoundSettings, nodes: list[dict], work: Path) -> dict:
    """Run one round in Flower's simulation runtime (Ray backend); return the round's outcome."""
    from flwr.simulation import run_simulation

    outcome_file = work / "round-outcome.json"
    outcome_file.unlink(missing_ok=True)
    server_app, client_app = demo_apps(settings, nodes, outcome_file)
    start = time.time()
    run_simulation(server_app, client_app, num_supernodes=len(nodes),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    if not outcome_file.is_file():
        raise UserError("the simulated round did not finish (see the log above)")
    result = json.loads(outcome_file.read_text())
    result["seconds"] = round(time.time() - start, 1)
    return result
