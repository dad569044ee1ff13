"""The world's evaluator: a small CNN that tells, for an image or a box of it, which world concept (or none),
which shape and which colour is there. Trained on clean renders of single objects (whole scenes and box
crops of multi-object scenes, resized to 32 px); weights in one safetensors file with its label lists.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file

from shared.atomic import staged_dir
from shared.errors import UserError
from shared.validate import check_tensors, number, parse_json
from world.concepts import CONCEPTS, concept_scene
from world.scenes import COLOURS, SHAPES, Scene, random_scene, render

INPUT = 32
SHAPE_LABELS = (*SHAPES, "other")
COLOUR_LABELS = tuple(COLOURS)
CONCEPT_LABELS = ("none", *(c.name for c in CONCEPTS))
WEIGHTS_FILE = "evaluator.safetensors"


class Evaluator(torch.nn.Module):
    """Four conv blocks, global pooling, three heads (concept, shape, colour)."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width * 2, width * 2, width * 4):
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.GroupNorm(8, out), torch.nn.SiLU(),
                       torch.nn.MaxPool2d(2)]
            channels = out
        self.features = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({"concept": torch.nn.Linear(channels, len(CONCEPT_LABELS)),
                                          "shape": torch.nn.Linear(channels, len(SHAPE_LABELS)),
                                          "colour": torch.nn.Linear(channels, len(COLOUR_LABELS))})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x).mean(dim=(2, 3))
        return {name: head(h) for name, head in self.heads.items()}


def to_input(image: Image.Image, box: tuple[float, float, float, float] | None = None,
             margin: float = 0.15) -> torch.Tensor:
    """(3, INPUT, INPUT) in [-1, 1]: the whole image, or a box (top, left, bottom, right fractions) with a margin."""
    if box is not None:
        w, h = image.size
        top, left, bottom, right = box
        dy, dx = (bottom - top) * margin, (right - left) * margin
        side = max(bottom - top + 2 * dy, right - left + 2 * dx)
        cy, cx = (top + bottom) / 2, (left + right) / 2
        image = image.crop((int((cx - side / 2) * w), int((cy - side / 2) * h), int((cx + side / 2) * w),
                            int((cy + side / 2) * h)))
    pixels = np.asarray(image.convert("RGB").resize((INPUT, INPUT), Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def example(seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """One labelled training input: a single-object scene (whole), or a box crop of a multi-object scene;
    a third of them show a world concept."""
    rng = random.Random(seed)
    if rng.random() < 0.33:
        concept = CONCEPTS[rng.randrange(len(CONCEPTS))]
        scene, index = concept_scene(concept, seed)
        obj = scene.objects[index]
        labels = {"concept": CONCEPT_LABELS.index(concept.name),
                  "shape": SHAPE_LABELS.index(obj.shape if obj.shape in SHAPES else "other"),
                  "colour": COLOUR_LABELS.index(obj.colour)}
    else:
        scene = random_scene(seed)
        index = rng.randrange(len(scene.objects))
        obj = scene.objects[index]
        labels = {"concept": 0, "shape": SHAPE_LABELS.index(obj.shape), "colour": COLOUR_LABELS.index(obj.colour)}
    shot = render(scene)
    whole = len(scene.objects) == 1 and rng.random() < 0.6
    return to_input(shot.image, None if whole else shot.boxes[index]), labels


def batch(first: int, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    items = [example(s) for s in range(first, first + count)]
    x = torch.stack([i[0] for i in items])
    return x, {k: torch.tensor([i[1][k] for i in items]) for k in ("concept", "shape", "colour")}


def train_evaluator(out: Path, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                    show_progress: bool = True) -> dict:
    """Train the evaluator and write `out/evaluator.safetensors`; returns its held-out accuracies."""
    number("steps", steps, 1, 1_000_000, integer=True)
    number("batch_size", batch_size, 1, 4096, integer=True)
    torch.manual_seed(seed)
    model = Evaluator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start = time.monotonic()
    columns = (TextColumn("[bold]evaluator"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    losses = []
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("evaluator", total=steps, loss="-")
        for step in range(steps):
            x, y = batch(seed * 10_000_000 + step * batch_size, batch_size)
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
            logits = model(x)
            loss = sum(F.cross_entropy(logits[k], y[k]) for k in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            progress.update(task, completed=step + 1, loss=f"{np.mean(losses[-20:]):.4f}")
    model.eval()
    accuracy = held_out_accuracy(model)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "accuracy": accuracy,
              "seconds": round(time.monotonic() - start, 1)}
    with staged_dir(Path(out)) as stage:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stage / WEIGHTS_FILE),
                  metadata={"format": "mixshow-world-evaluator", "labels": json.dumps(
                      {"concept": CONCEPT_LABELS, "shape": SHAPE_LABELS, "colour": COLOUR_LABELS}),
                      "record": json.dumps(record)})
    return record


@torch.no_grad()
def held_out_accuracy(model: Evaluator, count: int = 1000) -> dict[str, float]:
    """Accuracy per head on renders whose seeds training never used."""
    x, y = batch(900_000_000, count)
    logits = model(x)
    return {k: float((logits[k].argmax(1) == y[k]).float().mean()) for k in logits}


class Judge:
    """A loaded evaluator: labels for images and boxes."""

    def __init__(self, folder: Path):
        path = Path(folder) / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{folder} has no {WEIGHTS_FILE}: train it with `mixshow make-world-evaluator`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if meta.get("format") != "mixshow-world-evaluator":
            raise UserError(f"{path} is not a world evaluator")
        check_tensors(tensors, str(path))
        labels = parse_json(meta.get("labels", ""), f"the labels of {path}")
        if labels != {"concept": list(CONCEPT_LABELS), "shape": list(SHAPE_LABELS), "colour": list(COLOUR_LABELS)}:
            raise UserError(f"{path} was trained for another world (its labels differ); rebuild it")
        self.model = Evaluator()
        self.model.load_state_dict(tensors)
        self.model.eval()
        self.record = parse_json(meta.get("record", "{}"), f"the record of {path}")

    @torch.no_grad()
    def labels(self, images: list[Image.Image], boxes: list[tuple[float, float, float, float] | None] | None = None
               ) -> list[dict[str, str]]:
        """Per image (or box of it): {"concept", "shape", "colour"}."""
        boxes = boxes or [None] * len(images)
        x = torch.stack([to_input(img, box) for img, box in zip(images, boxes)])
        logits = self.model(x)
        names = {"concept": CONCEPT_LABELS, "shape": SHAPE_LABELS, "colour": COLOUR_LABELS}
        picks = {k: logits[k].argmax(1).tolist() for k in logits}
        return [{k: names[k][picks[k][i]] for k in names} for i in range(len(images))]


def single_object_prompts(count: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """`count` seeded single-object prompts with the scene each describes (for prompt adherence)."""
    out = []
    for i in range(count):
        scene = random_scene(seed * 1_000_003 + i, n_objects=1, generic_noun_rate=0.0)
        out.append((scene.caption(), scene))
    return out
