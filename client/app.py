"""The Flower ClientApp: on a train message, take part in the round and reply with a manifest only."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client.round import NodeSettings, take_part  # noqa: E402
from protos import mixshow_pb2 as pb  # noqa: E402


def node_settings(context: Context) -> NodeSettings:
    """This client's settings, from the SuperNode's node config (set by `mixshow join`)."""
    return NodeSettings.from_node_config(dict(context.node_config))


def handle(msg: Message, context: Context) -> Message:
    config = pb.RoundConfig.FromString(bytes(msg.content["round"]["config"]))
    manifest = take_part(config, node_settings(context))
    return Message(RecordDict({"manifest": ConfigRecord({"pb": manifest.SerializeToString()})}), reply_to=msg)


app = ClientApp()
app.train()(handle)
