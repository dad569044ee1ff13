"""LoRA through PEFT: inject, export/import in the package's key naming, scale for previews.

Package keys are `<model>.<module path>.lora_A.weight` / `.lora_B.weight` (PEFT's naming
without the adapter name), e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.helpers import rescale_adapter_scale
from peft.tuners.lora import LoraLayer

from shared.validate import number

ADAPTER = "default"


def target_modules(model: torch.nn.Module, suffixes: tuple[str, ...] | list[str]) -> list[str]:
    """Full names of the nn.Linear modules whose name ends with one of `suffixes`."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and any(name.endswith(s) for s in suffixes)]


def add_lora(model: torch.nn.Module, modules: list[str], rank: int, alpha: float,
             init: bool | str = True) -> None:
    """Inject a PEFT LoRA adapter on exactly `modules` (full names) of a diffusers/transformers model."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=init)
    model.add_adapter(config, adapter_name=ADAPTER)
    for name, param in model.named_parameters():  # adapters train in float32 whatever the base dtype
        if "lora_" in name:
            param.data = param.data.float()


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def export_lora(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under package keys `<prefix>.<module>.lora_A.weight`."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    return {f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}


def import_lora(model: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Load package tensors `<prefix>.*` into the model's (already injected) adapter, strictly."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise KeyError(f"unexpected LoRA keys for {prefix}: {unexpected[:3]}")


@contextlib.contextmanager
def lora_scale(models: list[torch.nn.Module], scale: float) -> Iterator[None]:
    """Multiply every LoRA update in `models` by `scale` inside the block (0 = base weights), through PEFT's
    `rescale_adapter_scale`: the scales in force before (a caller's own, an outer block's) are restored on exit,
    and blocks nest by multiplying. Models without LoRA layers are left alone."""
    scale = number("scale", scale)
    with contextlib.ExitStack() as stack:
        for model in models:
            if any(isinstance(m, LoraLayer) for m in model.modules()):
                stack.enter_context(rescale_adapter_scale(model, scale))
        yield
