"""The Flower ClientApp: on a train message, take part in the round and reply with a manifest only."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client.round import NodeSettings, take_part  # noqa: E402
from shared.round_messages import manifest_reply, read_round_config  # noqa: E402


def node_settings(context: Context) -> NodeSettings:
    """This client's settings, from the SuperNode's node config (set by `mixshow join`)."""
    return NodeSettings.from_node_config(dict(context.node_config))


def handle(msg: Message, context: Context) -> Message:
    return manifest_reply(take_part(read_round_config(msg), node_settings(context)), msg)


app = ClientApp()
app.train()(handle)
