"""The federation's transport, end to end on loopback: a SuperLink with TLS (certificates from
deploy/make-certs.sh) and SuperNode authentication. A registered node takes part; a node whose key was
never registered, and a node that connects in plain text, do not."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from server.launch import CONNECTION, flwr_env
from shared.base import load_base
from shared.checkpoints import get_manifest, latest, pull
from shared.fused_model import expand_prompt, load_fused
from shared.sampling import generate
from shared.storage import open_store
from tests.conftest import TOY_WORDS
from tests.test_base_and_cli import run_cli
from tests.test_federation import BIN, free_port, start, stop

pytestmark = pytest.mark.slow  # real SuperLink/SuperNode processes

ROOT = Path(__file__).resolve().parents[1]


def wait_healthy(port: int, ca: Path, log: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-2000:]) from None
            time.sleep(0.5)


def test_tls_and_node_authentication(tmp_path, sdxl_base, toys, s3_env, monkeypatch, capsys):
    """On the tiny SDXL base: the round, its upload and the pulled version take an SDXL base unchanged."""
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy" / "make-certs.sh"), str(certs), "superlink", "2"], check=True,
                   capture_output=True)
    home = tmp_path / "flwr-home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    base_env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                    PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    client_env = {k: v for k, v in base_env.items() if not k.startswith("MIXSHOW_S3_")}
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    procs = [start([str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                    "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt"),
                    "--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth",
                    "--disable-runtime-dependency-installation"], base_env, tmp_path / "superlink.log")]
    try:
        wait_healthy(port, certs / "ca.crt", tmp_path / "superlink.log")
        env = flwr_env(superlink, certs / "ca.crt", insecure=False)
        registered = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs / "supernode-1.pub"),
                                     CONNECTION], env=env, capture_output=True, text=True, timeout=60)
        assert registered.returncode == 0, registered.stdout + registered.stderr

        def join(name: str, extra: list[str]) -> None:
            words, cls = TOY_WORDS[name]
            procs.append(start([str(BIN / "mixshow"), "join", "--superlink", superlink, "--data", str(toys / name),
                                "--words", " ".join(words), "--class-word", cls, "--base", str(sdxl_base),
                                "--name", name, "--port", str(free_port()), "--work-dir",
                                str(tmp_path / "clients" / name), *extra], client_env,
                               tmp_path / f"supernode-{name}.log"))

        join("red-circle", ["--root-cert", str(certs / "ca.crt"), "--auth-key", str(certs / "supernode-1")])
        join("blue-square", ["--root-cert", str(certs / "ca.crt"), "--auth-key", str(certs / "supernode-2")])
        join("green-triangle", ["--insecure"])  # plain text to a TLS SuperLink
        time.sleep(15)  # every node has had time to try to connect
        listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        store_url = "s3://mixshow/secure"
        code, out, err = run_cli(["round", "--superlink", superlink, "--root-cert", str(certs / "ca.crt"),
                                  "--store", store_url, "--base", str(sdxl_base), "--min-clients", "1",
                                  "--timeout", "600", "--wait", "10", "--steps", "8", "--resolution", "64",
                                  "--stats-samples", "1"], monkeypatch, capsys)
        assert code == 0, err
        store = open_store(store_url)
        assert list(get_manifest(store, latest(store)).concepts) == ["red-circle"]  # only the registered node
        manifest = pull(store, tmp_path / "pulled")
        assert manifest.base_fingerprint == load_base(sdxl_base, sdxl=True).fingerprint
        model, encoder, concepts = load_fused(tmp_path / "pulled")
        assert model.arch == "sdxl" and model.text_encoder_2 is not None
        image = generate(model, encoder, [expand_prompt("a photo of a <red-circle>", concepts)], steps=2, height=64,
                         width=64)[0]
        assert torch.tensor(list(image.getdata())).float().std() > 0
        # a plain-text client of the TLS SuperLink is refused too
        code, out, err = run_cli(["round", "--superlink", superlink, "--insecure", "--store", store_url, "--base",
                                  str(sdxl_base)], monkeypatch, capsys)
        assert code != 0
    finally:
        stop(procs)
