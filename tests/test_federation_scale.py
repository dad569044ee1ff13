"""Fifty clients in one round (Flower's simulation runtime: fifty virtual SuperNodes), on the tiny base."""

from __future__ import annotations

import json
import os

import pytest

from cli.simulation import run_demo_round
from server.settings import RoundSettings
from shared.checkpoints import get_manifest, pull
from shared.fused_model import read_concepts
from shared.storage import open_store

pytestmark = pytest.mark.slow  # fifty trainings and a fifty-concept fusion

CLIENTS = 50


def test_fifty_clients_make_one_version(tiny_base, toys, tmp_path):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    training = tmp_path / "client-training.yaml"
    training.write_text("lr_unet: 1.0e-3\nlr_text: 1.0e-4\ntemplates: ['photo of a {}']\n")
    nodes = [{"name": f"client-{i:02d}", "data-dir": str(toys / "red-circle"), "words": f"<c{i:02d}a> <c{i:02d}b>",
              "class-word": "toy", "base": str(tiny_base), "work-dir": str(tmp_path / "clients" / f"c{i:02d}"),
              "train-config": str(training)} for i in range(CLIENTS)]
    store_url = f"file://{tmp_path / 'store'}"
    settings = RoundSettings.from_config({"store": store_url, "base": str(tiny_base), "min-clients": CLIENTS,
                                          "wait": 120, "timeout": 1800, "steps": 4, "resolution": 64,
                                          "stats-samples": 1})
    result = run_demo_round(settings, nodes, tmp_path)
    assert result["published"] == "v0001", json.dumps(result)[:2000]
    store = open_store(store_url)
    manifest = get_manifest(store, "v0001")
    assert sorted(manifest.concepts) == [f"client-{i:02d}" for i in range(CLIENTS)]
    pull(store, tmp_path / "pulled")
    records = read_concepts(tmp_path / "pulled")["concepts"]
    assert len({r["client"] for r in records}) == CLIENTS  # one concept per node, each owned by its node
