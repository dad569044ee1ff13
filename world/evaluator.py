"""The world's evaluator: a small CNN that tells, for an image or a box of it, which world concept (or none),
which shape and which colour is there. Trained on renders of single objects (whole scenes, box crops and
region strips of multi-object scenes, resized to 32 px), most of them degraded the way generated images
differ from clean renders (blur, lost resolution, colour shifts, noise); weights in one safetensors file with
its label lists.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter
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
    """(3, INPUT, INPUT) in [-1, 1]: the whole image, or a box (top, left, bottom, right fractions) with a margin,
    clipped to the image and padded to a square with the crop's own border colour (never with what lies beside
    the box, which may be another object)."""
    if box is not None:
        w, h = image.size
        top, left, bottom, right = box
        dy, dx = (bottom - top) * margin, (right - left) * margin
        x0, y0 = max(0, round((left - dx) * w)), max(0, round((top - dy) * h))
        x1, y1 = min(w, max(x0 + 1, round((right + dx) * w))), min(h, max(y0 + 1, round((bottom + dy) * h)))
        crop = np.asarray(image.convert("RGB").crop((x0, y0, x1, y1)))
        ch, cw = crop.shape[:2]
        border = np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])
        canvas = np.empty((max(ch, cw), max(ch, cw), 3), dtype=np.uint8)
        canvas[:] = np.median(border, axis=0).astype(np.uint8)
        oy, ox = (canvas.shape[0] - ch) // 2, (canvas.shape[1] - cw) // 2
        canvas[oy:oy + ch, ox:ox + cw] = crop
        image = Image.fromarray(canvas)
    pixels = np.asarray(image.convert("RGB").resize((INPUT, INPUT), Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """The image as a generator might draw it: blurred, at a lower resolution, colour-shifted, noisy (each
    with some probability); a quarter of the images stay clean."""
    if rng.random() < 0.25:
        return image
    w, h = image.size
    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.6)))
    if rng.random() < 0.4:
        side = rng.randint(20, 44)
        image = image.resize((side, side), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.85, 1.15))
    if rng.random() < 0.5:
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 10), (h, w, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return image


def region_of(shot, index: int, rng: random.Random) -> tuple[float, float, float, float] | None:
    """A full-height strip (a third to a half of the image wide) around object `index` that shows no more than
    a tenth of any other object, as regional prompts place concepts; None if there is none."""
    top, left, bottom, right = shot.boxes[index]
    width = max(right - left, rng.uniform(0.33, 0.5))
    centre = min(max((left + right) / 2, width / 2), 1 - width / 2)
    strip = (0.0, centre - width / 2, 1.0, centre + width / 2)
    size = shot.masks[index].shape[1]
    x0, x1 = int(strip[1] * size), int(np.ceil(strip[3] * size))
    for k, mask in enumerate(shot.masks):
        if k != index and mask.sum() > 0 and mask[:, x0:x1].sum() > 0.1 * mask.sum():
            return None
    return strip


def example(seed: int, degraded: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """One labelled training input: a single-object scene (whole), or a box crop or region strip of a
    multi-object scene; a third of them show a world concept; most are `degraded` (if asked)."""
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
    image = degrade(shot.image, rng) if degraded else shot.image
    if len(scene.objects) == 1 and rng.random() < 0.6:
        return to_input(image), labels
    box = (region_of(shot, index, rng) if rng.random() < 0.4 else None) or shot.boxes[index]
    return to_input(image, box), labels


def batch(first: int, count: int, degraded: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    items = [example(s, degraded) for s in range(first, first + count)]
    x = torch.stack([i[0] for i in items])
    return x, {k: torch.tensor([i[1][k] for i in items]) for k in ("concept", "shape", "colour")}


class TrainingBatches(torch.utils.data.Dataset):
    """Batch `step` of a training run: the same renders whichever process draws them."""

    def __init__(self, steps: int, batch_size: int, seed: int):
        self.steps, self.batch_size, self.seed = steps, batch_size, seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch(self.seed * 10_000_000 + step * self.batch_size, self.batch_size)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def train_evaluator(out: Path, steps: int = 3000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                    show_progress: bool = True, workers: int = 2) -> dict:
    """Train the evaluator and write `out/evaluator.safetensors`; returns its held-out accuracies.

    Rendering the scenes costs several times the training step, so `workers` processes render the batches
    while this one trains on one thread (measured here on 2 cores: 177 ms a step against 285 ms with the
    rendering in this process); the batches, and so the weights, do not depend on `workers`."""
    number("steps", steps, 1, 1_000_000, integer=True)
    number("batch_size", batch_size, 1, 4096, integer=True)
    number("workers", workers, 0, 64, integer=True)
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(TrainingBatches(steps, batch_size, seed), batch_size=None,
                                         num_workers=workers, worker_init_fn=_one_thread if workers else None,
                                         prefetch_factor=4 if workers else None)
    model = Evaluator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start = time.monotonic()
    columns = (TextColumn("[bold]evaluator"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    losses = []
    threads = torch.get_num_threads()
    if workers:
        torch.set_num_threads(1)  # the workers render on the other cores
    try:
        with Progress(*columns, disable=not show_progress) as progress:
            task = progress.add_task("evaluator", total=steps, loss="-")
            for step, (x, y) in enumerate(loader):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
                logits = model(x)
                loss = sum(F.cross_entropy(logits[k], y[k]) for k in logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                progress.update(task, completed=step + 1, loss=f"{np.mean(losses[-20:]):.4f}")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    accuracy = held_out_accuracy(model)
    degraded = held_out_accuracy(model, degraded=True)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "accuracy": accuracy,
              "accuracy_degraded": degraded,
              "seconds": round(time.monotonic() - start, 1)}
    with staged_dir(Path(out)) as stage:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stage / WEIGHTS_FILE),
                  metadata={"format": "mixshow-world-evaluator", "labels": json.dumps(
                      {"concept": CONCEPT_LABELS, "shape": SHAPE_LABELS, "colour": COLOUR_LABELS}),
                      "record": json.dumps(record)})
    return record


@torch.no_grad()
def held_out_accuracy(model: Evaluator, count: int = 1000, degraded: bool = False) -> dict[str, float]:
    """Accuracy per head on renders whose seeds training never used: clean, or degraded as in training."""
    x, y = batch(900_000_000, count, degraded)
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
