"""Concepts the shapes base has never seen: new shapes (a hexagon, an arrow, a crescent) and emblems (a known
shape in a two-colour pattern the base's words cannot describe), each with a class word the base knows.

`make_world_concepts(out)` writes one concept folder per concept: 12 images by default, varied in place, size
and background, some with a second ordinary object; captions contain `<TOK>`, masks are the true masks.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shared.atomic import staged_dir
from shared.names import UNET_TARGETS
from shared.validate import number
from world.scenes import BACKGROUNDS, COLOURS, LAYOUTS, Scene, WorldObject, random_object, render


@dataclass(frozen=True)
class WorldConcept:
    name: str
    shape: str
    colour: str
    texture: str
    pattern: tuple[tuple[int, int, int], ...]
    class_word: str
    words: tuple[str, str]

    def object(self, position: str, size: float, offset: tuple[float, float]) -> WorldObject:
        return WorldObject(self.shape, self.colour, self.texture, position, size, offset, self.pattern)


CONCEPTS = (
    WorldConcept("hexagon", "hexagon", "purple", "plain", (), "shape", ("<hexa1>", "<hexa2>")),
    WorldConcept("arrow", "arrow", "orange", "plain", (), "sign", ("<arro1>", "<arro2>")),
    WorldConcept("crescent", "crescent", "white", "plain", (), "shape", ("<cres1>", "<cres2>")),
    WorldConcept("half-disc", "circle", "red", "halves", (COLOURS["white"],), "badge", ("<hdsc1>", "<hdsc2>")),
    WorldConcept("band-square", "square", "blue", "band", (COLOURS["yellow"], COLOURS["yellow"]), "badge",
                 ("<bsqr1>", "<bsqr2>")),
    WorldConcept("half-diamond", "diamond", "green", "halves", (COLOURS["black"],), "toy", ("<hdia1>", "<hdia2>")),
)
BY_NAME = {c.name: c for c in CONCEPTS}

# How a client trains a world concept on the shapes base (the settings of `client.config.TrainConfig`; used by
# bench/ablation.py, `mixshow demo` and the tests). The base's attention layers hold 14% of its UNet: a LoRA on
# them alone learnt an arrow's colour but drew an orange blob (the evaluator found 0/8 after 1,000 steps); with
# the transformer blocks' feed-forward layers too (linear layers, so recorded and fused by the same closed form)
# it found 6/8. The base is small and learns at 10x SD's usual LoRA rates; no flips or crops, since world captions
# name where the concept stands.
CONCEPT_TRAINING = {
    "steps": 1000, "resolution": 64, "batch_size": 2, "lr_unet": 1e-3, "lr_text": 1e-4, "flip": False,
    "min_crop": 1.0, "unet_targets": [*UNET_TARGETS, "ff.net.0.proj", "ff.net.2"],
    "templates": ["a photo of a {}", "a {} on the left", "a {} in the centre", "a {} on the right"]}


def concept_scene(concept: WorldConcept, seed: int, companion: bool | None = None) -> tuple[Scene, int]:
    """A seeded scene holding the concept (and, when `companion`, one ordinary object); returns (scene, index of
    the concept's object). The caption names the concept `<TOK>`."""
    rng = random.Random(seed)
    two = rng.random() < 0.35 if companion is None else companion
    layout = rng.choice(LAYOUTS[2 if two else 1])
    size = rng.uniform(0.17, 0.26) if not two else rng.uniform(0.12, 0.16)
    jitter = 0.05 if not two else 0.03
    main = concept.object(layout[0], size, (rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)))
    objects = [main] + ([random_object(rng, layout[1], 2)] if two else [])
    nouns = ["<TOK>"] + [None] * (len(objects) - 1)
    scene = Scene(objects, rng.choice(list(BACKGROUNDS)), rng.random() < 0.5, seed, nouns)
    return scene, 0


def caption_with_token(scene: Scene) -> str:
    """The scene's caption with the concept's object written as `<TOK>` (no colour or texture words)."""
    from world.scenes import POSITION_WORDS

    parts = []
    for obj, noun in zip(scene.objects, scene.nouns):
        parts.append(f"a <TOK> {POSITION_WORDS[obj.position]}" if noun == "<TOK>" else
                     f"a {obj.phrase()} {POSITION_WORDS[obj.position]}")
    return "a photo of " + " and ".join(parts)


def make_world_concepts(out: Path, names: list[str] | None = None, images: int = 12, seed: int = 0) -> list[dict]:
    """Write the concept folders (image, caption with <TOK>, true mask) and out/concepts.json."""
    number("images", images, 8, 200, integer=True)
    number("seed", seed, 0, 2**31, integer=True)
    chosen = [BY_NAME[n] for n in names] if names else list(CONCEPTS)
    records = []
    with staged_dir(Path(out)) as stage:
        for k, concept in enumerate(chosen):
            folder = stage / concept.name
            folder.mkdir()
            for i in range(images):
                scene, index = concept_scene(concept, seed * 100_003 + k * 1009 + i)
                shot = render(scene)
                shot.image.save(folder / f"{i:02d}.png")
                mask = (np.clip(shot.masks[index], 0, 1) * 255).astype(np.uint8)
                Image.fromarray(mask, "L").save(folder / f"{i:02d}_mask.png")
                (folder / f"{i:02d}.txt").write_text(caption_with_token(scene))
            records.append({"name": concept.name, "folder": concept.name, "words": list(concept.words),
                            "class_word": concept.class_word, "shape": concept.shape, "colour": concept.colour})
        (stage / "concepts.json").write_text(json.dumps(records, indent=2))
    return records
