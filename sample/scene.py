"""A scene to sample (docs/sampling.md): global prompt, regions with boxes, spatial conditions, sampler
settings, read from YAML or built from flags; rendered with sample.regional and sample.conditions,
and drawn as an overlay so a person sees what went where."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

from sample.conditions import (
    KINDS,
    ConditionHook,
    ConditionSpec,
    LoadedCondition,
    check_condition,
    check_spec,
    check_weight,
)
from sample.regional import Box, RegionalProcessor, RegionLayout, install_regional_processors
from shared.base import Base
from shared.edlora import LayerwiseTextEncoder
from shared.errors import InvalidArgument, UserError
from shared.sampling import LIMITS, check_scheduler, check_setting, denoise, encode_prompts, latent_shape
from shared.validate import read_text


@dataclass
class Region:
    prompt: str
    box: Box
    negative: str = ""


@dataclass
class Scene:
    """Everything `mixshow sample` needs besides the model."""

    prompt: str
    negative: str = ""
    regions: list[Region] = field(default_factory=list)
    conditions: list[ConditionSpec] = field(default_factory=list)
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "dpm++"
    batch: int = 1
    model: Path | None = None
    base: Path | None = None
    concepts: list[Path] = field(default_factory=list)
    fused_lora: Path | None = None


SCENE_KEYS = {"model", "base", "concepts", "fused_lora", "prompt", "negative", "regions", "conditions", "seed",
              "steps", "guidance", "height", "width", "scheduler", "batch"}
REGION_KEYS = {"prompt", "negative", "box"}
CONDITION_KEYS = {"type", "model", "image", "weight", "boxes"}
BOX_WEIGHT_KEYS = {"box", "weight"}


def _check_keys(data, known: set[str], where: str) -> dict:
    if not isinstance(data, dict):
        got = "nothing (the document is empty)" if data is None else type(data).__name__
        raise UserError(f"{where} must be a mapping of keys ({', '.join(sorted(known))}), got {got}")
    unknown = sorted((k for k in data if k not in known), key=str)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    return data


def _list(value, where: str) -> list:
    """A list field: a list, or empty when absent or null."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _text(value, where: str) -> str:
    """A prompt field: a string, or empty when absent or null."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where} must be text, got {value!r}")
    if "\x00" in value:
        raise UserError(f"{where} contains a NUL character")
    return value


def _path(value, relative_to: Path, where: str) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise UserError(f"{where} must be a path (text), got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else relative_to / path


def _regions(items, where: str) -> list[Region]:
    regions = []
    for i, item in enumerate(_list(items, f"{where}: regions")):
        here = f"{where}: regions[{i}]"
        item = _check_keys(item, REGION_KEYS, here)
        if not isinstance(item.get("prompt"), str) or "box" not in item:
            raise UserError(f"{here} needs a 'prompt' (text) and a 'box' [top, left, bottom, right]")
        regions.append(Region(_text(item["prompt"], f"{here}.prompt"), Box.parse(item["box"], f"{here}.box"),
                              _text(item.get("negative"), f"{here}.negative")))
    return regions


def _conditions(items, where: str, relative_to: Path) -> list[ConditionSpec]:
    conditions = []
    for i, item in enumerate(_list(items, f"{where}: conditions")):
        here = f"{where}: conditions[{i}]"
        item = _check_keys(item, CONDITION_KEYS, here)
        missing = [k for k in ("type", "model", "image") if k not in item]
        if missing:
            raise UserError(f"{here} needs {', '.join(repr(k) for k in missing)}")
        if not isinstance(item["type"], str) or item["type"] not in KINDS:
            raise UserError(f"{here}.type {item['type']!r} is not one of {', '.join(KINDS)}")
        boxes = []
        for j, bw in enumerate(_list(item.get("boxes"), f"{here}.boxes")):
            bw = _check_keys(bw, BOX_WEIGHT_KEYS, f"{here}.boxes[{j}]")
            if "box" not in bw:
                raise UserError(f"{here}.boxes[{j}] needs a 'box' [top, left, bottom, right]")
            boxes.append((Box.parse(bw["box"], f"{here}.boxes[{j}].box"),
                          check_weight(bw.get("weight", 1.0), f"{here}.boxes[{j}].weight")))
        conditions.append(ConditionSpec(item["type"], _path(item["model"], relative_to, f"{here}.model"),
                                        _path(item["image"], relative_to, f"{here}.image"),
                                        check_weight(item.get("weight", 1.0), f"{here}.weight"), boxes))
    return conditions


def scene_from_dict(data: dict, where: str, relative_to: Path = Path(".")) -> Scene:
    """A Scene from parsed YAML (or the flags' values); relative paths are taken from the YAML file's folder.

    A bad sampler setting (seed, steps, guidance, height, width, batch, scheduler) is an InvalidArgument named
    by its key; everything else a UserError that starts with `where`."""
    data = _check_keys(data, SCENE_KEYS, where)
    if not isinstance(data.get("prompt"), str):
        raise UserError(f"{where}: 'prompt' (the global prompt, a string) is required")
    regions = _regions(data.get("regions"), where)
    conditions = _conditions(data.get("conditions"), where, relative_to)
    concepts = data.get("concepts") or []
    if isinstance(concepts, str):
        concepts = [concepts]
    if not isinstance(concepts, list):
        raise UserError(f"{where}: concepts must be a list of concept package folders")
    scene = Scene(prompt=_text(data["prompt"], f"{where}: prompt"), negative=_text(data.get("negative"),
                  f"{where}: negative"), regions=regions, conditions=conditions,
                  concepts=[_path(c, relative_to, f"{where}: concepts[{i}]") for i, c in enumerate(concepts)])
    for key in LIMITS:
        if key in data:
            setattr(scene, key, check_setting(key, data[key]))
    if "scheduler" in data:
        scene.scheduler = check_scheduler(data["scheduler"])
    for key in ("model", "base", "fused_lora"):
        if data.get(key) is not None:
            setattr(scene, key, _path(data[key], relative_to, f"{where}: {key}"))
    check_scene(scene, where)
    return scene


def read_scene(path: Path) -> Scene:
    """Parse and check a scene YAML file: UTF-8 text, YAML, a mapping of known keys of the right types and
    ranges; an error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument("config", f"{path} is not a file")
    try:
        text = read_text(path, "scene file")
    except UserError as exc:
        raise InvalidArgument("config", str(exc)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise InvalidArgument("config", f"{path} is not valid YAML ({detail})") from exc
    except RecursionError as exc:
        raise InvalidArgument("config", f"{path} nests too deeply to be a scene") from exc
    try:
        return scene_from_dict(data, str(path), path.resolve().parent)
    except InvalidArgument as exc:
        raise UserError(f"{path}: {exc.argument}: {exc.message}") from exc


def check_scene(scene: Scene, where: str) -> None:
    """The scene's settings are in range and its conditions well formed (no file is opened)."""
    check_scheduler(scene.scheduler)
    for key in LIMITS:
        check_setting(key, getattr(scene, key))
    for i, spec in enumerate(scene.conditions):
        check_spec(spec, f"{where}: conditions[{i}]")


def preflight(scene: Scene) -> None:
    """Open what a scene names before any model is loaded: each condition's model folder (its class) and image
    (readable, the scene's aspect ratio)."""
    for i, spec in enumerate(scene.conditions):
        check_condition(spec, scene.height, scene.width, f"condition {i + 1}")


# -- rendering -----------------------------------------------------------------------------------------------
def regional_processors(base: Base) -> RegionLayout:
    """The layout the UNet's regional processors read (installing them where the UNet has plain ones)."""
    procs = [p for p in base.unet.attn_processors.values() if isinstance(p, RegionalProcessor)]
    if procs:
        return procs[0].layout
    layout = RegionLayout()
    install_regional_processors(base.unet, base.tokenizer.model_max_length, layout)
    return layout


@torch.no_grad()
def render(base: Base, encoder: LayerwiseTextEncoder, scene: Scene, expand=lambda text: text,
           output_type: str = "pil", show_progress: bool = False) -> list[Image.Image] | torch.Tensor:
    """The scene's images. `expand` turns concept names in prompts into the model's words."""
    check_scene(scene, "scene")
    latent = latent_shape(base, 1, scene.height, scene.width)[-2:]  # the size checked before any work
    layout = regional_processors(base)
    batch = scene.batch
    texts = [expand(scene.prompt)] + [expand(r.prompt) for r in scene.regions]
    negatives = [expand(scene.negative)] + [expand(r.negative) for r in scene.regions]
    positive = torch.cat([encoder.encode([t] * batch) for t in texts], dim=1)
    negative = torch.cat([encoder.encode([t] * batch) for t in negatives], dim=1)
    pooled = None
    if base.arch == "sdxl":  # the time embedding reads the global prompt's pooled embedding
        pooled = (encode_prompts(encoder, [texts[0]] * batch)[1], encode_prompts(encoder, [negatives[0]] * batch)[1])
    factor = scene.height // latent[0]
    conditions = [LoadedCondition(spec, base.unet, factor, scene.height, scene.width, base.tokenizer.model_max_length)
                  for spec in scene.conditions]
    span = positive.shape[1] // len(texts)  # one prompt's layer-wise states: the global prompt's slot
    hook = ConditionHook(conditions, span).attach(base.unet) if conditions else None
    layout.set([r.box for r in scene.regions], (int(latent[0]), int(latent[1])))
    try:
        return denoise(base, positive, negative, scene.seed, scene.steps, scene.guidance, scene.height, scene.width,
                       scene.scheduler, output_type, show_progress, pooled)
    finally:
        layout.set([], (0, 0))
        if hook is not None:
            hook.detach()


def _pixels(box: Box, w: int, h: int) -> tuple[float, float, float, float]:
    """The box in pixels (at least one pixel wide and high)."""
    x0, y0 = box.left * w, box.top * h
    return x0, y0, max(x0, box.right * w - 1), max(y0, box.bottom * h - 1)


COLOURS = ((230, 57, 70), (29, 120, 216), (42, 157, 80), (244, 162, 97), (131, 56, 236), (0, 150, 150))


def overlay(image: Image.Image, scene: Scene) -> Image.Image:
    """The image with every region's box outlined, tinted and labelled with its prompt, and the global prompt."""
    scale = max(1, 512 // max(image.size))
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    w, h = big.size
    canvas = Image.new("RGB", (w, h + 16 * (len(scene.regions) + 1) + 4), "white")
    canvas.paste(big, (0, 0))
    tint = Image.new("RGBA", big.size, (0, 0, 0, 0))
    draw_tint = ImageDraw.Draw(tint)
    draw = ImageDraw.Draw(canvas)
    for i, region in enumerate(scene.regions):
        colour = COLOURS[i % len(COLOURS)]
        b = region.box
        draw_tint.rectangle(_pixels(b, w, h), fill=(*colour, 60))
    canvas.paste(Image.alpha_composite(big.convert("RGBA"), tint).convert("RGB"), (0, 0))
    for i, region in enumerate(scene.regions):
        colour = COLOURS[i % len(COLOURS)]
        b = region.box
        draw.rectangle(_pixels(b, w, h), outline=colour, width=3)
        draw.text((b.left * w + 4, b.top * h + 2), str(i + 1), fill=colour)
        draw.text((4, h + 4 + 16 * i), f"{i + 1}: {region.prompt}"[:90], fill=colour)
    draw.text((4, h + 4 + 16 * len(scene.regions)), f"global: {scene.prompt}"[:90], fill="black")
    return canvas
