"""Read a user's image (a condition sketch or pose, a CLIP reference) in any mode Pillow opens, or one clear error.

Pillow's own `convert("RGB")` clips 16-bit greyscale (`I;16`) to white and drops transparency onto whatever
colours the transparent pixels happen to hold; here 16- and 32-bit greyscale are scaled by their bit depth,
float images must lie in [0, 1], and transparent pixels are composited onto a stated background. EXIF
orientation is applied. Truncated files, files that are not images and images beyond `MAX_PIXELS` are refused
before any pixel is decoded where possible.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import UserError

MAX_PIXELS = 8192 * 8192  # far below Pillow's decompression-bomb limit of 2 x 89 M pixels
MAX_SIDE = 16384


def _as_float(img: Image.Image, what: str, path: Path) -> np.ndarray:
    """A single-channel high-bit-depth image (I;16*, I, F) as float32 in [0, 1]."""
    data = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        return (data / 65535.0).astype(np.float32)
    if img.mode == "I":  # 16-bit PNGs open as "I" in some Pillow versions; 32-bit ranges are not guessed
        if data.size and (data.min() < 0 or data.max() > 65535):
            raise UserError(f"{what} {path} is a 32-bit integer image with values outside [0, 65535]; save it as "
                            "an 8- or 16-bit PNG")
        return (data / 65535.0).astype(np.float32)
    if not np.isfinite(data).all() or (data.size and (data.min() < 0 or data.max() > 1)):
        raise UserError(f"{what} {path} is a floating-point image with values outside [0, 1] (or NaN); save it "
                        "as an 8- or 16-bit PNG")
    return data.astype(np.float32)


def _to_8bit_rgba(img: Image.Image, what: str, path: Path) -> Image.Image:
    """Any mode as RGBA (8 bits per channel), high bit depths scaled, palette/`transparency` applied."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        grey = np.rint(_as_float(img, what, path) * 255.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return img.convert("RGBA")
    return img.convert("RGB").convert("RGBA")


def open_image(path: Path, what: str, mode: str = "RGB", background: tuple[int, int, int] = (0, 0, 0)
               ) -> Image.Image:
    """The image at `path` as `mode` ("RGB" or "L"), transparent pixels composited onto `background`, EXIF
    orientation applied; a UserError naming `what` and the file when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist (or is not a file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                    raise UserError(f"{what} {path} is {w}x{h} pixels: too large (this program reads at most "
                                    f"{MAX_PIXELS // 1_000_000} M pixels, {MAX_SIDE} per side); scale it down")
                if w < 1 or h < 1:
                    raise UserError(f"{what} {path} has no pixels ({w}x{h})")
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgba = _to_8bit_rgba(img, what, path)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{what} {path} is too large to read safely ({exc}); scale it down") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        detail = str(exc) or type(exc).__name__
        raise UserError(f"{what} {path} cannot be read as an image ({detail}); give a complete PNG or JPEG") from exc
    flat = Image.new("RGBA", rgba.size, (*background, 255))
    rgb = Image.alpha_composite(flat, rgba).convert("RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)
