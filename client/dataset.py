"""A client's concept images: validation, loading, augmentation and caption handling.

Layout: `img.png` + `img.txt` (a caption containing `<TOK>`) + optional `img_mask.png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidArgument, UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PLACEHOLDER = "<TOK>"


@dataclass
class Example:
    path: Path
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    mask: torch.Tensor  # (1, H, W) in [0, 1]; all ones when the image has no mask
    caption: str  # with <TOK>


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; fix or remove it") from exc


def list_images(folder: Path) -> list[Path]:
    """Concept images in `folder` (masks excluded), sorted."""
    if not folder.is_dir():
        raise InvalidArgument("data", f"{folder} is not a folder")
    images = sorted(p for p in folder.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
    if not images:
        raise InvalidArgument("data", f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "add 5-20 pictures of the concept with captions")
    return images


def load_examples(folder: Path) -> list[Example]:
    """Read and check every image, caption and mask of a concept folder."""
    examples = []
    for path in list_images(Path(folder)):
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            raise UserError(f"missing caption for {path}: write {caption_path.name} containing {PLACEHOLDER}, "
                            f"e.g. 'a photo of a {PLACEHOLDER}'")
        caption = caption_path.read_text().strip()
        if PLACEHOLDER not in caption:
            raise UserError(f"caption {caption_path} does not contain {PLACEHOLDER}")
        image = _open(path, "RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        mask_path = path.with_name(f"{path.stem}_mask.png")
        if mask_path.is_file():
            mask_img = _open(mask_path, "L")
            if mask_img.size != image.size:
                raise UserError(f"mask {mask_path} is {mask_img.size}, its image {path} is {image.size}")
            mask = torch.from_numpy(np.asarray(mask_img, dtype=np.float32) / 255)[None]
        else:
            mask = torch.ones(1, *pixels.shape[1:])
        examples.append(Example(path, pixels, mask, caption))
    return examples


def augment(example: Example, resolution: int, generator: torch.Generator, min_scale: float = 0.7,
            flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random square crop (a `min_scale`..1 share of the short side), resize, optional horizontal flip."""
    pixels, mask = example.pixels, example.mask
    _, h, w = pixels.shape
    side = min(h, w)
    u = torch.rand(4, generator=generator).tolist()
    crop = max(1, int(side * (min_scale + (1 - min_scale) * u[0])))
    top, left = int((h - crop) * u[1]), int((w - crop) * u[2])
    both = torch.cat([pixels, mask])[:, top:top + crop, left:left + crop]
    both = F.interpolate(both[None], size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=True)[0]
    if flip and u[3] < 0.5:
        both = both.flip(-1)
    return both[:3].clamp(-1, 1), both[3:].clamp(0, 1)


def expand_caption(caption: str, phrase: str, generator: torch.Generator, shuffle: bool = True) -> str:
    """Put the concept's words in place of <TOK>; shuffle the comma-separated parts, words kept whole."""
    parts = [p.strip() for p in caption.replace(PLACEHOLDER, phrase).split(",") if p.strip()]
    if shuffle and len(parts) > 1:
        parts = [parts[i] for i in torch.randperm(len(parts), generator=generator).tolist()]
    return ", ".join(parts)
