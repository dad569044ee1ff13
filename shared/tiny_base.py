"""A tiny Stable-Diffusion-1.x-shaped base model built from config, for tests and the demo.

Same component classes and folder layout as SD 1.5 (UNet, VAE, CLIP text encoder, CLIP BPE
tokenizer, scheduler), a few MB instead of GBs. The tokenizer's vocabulary is written here:
the 512 byte symbols CLIP starts from plus merges learned from a small word list, so every
word of that list (class words, prompt words) is a single token, as in SD's real vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from shared.atomic import staged_dir

# Words that must be single tokens: class words for concepts and common prompt words.
WORDS = """
a an the of in on at with and next to by near under over behind front photo picture painting
image render close up closeup portrait view style beach forest city street room table grass
snow sky water park garden mountain desert kitchen field road garden wall floor man woman boy
girl person dog cat bird car toy ball cube box cup bottle chair lamp house tree flower robot
statue vase teapot shoe hat bag book clock red green blue yellow orange purple pink white
black gray brown striped dotted checkered small big large tiny bright dark sunny night day
good high quality detailed
""".split()

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol (ties broken alphabetically)."""
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in corpus):
        pairs = Counter(p for w in corpus for p in zip(w, w[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for w in corpus:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        corpus = merged
    return merges


def write_tokenizer_files(folder: Path, words: list[str] = WORDS) -> tuple[Path, Path]:
    """Write CLIP-style vocab.json and merges.txt into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = learn_merges(words)
    vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + list(SPECIALS)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


def build_tiny_pipeline(work: Path, seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny pipeline in memory (tokenizer files are written to `work`)."""
    vocab_path, merges_path = write_tokenizer_files(work)
    tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_base(out: Path, seed: int = 0) -> Path:
    """Write the tiny base as a diffusers folder at `out` (atomically) and return `out`."""
    with staged_dir(Path(out)) as stage:
        pipe = build_tiny_pipeline(stage / "tokenizer-src", seed=seed)
        pipe.save_pretrained(stage, safe_serialization=True)
        for f in (stage / "tokenizer-src").iterdir():
            f.rename(stage / "tokenizer" / f.name)  # keep the BPE source files beside tokenizer.json
        (stage / "tokenizer-src").rmdir()
    return Path(out)
