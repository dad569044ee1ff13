"""Writing safetensors files with reproducible bytes, one tensor at a time.

Every safetensors file the project writes goes through `save_tensors`, which writes the format itself
(reading stays with the safetensors library, which validates what it reads). Two reasons:
- safetensors keeps a file's metadata in a hash map, so its `save_file` writes the same metadata keys in a
  different order from one process to the next and the file's sha256 changes; here they are sorted.
- `save_file` builds a numpy view and a spec for every tensor before writing any (about 2 KB each): a
  50-concept fusion state has 10,800 small tensors, and saving it cost 21 MiB on top of its 14 MiB of data.
  Here each tensor is written and let go in turn.
The bytes are the ones safetensors itself writes for the same tensors and sorted metadata: the JSON header
(metadata first, then the tensors in the order of their data) padded with spaces to a multiple of 8, the data
ordered widest dtype first, then by name, so that every tensor starts aligned to its item size
(tests/test_artefacts.py compares the two byte for byte).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from shared.atomic import file_beside

# safetensors' names, in the order it lays out the data (its dtype order, widest first)
DTYPE_NAMES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
               torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}
_RANK = {dtype: i for i, dtype in enumerate(DTYPE_NAMES)}


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file with reproducible bytes, atomically (a temporary name, then a rename).
    `tensors` may be any mapping; a tensor is looked up when it is written (and for its dtype and shape)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this writer does not convert byte order")
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES or t.layout != torch.strided:
            raise ValueError(f"tensor {name!r}: a dense tensor of {', '.join(map(str, DTYPE_NAMES))} is needed, "
                             f"not {t.layout} {t.dtype}")
    names = sorted(tensors, key=lambda k: (_RANK[tensors[k].dtype], k))

    def parts() -> Iterator[bytes]:  # the header's entries, made twice (to measure, then to write): never all held
        if metadata is not None:
            yield f'"__metadata__":{_json(dict(sorted(metadata.items())))}'.encode()
        offset = 0
        for name in names:
            t = tensors[name]
            size = t.numel() * t.element_size()
            yield (f'{_json(name)}:{{"dtype":"{DTYPE_NAMES[t.dtype]}","shape":{_json(list(t.shape))},'
                   f'"data_offsets":[{offset},{offset + size}]}}').encode()
            offset += size

    sizes = [len(part) for part in parts()]
    length = 2 + sum(sizes) + max(len(sizes) - 1, 0)  # braces and commas
    padding = -length % 8
    with file_beside(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", length + padding))
        fh.write(b"{")
        for i, part in enumerate(parts()):
            fh.write(b"," + part if i else part)
        fh.write(b"}" + b" " * padding)
        for name in names:
            fh.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
