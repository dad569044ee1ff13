"""The shapes world: seeded 64x64 scenes of 1-3 coloured, textured shapes at named places, with their
ground truth (objects, boxes, masks) and captions ("a red circle on the left and a blue square on the right").

Everything is a pure function of its seed: `random_scene(rng)` draws a scene description, `render(scene)`
draws it. Shapes are drawn at 4x and box-filtered down, so edges are smooth and every pixel's colour is
a deterministic mix of the object's and the background's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "ring")
COLOURS = {"red": (215, 35, 35), "green": (30, 160, 50), "blue": (35, 70, 220), "yellow": (240, 210, 30),
           "purple": (140, 40, 190), "orange": (245, 130, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
TEXTURE_WORDS = {"plain": "", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "centre": (0.5, 0.5)}
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                  "centre": "in the centre"}
# muted backgrounds, so white, black and every saturated colour stay visible on them
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (196, 180, 150), "teal": (70, 120, 120), "brown": (120, 90, 70),
               "slate": (90, 100, 120), "sand": (170, 160, 120)}
CLASS_WORDS = ("shape", "toy", "thing", "object", "sign", "badge")  # generic words the base learns for anything
SUPERSAMPLE = 4


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    texture: str
    position: str
    size: float  # radius as a share of the image side
    offset: tuple[float, float] = (0.0, 0.0)  # jitter of the centre, share of the side
    pattern: tuple[tuple[int, int, int], ...] = ()  # extra colours of an emblem (concepts only)

    def centre(self) -> tuple[float, float]:
        x, y = POSITIONS[self.position]
        return x + self.offset[0], y + self.offset[1]

    def phrase(self, noun: str | None = None) -> str:
        words = [self.colour, TEXTURE_WORDS.get(self.texture, ""), noun or self.shape]
        return " ".join(w for w in words if w)


@dataclass
class Scene:
    objects: list[WorldObject]
    background: str
    gradient: bool
    seed: int = 0
    nouns: list[str | None] = field(default_factory=list)  # per object: the word the caption uses (None: shape)

    def caption(self) -> str:
        nouns = self.nouns or [None] * len(self.objects)
        parts = [f"a {o.phrase(n)} {POSITION_WORDS[o.position]}" for o, n in zip(self.objects, nouns)]
        return " and ".join(parts)


@dataclass
class Rendered:
    image: Image.Image
    masks: list[np.ndarray]  # per object, float32 [H, W] in [0, 1] (after later objects cover it)
    boxes: list[tuple[float, float, float, float]]  # per object: top, left, bottom, right as fractions
    caption: str


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a shape of radius r around (cx, cy) (circles and rings are drawn as ellipses)."""
    if shape == "square":
        return [(cx - r * 0.8, cy - r * 0.8), (cx + r * 0.8, cy - r * 0.8), (cx + r * 0.8, cy + r * 0.8),
                (cx - r * 0.8, cy + r * 0.8)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a = r / 3
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a),
               (-a, -a)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * (y + 2) / 17))
        return pts
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "arrow":
        a = r * 0.35
        return [(cx - r, cy - a), (cx, cy - a), (cx, cy - r), (cx + r, cy), (cx, cy + r), (cx, cy + a),
                (cx - r, cy + a)]
    if shape == "crescent":
        return []  # drawn as two ellipses
    raise ValueError(f"unknown shape {shape!r}")


def draw_mask(shape: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    """The shape's mask (mode L, 255 inside) on a side x side canvas."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            draw.ellipse((cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5), fill=0)
        if shape == "crescent":
            draw.ellipse((cx - r * 0.45, cy - r * 1.05, cx + r * 1.35, cy + r * 0.75), fill=0)
    else:
        draw.polygon(outline(shape, cx, cy, r), fill=255)
    return mask


def fill_image(obj: WorldObject, side: int) -> Image.Image:
    """The object's colour with its texture over the whole canvas; an emblem's pattern (halves, a band cross)
    is laid out around the object's own centre, so it looks the same wherever the object stands."""
    colour = COLOURS[obj.colour]
    fill = Image.new("RGB", (side, side), colour)
    draw = ImageDraw.Draw(fill)
    second = obj.pattern[0] if obj.pattern else tuple(int(c * 0.35) if sum(colour) > 300 else min(255, c + 110)
                                                      for c in colour)
    step = side // 10
    if obj.texture == "striped":
        for x in range(-side, 2 * side, 2 * step):
            draw.polygon([(x, 0), (x + step, 0), (x + step + side, side), (x + side, side)], fill=second)
    elif obj.texture == "dotted":
        for x in range(step // 2, side, 2 * step):
            for y in range(step // 2, side, 2 * step):
                draw.ellipse((x, y, x + step, y + step), fill=second)
    elif obj.texture == "checkered":
        for x in range(0, side, step):
            for y in range(0, side, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=second)
    cx, cy = (v * side for v in obj.centre())
    band = obj.size * side * 0.3
    if obj.texture == "halves":  # emblem patterns: the left half in the second colour
        draw.rectangle((0, 0, cx, side), fill=second)
    elif obj.texture == "band":  # a cross of bands through the centre
        draw.rectangle((0, cy - band, side, cy + band), fill=second)
        if len(obj.pattern) > 1:
            draw.rectangle((cx - band, 0, cx + band, side), fill=obj.pattern[1])
    return fill


def background_image(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if not scene.gradient:
        return Image.new("RGB", (side, side), tuple(int(c) for c in base))
    other = np.clip(base + np.array([rng.uniform(-60, 60) for _ in range(3)]), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.arange(side) / (side - 1)  # a row and a column broadcast: the same values as a full mesh grid
    t = ((np.cos(angle) * (ramp[None, :] - 0.5) + np.sin(angle) * (ramp[:, None] - 0.5)) + 0.5)[..., None]
    pixels = base * (1 - t) + other * t
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render(scene: Scene, size: int = 64) -> Rendered:
    """Draw a scene; masks are the visible part of each object, boxes their bounding boxes."""
    side = size * SUPERSAMPLE
    rng = random.Random(scene.seed * 7919 + 17)
    canvas = background_image(scene, side, rng)
    masks = []
    for obj in scene.objects:
        cx, cy = (v * side for v in obj.centre())
        mask = draw_mask(obj.shape, cx, cy, obj.size * side, side)
        canvas.paste(fill_image(obj, side), (0, 0), mask)
        covered = np.asarray(mask, dtype=np.float32) / 255
        masks = [m * (1 - covered) for m in masks]
        masks.append(covered)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    small = [np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX),
                        dtype=np.float32) / 255 for m in masks]
    boxes = []
    for m in small:
        ys, xs = np.nonzero(m > 0.25)
        boxes.append((ys.min() / size, xs.min() / size, (ys.max() + 1) / size, (xs.max() + 1) / size) if len(ys)
                     else (0.0, 0.0, 0.0, 0.0))
    return Rendered(image, small, boxes, scene.caption())


def random_object(rng: random.Random, position: str, n_objects: int, shapes=SHAPES, colours=tuple(COLOURS)
                  ) -> WorldObject:
    size = {1: rng.uniform(0.16, 0.26), 2: rng.uniform(0.11, 0.16)}.get(n_objects, rng.uniform(0.09, 0.11))
    jitter = 0.06 if n_objects == 1 else 0.03
    return WorldObject(rng.choice(shapes), rng.choice(colours), rng.choice(TEXTURES), position, size,
                       (rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)))


LAYOUTS = {1: [("left",), ("right",), ("top",), ("bottom",), ("centre",)],
           2: [("left", "right"), ("top", "bottom"), ("right", "left"), ("bottom", "top")],
           3: [("left", "centre", "right"), ("top", "centre", "bottom"), ("right", "centre", "left")]}


def random_scene(seed: int, n_objects: int | None = None, generic_noun_rate: float = 0.1) -> Scene:
    """A seeded scene of 1-3 objects (n_objects: fixed count), its caption occasionally naming an object by a
    generic class word ("a red shape on the left"), so those words mean "some object" to the base."""
    rng = random.Random(seed)
    n = n_objects or rng.choice((1, 1, 2, 2, 3))
    layout = rng.choice(LAYOUTS[n])
    objects = [random_object(rng, p, n) for p in layout]
    nouns = [rng.choice(CLASS_WORDS) if rng.random() < generic_noun_rate else None for _ in objects]
    return Scene(objects, rng.choice(list(BACKGROUNDS)), rng.random() < 0.5, seed, nouns)


def caption_variants(scene: Scene, rng: random.Random) -> str:
    """The scene's caption, sometimes with a photo-style prefix (prompt words users write)."""
    prefix = rng.choice(("", "", "a photo of ", "a picture of ", "an image of "))
    return prefix + scene.caption()


def ordinary_prompts(count: int, seed: int = 0) -> list[str]:
    """Captions of `count` seeded scenes of 1-3 objects, some with a photo-style prefix: prompts that name no
    concept, on which a fusion keeps what the shapes base does (`fuse --preserve-prompts`)."""
    rng = random.Random(seed)
    return [caption_variants(random_scene(seed * 1_000_003 + 500_000 + i), rng) for i in range(count)]


def world_words() -> list[str]:
    """Every word a world caption or a common prompt uses (the tokenizer makes each one token)."""
    words = set(SHAPES) | set(COLOURS) | {w for w in TEXTURE_WORDS.values() if w} | set(CLASS_WORDS)
    words |= {w for phrase in POSITION_WORDS.values() for w in phrase.split()}
    words |= set(BACKGROUNDS) | {"a", "an", "and", "the", "of", "photo", "picture", "image", "with", "next", "to",
                                 "on", "in", "at", "painting", "drawing", "rendering", "close", "up", "good", "small",
                                 "big", "large", "one", "two", "three", "background", "left", "right", "top",
                                 "bottom", "centre", "center", "grass", "beach", "room", "dog", "cat", "man", "woman"}
    return sorted(words)
