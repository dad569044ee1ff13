"""Toy concept datasets: small synthetic images of visibly distinct objects, with captions and masks.

Each concept is one shape in one colour with one texture, drawn at varying places and
sizes over varying backgrounds: enough for a tiny model to learn something recognisable.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from shared.atomic import staged_dir
from shared.errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 230), "green": (40, 180, 60), "yellow": (240, 210, 40),
           "purple": (150, 50, 200), "orange": (250, 140, 20)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
CLASSES = ("toy", "ball", "cube", "box", "cup", "vase")
BACKGROUNDS = {"grass": (90, 150, 70), "snow": (235, 240, 245), "beach": (230, 210, 160), "room": (150, 120, 100),
               "sky": (140, 190, 240)}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3, "diamond": 4, "cross": 12}[shape]
    if shape == "cross":
        a = r / 3
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a),
               (-a, -a)]
        return [(cx + x, cy + y) for x, y in pts]
    turn = math.pi / 4 if shape == "square" else -math.pi / 2
    return [(cx + r * math.cos(turn + 2 * math.pi * i / corners), cy + r * math.sin(turn + 2 * math.pi * i / corners))
            for i in range(corners)]


def draw_object(size: int, shape: str, colour: tuple, texture: str, bg: tuple, rng: random.Random
                ) -> tuple[Image.Image, Image.Image]:
    """One image of the object and its mask (white = object)."""
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    mask = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        mdraw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            mdraw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=0)
    else:
        mdraw.polygon(_polygon(shape, cx, cy, r), fill=255)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in bg)
    image = Image.new("RGB", (size, size), jitter)
    fill = Image.new("RGB", (size, size), colour)
    fdraw = ImageDraw.Draw(fill)
    dark = tuple(c // 3 for c in colour)
    step = max(3, size // 10)
    if texture == "striped":
        for x in range(-size, size * 2, step * 2):
            fdraw.polygon([(x, 0), (x + step, 0), (x + step + size, size), (x + size, size)], fill=dark)
    elif texture == "dotted":
        for x in range(step // 2, size, step * 2):
            for y in range(step // 2, size, step * 2):
                fdraw.ellipse((x, y, x + step, y + step), fill=dark)
    elif texture == "checkered":
        for x in range(0, size, step):
            for y in range(0, size, step):
                if (x // step + y // step) % 2:
                    fdraw.rectangle((x, y, x + step - 1, y + step - 1), fill=dark)
    image.paste(fill, (0, 0), mask)
    return image, mask


def make_toy_concepts(out: Path, n: int, images: int = 6, size: int = 64, seed: int = 0) -> list[dict]:
    """Write `n` concept folders (image + caption + mask) under `out`, plus out/concepts.json."""
    if not 1 <= n <= len(SHAPES):
        raise UserError(f"--n must be between 1 and {len(SHAPES)}, got {n}")
    rng = random.Random(seed)
    colours, textures = list(COLOURS), list(TEXTURES)
    concepts = []
    with staged_dir(Path(out)) as stage:
        for i in range(n):
            shape, colour, texture = SHAPES[i], colours[i % len(colours)], textures[i % len(textures)]
            name = f"{colour}-{shape}"
            folder = stage / name
            folder.mkdir()
            tag = f"{colour[:3]}{shape[:3]}"
            concepts.append({"name": name, "folder": name, "words": [f"<{tag}1>", f"<{tag}2>"],
                             "class_word": CLASSES[i % len(CLASSES)], "shape": shape, "colour": colour,
                             "texture": texture})
            for j in range(images):
                bg_name = rng.choice(list(BACKGROUNDS))
                image, mask = draw_object(size, shape, COLOURS[colour], texture, BACKGROUNDS[bg_name], rng)
                image.save(folder / f"{j:02d}.png")
                mask.save(folder / f"{j:02d}_mask.png")
                (folder / f"{j:02d}.txt").write_text(f"a photo of a <TOK>, on the {bg_name}")
        (stage / "concepts.json").write_text(json.dumps(concepts, indent=2))
    return concepts
