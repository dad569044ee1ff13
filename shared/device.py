"""Device and dtype flags, parsed once with clear errors."""

from __future__ import annotations

import torch

from shared.errors import InvalidArgument

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_device(name: str) -> torch.device:
    """Turn 'cpu', 'cuda', 'cuda:1', 'mps' into a device that exists here."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgument("device", f"{name!r} is not a device name (try cpu, cuda, cuda:0)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device", f"{name}: CUDA is not available on this machine; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgument("device", f"{name}: MPS is not available on this machine; use cpu")
    return device


def parse_dtype(name: str, argument: str = "dtype") -> torch.dtype:
    """Turn 'float32' / 'fp16' / 'bf16' ... into a torch dtype (InvalidArgument naming `argument`)."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InvalidArgument(argument, f"{name!r} is not one of {', '.join(DTYPES)}") from None
