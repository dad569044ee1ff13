"""A LoRA trained elsewhere (kohya / AUTOMATIC1111 / Civitai safetensors, or a diffusers / PEFT adapter)
as a plain-LoRA concept package, so it gets statistics and fuses with ED-LoRA concepts.

The file is put on the base by diffusers' own `load_lora_weights` (which converts kohya keys and reads
their alphas); every layer it adapted is then read back from PEFT with its scale. The layers mixshow's
packages carry (attention projections of the UNet and the text encoder, on SDXL of both text encoders)
become the package's LoRA, their scale folded into the up matrices and lower ranks zero-padded to the
largest (the same products). The others (resnet convolutions, feed-forward, projections) are dropped and
reported, each with its share of the LoRA's total update norm. The trigger words become the concept's
words, new tokens initialised from the class word (in each text encoder); a word a tokenizer already
knows is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from shared.atomic import staged_dir
from shared.base import Base, load_base
from shared.edlora import check_new_words, class_word_embedding, cross_attention_layers
from shared.errors import InvalidArgument, UserError
from shared.names import TEXT_TARGETS, UNET_TARGETS
from shared.package import EMBEDDING_KINDS, ConceptMeta, save_package
from shared.validate import check_tensors

ADAPTER = "imported"
TEMPLATES = ["a photo of a {}", "a {} on the left", "a {} in the centre", "a close up photo of a {}"]


@dataclass
class ImportReport:
    kept: int
    dropped: dict[str, float]  # module -> its share of the LoRA's total update norm
    rank: int

    @property
    def dropped_share(self) -> float:
        return sum(self.dropped.values())


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA's tensors: a .safetensors file, or a folder holding one (a diffusers / PEFT adapter)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise UserError(f"{path} holds {len(files)} .safetensors files; give the LoRA file itself")
        path = files[0]
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{path} is not a .safetensors file (other formats are not read: they can run code)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as safetensors ({exc})") from exc
    check_tensors(tensors, str(path), (torch.float32, torch.float16, torch.bfloat16))
    return tensors


def adapted_layers(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]]:
    """{module: (A, B, scale, update)} of every layer the imported adapter reaches in `model`."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER in getattr(module, "lora_A", {}):
            a, b = module.lora_A[ADAPTER].weight.detach().float(), module.lora_B[ADAPTER].weight.detach().float()
            out[name] = (a, b, float(module.scaling[ADAPTER]), module.get_delta_weight(ADAPTER).detach().float())
    return out


def native_resolution(base: Base) -> int:
    """The image size the base's UNet was built for (its latent size times the autoencoder's factor)."""
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    return int(base.unet.config.sample_size) * factor


def import_lora(file: Path, base: Path | Base, words: list[str], class_word: str, name: str, out: Path,
                base_config: Path | None = None) -> tuple[Path, ImportReport]:
    """Turn the LoRA `file` into a plain-LoRA package at `out`; returns it and what was kept and dropped."""
    if not words:
        raise InvalidArgument("trigger", "is empty: give the concept's trigger words, e.g. '<ohwx>'")
    tensors = read_lora_file(file)
    if not isinstance(base, Base):
        base = load_base(base, "cpu", torch.float32, base_config, sdxl=True)
    try:
        for _, tokenizer, _ in base.text_models():
            check_new_words(tokenizer, words, 1, base.source)
    except InvalidArgument as exc:
        raise InvalidArgument("trigger", exc.message) from None
    class_rows = [class_word_embedding(tokenizer, encoder, class_word).float().cpu()
                  for _, tokenizer, encoder in base.text_models()]
    pipe = base.pipeline()
    try:
        pipe.load_lora_weights(dict(tensors), adapter_name=ADAPTER)
    except ValueError as exc:
        if "lora" in str(exc).lower() and "checkpoint" in str(exc).lower():
            raise UserError(f"{file}: no layer of it matched the base: its key layout is not one diffusers reads "
                            f"({' '.join(str(exc).split())[:200]})") from exc
        raise UserError(f"{file} does not fit the base {base.source}: {' '.join(str(exc).split())[:300]}") from exc
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{file} does not fit the base {base.source} (or its key layout is not one diffusers "
                        f"reads): {' '.join(str(exc).split())[:300]}") from exc
    models = [("unet", base.unet)] + [(prefix, encoder) for prefix, _, encoder in base.text_models()]
    layers = {f"{prefix}.{k}": v for prefix, model in models for k, v in adapted_layers(model).items()}
    if not layers:
        raise UserError(f"no layer of {file} matched the base {base.source}: an unknown key layout, or a LoRA for "
                        "another kind of model")
    total = sum(float(update.norm()) for *_, update in layers.values()) or 1.0
    keep = {q: v for q, v in layers.items() if q.endswith(UNET_TARGETS if q.startswith("unet.") else TEXT_TARGETS)
            and v[0].ndim == 2}
    dropped = {q: float(v[3].norm()) / total for q, v in layers.items() if q not in keep}
    if not keep:
        raise UserError(f"{file} adapts none of the attention layers mixshow fuses (only {len(dropped)} others)")
    rank = max(a.shape[0] for a, *_ in keep.values())
    package: dict[str, torch.Tensor] = {}
    for qual, (a, b, scale, _) in keep.items():
        r = a.shape[0]
        package[f"{qual}.lora_A.weight"] = torch.cat([a, a.new_zeros(rank - r, a.shape[1])]).contiguous()
        package[f"{qual}.lora_B.weight"] = torch.cat([b * scale, b.new_zeros(b.shape[0], rank - r)], 1).contiguous()
    n_layers = len(cross_attention_layers(base.unet))
    for kind, row in zip(EMBEDDING_KINDS, class_rows):
        for word in words:
            package[f"{kind}.{word}"] = row.expand(n_layers, -1).contiguous()

    def modules(prefix: str) -> list[str]:
        return sorted(q.split(".", 1)[1] for q in keep if q.split(".", 1)[0] == prefix)

    report = ImportReport(len(keep), dropped, rank)
    meta = ConceptMeta(name=name, words=list(words), class_word=class_word, n_layers=n_layers, layerwise=False,
                       rank=rank, alpha=float(rank),
                       unet_modules=modules("unet"), text_modules=modules("text_encoder"),
                       encoders=len(class_rows), text_modules_2=modules("text_encoder_2"),
                       prompt_templates=list(TEMPLATES), base_fingerprint=base.fingerprint,
                       training={"resolution": native_resolution(base), "imported_from": Path(file).name,
                                 "kept_layers": len(keep), "dropped_layers": len(dropped),
                                 "dropped_norm_share": round(report.dropped_share, 6)})
    with staged_dir(Path(out)) as stage:
        save_package(stage, meta, package)
    return Path(out), report
