"""Load a base model (diffusers folder or single-file checkpoint) and fingerprint it.

Every base goes through `load_base`: real SD 1.5 and SDXL folders, single-file checkpoints with a
local config folder, and the tiny test bases alike. A folder is SDXL when its model_index.json names
StableDiffusionXLPipeline (a single file: when its config folder's does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from shared.errors import InvalidArgument, UserError
from shared.validate import parse_json

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = (*COMPONENTS, "text_encoder_2", "tokenizer_2")
CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "tokenizer": "tokenizer_config.json",
    "tokenizer_2": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
SDXL_PIPELINE = "StableDiffusionXLPipeline"
FINGERPRINT_SAMPLES = 1024  # values hashed per tensor: cheap for SD 1.5, still catches any fine-tune


@dataclass
class Base:
    """The components of a Stable Diffusion 1.x/2.x or SDXL base, on one device and dtype."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: SchedulerMixin
    fingerprint: str
    source: str
    stored_dtype: torch.dtype = torch.float32  # the dtype the base's own files store its UNet in
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second tokenizer and text encoder; None on SD 1.x/2.x
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def arch(self) -> str:
        """"sdxl" for a base with two text encoders, else "sd"."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    def pipeline(self, scheduler: SchedulerMixin | None = None):
        """A diffusers pipeline over these components (StableDiffusionXLPipeline on SDXL, without safety checker
        on SD 1.x/2.x), with `scheduler` or the base's own."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = scheduler or self.scheduler
        if self.text_encoder_2 is not None:
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                             text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                             tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def text_models(self) -> list[tuple[str, CLIPTokenizer, CLIPTextModel]]:
        """(package prefix, tokenizer, text encoder) of each text encoder: one on SD 1.x/2.x, two on SDXL."""
        models = [("text_encoder", self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            models.append(("text_encoder_2", self.tokenizer_2, self.text_encoder_2))
        return models

    def text_encoders(self) -> list[CLIPTextModel]:
        """The text encoder(s) alone, in `text_models` order."""
        return [encoder for _, _, encoder in self.text_models()]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def _quiet() -> None:
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def is_sdxl_folder(folder: Path) -> bool:
    """Whether a diffusers folder's model_index.json names the SDXL pipeline."""
    index = parse_json((folder / "model_index.json").read_text(errors="replace"), f"{folder}/model_index.json")
    if not isinstance(index, dict):
        raise UserError(f"{folder}/model_index.json is not a JSON object: is it a diffusers pipeline folder?")
    return index.get("_class_name") == SDXL_PIPELINE


def check_base_folder(folder: Path) -> bool:
    """Raise a UserError naming the first missing piece of a diffusers base folder; return whether it is SDXL."""
    if not (folder / "model_index.json").is_file():
        raise UserError(f"base folder {folder} has no model_index.json: is it a diffusers pipeline folder?")
    sdxl = is_sdxl_folder(folder)
    for name in SDXL_COMPONENTS if sdxl else COMPONENTS:
        cfg = folder / name / CONFIG_FILES[name]
        if not cfg.is_file():
            raise UserError(f"base folder {folder} is missing component '{name}' (no {cfg}); "
                            "copy the whole pipeline folder")
    for name in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if sdxl else ())):
        if not any((folder / name).glob("*.safetensors")) and not any((folder / name).glob("*.bin")):
            raise UserError(f"base folder {folder} has no weights in '{name}/' (expected *.safetensors)")
    return sdxl


def _load_components(path: Path, config: Path | None, allow_sdxl: bool
                     ) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    _quiet()
    if not path.is_dir():
        if path.suffix not in (".safetensors", ".ckpt") or not path.is_file():
            raise UserError(f"base {path} is neither a diffusers folder nor a .safetensors checkpoint file")
        if config is None:
            raise InvalidArgument("base_config", f"single-file base {path} needs a local diffusers folder of the "
                                  "same architecture (no model hub is used)")
    sdxl = check_base_folder(path if path.is_dir() else config)
    if sdxl and not allow_sdxl:
        raise UserError(f"base {path} is an SDXL base: training, statistics, fusion and sampling support SD 1.x/2.x "
                        "bases so far (SDXL: docs/sdxl.md)")
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    options = {"add_watermarker": False} if sdxl else {"safety_checker": None, "feature_extractor": None,
                                                       "requires_safety_checker": False}
    if path.is_dir():
        return pipeline.from_pretrained(path, local_files_only=True, **options)
    try:
        return pipeline.from_single_file(str(path), config=str(config), local_files_only=True, **options)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load single-file base {path} with config {config}: {exc}") from exc


def fingerprint(models: dict[str, torch.nn.Module], tokenizer: CLIPTokenizer,
                tokenizer_2: CLIPTokenizer | None = None) -> str:
    """sha256 over the architecture, every weight's name and shape, and a strided sample of its values.

    Computed on the loaded float32 weights, so a folder and a single-file copy of the same
    weights share a fingerprint; any fine-tune changes the sampled values.
    """
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab[: len(vocab)], ensure_ascii=False).encode())
    if tokenizer_2 is not None:  # SDXL: both vocabularies (an SD 1.x fingerprint is unchanged)
        h.update(json.dumps(sorted(tokenizer_2.get_vocab().items()), ensure_ascii=False).encode())
    for name in sorted(models):
        model = models[name]
        h.update(f"{name}:{type(model).__name__}".encode())
        for key, tensor in sorted(model.named_parameters()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            h.update(f"{key}:{tuple(tensor.shape)}".encode())
            h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
SINGLE_FILE_UNET = "model.diffusion_model."


def stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype most of the base's UNet weights are stored in (read from the safetensors headers;
    float32 for other formats, which are loaded as float32)."""
    files = sorted((path / "unet").glob("*.safetensors")) if path.is_dir() else [path]
    counts: dict[str, int] = {}
    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), "pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    if path.is_dir() or key.startswith(SINGLE_FILE_UNET):
                        kind = fh.get_slice(key).get_dtype()
                        counts[kind] = counts.get(kind, 0) + 1
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read the weights {file}: {exc}") from exc
    floating = {k: n for k, n in counts.items() if k in SAFETENSORS_DTYPES}
    return SAFETENSORS_DTYPES[max(floating, key=floating.get)] if floating else torch.float32


def load_base(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              config: str | Path | None = None, sdxl: bool = False) -> Base:
    """Load a base from a diffusers folder or a single-file checkpoint (with a local config folder).

    The fingerprint is taken on the weights as stored, before casting to `dtype`. An SDXL base is loaded
    only by callers that handle its second text encoder (`sdxl`); the others refuse it clearly.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"base {path} does not exist")
    pipe = _load_components(path, Path(config) if config else None, sdxl)
    models = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    second = getattr(pipe, "text_encoder_2", None)
    if second is not None:
        models["text_encoder_2"] = second
    fp = fingerprint(models, pipe.tokenizer, getattr(pipe, "tokenizer_2", None))
    for model in models.values():
        model.to(device=device, dtype=dtype).requires_grad_(False).eval()
        _own_aligned_storage(model)
    return Base(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler, fp, str(path),
                stored_dtype(path), getattr(pipe, "tokenizer_2", None), second)


def _own_aligned_storage(model: torch.nn.Module, alignment: int = 64) -> None:
    """Give every tensor of `model` that sits at an unaligned address (a view into a memory-mapped file, at
    whatever offset the file put it) its own allocation. CPU kernels take other vector paths for unaligned
    data, so bit-equal weights loaded from a folder and from a single file gave images one level apart on an
    AVX2 machine; with aligned copies the same weights give the same image, whichever file they came from."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)

