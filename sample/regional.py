"""Regionally controllable sampling (docs/design.md §2.4): a global prompt everywhere, each region's prompt
inside its box, in every cross-attention layer, with each layer reading its own layer-wise slice.

Text states travel through the pipeline as one tensor: the global prompt's layer-wise states
followed by each region's, along the sequence axis ((1 + R) * n_layers * 77 positions). The
classifier-free guidance batch pairs them: the unconditional half carries the global negative
and each region's own negative in the same slots.

Boxes are [top, left, bottom, right] fractions of the image. At a feature map of h x w cells, a
cell (i, j) belongs to a box when its centre ((i + ½)/h, (j + ½)/w) lies inside it (top and left
inclusive, bottom and right exclusive), the same rule at every resolution. A box too small to
contain any cell centre at a coarse resolution takes the one cell holding its own centre, so every
region acts at every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from shared.edlora import LayerSliceProcessor, cross_attention_layers, install_layer_processors, take_layer
from shared.errors import UserError


@dataclass(frozen=True)
class Box:
    """[top, left, bottom, right] as fractions of the image height and width."""

    top: float
    left: float
    bottom: float
    right: float

    @classmethod
    def parse(cls, values, where: str = "box") -> Box:
        """A Box from four finite numbers, fractions in [0, 1] with top < bottom and left < right, or a
        UserError naming `where` and saying what is wrong."""
        if not isinstance(values, (list, tuple)) or len(values) != 4 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise UserError(f"{where} must be four numbers [top, left, bottom, right], got {values!r}")
        top, left, bottom, right = (float(v) for v in values)
        shown = [float(v) for v in values]
        if not all(math.isfinite(v) for v in shown):
            raise UserError(f"{where} {shown} is not finite: give fractions of the image in [0, 1]")
        if not all(0.0 <= v <= 1.0 for v in shown):
            raise UserError(f"{where} {shown} lies outside [0, 1]: give fractions of the image")
        if bottom <= top or right <= left:
            raise UserError(f"{where} {shown} is empty: bottom must exceed top and right must exceed left")
        return cls(top, left, bottom, right)

    def mask(self, h: int, w: int) -> torch.Tensor:
        """Bool (h, w): the cells whose centres lie in the box (at least the cell holding its centre)."""
        rows = (torch.arange(h, dtype=torch.float64) + 0.5) / h
        cols = (torch.arange(w, dtype=torch.float64) + 0.5) / w
        inside = ((rows >= self.top) & (rows < self.bottom))[:, None] & ((cols >= self.left) & (cols < self.right))
        if not inside.any():
            i = min(h - 1, int((self.top + self.bottom) / 2 * h))
            j = min(w - 1, int((self.left + self.right) / 2 * w))
            inside[i, j] = True
        return inside


def level_sizes(latent_hw: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """(h, w) of each UNet level: the latent size halved, rounding up, as the stride-2 convolutions do."""
    sizes, (h, w) = [], latent_hw
    for _ in range(levels):
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return sizes


def feature_grid(latent_hw: tuple[int, int], positions: int) -> tuple[int, int]:
    """(h, w) of the UNet feature map with `positions` cells."""
    for h, w in level_sizes(latent_hw, 16):
        if h * w == positions:
            return h, w
    raise ValueError(f"a feature map of {positions} cells does not come from a {latent_hw} latent")


@dataclass
class RegionLayout:
    """What every regional processor of one UNet reads: the boxes and the latent size of this run."""

    boxes: list[Box] = field(default_factory=list)
    latent_hw: tuple[int, int] = (0, 0)
    _masks: dict = field(default_factory=dict)

    def set(self, boxes: list[Box], latent_hw: tuple[int, int]) -> None:
        self.boxes, self.latent_hw, self._masks = list(boxes), latent_hw, {}

    def cells(self, positions: int, device: torch.device) -> list[torch.Tensor]:
        """Per box, the flat indices of its cells at the feature map with `positions` cells."""
        key = (positions, str(device))
        if key not in self._masks:
            h, w = feature_grid(self.latent_hw, positions)
            self._masks[key] = [box.mask(h, w).flatten().nonzero().squeeze(1).to(device) for box in self.boxes]
        return self._masks[key]


class RegionalProcessor(LayerSliceProcessor):
    """Cross-attention layer `index`: the global prompt's attention everywhere, replaced inside each box by
    that box's queries attending to the region prompt's keys/values (overlaps: the mean of the regions)."""

    def __init__(self, index: int, n_layers: int, length: int, layout: RegionLayout):
        super().__init__(index, n_layers, length)
        self.layout = layout

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        regions = len(self.layout.boxes)
        if encoder_hidden_states is None or not regions or self.capture is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        span = self.n_layers * self.length
        if encoder_hidden_states.shape[1] != (regions + 1) * span:
            raise ValueError(f"regional text states have {encoder_hidden_states.shape[1]} positions, expected "
                             f"{regions + 1} x {span}")
        chunks = encoder_hidden_states.split(span, dim=1)
        sliced = [take_layer(chunk, self.index, self.n_layers, self.length) for chunk in chunks]
        out = AttnProcessor2_0.__call__(self, attn, hidden_states, sliced[0], attention_mask, temb)
        total = torch.zeros_like(out)
        count = torch.zeros(out.shape[1], dtype=out.dtype, device=out.device)
        for cells, context in zip(self.layout.cells(hidden_states.shape[1], hidden_states.device), sliced[1:]):
            local = AttnProcessor2_0.__call__(self, attn, hidden_states[:, cells], context, attention_mask, temb)
            total[:, cells] += local
            count[cells] += 1
        covered = count > 0
        out[:, covered] = total[:, covered] / count[covered][None, :, None]
        return out


def install_regional_processors(unet, length: int, layout: RegionLayout) -> list[RegionalProcessor]:
    """Give every cross-attention layer a regional processor reading `layout`; self-attention keeps SDPA. Each
    keeps the token slot its layer-wise processor read (the model's token layout); a UNet without layer-wise
    processors gets one slot per block."""
    procs = unet.attn_processors
    current = [procs[f"{name}.processor"] for name in cross_attention_layers(unet)]  # install's order
    if current and all(isinstance(p, LayerSliceProcessor) for p in current):
        slots = iter([(p.index, p.n_layers) for p in current])
        return install_layer_processors(unet, length, lambda k, n, length: RegionalProcessor(*next(slots), length,
                                                                                             layout))
    return install_layer_processors(unet, length, lambda k, n, length: RegionalProcessor(k, n, length, layout))
