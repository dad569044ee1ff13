"""Publishing and pulling fused versions, and the gRPC registry in front of them."""

from __future__ import annotations

import grpc
import pytest

from protos import mixshow_pb2 as pb
from protos import mixshow_pb2_grpc as pb_grpc
from server.registry import serve
from shared.checkpoints import latest, publish, pull, versions
from shared.errors import UserError
from shared.fused_model import load_fused
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
    published = _tree(fused_three["gradient"])
    published.pop("fusion_state.safetensors")  # the server's: pulled only --with-state (tests/test_artefacts.py)
    assert pulled == published and got.concepts == ["red-circle", "blue-square", "green-triangle"]
    pull(store, tmp_path / "lora", "latest", lora_only=True)
    assert sorted(_tree(tmp_path / "lora")) == ["concepts.json", "fused_lora.safetensors", "manifest.pb"]
    pull(store, tmp_path / "model", "v0001", model_only=True)  # the folder alone is a whole model
    model = _tree(tmp_path / "model")
    model.pop("manifest.pb")
    published.pop("fused_lora.safetensors")
    assert model == published
    assert [r["name"] for r in load_fused(tmp_path / "model")[2]] == got.concepts
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


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    import subprocess
    from pathlib import Path

    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "deploy" / "make-certs.sh"), str(out),
                    "superlink", "1"], check=True, capture_output=True)
    return out


def test_registry_over_tls_with_a_token_and_client_certificates(fused_three, tmp_path, certs, s3_env, monkeypatch,
                                                                capsys):
    from server.registry import RegistrySecurity
    from shared.registry_client import RegistryAccess
    from tests.badinput import assert_clean_error

    store = open_store("s3://mixshow/tls")  # presigned download URLs: the registry's reason to be
    publish(store, fused_three["gradient"])
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    security = RegistrySecurity(certs / "registry.crt", certs / "registry.key", client_ca=certs / "ca.crt",
                                token="s3cret-token")
    server = serve(store, 0, poll_seconds=0.1, security=security)
    address = f"127.0.0.1:{server.mixshow_port}"
    client = {"certfile": certs / "minio.crt", "keyfile": certs / "minio.key"}  # any certificate of the CA
    try:
        good = RegistryAccess(certs / "ca.crt", token="s3cret-token", **client)
        assert fetch_manifest(address, access=good).version == "v0001"
        with pytest.raises(UserError, match="refused the request"):  # no token
            fetch_manifest(address, access=RegistryAccess(certs / "ca.crt", **client), timeout=5)
        with pytest.raises(UserError, match="refused the request"):  # a wrong token
            fetch_manifest(address, access=RegistryAccess(certs / "ca.crt", token="guess", **client), timeout=5)
        with pytest.raises(UserError, match="unreachable"):  # no client certificate: the handshake fails
            fetch_manifest(address, access=RegistryAccess(certs / "ca.crt", token="s3cret-token"), timeout=5)
        with pytest.raises(UserError, match="unreachable"):  # plain text to a TLS registry
            fetch_manifest(address, timeout=5)
        code, out, err = __import__("tests.badinput", fromlist=["run_mixshow"]).run_mixshow(
            ["pull", "--registry", address, "--out", tmp_path / "pulled", "--registry-ca", certs / "ca.crt",
             "--registry-cert", certs / "minio.crt", "--registry-key", certs / "minio.key",
             "--registry-token-file", token_file], monkeypatch, capsys)
        assert code == 0 and (tmp_path / "pulled" / "concepts.json").is_file(), err
    finally:
        server.stop(0)
    assert_clean_error(["pull", "--registry", address, "--out", tmp_path / "p"], tmp_path, "--registry-ca",
                       monkeypatch, capsys, out=tmp_path / "p")
    assert_clean_error(["registry", "--store", store.url, "--port", "0"], tmp_path, "serves over TLS", monkeypatch,
                       capsys)
