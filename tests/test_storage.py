"""Storage over S3 (an S3 server on loopback, through the minio client) and on disk: sha256 on every read."""

from __future__ import annotations

import os
import urllib.request

import pytest

from shared.errors import UserError
from shared.storage import FileStore, IntegrityError, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store")
    request.getfixturevalue("s3_env")
    return open_store(f"s3://mixshow/{tmp_path.name}")


def test_round_trip_list_and_integrity(store, tmp_path):
    info = store.put_bytes("rounds/r1/a/concept.json", b'{"x": 1}')
    assert store.get_bytes("rounds/r1/a/concept.json", info.sha256) == b'{"x": 1}'
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * 1024 * 1024 + 5))  # more than one multipart part
    put = store.put_file("rounds/r1/a/edlora.safetensors", big)
    got = store.get_file("rounds/r1/a/edlora.safetensors", tmp_path / "out" / "e.bin")
    assert got.sha256 == put.sha256 and (tmp_path / "out" / "e.bin").read_bytes() == big.read_bytes()
    assert store.list("rounds/r1") == ["rounds/r1/a/concept.json", "rounds/r1/a/edlora.safetensors"]
    assert store.info("nope") is None
    with pytest.raises(UserError, match="does not exist"):
        store.get_bytes("nope")
    with pytest.raises(IntegrityError, match="manifest"):
        store.get_bytes("rounds/r1/a/concept.json", "0" * 64)


def test_changed_bytes_are_caught(store, tmp_path):
    store.put_bytes("k.bin", b"original")
    if isinstance(store, FileStore):
        (store.root / "k.bin").write_bytes(b"tampered")
    else:
        import io

        sha = store.info("k.bin").sha256
        store.client.put_object("mixshow", store._name("k.bin"), io.BytesIO(b"tampered"), 8, metadata={"sha256": sha})
    with pytest.raises(IntegrityError, match="corrupt"):
        store.get_bytes("k.bin")
    with pytest.raises(IntegrityError):
        store.get_file("k.bin", tmp_path / "k.bin")
    assert not (tmp_path / "k.bin").exists()


def test_presigned_put_needs_no_credentials(s3_env, tmp_path):
    store = open_store(f"s3://mixshow/{tmp_path.name}")
    url = store.presigned_put("rounds/r2/client/edlora.safetensors")
    request = urllib.request.Request(url, data=b"payload", method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    import hashlib

    assert store.get_bytes("rounds/r2/client/edlora.safetensors", hashlib.sha256(b"payload").hexdigest()) == b"payload"


def test_bad_store_urls(s3_env, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        open_store("s3://no-such-bucket/x")
    with pytest.raises(UserError, match="must be"):
        open_store("ftp://host/x")
    monkeypatch.setenv("MIXSHOW_S3_ENDPOINT", "127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("shared.storage.RETRIES", 1)
    with pytest.raises(UserError, match="unreachable"):
        open_store("s3://mixshow/x")
