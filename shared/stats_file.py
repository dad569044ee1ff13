"""stats.safetensors: a concept's Grams, one tensor per input site (see docs/formats.md).

    gram.<model>.<site>     G = Σ x xᵀ of the site's input, float32 [d_in, d_in] (packing full32)
    metadata rows.<key>     the number of rows n summed into it
    metadata alias.<model>.<module> = gram key, for every module reading a site
    metadata pack.<key>     how that tensor is encoded (packings other than full32), dim.<key> its d_in

Encodings, per tensor:
    full32     G, float32 [d, d]
    full64     G, float64 [d, d]: the recorded Gram exactly, twice full32's bytes
    tri32      upper triangle of G, float32, 1-D: exact, half the bytes
    lowrank32  R with RᵀR = Ĝ = G / n, float32 [k, d], k = min(n, d), from an eigendecomposition
               in float64: exact to float32 rounding, and small when the site saw fewer rows than
               its width (the text encoder's ~176 rows at width 768)
    tri16      lower triangle of the Cholesky factor L of Ĝ + δI (δ = 1e-7·max diag), each row
               scaled to int16 by its own float32 `scale.<key>`: a quarter of the bytes, L Lᵀ
               positive semi-definite by construction (rounding the Gram's own entries would not
               guarantee it), and ~5x more precise than float16 entries (15 bits per row vs 11)
Packing `compact` (the default) picks, per tensor, the smallest of lowrank32, tri16 and tri32
whose round trip keeps the closed form's action on a lone concept, Ĝ (Ĝ + λI)⁻¹ at the default
λ, within COMPACT_TOLERANCE of that of the recorded float64 Gram (relative, Frobenius); if none
does, the most faithful. (Rounding a rank-deficient Gram to float32 entries moves it by more than
an exact float32 factor does: at SD 1.5's text encoder, 2.3e-3 against 3e-8.)
The fused weights are far more sensitive to Gram errors than the Grams are when the activations
are ill-conditioned (docs/fusion.md), so the choice is measured on each Gram, not assumed.
Reading validates shape, finiteness, symmetry and positive semi-definiteness.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.errors import UserError

PACKINGS = ("compact", "full32", "full64", "tri32", "tri16", "lowrank32")
DEFAULT_PACKING = "compact"
COMPACT_TOLERANCE = 2e-4  # 5x below the 1e-3 weight budget: the lone-concept proxy understates N-concept error
INT16_MAX = 32767


def gram_key(model: str, site: str) -> str:
    return f"gram.{model}.{site}"


def scale_key(key: str) -> str:
    return f"scale.{key}"


def _cholesky_factor(normalised: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of Ĝ + δI, δ raised tenfold until the factorisation succeeds."""
    d = normalised.shape[0]
    delta = 1e-7 * float(normalised.diagonal().max().clamp(min=1e-30))
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(normalised + delta * eye)
        if int(info) == 0:
            return factor
        delta *= 10
    raise UserError("a Gram is not positive semi-definite, so it cannot be packed; recompute the stats")


def _pack_tri16(normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int16 lower triangle of the row-scaled Cholesky factor, float32 scale per row)."""
    factor = _cholesky_factor(normalised)
    scale = (factor.abs().amax(dim=1) / INT16_MAX).clamp(min=1e-30).to(torch.float32)
    i, j = torch.tril_indices(*factor.shape)
    quantised = torch.round(factor / scale.to(torch.float64)[:, None]).to(torch.int16)
    return quantised[i, j].contiguous(), scale


def _unpack_tri16(packed: torch.Tensor, scale: torch.Tensor, d: int) -> torch.Tensor:
    factor = torch.zeros(d, d, dtype=torch.float64)
    i, j = torch.tril_indices(d, d)
    factor[i, j] = packed.to(torch.float64)
    factor *= scale.to(torch.float64)[:, None]
    return factor @ factor.T


def _pack_lowrank(normalised: torch.Tensor, rows: int) -> torch.Tensor:
    """R [k, d] with RᵀR = Ĝ, k = min(rows, d): the top-k eigenpairs (the rest are zero up to rounding)."""
    values, vectors = torch.linalg.eigh(normalised)
    k = max(1, min(rows, normalised.shape[0]))
    top = values[-k:].clamp(min=0).sqrt()
    return (top[:, None] * vectors[:, -k:].T).to(torch.float32).contiguous()


def _decode(encoding: str, tensors: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    """Ĝ back from one key's packed tensors (`gram`, and `scale` for tri16), float64."""
    raw = tensors["gram"]
    if encoding == "tri16":
        return _unpack_tri16(raw, tensors["scale"], d)
    if encoding == "lowrank32":
        factor = raw.to(torch.float64)
        return factor.T @ factor
    return raw.to(torch.float64)


def _encode(encoding: str, normalised: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """One Gram's packed tensors; tri32/full32 store Ĝ here, the caller scales them back to G."""
    if encoding == "tri16":
        packed, scale = _pack_tri16(normalised)
        return {"gram": packed, "scale": scale}
    if encoding == "lowrank32":
        return {"gram": _pack_lowrank(normalised, rows)}
    return {"gram": normalised.to(torch.float32)}


def _bytes(encoding: str, rows: int, d: int) -> int:
    triangle = d * (d + 1) // 2
    return {"lowrank32": 4 * min(rows, d) * d, "tri16": 2 * triangle + 4 * d, "tri32": 4 * triangle}[encoding]


def _compact_choice(normalised: torch.Tensor, rows: int) -> str:
    """The smallest encoding whose Ĝ (Ĝ + λI)⁻¹ stays within COMPACT_TOLERANCE of the float64 Gram's
    (if none does, the most faithful one)."""
    from shared.fusion import projection

    d = normalised.shape[0]
    target = projection(normalised)
    errors = {}
    for encoding in sorted(("lowrank32", "tri16", "tri32"), key=lambda e: _bytes(e, rows, d)):
        approx = _decode(encoding, _encode(encoding, normalised, rows), d)
        errors[encoding] = float((projection(approx) - target).norm() / target.norm().clamp(min=1e-30))
        if errors[encoding] <= COMPACT_TOLERANCE:
            return encoding
    return min(errors, key=errors.get)


def write_stats(path: Path, grams: dict[str, torch.Tensor], rows: dict[str, int], aliases: dict[str, str],
                info: dict, packing: str = DEFAULT_PACKING) -> None:
    """Write Grams (keyed `gram.<model>.<site>`) atomically: temp file, then rename."""
    if packing not in PACKINGS:
        raise UserError(f"--pack {packing!r} is not one of {', '.join(PACKINGS)}")
    tensors, meta = {}, {}
    for key, gram in grams.items():
        d = gram.shape[0]
        normalised = gram.to(torch.float64) / max(rows[key], 1)
        encoding = _compact_choice(normalised, rows[key]) if packing == "compact" else packing
        if encoding == "tri16":
            tensors[key], tensors[scale_key(key)] = _pack_tri16(normalised)
        elif encoding == "lowrank32":
            tensors[key] = _pack_lowrank(normalised, rows[key])
        elif encoding == "tri32":
            i, j = torch.triu_indices(d, d)
            tensors[key] = gram.to(torch.float32)[i, j].contiguous()
        else:
            tensors[key] = gram.to(torch.float64 if encoding == "full64" else torch.float32).contiguous()
        if packing != "full32":
            meta.update({f"pack.{key}": encoding, f"dim.{key}": str(d)})
    meta.update({f"rows.{k}": str(n) for k, n in rows.items()})
    meta.update({f"alias.{m}": k for m, k in aliases.items()})
    meta.update({"format": "mixshow-stats", "packing": packing, "info": json.dumps(info)})
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

    def encoding(self, key: str) -> str:
        return self.meta.get(f"pack.{key}", "full32")

    def dim(self, key: str) -> int:
        """d_in of the Gram stored under `key`, as written."""
        if f"dim.{key}" in self.meta:
            return int(self.meta[f"dim.{key}"])
        with safe_open(str(self.path), framework="pt") as f:
            return int(f.get_slice(key).get_shape()[0])

    def rows(self, key: str) -> int:
        return int(self.meta[f"rows.{key}"])

    def normalised(self, key: str, d_in: int) -> torch.Tensor:
        """Ĝ = G / n for `key`, float64 [d_in, d_in], checked."""
        encoding, n = self.encoding(key), self.rows(key)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw = f.get_tensor(key)
                scale = f.get_tensor(scale_key(key)) if encoding == "tri16" else None
        except (SafetensorError, OSError) as exc:
            raise UserError(f"stats file {self.path} is damaged or truncated at {key} ({exc})") from exc
        d = self.dim(key)
        expected = {"full32": (d, d), "full64": (d, d), "tri32": (d * (d + 1) // 2,), "tri16": (d * (d + 1) // 2,),
                    "lowrank32": (min(max(n, 1), d), d)}.get(encoding)
        if expected is None:
            raise UserError(f"{self.path}: {key} has an unknown encoding {encoding!r}; recompute the stats")
        if d != d_in or tuple(raw.shape) != expected or (scale is not None and tuple(scale.shape) != (d,)):
            raise UserError(f"{self.path}: {key} holds a Gram of shape {tuple(raw.shape)} ({encoding}), but the layer "
                            f"reads {d_in} features; the stats belong to another base")
        if encoding == "tri16":
            gram = _unpack_tri16(raw, scale, d)
        elif encoding == "lowrank32":
            factor = raw.to(torch.float64)
            gram = factor.T @ factor
        elif encoding == "tri32":
            gram = torch.zeros(d, d, dtype=torch.float64)
            i, j = torch.triu_indices(d, d)
            gram[i, j] = raw.to(torch.float64)
            gram = (gram + gram.T - torch.diag(gram.diagonal())) / max(n, 1)
        else:
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
