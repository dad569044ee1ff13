"""A client's activation statistics (docs/design.md §2.2): Grams of the inputs of every adapted layer,
recorded while the concept's own single-concept model runs on its own concept.

Text-encoder sites: while encoding the concept's prompt templates (every layer-wise copy).
UNet spatial sites (attn1 q/k/v/out, attn2 q/out): while sampling the concept's prompts
(`sample`, the reference recipe: 20 DPM-Solver++ steps, all recorded) or at random timesteps
over the client's own noised training latents (`train`). Raw activations are never kept.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from rich.progress import Progress

from client.dataset import Example, augment, expand_caption, load_examples
from shared.base import Base
from shared.edlora import added_conditions
from shared.errors import InvalidArgument, UserError
from shared.grams import GramRecorder, group_sites, is_text_side
from shared.package import WEIGHTS_FILE, ConceptMeta, apply_concept
from shared.sampling import LIMITS, MAX_SEED, encode_prompts, generate
from shared.stats_file import DEFAULT_PACKING, PACKINGS, STATS_FILE, gram_key, write_stats
from shared.storage import sha256_file
from shared.validate import number


def client_sites(meta: ConceptMeta) -> dict[str, dict[str, list[str]]]:
    """{model: {site: modules}} for the sites a client records (text-side k/v are the server's); on SDXL the
    second text encoder's too."""
    return {prefix: group_sites([m for m in modules if prefix != "unet" or not is_text_side(m)])
            for prefix, modules in meta.lora_groups()}


SOURCES = ("sample", "train")
MAX_SAMPLES = 100_000


def check_stats_args(source: str, samples: int | None, data: Path | None, steps: int, seed: int,
                     packing: str = DEFAULT_PACKING) -> int | None:
    """Check compute_stats' settings before any work (InvalidArgument names the bad one); returns `samples`."""
    if source not in SOURCES:
        raise InvalidArgument("source", f"{source!r} must be 'sample' or 'train'")
    if source == "train" and data is None:
        raise InvalidArgument("data", "source 'train' needs the concept's training images folder")
    if samples is not None:
        samples = number("samples", samples, 1, MAX_SAMPLES, integer=True)
    number("steps", steps, 1, LIMITS["steps"][1], integer=True)
    number("seed", seed, 0, MAX_SEED - (samples or 0), integer=True)
    if packing not in PACKINGS:
        raise InvalidArgument("packing", f"{packing!r} is not one of {', '.join(PACKINGS)}")
    return samples


def package_resolution(meta: ConceptMeta, package: Path) -> int:
    """The resolution a package was trained at (its concept.json's training.resolution; 512 if absent)."""
    value = meta.training.get("resolution", 512)
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= LIMITS["height"][1]:
        raise UserError(f"concept package {package}: training.resolution {value!r} in its concept.json is not a "
                        "usable image size; is the package damaged?")
    return value


@torch.no_grad()
def compute_stats(base: Base, package: Path, source: str = "sample", samples: int | None = None,
                  data: Path | None = None, steps: int = 20, seed: int = 0, packing: str = DEFAULT_PACKING,
                  show_progress: bool = True) -> Path:
    """Record the package's Grams on `base` and write PKG/stats.safetensors; return its path.

    `samples` None: one per prompt template. Every setting and the package are checked before any
    work; nothing is written unless the whole recording succeeds.
    """
    samples = check_stats_args(source, samples, data, steps, seed, packing)
    examples = load_examples(Path(data)) if source == "train" else None
    meta, encoder = apply_concept(base, package)
    sites = client_sites(meta)
    prompts = meta.prompts()
    resolution = package_resolution(meta, Path(package))
    samples = samples or len(prompts)
    grams, rows, aliases = {}, {}, {}

    with contextlib.ExitStack() as stack:  # every text encoder's sites while the prompts are encoded once
        recorders = {prefix: stack.enter_context(GramRecorder(model, list(sites[prefix])))
                     for prefix, _, model in base.text_models()}
        encoder.encode(prompts)
    for prefix, rec in recorders.items():
        _collect(prefix, rec, sites[prefix], grams, rows, aliases)

    with GramRecorder(base.unet, list(sites["unet"])) as rec, Progress(disable=not show_progress) as progress:
        task = progress.add_task(f"stats ({source})", total=samples)
        if source == "sample":
            for i in range(samples):
                generate(base, encoder, [prompts[i % len(prompts)]], seed=seed + i, steps=steps,
                         height=resolution, width=resolution)
                progress.advance(task)
        else:
            _record_training_latents(base, encoder, meta, examples, samples, resolution, seed, progress, task)
    _collect("unet", rec, sites["unet"], grams, rows, aliases)

    path = Path(package) / STATS_FILE
    info = {"source": source, "samples": samples, "steps": steps, "seed": seed, "resolution": resolution,
            "base_fingerprint": base.fingerprint, "prompts": prompts,
            "weights_sha256": sha256_file(Path(package) / WEIGHTS_FILE)}
    write_stats(path, grams, rows, aliases, info, packing)
    return path


def _collect(model: str, rec: GramRecorder, sites: dict[str, list[str]], grams: dict, rows: dict,
             aliases: dict) -> None:
    for site, modules in sites.items():
        key = gram_key(model, site)
        grams[key], rows[key] = rec.grams[site].cpu(), rec.rows[site]
        for m in modules:
            aliases[f"{model}.{m}"] = key


def _record_training_latents(base: Base, encoder, meta: ConceptMeta, examples: list[Example], samples: int,
                             resolution: int, seed: int, progress: Progress, task) -> None:
    """UNet forwards at random timesteps over the client's own noised training latents."""
    gen = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    for i in range(samples):
        example = examples[i % len(examples)]
        pixels, _ = augment(example, resolution, gen, min_scale=1.0, flip=False)
        latents = base.vae.encode(pixels[None].to(base.device, base.dtype)).latent_dist.sample(generator=gen)
        latents = latents * base.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen).to(base.device)
        states, pooled = encode_prompts(encoder, [expand_caption(example.caption, meta.phrase, gen, shuffle=False)])
        added = added_conditions(pooled, resolution, resolution, base.device, base.dtype)
        base.unet(scheduler.add_noise(latents, noise, t), t, states.to(base.dtype), added_cond_kwargs=added)
        progress.advance(task)
