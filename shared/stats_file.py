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
    tri16      lower triangle of the Cholesky factor L of Ĝ + δI (δ = 0 unless Ĝ is singular, then the
               smallest that factorises, kept in `delta.<key>` and subtracted on reading), each row
               quantised to 16 signed bits with its own float32 `scale.<key>`: a quarter of full32's
               bytes, L Lᵀ positive semi-definite by construction (rounding the Gram's own entries
               would not guarantee it), ~5x more precise than float16 entries
    tri24      the same with 24 bits per entry: the high 16 under the key (int16), the low 8 in
               `low.<key>` (uint8); three eighths of full32's bytes, float32-like precision
Packing `compact` (the default) picks, per tensor, the smallest of lowrank32, tri24 and tri32
whose round trip keeps the closed form's action on a lone concept, Ĝ (Ĝ + λI)⁻¹ at the default
λ, within COMPACT_TOLERANCE of that of the recorded float64 Gram (relative, Frobenius); if none
does, the most faithful. (Rounding a rank-deficient Gram to float32 entries moves it by more than
an exact float32 factor does: at SD 1.5's text encoder, 2.3e-3 against 3e-8.)
The fused weights are far more sensitive to Gram errors than the Grams are when the activations
are ill-conditioned (docs/fusion.md), so the choice is measured on each Gram, not assumed.
Reading validates shape, finiteness, symmetry and positive semi-definiteness.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import types
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shared.errors import InvalidArgument, UserError
from shared.tensor_files import save_tensors
from shared.validate import parse_json

STATS_FILE = "stats.safetensors"
PACKINGS = ("compact", "full32", "full64", "tri32", "tri24", "tri16", "lowrank32")
COMPACT_CANDIDATES = ("lowrank32", "tri24", "tri32")  # tri16: opt-in only (see docs/fusion.md)
DEFAULT_PACKING = "compact"
COMPACT_TOLERANCE = 2e-4  # 5x below the 1e-3 weight budget: the lone-concept proxy understates N-concept error


def gram_key(model: str, site: str) -> str:
    return f"gram.{model}.{site}"


def part_key(part: str, key: str) -> str:
    """Where an encoding's tensor `part` of the Gram `key` is stored: the Gram's own key, or `<part>.<key>`."""
    return key if part == "gram" else f"{part}.{key}"


def _cholesky_factor(normalised: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(lower Cholesky factor of Ĝ + δI, δ): δ = 0 when Ĝ is positive definite, else the smallest of
    1e-12, 1e-11, ... times its largest diagonal entry that lets the factorisation succeed."""
    d = normalised.shape[0]
    top = float(normalised.diagonal().max().clamp(min=1e-30))
    eye = torch.eye(d, dtype=torch.float64)
    for delta in [0.0] + [top * 10.0 ** e for e in range(-12, -2)]:
        factor, info = torch.linalg.cholesky_ex(normalised + delta * eye if delta else normalised)
        if int(info) == 0:
            return factor, delta
    raise UserError("a Gram is not positive semi-definite, so it cannot be packed; recompute the stats")


def _pack_factor(normalised: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """The lower triangle of the Cholesky factor, each row quantised to `bits` (16 or 24) signed bits with
    its own float32 scale: {"gram": int16 (the high 16 bits), "low": uint8 (the low 8, for 24), "scale"}."""
    factor, delta = _cholesky_factor(normalised)
    top = 2 ** (bits - 1) - 1
    scale = (factor.abs().amax(dim=1) / top).clamp(min=1e-30).to(torch.float32)
    i, j = torch.tril_indices(*factor.shape)
    q = torch.round(factor / scale.to(torch.float64)[:, None])[i, j].to(torch.int64)
    shift = torch.tensor([delta], dtype=torch.float64)
    if bits == 16:
        return {"gram": q.to(torch.int16).contiguous(), "scale": scale, "delta": shift}
    return {"gram": (q >> 8).to(torch.int16).contiguous(), "low": (q & 0xFF).to(torch.uint8).contiguous(),
            "scale": scale, "delta": shift}


def _unpack_factor(tensors: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    q = tensors["gram"].to(torch.float64)
    if "low" in tensors:
        q = q * 256 + tensors["low"].to(torch.float64)
    factor = torch.zeros(d, d, dtype=torch.float64)
    i, j = torch.tril_indices(d, d)
    factor[i, j] = q
    factor *= tensors["scale"].to(torch.float64)[:, None]
    gram = factor @ factor.T
    gram.diagonal().sub_(float(tensors["delta"][0]))  # the δI added to make the factorisation exist
    return gram


def _pack_lowrank(normalised: torch.Tensor, rows: int) -> torch.Tensor:
    """R [k, d] with RᵀR = Ĝ, k = min(rows, d): the top-k eigenpairs (the rest are zero up to rounding)."""
    values, vectors = torch.linalg.eigh(normalised)
    k = max(1, min(rows, normalised.shape[0]))
    top = values[-k:].clamp(min=0).sqrt()
    return (top[:, None] * vectors[:, -k:].T).to(torch.float32).contiguous()


def _encode(encoding: str, gram: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """One Gram G (float64, n = rows) as the tensors of `encoding`: "gram", and "scale"/"low" for tri16/24."""
    d, normalised = gram.shape[0], gram / max(rows, 1)
    if encoding in ("tri16", "tri24"):
        return _pack_factor(normalised, int(encoding[3:]))
    if encoding == "lowrank32":
        return {"gram": _pack_lowrank(normalised, rows)}
    if encoding == "tri32":
        i, j = torch.triu_indices(d, d)
        return {"gram": gram.to(torch.float32)[i, j].contiguous()}
    return {"gram": gram.to(torch.float64 if encoding == "full64" else torch.float32).contiguous()}


def _decode(encoding: str, tensors: dict[str, torch.Tensor], d: int, rows: int) -> torch.Tensor:
    """Ĝ = G / n back from one key's tensors, float64 [d, d]."""
    raw = tensors["gram"]
    if encoding in ("tri16", "tri24"):
        return _unpack_factor(tensors, d)
    if encoding == "lowrank32":
        factor = raw.to(torch.float64)
        return factor.T @ factor
    if encoding == "tri32":
        gram = torch.zeros(d, d, dtype=torch.float64)
        i, j = torch.triu_indices(d, d)
        gram[i, j] = raw.to(torch.float64)
        return (gram + gram.T - torch.diag(gram.diagonal())) / max(rows, 1)
    return raw.to(torch.float64) / max(rows, 1)


def _shapes(encoding: str, d: int, rows: int) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor an encoding stores."""
    triangle = (d * (d + 1) // 2,)
    return {"full32": {"gram": (d, d)}, "full64": {"gram": (d, d)}, "tri32": {"gram": triangle},
            "tri16": {"gram": triangle, "scale": (d,), "delta": (1,)},
            "tri24": {"gram": triangle, "low": triangle, "scale": (d,), "delta": (1,)},
            "lowrank32": {"gram": (min(max(rows, 1), d), d)}}.get(encoding, {})


_ITEM_BYTES = {"full32": 4, "full64": 8, "tri32": 4, "tri24": 2, "tri16": 2, "lowrank32": 4,  # the "gram" part
               "low": 1, "scale": 4, "delta": 8}


def _bytes(encoding: str, rows: int, d: int) -> int:
    """Bytes of the tensors an encoding stores for one d x d Gram of `rows` rows."""
    return sum(math.prod(shape) * _ITEM_BYTES[encoding if part == "gram" else part]
               for part, shape in _shapes(encoding, d, rows).items())


def _compact_choice(gram: torch.Tensor, rows: int) -> tuple[str, dict[str, torch.Tensor]]:
    """(encoding, its tensors): the smallest encoding whose Ĝ (Ĝ + λI)⁻¹ stays within COMPACT_TOLERANCE of
    the float64 Gram's (if none does, the most faithful one)."""
    from shared.fusion import projection

    d = gram.shape[0]
    target = projection(gram / max(rows, 1))
    tried = {}
    for encoding in sorted(COMPACT_CANDIDATES, key=lambda e: _bytes(e, rows, d)):
        tensors = _encode(encoding, gram, rows)
        moved = projection(_decode(encoding, tensors, d, rows)) - target
        error = float(moved.norm() / target.norm().clamp(min=1e-30))
        if error <= COMPACT_TOLERANCE:
            return encoding, tensors
        tried[encoding] = (error, tensors)
    best = min(tried, key=lambda e: tried[e][0])
    return best, tried[best][1]


def write_stats(path: Path, grams: dict[str, torch.Tensor], rows: dict[str, int], aliases: dict[str, str],
                info: dict, packing: str = DEFAULT_PACKING) -> None:
    """Write Grams (keyed `gram.<model>.<site>`) atomically: temp file, then rename."""
    if packing not in PACKINGS:
        raise InvalidArgument("packing", f"{packing!r} is not one of {', '.join(PACKINGS)}")
    tensors, meta = {}, {}
    for key, gram in grams.items():
        gram = gram.to(torch.float64)
        if rows[key] < 1:
            raise UserError(f"no input reached {key} while recording statistics; nothing to write")
        check_gram(gram / rows[key], f"the Gram recorded for {key}")
        if packing == "compact":
            encoding, parts = _compact_choice(gram, rows[key])
        else:
            encoding, parts = packing, _encode(packing, gram, rows[key])
        tensors.update({part_key(part, key): tensor for part, tensor in parts.items()})
        if packing != "full32":
            meta.update({f"pack.{key}": encoding, f"dim.{key}": str(gram.shape[0])})
    meta.update({f"rows.{k}": str(n) for k, n in rows.items()})
    meta.update({f"alias.{m}": k for m, k in aliases.items()})
    meta.update({"format": "mixshow-stats", "packing": packing, "info": json.dumps(info)})
    save_tensors(path, tensors, meta)


@functools.lru_cache(maxsize=64)
def _shared(items: frozenset[tuple[str, str | None]]) -> Mapping[str, str | None]:
    """One read-only dict for equal contents: a server holding fifty clients' stats of the same layers keeps
    their module -> Gram key table once, not fifty times."""
    return types.MappingProxyType({sys.intern(k): v if v is None else sys.intern(v) for k, v in sorted(items)})


class Stats:
    """A validated stats file: normalised Grams Ĝ = G / n (float64) by module, read on demand.

    Of its header only what reading a Gram needs is kept (the alias table, each Gram's encoding, count and
    width), shared between files with the same values; `meta` and `keys` read the header again when asked."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path} is missing: run `mixshow stats` for this package first")
        meta, keys = self._header()
        if meta.get("format") != "mixshow-stats":
            raise UserError(f"{self.path} is not a mixshow stats file")
        self.packing = meta.get("packing", "full32")
        # an alias whose Gram is absent maps to None: key_for refuses it when (and only if) it is asked for
        self.aliases = _shared(frozenset((k[len("alias."):], v if v in keys else None)
                                         for k, v in meta.items() if k.startswith("alias.")))
        self.entries = _shared(frozenset((k, v) for k, v in meta.items()
                                         if k.startswith(("pack.", "rows.", "dim."))))
        info = parse_json(meta.get("info", "{}"), f"the metadata 'info' of stats file {self.path}")
        if not isinstance(info, dict):
            raise UserError(f"stats file {self.path}: metadata 'info' is not a JSON object; recompute the stats")
        self.info = info

    def _header(self) -> tuple[dict[str, str], set[str]]:
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.metadata() or {}, set(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"stats file {self.path} is damaged or truncated ({exc}); recompute it") from exc

    @property
    def meta(self) -> dict[str, str]:
        """The file's metadata, read again."""
        return self._header()[0]

    @property
    def keys(self) -> set[str]:
        """The file's tensor names, read again."""
        return self._header()[1]

    def _int_meta(self, name: str, key: str) -> int:
        text = self.entries.get(f"{name}.{key}")
        if text is None or not text.isdigit() or int(text) < 1:
            raise UserError(f"stats file {self.path}: {name}.{key} is {text!r}, not a positive count; "
                            "recompute the stats")
        return int(text)

    def key_for(self, model: str, module: str) -> str:
        """The gram key that `<model>.<module>`'s input is stored under."""
        key = self.aliases.get(f"{model}.{module}")
        if key is None:
            raise UserError(f"stats file {self.path} has no Gram for {model}.{module}; recompute it")
        return key

    def encoding(self, key: str) -> str:
        return self.entries.get(f"pack.{key}", "full32")

    def dim(self, key: str) -> int:
        """d_in of the Gram stored under `key`, as written."""
        if f"dim.{key}" in self.entries:
            return self._int_meta("dim", key)
        with safe_open(str(self.path), framework="pt") as f:
            return int(f.get_slice(key).get_shape()[0])

    def rows(self, key: str) -> int:
        return self._int_meta("rows", key)

    def normalised(self, key: str, d_in: int) -> torch.Tensor:
        """Ĝ = G / n for `key`, float64 [d_in, d_in], checked."""
        encoding, n, d = self.encoding(key), self.rows(key), self.dim(key)
        shapes = _shapes(encoding, d, n)
        if not shapes:
            raise UserError(f"{self.path}: {key} has an unknown encoding {encoding!r}; recompute the stats")
        try:
            # numpy, then torch: safetensors' "pt" reads leak ~64 B each (measured), a stats file is read once per
            # site and concept, and its dtypes (int16, uint8, float32, float64) all exist in numpy
            with safe_open(str(self.path), framework="np") as f:
                tensors = {part: torch.from_numpy(f.get_tensor(part_key(part, key))) for part in shapes}
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"stats file {self.path} is damaged or truncated at {key} ({exc})") from exc
        allowed = {"gram": {"full64": torch.float64, "tri24": torch.int16, "tri16": torch.int16}.get(encoding,
                                                                                                   torch.float32),
                   "low": torch.uint8, "scale": torch.float32, "delta": torch.float64}
        for part, tensor in tensors.items():
            if tensor.dtype != allowed[part]:
                raise UserError(f"stats file {self.path}: {part_key(part, key)} is {tensor.dtype}, expected "
                                f"{allowed[part]} for {encoding}; recompute the stats")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserError(f"stats file {self.path}: {part_key(part, key)} contains NaN or Inf; recompute "
                                "the stats")
        got = {part: tuple(t.shape) for part, t in tensors.items()}
        if d != d_in or got != shapes:
            raise UserError(f"{self.path}: {key} holds a Gram of shape {got['gram']} ({encoding}), but the layer "
                            f"reads {d_in} features; the stats belong to another base")
        gram = _decode(encoding, tensors, d, n)
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
