"""Sufficient statistics of a fusion, kept between versions (FUSED/fusion_state.safetensors).

Per client-side input site: S = Σ_i w_i Ĝ_i (+ the preservation Gram). Per concept and module:
up = s_i B_i, A_i, and A_i Ĝ_i. Adding a concept adds its terms, withdrawing one subtracts
them (its own package gives back its Ĝ_i); nothing else about other concepts is needed.
Text-side sites (cross-attention k/v) are not kept: the server recomputes their inputs with
each new fused text encoder.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.errors import InvalidArgument, UserError
from shared.fused_model import NAME_PATTERN
from shared.fusion import accumulate_site
from shared.grams import is_text_side, site_of
from shared.package import ConceptMeta
from shared.stats_file import Stats
from shared.tensor_files import save_tensors
from shared.validate import check_tensors, parse_json

TERM_KINDS = ("up", "down", "agram", "emb", "emb_2")


@functools.lru_cache(maxsize=64)
def _layout(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{key: (offset, shape)} of tensors laid end to end; one shared dict for every concept of the same layout."""
    index, offset = {}, 0
    for key, shape in shapes:
        index[sys.intern(key)] = (offset, shape)
        offset += math.prod(shape)
    return index


class PackedTensors(Mapping[str, torch.Tensor]):
    """Same-dtype tensors by name, kept in one flat buffer; each lookup is a view of it.

    A concept's terms are a few hundred small tensors (rank x width); as separate tensors each carries its own
    tensor object and allocation, which at 50 concepts cost as much memory again as the numbers. Here they cost
    one buffer per concept, and the index is shared by every concept of the same layers.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None):
        tensors = tensors or {}
        self._index = _layout(tuple((k, tuple(t.shape)) for k, t in tensors.items()))
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float64
        self._buffer = torch.cat([t.reshape(-1).to(dtype) for t in tensors.values()]) if tensors else \
            torch.zeros(0, dtype=dtype)

    def __getitem__(self, key: str) -> torch.Tensor:
        offset, shape = self._index[key]
        return self._buffer[offset:offset + math.prod(shape)].view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass
class ConceptTerms:
    """One concept's contribution: its LoRA factors and A_i Ĝ_i per module (model-qualified names)."""

    name: str
    weight: float
    up: Mapping[str, torch.Tensor] = field(default_factory=PackedTensors)  # "unet.<module>" -> s_i B_i
    down: Mapping[str, torch.Tensor] = field(default_factory=PackedTensors)  # -> A_i
    agram: Mapping[str, torch.Tensor] = field(default_factory=PackedTensors)  # -> A_i Ĝ_i (client-side modules)
    emb: dict[str, torch.Tensor] = field(default_factory=dict)  # word -> [n_layers, D]
    emb_2: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL's second encoder: word -> [n_layers, D2]


@dataclass
class FusionState:
    """S per site and every concept's terms, in fusion order."""

    S: dict[str, torch.Tensor] = field(default_factory=dict)  # "unet.<site>" -> float64 [d, d]
    concepts: list[ConceptTerms] = field(default_factory=list)

    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def add(self, meta: ConceptMeta, tensors: dict[str, torch.Tensor], stats: Stats | None, weight: float,
            dims: dict[str, int]) -> ConceptTerms:
        """Add a concept's terms; `dims` gives d_in per model-qualified module."""
        up, down, agram = {}, {}, {}
        for model, modules in meta.lora_groups():
            for module in modules:
                qual = f"{model}.{module}"
                A = tensors[f"{qual}.lora_A.weight"].to(torch.float64)
                B = tensors[f"{qual}.lora_B.weight"].to(torch.float64)
                up[qual], down[qual] = meta.lora_scale * B, A
        if stats is not None:
            for site, gram in self._client_grams(meta, stats, dims):
                quals = [qual for qual in down if _site(qual) == site]
                self.S[site], products = accumulate_site(self.S.get(site), gram, weight, [down[q] for q in quals])
                agram.update(zip(quals, products))
        terms = ConceptTerms(meta.name, weight, PackedTensors(up), PackedTensors(down), PackedTensors(agram))
        for word in meta.words:
            terms.emb[word] = tensors[f"emb.{word}"]
            if meta.encoders == 2:
                terms.emb_2[word] = tensors[f"emb_2.{word}"]
        self.concepts.append(terms)
        return terms

    def remove(self, name: str, meta: ConceptMeta, stats: Stats | None, dims: dict[str, int]) -> None:
        """Withdraw concept `name`: subtract its Grams (from its own stats) and drop its terms."""
        terms = next(c for c in self.concepts if c.name == name)
        if stats is not None:
            for site, gram in self._client_grams(meta, stats, dims):
                self.S[site] = self.S[site] - terms.weight * gram
        self.concepts.remove(terms)

    @staticmethod
    def _client_grams(meta: ConceptMeta, stats: Stats, dims: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
        """(site, Ĝ) of each client-side site, read one at a time (one Gram in memory, not the concept's all)."""
        seen = set()
        for model, modules in meta.lora_groups():
            for module in modules:
                qual = f"{model}.{module}"
                if is_text_side(module) or _site(qual) in seen:
                    continue
                seen.add(_site(qual))
                yield _site(qual), stats.normalised(stats.key_for(model, module), dims[qual])

    def save(self, path: Path, info: dict) -> None:
        meta = {"format": "mixshow-fusion-state",
                "concepts": json.dumps([{"name": c.name, "weight": c.weight} for c in self.concepts]),
                "info": json.dumps(info)}
        save_tensors(path, _StateTensors(self), meta)

    @classmethod
    def load(cls, path: Path) -> tuple[FusionState, dict]:
        """Read a fusion state, checked: format, metadata, float64/float32 finite tensors, every concept's terms."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InvalidArgument("from_dir", f"{path} is missing: a folder written by `mixshow fuse` is needed")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"fusion state {path} cannot be read ({exc}); the file is damaged") from exc
        if meta.get("format") != "mixshow-fusion-state":
            raise UserError(f"{path} is not a mixshow fusion state")
        check_tensors(tensors, str(path), (torch.float64, torch.float32))
        entries = parse_json(meta.get("concepts", ""), f"the metadata 'concepts' of {path}")
        info = parse_json(meta.get("info", ""), f"the metadata 'info' of {path}")
        if not isinstance(entries, list) or not isinstance(info, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str) and NAME_PATTERN.match(e["name"])
                and isinstance(e.get("weight"), (int, float))
                and not isinstance(e.get("weight"), bool) and math.isfinite(e["weight"]) and e["weight"] > 0
                for e in entries):
            raise UserError(f"fusion state {path}: its concept list is malformed; the file is damaged")
        # S and the embedding rows are cloned (the terms are copied into their buffers anyway): views of the
        # file's mapping would keep all of it mapped, and would change if the file were rewritten in place
        state = cls({k[2:]: v.clone() for k, v in tensors.items() if k.startswith("S.")})
        for site, S in state.S.items():
            if S.ndim != 2 or S.shape[0] != S.shape[1]:
                raise UserError(f"fusion state {path}: S.{site} is not a square matrix")
        for entry in entries:
            parts = {}
            for kind in TERM_KINDS:
                prefix = f"{kind}.{entry['name']}."
                parts[kind] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            terms = ConceptTerms(entry["name"], float(entry["weight"]), *(PackedTensors(parts[kind])
                                                                          for kind in ("up", "down", "agram")),
                                 *({k: v.clone() for k, v in parts[kind].items()} for kind in ("emb", "emb_2")))
            if set(terms.up) != set(terms.down) or not terms.emb:
                raise UserError(f"fusion state {path}: the terms of concept {terms.name!r} are incomplete")
            state.concepts.append(terms)
        return state, info


class _StateTensors(Mapping[str, torch.Tensor]):
    """A fusion state's tensors under their file names (`S.<site>`, `<kind>.<concept>.<key>`), each looked up
    when the writer asks for it: no dict of ten thousand views is built to save a 50-concept state."""

    def __init__(self, state: FusionState):
        self.state = state
        self.concepts = {c.name: c for c in state.concepts}

    def __getitem__(self, name: str) -> torch.Tensor:
        kind, _, rest = name.partition(".")
        if kind == "S":
            return self.state.S[rest].to(torch.float64)
        concept, _, key = rest.partition(".")  # concept names have no dots (fused_model.NAME_PATTERN)
        return getattr(self.concepts[concept], kind)[key]

    def __iter__(self) -> Iterator[str]:
        yield from (f"S.{site}" for site in self.state.S)
        for c in self.state.concepts:
            for kind in TERM_KINDS:
                yield from (f"{kind}.{c.name}.{key}" for key in getattr(c, kind))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _site(qual: str) -> str:
    model, _, module = qual.partition(".")
    return f"{model}.{site_of(module)}"
