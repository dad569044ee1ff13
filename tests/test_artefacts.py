"""Published artefacts: the fused folder in the base's own dtype, the fusion state pulled only on request,
reproducible bytes, and a training preview that costs little."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from client.config import TrainConfig
from fixtures.tiny_base import make_tiny_base
from shared.base import load_base
from shared.checkpoints import publish, pull, pull_from_registry
from shared.fused_model import STATE_FILE, expand_prompt, load_fused
from shared.sampling import generate, image_grid
from shared.storage import open_store
from shared.tensor_files import save_tensors
from tests.conftest import TOY_WORDS, tiny_config


def dtypes_of(path) -> set[str]:
    """The dtypes a safetensors file's header lists."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_tensors_gives_the_same_bytes_whatever_the_metadata_order(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    keys = [f"key{i}" for i in range(12)]
    digests = set()
    for i in range(6):
        order = keys[i:] + keys[:i]  # the same metadata, given in another order each time
        save_tensors(tmp_path / f"{i}.safetensors", tensors, {k: k.upper() for k in order})
        digests.add(sha(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "0.safetensors"))["b"], tensors["b"])


def test_save_tensors_writes_the_bytes_safetensors_writes(tmp_path):
    """The project's one-tensor-at-a-time writer against safetensors' own save_file: every dtype it writes, a
    scalar, an empty tensor, a non-ASCII name; with and without (one key of) metadata. Same bytes, and every
    tensor reads back equal (so each one's data is where the header says, aligned as safetensors aligns it)."""
    from safetensors.torch import load_file, save_file

    from shared.tensor_files import DTYPE_NAMES

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t.{DTYPE_NAMES[d]}": (torch.randn(3, 5, generator=gen) * 100).to(d) for d in DTYPE_NAMES}
    tensors |= {"scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 4),
                "größe": torch.arange(7, dtype=torch.int16), "a.odd": torch.ones(3, dtype=torch.uint8),
                "strided": torch.arange(12.0).reshape(3, 4).T}
    for metadata in (None, {"format": "mixshow-test ü"}):
        ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
        save_tensors(ours, tensors, metadata)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata=metadata)
        assert ours.read_bytes() == theirs.read_bytes()
        back = load_file(str(ours))
        assert back.keys() == tensors.keys()
        assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="complex"):
        save_tensors(tmp_path / "bad.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
    assert not list(tmp_path.glob(".bad*"))


@pytest.fixture(scope="module")
def fp16_base(tiny_base, tmp_path_factory):
    """The tiny base stored in float16: the same weight values, so the same fingerprint."""
    path = make_tiny_base(tmp_path_factory.mktemp("fp16") / "tiny-sd-fp16", dtype=torch.float16)
    assert load_base(path).fingerprint == load_base(tiny_base).fingerprint
    return path


@pytest.mark.slow  # three fusions and two samplings
def test_fused_folder_follows_the_base_dtype_and_fp16_gives_the_fp32_image(fp16_base, tiny_base, three_packages,
                                                                         tmp_path):
    from server.fuse import fuse

    reports = {
        "fp16": fuse(fp16_base, three_packages, tmp_path / "fp16", show_progress=False),
        "fp32": fuse(tiny_base, three_packages, tmp_path / "fp32", show_progress=False),
        "fp16-as-fp32": fuse(fp16_base, three_packages, tmp_path / "fp16-as-fp32", out_dtype=torch.float32,
                             lora_dtype=torch.float32, show_progress=False)}
    for sub in ("unet", "text_encoder", "vae"):
        assert dtypes_of(next((tmp_path / "fp16" / sub).glob("*.safetensors"))) == {"F16"}
        assert dtypes_of(next((tmp_path / "fp32" / sub).glob("*.safetensors"))) == {"F32"}
        assert dtypes_of(next((tmp_path / "fp16-as-fp32" / sub).glob("*.safetensors"))) == {"F32"}
    assert dtypes_of(tmp_path / "fp16" / "fused_lora.safetensors") == {"F16"}
    assert dtypes_of(tmp_path / "fp16-as-fp32" / "fused_lora.safetensors") == {"F32"}
    assert load_base(tmp_path / "fp16").stored_dtype == torch.float16
    # the change stored in each choice, against the float64 change: float32 is near exact, float16 is not
    p16, p32 = reports["fp16"]["precision"], reports["fp16-as-fp32"]["precision"]
    assert p16["folder_dtype"] == "float16" and p32["folder_dtype"] == "float32"
    assert p32["folder_change_error"]["max"] < 1e-4 and p32["lora_change_error"]["max"] < 1e-6
    assert p16["lora_change_error"]["max"] < 2e-3 < p16["folder_change_error"]["max"]
    # fp16 and fp32 folders give the same image within the documented tolerance (docs/formats.md)
    images = {}
    for name in ("fp16", "fp16-as-fp32"):
        base, encoder, concepts = load_fused(tmp_path / name)
        prompt = expand_prompt(f"a photo of a <{concepts[0]['name']}>", concepts)
        images[name] = np.asarray(generate(base, encoder, [prompt], seed=3, steps=10, height=64, width=64)[0],
                                  dtype=np.float64)
    diff = np.abs(images["fp16"] - images["fp16-as-fp32"])
    assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 8, (diff.mean(), np.percentile(diff, 99))
    assert images["fp16"].std() > 5  # an image, not a flat field


def test_pull_leaves_the_fusion_state_unless_asked(fused_three, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    manifest = publish(store, fused_three["gradient"])
    state_entries = [e for e in manifest.server_files if e.key.endswith(STATE_FILE)]
    assert len(state_entries) == 1 and not any(e.key.endswith(STATE_FILE) for e in manifest.files)
    assert state_entries[0].sha256 == sha(fused_three["gradient"] / STATE_FILE)
    pull(store, tmp_path / "user", "latest")
    assert not (tmp_path / "user" / STATE_FILE).exists()
    pull(store, tmp_path / "server", "latest", with_state=True)
    want = tree_hashes(fused_three["gradient"])
    got = tree_hashes(tmp_path / "server")
    got.pop("manifest.pb")
    assert got == want
    # the state is covered by the manifest: a swapped state is refused
    (store.root / f"fused/{manifest.version}/{STATE_FILE}").write_bytes(b"not the state")
    from shared.storage import IntegrityError

    with pytest.raises(IntegrityError):
        pull(store, tmp_path / "bad", "latest", with_state=True)
    pull(store, tmp_path / "still-fine", "latest")  # without the state, the version is whole


def test_registry_lists_the_state_apart_and_presigns_it_on_request(fused_three, s3_env, tmp_path):
    from server.registry import serve

    store = open_store("s3://mixshow/artefacts")
    publish(store, fused_three["gradient"])
    server = serve(store, 0, poll_seconds=0.1)
    address = f"127.0.0.1:{server.mixshow_port}"
    try:
        from shared.registry_client import fetch_manifest

        plain = fetch_manifest(address)
        assert [e.key.rsplit("/", 1)[1] for e in plain.server_files] == [STATE_FILE]
        assert not plain.server_files[0].url and all(e.url for e in plain.files)
        assert fetch_manifest(address, with_state=True).server_files[0].url
        pull_from_registry(address, tmp_path / "user")
        assert not (tmp_path / "user" / STATE_FILE).exists() and (tmp_path / "user" / "concepts.json").is_file()
        pull_from_registry(address, tmp_path / "server", with_state=True)
        assert sha(tmp_path / "server" / STATE_FILE) == sha(fused_three["gradient"] / STATE_FILE)
    finally:
        server.stop(0)


@pytest.mark.slow  # two trainings, stats and fusions of the same inputs
def test_identical_runs_give_identical_bytes(tiny_base, toys, tmp_path):
    from client.stats import compute_stats
    from client.train import train_concept
    from server.fuse import fuse

    words, cls = TOY_WORDS["red-circle"]
    for run in ("a", "b"):
        pkg, _ = train_concept(tiny_base, toys / "red-circle", words, cls, tmp_path / run / "red-circle",
                               tiny_config(steps=12, preview="end", sample_steps=2), show_progress=False)
        compute_stats(load_base(tiny_base), pkg, samples=1, steps=4, seed=0, show_progress=False)
        fuse(tiny_base, [pkg], tmp_path / run / "fused", show_progress=False)
    for part in ("red-circle", "fused"):
        a, b = tree_hashes(tmp_path / "a" / part), tree_hashes(tmp_path / "b" / part)
        assert a.keys() == b.keys() and "samples/final.png" in tree_hashes(tmp_path / "a" / "red-circle")
        # concepts.json, and the copy of it in fused_lora.safetensors' metadata, name each package's own path
        differ = [k for k in a if a[k] != b[k] and k not in ("concepts.json", "fused_lora.safetensors")]
        assert not differ, differ
    from safetensors import safe_open

    loras = []
    for run in ("a", "b"):
        with safe_open(str(tmp_path / run / "fused" / "fused_lora.safetensors"), "pt") as fh:
            meta = json.loads(fh.metadata()["concepts"])
            for concept in meta["concepts"]:
                concept.pop("package")
            loras.append((meta, {k: fh.get_tensor(k) for k in fh.keys()}))  # noqa: SIM118
    assert loras[0][0] == loras[1][0] and loras[0][1].keys() == loras[1][1].keys()
    assert all(torch.equal(loras[0][1][k], loras[1][1][k]) for k in loras[0][1])
    # concepts.json names each package's own path; everything else in it is the same
    records = [json.loads((tmp_path / r / "fused" / "concepts.json").read_text()) for r in ("a", "b")]
    for record in records:
        for concept in record["concepts"]:
            concept.pop("package")
    assert records[0] == records[1]


def test_the_default_preview_never_dominates_a_short_run():
    short, long = TrainConfig(steps=3, resolution=64), TrainConfig(steps=1000, resolution=64)
    assert not short.preview_at_end and long.preview_at_end and long.preview_share <= 0.25
    assert TrainConfig(steps=3, preview="end").preview_at_end  # asked for: made whatever it costs
    assert not TrainConfig(steps=1000, preview="none").preview_at_end
    # the former default (3 prompts x 3 scales x 20 guided steps) was 95% of a 3-step run's denoiser work
    former = TrainConfig(steps=3, sample_prompts=3, sample_scales=[0, 0.7, 1], sample_steps=20)
    assert former.preview_share > 0.9 > 0.25 >= long.preview_share


def test_preview_flags_shape_the_grid(tiny_base, toys, tmp_path, monkeypatch, capsys):
    from tests.badinput import run_mixshow

    words, cls = TOY_WORDS["red-circle"]
    out = tmp_path / "pkg"
    code, _, err = run_mixshow(["train", "--base", tiny_base, "--data", toys / "red-circle", "--words", " ".join(words),
                                "--class-word", cls, "--out", out, "--steps", "2", "--resolution", "64",
                                "--preview", "end", "--preview-prompts", "2", "--preview-steps", "2",
                                "--preview-scales", "0,0.5,1", "--checkpoint-every", "0"], monkeypatch, capsys)
    assert code == 0, err
    grid = __import__("PIL.Image", fromlist=["Image"]).open(out / "samples" / "final.png")
    blank = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (64, 64))
    assert grid.size == image_grid([[blank] * 3] * 2, ["", ""], ["", "", ""]).size
    info = json.loads((out / "concept.json").read_text())["training"]
    assert (info["sample_prompts"], info["sample_steps"], info["sample_scales"]) == (2, 2, [0.0, 0.5, 1.0])
    assert "seconds" not in info  # no wall-clock figure inside a package
