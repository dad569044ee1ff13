"""A client's concept images: validation, loading, augmentation and caption handling.

Layout: `img.png` + `img.txt` (a UTF-8 caption containing `<TOK>`) + optional `img_mask.png`.

Images and masks are read by `shared.images` (its docstring gives the rules for every pixel mode);
transparency is composited on white (`BACKGROUND`) and never used as a mask (give `img_mask.png` for
that). Images must be at least `MIN_SIDE` pixels on their short side; masks must be the image's size
and not all black.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import InvalidArgument, UserError
from shared.images import WHITE, decode, open_image, to_mask
from shared.validate import read_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
PLACEHOLDER = "<TOK>"
MIN_SIDE = 32  # pixels on the short side; smaller pictures carry too little detail to learn from
BACKGROUND = WHITE  # what transparent pixels are composited on


@dataclass
class Example:
    path: Path
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    mask: torch.Tensor  # (1, H, W) in [0, 1]; all ones when the image has no mask
    caption: str  # with <TOK>


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


def read_caption(path: Path) -> str:
    """A caption file's text (UTF-8, stripped), which must contain <TOK>."""
    caption_path = path.with_suffix(".txt")
    if not caption_path.is_file():
        raise UserError(f"missing caption for {path}: write {caption_path.name} containing {PLACEHOLDER}, "
                        f"e.g. 'a photo of a {PLACEHOLDER}'")
    caption = read_text(caption_path, "caption").lstrip("\ufeff").strip()
    if not caption:
        raise UserError(f"caption {caption_path} is empty: describe the picture with {PLACEHOLDER} where the "
                        f"concept goes, e.g. 'a photo of a {PLACEHOLDER}'")
    if PLACEHOLDER not in caption:
        raise UserError(f"caption {caption_path} does not contain {PLACEHOLDER}: put it where the concept goes, "
                        f"e.g. 'a photo of a {PLACEHOLDER}'")
    return caption


def load_examples(folder: Path) -> list[Example]:
    """Read and check every image, caption and mask of a concept folder."""
    examples = []
    for path in list_images(Path(folder)):
        caption = read_caption(path)
        image = open_image(path, "image", BACKGROUND)
        if min(image.size) < MIN_SIDE:
            raise UserError(f"image {path} is {image.size[0]}x{image.size[1]} pixels, smaller than {MIN_SIDE} "
                            "on its short side: use a larger picture or remove it")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        mask_path = path.with_name(f"{path.stem}_mask.png")
        if mask_path.exists():
            mask_img = decode(mask_path, "mask")
            if mask_img.size != image.size:
                raise UserError(f"mask {mask_path} is {mask_img.size[0]}x{mask_img.size[1]}, its image {path} is "
                                f"{image.size[0]}x{image.size[1]}: masks must be the size of their image")
            values = to_mask(mask_img, mask_path)
            if not values.any():
                raise UserError(f"mask {mask_path} is all black (no concept pixel): paint the concept white, or "
                                "delete the mask")
            mask = torch.from_numpy(values)[None]
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
