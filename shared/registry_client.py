"""The client side of the CheckpointRegistry gRPC service: a version's manifest, with download URLs."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from protos import mixshow_pb2 as pb
from protos import mixshow_pb2_grpc as pb_grpc
from shared.errors import UserError


def fetch_manifest(address: str, version: str = "latest", timeout: float = 10.0) -> pb.FusedManifest:
    """A version's manifest from a registry at host:port, as a UserError when it cannot be had."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"registry address {address!r} must be HOST:PORT")
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CheckpointRegistryStub(channel)
        try:
            return stub.GetVersion(pb.GetVersionRequest(version=version), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise UserError(f"registry {address}: {exc.details()}") from exc
            if exc.code() == grpc.StatusCode.INTERNAL and "parse" in (exc.details() or "").lower():
                raise UserError(f"registry {address} answered with a message that does not decode") from exc
            raise UserError(f"registry {address} unreachable: {exc.code().name} {exc.details()}") from exc
        except DecodeError as exc:
            raise UserError(f"registry {address} answered with a message that does not decode ({exc})") from exc
