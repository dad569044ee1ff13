"""Writing safetensors files with reproducible bytes.

safetensors keeps a file's metadata in a hash map, so the same tensors and metadata come out with the
metadata keys in a different order from one process to the next, and the file's sha256 changes. Every
safetensors file the project writes goes through `save_tensors`: after safetensors has written the file, its
header is rewritten in place with the metadata keys sorted (tensor entries and data untouched), so the same
inputs give the same bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.atomic import file_beside


def _sorted_header(header: bytes, length: int) -> bytes:
    """`header` (JSON) with its metadata keys sorted, padded with spaces to `length` bytes."""
    data = json.loads(header)
    if "__metadata__" in data:
        data["__metadata__"] = dict(sorted(data["__metadata__"].items()))
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # a different escaping than safetensors' own; never seen, but never silently wrong
        raise RuntimeError("a safetensors header could not be re-serialised in place")
    return text + b" " * (length - len(text))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file with reproducible bytes, atomically (a temporary name, then a rename)."""
    with file_beside(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "r+b") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = _sorted_header(fh.read(length), length)
            fh.seek(8)
            fh.write(header)
