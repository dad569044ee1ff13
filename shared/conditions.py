"""Spatial conditions (a pose or sketch image) through a diffusers T2IAdapter or ControlNetModel,
with a global weight and optional per-box weights; several conditions are summed.

Each condition's residuals are computed at weight 1 and multiplied by a weight map: the global
weight everywhere, a box's own weight on the cells inside that box (boxes map to each residual's
resolution by the cell-centre rule of shared.regional; where weighted boxes overlap, the mean of
their weights). The maps are applied in a forward pre-hook of the UNet, so the same diffusers
StableDiffusionPipeline runs with or without conditions, with every scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from PIL import Image, UnidentifiedImageError

from shared.edlora import LayerSliceProcessor, cross_attention_layers
from shared.errors import UserError
from shared.regional import Box

KINDS = ("t2i-adapter", "controlnet")


@dataclass
class ConditionSpec:
    """One condition as the user wrote it."""

    kind: str
    model: Path
    image: Path
    weight: float = 1.0
    boxes: list[tuple[Box, float]] = field(default_factory=list)


def weight_map(spec: ConditionSpec, h: int, w: int) -> torch.Tensor:
    """(h, w) float32: the global weight, each box's weight inside it (mean where boxes overlap)."""
    out = torch.full((h, w), float(spec.weight))
    if spec.boxes:
        total, count = torch.zeros(h, w), torch.zeros(h, w)
        for box, weight in spec.boxes:
            inside = box.mask(h, w)
            total[inside] += float(weight)
            count[inside] += 1
        covered = count > 0
        out[covered] = total[covered] / count[covered]
    return out


def read_condition_image(path: Path, height: int, width: int) -> torch.Tensor:
    """(1, 3, height, width) in [0, 1], resized to the image size; UserError when it cannot be read."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"condition image {path} cannot be read as an image ({exc}); give a PNG or JPEG") from exc
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (data.permute(2, 0, 1).float() / 255.0)[None]


class LoadedCondition:
    """A condition's model on the UNet's device and dtype, its image, and (adapters) its features."""

    def __init__(self, spec: ConditionSpec, unet: UNet2DConditionModel, vae_factor: int, height: int, width: int,
                 text_length: int = 77):
        if spec.kind not in KINDS:
            raise UserError(f"condition type {spec.kind!r} is not one of {', '.join(KINDS)}")
        if not Path(spec.model).is_dir():
            raise UserError(f"condition model {spec.model} is not a folder: give a local diffusers "
                            f"{'T2IAdapter' if spec.kind == 't2i-adapter' else 'ControlNetModel'} folder")
        self.spec, self.text_length = spec, text_length
        device, dtype = unet.device, unet.dtype
        self.image = read_condition_image(spec.image, height, width).to(device, dtype)
        cls = T2IAdapter if spec.kind == "t2i-adapter" else ControlNetModel
        try:
            self.model = cls.from_pretrained(str(spec.model), local_files_only=True).to(device, dtype).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"{spec.model} is not a loadable {cls.__name__} folder ({exc})") from exc
        blocks = list(unet.config.block_out_channels)
        if spec.kind == "t2i-adapter":
            self._check_adapter(blocks, vae_factor)
            with torch.no_grad():
                self.features = self.model(self.image)
            expected = [(height // vae_factor) >> i for i in range(len(blocks))]
            got = [f.shape[-2] for f in self.features]
            if got != expected:
                raise UserError(f"T2I-Adapter {spec.model} gives features of heights {got}; this UNet's levels are "
                                f"{expected}: its downscale factor does not fit this base")
        else:
            self._check_controlnet(unet, blocks, vae_factor)

    def _check_adapter(self, blocks: list[int], vae_factor: int) -> None:
        cfg = self.model.config
        channels = list(cfg.channels)
        if channels != blocks:
            raise UserError(f"T2I-Adapter {self.spec.model} has channels {channels}, but the UNet's blocks have "
                            f"{blocks}: use an adapter trained for this base")
        if int(cfg.in_channels) != 3:
            raise UserError(f"T2I-Adapter {self.spec.model} reads {cfg.in_channels} image channels, not RGB")
        if int(cfg.downscale_factor) != vae_factor:
            raise UserError(f"T2I-Adapter {self.spec.model} downscales by {cfg.downscale_factor}, the VAE by "
                            f"{vae_factor}: use an adapter trained for this base")

    def _check_controlnet(self, unet: UNet2DConditionModel, blocks: list[int], vae_factor: int) -> None:
        cfg = self.model.config
        def plain(value):
            return list(value) if isinstance(value, (list, tuple)) else value

        wrong = [(k, plain(cfg[k]), plain(unet.config[k])) for k in ("block_out_channels", "cross_attention_dim",
                                                                      "in_channels")
                 if plain(cfg[k]) != plain(unet.config[k])]
        if wrong:
            detail = "; ".join(f"{k} {a} vs the UNet's {b}" for k, a, b in wrong)
            raise UserError(f"ControlNet {self.spec.model} does not fit this UNet ({detail}): use one trained for "
                            "this base")
        embed = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        if embed != vae_factor or int(cfg.conditioning_channels) != 3:
            raise UserError(f"ControlNet {self.spec.model} embeds {cfg.conditioning_channels}-channel images at 1/"
                            f"{embed} scale; this base needs RGB at 1/{vae_factor}")
        unet_layers = cross_attention_layers(unet)
        procs = dict(self.model.attn_processors)
        for name in [n for n in procs if n.endswith("attn2.processor")]:
            layer = name.removesuffix(".processor")
            if layer not in unet_layers:
                raise UserError(f"ControlNet {self.spec.model}: cross-attention {layer} has no counterpart in the UNet")
            procs[name] = LayerSliceProcessor(unet_layers.index(layer), len(unet_layers), self.text_length)
        self.model.set_attn_processor(procs)

    def residuals(self, sample: torch.Tensor, timestep, text: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """Weighted residuals for a batch: (down, mid) for a ControlNet, (intrablock, None) for an adapter."""
        batch = sample.shape[0]
        if isinstance(self.model, T2IAdapter):
            down = [f.expand(batch, *f.shape[1:]) for f in self.features]
            return [self._weighted(f) for f in down], None
        image = self.image.expand(batch, *self.image.shape[1:])
        down, mid = self.model(sample, timestep, encoder_hidden_states=text, controlnet_cond=image,
                               conditioning_scale=1.0, return_dict=False)
        return [self._weighted(r) for r in down], self._weighted(mid)

    def _weighted(self, residual: torch.Tensor) -> torch.Tensor:
        wmap = weight_map(self.spec, residual.shape[-2], residual.shape[-1]).to(residual.device, residual.dtype)
        return residual * wmap


class ConditionHook:
    """Adds the summed, weighted residuals of every condition to each UNet call (a forward pre-hook)."""

    def __init__(self, conditions: list[LoadedCondition], text_span: int):
        self.conditions, self.text_span = conditions, text_span
        self.handle = None

    def attach(self, unet: UNet2DConditionModel) -> ConditionHook:
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        text = kwargs["encoder_hidden_states"][:, : self.text_span]  # the global prompt's layer-wise states
        intra = down = mid = None
        for cond in self.conditions:
            parts, middle = cond.residuals(sample, timestep, text)
            if middle is None:
                intra = parts if intra is None else [a + b for a, b in zip(intra, parts)]
            else:
                down = parts if down is None else [a + b for a, b in zip(down, parts)]
                mid = middle if mid is None else mid + middle
        if intra is not None:
            kwargs["down_intrablock_additional_residuals"] = list(intra)  # the UNet pops from this list
        if down is not None:
            kwargs["down_block_additional_residuals"] = tuple(down)
            kwargs["mid_block_additional_residual"] = mid
        return args, kwargs
