"""Generate images with layer-wise text states through diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from PIL import Image, ImageDraw

from shared.base import Base
from shared.edlora import LayerwiseTextEncoder
from shared.errors import InvalidArgument

SCHEDULERS = {
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"),
    "ddim": DDIMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
}


def make_scheduler(base: Base, name: str):
    try:
        return SCHEDULERS[name](base.scheduler.config)
    except KeyError:
        raise InvalidArgument("scheduler", f"{name!r} is not one of {', '.join(SCHEDULERS)}") from None


def latent_shape(base: Base, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(batch, channels, h, w) of the latents for an image of height x width (checked)."""
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    if height % (factor * 2) or width % (factor * 2) or height <= 0 or width <= 0:
        raise InvalidArgument("height", f"height and width must be positive multiples of {factor * 2} for this base, "
                        f"got {height}x{width}")
    return batch, base.unet.config.in_channels, height // factor, width // factor


def initial_latents(base: Base, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Seeded noise drawn on the CPU, so a seed gives the same start on every device."""
    shape = latent_shape(base, batch, height, width)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def generate(base: Base, encoder: LayerwiseTextEncoder, prompts: list[str], negative: str = "", seed: int = 0,
             steps: int = 20, guidance: float = 7.5, height: int = 512, width: int = 512,
             scheduler: str = "dpm++", output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
    """One image per prompt, from seeded latents, with classifier-free guidance (or the final latents)."""
    positive = encoder.encode(prompts)
    negative_states = encoder.encode([negative] * len(prompts))
    return denoise(base, positive, negative_states, seed, steps, guidance, height, width, scheduler, output_type)


@torch.no_grad()
def denoise(base: Base, positive: torch.Tensor, negative: torch.Tensor, seed: int = 0, steps: int = 20,
            guidance: float = 7.5, height: int = 512, width: int = 512, scheduler: str = "dpm++",
            output_type: str = "pil", show_progress: bool = False) -> list[Image.Image] | torch.Tensor:
    """diffusers' StableDiffusionPipeline on ready text states (one image per batch row), seeded latents;
    `show_progress` shows the pipeline's own step bar."""
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=make_scheduler(base, scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=not show_progress, desc="denoising")
    dtype = base.unet.dtype
    latents = initial_latents(base, positive.shape[0], height, width, seed).to(base.device, dtype)
    return pipe(prompt_embeds=positive.to(dtype), negative_prompt_embeds=negative.to(dtype), latents=latents,
                num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                output_type=output_type).images


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
