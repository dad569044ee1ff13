"""Faults a federation lives through: storage going away, a server killed mid-fusion or mid-publish."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from client.round import put_with_retries
from shared.checkpoints import latest, publish, pull, versions
from shared.errors import UserError
from shared.storage import open_store
from tests.tcp_proxy import Proxy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cut_store(s3_env, s3_server, monkeypatch):
    """(store, proxy): an S3 store reached through a TCP proxy that a test can cut and restore."""
    proxy = Proxy(s3_server)
    monkeypatch.setenv("MIXSHOW_S3_ENDPOINT", proxy.address)
    yield open_store(f"s3://mixshow/faults-{time.monotonic_ns()}"), proxy
    proxy.cut()


def cut_after(store, proxy: Proxy, files: int, restore_after: float | None, monkeypatch) -> None:
    """Cut the storage once `files` objects of a publish are stored; restore it `restore_after` s later."""
    put = store.put_file
    count = {"n": 0}

    def counting(key, path):
        info = put(key, path)
        count["n"] += 1
        if count["n"] == files:
            proxy.cut()
            if restore_after is not None:
                threading.Timer(restore_after, proxy.restore).start()
        return info

    monkeypatch.setattr(store, "put_file", counting)


@pytest.mark.slow  # a 30-second outage
def test_a_30_second_outage_during_publish_and_upload_is_waited_out(cut_store, fused_three, tmp_path, monkeypatch):
    store, proxy = cut_store
    publish(store, fused_three["average"])
    url = store.presigned_put("rounds/r1/5/edlora.safetensors")
    cut_after(store, proxy, 2, 30.0, monkeypatch)
    uploaded = {}

    def client_upload() -> None:  # a client uploading while the storage is away
        while proxy.listener is not None:
            time.sleep(0.05)
        uploaded["started"] = time.monotonic()
        put_with_retries(url, b"a client's weights", "edlora.safetensors")
        uploaded["done"] = time.monotonic()

    uploader = threading.Thread(target=client_upload)
    uploader.start()
    start = time.monotonic()
    manifest = publish(store, fused_three["gradient"])
    uploader.join(timeout=120)
    assert time.monotonic() - start >= 29  # it really waited the outage out
    assert latest(store) == manifest.version == "v0002"
    pull(store, tmp_path / "pulled")  # every file whole: each sha256 checked
    assert uploaded["done"] - uploaded["started"] >= 25
    with store.open("rounds/r1/5/edlora.safetensors") as stream:
        assert stream.read() == b"a client's weights"


def test_an_outage_longer_than_the_retries_fails_clearly_and_leaves_latest(cut_store, fused_three, tmp_path,
                                                                           monkeypatch):
    store, proxy = cut_store
    first = publish(store, fused_three["average"])
    monkeypatch.setattr("shared.storage.OUTAGE_SECONDS", 3.0)
    monkeypatch.setattr("shared.storage.S3_RETRIES", 1)
    cut_after(store, proxy, 2, None, monkeypatch)
    with pytest.raises(UserError, match="unreachable"):
        publish(store, fused_three["gradient"])
    proxy.restore()
    store = open_store(store.url)  # a fresh handle, without the cutting hook
    assert latest(store) == first.version and versions(store) == [first.version]  # the partial one is invisible
    assert pull(store, tmp_path / "pulled").version == first.version
    assert publish(store, fused_three["gradient"]).version == "v0003"  # a new name, never the partial one's


def killed_child(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that kills itself with SIGKILL where the code says."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)


def test_a_server_killed_mid_publish_leaves_latest_and_a_rerun_completes(fused_three, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    first = publish(store, fused_three["average"])
    child = killed_child(f"""
        import os, signal
        from shared.checkpoints import publish
        from shared.storage import open_store
        store = open_store("file://{tmp_path}/store")
        put, count = store.put_file, [0]
        def dying(key, path):
            info = put(key, path)
            count[0] += 1
            if count[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return info
        store.put_file = dying
        publish(store, "{fused_three['gradient']}")
        """, tmp_path)
    assert child.returncode == -9, child.stderr
    assert len(store.list("fused/v0002/")) == 3  # it died with part of a version written ...
    assert latest(store) == first.version and versions(store) == [first.version]  # ... which nobody sees
    assert pull(store, tmp_path / "pulled").version == first.version
    assert publish(store, fused_three["gradient"]).version == "v0003"


@pytest.mark.slow  # a fusion in a child process, killed, then redone
def test_a_server_killed_mid_fusion_writes_nothing_and_a_rerun_completes(tiny_base, three_packages, tmp_path):
    out = tmp_path / "fused"
    child = killed_child(f"""
        import os, signal
        import server.fuse as fusing
        solve = fusing.Fusion.solve_site
        count = [0]
        def dying(self, *a, **k):
            count[0] += 1
            if count[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return solve(self, *a, **k)
        fusing.Fusion.solve_site = dying
        fusing.fuse("{tiny_base}", {[str(p) for p in three_packages]!r}, "{out}", show_progress=False)
        """, tmp_path)
    assert child.returncode == -9, child.stderr
    assert not out.exists()  # the fused folder appears whole or not at all
    from server.fuse import fuse

    fuse(tiny_base, three_packages, out, show_progress=False)
    assert (out / "concepts.json").is_file() and (out / "fusion_state.safetensors").is_file()
