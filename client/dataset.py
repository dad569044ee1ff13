"""A client's concept images: validation, loading, augmentation and caption handling.

Layout: `img.png` + `img.txt` (a UTF-8 caption containing `<TOK>`) + optional `img_mask.png`.

Images are turned into 8-bit RGB as follows (anything else is refused with a message):
- `RGB`, `L`, `1`, `CMYK`, `YCbCr`: Pillow's conversion; the EXIF orientation is applied first.
- 16-bit (`I;16`, `I;16B`, `I;16L`, `I;16N`): scaled to 8 bits (v / 257, rounded), not clipped.
- `I` (32-bit integers): read as 16-bit values (0..65535, scaled likewise); other values are refused.
- `F` (32-bit floats): values must be finite and in [0, 1] (scaled by 255).
- transparency (`RGBA`, `LA`, `PA`, `P` with a transparent colour, ...): composited on a white
  background (`BACKGROUND`); the alpha channel is not used as a mask (give `img_mask.png` for that).
Images must be at least `MIN_SIDE` pixels on their short side and at most `MAX_PIXELS` pixels.
Masks must be single-channel (`1`, `L`, 16-bit, `I`, `F` as above), the image's size, and not all black.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import InvalidArgument, UserError
from shared.validate import read_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
PLACEHOLDER = "<TOK>"
MIN_SIDE = 32  # pixels on the short side; smaller pictures carry too little detail to learn from
MAX_PIXELS = 40_000_000  # width x height; larger files are refused before decoding (decompression bombs)
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
MASK_MODES = ("1", "L", "I", "F", *SIXTEEN_BIT)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


@dataclass
class Example:
    path: Path
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    mask: torch.Tensor  # (1, H, W) in [0, 1]; all ones when the image has no mask
    caption: str  # with <TOK>


def _decode(path: Path) -> Image.Image:
    """The decoded first frame of `path`, EXIF orientation applied; size limits checked before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise UserError(f"image {path} is {width}x{height} pixels, more than the limit of "
                                    f"{MAX_PIXELS:,} pixels: scale it down (about 512-1024 px per side is enough)")
                img.load()
                return ImageOps.exif_transpose(img) or img.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UserError(f"image {path} is too large to decode safely ({exc}); scale it down") from exc
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot read image {path}: {exc}; fix or remove it") from exc


def _integers_to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """A 16-bit or 32-bit-integer single-channel image as mode L, scaled (0..65535 -> 0..255)."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UserError(f"image {path} (mode {img.mode}) has values {values.min()}..{values.max()}, outside the "
                        "16-bit range 0..65535: save it as an 8- or 16-bit image")
    return Image.fromarray(np.round(values / 257).astype(np.uint8), "L")


def _floats_to_8bit(img: Image.Image, path: Path) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 1)):
        raise UserError(f"image {path} is a floating-point image with values outside [0, 1] (or NaN): "
                        "save it as an 8-bit image")
    return Image.fromarray(np.round(values * 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """An opened image as 8-bit RGB, following the rules in this module's docstring."""
    mode = img.mode
    if mode in SIXTEEN_BIT or mode == "I":
        return _integers_to_8bit(img, path).convert("RGB")
    if mode == "F":
        return _floats_to_8bit(img, path).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    elif mode in ("PA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("LA").convert("RGBA")
    elif mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("RGB", "L", "1", "CMYK", "YCbCr"):
        return img.convert("RGB")
    raise UserError(f"image {path} has pixel mode {img.mode}, which mixshow does not read: save it as 8-bit RGB "
                    "(PNG or JPEG)")


def to_mask(img: Image.Image, path: Path) -> np.ndarray:
    """A single-channel mask image as float32 values in [0, 1]."""
    if img.mode not in MASK_MODES:
        raise UserError(f"mask {path} has pixel mode {img.mode} ({len(img.getbands())} channels): a mask must be "
                        "one channel, white = concept, black = background; save it as 8-bit grayscale")
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        img = _integers_to_8bit(img, path)
    elif img.mode == "F":
        img = _floats_to_8bit(img, path)
    values = np.asarray(img.convert("L"), dtype=np.float32) / 255
    if not values.any():
        raise UserError(f"mask {path} is all black (no concept pixel): paint the concept white, or delete the mask")
    return values


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
        image = to_rgb(_decode(path), path)
        if min(image.size) < MIN_SIDE:
            raise UserError(f"image {path} is {image.size[0]}x{image.size[1]} pixels, smaller than {MIN_SIDE} "
                            "on its short side: use a larger picture or remove it")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        mask_path = path.with_name(f"{path.stem}_mask.png")
        if mask_path.exists():
            mask_img = _decode(mask_path)
            if mask_img.size != image.size:
                raise UserError(f"mask {mask_path} is {mask_img.size[0]}x{mask_img.size[1]}, its image {path} is "
                                f"{image.size[0]}x{image.size[1]}: masks must be the size of their image")
            mask = torch.from_numpy(to_mask(mask_img, mask_path))[None]
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
