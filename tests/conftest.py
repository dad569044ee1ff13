"""Shared fixtures: one tiny base, toy concepts and one trained package per test session."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per xdist worker (scripts/test.sh runs one worker per core: more threads than cores makes every
# worker spin-wait, 20x slower measured); a plain pytest run uses up to 2.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

import logging  # noqa: E402

from client.config import TrainConfig  # noqa: E402
from fixtures.tiny_base import make_tiny_base  # noqa: E402
from fixtures.toy_concepts import make_toy_concepts  # noqa: E402

TOY_WORDS = {"red-circle": (["<redcir1>", "<redcir2>"], "toy"), "blue-square": (["<blusqu1>", "<blusqu2>"], "ball"),
             "green-triangle": (["<gretri1>", "<gretri2>"], "cube")}


# The longest tests first, in this order (measured beside the rest on a 2-core AVX2 machine: about 370, 190, 180,
# 150 and 100 s), and scripts/test.sh hands xdist's workers one test at a time (--maxschedchunk 1): the longest ones
# start at once on both workers and the short ones fill in around them.
LONGEST_FIRST = ("test_rounds_build_on_the_latest_version", "test_fifty_clients_make_one_version",
                 "test_a_client_killed_mid_round", "test_a_world_concept_is_found_more_often_with_its_lora",
                 "test_tls_and_node_authentication",
                 "test_a_30_second_outage_during_publish_and_upload_is_waited_out", "test_packings",
                 "test_an_outage_longer_than_the_retries_fails_clearly_and_leaves_latest")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname, len(rank)))  # stable: the rest keep their order


def tiny_config(**kw) -> TrainConfig:
    """Training settings sized for the tiny base on a CPU; no preview grids unless a test asks for them."""
    values = dict(steps=100, resolution=64, batch_size=2, sample_steps=3, checkpoint_every=0, lr_unet=1e-3,
                  lr_text=1e-4, templates=["photo of a {}", "a {} on the grass"], preview="none")
    values.update(kw)
    return TrainConfig(**values)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per test run: the xdist workers of one run share the result (their base temporary
    folders have one parent), so a session fixture costs its time once, not once per worker. Tests only read it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "built-once"
    root.mkdir(exist_ok=True)
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way
            folder.mkdir()
            build(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "base", lambda root: make_tiny_base(root / "tiny-sd")) / "tiny-sd"


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory) -> Path:
    """The tiny SDXL-shaped base (two text encoders, text-time added conditions)."""
    return built_once(tmp_path_factory, "sdxl-base",
                      lambda root: make_tiny_base(root / "tiny-sdxl", arch="sdxl")) / "tiny-sdxl"


@pytest.fixture(scope="session")
def toys(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "toys", lambda root: make_toy_concepts(root / "concepts", 3, images=6,
                                                                               size=64)) / "concepts"


@pytest.fixture(scope="session")
def trained(tiny_base, toys, tmp_path_factory):
    """(package path, losses) of a 100-step ED-LoRA run on the red circle."""
    from client.train import train_concept

    def build(root: Path) -> None:
        words, cls = TOY_WORDS["red-circle"]
        _, losses = train_concept(tiny_base, toys / "red-circle", words, cls, root / "red-circle", tiny_config(),
                                  show_progress=False)
        (root / "losses.json").write_text(json.dumps(losses))

    root = built_once(tmp_path_factory, "pkg", build)
    return root / "red-circle", json.loads((root / "losses.json").read_text())


@pytest.fixture(scope="session")
def three_packages(tiny_base, toys, tmp_path_factory) -> list[Path]:
    """The 3 toy concepts trained (different seeds, as independent clients) with their stats."""
    from client.stats import compute_stats
    from client.train import train_concept
    from shared.base import load_base

    def build(root: Path) -> None:
        for seed, (name, (words, cls)) in enumerate(TOY_WORDS.items()):
            pkg, _ = train_concept(tiny_base, toys / name, words, cls, root / name, tiny_config(steps=60, seed=seed),
                                   show_progress=False)
            compute_stats(load_base(tiny_base), pkg, samples=2, steps=10, seed=seed, show_progress=False)

    root = built_once(tmp_path_factory, "three", build)
    return [root / name for name in TOY_WORDS]


@pytest.fixture(scope="session")
def fused_three(tiny_base, three_packages, tmp_path_factory) -> dict[str, Path]:
    """The 3 packages fused by gradient fusion and by naive averaging (fused_lora.safetensors in float32, so
    the tests of exact identities are exact; tests/test_artefacts.py covers the float16 default)."""
    from server.fuse import fuse

    def build(root: Path) -> None:
        for method in ("gradient", "average"):
            fuse(tiny_base, three_packages, root / method, method=method, show_progress=False,
                 lora_dtype=torch.float32)

    root = built_once(tmp_path_factory, "fused", build)
    return {method: root / method for method in ("gradient", "average")}


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    from minio import Minio

    monkeypatch.setenv("MIXSHOW_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("MIXSHOW_S3_ACCESS_KEY", "testing")
    monkeypatch.setenv("MIXSHOW_S3_SECRET_KEY", "testing")
    monkeypatch.setenv("MIXSHOW_S3_SECURE", "0")
    monkeypatch.setenv("MIXSHOW_S3_REGION", "us-east-1")
    client = Minio(s3_server, access_key="testing", secret_key="testing", secure=False, region="us-east-1")
    if not client.bucket_exists("mixshow"):
        client.make_bucket("mixshow")
    return client


OUTSIDE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]  # conv1: a resnet layer mixshow does not fuse


@pytest.fixture(scope="session")
def outside_lora(tiny_base, tmp_path_factory):
    """A LoRA made with PEFT on the tiny base (random, so every layer changes), saved in diffusers' format and,
    converted, in kohya's; with the update of every attention layer it makes."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from shared.base import load_base
    from shared.exchange import to_kohya

    root = tmp_path_factory.mktemp("outside")
    base = load_base(tiny_base)
    torch.manual_seed(5)
    # scale 1 (alpha = rank): diffusers' own file format carries no alpha
    base.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=OUTSIDE_TARGETS, init_lora_weights=False))
    base.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "out_proj"], init_lora_weights=False))
    unet_state = get_peft_model_state_dict(base.unet)
    text_state = {k if k.startswith("text_model.") else f"text_model.{k}": v  # CLIPTextModel's module names
                  for k, v in get_peft_model_state_dict(base.text_encoder).items()}
    StableDiffusionPipeline.save_lora_weights(root / "diffusers", unet_lora_layers=unet_state,
                                              text_encoder_lora_layers=text_state, safe_serialization=True)
    updates = {}
    for prefix, model in (("unet", base.unet), ("text_encoder", base.text_encoder)):
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                updates[f"{prefix}.{name}"] = module.get_delta_weight("default").detach().float()
    kohya = to_kohya({f"unet.{k}": v for k, v in unet_state.items()}, 1.0)  # kohya's alpha = scale x rank
    kohya |= to_kohya({f"text_encoder.{k}": v for k, v in text_state.items()}, 1.0)
    save_file(kohya, str(root / "kohya.safetensors"))
    return root, updates
