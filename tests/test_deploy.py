"""docker-compose.yml: the services the federation needs, wired to files that exist."""

from __future__ import annotations

from pathlib import Path

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
            if source.startswith("./deploy"):
                assert (ROOT / source).parent.exists(), f"{name}: {source}"
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
