"""Generate images with layer-wise text states through diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image, ImageDraw

from shared.base import Base
from shared.edlora import LayerwiseTextEncoder, LayerwiseTextEncoderXL
from shared.errors import InvalidArgument, UserError
from shared.names import MAX_SEED
from shared.validate import number

SCHEDULERS = {
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"),
    "ddim": DDIMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
}


LIMITS: dict[str, tuple[float, float, bool]] = {  # setting: (lowest, highest, integer), both ends allowed
    "seed": (0, MAX_SEED, True),
    "steps": (1, 1000, True),
    "guidance": (1.0, 100.0, False),  # below 1 diffusers switches guidance off: 1 is "none"
    "height": (8, 4096, True),
    "width": (8, 4096, True),
    "batch": (1, 64, True),
}


def check_setting(name: str, value, argument: str | None = None) -> float | int:
    """A sampler setting (a key of LIMITS) as a finite number of its type in its range, or InvalidArgument
    naming `argument` (default: the setting's own name)."""
    low, high, integer = LIMITS[name]
    return number(argument or name, value, low, high, integer=integer)


def check_scheduler(name, argument: str = "scheduler") -> str:
    """A scheduler name of SCHEDULERS, or InvalidArgument naming `argument`."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise InvalidArgument(argument, f"{name!r} is not one of {', '.join(SCHEDULERS)}")
    return name


def make_scheduler(base: Base, name: str):
    """A fresh scheduler `name` (a key of SCHEDULERS) from the base's scheduler config."""
    return SCHEDULERS[check_scheduler(name)](base.scheduler.config)


def vae_factor(base: Base) -> int:
    """Pixels per latent cell along each side."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def check_size(base: Base, height: int, width: int, arguments: tuple[str, str] = ("height", "width")) -> None:
    """Height and width this base can sample (positive multiples of 2 x its VAE factor, within LIMITS), or
    InvalidArgument naming the offending one of `arguments`."""
    step = vae_factor(base) * 2
    for value, name, argument in ((height, "height", arguments[0]), (width, "width", arguments[1])):
        check_setting(name, value, argument)
        if value % step:
            raise InvalidArgument(argument, f"{value} is not a multiple of {step}: this base samples sizes in steps "
                                  f"of {step} pixels (e.g. {max(step, value // step * step)})")


def latent_shape(base: Base, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(batch, channels, h, w) of the latents for an image of height x width (checked)."""
    check_size(base, height, width)
    factor = vae_factor(base)
    return batch, base.unet.config.in_channels, height // factor, width // factor


def initial_latents(base: Base, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Seeded noise drawn on the CPU, so a seed gives the same start on every device."""
    shape = latent_shape(base, batch, height, width)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def encode_prompts(encoder: LayerwiseTextEncoder | LayerwiseTextEncoderXL,
                   prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(layer-wise text states, SDXL's pooled embeddings or None) of `prompts`."""
    if isinstance(encoder, LayerwiseTextEncoderXL):
        return encoder.encode_with_pooled(prompts)
    return encoder.encode(prompts), None


@torch.no_grad()
def generate(base: Base, encoder: LayerwiseTextEncoder | LayerwiseTextEncoderXL, prompts: list[str],
             negative: str = "", seed: int = 0, steps: int = 20, guidance: float = 7.5, height: int = 512,
             width: int = 512, scheduler: str = "dpm++", output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
    """One image per prompt, from seeded latents, with classifier-free guidance (or the final latents)."""
    positive, pooled = encode_prompts(encoder, prompts)
    negative_states, negative_pooled = encode_prompts(encoder, [negative] * len(prompts))
    return denoise(base, positive, negative_states, seed, steps, guidance, height, width, scheduler, output_type,
                   pooled=None if pooled is None else (pooled, negative_pooled))


@torch.no_grad()
def denoise(base: Base, positive: torch.Tensor, negative: torch.Tensor, seed: int = 0, steps: int = 20,
            guidance: float = 7.5, height: int = 512, width: int = 512, scheduler: str = "dpm++",
            output_type: str = "pil", show_progress: bool = False,
            pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Image.Image] | torch.Tensor:
    """diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline on an SDXL base, with the (positive,
    negative) pooled embeddings) on ready text states (one image per batch row), seeded latents;
    `show_progress` shows the pipeline's own step bar. Every setting is checked against LIMITS first."""
    for name, value in (("seed", seed), ("steps", steps), ("guidance", guidance)):
        check_setting(name, value)
    for states in (positive, negative):
        if not bool(torch.isfinite(states).all()):
            raise UserError("the prompts' text states contain NaN or Inf: the text encoder or a concept's "
                            "embedding is damaged")
    dtype = base.unet.dtype
    extra = {}
    if base.arch == "sdxl":
        if pooled is None:
            raise ValueError("an SDXL base needs the prompts' pooled embeddings")
        extra = {"pooled_prompt_embeds": pooled[0].to(dtype), "negative_pooled_prompt_embeds": pooled[1].to(dtype)}
    pipe = base.pipeline(make_scheduler(base, scheduler))
    pipe.set_progress_bar_config(disable=not show_progress, desc="denoising")
    latents = initial_latents(base, positive.shape[0], height, width, seed).to(base.device, dtype)
    return pipe(prompt_embeds=positive.to(dtype), negative_prompt_embeds=negative.to(dtype), latents=latents,
                num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                output_type=output_type, **extra).images


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Lay images out in a labelled grid (rows x columns)."""
    w, h = rows[0][0].size
    pad_left, pad_top = 180, 18
    grid = Image.new("RGB", (pad_left + w * len(rows[0]), pad_top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((pad_left + j * w + 2, 2), label, fill="black")
    for i, row in enumerate(rows):
        draw.text((2, pad_top + i * h + h // 2 - 6), row_labels[i][:30], fill="black")
        for j, img in enumerate(row):
            grid.paste(img, (pad_left + j * w, pad_top + i * h))
    return grid
