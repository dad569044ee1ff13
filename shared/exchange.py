"""LoRAs and embeddings in the formats other tools read: kohya key names (AUTOMATIC1111, ComfyUI, kohya's
scripts) or diffusers' own, and textual-inversion files.

A mixshow LoRA (a package's, scale alpha/rank; a fused model's, scale 1) is keyed
`<model>.<module>.lora_A.weight` / `.lora_B.weight`, as PEFT names them. kohya names the same pair
`lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` (`lora_te_` for SD 1.x's text encoder,
`lora_te1_` / `lora_te2_` for SDXL's two) with `.alpha` = scale x rank; diffusers' own format is the PEFT
keys with the `unet.` / `text_encoder.` prefixes. A textual-inversion file holds one embedding per
trigger word (on SDXL two, `clip_l` and `clip_g`, for its two text encoders, as AUTOMATIC1111 and
ComfyUI read SDXL embeddings); layer-wise tokens have one per cross-attention layer, so the export collapses
each word's layer tokens into one vector (see `collapse`).
"""

from __future__ import annotations

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

from shared.errors import InvalidArgument
from shared.package import EMBEDDING_KINDS

COLLAPSES = ("mean", "middle")  # how layer-wise tokens become one embedding


def to_kohya(lora: dict[str, torch.Tensor], scale: float, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """mixshow LoRA tensors (`<model>.<module>.lora_A.weight`, update = scale * B @ A) in kohya keys with
    `.alpha` = scale * rank, so a kohya loader's alpha / rank gives back `scale`."""
    kohya = convert_state_dict_to_kohya({k: v.contiguous() for k, v in lora.items()})
    out = {}
    for key, value in kohya.items():
        if not sdxl:  # diffusers names any text encoder `lora_te1_`; SD 1.x tools expect `lora_te_`
            key = key.replace("lora_te1_", "lora_te_", 1)
        if key.endswith(".alpha"):
            value = torch.tensor(float(value) * scale)
        out[key] = value
    return out


def to_diffusers(lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The same LoRA in diffusers' format (PEFT keys under `unet.` / `text_encoder.`), the scale folded into
    the up matrices (diffusers' format carries no alpha)."""
    return {k: (v * scale if ".lora_B." in k else v).contiguous() for k, v in lora.items()}


def collapse(rows: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """One embedding [D] from a word's layer tokens [n_layers, D]: their mean, or the middle layer's."""
    if how not in COLLAPSES:
        raise InvalidArgument("collapse", f"{how!r} is not one of {', '.join(COLLAPSES)}")
    if how == "mean":
        return rows.mean(dim=0)
    return rows[rows.shape[0] // 2]


SDXL_EMBEDDING_KEYS = {"emb": "clip_l", "emb_2": "clip_g"}  # their keys in an SDXL textual-inversion file


def textual_inversion(rows_by_kind: dict[str, list[torch.Tensor]], how: str = "mean") -> dict[str, torch.Tensor]:
    """A textual-inversion file's tensors in the layout AUTOMATIC1111 and ComfyUI read: `emb_params` (one row
    per vector of the trigger word) for one text encoder, `clip_l` + `clip_g` on SDXL; diffusers'
    `load_textual_inversion` reads both (on SDXL once per encoder, given that encoder's tensor)."""
    def stacked(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([collapse(r.float(), how) for r in rows]).contiguous()

    if set(rows_by_kind) == {"emb"}:
        return {"emb_params": stacked(rows_by_kind["emb"])}
    return {SDXL_EMBEDDING_KEYS[kind]: stacked(rows) for kind, rows in rows_by_kind.items()}


def split_lora_and_embeddings(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(the LoRA tensors without the word rows, whether they are an SDXL model's: rows for two encoders)."""
    lora = {k: v for k, v in tensors.items() if not k.startswith(tuple(f"{kind}." for kind in EMBEDDING_KINDS))}
    return lora, any(k.startswith("emb_2.") for k in tensors)


def exported(source_lora: dict[str, torch.Tensor], scale: float,
             concepts: list[tuple[str, dict[str, list[torch.Tensor]]]], fmt: str, how: str,
             sdxl: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(LoRA tensors in `fmt`, {trigger: textual-inversion tensors}) for a LoRA and its concepts' word rows
    ({"emb": rows per word, on SDXL also "emb_2": ...})."""
    if fmt not in FORMATS:
        raise InvalidArgument("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    lora = to_kohya(source_lora, scale, sdxl) if fmt == "kohya" else to_diffusers(source_lora, scale)
    return lora, {name: textual_inversion(rows, how) for name, rows in concepts}


FORMATS = ("kohya", "diffusers")
LORA_NAMES = {"kohya": "lora.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
