"""CLIP scores of generated images (DESIGN §2.5), with a CLIP model from a local folder.

    text-alignment   2.5 · max(cos(image, prompt with the concept replaced by its class word), 0)
    image-alignment  mean cosine between a generated image and each of the concept's reference images
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from shared.errors import InvalidArgument, UserError

TEXT_WEIGHT = 2.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ClipScorer:
    """A local CLIPModel with its tokenizer and image processor; embeddings are unit vectors."""

    def __init__(self, path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise InvalidArgument("clip", f"{path} is not a CLIP model folder (no config.json); give a local "
                            "transformers CLIPModel folder with its tokenizer and preprocessor_config.json")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device, dtype).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InvalidArgument("clip", f"{path} cannot be loaded as a CLIP model ({exc})") from exc
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
    """A concept's reference images (training masks `*_mask.*` left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"reference folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
    if not paths:
        raise UserError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for p in paths:
        try:
            with Image.open(p) as img:
                images.append(img.convert("RGB"))
        except OSError as exc:
            raise UserError(f"reference image {p} cannot be read ({exc})") from exc
    return images
