"""Training settings for one concept: defaults from the method, overridable by YAML and flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shared.errors import UserError
from shared.lora import TEXT_TARGETS, UNET_TARGETS
from shared.package import DEFAULT_TEMPLATES


@dataclass
class TrainConfig:
    """Every knob of ED-LoRA training (DESIGN §2.1). YAML keys are these field names."""

    steps: int = 1000
    batch_size: int = 2
    resolution: int = 512
    layerwise: bool = True  # False: plain-LoRA mode, one embedding shared by all layers
    rank: int = 4
    alpha: float = 4.0  # LoRA scale s = alpha / rank
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    text_targets: list[str] = field(default_factory=lambda: list(TEXT_TARGETS))
    lr_embedding: float = 1e-3
    lr_text: float = 1e-5
    lr_unet: float = 1e-4
    weight_decay: float = 0.01
    noise_offset: float = 0.01
    init_std: float = 0.013  # first word's random initialisation; the last word starts from the class word
    emb_norm_threshold: float | None = 0.55  # a token embedding whose norm passes this stops training
    masked_loss: bool = False
    attn_reg_weight: float = 0.0  # pulls the concept tokens' cross-attention maps towards the masks
    min_crop: float = 0.7
    flip: bool = True
    shuffle_captions: bool = True
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast; fp16 only on CUDA)
    seed: int = 0
    checkpoint_every: int = 100
    sample_every: int = 0  # 0: only at the end
    sample_steps: int = 20
    sample_guidance: float = 7.5
    sample_scales: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))

    def check(self) -> TrainConfig:
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise UserError("steps, batch_size and rank must be positive")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision {self.mixed_precision!r} must be no, fp16 or bf16")
        if not 0 < self.min_crop <= 1:
            raise UserError(f"min_crop {self.min_crop} must be in (0, 1]")
        if not all("{}" in t for t in self.templates):
            raise UserError("every prompt template must contain {} where the concept goes")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: Path | None, overrides: dict) -> TrainConfig:
    """Defaults, then the YAML file, then flags given on the command line (None = not given)."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise UserError(f"config {path} must be a mapping of setting: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config {path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values).check()
    except TypeError as exc:
        raise UserError(f"config {path}: {exc}") from exc
