"""Closed-form gradient fusion at SD 1.5 shapes: speed, memory, L-BFGS comparison, incremental add, stats size.

    python bench/fusion.py [--concepts 14] [--rank 4] [--lbfgs-subset small|full] [--lbfgs-steps 2] [--seed 0]
    python bench/fusion.py --arch sdxl [--concepts 14]     # (a) only, at SDXL 1.0's shapes, site by site

Layer shapes come from the real SD 1.5 configs built on the meta device (UNet2DConditionModel
with cross_attention_dim=768; CLIPTextModel with CLIP ViT-L/14's text config, given explicitly
because CLIPTextConfig() defaults to ViT-B/32's 512-wide one). Adapted layers are
the method's: text-encoder self_attn q/k/v/out, UNet attn1 and attn2 q/k/v/out.0, grouped into
input sites by shared.grams.group_sites. Weights, LoRAs and activations are random.

    (a) closed-form fusion of every adapted layer from Grams: wall time and peak memory (measured
        in a child process: VmHWM reset through /proc/self/clear_refs, minus VmRSS before the step)
    (b) closed form vs the reference's L-BFGS (from W0, on raw activations) on a subset of layers,
        both scored with shared.fusion.objective on the normalised Grams of the same rows
    (c) adding one concept to a fused model of 1 and of N concepts (S += Ĝ, its A Ĝ, re-solve all)
    (d) one concept's stats file at SD 1.5 shapes, packings full32, tri32, tri16 and compact (the
        default), and the fusion error of compact
    (e) on-disk sizes of the real artefacts at SD 1.5 shapes: a random-weight SD 1.5 pipeline (49,408-token
        vocabulary) saved in float16 as the base, N concepts trained by `train_concept` (1 step at 256 px:
        sizes do not depend on training) with stats from `compute_stats`, fused by `server.fuse.fuse`; the
        fused folder (float16, as `mixshow pull` downloads it), fused_lora.safetensors (float16), the
        fusion state, one package and its stats (--skip-sizes to leave out, --sizes-only for just this)

Grams are made once per concept and site (setup, never timed): for the short text sites from
explicit rows X = Z·M; for the UNet spatial sites (20·h·w rows) by sampling Z^T Z as a Wishart
matrix (Bartlett) so X is never formed, two per site, reused across concepts as D Ĝ D with a
random positive diagonal D per concept. The closed form runs through shared.fusion itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from shared.fusion import (  # noqa: E402
    absolute_lam,
    accumulate_site,
    fused_lora,
    fused_lora_rows,
    objective,
    regularised_cholesky,
)
from shared.grams import group_sites, is_text_side  # noqa: E402
from shared.stats_file import Stats, gram_key, write_stats  # noqa: E402

F64 = torch.float64
LAM = 1e-4  # relative regulariser, as server.fuse.DEFAULT_LAM: lam_abs = LAM * tr(S) / d
STEPS = 20  # sampler steps recorded per concept for the spatial Grams (the reference recipe)
LBFGS_STEPS = 20  # steps of raw spatial rows per concept held for the L-BFGS comparison (--lbfgs-steps to cut)
TEXT_ROWS = 176  # text-encoder rows per concept (prompt templates x token positions)
KV_ROWS = 6  # text-side rows per concept for cross-attention k/v
LATENT = 512 // 8  # latent side at 512 px
BASES = 2  # distinct spatial Grams generated per site
ADD_REPS = 5  # timed runs of each incremental add in (c)
FUSE_REPS = 3  # runs of the full fusion in (a); the first also gives the peak memory
CF_REPS = 5  # runs of each layer's closed form in (b)
GOAL_SPEEDUP, GOAL_ADD_RATIO, GOAL_STATS_MB, GOAL_PACKED = 1000.0, 1.5, 100.0, 1e-3
GOAL_LORA_MB = 40.0  # (e) the fused LoRA of 14 concepts; the fused folder <= the base's own size + that LoRA
SD_VOCAB = 49408
DESIGN_SECONDS = 8.0  # docs/design.md §2.3: all 104 sites, 14 concepts, fp64, 2 cores, unoptimised
GOAL_SDXL_SECONDS, GOAL_SDXL_GB = 15.0, 4.0  # the SDXL fusion of 14 concepts on this machine (issue: SDXL)


# -- layers ------------------------------------------------------------------------------------------------
def sd15_layers() -> list[dict]:
    """Every adapted layer of SD 1.5 with its input site, widths, kind and rows per concept."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768)
        # SD 1.5's text encoder is CLIP ViT-L/14's; CLIPTextConfig() alone gives ViT-B/32's (hidden 512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
    if text.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError("text encoder width differs from the UNet's cross-attention width")
    return adapted_layers([("text_encoder", text), ("unet", unet)], LATENT)


def sdxl_layers() -> list[dict]:
    """Every adapted layer of SDXL 1.0 (its published UNet and text-encoder configs, given explicitly): 70
    cross-attention transformer blocks reading 2,048-wide text states from CLIP ViT-L (768) + OpenCLIP
    ViT-bigG (1,280), at 1,024 px."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu"))
    if text.config.hidden_size + text_2.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError("the two text encoders' widths do not add up to the UNet's cross-attention width")
    blocks = sum(1 for n, _ in unet.named_modules() if n.endswith(".attn2"))
    if blocks != 70:
        raise ValueError(f"the SDXL UNet built here has {blocks} cross-attention blocks, not 70")
    return adapted_layers([("text_encoder", text), ("text_encoder_2", text_2), ("unet", unet)], 1024 // 8)


def adapted_layers(models: list[tuple[str, torch.nn.Module]], latent: int) -> list[dict]:
    """The method's adapted layers of each (name, model): text encoders' self_attn q/k/v/out, the UNet's attn1
    and attn2 q/k/v/out.0, each with its input site, widths, kind and rows per concept (`latent`: the latent
    side, for the spatial rows)."""
    from shared.lora import target_modules
    from shared.names import TEXT_TARGETS, UNET_TARGETS

    layers = []
    for model_name, model in models:
        is_unet = model_name == "unet"
        levels = len(model.config.block_out_channels) if is_unet else 0
        for site, modules in group_sites(target_modules(model, UNET_TARGETS if is_unet else TEXT_TARGETS)).items():
            for module in modules:
                layer = model.get_submodule(module)
                entry = {"model": model_name, "module": module, "site": f"{model_name}.{site}",
                         "d_in": layer.in_features, "d_out": layer.out_features, "hw": 0}
                if not is_unet:
                    entry["kind"] = "te.qkv" if module.endswith(("q_proj", "k_proj", "v_proj")) else "te.out"
                    entry["rows"] = TEXT_ROWS
                elif is_text_side(module):
                    entry["kind"], entry["rows"] = "attn2.kv", KV_ROWS
                else:
                    parts = module.split(".")
                    level = levels - 1 if parts[0] == "mid_block" else int(parts[1])
                    if parts[0] == "up_blocks":
                        level = levels - 1 - level
                    entry["hw"] = (latent >> level) ** 2
                    entry["rows"] = STEPS * entry["hw"]
                    attn = "attn1" if ".attn1." in module else "attn2"
                    leaf = "out" if module.endswith("to_out.0") else ("q" if attn == "attn2" else "qkv")
                    entry["kind"] = f"{attn}.{leaf}"
                layers.append(entry)
    return layers


def site_table(layers: list[dict]) -> dict[str, list[dict]]:
    sites: dict[str, list[dict]] = {}
    for layer in layers:
        sites.setdefault(layer["site"], []).append(layer)
    return sites


def qual(layer: dict) -> str:
    return f"{layer['model']}.{layer['module']}"


def client_side(layer: dict) -> bool:
    return layer["kind"] != "attn2.kv"


# -- random data -------------------------------------------------------------------------------------------
def mixing(d: int, gen: torch.Generator, dtype: torch.dtype = F64) -> torch.Tensor:
    """M (d x d) with a decaying spectrum, scaled so that tr(MᵀM)/d = 1: rows X = Z·M are correlated."""
    decay = (1.0 + torch.arange(d, dtype=F64)) ** -0.5
    M = torch.randn(d, d, generator=gen, dtype=F64) * decay[:, None]
    return (M * (d ** 0.5 / M.norm())).to(dtype)


def wishart_gram(M: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Ĝ = XᵀX / n for n rows of X = Z·M (Z standard normal, n >= d) without forming X.

    ZᵀZ ~ Wishart(n, I) = L Lᵀ (Bartlett: L lower triangular, N(0, 1) below the diagonal,
    L_jj² ~ χ²(n − j)), so XᵀX = (MᵀL)(MᵀL)ᵀ.
    """
    d = M.shape[0]
    L = torch.randn(d, d, generator=gen, dtype=F64).tril_(-1)
    df = torch.arange(n, n - d, -1, dtype=F64)
    L.diagonal().copy_(torch.distributions.Chi2(df).sample().sqrt())
    T = M.T @ L
    return (T @ T.T) / n


def explicit_gram(M: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    X = torch.randn(n, M.shape[0], generator=gen, dtype=F64) @ M
    return (X.T @ X) / n


def make_loras(layers: list[dict], concepts: int, rank: int, gen: torch.Generator) -> tuple[list, list]:
    """Per concept {qual: s·B} (d_out x r, std 0.01, s = 1) and {qual: A} (r x d_in, std d_in^-1/2), float64."""
    ups, downs = [], []
    for _ in range(concepts):
        ups.append({qual(la): torch.randn(la["d_out"], rank, generator=gen, dtype=F64) * 0.01 for la in layers})
        downs.append({qual(la): torch.randn(rank, la["d_in"], generator=gen, dtype=F64) / la["d_in"] ** 0.5
                      for la in layers})
    return ups, downs


def make_grams(sites: dict[str, list[dict]], concepts: int, gen: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """{site: [Ĝ_i for each concept]}, float64 (what Stats.normalised hands the server)."""
    grams = {}
    for site, layers in sites.items():
        d, n = layers[0]["d_in"], layers[0]["rows"]
        M = mixing(d, gen)
        if n < d:  # text encoder and text-side k/v: fresh rows per concept
            grams[site] = [explicit_gram(M, n, gen) for _ in range(concepts)]
            continue
        bases = [wishart_gram(M, n, gen) for _ in range(min(BASES, concepts))]
        per = []
        for i in range(concepts):
            scale = torch.exp(0.2 * torch.randn(d, generator=gen, dtype=F64))
            per.append(bases[i % len(bases)] * torch.outer(scale, scale))
        grams[site] = per
    return grams


# -- the closed form (shared.fusion) ------------------------------------------------------------------------
def site_sum(grams: list[torch.Tensor]) -> torch.Tensor:
    S = grams[0].clone()
    for g in grams[1:]:
        S += g
    return S


def site_factor(S: torch.Tensor) -> torch.Tensor:
    return regularised_cholesky(S, absolute_lam(S, LAM))


def agram_rows(downs: list[torch.Tensor], gram: torch.Tensor) -> list[torch.Tensor]:
    """A Ĝ for every module of a site that one concept adapts, with one product (the site's Ĝ read once)."""
    rows = torch.cat(downs) @ gram
    return list(rows.split([a.shape[0] for a in downs]))


def site_terms(grams: list[torch.Tensor], downs: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list]:
    """S = Σ Ĝ_i and each concept's A Ĝ_i for the site's modules, as the server's fusion state adds a concept
    (shared.fusion.accumulate_site: one pass over each Ĝ)."""
    S, per_concept = None, []
    for gram, concept_downs in zip(grams, downs):
        S, products = accumulate_site(S, gram, 1.0, concept_downs)
        per_concept.append(products)
    return S, per_concept


def fuse_all(sites: dict[str, list[dict]], grams: dict, ups: list, downs: list, n: int) -> dict:
    """Closed-form fusion of every layer for concepts 0..n-1: {qual: (up, down)}."""
    out = {}
    for site, layers in sites.items():
        names = [qual(la) for la in layers]
        S, per_concept = site_terms(grams[site][:n], [[downs[i][q] for q in names] for i in range(n)])
        factor = site_factor(S)
        for k, q in enumerate(names):
            out[q] = fused_lora([ups[i][q] for i in range(n)], [per_concept[i][k] for i in range(n)], factor)
    return out


def add_concept(sites: dict[str, list[dict]], S_old: dict, agr_old: dict, grams: dict, ups: list, downs: list,
                n: int, new: int) -> dict:
    """Fused model of concepts 0..n-1 (its S and A Ĝ kept) plus concept `new`: S += Ĝ, its A Ĝ, re-solve."""
    out = {}
    for site, layers in sites.items():
        g = grams[site][new]
        factor = site_factor(S_old[site] + g)
        names = [qual(la) for la in layers]
        rows = agram_rows([downs[new][q] for q in names], g)
        for k, q in enumerate(names):
            out[q] = fused_lora([ups[i][q] for i in range(n)] + [ups[new][q]], agr_old[q] + [rows[k]], factor)
    return out


# -- memory ----------------------------------------------------------------------------------------------
def proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the step's allocations show in RSS instead of
    silently reusing memory that setup freed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_times() -> tuple[int, int, int] | None:
    """(steal, busy, total) jiffies of all CPUs so far, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    fields += [0] * (8 - len(fields))
    total = sum(fields)
    return fields[7], total - fields[3] - fields[4], total


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- child: (a), (c), (d) on all layers -----------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    layers = json.loads(Path(args.child).read_text())
    sites = site_table(layers)
    N, total = args.concepts, args.concepts + 1  # concept N is the one added in (c)
    torch.manual_seed(args.seed)  # the χ² draws
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    ups, downs = make_loras(layers, total, args.rank, gen)
    grams = make_grams(sites, total, gen)
    setup_s = time.perf_counter() - t0
    res: dict = {"setup_s": setup_s, "sites": len(sites), "layers": len(layers)}
    print(f"  [child] Grams and LoRAs of {total} concepts generated in {setup_s:.1f} s (setup)", file=sys.stderr)

    # (a) fuse every layer from the Grams of N concepts
    gc.collect()
    release_free_heap()
    base_kb, exact = proc_kb("VmRSS"), reset_peak()
    if base_kb is None:  # no /proc: ru_maxrss after setup is the baseline
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    fused = fuse_all(sites, grams, ups, downs, N)
    runs = [time.perf_counter() - t]
    peak_kb = proc_kb("VmHWM") if exact else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res.update(base_mb=base_kb / 1024, peak_mb=(peak_kb - base_kb) / 1024, exact_peak=exact,
               rank_out=int(next(iter(fused.values()))[1].shape[0]),
               out_mb=sum(u.numel() * u.element_size() + v.numel() * v.element_size()
                          for u, v in fused.values()) / 2**20)
    del fused
    for _ in range(FUSE_REPS - 1):  # warm repeats, timing only
        gc.collect()
        t = time.perf_counter()
        fuse_all(sites, grams, ups, downs, N)
        runs.append(time.perf_counter() - t)
    res.update(fuse_first_s=runs[0], fuse_s=statistics.median(runs), fuse_range=(min(runs), max(runs)))
    gc.collect()
    print(f"  [child] (a) fusion runs {json.dumps(runs)}", file=sys.stderr)

    # (c) add concept N to a fused model of 1 and of N concepts: alternating runs, median of each
    olds = {}
    for n in sorted({1, N}):
        S_old = {site: site_sum(grams[site][:n]) for site in sites}
        agr_old: dict[str, list[torch.Tensor]] = {}
        for site, site_layers in sites.items():
            names = [qual(la) for la in site_layers]
            for i in range(n):
                for q, a in zip(names, agram_rows([downs[i][q] for q in names], grams[site][i])):
                    agr_old.setdefault(q, []).append(a)
        olds[n] = (S_old, agr_old)
    times: dict[int, list[float]] = {n: [] for n in olds}
    for rep in range(ADD_REPS + 1):  # the first round warms up (page faults, caches) and is not counted
        for n, (S_old, agr_old) in olds.items():
            t = time.perf_counter()
            add_concept(sites, S_old, agr_old, grams, ups, downs, n, N)
            if rep:
                times[n].append(time.perf_counter() - t)
    res["add_s"] = {str(n): statistics.median(v) for n, v in times.items()}
    res["add_range"] = {str(n): (min(v), max(v)) for n, v in times.items()}
    print(f"  [child] (c) add-one-concept runs: {json.dumps(times)}", file=sys.stderr)
    del olds
    gc.collect()

    # (d) one concept's stats file (client-side sites) for real, and the compact packing's fusion error
    res.update(stats_file(sites, grams, ups, downs, N))
    Path(args.result).write_text(json.dumps(res))


# -- child: (a) streamed, at shapes whose Grams do not all fit in memory (SDXL) ------------------------------
def child_streaming(args: argparse.Namespace) -> None:
    """(a) site by site: each site's Grams (or, on the text side, rows) of every concept are made just before it
    is fused (untimed) and dropped after, as a server streaming them from the stats files holds them; the site is
    fused twice through shared.fusion.fuse_site (the server's own function), timed. Spatial Grams come from two
    Wishart bases per (width, rows), shared by every site of that shape, scaled D·Ĝ·D per site and concept."""
    from shared.fusion import Term, fuse_site

    layers = json.loads(Path(args.child).read_text())
    sites = site_table(layers)
    N = args.concepts
    torch.manual_seed(args.seed)  # the χ² draws
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    ups, downs = make_loras(layers, N, args.rank, gen)
    shapes = {(la["d_in"], la["rows"]) for la in layers}
    mixes = {d: mixing(d, gen) for d in {d for d, _ in shapes}}
    bases = {(d, n): [wishart_gram(mixes[d], n, gen) for _ in range(BASES)] for d, n in shapes if n >= d}
    setup_s = time.perf_counter() - t0
    print(f"  [child] LoRAs of {N} concepts and {sum(map(len, bases.values()))} Wishart bases made in {setup_s:.1f} s "
          "(setup)", file=sys.stderr)
    gc.collect()
    release_free_heap()
    base_kb, exact = proc_kb("VmRSS"), reset_peak()
    first = best = inputs_s = 0.0
    fused, by_kind = {}, {}
    for site_layers in sites.values():
        t = time.perf_counter()
        d, n = site_layers[0]["d_in"], site_layers[0]["rows"]
        names = [qual(la) for la in site_layers]
        text_side = site_layers[0]["kind"] == "attn2.kv"
        if text_side:  # the server's own k/v rows: the row form (fewer rows than width)
            rows = {f"c{i}": (1.0, torch.randn(n, d, generator=gen, dtype=F64) @ mixes[d]) for i in range(N)}
            grams = None
        elif n < d:
            grams = [explicit_gram(mixes[d], n, gen) for _ in range(N)]
        else:
            grams = []
            for i in range(N):
                scale = torch.exp(0.2 * torch.randn(d, generator=gen, dtype=F64))
                grams.append(bases[(d, n)][i % BASES] * torch.outer(scale, scale))
        inputs_s += time.perf_counter() - t
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            if text_side:
                Y = torch.cat([(1.0 / n) ** 0.5 * x for _, x in rows.values()])
                S = Y.T @ Y
                modules = {q: [Term(f"c{i}", 1.0, ups[i][q], downs[i][q]) for i in range(N)] for q in names}
                out = fuse_site("gradient", modules, S, LAM, rows=rows)
            else:
                S, per_concept = site_terms(grams, [[downs[i][q] for q in names] for i in range(N)])
                modules = {q: [Term(f"c{i}", 1.0, ups[i][q], downs[i][q], per_concept[i][k]) for i in range(N)]
                           for k, q in enumerate(names)}
                out = fuse_site("gradient", modules, S, LAM)
            runs.append(time.perf_counter() - t)
            del S, modules
        first, best = first + runs[0], best + min(runs)
        kind = f"{site_layers[0]['kind']}@{d}"
        by_kind[kind] = by_kind.get(kind, 0.0) + min(runs)
        fused.update(out)
        del grams
        if text_side:
            del rows, Y
    peak_kb = proc_kb("VmHWM") if exact else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"setup_s": setup_s, "inputs_s": inputs_s, "sites": len(sites), "layers": len(layers), "first_s": first,
           "best_s": best, "base_mb": base_kb / 1024, "peak_total_mb": peak_kb / 1024,
           "peak_mb": (peak_kb - base_kb) / 1024, "exact_peak": exact, "by_kind": by_kind,
           "rank_out": int(next(iter(fused.values()))[1].shape[0]),
           "out_mb": sum(u.numel() * u.element_size() + v.numel() * v.element_size()
                         for u, v in fused.values()) / 2**20}
    Path(args.result).write_text(json.dumps(res))


def report_streaming(res: dict, layers: list[dict], N: int) -> None:
    text = sorted({la["model"] for la in layers if la["model"] != "unet"})
    n_te = sum(la["model"] != "unet" for la in layers)
    how = "VmHWM after reset" if res["exact_peak"] else "ru_maxrss, an upper bound"
    total_gb = res["peak_total_mb"] / 1024
    print(f"(a) SDXL: closed-form fusion of all adapted layers, {res['sites']} input sites, {res['layers']} layers "
          f"({n_te} in {' + '.join(text)}, {res['layers'] - n_te} UNet), {N} concepts (fused LoRA rank "
          f"{res['rank_out']}), site by site through shared.fusion.fuse_site: {res['best_s']:.2f} s wall, best of 2 "
          f"runs per site (first runs {res['first_s']:.2f} s) | goal <= {GOAL_SDXL_SECONDS:.0f} s: "
          f"{'met' if res['best_s'] <= GOAL_SDXL_SECONDS else 'MISSED'}; peak memory {total_gb:.2f} GiB in all "
          f"(+{res['peak_mb']:.0f} MiB over the {res['base_mb'] / 1024:.2f} GiB resident before, which holds the "
          f"{N} concepts' float64 LoRAs; one site's Grams of all concepts at a time, and the fused LoRAs "
          f"({res['out_mb']:.0f} MiB float64) as they grow; {how}) | goal <= {GOAL_SDXL_GB:.0f} GiB: "
          f"{'met' if total_gb <= GOAL_SDXL_GB else 'MISSED'} (making the Grams: {res['inputs_s']:.0f} s, "
          f"setup {res['setup_s']:.0f} s, not timed)", flush=True)
    kinds = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(res["by_kind"].items(), key=lambda kv: -kv[1]))
    print(f"(a) SDXL: time by site kind (kind@input width): {kinds}", flush=True)


PACKED = ("full32", "tri32", "tri16", "compact")


def read_key(reader: Stats, layer: dict) -> str:
    return reader.key_for(layer["model"], layer["module"])


def stats_file(sites: dict[str, list[dict]], grams: dict, ups: list, downs: list, N: int) -> dict:
    client = {site: la for site, la in sites.items() if client_side(la[0])}
    key_of = {site: gram_key(la[0]["model"], site.partition(".")[2]) for site, la in client.items()}
    aliases = {qual(layer): key_of[site] for site, la in client.items() for layer in la}

    def payload(concept: int, chosen: list[str]) -> tuple[dict, dict, dict]:
        g = {key_of[s]: grams[s][concept] * client[s][0]["rows"] for s in chosen}  # float64, as GramRecorder
        rows = {key_of[s]: client[s][0]["rows"] for s in chosen}
        return g, rows, {m: k for m, k in aliases.items() if k in g}

    out: dict = {"stats_sites": len(client)}
    with tempfile.TemporaryDirectory() as tmp:
        g, rows, al = payload(0, list(client))
        for packing in PACKED:
            path = Path(tmp) / f"stats_{packing}.safetensors"
            t = time.perf_counter()
            write_stats(path, g, rows, al, {}, packing)
            out[f"write_{packing}_s"] = time.perf_counter() - t
            out[f"bytes_{packing}"] = path.stat().st_size
        del g
        # compact error: the first site of each (kind, width); every concept's Ĝ goes through a compact file
        firsts: dict[tuple, str] = {}
        for site, la in client.items():
            firsts.setdefault((la[0]["kind"], la[0]["d_in"]), site)
        chosen = list(firsts.values())
        paths = [Path(tmp) / "stats_compact.safetensors"]
        for i in range(1, N):
            g, rows, al = payload(i, chosen)
            paths.append(Path(tmp) / f"few_{i}.safetensors")
            write_stats(paths[-1], g, rows, al, {}, "compact")
        readers = [Stats(p) for p in paths]
        worst: dict[str, dict] = {}  # model -> largest fused-weight error, where, largest Gram error
        for site in chosen:
            d = client[site][0]["d_in"]
            layer0 = client[site][0]
            read = [r.normalised(read_key(r, layer0), d) for r in readers]
            exact = grams[site][:N]
            g_err = max(float((r - e).norm() / e.norm()) for r, e in zip(read, exact))
            f_exact, f_read = site_factor(site_sum(exact)), site_factor(site_sum(read))
            for layer in client[site]:
                q = qual(layer)
                up = [ups[i][q] for i in range(N)]
                U, down_e = fused_lora(up, [downs[i][q] @ exact[i] for i in range(N)], f_exact)
                _, down_r = fused_lora(up, [downs[i][q] @ read[i] for i in range(N)], f_read)
                err = float((U @ (down_r - down_e)).norm() / (U @ down_e).norm())
                best = worst.setdefault(layer["model"], {"err": 0.0, "where": "", "gram_err": 0.0, "sites": 0})
                best["gram_err"] = max(best["gram_err"], g_err)
                if err > best["err"]:
                    best.update(err=err, where=q)
            worst[layer0["model"]]["sites"] += 1
            worst[layer0["model"]].setdefault("encodings", {})[readers[0].encoding(read_key(readers[0], layer0))] = 1
        out.update(packed=worst, packed_sites=len(chosen))
    return out


# -- parent: (b) closed form vs L-BFGS on a subset ------------------------------------------------------------
SMALL = (  # (model, kind, d_in, d_out, hw): one layer each
    ("text_encoder", "te.qkv", 768, 768, 0), ("unet", "attn2.kv", 768, 320, 0), ("unet", "attn2.kv", 768, 1280, 0),
    ("unet", "attn1.qkv", 320, 320, 4096), ("unet", "attn1.qkv", 1280, 1280, 256),
    ("unet", "attn1.out", 640, 640, 1024),
)
FULL_EXTRA = (
    ("text_encoder", "te.out", 768, 768, 0), ("unet", "attn2.kv", 768, 640, 0), ("unet", "attn1.qkv", 640, 640, 1024),
    ("unet", "attn1.qkv", 1280, 1280, 64), ("unet", "attn2.q", 320, 320, 4096), ("unet", "attn2.out", 1280, 1280, 256),
    ("unet", "attn1.out", 320, 320, 4096),
)


def pick_subset(layers: list[dict], which: str, steps: int) -> list[dict]:
    wanted = SMALL + (FULL_EXTRA if which == "full" else ())
    picked = []
    for spec in wanted:
        layer = next(la for la in layers
                     if (la["model"], la["kind"], la["d_in"], la["d_out"], la["hw"]) == spec)
        picked.append(dict(layer, rows=steps * layer["hw"] if layer["hw"] else layer["rows"]))
    return picked


def closed_form(grams: list[torch.Tensor], ups: list[torch.Tensor], downs: list[torch.Tensor]) -> tuple:
    factor = site_factor(site_sum(grams))
    return fused_lora(ups, [a @ g for a, g in zip(downs, grams)], factor)


def lbfgs(W0: torch.Tensor, Xs: list[torch.Tensor], Ws: list[torch.Tensor], lam: float, iters: int) -> tuple:
    """The reference: from W0, L-BFGS on Σ ||(W − W_i) X_iᵀ||² / n_i + λ||W − W0||² over the raw rows (float32).

    The gradient 2 Rᵀ X + 2λ(W − W0), R = X Wᵀ − T, is written out (what autograd computes, without its
    row-sized temporaries), so the baseline is not slowed down by allocation on the CPU.
    """
    X = torch.cat([x / x.shape[0] ** 0.5 for x in Xs])
    T = torch.cat([(x @ w.T) / x.shape[0] ** 0.5 for x, w in zip(Xs, Ws)])
    R = torch.empty_like(T)
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe")
    evals = [0]

    def closure() -> torch.Tensor:
        with torch.no_grad():
            torch.addmm(T, X, W.T, beta=-1, out=R)
            D = W - W0
            W.grad = 2 * (R.T @ X) + (2 * lam) * D
            evals[0] += 1
            return torch.dot(R.view(-1), R.view(-1)) + lam * torch.dot(D.view(-1), D.view(-1))

    opt.step(closure)
    return W.detach(), opt.state[W]["n_iter"], evals[0]


def compare(layers: list[dict], concepts: int, rank: int, seed: int, which: str, steps: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    tot_cf = tot_lb = 0.0
    worse = 0
    for layer in pick_subset(layers, which, steps):
        d_in, d_out, n = layer["d_in"], layer["d_out"], layer["rows"]
        iters = 50 if layer["hw"] else 500
        W0 = torch.randn(d_out, d_in, generator=gen) * 0.02
        M = mixing(d_in, gen, torch.float32)
        Xs, ups, downs = [], [], []
        for _ in range(concepts):
            scale = torch.exp(0.2 * torch.randn(d_in, generator=gen))
            Xs.append(torch.randn(n, d_in, generator=gen) @ (M * scale))
            ups.append(torch.randn(d_out, rank, generator=gen, dtype=F64) * 0.01)
            downs.append(torch.randn(rank, d_in, generator=gen, dtype=F64) / d_in ** 0.5)
        t = time.perf_counter()
        grams = [(x.to(F64).T @ x.to(F64)) / n for x in Xs]
        t_gram = time.perf_counter() - t
        row_form = layer["kind"] == "attn2.kv" and concepts * n < d_in
        runs = []
        for _ in range(CF_REPS):
            t = time.perf_counter()
            if row_form:  # the server computes these rows itself (fused text encoder): the n x n row form
                X64 = [x.to(F64) for x in Xs]
                lam_rows = LAM * sum(float((x * x).sum()) / x.shape[0] for x in X64) / d_in
                up, down = fused_lora_rows(ups, downs, X64, lam_rows)
            else:
                up, down = closed_form(grams, ups, downs)
            runs.append(time.perf_counter() - t)
        t_cf = statistics.median(runs)
        S = site_sum(grams)
        lam = LAM * float(S.diagonal().sum()) / d_in
        deltas = [u @ a for u, a in zip(ups, downs)]
        Ws = [W0 + dw.float() for dw in deltas]
        t = time.perf_counter()
        W_lb, n_iter, n_eval = lbfgs(W0, Xs, Ws, lam, iters)
        t_lb = time.perf_counter() - t
        W_cf = W0.to(F64) + up @ down
        f_cf = float(objective(W_cf, W0, deltas, grams, lam))
        f_lb = float(objective(W_lb, W0, deltas, grams, lam))
        gap = float((W_lb.to(F64) - W_cf).norm() / (W_cf - W0.to(F64)).norm())
        tot_cf, tot_lb = tot_cf + t_cf, tot_lb + t_lb
        worse += f_cf > f_lb * (1 + 1e-12)
        rows = f"{steps} steps x {layer['hw']}" if layer["hw"] else f"{n}"
        form = "row form, n x n" if row_form else "Cholesky of S, d x d"
        stop = ", stopped by its tolerances" if n_iter < iters else ""
        print(f"(b)   {qual(layer)} [{layer['kind']} {d_in}->{d_out}, {rows} rows/concept]: "
              f"closed {t_cf * 1e3:.1f} ms ({form}; median of {CF_REPS}), "
              f"L-BFGS {t_lb:.2f} s (one run incl. its targets, "
              f"{n_iter} it of max {iters}{stop}, {n_eval} evals), "
              f"objective closed {f_cf:.6e} vs L-BFGS {f_lb:.6e} (L-BFGS {100 * (f_lb - f_cf) / f_cf:+.3g}%), "
              f"||W_lbfgs-W*||/||W*-W0|| {gap:.3g}, speed {t_lb / t_cf:,.0f}x | goal >= {GOAL_SPEEDUP:,.0f}x, "
              f"objective no worse (Grams from raw rows {t_gram * 1e3:.0f} ms, client side, not counted)", flush=True)
    ratio = tot_lb / tot_cf
    ok = "met" if ratio >= GOAL_SPEEDUP and not worse else "MISSED"
    print(f"(b) total over the subset: closed {tot_cf * 1e3:.1f} ms, L-BFGS {tot_lb:.1f} s, speed {ratio:,.0f}x, "
          f"closed-form objective worse on {worse} layer(s) | goal >= {GOAL_SPEEDUP:,.0f}x faster at an objective "
          f"no worse: {ok}", flush=True)


# -- (e) artefact sizes -----------------------------------------------------------------------------------
def sd15_base(folder: Path) -> Path:
    """A random-weight SD 1.5-shaped pipeline (UNet, VAE, CLIP ViT-L text encoder, a 49,408-entry BPE
    vocabulary written locally) saved as a diffusers folder in float16, as SD 1.5 is shipped."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from shared.clip_vocab import write_tokenizer_files

    words = ["a", "photo", "of", "the", "on", "toy", "picture", "grass", "beach", "rendering"]
    vocab, merges = write_tokenizer_files(folder.parent / "tokenizer-src", words, size=SD_VOCAB)
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                                        projection_dim=768, hidden_act="quick_gelu",
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def folder_bytes(folder: Path, leave_out: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in leave_out)


def artefact_sizes(concepts: int, rank: int, work: Path) -> None:
    """(e): build, train, record, fuse at SD 1.5 shapes and print what lands on disk."""
    import copy

    from client.config import TrainConfig
    from client.stats import compute_stats
    from client.train import train_concept
    from fixtures.toy_concepts import make_toy_concepts
    from server.fuse import fuse
    from shared.base import load_base
    from shared.fused_model import LORA_FILE, STATE_FILE

    t0 = time.perf_counter()
    base_dir = sd15_base(work / "sd15-fp16")
    base_mb = folder_bytes(base_dir) / 1e6
    base = load_base(base_dir)
    t_base = time.perf_counter() - t0
    data = work / "data"
    make_toy_concepts(data, 1, images=2, size=256)
    folder = next(p for p in data.iterdir() if p.is_dir())
    packages = []
    for i in range(concepts):
        cfg = TrainConfig(steps=1, batch_size=1, resolution=256, rank=rank, alpha=float(rank), preview="none",
                          checkpoint_every=0, seed=i, templates=["a photo of a {}", "a {} on the grass"])
        pkg, _ = train_concept(copy.deepcopy(base), folder, [f"<c{i}a>", f"<c{i}b>"], "toy", work / f"pkg{i:02d}",
                               cfg, show_progress=False)
        compute_stats(copy.deepcopy(base), pkg, samples=1, steps=2, seed=i, show_progress=False)
        packages.append(pkg)
    t_train = time.perf_counter() - t0 - t_base
    del base
    gc.collect()
    fused = work / "fused"
    fuse(base_dir, packages, fused, show_progress=False)
    t_fuse = time.perf_counter() - t0 - t_base - t_train
    lora_mb = (fused / LORA_FILE).stat().st_size / 1e6
    pulled_mb = folder_bytes(fused, (STATE_FILE,)) / 1e6
    model_mb = folder_bytes(fused, (STATE_FILE, LORA_FILE)) / 1e6
    state_mb = (fused / STATE_FILE).stat().st_size / 1e6
    pkg_mb = folder_bytes(packages[0], ("stats.safetensors",)) / 1e6
    stats_mb = (packages[0] / "stats.safetensors").stat().st_size / 1e6
    folder_goal = base_mb + lora_mb
    print(f"(e) on-disk sizes at SD 1.5 shapes, {concepts} concepts of rank {rank} (1 MB = 10^6 bytes; base built "
          f"and saved in {t_base:.0f} s, {concepts} packages trained and recorded in {t_train:.0f} s, fused in "
          f"{t_fuse:.0f} s): base (float16) {base_mb:.1f} MB | fused folder (float16, pull --model-only) "
          f"{model_mb:.1f} MB, goal <= base + fused LoRA = {folder_goal:.1f} MB: "
          f"{'met' if model_mb <= folder_goal else f'MISSED by {model_mb - folder_goal:.2f} MB'}; with the fused "
          f"LoRA too (a plain pull) {pulled_mb:.1f} MB, {pulled_mb - folder_goal:+.2f} MB against that goal | "
          f"fused LoRA (float16) {lora_mb:.1f} MB, goal <= {GOAL_LORA_MB:.0f} MB: "
          f"{'met' if lora_mb <= GOAL_LORA_MB else 'MISSED'} | fusion state (float64, server only) "
          f"{state_mb:.1f} MB | one package {pkg_mb:.2f} MB, its stats {stats_mb:.1f} MB", flush=True)


# -- main --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=14)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lbfgs-subset", choices=("small", "full"), default="small",
                        help="small: one layer per kind and width asked for (6); full: 13 layers")
    parser.add_argument("--lbfgs-steps", type=int, default=LBFGS_STEPS,
                        help=f"sampler steps of raw rows per concept at spatial layers in (b) (the Grams use {STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15",
                        help="sdxl: (a) only, at SDXL 1.0's shapes, site by site")
    parser.add_argument("--skip-sizes", action="store_true", help="leave out (e), the artefact sizes")
    parser.add_argument("--sizes-only", action="store_true", help="run only (e), the artefact sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if args.child:
        (child_streaming if args.arch == "sdxl" else child)(args)
        return
    start, cpu0, own0 = time.perf_counter(), cpu_times(), own_cpu_seconds()
    N = args.concepts
    if args.sizes_only:
        with tempfile.TemporaryDirectory() as tmp:
            artefact_sizes(N, args.rank, Path(tmp))
        return
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    if args.arch == "sdxl":
        print(f"fusion bench, SDXL: torch {torch.__version__}, {torch.get_num_threads()} threads{load}, {N} concepts, "
              f"rank {args.rank}, seed {args.seed}, lam = {LAM:g}*tr(S)/d. SDXL 1.0's UNet and two text encoders "
              f"on the meta device (configs given explicitly), 1,024 px; random W0/LoRAs/activations; rows per "
              f"concept as for SD 1.5: text encoders {TEXT_ROWS}, UNet spatial {STEPS} steps x h*w (Wishart), "
              f"cross-attention k/v {KV_ROWS} rows of the 2,048-wide text states (the row form); the server's "
              f"forward of the prompts through the fused encoders is not timed", flush=True)
    else:
        print(f"fusion bench: torch {torch.__version__}, {torch.get_num_threads()} threads{load}, {N} concepts, "
              f"rank {args.rank}, seed {args.seed}, lam = {LAM:g}*tr(S)/d, L-BFGS subset {args.lbfgs_subset}. "
              f"Simplifications: SD 1.5 shapes on the meta device (text encoder = CLIP ViT-L/14 text, set explicitly); "
              f"random W0/LoRAs/activations; Grams made once per concept and site (setup, untimed): text encoder "
              f"({TEXT_ROWS} rows) and text-side k/v ({KV_ROWS} rows) from fresh rows X = Z*M, UNet spatial sites "
              f"({STEPS} steps x h*w rows) as exact-in-law Grams of X = Z*M (Bartlett Wishart, X never formed), "
              f"{BASES} per site reused across concepts as D*G*D with a random diagonal D per concept; text-side "
              f"k/v Grams are fused like stored Grams (the server's fused-text-encoder forward is not timed); "
              f"(b) holds "
              f"{args.lbfgs_steps} steps x h*w raw rows per concept at spatial layers for BOTH methods, L-BFGS in "
              f"float32 as the reference", flush=True)
    layers = sdxl_layers() if args.arch == "sdxl" else sd15_layers()
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "layers.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(layers))
        subprocess.run([sys.executable, __file__, "--child", str(spec), "--result", str(result), "--concepts", str(N),
                        "--rank", str(args.rank), "--seed", str(args.seed), "--arch", args.arch], check=True)
        res = json.loads(result.read_text())
    if args.arch == "sdxl":
        report_streaming(res, layers, N)
        print(f"bench wall time {time.perf_counter() - start:.0f} s", flush=True)
        return
    n_te = sum(la["model"] == "text_encoder" for la in layers)
    how = "VmHWM after reset" if res["exact_peak"] else "ru_maxrss, an upper bound"
    print(f"(a) closed-form fusion of all adapted layers, {res['sites']} input sites, {res['layers']} layers "
          f"({n_te} text encoder + {res['layers'] - n_te} UNet), {N} concepts from Grams (fused LoRA rank "
          f"{res['rank_out']}): {res['fuse_s']:.2f} s wall, median of {FUSE_REPS} runs ({res['fuse_range'][0]:.2f}-"
          f"{res['fuse_range'][1]:.2f}; first run {res['fuse_first_s']:.2f}) | goal ~{DESIGN_SECONDS:.0f} s "
          f"(docs/design.md 2.3); peak memory of the first run "
          f"+{res['peak_mb']:.0f} MiB over the {res['base_mb'] / 1024:.1f} GiB resident before the step (float64 "
          f"Grams of {N + 1} concepts, i.e. with the one (c) adds, held in memory; {how}) | goal: the fused LoRAs "
          f"({res['out_mb']:.0f} MiB float64) plus a few d x d buffers, one site at a time "
          f"(Grams/LoRAs setup {res['setup_s']:.0f} s, not timed)", flush=True)
    compare(layers, N, args.rank, args.seed, args.lbfgs_subset, args.lbfgs_steps)
    t1, tn = res["add_s"]["1"], res["add_s"][str(N)]
    (lo1, hi1), (lon, hin) = res["add_range"]["1"], res["add_range"][str(N)]
    print(f"(c) add one concept (S += G, its A G rows, re-solve all {res['sites']} sites / {res['layers']} layers; "
          f"median of {ADD_REPS} alternating runs after a warm-up): to a model of 1 concept {t1:.2f} s "
          f"({lo1:.2f}-{hi1:.2f}), of {N} concepts {tn:.2f} s ({lon:.2f}-{hin:.2f}), ratio {tn / t1:.2f}x | "
          f"goal <= {GOAL_ADD_RATIO}x: {'met' if tn / t1 <= GOAL_ADD_RATIO else 'MISSED'}", flush=True)
    parts = []
    for packing in PACKED:
        mb = res[f"bytes_{packing}"] / 1e6
        parts.append(f"{packing} {mb:.1f} MB ({'met' if mb <= GOAL_STATS_MB else 'MISSED'}, "
                     f"written in {res[f'write_{packing}_s']:.1f} s)")
    sizes = ", ".join(parts)
    print(f"(d) one concept's stats file, {res['stats_sites']} client-side sites (text encoder + UNet spatial; "
          f"1 MB = 10^6 bytes): {sizes} | goal <= {GOAL_STATS_MB:.0f} MB per concept", flush=True)
    err = max(v["err"] for v in res["packed"].values())
    groups = "; ".join(f"{model} ({v['sites']} sites, encodings {'/'.join(sorted(v['encodings']))}): {v['err']:.2e} "
                       f"at {v['where']} (Gram itself: max ||G_packed - G||_F/||G||_F {v['gram_err']:.1e})"
                       for model, v in res["packed"].items())
    print(f"(d) compact (the default packing) read back with Stats.normalised, first site of each kind and width, "
          f"all {N} concepts' Grams through compact files, max ||W_packed - W_exact||_F / ||W_exact - W0||_F "
          f"(relative to the fused CHANGE, stricter than to W): {groups} | goal <= {GOAL_PACKED:g}: "
          f"{'met' if err <= GOAL_PACKED else 'MISSED'}", flush=True)
    if not args.skip_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            artefact_sizes(N, args.rank, Path(tmp))
    noise, end = "", cpu_times()
    if cpu0 and end and end[2] > cpu0[2]:
        hz, wall = os.sysconf("SC_CLK_TCK"), time.perf_counter() - start
        others = (end[1] - cpu0[1]) / hz - (own_cpu_seconds() - own0)
        noise = (f"; other processes used {100 * max(others, 0.0) / (wall * (os.cpu_count() or 1)):.0f}% of the "
                 f"CPUs meanwhile, hypervisor steal {100 * (end[0] - cpu0[0]) / (end[2] - cpu0[2]):.1f}%")
    print(f"bench wall time {time.perf_counter() - start:.0f} s{noise}", flush=True)


if __name__ == "__main__":
    main()
