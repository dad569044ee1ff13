"""The shapes world, its committed base and evaluator: a world the system can see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.badinput import run_mixshow
from world.adherence import object_centre
from world.concepts import BY_NAME, CONCEPTS, concept_scene, make_world_concepts
from world.evaluator import Judge, TrainingBatches, batch, held_out_accuracy
from world.scenes import COLOURS, SHAPES, TEXTURES, random_scene, render

ROOT = Path(__file__).resolve().parents[1]
EVALUATOR = ROOT / "assets" / "world-evaluator"


def test_scenes_are_deterministic_and_their_ground_truth_fits():
    for seed in range(20):
        scene = random_scene(seed)
        a, b = render(scene), render(random_scene(seed))
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption
        for obj, mask, box in zip(scene.objects, a.masks, a.boxes):
            assert obj.colour in a.caption and obj.position.replace("centre", "centre") in a.caption
            ys, xs = np.nonzero(mask > 0.25)
            top, left, bottom, right = box
            assert ys.min() / 64 >= top - 1e-9 and (ys.max() + 1) / 64 <= bottom + 1e-9
            assert xs.min() / 64 >= left - 1e-9 and (xs.max() + 1) / 64 <= right + 1e-9
            cx, cy = obj.centre()
            assert left <= cx <= right and top <= cy <= bottom  # the box is around the object's centre
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(TEXTURES) == 4


def test_object_centre_finds_the_side():
    for seed in range(30):
        scene = random_scene(seed, n_objects=1)
        obj = scene.objects[0]
        centre = object_centre(render(scene).image)
        assert centre is not None
        assert abs(centre[0] - obj.centre()[0]) < 0.08 and abs(centre[1] - obj.centre()[1]) < 0.08


def test_world_concepts_are_written_with_true_masks(tmp_path):
    records = make_world_concepts(tmp_path / "c", ["hexagon", "half-disc"], images=8)
    assert [r["name"] for r in records] == ["hexagon", "half-disc"]
    folder = tmp_path / "c" / "half-disc"
    assert len(list(folder.glob("*_mask.png"))) == 8
    assert all("<TOK>" in p.read_text() for p in folder.glob("*.txt"))
    scene, index = concept_scene(BY_NAME["half-disc"], 0)
    assert scene.objects[index].pattern  # an emblem: a pattern the base's words cannot describe
    assert len(CONCEPTS) >= 6


@pytest.fixture(scope="module")
def judge():
    return Judge(EVALUATOR)


def test_evaluator_is_accurate_on_held_out_renders(judge):
    accuracy = held_out_accuracy(judge.model, 600)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_evaluator_batches_drawn_by_worker_processes_are_the_batches_of_one_process():
    """The evaluator's training renders its batches in worker processes: step k's batch is the same renders
    whichever process draws it, so the weights do not depend on the number of workers."""
    import torch

    batches = TrainingBatches(steps=3, batch_size=6, seed=1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2)
    for step, (x, y) in enumerate(loader):
        x0, y0 = batch(10_000_000 + step * 6, 6)
        assert torch.equal(x, x0) and all(torch.equal(y[k], y0[k]) for k in y0)
    assert step == 2
    assert not torch.equal(batches[0][0], batches[1][0])  # and steps do draw different renders


def test_make_shapes_base_help_quotes_the_real_defaults(monkeypatch, capsys):
    from world.shapes_base import BaseTraining

    code, out, _ = run_mixshow(["make-shapes-base", "--help"], monkeypatch, capsys)
    text = " ".join(out.replace("│", " ").split())
    defaults = BaseTraining()
    assert code == 0
    for flag, value in (("UNet + text-encoder steps", defaults.steps), ("autoencoder steps", defaults.vae_steps),
                        ("decoder-only steps", defaults.decoder_steps), ("phases", f"{defaults.minutes:g}")):
        assert f"{flag} (default {value})" in text, (flag, value, text)


def test_a_paused_and_resumed_shapes_base_training_ends_like_one_run(tmp_path):
    """`make-shapes-base` paused at UNet step 3 and run again ends with the weights and losses of one run straight
    through: the checkpoint holds the optimizer moments and the noise generator's state, not only the weights."""
    import torch
    from safetensors.torch import load_file

    from world.shapes_base import BaseTraining, make_shapes_base

    cfg = BaseTraining(vae_steps=2, vae_batch=2, decoder_steps=1, steps=5, batch=2, warmup=2, scenes=6,
                       checkpoint_every=2)
    straight = make_shapes_base(tmp_path / "straight", cfg, show_progress=False)
    paused = make_shapes_base(tmp_path / "resumed", cfg, show_progress=False, stop_at_step=3)
    assert paused["paused"] and paused["steps"] == 3 and not (tmp_path / "resumed").exists()
    resumed = make_shapes_base(tmp_path / "resumed", cfg, show_progress=False)
    assert resumed["steps"] == straight["steps"] == 5 and resumed["final_loss"] == straight["final_loss"]
    for part in ("unet", "text_encoder", "vae"):
        a, b = (load_file(str(next((tmp_path / run / part).glob("*.safetensors")))) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # resuming a pause on another schedule length would silently continue another run: refused
    import dataclasses

    from shared.errors import UserError

    make_shapes_base(tmp_path / "other", cfg, show_progress=False, stop_at_step=3)
    with pytest.raises(UserError, match="made for a 5-step schedule, not 7"):
        make_shapes_base(tmp_path / "other", dataclasses.replace(cfg, steps=7), show_progress=False)
