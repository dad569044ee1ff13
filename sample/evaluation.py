"""End-to-end fusion fidelity (docs/design.md §2.5 b): noise predictions of a fused model against each
concept's single-concept model, on the same latents, timesteps and seeds.

    ratio_i = ||ε_fused − ε_single|| / ||ε_single − ε_base||

where ε_base is the single-concept model with its LoRA switched off (base weights, the
concept's own tokens). Inputs: the clean latents the single-concept model samples for its
prompts (seeded), noised to several timesteps with seeded noise.
0 = the fused model behaves exactly like the concept's own model; 1 = as far from it as the untuned base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler

from shared.base import Base, load_base
from shared.edlora import LayerwiseTextEncoder, LayerwiseTextEncoderXL, added_conditions
from shared.errors import InvalidArgument, UserError
from shared.fused_model import expand_prompt, load_fused
from shared.lora import lora_scale
from shared.package import apply_concept, read_package
from shared.sampling import check_setting, check_size, encode_prompts, generate

TextEncoder = LayerwiseTextEncoder | LayerwiseTextEncoderXL

TIMESTEPS = (99, 299, 499, 699, 899)


def sample_latents(base: Base, encoder: TextEncoder, prompts: list[str], resolution: int, seed: int,
                   steps: int = 20) -> torch.Tensor:
    """Clean latents x0 the single-concept model generates for its prompts (the evaluation's inputs)."""
    return generate(base, encoder, prompts, seed=seed, steps=steps, height=resolution, width=resolution,
                    output_type="latent")


def _noise_predictions(base: Base, encoder: TextEncoder, prompts: list[str], clean: torch.Tensor,
                       noise: torch.Tensor, resolution: int) -> torch.Tensor:
    """ε predictions at every evaluation timestep for x_t = add_noise(x0, noise_t, t), the prompts encoded by
    `encoder` (on SDXL with their pooled embeddings and the size micro-conditioning)."""
    states, pooled = encode_prompts(encoder, prompts)
    dtype = base.unet.dtype
    added = added_conditions(pooled, resolution, resolution, clean.device, dtype)
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    outs = []
    for t, eps in zip(TIMESTEPS, noise):
        timesteps = torch.full((clean.shape[0],), t, device=clean.device)
        x_t = scheduler.add_noise(clean, eps, timesteps)
        outs.append(base.unet(x_t, t, states.to(dtype), added_cond_kwargs=added).sample.float())
    return torch.stack(outs)


def unique_labels(models: list[Path]) -> list[str]:
    """A label per model: its folder name, or its whole path where two folders share a name."""
    names = [Path(m).name for m in models]
    labels = [n if names.count(n) == 1 else str(m) for n, m in zip(names, models)]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise InvalidArgument("model", f"{twice} is given twice: name each model once")
    return labels


def _checked_packages(packages: list[Path]) -> list[tuple[Path, object, int]]:
    """(folder, metadata, resolution) of every package, all read and checked before any model is loaded."""
    out, names = [], set()
    for package in packages:
        meta, _ = read_package(package)
        if meta.name in names:
            raise InvalidArgument("concept", f"{package}: concept {meta.name} is given twice: name each once")
        names.add(meta.name)
        value = meta.training.get("resolution", 512)
        try:
            resolution = check_setting("height", value, "resolution")
        except InvalidArgument as exc:
            raise UserError(f"concept package {package}: training resolution {exc.message}") from None
        out.append((Path(package), meta, int(resolution)))
    return out


@torch.no_grad()
def fidelity(models: list[Path], packages: list[Path], base_path: Path | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, dict[str, float]]:
    """{concept: {model label: ratio}} for every package and every fused model (NaN: model lacks it). Labels are
    the models' folder names (whole paths where two share a name)."""
    seed = int(check_setting("seed", seed))
    labels = unique_labels(models)
    checked = _checked_packages(packages)
    fused = []
    for label, path in zip(labels, models):
        base, encoder, concepts = load_fused(path, device, dtype)
        fused.append((label, base, encoder, concepts))
    if base_path is None:
        from shared.fused_model import read_concepts

        base_path = Path(read_concepts(models[0])["base"])
    results: dict[str, dict[str, float]] = {}
    for package, meta, resolution in checked:
        single = load_base(base_path, device, dtype, sdxl=True)
        try:
            check_size(single, resolution, resolution, ("resolution", "resolution"))
        except InvalidArgument as exc:
            raise UserError(f"concept package {package}: training resolution {exc.message}") from None
        _, single_encoder = apply_concept(single, package)
        prompts = meta.prompts()
        clean = sample_latents(single, single_encoder, prompts, resolution, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        noise = torch.randn((len(TIMESTEPS), *clean.shape), generator=gen).to(device, dtype)
        eps_single = _noise_predictions(single, single_encoder, prompts, clean, noise, resolution)
        with lora_scale([single.unet, *single.text_encoders()], 0.0):
            eps_base = _noise_predictions(single, single_encoder, prompts, clean, noise, resolution)
        reference = (eps_single - eps_base).norm()
        if not bool(torch.isfinite(reference)) or float(reference) == 0.0:
            raise UserError(f"concept package {package}: its LoRA does not change the base's noise predictions "
                            f"(||ε_single − ε_base|| = {float(reference):g}), so the fidelity ratio is undefined; "
                            "is the package trained?")
        results[meta.name] = {}
        for label, base, encoder, concepts in fused:
            if meta.name not in {c["name"] for c in concepts}:
                results[meta.name][label] = float("nan")  # this model does not hold the concept
                continue
            text = [t.replace("{}", f"<{meta.name}>") for t in meta.prompt_templates]
            eps = _noise_predictions(base, encoder, [expand_prompt(p, concepts) for p in text], clean, noise,
                                     resolution)
            results[meta.name][label] = float((eps - eps_single).norm() / reference)
    return results
