"""`mixshow eval clip` with a tiny CLIP built from config (the tiny base's tokenizer, 32 px images)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from sample.clip_eval import ClipScorer, reference_images
from sample.scene import Scene, render
from shared.fused_model import expand_prompt, load_fused
from shared.validate import parse_json
from tests.test_base_and_cli import run_cli


def build_tiny_clip(tiny_base, folder):
    """A tiny random CLIPModel folder (the tiny base's tokenizer, 32 px images) at `folder`."""
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_base / "tokenizer"))
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=77, **ids),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                           num_hidden_layers=2, image_size=32, patch_size=8),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    for f in (tiny_base / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tiny_base, tmp_path_factory):
    return build_tiny_clip(tiny_base, tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_scores_follow_their_definitions(tiny_clip, toys):
    scorer = ClipScorer(tiny_clip)
    refs = reference_images(toys / "red-circle")
    assert len(refs) == len(list((toys / "red-circle").glob("*.png"))) // 2  # images, not their masks
    emb = scorer.images(refs)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(refs)), atol=1e-5)
    # an image against itself alone: cosine 1
    assert abs(float(scorer.image_alignment(refs[:1], emb[:1])[0]) - 1.0) < 1e-5
    # text alignment is 2.5 * max(cos, 0), computed by hand from the model's own projections
    text = "a photo of a toy"
    cos = float(emb[0] @ scorer.texts([text])[0])
    assert abs(float(scorer.text_alignment(refs[:1], text)[0]) - 2.5 * max(cos, 0.0)) < 1e-5


def test_eval_clip_cli(tiny_clip, fused_three, toys, tmp_path, monkeypatch, capsys):
    out = tmp_path / "clip.json"
    args = ["eval", "clip", "--clip", str(tiny_clip), "--model", str(fused_three["gradient"]),
            "--concept", f"red-circle={toys / 'red-circle'}", "--concept", f"blue-square={toys / 'blue-square'}",
            "--prompt", "a photo of a {}", "--prompt", "a {} on the grass", "--seeds", "2", "--steps", "2",
            "--size", "64", "--json", str(out)]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "red-circle" in stdout and "image-alignment" in stdout
    results = parse_json(out.read_text(), str(out))  # strict JSON: no NaN
    for name, cls in (("red-circle", "toy"), ("blue-square", "ball")):
        r = results["concepts"][name]
        assert r["images"] == 4 and len(r["samples"]) == 4
        assert {s["class_prompt"] for s in r["samples"]} == {f"a photo of a {cls}", f"a {cls} on the grass"}
        mean = sum(s["text_alignment"] for s in r["samples"]) / 4
        assert abs(r["text_alignment"] - mean) < 1e-9
        assert sorted((s["prompt"], s["seed"]) for s in r["samples"]) == sorted(
            (p.replace("{}", f"<{name}>"), seed) for p in ("a photo of a {}", "a {} on the grass") for seed in (0, 1))
    # one sample recomputed independently: the scene rendered by the library and scored by a fresh scorer
    base, encoder, concepts = load_fused(fused_three["gradient"])
    scene = Scene(prompt="a {} on the grass".replace("{}", "<blue-square>"), seed=1, steps=2, height=64, width=64)
    image = render(base, encoder, scene, lambda t: expand_prompt(t, concepts))[0]
    scorer = ClipScorer(tiny_clip)
    sample = next(s for s in results["concepts"]["blue-square"]["samples"]
                  if s["seed"] == 1 and s["prompt"] == scene.prompt)
    assert abs(sample["text_alignment"] - float(scorer.text_alignment([image], "a ball on the grass")[0])) < 1e-5
    ref = scorer.images(reference_images(toys / "blue-square"))
    assert abs(sample["image_alignment"] - float(scorer.image_alignment([image], ref)[0])) < 1e-5
    # a concept the model lacks, a folder that is not CLIP: one clear error each
    bad = args.copy()
    bad[bad.index(f"red-circle={toys / 'red-circle'}")] = f"purple-star={toys / 'red-circle'}"
    code, _, err = run_cli(bad, monkeypatch, capsys)
    assert code == 2 and "lacks" in err
    bad = args.copy()
    bad[bad.index(str(tiny_clip))] = str(tmp_path)
    code, _, err = run_cli(bad, monkeypatch, capsys)
    assert code == 2 and "not a CLIP model folder" in err


def test_reference_images_in_every_mode(tmp_path):
    """16-bit greyscale is scaled (not clipped to white), transparency is composited onto white, masks are
    skipped, and the order is by file name."""
    import numpy as np
    from PIL import Image

    grey = (np.arange(32 * 32).reshape(32, 32) * 255 // (32 * 32 - 1)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "a_eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "b_sixteen.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[16:, :, 3] = 255  # bottom half opaque blue, top half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c_alpha.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "c_alpha_mask.png")
    eight, sixteen, alpha = (np.asarray(i).astype(int) for i in reference_images(tmp_path))
    assert np.abs(eight - sixteen).max() <= 1 and sixteen.min() == 0
    assert (alpha[:16] == 255).all()  # transparent: white
    assert (alpha[16:] == [0, 0, 255]).all()
