"""End to end on loopback: a real SuperLink and two real SuperNodes (subprocesses), an S3 server
(moto) through the minio client, two toy concepts on the tiny base.

The clients hold no storage credentials: they upload through presigned PUT URLs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
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


@contextmanager
def running_federation(root: Path, tiny_base: Path, toys: Path, names=("red-circle", "blue-square")):
    """A SuperLink (with the store's credentials, for the ServerApp) + one SuperNode per name (without any), all
    under `root`; yields (address, processes, join) where join(name) starts one more SuperNode. Each client's data
    is its own copy."""
    home = root / "flwr-home"
    home.mkdir(parents=True)
    base_env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                    PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    client_env = {k: v for k, v in base_env.items() if not k.startswith("MIXSHOW_S3_")}
    port = free_port()
    procs = [start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                    "--disable-runtime-dependency-installation"], base_env, root / "superlink.log")]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError((root / "superlink.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        def join(name: str, package: Path | None = None) -> None:  # `mixshow join` execs the SuperNode: same PID
            if package is None:
                words, cls = TOY_WORDS[name]
                data = root / "data" / name
                shutil.copytree(toys / name, data)
                concept = ["--data", str(data), "--words", " ".join(words), "--class-word", cls]
            else:
                concept = ["--package", str(package)]
            procs.append(start([str(BIN / "mixshow"), "join", "--superlink", f"127.0.0.1:{port}", "--insecure",
                                *concept, "--base", str(tiny_base), "--name", name, "--port", str(free_port()),
                                "--work-dir", str(root / "clients" / name)],
                               client_env, root / f"supernode-{name}.log"))

        for name in names:
            join(name)
        yield f"127.0.0.1:{port}", procs, join
    finally:
        stop(procs)
        assert all(p.poll() is not None for p in procs)


@pytest.fixture
def federation(tmp_path, tiny_base, toys, s3_env, s3_server):
    """A running federation of two clients (red-circle and blue-square) under tmp_path."""
    with running_federation(tmp_path, tiny_base, toys) as running:
        yield running


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


def fused_set(store, version: str, tmp_path: Path, tiny_base: Path) -> float:
    """Pull `version`, fuse its concepts' own uploads offline, and return the largest relative difference."""
    pulled = tmp_path / f"pulled-{version}"
    pull(store, pulled, version)
    info = json.loads((pulled / "concepts.json").read_text())
    records = info["concepts"]
    offline = [offline_package(store, r["source"], tmp_path / f"offline-{version}" / r["name"]) for r in records]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ServerApp (OMP_NUM_THREADS=1): the preservation prompts are sampled in
    try:  # float32, and on 2 threads their Grams differ by ~1e-7, which the solve makes ~1e-6 (measured)
        fuse(tiny_base, offline, tmp_path / f"offline-fused-{version}", show_progress=False,
             preserve=info["preserve"], preserve_prompts=info.get("preserve_prompts") or None)
    finally:
        torch.set_num_threads(threads)
    return max_relative_difference(pulled, tmp_path / f"offline-fused-{version}")


def test_rounds_build_on_the_latest_version(federation, outside_lora, tiny_base, tmp_path, monkeypatch, capsys):
    """`mixshow join`, `mixshow round`, `mixshow pull`, three rounds of a lineage. Round 1: clients A
    (red-circle) and B (blue-square). Round 2: C (green-triangle) joins, and so does D with a LoRA made elsewhere
    (kohya keys, imported by `mixshow import-lora`, joined with `mixshow join --package`: its client records the
    Grams and uploads it); B updates its package, A's is unchanged and not uploaded again. Round 3: A withdraws
    (`mixshow withdraw`) and the operator removes C (`round --remove`). Each version's weights equal an offline
    fusion of its set, with the preservation prompts the first round was given. Then: a round that changes
    nothing publishes nothing; the lineage is listed and older versions stay pullable."""
    superlink, procs, join = federation
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    store_url = "s3://mixshow/lineage"
    store = open_store(store_url)

    def run_round(*extra: str, clients: int = 2) -> None:
        code, out, err = run_cli(round_args(superlink, store_url, tiny_base, clients, 10) + list(extra),
                                 monkeypatch, capsys)
        assert code == 0 and "finished:completed" in " ".join(out.split()), err

    prompts = ["a photo of a dog on the grass", "a blue house at night", "a painting of a tree"]
    (tmp_path / "keep.txt").write_text("# what the fused model keeps from the base\n" + "\n".join(prompts) + "\n")
    run_round("--preserve-prompts", str(tmp_path / "keep.txt"))  # read by the ServerApp at the first round
    first = get_manifest(store, "v0001")
    assert sorted(first.concepts) == ["blue-square", "red-circle"] and not first.parent
    assert fused_set(store, "v0001", tmp_path, tiny_base) <= 1e-6
    base, encoder, concepts = load_fused(tmp_path / "pulled-v0001")
    images = [generate(base, encoder, [expand_prompt(f"a photo of a <{c}>", concepts)], seed=0, steps=3, height=64,
                       width=64)[0] for c in first.concepts]
    assert images[0].tobytes() != images[1].tobytes()
    assert torch.tensor(list(images[0].getdata())).float().std() > 0

    def uploads_of(version: str) -> set[str]:  # the nodes that uploaded in the round that made `version`
        return {k.split("/")[2] for k in store.list(f"rounds/{get_manifest(store, version).round_id}/")}

    join("green-triangle")
    root, _ = outside_lora
    pkg = tmp_path / "imported" / "outside"
    code, _, err = run_cli(["import-lora", str(root / "kohya.safetensors"), "--base", str(tiny_base), "--trigger",
                            "<ohwx>", "--class-word", "toy", "--name", "outside", "--out", str(pkg)], monkeypatch,
                           capsys)
    assert code == 0, err
    join("outside-client", package=pkg)
    blue = tmp_path / "data" / "blue-square"  # B has a new picture, and trains its package anew
    shutil.copy(next(blue.glob("*.png")), blue / "new.png")
    shutil.copy(next(blue.glob("*.txt")), blue / "new.txt")
    shutil.rmtree(next((tmp_path / "clients" / "blue-square").glob("*/blue-square")))
    run_round(clients=4)
    second = get_manifest(store, latest(store))
    assert second.version == "v0002" and second.parent == "v0001"
    assert sorted(second.concepts) == ["blue-square", "green-triangle", "outside", "red-circle"]
    assert sorted(second.added) == ["green-triangle", "outside"] and list(second.replaced) == ["blue-square"]
    assert not second.removed and len(uploads_of("v0002")) == 3  # A uploaded nothing
    assert fused_set(store, "v0002", tmp_path, tiny_base) <= 1e-6
    assert not (pkg / "stats.safetensors").exists()  # D's client's own copy got the Grams, not the user's folder

    code, out, err = run_cli(["withdraw", "--name", "red-circle", "--work-dir", str(tmp_path / "clients" /
                                                                                 "red-circle")], monkeypatch, capsys)
    assert code == 0, err
    run_round("--remove", "green-triangle", clients=4)  # and the operator removes C in the same round
    third = get_manifest(store, latest(store))
    assert third.version == "v0003" and third.parent == "v0002"
    assert sorted(third.removed) == ["green-triangle", "red-circle"]
    assert sorted(third.concepts) == ["blue-square", "outside"] and not uploads_of("v0003")
    assert fused_set(store, "v0003", tmp_path, tiny_base) <= 1e-6
    kept = json.loads((tmp_path / "pulled-v0003" / "concepts.json").read_text())
    assert (kept["preserve"], kept["preserve_prompts"]) == (3, prompts)  # later rounds keep the first one's

    run_round()  # C's node is still connected: it uploads again, and is refused (the operator removed C)
    assert latest(store) == "v0003"  # nothing changed: no new version
    pull(store, tmp_path / "v1-again", "v0001")  # older versions stay pullable
    code, out, err = run_cli(["registry", "--store", store_url, "--list"], monkeypatch, capsys)
    listed = " ".join(out.split())
    assert code == 0 and all(v in listed for v in ("v0001", "v0002", "v0003")), err


def test_round_against_a_missing_superlink_fails_cleanly(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    code, out, err = run_cli(["round", "--superlink", f"127.0.0.1:{free_port()}", "--store", f"file://{tmp_path}/s",
                              "--base", str(tiny_base), "--insecure"], monkeypatch, capsys)
    assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1, err


def test_server_rejects_an_upload_changed_after_its_manifest(three_packages, tiny_base, s3_env, tmp_path):
    from client.round import upload
    from protos import mixshow_pb2 as pb
    from server.membership import verify
    from server.round import round_config
    from server.settings import RoundSettings
    from shared.base import load_base
    from shared.storage import IntegrityError

    store = open_store(f"s3://mixshow/{tmp_path.name}")
    base = load_base(tiny_base)
    manifests = {}
    for node, pkg in enumerate(three_packages[:2]):
        config = round_config(store, RoundSettings.from_config({"steps": 0}), "r1", node, base.fingerprint)
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


def test_a_client_killed_mid_round(tiny_base, toys, fused_three, s3_env, tmp_path):
    """Two federations at once (the SuperLink takes a minute to declare a dead node gone: the two waits overlap),
    each losing its blue-square client as soon as it starts training. With --min-clients 1 the survivor's concept
    is published; with --min-clients 2 the round fails and LATEST stays the version it was."""
    import threading

    from shared.checkpoints import publish

    with ExitStack() as stack:
        rounds, victims, stores, previous = {}, [], {}, {}
        for min_clients in (1, 2):
            root = tmp_path / f"min-{min_clients}"
            superlink, procs, _ = stack.enter_context(running_federation(root, tiny_base, toys))
            store_url = f"s3://mixshow/kill-{min_clients}"
            stores[min_clients] = open_store(store_url)
            previous[min_clients] = publish(stores[min_clients], fused_three["average"]).version \
                if min_clients == 2 else None
            victims.append(threading.Thread(target=_kill_when_training,
                                            args=(procs[2], root / "supernode-blue-square.log")))
            victims[-1].start()
            rounds[min_clients] = (subprocess.Popen(
                [str(BIN / "mixshow"), *round_args(superlink, store_url, tiny_base, min_clients, 10)],
                env=dict(os.environ, FLWR_HOME=str(root / "flwr-home")), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True), procs[2])
        try:
            results = {n: (*proc.communicate(timeout=400), proc.returncode) for n, (proc, _) in rounds.items()}
        finally:
            for thread in victims:
                thread.join()
        out, err, code = results[1]
        assert code == 0, err
        assert latest(stores[1]) is not None
        manifest = pull(stores[1], tmp_path / "pulled")
        assert list(manifest.concepts) == ["red-circle"]
        out, err, code = results[2]
        assert code == 2 and "ended finished:failed" in err, (out, err)
        assert latest(stores[2]) == previous[2]
        assert all(victim.poll() is not None for _, victim in rounds.values())  # the victims really died
