"""The two Flower messages of a round, in one place: the server's RoundConfig to each client and the
client's ConceptManifest back. Both are protobuf bytes inside a ConfigRecord."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from google.protobuf.message import DecodeError

from protos import mixshow_pb2 as pb
from shared.errors import UserError


def round_message(config: pb.RoundConfig, node: int) -> Message:
    content = RecordDict({"round": ConfigRecord({"config": config.SerializeToString()})})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def read_round_config(msg: Message) -> pb.RoundConfig:
    try:
        return pb.RoundConfig.FromString(bytes(msg.content["round"]["config"]))
    except (KeyError, TypeError, DecodeError) as exc:
        raise UserError(f"the server's round message does not hold a RoundConfig ({exc})") from exc


def manifest_reply(manifest: pb.ConceptManifest, msg: Message) -> Message:
    return Message(RecordDict({"manifest": ConfigRecord({"pb": manifest.SerializeToString()})}), reply_to=msg)


def read_manifest_reply(reply: Message) -> pb.ConceptManifest:
    try:
        return pb.ConceptManifest.FromString(bytes(reply.content["manifest"]["pb"]))
    except (KeyError, TypeError, DecodeError) as exc:
        raise UserError(f"the client's reply does not hold a ConceptManifest ({exc})") from exc
