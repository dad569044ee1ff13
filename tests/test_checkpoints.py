"""Publishing and pulling fused versions, and the gRPC registry in front of them."""

from __future__ import annotations

import grpc
import pytest

from protos import mixshow_pb2 as pb
from protos import mixshow_pb2_grpc as pb_grpc
from server.registry import serve
from shared.checkpoints import latest, publish, pull, versions
from shared.errors import UserError
from shared.registry_client import fetch_manifest
from shared.storage import IntegrityError, open_store


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_publish_pull_versions_and_corruption(fused_three, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    first = publish(store, fused_three["gradient"], round_id="r1")
    second = publish(store, fused_three["average"], round_id="r2")
    assert (first.version, second.version) == ("v0001", "v0002")
    assert versions(store) == ["v0001", "v0002"] and latest(store) == "v0002"
    got = pull(store, tmp_path / "pulled", "v0001")
    pulled = _tree(tmp_path / "pulled")
    pulled.pop("manifest.pb")
    assert pulled == _tree(fused_three["gradient"]) and got.concepts == ["red-circle", "blue-square", "green-triangle"]
    pull(store, tmp_path / "lora", "latest", lora_only=True)
    assert sorted(_tree(tmp_path / "lora")) == ["concepts.json", "fused_lora.safetensors", "manifest.pb"]
    with pytest.raises(UserError, match="does not exist"):
        pull(store, tmp_path / "x", "v0042")
    # bytes changed after the manifest was written: refused, nothing left behind
    target = store.root / "fused/v0002/unet/config.json"
    target.write_text(target.read_text() + " ")
    with pytest.raises(IntegrityError):
        pull(store, tmp_path / "bad", "v0002")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_incomplete_version_is_invisible(fused_three, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    publish(store, fused_three["gradient"])
    store.put_bytes("fused/v0002/unet/config.json", b"{}")  # a publish that died before its manifest
    assert versions(store) == ["v0001"] and latest(store) == "v0001"
    assert publish(store, fused_three["average"]).version == "v0003"


def test_registry_lists_gets_and_watches(fused_three, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    publish(store, fused_three["gradient"])
    server = serve(store, 0, poll_seconds=0.1)
    address = f"127.0.0.1:{server.mixshow_port}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CheckpointRegistryStub(channel)
            listed = stub.ListVersions(pb.ListVersionsRequest(), timeout=5)
            assert list(listed.versions) == ["v0001"] and listed.latest == "v0001"
            stream = stub.WatchVersions(pb.WatchVersionsRequest(after="v0001"), timeout=20)
            publish(store, fused_three["average"])
            assert next(stream).version == "v0002"
            stream.cancel()
        assert fetch_manifest(address, "latest").version == "v0002"
        with pytest.raises(UserError, match="does not exist"):
            fetch_manifest(address, "v0099")
    finally:
        server.stop(0)
    with pytest.raises(UserError, match="unreachable"):
        fetch_manifest(address, "latest", timeout=2)
