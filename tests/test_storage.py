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
    monkeypatch.setattr("shared.storage.S3_RETRIES", 1)
    monkeypatch.setattr("shared.storage.OUTAGE_SECONDS", 1.0)  # and no waiting for it to come back
    with pytest.raises(UserError, match="unreachable"):
        open_store("s3://mixshow/x")


@pytest.fixture
def s3_with_auth(tmp_path):
    """A moto server (own process) that checks signatures: IAM auth starts after the 3 set-up calls
    that create a user with an access key and a policy allowing everything."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=(tmp_path / "moto.log").open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "moto.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="operator")
        key = iam.create_access_key(UserName="operator")["AccessKey"]
        iam.put_user_policy(UserName="operator", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        yield f"127.0.0.1:{port}", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_wrong_credentials_are_one_clear_error(s3_with_auth, tmp_path, monkeypatch, capsys):
    from minio import Minio

    from tests.test_base_and_cli import run_cli

    endpoint, access, secret = s3_with_auth
    Minio(endpoint, access_key=access, secret_key=secret, secure=False, region="us-east-1").make_bucket("mixshow")
    for name, value in (("ENDPOINT", endpoint), ("ACCESS_KEY", access), ("SECRET_KEY", secret), ("SECURE", "0"),
                        ("REGION", "us-east-1")):
        monkeypatch.setenv(f"MIXSHOW_S3_{name}", value)
    store = open_store("s3://mixshow/auth")  # the right keys work
    store.put_bytes("fused/LATEST", b"v0001")
    assert store.get_bytes("fused/LATEST") == b"v0001"

    monkeypatch.setenv("MIXSHOW_S3_SECRET_KEY", secret[::-1])  # a wrong secret: signatures do not match
    with pytest.raises(UserError, match="check the S3 credentials"):
        open_store("s3://mixshow/auth")
    monkeypatch.setenv("MIXSHOW_S3_ACCESS_KEY", "AKIANOSUCHKEY0000000")  # an access key the server does not know
    code, out, err = run_cli(["pull", "--store", "s3://mixshow/auth", "--out", str(tmp_path / "pulled")],
                             monkeypatch, capsys)
    assert code == 2 and "check the S3 credentials" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pulled").exists()


def test_s3_client_with_a_ca_bundle_keeps_minios_timeouts_and_retries(tmp_path):
    from shared.storage import S3_RETRIES, s3_http_client

    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a TLS connection is made")
    pool = s3_http_client(str(ca))
    kw = pool.connection_pool_kw
    assert kw["ca_certs"] == str(ca) and kw["cert_reqs"] == "CERT_REQUIRED"
    assert kw["timeout"].connect_timeout == 300 and kw["timeout"].read_timeout == 300
    assert kw["retries"].total == S3_RETRIES and 503 in kw["retries"].status_forcelist


def test_download_stops_at_the_announced_size(tmp_path):
    """An endless (hostile) stream is read one byte past the manifest's size, then refused: the disk never fills."""
    import contextlib
    import hashlib

    from shared.download import download_verified

    class Endless:
        read_total = 0

        def read(self, n):
            Endless.read_total += n
            return b"x" * n

    with pytest.raises(IntegrityError, match="more than"):
        download_verified(lambda: contextlib.nullcontext(Endless()), tmp_path / "f.bin",
                          hashlib.sha256(b"x").hexdigest(), 1000, "test")
    assert Endless.read_total == 1001 and not list(tmp_path.iterdir())


@pytest.fixture
def gated_store(s3_server, s3_env, monkeypatch, tmp_path):
    """A store reached through tests/s3_gate.py, which checks presigned signatures and expiry as S3 does."""
    from tests.s3_gate import Gate

    gate = Gate(s3_server, "testing", "testing")
    monkeypatch.setenv("MIXSHOW_S3_ENDPOINT", gate.address)
    yield open_store(f"s3://mixshow/{tmp_path.name}"), gate
    gate.close()


def test_a_presigned_url_writes_only_its_own_key_and_not_after_it_expires(gated_store):
    """A client's upload URL from the round (server.round.round_config) works for its own key with the client's
    own upload code; the same signature on another client's key, a changed signature and an expired URL are
    refused by the signature-checking S3 front, and nothing is written; the round's URLs live for its reply
    timeout and 5 minutes, not longer."""
    import time
    from datetime import timedelta
    from urllib.parse import parse_qs, urlparse

    from client.round import put_with_retries
    from server.round import round_config
    from server.settings import RoundSettings

    store, gate = gated_store
    settings = RoundSettings.from_config({"timeout": 600})
    config = round_config(store, settings, "r9", 7, "0" * 64)
    url = config.upload_urls["edlora.safetensors"]
    assert int(parse_qs(urlparse(url).query)["X-Amz-Expires"][0]) == 900
    put_with_retries(url, b"alice's weights", "edlora.safetensors")
    with store.open("rounds/r9/7/edlora.safetensors") as stream:
        assert stream.read() == b"alice's weights"

    other = url.replace("/rounds/r9/7/", "/rounds/r9/8/")  # node 8's key, with node 7's signature
    with pytest.raises(UserError, match="HTTP 403"):
        put_with_retries(other, b"forged", "edlora.safetensors")
    forged = url[:-6] + ("000000" if not url.endswith("000000") else "111111")
    with pytest.raises(UserError, match="HTTP 403"):
        put_with_retries(forged, b"forged", "edlora.safetensors")
    short = store.presigned_put("rounds/r9/7/stats.safetensors", expires=timedelta(seconds=1))
    time.sleep(2.1)
    with pytest.raises(UserError, match="expired"):
        put_with_retries(short, b"late", "stats.safetensors")
    assert gate.refused == ["SignatureDoesNotMatch", "SignatureDoesNotMatch", "AccessDenied"]
    assert store.info("rounds/r9/8/edlora.safetensors") is None and store.info("rounds/r9/7/stats.safetensors") is None
    with store.open("rounds/r9/7/edlora.safetensors") as stream:
        assert stream.read() == b"alice's weights"  # the forged writes changed nothing
    download = store.presigned_get("rounds/r9/7/edlora.safetensors")  # the registry's download URLs: the same
    from shared.download import http_stream

    with http_stream(download) as stream:
        assert stream.read() == b"alice's weights"
