"""The one reader for users' images (training pictures and masks, condition sketches and poses, CLIP
references): any mode Pillow opens becomes 8-bit RGB (or a mask) by stated rules, or one clear error.

- `RGB`, `L`, `1`, `CMYK`, `YCbCr`: Pillow's conversion; the EXIF orientation is applied first.
- 16-bit (`I;16`, `I;16B`, `I;16L`, `I;16N`): scaled to 8 bits (v / 257, rounded), not clipped to white
  as Pillow's own `convert("RGB")` does.
- `I` (32-bit integers): read as 16-bit values (0..65535, scaled likewise); other values are refused.
- `F` (32-bit floats): values must be finite and in [0, 1] (scaled by 255).
- transparency (`RGBA`, `LA`, `PA`, `P` or `L`/`RGB` with a transparent colour): composited on the
  caller's background; the alpha channel is never used as a mask.
- any other mode is refused. Files larger than `MAX_PIXELS` are refused from their header, before
  decoding (decompression bombs); truncated or corrupt files are refused.
Masks must be single-channel (`1`, `L`, 16-bit, `I`, `F` as above).
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import UserError

MAX_PIXELS = 40_000_000  # width x height
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
MASK_MODES = ("1", "L", "I", "F", *SIXTEEN_BIT)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


def decode(path: Path, what: str = "image") -> Image.Image:
    """The decoded first frame of `path`, EXIF orientation applied; the size limit checked before decoding."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist (or is not a file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise UserError(f"{what} {path} is {width}x{height} pixels, more than the limit of "
                                    f"{MAX_PIXELS:,} pixels: scale it down (about 512-1024 px per side is enough)")
                if width < 1 or height < 1:
                    raise UserError(f"{what} {path} has no pixels ({width}x{height})")
                img.load()
                return ImageOps.exif_transpose(img) or img.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UserError(f"{what} {path} is too large to decode safely ({exc}); scale it down") from exc
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot read {what} {path}: {exc or type(exc).__name__}; fix or remove it") from exc


def _integers_to_8bit(img: Image.Image, path: Path, what: str) -> Image.Image:
    """A 16-bit or 32-bit-integer single-channel image as mode L, scaled (0..65535 -> 0..255)."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UserError(f"{what} {path} (mode {img.mode}) has values {values.min()}..{values.max()}, outside the "
                        "16-bit range 0..65535: save it as an 8- or 16-bit image")
    return Image.fromarray(np.round(values / 257).astype(np.uint8), "L")


def _floats_to_8bit(img: Image.Image, path: Path, what: str) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 1)):
        raise UserError(f"{what} {path} is a floating-point image with values outside [0, 1] (or NaN): "
                        "save it as an 8-bit image")
    return Image.fromarray(np.round(values * 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, path: Path, background: tuple[int, int, int] = WHITE, what: str = "image"
           ) -> Image.Image:
    """An opened image as 8-bit RGB, following the rules in this module's docstring."""
    mode = img.mode
    if mode in SIXTEEN_BIT or mode == "I":
        return _integers_to_8bit(img, path, what).convert("RGB")
    if mode == "F":
        return _floats_to_8bit(img, path, what).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    elif mode in ("PA", "La", "RGBa") or mode in ("L", "1", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    if img.mode in ("RGB", "L", "1", "CMYK", "YCbCr"):
        return img.convert("RGB")
    raise UserError(f"{what} {path} has pixel mode {img.mode}, which mixshow does not read: save it as 8-bit RGB "
                    "(PNG or JPEG)")


def open_image(path: Path, what: str = "image", background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image at `path` as 8-bit RGB (transparency on `background`), or a UserError naming `what` and the file."""
    return to_rgb(decode(path, what), Path(path), background, what)


def to_mask(img: Image.Image, path: Path) -> np.ndarray:
    """A single-channel mask image as float32 values in [0, 1]."""
    if img.mode not in MASK_MODES:
        raise UserError(f"mask {path} has pixel mode {img.mode} ({len(img.getbands())} channels): a mask must be "
                        "one channel, white = concept, black = background; save it as 8-bit grayscale")
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        img = _integers_to_8bit(img, path, "mask")
    elif img.mode == "F":
        img = _floats_to_8bit(img, path, "mask")
    return np.asarray(img.convert("L"), dtype=np.float32) / 255
