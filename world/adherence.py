"""Prompt adherence of a base on the shapes world: does a sample of "a red striped circle on the left" show a
red circle (by the evaluator), and on the left (by where its pixels differ from the background)?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from shared.base import Base
from shared.edlora import LayerwiseTextEncoder, TokenMap, cross_attention_layers, install_layer_processors
from shared.sampling import generate
from world.evaluator import Judge, single_object_prompts


def object_centre(image: Image.Image, threshold: float = 40.0) -> tuple[float, float] | None:
    """(x, y) as fractions: the centroid of the pixels far from the background, which is fitted as a linear
    gradient (the world's backgrounds are plain or linear) to the image's border; None when no pixel is."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = pixels.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h - 1, 1)
    edge = np.zeros((h, w), dtype=bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    design = np.stack([np.ones_like(xx), xx, yy], axis=-1)
    coef, *_ = np.linalg.lstsq(design[edge], pixels[edge], rcond=None)
    distance = np.linalg.norm(pixels - design @ coef, axis=2)
    ys, xs = np.nonzero(distance > threshold)
    if len(xs) < 4:
        return None
    return float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h


@dataclass
class Adherence:
    samples: int
    colour: float
    shape: float
    both: float
    position: float  # among "on the left" / "on the right" prompts
    position_samples: int


def plain_encoder(base: Base) -> LayerwiseTextEncoder:
    install_layer_processors(base.unet, base.tokenizer.model_max_length)
    return LayerwiseTextEncoder(base.tokenizer, base.text_encoder, TokenMap(len(cross_attention_layers(base.unet))))


@torch.no_grad()
def measure(base: Base, judge: Judge, count: int = 200, seed: int = 0, steps: int = 20, guidance: float = 4.0,
            batch: int = 25, scheduler: str = "dpm++") -> tuple[Adherence, list[Image.Image], list[str]]:
    """Sample `count` seeded single-object prompts and judge them; returns the shares and the images."""
    prompts = single_object_prompts(count, seed)
    encoder = plain_encoder(base)
    images: list[Image.Image] = []
    for start in range(0, count, batch):
        chunk = [p for p, _ in prompts[start:start + batch]]
        images += generate(base, encoder, chunk, seed=seed * 100_000 + start, steps=steps, guidance=guidance,
                           height=64, width=64, scheduler=scheduler)
    verdicts = judge.labels(images)
    colour = shape = both = 0
    position_hits = position_total = 0
    for (_, scene), verdict, image in zip(prompts, verdicts, images):
        obj = scene.objects[0]
        c, s = verdict["colour"] == obj.colour, verdict["shape"] == obj.shape
        colour, shape, both = colour + c, shape + s, both + (c and s)
        if obj.position in ("left", "right"):
            position_total += 1
            centre = object_centre(image)
            position_hits += centre is not None and ((centre[0] < 0.5) == (obj.position == "left"))
    return (Adherence(count, colour / count, shape / count, both / count,
                      position_hits / max(1, position_total), position_total), images, [p for p, _ in prompts])
