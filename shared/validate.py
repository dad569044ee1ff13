"""Checks every reader and every entry point shares: finite tensors of the documented dtype, numbers
of the right type in their range, JSON that is valid JSON, text that is UTF-8."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from shared.errors import InvalidArgument, UserError


def check_tensors(tensors: dict[str, torch.Tensor], where: str,
                  dtypes: Iterable[torch.dtype] = (torch.float32,)) -> None:
    """Every tensor of the documented dtype(s) and finite, or a UserError naming the first bad one."""
    allowed = tuple(dtypes)
    for key, tensor in tensors.items():
        if tensor.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise UserError(f"{where}: tensor {key} is {str(tensor.dtype).replace('torch.', '')}, expected {names}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{where}: tensor {key} contains NaN or Inf; the file is damaged or its training "
                            "diverged")


def number(argument: str, value, low: float | None = None, high: float | None = None, *, integer: bool = False,
           low_open: bool = False, high_open: bool = False) -> float | int:
    """`value` as a finite number (an int when `integer`) within [low, high] (open ends if asked), or
    InvalidArgument naming `argument`. Booleans are not numbers here."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise InvalidArgument(argument, f"{value!r} is not {kind}")
    if not math.isfinite(value):
        raise InvalidArgument(argument, f"{value!r} is not finite")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise InvalidArgument(argument, f"{value!r} is outside {span}")
    return int(value) if integer else float(value)


def read_text(path: Path, what: str) -> str:
    """A file's text as UTF-8, or one clear error."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def read_json(path: Path, what: str) -> object:
    """A JSON file, parsed strictly (no NaN / Infinity), or one clear error."""
    return parse_json(read_text(path, what), f"{what} {path}")


def parse_json(text: str, where: str) -> object:
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{where} is not valid JSON ({exc})") from exc


def dumps_json(data: object, indent: int | None = 1) -> str:
    """Strict JSON: non-finite floats become null instead of the invalid `NaN`."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=indent, allow_nan=False)
