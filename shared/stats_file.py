"""stats.safetensors: a concept's Grams, one tensor per input site (see docs/formats.md).

    gram.<model>.<site>     G = Σ x xᵀ of the site's input, float32 [d_in, d_in]
    metadata rows.<key>     the number of rows n summed into it
    metadata alias.<model>.<module> = gram key, for every module reading a site

Packing `tri32` stores the upper triangle of G in float32 (exact, half the bytes).
Packing `tri16` stores instead the lower triangle of the Cholesky factor L of Ĝ + δI
(Ĝ = G / n, δ = 1e-7 · max diag) as float16: ¼ of the bytes, and L Lᵀ is positive
semi-definite by construction, which rounding the Gram's own entries would not guarantee.
Reading validates shape, finiteness, symmetry and positive semi-definiteness.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.errors import UserError

PACKINGS = ("full32", "tri32", "tri16")


def gram_key(model: str, site: str) -> str:
    return f"gram.{model}.{site}"


def _pack_cholesky(gram: torch.Tensor) -> torch.Tensor:
    """fp16 lower triangle of the Cholesky factor of Ĝ + δI."""
    d = gram.shape[0]
    delta = 1e-7 * float(gram.diagonal().max().clamp(min=1e-30))
    factor = torch.linalg.cholesky(gram + delta * torch.eye(d, dtype=gram.dtype))
    i, j = torch.tril_indices(d, d)
    return factor[i, j].to(torch.float16).contiguous()


def _unpack_cholesky(packed: torch.Tensor, d: int) -> torch.Tensor:
    factor = torch.zeros(d, d, dtype=torch.float64)
    i, j = torch.tril_indices(d, d)
    factor[i, j] = packed.to(torch.float64)
    return factor @ factor.T


def write_stats(path: Path, grams: dict[str, torch.Tensor], rows: dict[str, int], aliases: dict[str, str],
                info: dict, packing: str = "full32") -> None:
    """Write Grams (keyed `gram.<model>.<site>`) atomically: temp file, then rename."""
    if packing not in PACKINGS:
        raise UserError(f"--pack {packing!r} is not one of {', '.join(PACKINGS)}")
    tensors = {}
    for key, gram in grams.items():
        if packing == "tri16":
            tensors[key] = _pack_cholesky(gram.to(torch.float64) / rows[key])
        elif packing == "tri32":
            i, j = torch.triu_indices(*gram.shape)
            tensors[key] = gram.to(torch.float32)[i, j].contiguous()
        else:
            tensors[key] = gram.to(torch.float32).contiguous()
    meta = {f"rows.{k}": str(n) for k, n in rows.items()}
    meta.update({f"alias.{m}": k for m, k in aliases.items()})
    meta.update({"format": "mixshow-stats", "packing": packing, "info": json.dumps(info)})
    if packing != "full32":
        meta.update({f"dim.{k}": str(g.shape[0]) for k, g in grams.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


class Stats:
    """A validated stats file: normalised Grams Ĝ = G / n (float64) by module, read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path} is missing: run `mixshow stats` for this package first")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.meta = f.metadata() or {}
                self.keys = set(f.keys())
        except (SafetensorError, OSError) as exc:
            raise UserError(f"stats file {self.path} is damaged or truncated ({exc}); recompute it") from exc
        if self.meta.get("format") != "mixshow-stats":
            raise UserError(f"{self.path} is not a mixshow stats file")
        self.packing = self.meta.get("packing", "full32")
        self.aliases = {k[len("alias."):]: v for k, v in self.meta.items() if k.startswith("alias.")}
        self.info = json.loads(self.meta.get("info", "{}"))

    def key_for(self, model: str, module: str) -> str:
        """The gram key that `<model>.<module>`'s input is stored under."""
        key = self.aliases.get(f"{model}.{module}")
        if key is None or key not in self.keys:
            raise UserError(f"stats file {self.path} has no Gram for {model}.{module}; recompute it")
        return key

    def dim(self, key: str) -> int:
        """d_in of the Gram stored under `key`, as written."""
        if self.packing != "full32":
            return int(self.meta[f"dim.{key}"])
        with safe_open(str(self.path), framework="pt") as f:
            return int(f.get_slice(key).get_shape()[0])

    def rows(self, key: str) -> int:
        return int(self.meta[f"rows.{key}"])

    def normalised(self, key: str, d_in: int) -> torch.Tensor:
        """Ĝ = G / n for `key`, float64 [d_in, d_in], checked."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"stats file {self.path} is damaged or truncated at {key} ({exc})") from exc
        n = self.rows(key)
        if self.packing != "full32":
            d = int(self.meta[f"dim.{key}"])
            if raw.shape != (d * (d + 1) // 2,) or d != d_in:
                raise UserError(f"{self.path}: {key} packs a {d}x{d} Gram, the layer reads {d_in} features")
            if self.packing == "tri16":
                gram = _unpack_cholesky(raw, d)
            else:
                gram = torch.zeros(d, d, dtype=torch.float64)
                i, j = torch.triu_indices(d, d)
                gram[i, j] = raw.to(torch.float64)
                gram = (gram + gram.T - torch.diag(gram.diagonal())) / max(n, 1)
        else:
            if tuple(raw.shape) != (d_in, d_in):
                raise UserError(f"{self.path}: {key} has shape {tuple(raw.shape)}, the layer reads {d_in} features "
                                f"so it must be ({d_in}, {d_in}); the stats belong to another base")
            gram = raw.to(torch.float64) / max(n, 1)
        check_gram(gram, f"{self.path}: {key}")
        return gram


def check_gram(gram: torch.Tensor, where: str) -> None:
    """Finite, symmetric and positive semi-definite (within float32 rounding), or a UserError."""
    if not bool(torch.isfinite(gram).all()):
        raise UserError(f"{where} contains NaN or Inf; recompute the stats")
    scale = gram.abs().max().clamp(min=1e-30)
    if float((gram - gram.T).abs().max() / scale) > 1e-4:
        raise UserError(f"{where} is not symmetric, so it is not a Gram matrix; recompute the stats")
    d = gram.shape[0]
    jitter = 1e-5 * float(gram.diagonal().max()) + 1e-30
    _, info = torch.linalg.cholesky_ex(gram + jitter * torch.eye(d, dtype=gram.dtype))
    if int(info) != 0:
        raise UserError(f"{where} is not positive semi-definite, so it is not a Gram matrix; recompute the stats")
