"""The CheckpointRegistry gRPC service: list fused versions, describe one (with presigned
download URLs on S3), and stream new versions as they are published."""

from __future__ import annotations

import time
from concurrent import futures

import grpc

from protos import mixshow_pb2 as pb
from protos import mixshow_pb2_grpc as pb_grpc
from shared.checkpoints import get_manifest, latest, versions
from shared.errors import InvalidArgument, UserError
from shared.storage import Store


class Registry(pb_grpc.CheckpointRegistryServicer):
    """Answers from the store itself: whatever is published there is what the registry shows."""

    def __init__(self, store: Store, poll_seconds: float = 2.0):
        self.store, self.poll = store, poll_seconds

    def ListVersions(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.ListVersionsResponse(versions=versions(self.store), latest=latest(self.store) or "")

    def GetVersion(self, request, context):  # noqa: N802
        try:
            manifest = get_manifest(self.store, request.version or "latest")
        except UserError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        for entry in manifest.files:
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


def serve(store: Store, port: int, host: str = "127.0.0.1", poll_seconds: float = 2.0) -> grpc.Server:
    """Start the registry on host:port (port 0: any free port, see server.mixshow_port).

    The port must be free: SO_REUSEPORT is off, so a second registry on the same port is refused
    instead of silently sharing it.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument("port", f"{port} is not a TCP port (0-65535)")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_CheckpointRegistryServicer_to_server(Registry(store, poll_seconds), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise InvalidArgument("port", f"cannot listen on {host}:{port} (in use, or not an address of this machine)")
    server.mixshow_port = bound
    server.start()
    return server
