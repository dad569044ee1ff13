"""docker-compose.yml: the services the federation needs, wired to files that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_structure_and_references():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"minio", "bucket-init", "superlink", "supernode-1", "supernode-2", "registry"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./deploy"):  # the certificates: where make-certs.sh writes them by default
                assert source == "./deploy/certs", f"{name}: {source}"
    link = " ".join(services["superlink"]["command"])
    assert "--ssl-certfile=/certs/superlink.crt" in link and "--ssl-ca-certfile=/certs/ca.crt" in link
    for node in ("supernode-1", "supernode-2"):
        command = services[node]["command"]
        assert command[:2] == ["mixshow", "join"] and "--root-cert=/certs/ca.crt" in command
        assert not any(k.startswith("MIXSHOW_S3") for k in services[node].get("environment", {}))  # presigned only
        assert services[node]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "MIXSHOW_S3_ENDPOINT" in services["superlink"]["environment"]
    assert (ROOT / "deploy" / "make-certs.sh").stat().st_mode & 0o111
    assert (ROOT / "docs" / "deploy.md").is_file()


def test_images_copy_every_package_the_project_installs():
    """Each Dockerfile copies what exists and every package pyproject installs (`pip install -e .` in the image
    would otherwise leave verbs such as `mixshow sample` without their code), and builds from a BASE argument
    (deploy/build-images.sh builds them on a local base)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    for name in ("Dockerfile.server", "Dockerfile.client"):
        text = (ROOT / "deploy" / name).read_text()
        copied = set()
        for line in text.splitlines():
            if line.startswith("COPY "):
                sources = line.split()[1:-1]
                assert all((ROOT / src).exists() for src in sources), (name, line)
                copied.update(sources)
        assert packages <= copied, (name, packages - copied)
        assert "FROM ${BASE}" in text and "ARG TORCH=" in text, name


@pytest.mark.slow  # four RSA-4096 keys
@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl, ssh-keygen")
def test_make_certs_writes_every_file_the_compose_file_mounts(tmp_path):
    """Every /certs/<file> the services name is produced by deploy/make-certs.sh, and the TLS chain verifies."""
    compose_text = (ROOT / "docker-compose.yml").read_text()
    named = set(re.findall(r"/certs/([A-Za-z0-9._-]+)", compose_text))
    assert named, "the compose file names no certificate"
    out = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy" / "make-certs.sh"), str(out), "superlink", "2"], check=True,
                   capture_output=True, timeout=120)
    missing = sorted(n for n in named if not (out / n).is_file())
    assert not missing, f"make-certs.sh does not write {missing}"
    check = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "superlink.crt")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
