"""The committed shapes base: it loads through load_base, follows prompts, and learns concepts it never saw."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from shared.base import load_base
from world.adherence import measure, plain_encoder
from world.concepts import make_world_concepts
from world.evaluator import Judge

ROOT = Path(__file__).resolve().parents[1]
BASE, EVALUATOR = ROOT / "assets" / "shapes-base", ROOT / "assets" / "world-evaluator"


@pytest.fixture(scope="module")
def judge():
    return Judge(EVALUATOR)


@pytest.mark.slow  # 40 samples of 20 steps
def test_committed_base_loads_and_follows_single_object_prompts(judge):
    base = load_base(BASE)
    assert base.vae.config.scaling_factor != 0.18215  # its own, measured on the world's latents
    result, images, _ = measure(base, judge, count=40, seed=7, steps=20)
    assert result.both >= 0.8, result
    assert len({im.tobytes() for im in images}) == len(images)


@pytest.mark.slow  # a 175-step training on the shapes base
def test_a_world_concept_is_found_more_often_with_its_lora(judge, tmp_path, monkeypatch, capsys):
    """A brief ED-LoRA of the band-square (the world's concept-training settings, fewer and larger steps) on the
    shapes base: the evaluator finds it in more samples of the concept's prompt than of the base's own prompt with
    the class word (same seeds): the base has never seen a blue square crossed by two yellow bands."""
    from client.config import TrainConfig
    from client.train import train_concept
    from shared.package import apply_concept
    from shared.sampling import generate
    from world.concepts import CONCEPT_TRAINING

    make_world_concepts(tmp_path / "data", ["band-square"], images=12)
    shutil.copytree(BASE, tmp_path / "base")
    # a sixth of the world's steps at four times its UNet learning rate: found in 10/12 and 10/12 samples (seeds 3
    # and 11), none without, measured; with training seed 1, 6/12 and 4/12 (350 steps at 2e-3: 9/12 and 8/12, in
    # twice the training time); 1,000 steps at 1e-3 is the setting users get
    cfg = TrainConfig(**{**CONCEPT_TRAINING, "steps": 175, "lr_unet": 4e-3, "preview": "none", "checkpoint_every": 0})
    pkg, _ = train_concept(tmp_path / "base", tmp_path / "data" / "band-square", ["<bsqr1>", "<bsqr2>"], "badge",
                           tmp_path / "band-square", cfg, show_progress=False)
    base = load_base(tmp_path / "base")
    _, encoder = apply_concept(base, pkg)
    plain_base = load_base(tmp_path / "base")
    with torch.no_grad():
        tuned = generate(base, encoder, ["a photo of a <bsqr1> <bsqr2>"] * 12, seed=3, steps=20,
                         guidance=4.0, height=64, width=64)
        plain = generate(plain_base, plain_encoder(plain_base), ["a photo of a badge"] * 12, seed=3,
                         steps=20, guidance=4.0, height=64, width=64)
    found = sum(v["concept"] == "band-square" for v in judge.labels(tuned))
    without = sum(v["concept"] == "band-square" for v in judge.labels(plain))
    assert found >= 4 and found > without + 3, f"found in {found}/12 samples with its LoRA, {without}/12 without"
    # `mixshow eval concepts` gives the evaluator's verdict on the same model, and draws its grid
    from tests.badinput import run_mixshow

    code, out, err = run_mixshow(["eval", "concepts", "--base", tmp_path / "base", "--package", pkg, "--concept",
                                  "band-square", "--seeds", "4", "--evaluator", EVALUATOR, "--grid",
                                  tmp_path / "grid.png"], monkeypatch, capsys)
    assert code == 0, err
    line = next(row for row in out.splitlines() if "band-square" in row)
    from sample.scene import Scene, render

    expected = sum(v["concept"] == "band-square" for v in judge.labels(
        [render(base, encoder, Scene(prompt="a photo of a <bsqr1> <bsqr2>", seed=s, steps=20, guidance=4.0, height=64,
                                     width=64))[0] for s in range(4)]))
    assert f"{expected}/4" in line, (line, expected)
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.slow  # two 100-step trainings on the shapes base, two fusions, 32 samples
def test_preservation_prompts_keep_the_base_that_a_fusion_of_world_concepts_loses(judge, tmp_path):
    """Two world concepts fused by the closed form alone take the base's single-object prompts from ~90 % right to
    a few (the solve extrapolates the concepts' differences onto every other input); the Grams of 16 ordinary world
    captions, with target W0, keep them. Measured: 2/16 without, 16/16 with (both right, colour and shape)."""
    from client.config import TrainConfig
    from client.stats import compute_stats
    from client.train import train_concept
    from server.fuse import fuse
    from shared.fused_model import load_fused
    from world.concepts import BY_NAME, CONCEPT_TRAINING
    from world.scenes import ordinary_prompts

    names = ["band-square", "crescent"]
    make_world_concepts(tmp_path / "data", names, images=12)
    packages = []
    for seed, name in enumerate(names):
        concept = BY_NAME[name]
        cfg = TrainConfig(**{**CONCEPT_TRAINING, "steps": 100, "lr_unet": 4e-3, "preview": "none",
                             "checkpoint_every": 0, "seed": seed})
        pkg, _ = train_concept(BASE, tmp_path / "data" / name, list(concept.words), concept.class_word,
                               tmp_path / name, cfg, show_progress=False)
        compute_stats(load_base(BASE), pkg, samples=4, steps=20, seed=seed, show_progress=False)
        packages.append(pkg)
    both = {}
    for kept in (0, 16):
        folder = tmp_path / f"fused-{kept}"
        fuse(BASE, packages, folder, preserve=kept, preserve_prompts=ordinary_prompts(16) if kept else None,
             show_progress=False)
        model, _, _ = load_fused(folder, "cpu")
        both[kept] = measure(model, judge, count=16, seed=3)[0].both
    assert both[16] >= 0.8 and both[16] >= both[0] + 0.4, both
