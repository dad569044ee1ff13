"""The CheckpointRegistry gRPC service: list fused versions, describe one (with presigned
download URLs on S3), and stream new versions as they are published."""

from __future__ import annotations

import hmac
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos import mixshow_pb2 as pb
from protos import mixshow_pb2_grpc as pb_grpc
from shared.checkpoints import get_manifest, latest, lineage, versions
from shared.errors import InvalidArgument, UserError
from shared.storage import Store


class Registry(pb_grpc.CheckpointRegistryServicer):
    """Answers from the store itself: whatever is published there is what the registry shows."""

    def __init__(self, store: Store, poll_seconds: float = 2.0):
        self.store, self.poll = store, poll_seconds

    def ListVersions(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.ListVersionsResponse(versions=versions(self.store), latest=latest(self.store) or "",
                                       lineage=lineage(self.store))

    def GetVersion(self, request, context):  # noqa: N802
        try:
            manifest = get_manifest(self.store, request.version or "latest")
        except UserError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        for entry in [*manifest.files, *(manifest.server_files if request.with_state else [])]:
            entry.url = self.store.presigned_get(entry.key) or ""
        return manifest

    def WatchVersions(self, request, context):  # noqa: N802
        seen = request.after
        while context.is_active():
            current = latest(self.store)
            if current and current != seen:
                seen = current
                yield self.GetVersion(pb.GetVersionRequest(version=current), context)
            time.sleep(self.poll)


@dataclass(frozen=True)
class RegistrySecurity:
    """TLS for the registry (certificate + key, PEM), and who may list and pull: holders of a client
    certificate signed by `client_ca` (mutual TLS), and/or callers presenting `token` (a bearer token)."""

    certfile: Path
    keyfile: Path
    client_ca: Path | None = None
    token: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: Path, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read the registry's {what} {path}: {exc.strerror or exc}") from exc

        pair = [(read(self.keyfile, "key"), read(self.certfile, "certificate"))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(pair, root_certificates=read(self.client_ca, "client CA"),
                                           require_client_auth=True)


class TokenCheck(grpc.ServerInterceptor):
    """Refuse every call that does not carry `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid registry token is required")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)
        self.deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self.expected):
            return continuation(handler_call_details)
        return self.deny_stream if handler_call_details.method.endswith("WatchVersions") else self.deny


def serve(store: Store, port: int, host: str = "127.0.0.1", poll_seconds: float = 2.0,
          security: RegistrySecurity | None = None) -> grpc.Server:
    """Start the registry on host:port (port 0: any free port, see server.mixshow_port), over TLS with
    `security` (plain text without: loopback and tests; the CLI asks for --insecure).

    The port must be free: SO_REUSEPORT is off, so a second registry on the same port is refused
    instead of silently sharing it.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument("port", f"{port} is not a TCP port (0-65535)")
    interceptors = [TokenCheck(security.token)] if security and security.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)],
                         interceptors=interceptors)
    pb_grpc.add_CheckpointRegistryServicer_to_server(Registry(store, poll_seconds), server)
    try:
        if security is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", security.credentials())
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise InvalidArgument("port", f"cannot listen on {host}:{port} (in use, or not an address of this machine)")
    server.mixshow_port = bound
    server.start()
    return server
