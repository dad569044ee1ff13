"""Spatial conditions (a pose or sketch image) through a diffusers T2IAdapter or ControlNetModel,
with a global weight and optional per-box weights; several conditions are summed.

Each condition's residuals are computed at weight 1 and multiplied by a weight map: the global
weight everywhere, a box's own weight on the cells inside that box (boxes map to each residual's
resolution by the cell-centre rule of sample.regional; where weighted boxes overlap, the mean of
their weights). The maps are applied in a forward pre-hook of the UNet, so the same diffusers
StableDiffusionPipeline (or StableDiffusionXLPipeline) runs with or without conditions, with every scheduler.

On SDXL: a T2I-Adapter of SDXL's layout (`adapter_type="full_adapter_xl"`) and a ControlNetModel with the
UNet's `addition_embed_type="text_time"`, which is given the UNet's own pooled-text and size conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from PIL import Image

from sample.regional import Box, level_sizes
from shared.edlora import LayerSliceProcessor, cross_attention_layers
from shared.errors import UserError
from shared.images import BLACK, open_image
from shared.validate import number, read_json

KINDS = ("t2i-adapter", "controlnet")
CLASS_NAMES = {"t2i-adapter": "T2IAdapter", "controlnet": "ControlNetModel"}
KIND_OF_CLASS = {v: k for k, v in CLASS_NAMES.items()}
MAX_WEIGHT = 10.0  # a condition's (or box's) weight: 0 switches it off, 1 is as trained
ASPECT_TOLERANCE = 0.02  # relative: a condition image is resized, never distorted by more than this


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


def check_weight(value, where: str) -> float:
    """A condition or box weight: a finite number in [0, MAX_WEIGHT], or a UserError naming `where`."""
    try:
        return float(number("weight", value, 0.0, MAX_WEIGHT))
    except UserError as exc:
        raise UserError(f"{where}: {getattr(exc, 'message', exc)} (a condition weight lies in [0, "
                        f"{MAX_WEIGHT:g}]: 0 switches it off, 1 is as trained)") from None


def check_spec(spec: ConditionSpec, where: str = "condition") -> None:
    """Kind and weights of a condition as written (no file is opened)."""
    if spec.kind not in KINDS:
        raise UserError(f"{where} type {spec.kind!r} is not one of {', '.join(KINDS)}")
    check_weight(spec.weight, f"{where} weight")
    for j, (box, weight) in enumerate(spec.boxes):
        if not isinstance(box, Box):
            raise UserError(f"{where} boxes[{j}] is not a box")
        check_weight(weight, f"{where} boxes[{j}].weight")


def check_model_folder(kind: str, folder: Path) -> None:
    """`folder` holds a diffusers model of the class `kind` needs (read from its config.json), or a UserError."""
    cls = CLASS_NAMES[kind]
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"condition model {folder} is not a folder: give a local diffusers {cls} folder")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"condition model {folder} has no config.json: give a local diffusers {cls} folder")
    data = read_json(config, "condition model config")
    found = data.get("_class_name") if isinstance(data, dict) else None
    if found != cls:
        hint = f"; it is a {found}: use type {KIND_OF_CLASS[found]}" if found in KIND_OF_CLASS else ""
        raise UserError(f"condition model {folder} is not a {cls} folder (its config.json names "
                        f"{found if isinstance(found, str) else 'no diffusers class'}){hint}")


def read_condition_image(path: Path, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """(1, channels, height, width) in [0, 1] (channels 1: greyscale, 3: RGB), resized to the image size;
    UserError when it cannot be read or its aspect ratio differs from the image's (it would be distorted).
    Any Pillow mode: 16-bit greyscale is scaled by its depth, transparent pixels become black."""
    picture = open_image(path, "condition image", BLACK)
    if channels == 1:
        picture = picture.convert("L")
    w, h = picture.size
    if abs((w / h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise UserError(f"condition image {path} is {w}x{h} but the image is {width}x{height} (width x height): "
                        "their shapes differ, so it would be distorted; crop or pad it to the same aspect ratio, "
                        "or change height/width")
    picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    data = torch.from_numpy(np.asarray(picture).copy()).reshape(height, width, channels)
    return (data.permute(2, 0, 1).float() / 255.0)[None]


def check_condition(spec: ConditionSpec, height: int, width: int, where: str = "condition") -> None:
    """Everything about a condition that can be checked without the UNet: kind, weights, model folder class and
    the image (readable, same shape as the output)."""
    check_spec(spec, where)
    check_model_folder(spec.kind, spec.model)
    read_condition_image(spec.image, height, width, 3)


def adapter_feature_shapes(unet: UNet2DConditionModel, latent: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(channels, h, w) of the T2I-Adapter feature each down block of `unet` adds, as diffusers' UNet adds them:
    after the last resnet + attention of a block with cross-attention (at the block's input size), after the
    downsampler of a block without (SDXL's first level)."""
    types, channels = unet.config.down_block_types, list(unet.config.block_out_channels)
    sizes = level_sizes(latent, len(channels) + 1)
    return [(c, *sizes[i if "CrossAttn" in kind or i == len(types) - 1 else i + 1])
            for i, (kind, c) in enumerate(zip(types, channels))]


class LoadedCondition:
    """A condition's model on the UNet's device and dtype, its image, and (adapters) its features."""

    def __init__(self, spec: ConditionSpec, unet: UNet2DConditionModel, vae_factor: int, height: int, width: int,
                 text_length: int = 77):
        check_spec(spec)
        cls = T2IAdapter if spec.kind == "t2i-adapter" else ControlNetModel
        check_model_folder(spec.kind, spec.model)
        self.spec, self.text_length, self._maps = spec, text_length, {}
        device, dtype = unet.device, unet.dtype
        try:
            model, info = cls.from_pretrained(str(spec.model), local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{spec.model} is not a loadable {cls.__name__} folder ({exc})") from exc
        missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
        if missing:
            raise UserError(f"{spec.model}: its weights do not cover its config ({len(missing)} tensors missing or "
                            f"mis-shaped, e.g. {missing[0]}); the folder is damaged or mixed up")
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise UserError(f"{spec.model}: weight {bad} contains NaN or Inf; the file is damaged")
        self.model = model.to(device, dtype).eval()
        latent = (height // vae_factor, width // vae_factor)
        if spec.kind == "t2i-adapter":
            channels = int(self.model.config.in_channels)
            if channels not in (1, 3):
                raise UserError(f"T2I-Adapter {spec.model} reads {channels}-channel images; only 1 (greyscale) "
                                "or 3 (RGB) can be given")
            self.image = read_condition_image(spec.image, height, width, channels).to(device, dtype)
            try:
                with torch.no_grad():
                    self.features = list(self.model(self.image))
            except RuntimeError as exc:
                raise UserError(f"T2I-Adapter {spec.model} cannot read a {height}x{width} image ({exc})") from exc
            got = [(int(f.shape[1]), int(f.shape[2]), int(f.shape[3])) for f in self.features]
            expected = adapter_feature_shapes(unet, latent)
            if got not in (expected, expected + [expected[-1]]):
                raise UserError(f"T2I-Adapter {spec.model} gives features (channels, h, w) {got}, but this UNet's "
                                f"down blocks take {expected} (and optionally the middle block one more like the "
                                "last): use an adapter trained for this base (its layout, channels and downscale "
                                "factor must fit the UNet and VAE)")
            self.features = [self._weighted(f) for f in self.features]  # fixed over the steps: weighted once
        else:
            self._check_controlnet(unet, vae_factor)
            channels = int(self.model.config.conditioning_channels)
            self.image = read_condition_image(spec.image, height, width, channels).to(device, dtype)

    def _check_controlnet(self, unet: UNet2DConditionModel, vae_factor: int) -> None:
        cfg = self.model.config

        def plain(value):
            return list(value) if isinstance(value, (list, tuple)) else value

        keys = ("block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block", "down_block_types",
                "mid_block_type", "transformer_layers_per_block", "addition_embed_type",
                "projection_class_embeddings_input_dim")
        wrong = [(k, plain(cfg[k]), plain(unet.config[k])) for k in keys
                 if k in cfg and k in unet.config and plain(cfg[k]) != plain(unet.config[k])]
        if wrong:
            detail = "; ".join(f"{k} {a} vs the UNet's {b}" for k, a, b in wrong)
            raise UserError(f"ControlNet {self.spec.model} does not fit this UNet ({detail}): use one trained for "
                            "this base")
        embed = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        if embed != vae_factor or int(cfg.conditioning_channels) not in (1, 3):
            raise UserError(f"ControlNet {self.spec.model} embeds {cfg.conditioning_channels}-channel images at 1/"
                            f"{embed} scale; this base needs greyscale or RGB at 1/{vae_factor}")
        unet_layers, unet_procs = cross_attention_layers(unet), unet.attn_processors
        procs = dict(self.model.attn_processors)
        for name in [n for n in procs if n.endswith("attn2.processor")]:
            layer = name.removesuffix(".processor")
            if layer not in unet_layers:
                raise UserError(f"ControlNet {self.spec.model}: cross-attention {layer} has no counterpart in the UNet")
            own = unet_procs[name]  # the token slot the UNet's own block reads (layer-wise, per block or module)
            slot, slots = (own.index, own.n_layers) if isinstance(own, LayerSliceProcessor) else \
                (unet_layers.index(layer), len(unet_layers))
            procs[name] = LayerSliceProcessor(slot, slots, self.text_length)
        self.model.set_attn_processor(procs)

    def residuals(self, sample: torch.Tensor, timestep, text: torch.Tensor,
                  added: dict | None = None) -> tuple[list[torch.Tensor], ...]:
        """Weighted residuals for a batch: (down, mid) for a ControlNet, (intrablock, None) for an adapter.
        `added`: the UNet call's added conditions (SDXL's pooled text and size ids), given to a ControlNet."""
        batch = sample.shape[0]
        if isinstance(self.model, T2IAdapter):
            return [f.expand(batch, *f.shape[1:]) for f in self.features], None
        image = self.image.expand(batch, *self.image.shape[1:])
        down, mid = self.model(sample, timestep, encoder_hidden_states=text, controlnet_cond=image,
                               conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
        return [self._weighted(r) for r in down], self._weighted(mid)

    def _weighted(self, residual: torch.Tensor) -> torch.Tensor:
        key = (residual.shape[-2], residual.shape[-1], residual.device, residual.dtype)
        if key not in self._maps:
            self._maps[key] = weight_map(self.spec, *key[:2]).to(residual.device, residual.dtype)
        return residual * self._maps[key]


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
            parts, middle = cond.residuals(sample, timestep, text, kwargs.get("added_cond_kwargs"))
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
