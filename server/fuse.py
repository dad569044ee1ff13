"""The center node's fusion (docs/design.md §2.3): packages in, one fused model out.

Order, as in the method: (1) every concept's layer-wise tokens under collision-free names;
(2) text-encoder layers from the clients' Grams; (3) cross-attention k/v, whose inputs the
server computes itself with the *fused* text encoder on each concept's prompts; (4) UNet
spatial layers from the clients' Grams. Each layer: one Cholesky per input site (shared.fusion).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from server.kv_inputs import KVInputs
from server.preservation import GENERIC_PROMPTS, check_prompts, preservation_grams
from server.report import IdentityReport, layer_changes
from server.state import FusionState
from shared.atomic import check_fresh_output, staged_dir
from shared.base import Base, load_base
from shared.edlora import (
    LayerwiseTextEncoder,
    LayerwiseTextEncoderXL,
    TokenMap,
    add_tokens,
    check_new_words,
    cross_attention_layers,
    layer_token_names,
    token_slots,
)
from shared.errors import InvalidArgument, UserError
from shared.fused_model import CONCEPTS_FILE, LORA_FILE, NAME_PATTERN, STATE_FILE, qualified, read_concepts
from shared.fusion import DEFAULT_LAM, METHODS, Term, apply_lowrank, fuse_site
from shared.grams import group_sites, is_text_side, site_of
from shared.package import (
    EMBEDDING_KINDS,
    META_FILE,
    PACKAGE_FILES,
    WEIGHTS_FILE,
    ConceptMeta,
    check_against_base,
    fill_template,
    read_package,
)
from shared.stats_file import STATS_FILE, Stats
from shared.storage import sha256_file
from shared.tensor_files import save_tensors
from shared.validate import number

KV_ROWS = ("all", "concept")


@dataclass
class Source:
    """One concept to fuse: its package metadata and tensors, and its stats (None if unavailable)."""

    meta: ConceptMeta
    tensors: dict[str, torch.Tensor]
    stats: Stats | None
    path: Path
    sha256: dict[str, str] = field(default_factory=dict)


def read_source(path: Path, base: Base, need_stats: bool) -> Source:
    """Read and check a package against the base: format, fingerprint, name, LoRA shapes, and its stats
    file, which must have been recorded on this base for exactly this package's weights."""
    path = Path(path)
    meta, tensors = read_package(path)
    check_against_base(meta, tensors, base, path)
    if not NAME_PATTERN.match(meta.name):
        raise UserError(f"package {path} is named {meta.name!r}: fused concepts need lower-case names of letters, "
                        "digits, '-' and '_'")
    hashes = {name: sha256_file(path / name) for name in PACKAGE_FILES if (path / name).is_file()}
    has_stats = (path / STATS_FILE).is_file()
    stats = Stats(path / STATS_FILE) if need_stats or has_stats else None
    if stats is not None:
        if stats.info.get("base_fingerprint") != base.fingerprint:
            raise UserError(f"stats of {path} were recorded on another base; rerun `mixshow stats`")
        if stats.info.get("weights_sha256") != hashes[WEIGHTS_FILE]:
            raise UserError(f"{path / STATS_FILE} was computed for other weights than {path / WEIGHTS_FILE} "
                            "(its recorded sha256 differs); rerun `mixshow stats` on this package")
    return Source(meta, tensors, stats, path, hashes)


def base_models(base: Base) -> dict[str, torch.nn.Module]:
    """The base's adapted models by package prefix: the text encoder(s) and the UNet."""
    return {prefix: encoder for prefix, _, encoder in base.text_models()} | {"unet": base.unet}


def module_dims(base: Base) -> dict[str, int]:
    """d_in of every linear layer, by model-qualified name."""
    dims = {}
    for model_name, model in base_models(base).items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                dims[f"{model_name}.{name}"] = module.in_features
    return dims


def concept_record(src: Source, n_layers: int) -> dict:
    """The concepts.json entry of a concept."""
    meta = src.meta
    per_word = n_layers if meta.layerwise else 1
    tokens = {qualified(meta.name, w): layer_token_names(qualified(meta.name, w), per_word) for w in meta.words}
    record = {"name": meta.name, "words": meta.words, "tokens": tokens, "class_word": meta.class_word,
              "layerwise": meta.layerwise, "prompts": meta.prompts(), "prompt_templates": meta.prompt_templates,
              "text_modules": meta.text_modules, "unet_modules": meta.unet_modules, "rank": meta.rank,
              "lora_scale": meta.lora_scale, "package": str(src.path.resolve()), "sha256": src.sha256,
              "base_fingerprint": meta.base_fingerprint}
    if meta.encoders == 2:  # SDXL; SD 1.x records stay as they were
        record["text_modules_2"] = meta.text_modules_2
    if meta.token_layout != "block":
        record["token_layout"] = meta.token_layout
    return record


def token_layout_of(records: list[dict]) -> str:
    """The one token layout of the fused concepts (a fused model's layer slices mean one thing)."""
    layouts = {r.get("token_layout", "block") for r in records}
    if len(layouts) > 1:
        raise UserError(f"the concepts were trained with different token layouts ({', '.join(sorted(layouts))}): "
                        "a fused model needs one; retrain the packages with the same token_layout")
    return layouts.pop() if layouts else "block"


def qualified_prompts(record: dict) -> list[str]:
    phrase = " ".join(record["tokens"])
    return [fill_template(t, phrase) for t in record["prompt_templates"]]


class FusedChanges(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """Each fused layer's change W* − W0 = up @ down (float64), by model-qualified name.

    `up` is the layer's concepts' own s_i B_i side by side (times 1/N for 'average'), which the fusion state
    holds already; so only `down`, the solved half, is kept, and `up` is put together again when asked for. A
    change whose `up` is not exactly that is kept whole.
    """

    def __init__(self, state: FusionState):
        self.state = state
        self._kept: dict[str, tuple[float | None, torch.Tensor, torch.Tensor | None]] = {}

    def _stacked(self, qual: str) -> tuple[torch.Tensor, int]:
        ups = [c.up[qual].to(torch.float64) for c in self.state.concepts if qual in c.up]
        return torch.cat(ups, dim=1), len(ups)

    def keep(self, qual: str, up: torch.Tensor, down: torch.Tensor) -> None:
        stacked, owners = self._stacked(qual)
        scale = next((s for s in (1.0, 1.0 / owners) if torch.equal(up, s * stacked)), None)  # x 1.0 is exact
        self._kept[qual] = (scale, down, None if scale is not None else up)

    def __getitem__(self, qual: str) -> tuple[torch.Tensor, torch.Tensor]:
        scale, down, up = self._kept[qual]
        return (scale * self._stacked(qual)[0] if up is None else up), down

    def __iter__(self) -> Iterator[str]:
        return iter(self._kept)

    def __len__(self) -> int:
        return len(self._kept)


class Fusion:
    """Solves a fusion state onto a freshly loaded base and writes the FUSED folder."""

    row_form = True  # the n x n solve for text-side sites with fewer rows than width (same result, cheaper)

    def __init__(self, base: Base, state: FusionState, records: list[dict], method: str, lam: float,
                 preserve: list[str], kv_rows: str = "all", show_progress: bool = True):
        if method not in METHODS:
            raise InvalidArgument("method", f"{method!r} is not one of {', '.join(METHODS)}")
        if kv_rows not in KV_ROWS:
            raise InvalidArgument("kv_rows", f"{kv_rows!r} is not one of {', '.join(KV_ROWS)}")
        self.kv_rows = kv_rows
        self.base, self.state, self.records = base, state, records
        self.method, self.lam, self.preserve = method, lam, list(preserve)  # the preservation prompts
        self.layout = token_layout_of(records)
        self.slots = token_slots(base.unet, self.layout)  # the token slot each cross-attention block reads
        self.n_layers = max(self.slots) + 1
        self.models = base_models(base)
        self.change = FusedChanges(state)  # qual -> (up, down) float64, as solved
        self.w0: dict[str, torch.Tensor] = {}  # qual -> the base's weight before fusion (as loaded)
        self.kv_report: dict[str, dict[str, dict[str, float]]] = {}  # the report's k/v rows, by concept and layer
        self.kv_agram: dict[tuple[str, str], torch.Tensor] = {}  # (concept, qual) -> A Ĝ of a k/v layer, while solved
        self.show_progress = show_progress

    # -- the four steps ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.merge_tokens()
        # The server encodes the concepts' prompts for cross-attention k/v with the fused text encoder. A float64
        # copy, fused without rounding, makes those inputs independent of float32 rounding: an incremental
        # fusion then reproduces a fusion from scratch to float64 precision, not to float32 rounding times the
        # conditioning of the k/v solve.
        self.text64 = {prefix: copy.deepcopy(encoder).to(torch.float64)
                       for prefix, _, encoder in self.base.text_models()}
        with Progress(disable=not self.show_progress) as progress:
            for model in self.models:
                sites = self.sites(model, text_side=False)
                if model == "unet":
                    self.solve_text_side(progress)
                task = progress.add_task(f"fuse {model}", total=len(sites))
                for site, modules in sites.items():
                    self.solve_site(f"{model}.{site}", modules, self.state.S.get(f"{model}.{site}"))
                    progress.advance(task)

    def merge_tokens(self) -> None:
        tmap = TokenMap(self.n_layers)
        for record in self.records:
            tmap.words.update(record["tokens"])
        for (_, tokenizer, encoder), kind in zip(self.base.text_models(), EMBEDDING_KINDS):
            rows = {}
            for record, terms in zip(self.records, self.state.concepts):
                for word, q in zip(record["words"], record["tokens"]):
                    rows[q] = getattr(terms, kind)[word][: len(tmap.words[q])]
            check_new_words(tokenizer, list(tmap.words), self.n_layers, self.base.source)
            add_tokens(tokenizer, encoder, tmap, rows)
        self.token_map = tmap

    def kv_encoder(self) -> LayerwiseTextEncoder | LayerwiseTextEncoderXL:
        """The layer-wise encoder over the float64 fused text encoder(s): the inputs of cross-attention k/v."""
        if len(self.text64) == 1:
            return LayerwiseTextEncoder(self.base.tokenizer, self.text64["text_encoder"], self.token_map)
        return LayerwiseTextEncoderXL(*(LayerwiseTextEncoder(tokenizer, self.text64[prefix], self.token_map,
                                                             penultimate=True)
                                        for prefix, tokenizer, _ in self.base.text_models()))

    def sites(self, model: str, text_side: bool) -> dict[str, list[str]]:
        """{site: modules} over every concept's adapted layers of `model` (client- or text-side)."""
        modules = []
        for c in self.state.concepts:
            for qual in c.up:
                m, _, module = qual.partition(".")
                if m == model and is_text_side(module) == text_side and module not in modules:
                    modules.append(module)
        return group_sites(modules)

    def solve_site(self, site_key: str, modules: list[str], S: torch.Tensor | None,
                   grams: dict[str, torch.Tensor] | None = None, rows: dict[str, torch.Tensor] | None = None,
                   extra: torch.Tensor | None = None) -> None:
        """Fuse every module reading one input site (shared.fusion.fuse_site) and write it into the base."""
        model_name = site_key.partition(".")[0]
        model = self.models[model_name]
        terms = {}
        for module in modules:
            qual = f"{model_name}.{module}"
            terms[module] = [Term(c.name, c.weight, c.up[qual], c.down[qual],
                                  self.kv_agram.get((c.name, qual), c.agram.get(qual)))
                             for c in self.state.concepts if qual in c.up]
        weighted_rows = None
        if rows is not None and self.row_form:
            weighted_rows = {c.name: (c.weight, rows[c.name]) for c in self.state.concepts}
        if self.method == "gradient" and S is None:
            raise UserError(f"no concept has statistics for {site_key}; run `mixshow stats` on every package")
        solved = fuse_site(self.method, terms, S, self.lam, grams, weighted_rows, extra)
        for module, (up, down) in solved.items():
            if model_name in self.text64:
                with torch.no_grad():
                    exact = self.text64[model_name].get_submodule(module).weight
                    exact.add_(up.to(exact.device, torch.float64) @ down.to(exact.device, torch.float64))
            qual = f"{model_name}.{module}"
            self.change.keep(qual, up.to(torch.float64).cpu(), down.to(torch.float64).cpu())
            layer = model.get_submodule(module)
            self.w0[qual] = layer.weight.detach().cpu().clone()
            with torch.no_grad():
                layer.weight.copy_(apply_lowrank(layer.weight, up.float(), down.float()))

    @torch.no_grad()
    def solve_text_side(self, progress: Progress) -> None:
        """Cross-attention k/v: Grams of the fused text encoder's features on each concept's prompts, gathered
        one concept at a time (server.kv_inputs), then one solve per site and the report's k/v rows."""
        sites = self.sites("unet", text_side=True)
        if not sites:
            return
        layers = cross_attention_layers(self.base.unet)
        slot_of = {site: self.slots[layers.index(site.rsplit(".", 1)[0])] for site in sites}
        modules_of_slot: dict[int, list[str]] = {}
        for site, modules in sites.items():
            modules_of_slot.setdefault(slot_of[site], []).extend(f"unet.{m}" for m in modules)
        encoder = self.kv_encoder()
        length = self.base.tokenizer.model_max_length
        preserve = self.text_rows(encoder, self.preserve, length, concept=False) if self.preserve else None
        inputs = KVInputs(0 if preserve is None else preserve[0].shape[0], self.row_form, modules_of_slot)
        for record, terms in zip(self.records, self.state.concepts):
            inputs.add(terms, self.text_rows(encoder, qualified_prompts(record), length, concept=True))
        self.kv_agram = inputs.agram
        task = progress.add_task("fuse cross-attention k/v", total=len(sites))
        for site, modules in sites.items():
            k = slot_of[site]
            extra = None if preserve is None else preserve[k] / preserve[k].shape[0] ** 0.5
            S, rows = inputs.site_inputs(k, extra)
            self.solve_site(f"unet.{site}", modules, S, rows=rows, extra=extra)
            progress.advance(task)
        self.kv_agram = {}
        self.report_kv(encoder, length, inputs.rows, modules_of_slot)

    def report_kv(self, encoder: LayerwiseTextEncoder | LayerwiseTextEncoderXL, length: int,
                  held: dict[str, list[torch.Tensor]], modules_of_slot: dict[int, list[str]]) -> None:
        """The identity rows of the k/v layers while their inputs (the server's own, not the clients') are at
        hand: one concept at a time (its rows as held, or encoded again), from its rows when they are fewer
        than the width, else from its Gram."""
        prepared = {}
        for record, terms in zip(self.records, self.state.concepts):
            rows = held.get(terms.name) or self.text_rows(encoder, qualified_prompts(record), length, concept=True)
            for slot, x in enumerate(rows):
                gram = None if x.shape[0] < x.shape[1] else x.T @ x / x.shape[0]
                for qual in modules_of_slot.get(slot, []):
                    if qual not in terms.up:
                        continue
                    if qual not in prepared:
                        prepared[qual] = layer_changes(self.state.concepts, qual, self.change[qual])
                    changes, owners = prepared[qual]
                    own = owners[terms.name]
                    self.kv_report.setdefault(terms.name, {})[qual] = changes.row(own, gram) if gram is not None \
                        else changes.row(own, rows=x)

    def text_rows(self, encoder: LayerwiseTextEncoder | LayerwiseTextEncoderXL, prompts: list[str], length: int,
                  concept: bool) -> list[torch.Tensor]:
        """Per cross-attention layer, the text states the layer reads (rows, float64): every position
        (kv_rows='all'), or only the concept-token and end-token positions (kv_rows='concept'; generic
        prompts: all)."""
        states = encoder.encode(prompts).to(torch.float64)
        ids = encoder.input_ids(prompts)[:, 0]
        eos = self.base.tokenizer.eos_token_id
        first_eos = (ids == eos).int().argmax(dim=1)
        positions = torch.arange(ids.shape[1])[None]
        keep = positions == first_eos[:, None]
        if self.kv_rows == "all" or not concept:
            keep = torch.ones_like(keep)  # every position the cross-attention reads, padding included
        else:
            keep = keep | encoder.concept_mask(prompts)
        return [states[:, k * length:(k + 1) * length][keep.to(states.device)].cpu() for k in range(self.n_layers)]

    # -- outputs -----------------------------------------------------------------------------------------
    def write(self, stage: Path, info: dict, dtype: torch.dtype, lora_dtype: torch.dtype) -> dict:
        """Write FUSED into `stage`: the folder's weights in `dtype`, every fused weight W0 + ΔW computed in
        float64 and rounded once; fused_lora.safetensors in `lora_dtype`. Leaves the base's models in `dtype`.
        Returns the precision record: per choice, the largest relative error of the stored change against
        the float64 change."""
        base = self.base
        errors: dict[str, float] = {}
        for model in (base.vae, *self.models.values()):
            model.to(dtype)
        with torch.no_grad():
            for qual, (up, down) in self.change.items():
                model_name, _, module = qual.partition(".")
                layer = self.models[model_name].get_submodule(module)
                exact = up @ down
                fused = self.w0[qual].to(torch.float64) + exact
                layer.weight.copy_(fused.to(dtype))
                stored = layer.weight.to(torch.float64) - self.w0[qual].to(torch.float64)
                errors[qual] = relative_error(stored, exact)
        pipe = base.pipeline()
        pipe.save_pretrained(stage, safe_serialization=True)
        concepts = {"format_version": 1, "method": self.method, "lam": self.lam, "preserve": len(self.preserve),
                    "preserve_prompts": self.preserve, "kv_rows": self.kv_rows,
                    "n_layers": self.n_layers, "base_fingerprint": info["base_fingerprint"],
                    "base": info["base"], "concepts": self.records}
        if info.get("preserve_resolution"):  # the size the preservation prompts were sampled at, for updates
            concepts["preserve_resolution"] = info["preserve_resolution"]
        if self.layout != "block":
            concepts["token_layout"] = self.layout
        (stage / CONCEPTS_FILE).write_text(json.dumps(concepts, indent=2))
        tensors, lora_errors = {}, {}
        for qual, (up, down) in self.change.items():
            up_out, down_out = balanced_factors(up, down, lora_dtype)
            tensors[f"{qual}.lora_A.weight"], tensors[f"{qual}.lora_B.weight"] = down_out, up_out
            lora_errors[qual] = relative_error(up_out.to(torch.float64) @ down_out.to(torch.float64), up @ down)
        for q, _names in self.token_map.words.items():
            record = next(r for r in self.records if q in r["tokens"])
            terms = next(c for c in self.state.concepts if c.name == record["name"])
            for kind in EMBEDDING_KINDS[:len(self.text64)]:
                tensors[f"{kind}.{q}"] = getattr(terms, kind)[q.split("/", 1)[1]].to(lora_dtype).contiguous()
        save_tensors(stage / LORA_FILE, tensors, metadata={"format": "mixshow-fused-lora",
                                                           "concepts": json.dumps(concepts)})
        self.state.save(stage / STATE_FILE, {"method": self.method, "lam": self.lam, "preserve": len(self.preserve),
                                             "base_fingerprint": info["base_fingerprint"]})
        return {"folder_dtype": str(dtype).removeprefix("torch."), "lora_dtype": str(lora_dtype).removeprefix("torch."),
                "folder_change_error": summary(errors), "lora_change_error": summary(lora_errors)}


OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    """‖value − exact‖ / ‖exact‖ (Frobenius; 0 for a zero change stored exactly)."""
    norm = float(exact.norm())
    return float((value - exact).norm()) / norm if norm else float((value - exact).norm())


def summary(errors: dict[str, float]) -> dict[str, float]:
    values = list(errors.values()) or [0.0]
    return {"max": max(values), "mean": sum(values) / len(values)}


def balanced_factors(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) rescaled to equal norms (same product) and cast to `dtype`: neither factor then underflows
    or overflows float16 where the other would have had room."""
    nu, nd = float(up.norm()), float(down.norm())
    if nu and nd:
        ratio = (nd / nu) ** 0.5
        up, down = up * ratio, down / ratio
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def client_sites_of(sources: list[Source]) -> dict[str, dict[str, list[str]]]:
    """{model prefix: {site: its adapted modules}} of the client-side sites of `sources` (the text encoders'
    and the UNet's layers whose input the client records)."""
    sites: dict[str, dict[str, list[str]]] = {}
    for src in sources:
        for model, modules in src.meta.lora_groups():
            for module in modules:
                if not is_text_side(module):
                    sites.setdefault(model, {}).setdefault(site_of(module), []).append(module)
    return sites


def recorded_preservation(previous: dict, from_dir: Path) -> list[str] | None:
    """The preservation prompts a fused folder's concepts.json records (before they were recorded: the first
    `preserve` generic ones); None where it preserved nothing."""
    preserve, prompts = previous["preserve"], previous.get("preserve_prompts")
    where = f"{from_dir}/{CONCEPTS_FILE}"
    if isinstance(preserve, bool) or not isinstance(preserve, int) or preserve < 0:
        raise UserError(f"{where}: preserve {preserve!r} is not a count of prompts; was it written by `mixshow fuse`?")
    if prompts is None:
        return list(GENERIC_PROMPTS[:preserve]) or None
    if not isinstance(prompts, list) or len(prompts) != preserve:
        raise UserError(f"{where}: preserve is {preserve} but preserve_prompts is not a list of {preserve} prompts; "
                        "the file was changed by hand")
    return prompts or None


def preservation_resolution(previous: dict | None, from_dir: Path | None, new_sources: list[Source]) -> int | None:
    """The image size the preservation prompts are sampled at: the one the fusion being updated recorded, else
    the first new concept's training resolution (None: neither is known, and nothing is sampled)."""
    recorded = (previous or {}).get("preserve_resolution")
    if recorded is not None:
        if isinstance(recorded, bool) or not isinstance(recorded, int) or not 8 <= recorded <= 8192:
            raise UserError(f"{from_dir}/{CONCEPTS_FILE}: preserve_resolution {recorded!r} is not an image size; "
                            "the file was changed by hand")
        return recorded
    return int(new_sources[0].meta.training.get("resolution", 512)) if new_sources else None


def check_settings(method: str, lam: float, preserve: int, prompts: list[str], kv_rows: str) -> None:
    """The fusion's settings, checked before anything is loaded."""
    if method not in METHODS:
        raise InvalidArgument("method", f"{method!r} is not one of {', '.join(METHODS)}")
    number("lam", lam, 0, 1e6, low_open=True)
    if number("preserve", preserve, 0, None, integer=True) > len(prompts):
        raise InvalidArgument("preserve", f"{preserve} preservation prompts asked for, but there are "
                                          f"{len(prompts)}; give at most {len(prompts)}")
    if kv_rows not in KV_ROWS:
        raise InvalidArgument("kv_rows", f"{kv_rows!r} is not one of {', '.join(KV_ROWS)}")


def fuse(base_path: Path | None, packages: list[Path], out: Path, method: str = "gradient", lam: float = DEFAULT_LAM,
         preserve: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         base_config: Path | None = None, from_dir: Path | None = None, remove: list[str] | None = None,
         kv_rows: str = "all", show_progress: bool = True, out_dtype: torch.dtype | None = None,
         lora_dtype: torch.dtype = torch.float16, origins: dict[str, dict] | None = None,
         preserve_prompts: list[str] | None = None) -> dict:
    """Fuse packages into FUSED at `out` (atomically); with `from_dir`, update that fusion instead.

    `preserve` N adds the Grams of the first N preservation prompts (`preserve_prompts`, default
    GENERIC_PROMPTS) through the base, with target W0 (server.preservation); an update keeps the prompts its
    fusion recorded.

    `dtype` is the dtype the base is loaded and the fusion run in; `out_dtype` the folder's weights on disk
    (default: the dtype the base itself is stored in), `lora_dtype` fused_lora.safetensors'. `origins`
    adds fields to a new concept's concepts.json record, by concept name (a round: its client and upload).

    Returns the identity-loss report (also written as FUSED/fusion_report.json and .png).
    """
    out = Path(out)
    check_fresh_output(out, "out")
    remove = remove or []
    previous = read_concepts(from_dir) if from_dir else None
    if previous:
        try:
            method, lam, preserve, kv_rows = (previous["method"], previous["lam"], previous["preserve"],
                                              previous["kv_rows"])
            preserve_prompts = recorded_preservation(previous, from_dir)
            base_path = base_path or Path(str(previous["base"]))
        except KeyError as exc:
            raise UserError(f"{from_dir}/{CONCEPTS_FILE} lacks {exc}; it was not written by `mixshow fuse`") from exc
    if base_path is None:
        raise InvalidArgument("base", "is required")
    where = f"{from_dir}/{CONCEPTS_FILE}: preserve_prompts" if previous else "preserve_prompts"
    prompts = check_prompts(preserve_prompts, where) if preserve_prompts is not None else list(GENERIC_PROMPTS)
    check_settings(method, lam, preserve, prompts, kv_rows)
    prompts = prompts[:preserve]
    for argument, value in (("out_dtype", out_dtype), ("lora_dtype", lora_dtype)):
        if value is not None and value not in OUTPUT_DTYPES:
            raise InvalidArgument(argument, f"{value} is not one of float16, bfloat16, float32")
    base = load_base(base_path, device, dtype, base_config, sdxl=True)
    need_stats = method == "gradient"
    dims = module_dims(base)
    state, records = FusionState(), []
    sources: dict[str, Source] = {}
    if previous:
        if previous["base_fingerprint"] != base.fingerprint:
            raise UserError(f"{from_dir} was fused on base {previous['base_fingerprint'][:12]}, but {base.source} is "
                            f"{base.fingerprint[:12]}")
        state, _ = FusionState.load(Path(from_dir) / STATE_FILE)
        records = list(previous["concepts"])
        for name in remove:
            record = next((r for r in records if r["name"] == name), None)
            if record is None:
                raise InvalidArgument("remove", f"{name}: {from_dir} has no concept of that name "
                                f"(it has: {', '.join(r['name'] for r in records)})")
            src = locate_package(record, base, need_stats)
            state.remove(name, src.meta, src.stats, dims)
            records.remove(record)
        for record in records:  # for the report: the other packages' stats, where they can still be found
            with contextlib.suppress(UserError):
                sources[record["name"]] = locate_package(record, base, need_stats)
                sources[record["name"]].tensors.clear()  # their terms are in the state already
    elif remove:
        raise InvalidArgument("remove", "needs a fused model to update (from_dir)")
    old_sites = set(state.S)  # sites an earlier fusion gave the preservation Grams already
    # One package at a time: read, checked, its terms added to the state, its tensors dropped. The server then
    # never holds more than one package's tensors, whatever the number of concepts.
    new_sources = []
    for package in packages:
        src = read_source(Path(package), base, need_stats)
        if src.meta.name in state.names():
            raise UserError(f"two concepts are named {src.meta.name!r}; rename a package (concept.json 'name')")
        state.add(src.meta, src.tensors, src.stats, 1.0, dims)
        src.tensors.clear()  # the state holds its terms now (float64); the package's own copy is not needed again
        records.append({**concept_record(src, src.meta.n_layers), **(origins or {}).get(src.meta.name, {})})
        sources[src.meta.name] = src
        new_sources.append(src)
    resolution = None
    if prompts and method == "gradient":  # every site of S holds the preservation Grams once
        resolution = preservation_resolution(previous, from_dir, new_sources)
        new_sites = {model: {site: modules for site, modules in sites.items() if f"{model}.{site}" not in old_sites}
                     for model, sites in client_sites_of(new_sources).items()}
        if any(new_sites.values()):
            for site, gram in preservation_grams(base, new_sites, prompts, resolution).items():
                state.S[site] = state.S[site] + gram
    if not state.concepts:
        raise InvalidArgument("concept", "nothing to fuse: give at least one package (or leave one after removing)")
    fusion = Fusion(base, state, records, method, lam, prompts if method == "gradient" else [], kv_rows,
                    show_progress)
    fusion.run()
    report = identity_report(fusion, sources)
    with staged_dir(out) as stage:
        report.data["precision"] = fusion.write(
            stage, {"base_fingerprint": base.fingerprint, "base": str(Path(base.source).resolve()),
                    "preserve_resolution": resolution},
            out_dtype or base.stored_dtype, lora_dtype)
        report.write(stage)
    return report.data


def identity_report(fusion: Fusion, sources: dict[str, Source]) -> IdentityReport:
    """The report of a finished fusion: client-side Grams from each concept's stats (where its package is
    known, read one at a time: the server's memory does not grow with the number of concepts), the k/v rows
    the fusion computed from the server's own encoding."""
    def gram_of(name: str, qual: str) -> torch.Tensor | None:
        src = sources.get(name)
        if src is None or src.stats is None:
            return None
        model, _, module = qual.partition(".")
        layer = fusion.models[model].get_submodule(module)
        return src.stats.normalised(src.stats.key_for(model, module), layer.in_features)

    return IdentityReport(fusion.method, fusion.lam, fusion.state.concepts, fusion.change, gram_of,
                          set(sources), fusion.kv_report, order=list(module_dims(fusion.base))).compute()


def locate_package(record: dict, base: Base, need_stats: bool) -> Source:
    """A fused concept's own package, found through concepts.json and checked against its recorded sha256."""
    path = Path(record["package"])
    if not (path / META_FILE).is_file():
        raise UserError(f"concept {record['name']}: its package {path} is gone; withdrawing needs its own package")
    src = read_source(path, base, need_stats)
    if src.sha256 != record["sha256"]:
        raise UserError(f"concept {record['name']}: package {path} changed since it was fused (sha256 differs)")
    return src
