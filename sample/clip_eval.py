"""CLIP scores of generated images (docs/design.md §2.5), with a CLIP model from a local folder.

    text-alignment   2.5 · max(cos(image, prompt with the concept replaced by its class word), 0)
    image-alignment  mean cosine between a generated image and each of the concept's reference images
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from shared.errors import InvalidArgument, UserError
from shared.images import WHITE, open_image
from shared.validate import read_json

TEXT_WEIGHT = 2.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ClipScorer:
    """A local CLIPModel with its tokenizer and image processor; embeddings are unit vectors."""

    def __init__(self, path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # stderr carries errors only

        path = Path(path)
        if not (path / "config.json").is_file():
            raise InvalidArgument("clip", f"{path} is not a CLIP model folder (no config.json); give a local "
                            "transformers CLIPModel folder with its tokenizer and preprocessor_config.json")
        config = read_json(path / "config.json", "CLIP config")
        kind = config.get("model_type") if isinstance(config, dict) else None
        if kind != "clip":
            raise InvalidArgument("clip", f"{path} is not a CLIP model folder (its config.json has model_type "
                                  f"{kind!r}, not 'clip'); give a transformers CLIPModel folder, not a text encoder")
        try:
            model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise InvalidArgument("clip", f"{path} cannot be loaded as a CLIP model ({exc})") from exc
        missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
        if missing:
            raise InvalidArgument("clip", f"{path}: its weights do not cover its config ({len(missing)} tensors "
                                  f"missing or mis-shaped, e.g. {missing[0]}); the folder is damaged or mixed up")
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise InvalidArgument("clip", f"{path}: weight {bad} contains NaN or Inf; the file is damaged")
        self.model = model.to(device, dtype).eval()
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        emb = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype), return_dict=True)
        emb = getattr(emb, "pooler_output", emb)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        emb = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device), return_dict=True)
        emb = getattr(emb, "pooler_output", emb)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def text_alignment(self, images: list[Image.Image], text: str) -> torch.Tensor:
        """Per image: 2.5 · max(cos, 0) against `text`."""
        return TEXT_WEIGHT * (self.images(images) @ self.texts([text]).T).squeeze(1).clamp(min=0)

    def image_alignment(self, images: list[Image.Image], references: torch.Tensor) -> torch.Tensor:
        """Per image: mean cosine against the reference embeddings."""
        return (self.images(images) @ references.T).mean(dim=1)


def reference_images(folder: Path) -> list[Image.Image]:
    """A concept's reference images (training masks `*_mask.*` left out), as RGB in any Pillow mode: 16-bit
    greyscale scaled by its depth, transparent pixels composited onto white; one clear error per bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"reference folder {folder} does not exist (or is not a folder)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
    if not paths:
        raise UserError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [open_image(p, "reference image", WHITE) for p in paths]
