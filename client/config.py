"""Training settings for one concept: defaults from the method, overridable by YAML and flags.

Every field is checked for type, range and finiteness when a `TrainConfig` is made (and again by
`check()`); a bad value is an `InvalidArgument` naming the field. `load_config` says whether the
value came from the YAML file (naming the file and key) or from a flag.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shared.errors import InvalidArgument, UserError
from shared.names import LAYOUT_SETTINGS, MAX_SEED, TEXT_TARGETS, UNET_TARGETS
from shared.package import DEFAULT_TEMPLATES
from shared.validate import number, read_text

RESOLUTION_STEP = 8  # every SD VAE halves at least 3 times; the base may need a larger multiple (checked there)
_PREVIEW = re.compile(r"every\s+(\d+)")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # PyYAML reads `1e-4` (no dot) as a string


PREVIEW_WORDS = ("auto", "none", "end")
AUTO_PREVIEW_SHARE = 0.25  # preview "auto": a final grid only when it costs at most this share of the run

# The method's token settings (init_std 0.013, lr_embedding 1e-3, emb_norm_threshold 0.55) were set for SD 1.5's
# CLIP, whose token embeddings have a mean norm near 0.39 (entries of RMS near 0.014). Left unset, they follow the
# base's own embedding scale by these ratios, so a base whose embeddings are larger (the shapes base's are 20x) trains
# its tokens the same way instead of freezing them at step 0.
INIT_STD_PER_RMS = 0.93
LR_EMBEDDING_PER_RMS = 0.07
THRESHOLD_PER_MEAN_NORM = 1.4


@dataclass
class TrainConfig:
    """Every knob of ED-LoRA training (docs/design.md §2.1). YAML keys are these field names.

    `preview`: "none" (no preview grid, no samples/ folder in the package), "end" (one grid of
    `sample_prompts` prompts x `sample_scales` after training), "every N" (a grid every N steps and at the end)
    or "auto" (the default: "end" when the grid costs at most a quarter of the run, see `preview_share`,
    otherwise "none").
    """

    steps: int = 1000
    batch_size: int = 2
    resolution: int = 512
    layerwise: bool = True  # False: plain-LoRA mode, one embedding shared by all layers
    token_layout: str = "auto"  # a layer-wise token per cross-attention block, or per attention module
    # ("module": the blocks of one module share it); "auto": module where a module holds several blocks (SDXL),
    # else block (SD 1.x, where each module holds one block and the two are the same)
    rank: int = 4
    alpha: float = 4.0  # LoRA scale s = alpha / rank
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    text_targets: list[str] = field(default_factory=lambda: list(TEXT_TARGETS))
    lr_embedding: float | None = None  # None: LR_EMBEDDING_PER_RMS x the base's embedding RMS (1e-3 on SD 1.5)
    lr_text: float = 1e-5
    lr_unet: float = 1e-4
    weight_decay: float = 0.01
    noise_offset: float = 0.01
    init_std: float | None = None  # first words' random initialisation (None: 0.93 x the base's embedding RMS);
    # the last word starts from the class word
    emb_norm_threshold: float | str | None = None  # a token embedding whose norm passes this stops training;
    # None: 1.4 x the base's mean token norm (0.55 on SD 1.5); "off": never
    masked_loss: bool = False
    attn_reg_weight: float = 0.0  # pulls the concept tokens' cross-attention maps towards the masks
    min_crop: float = 0.7
    flip: bool = True
    shuffle_captions: bool = True
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast; fp16 only on CUDA)
    seed: int = 0
    checkpoint_every: int = 100  # 0: only on Ctrl-C
    preview: str = "auto"  # auto | none | end | every N
    sample_prompts: int = 1
    sample_steps: int = 10
    sample_guidance: float = 7.5
    sample_scales: list[float] = field(default_factory=lambda: [0.0, 1.0])
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))

    def __post_init__(self) -> None:
        self.check()

    @property
    def preview_every(self) -> int:
        """Steps between preview grids during training; 0 when there are none before the end."""
        match = _PREVIEW.fullmatch(self.preview.strip())
        return int(match.group(1)) if match else 0

    @property
    def preview_share(self) -> float:
        """The preview grid's share of a run's denoiser evaluations (the cost of both on any device): a
        training step is a forward and a backward pass (about 3 forwards) per image of the batch, a preview
        image one forward per sampling step (two with guidance)."""
        guided = 2 if self.sample_guidance > 1 else 1
        grid = self.sample_prompts * len(self.sample_scales) * self.sample_steps * guided
        return grid / (grid + 3 * self.steps * self.batch_size)

    @property
    def preview_at_end(self) -> bool:
        """Whether training ends with a preview grid."""
        if self.preview == "auto":
            return self.preview_share <= AUTO_PREVIEW_SHARE
        return self.preview != "none"

    def check(self) -> TrainConfig:
        """Check every field (type, range, finiteness) and normalise numbers; InvalidArgument names the field."""
        ints = {"steps": (1, 10**7), "batch_size": (1, 1024), "resolution": (64, 4096), "rank": (1, 1024),
                "seed": (0, MAX_SEED), "checkpoint_every": (0, 10**7), "sample_steps": (1, 1000),
                "sample_prompts": (1, 64)}
        for name, (low, high) in ints.items():
            setattr(self, name, number(name, getattr(self, name), low, high, integer=True))
        floats = {"alpha": (0, 1e6, True), "lr_embedding": (0, None, False), "lr_text": (0, None, False),
                  "lr_unet": (0, None, False), "weight_decay": (0, 1, False), "noise_offset": (0, 1, False),
                  "init_std": (0, 10, False), "attn_reg_weight": (0, 1e6, False), "min_crop": (0, 1, True),
                  "sample_guidance": (1, 100, False)}
        for name, (low, high, low_open) in floats.items():
            if not (name in ("lr_embedding", "init_std") and getattr(self, name) is None):
                setattr(self, name, number(name, getattr(self, name), low, high, low_open=low_open))
        if isinstance(self.emb_norm_threshold, str) and self.emb_norm_threshold != "off":
            raise InvalidArgument("emb_norm_threshold", f"{self.emb_norm_threshold!r} is not a number, off or null")
        if self.emb_norm_threshold is not None and self.emb_norm_threshold != "off":
            self.emb_norm_threshold = number("emb_norm_threshold", self.emb_norm_threshold, 0, None)
        for name in ("layerwise", "masked_loss", "flip", "shuffle_captions", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(name, f"{getattr(self, name)!r} is not true or false")
        if self.resolution % RESOLUTION_STEP:
            raise InvalidArgument("resolution", f"{self.resolution} is not a multiple of {RESOLUTION_STEP} "
                                  f"(e.g. {max(64, self.resolution // RESOLUTION_STEP * RESOLUTION_STEP)})")
        if self.token_layout not in LAYOUT_SETTINGS:
            raise InvalidArgument("token_layout", f"{self.token_layout!r} must be one of {', '.join(LAYOUT_SETTINGS)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InvalidArgument("mixed_precision", f"{self.mixed_precision!r} must be no, fp16 or bf16")
        if not isinstance(self.preview, str) or not (self.preview in PREVIEW_WORDS
                                                      or _PREVIEW.fullmatch(self.preview.strip())):
            raise InvalidArgument("preview", f"{self.preview!r} must be auto, none, end or 'every N' (N steps)")
        if self.preview not in PREVIEW_WORDS:
            every = int(_PREVIEW.fullmatch(self.preview.strip()).group(1))
            if every < 1:
                raise InvalidArgument("preview", f"{self.preview!r}: N must be at least 1")
            self.preview = f"every {every}"
        self.unet_targets = _strings("unet_targets", self.unet_targets, allow_empty=False)
        self.text_targets = _strings("text_targets", self.text_targets, allow_empty=True)
        self.templates = _strings("templates", self.templates, allow_empty=False)
        for template in self.templates:
            if template.count("{}") != 1 or "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
                raise InvalidArgument("templates", f"{template!r} must contain {{}} (where the concept goes) "
                                      "exactly once and no other braces")
        scales = self.sample_scales
        if not isinstance(scales, (list, tuple)) or not scales:
            raise InvalidArgument("sample_scales", f"{scales!r} is not a non-empty list of numbers")
        self.sample_scales = [number("sample_scales", s, -10, 10) for s in scales]
        return self

    def for_embeddings(self, mean_norm: float, rms: float) -> TrainConfig:
        """A copy whose unset token settings follow a base's embedding scale (its token embeddings' mean norm
        and the RMS of their entries, see shared.edlora.embedding_scale)."""
        return dataclasses.replace(
            self, init_std=INIT_STD_PER_RMS * rms if self.init_std is None else self.init_std,
            lr_embedding=LR_EMBEDDING_PER_RMS * rms if self.lr_embedding is None else self.lr_embedding,
            emb_norm_threshold=(THRESHOLD_PER_MEAN_NORM * mean_norm if self.emb_norm_threshold is None
                                else self.emb_norm_threshold))

    def to_dict(self) -> dict:
        """The settings as plain data (what concept.json records under `training`)."""
        return dataclasses.asdict(self)


def _strings(name: str, value, allow_empty: bool) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidArgument(name, f"{value!r} is not a list of non-empty strings")
    if not value and not allow_empty:
        raise InvalidArgument(name, "is empty: give at least one")
    return list(value)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_FLOATS = {name for name, f in FIELDS.items() if f.type in ("float", "float | None", "float | str | None")}


def _from_yaml(values: dict) -> dict:
    """YAML quirks: `mixed_precision: no` is the boolean false; `lr: 1e-4` (no dot) is a string."""
    values = dict(values)
    if values.get("mixed_precision") is False:
        values["mixed_precision"] = "no"
    for name in _FLOATS:
        if isinstance(values.get(name), str) and _NUMBER.fullmatch(values[name].strip()):
            values[name] = float(values[name])
    if "sample_scales" in values and isinstance(values["sample_scales"], list):
        values["sample_scales"] = [float(s) if isinstance(s, str) and _NUMBER.fullmatch(s.strip()) else s
                                   for s in values["sample_scales"]]
    return values


def _preview_from_sample_every(values: dict, both: str) -> dict:
    """The former setting `sample_every` (0: only at the end, N: every N steps) as `preview`."""
    if "sample_every" not in values:
        return values
    values = dict(values)
    every = values.pop("sample_every")
    if "preview" in values:
        raise UserError(both)
    every = number("sample_every", every, 0, 10**7, integer=True)
    values["preview"] = f"every {every}" if every else "end"
    return values


def load_config(path: Path | None, overrides: dict) -> TrainConfig:
    """Defaults, then the YAML file, then flags given on the command line (None = not given).

    A bad value from the file is a UserError naming the file and key; a bad flag value is an
    InvalidArgument naming the setting (the CLI shows its flag).
    """
    values: dict = {}
    if path is not None:
        text = read_text(Path(path), "config")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"config {path} must be a mapping of setting: value, not {type(values).__name__}")
        known = set(FIELDS) | {"sample_every"}
        unknown = sorted(str(k) for k in values if not isinstance(k, str) or k not in known)
        if unknown:
            raise UserError(f"config {path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            values = _preview_from_sample_every(_from_yaml(values), f"config {path}: give preview or sample_every "
                                                "(its old name), not both")
            TrainConfig(**values)
        except InvalidArgument as exc:
            raise UserError(f"config {path}: setting {exc.argument}: {exc.message}") from exc
    flags = {k: v for k, v in overrides.items() if v is not None}
    if "sample_every" in flags and "preview" in flags:
        raise InvalidArgument("preview", "give preview or sample_every (its old form), not both")
    values.update(_preview_from_sample_every(flags, ""))
    return TrainConfig(**values)
