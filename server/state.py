"""Sufficient statistics of a fusion, kept between versions (FUSED/fusion_state.safetensors).

Per client-side input site: S = Σ_i w_i Ĝ_i (+ the preservation Gram). Per concept and module:
up = s_i B_i, A_i, and A_i Ĝ_i. Adding a concept adds its terms, withdrawing one subtracts
them (its own package gives back its Ĝ_i); nothing else about other concepts is needed.
Text-side sites (cross-attention k/v) are not kept: the server recomputes their inputs with
each new fused text encoder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.errors import InvalidArgument, UserError
from shared.fusion import accumulate_site
from shared.grams import is_text_side, site_of
from shared.package import ConceptMeta
from shared.stats_file import Stats
from shared.tensor_files import save_tensors
from shared.validate import check_tensors, parse_json

TERM_KINDS = ("up", "down", "agram", "emb", "emb_2")


@dataclass
class ConceptTerms:
    """One concept's contribution: its LoRA factors and A_i Ĝ_i per module (model-qualified names)."""

    name: str
    weight: float
    up: dict[str, torch.Tensor] = field(default_factory=dict)  # "unet.<module>" -> s_i B_i
    down: dict[str, torch.Tensor] = field(default_factory=dict)  # -> A_i
    agram: dict[str, torch.Tensor] = field(default_factory=dict)  # -> A_i Ĝ_i (client-side modules only)
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
        terms = ConceptTerms(meta.name, weight)
        for model, modules in meta.lora_groups():
            for module in modules:
                qual = f"{model}.{module}"
                A = tensors[f"{qual}.lora_A.weight"].to(torch.float64)
                B = tensors[f"{qual}.lora_B.weight"].to(torch.float64)
                terms.up[qual], terms.down[qual] = meta.lora_scale * B, A
        for word in meta.words:
            terms.emb[word] = tensors[f"emb.{word}"]
            if meta.encoders == 2:
                terms.emb_2[word] = tensors[f"emb_2.{word}"]
        if stats is not None:
            for site, gram in self._client_grams(meta, stats, dims):
                quals = [qual for qual in terms.down if _site(qual) == site]
                self.S[site], products = accumulate_site(self.S.get(site), gram, weight,
                                                         [terms.down[q] for q in quals])
                terms.agram.update(zip(quals, products))
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
        # not made contiguous here: save_tensors does it one tensor at a time, as it writes
        tensors = {f"S.{site}": s.to(torch.float64) for site, s in self.S.items()}
        for c in self.concepts:
            for kind in TERM_KINDS:
                for key, t in getattr(c, kind).items():
                    tensors[f"{kind}.{c.name}.{key}"] = t
        meta = {"format": "mixshow-fusion-state",
                "concepts": json.dumps([{"name": c.name, "weight": c.weight} for c in self.concepts]),
                "info": json.dumps(info)}
        save_tensors(path, tensors, meta)

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
                isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("weight"), (int, float))
                and not isinstance(e.get("weight"), bool) and math.isfinite(e["weight"]) and e["weight"] > 0
                for e in entries):
            raise UserError(f"fusion state {path}: its concept list is malformed; the file is damaged")
        state = cls({k[2:]: v for k, v in tensors.items() if k.startswith("S.")})
        for site, S in state.S.items():
            if S.ndim != 2 or S.shape[0] != S.shape[1]:
                raise UserError(f"fusion state {path}: S.{site} is not a square matrix")
        for entry in entries:
            terms = ConceptTerms(entry["name"], float(entry["weight"]))
            for kind in TERM_KINDS:
                prefix = f"{kind}.{terms.name}."
                getattr(terms, kind).update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            if set(terms.up) != set(terms.down) or not terms.emb:
                raise UserError(f"fusion state {path}: the terms of concept {terms.name!r} are incomplete")
            state.concepts.append(terms)
        return state, info


def _site(qual: str) -> str:
    model, _, module = qual.partition(".")
    return f"{model}.{site_of(module)}"
