"""The client side of the CheckpointRegistry gRPC service: a version's manifest, with download URLs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from protos import mixshow_pb2 as pb
from protos import mixshow_pb2_grpc as pb_grpc
from shared.errors import UserError


@dataclass(frozen=True)
class RegistryAccess:
    """How to reach a registry: over TLS checked against `root_cert` (None: plain text, only for loopback
    and tests), with a client certificate (`certfile` + `keyfile`) and/or a bearer `token` if it asks."""

    root_cert: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    token: str | None = None

    def channel(self, address: str) -> grpc.Channel:
        if self.root_cert is None:
            return grpc.insecure_channel(address)
        pair = (read_pem(self.keyfile, "client key"), read_pem(self.certfile, "client certificate")) \
            if self.certfile else (None, None)
        creds = grpc.ssl_channel_credentials(read_pem(self.root_cert, "registry CA"), *pair)
        return grpc.secure_channel(address, creds)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def read_pem(path: Path | None, what: str) -> bytes:
    try:
        return Path(str(path)).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def read_token(path: Path) -> str:
    """A bearer token from a file (its first line); a clear error when unreadable or empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the token file {path}: {exc}") from exc
    if not token or not token[0].strip() or any(c.isspace() for c in token[0].strip()):
        raise UserError(f"token file {path} must hold one token on its first line")
    return token[0].strip()


def fetch_manifest(address: str, version: str = "latest", timeout: float = 10.0, with_state: bool = False,
                   access: RegistryAccess | None = None) -> pb.FusedManifest:
    """A version's manifest from a registry at host:port (with URLs for the fusion state too when
    `with_state`), as a UserError when it cannot be had."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"registry address {address!r} must be HOST:PORT")
    access = access or RegistryAccess()
    with access.channel(address) as channel:
        stub = pb_grpc.CheckpointRegistryStub(channel)
        try:
            return stub.GetVersion(pb.GetVersionRequest(version=version, with_state=with_state), timeout=timeout,
                                   metadata=access.metadata())
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise UserError(f"registry {address}: {exc.details()}") from exc
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise UserError(f"registry {address} refused the request: {exc.details()} (give --registry-token-file)"
                                ) from exc
            if exc.code() == grpc.StatusCode.INTERNAL and "parse" in (exc.details() or "").lower():
                raise UserError(f"registry {address} answered with a message that does not decode") from exc
            raise UserError(f"registry {address} unreachable: {exc.code().name} {exc.details()}") from exc
        except DecodeError as exc:
            raise UserError(f"registry {address} answered with a message that does not decode ({exc})") from exc
