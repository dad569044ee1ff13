"""End to end on loopback: a real SuperLink and two real SuperNodes (subprocesses), an S3 server
(moto) through the minio client, two toy concepts on the tiny base.

The clients hold no storage credentials: they upload through presigned PUT URLs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.fuse import fuse
from shared.checkpoints import get_manifest, latest, pull
from shared.fused_model import expand_prompt, load_fused
from shared.sampling import generate
from shared.storage import open_store
from tests.conftest import TOY_WORDS
from tests.test_base_and_cli import run_cli

pytestmark = pytest.mark.slow  # real SuperLink/SuperNode processes: minutes, not seconds


BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def federation(tmp_path, tiny_base, toys, s3_env, s3_server):
    """SuperLink (with the store's credentials, for the ServerApp) + 2 SuperNodes (without any)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    base_env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                    PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    client_env = {k: v for k, v in base_env.items() if not k.startswith("MIXSHOW_S3_")}
    port = free_port()
    procs = [start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                    "--disable-runtime-dependency-installation"], base_env, tmp_path / "superlink.log")]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "superlink.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        for name in ("red-circle", "blue-square"):  # `mixshow join` execs the SuperNode: same PID
            words, cls = TOY_WORDS[name]
            procs.append(start([str(BIN / "mixshow"), "join", "--superlink", f"127.0.0.1:{port}", "--insecure",
                                "--data", str(toys / name), "--words", " ".join(words), "--class-word", cls,
                                "--base", str(tiny_base), "--name", name, "--port", str(free_port()),
                                "--work-dir", str(tmp_path / "clients" / name)],
                               client_env, tmp_path / f"supernode-{name}.log"))
        yield f"127.0.0.1:{port}", procs
    finally:
        stop(procs)
        assert all(p.poll() is not None for p in procs)


def round_args(superlink: str, store_url: str, tiny_base: Path, min_clients: int, steps: int) -> list[str]:
    return ["round", "--superlink", superlink, "--store", store_url, "--base", str(tiny_base), "--insecure",
            "--min-clients", str(min_clients), "--timeout", "600", "--wait", "60", "--steps", str(steps),
            "--resolution", "64", "--stats-samples", "1"]


def offline_package(store, prefix: str, folder: Path) -> Path:
    """A client's uploaded package, read back raw from the store (presigned uploads carry no recorded sha256)."""
    folder.mkdir(parents=True)
    for name in ("concept.json", "edlora.safetensors", "stats.safetensors"):
        with store.open(prefix + name) as stream:
            (folder / name).write_bytes(stream.read())
    return folder


def max_relative_difference(a_dir: Path, b_dir: Path) -> float:
    worst = 0.0
    for sub in ("unet", "text_encoder"):
        a = load_file(str(next((a_dir / sub).glob("*.safetensors"))))
        b = load_file(str(next((b_dir / sub).glob("*.safetensors"))))
        worst = max(worst, max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in a))
    return worst


def test_rounds_build_on_the_latest_version(federation, tiny_base, tmp_path, monkeypatch, capsys):
    """`mixshow join` x2, `mixshow round`, `mixshow pull`. Round 1 fuses both clients; the published weights
    equal an offline `fuse` of their uploads. Round 2: red-circle withdraws (`mixshow withdraw`), blue-square's
    package is unchanged and not uploaded again: v0002 holds blue-square alone and equals an offline fusion of
    it. Round 3: nothing changed, nothing published. Round 4: red-circle takes its withdrawal back and the
    operator removes blue-square (`round --remove`): the version holds red-circle alone. The lineage is listed."""
    superlink, procs = federation
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    store_url = "s3://mixshow/lineage"
    store = open_store(store_url)
    code, out, err = run_cli(round_args(superlink, store_url, tiny_base, 2, 10), monkeypatch, capsys)
    assert code == 0 and latest(store) == "v0001", err
    assert "finished:completed" in " ".join(out.split())
    first = get_manifest(store, "v0001")
    uploads = {k.split("/")[1] for k in store.list("rounds/")}
    assert sorted(first.concepts) == ["blue-square", "red-circle"] and len(uploads) == 1
    code, out, err = run_cli(["pull", "--store", store_url, "--out", str(tmp_path / "v1")], monkeypatch, capsys)
    assert code == 0 and "every sha256 verified" in " ".join(out.split()), err
    records = __import__("json").loads((tmp_path / "v1" / "concepts.json").read_text())["concepts"]
    offline = [offline_package(store, r["source"], tmp_path / "offline" / r["name"]) for r in records]
    fuse(tiny_base, offline, tmp_path / "offline-v1", show_progress=False)
    assert max_relative_difference(tmp_path / "v1", tmp_path / "offline-v1") <= 1e-6
    base, encoder, concepts = load_fused(tmp_path / "v1")
    images = [generate(base, encoder, [expand_prompt(f"a photo of a <{c}>", concepts)], seed=0, steps=3, height=64,
                       width=64)[0] for c in first.concepts]
    assert images[0].tobytes() != images[1].tobytes()
    assert torch.tensor(list(images[0].getdata())).float().std() > 0

    red_work = str(tmp_path / "clients" / "red-circle")
    code, out, err = run_cli(["withdraw", "--name", "red-circle", "--work-dir", red_work], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(round_args(superlink, store_url, tiny_base, 2, 10), monkeypatch, capsys)
    assert code == 0 and latest(store) == "v0002", err
    second = get_manifest(store, "v0002")
    assert list(second.concepts) == ["blue-square"] and second.parent == "v0001"
    assert list(second.removed) == ["red-circle"] and not second.added and not second.replaced
    assert {k.split("/")[1] for k in store.list("rounds/")} == uploads  # nobody uploaded again
    pull(store, tmp_path / "v2", "v0002")
    record = next(c for c in __import__("json").loads((tmp_path / "v2" / "concepts.json").read_text())["concepts"])
    blue = offline_package(store, record["source"], tmp_path / "offline-2" / "blue")
    fuse(tiny_base, [blue], tmp_path / "offline-v2", show_progress=False)
    assert max_relative_difference(tmp_path / "v2", tmp_path / "offline-v2") <= 1e-6

    code, out, err = run_cli(round_args(superlink, store_url, tiny_base, 2, 10), monkeypatch, capsys)
    assert code == 0 and latest(store) == "v0002", err  # nothing changed: no new version

    run_cli(["withdraw", "--undo", "--name", "red-circle", "--work-dir", red_work], monkeypatch, capsys)
    code, out, err = run_cli(round_args(superlink, store_url, tiny_base, 2, 10) + ["--remove", "blue-square"],
                             monkeypatch, capsys)
    assert code == 0, err
    final = get_manifest(store, latest(store))
    assert list(final.concepts) == ["red-circle"] and final.parent == "v0002"
    assert list(final.added) == ["red-circle"] and list(final.removed) == ["blue-square"]
    pull(store, tmp_path / "v1-again", "v0001")  # older versions stay pullable
    code, out, err = run_cli(["registry", "--store", store_url, "--list"], monkeypatch, capsys)
    listed = " ".join(out.split())
    assert code == 0 and "v0001" in listed and "v0002" in listed and final.version in listed, err


def test_round_against_a_missing_superlink_fails_cleanly(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    code, out, err = run_cli(["round", "--superlink", f"127.0.0.1:{free_port()}", "--store", f"file://{tmp_path}/s",
                              "--base", str(tiny_base), "--insecure"], monkeypatch, capsys)
    assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1, err


def test_server_rejects_an_upload_changed_after_its_manifest(three_packages, tiny_base, s3_env, tmp_path):
    from client.round import upload
    from protos import mixshow_pb2 as pb
    from server.round import round_config, verify
    from shared.base import load_base
    from shared.storage import IntegrityError

    store = open_store(f"s3://mixshow/{tmp_path.name}")
    base = load_base(tiny_base)
    manifests = {}
    for node, pkg in enumerate(three_packages[:2]):
        config = round_config(store, type("S", (), {"steps": 0, "resolution": 0, "stats_samples": 0,
                                                    "retrain": False})(), "r1", node, base.fingerprint)
        assert config.upload_urls and not config.store_url  # clients get URLs, not credentials
        manifests[node] = pb.ConceptManifest(files=upload(config, pkg))
    key = "rounds/r1/1/edlora.safetensors"
    with store.open(key) as stream:  # a presigned upload carries no recorded sha256: read it raw
        data = bytearray(stream.read())
    data[-1] ^= 0xFF
    store.put_bytes(key, bytes(data))  # the bytes change after the client's manifest was made
    verify(store, manifests[0], "rounds/r1/0/", base, tmp_path / "ok")
    with pytest.raises(IntegrityError, match="manifest"):
        verify(store, manifests[1], "rounds/r1/1/", base, tmp_path / "bad")


def _kill_when_training(proc: subprocess.Popen, log: Path, deadline: float = 300) -> None:
    """SIGKILL a SuperNode (and its ClientApp) as soon as it has taken the round's message."""
    end = time.monotonic() + deadline
    while time.monotonic() < end and proc.poll() is None:
        if "flwr-clientapp" in log.read_text(errors="replace"):
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.2)


@pytest.mark.parametrize("min_clients", [1, 2])
def test_a_client_killed_mid_round(min_clients, federation, tiny_base, fused_three, tmp_path, monkeypatch, capsys):
    import threading

    from shared.checkpoints import publish

    superlink, procs = federation
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    store_url = f"s3://mixshow/kill-{min_clients}"
    store = open_store(store_url)
    previous = publish(store, fused_three["average"]).version
    victim = threading.Thread(target=_kill_when_training, args=(procs[2], tmp_path / "supernode-blue-square.log"))
    victim.start()
    try:
        code, out, err = run_cli(round_args(superlink, store_url, tiny_base, min_clients, 10), monkeypatch, capsys)
        if min_clients == 1:
            assert code == 0, err
            assert latest(store) != previous
            manifest = pull(store, tmp_path / "pulled")
            assert list(manifest.concepts) == ["red-circle"]
        else:
            assert code == 2 and "ended finished:failed" in err, (out, err)
            assert latest(store) == previous
    finally:
        victim.join()
    assert procs[2].poll() is not None  # the victim really died
