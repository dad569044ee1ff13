"""ED-LoRA training of one concept on a client (docs/design.md §2.1), ending in a concept package."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from client.config import TrainConfig
from client.dataset import Example, augment, expand_caption, load_examples
from client.resume import checkpoint_identity, load_checkpoint, save_checkpoint
from shared.atomic import check_fresh_output, staged_dir
from shared.base import Base, load_base
from shared.edlora import (
    AttentionCapture,
    ConceptEmbedding,
    LayerSliceProcessor,
    LayerwiseTextEncoder,
    LayerwiseTextEncoderXL,
    TokenMap,
    add_tokens,
    added_conditions,
    attention_regulariser,
    check_new_words,
    class_word_embedding,
    embedding_scale,
    install_layer_processors,
    layer_token_names,
    resolve_token_layout,
    token_slots,
)
from shared.errors import InvalidArgument, UserError
from shared.lora import add_lora, export_lora, lora_parameters, lora_scale, target_modules
from shared.package import ConceptMeta, layerwise_encoder, save_package
from shared.sampling import encode_prompts, generate, image_grid


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error; with a mask (B, 1, h, w), only inside it (weights normalised by the mask's area)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    weight = mask.to(err).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


@dataclass
class Concept:
    """A base with one concept being trained on it: the trainable pieces and the layer-wise encoder. On SDXL
    the concept's tokens live in both text encoders: `embedding_2` and `embedding_scale_2` are the second's."""

    base: Base
    meta: ConceptMeta
    embedding: ConceptEmbedding
    encoder: LayerwiseTextEncoder | LayerwiseTextEncoderXL
    processors: list[LayerSliceProcessor]
    embedding_scale: tuple[float, float]  # the base's token embeddings: (mean norm, RMS), before the concept's
    embedding_2: ConceptEmbedding | None = None
    embedding_scale_2: tuple[float, float] | None = None

    def embeddings(self) -> list[tuple[str, ConceptEmbedding, tuple[float, float]]]:
        """(package key prefix, trainable rows, the encoder's embedding scale) of each text encoder."""
        found = [("emb", self.embedding, self.embedding_scale)]
        if self.embedding_2 is not None:
            found.append(("emb_2", self.embedding_2, self.embedding_scale_2))
        return found

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        params = {prefix: emb.rows for prefix, emb, _ in self.embeddings()}
        for prefix, _, encoder in self.base.text_models():
            params.update({f"{prefix}.{n}": p for n, p in encoder.named_parameters() if "lora_" in n})
        params.update({f"unet.{n}": p for n, p in self.base.unet.named_parameters() if "lora_" in n})
        return params

    def tensors(self) -> dict[str, torch.Tensor]:
        """The package's tensors: emb.<word> [n_layers, hidden] (and emb_2.<word> on SDXL) and the LoRAs."""
        out = {}
        for prefix, emb, _ in self.embeddings():
            emb.sync()
            rows, start = emb.rows.detach().float().cpu(), 0
            for word, names in self.encoder.map.words.items():
                block = rows[start:start + len(names)]
                out[f"{prefix}.{word}"] = block.expand(self.meta.n_layers, -1).contiguous()
                start += len(names)
        for prefix, _, model in [*self.base.text_models(), ("unet", None, self.base.unet)]:
            if lora_parameters(model):
                out.update(export_lora(model, prefix))
        return out


def with_layout_of(base: Base, cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its token layout resolved for this base ('auto' becomes block or module)."""
    return replace(cfg, token_layout=resolve_token_layout(base.unet, cfg.token_layout))


def prepare_concept(base: Base, words: list[str], class_word: str, cfg: TrainConfig, name: str,
                    generator: torch.Generator) -> Concept:
    """Add the concept's tokens (random + class-word init) and LoRA adapters to `base`. Token settings left
    unset in `cfg` follow the base's embedding scale; the concept records the settings it used."""
    cfg = with_layout_of(base, cfg)
    n = max(token_slots(base.unet, cfg.token_layout)) + 1
    for _, tokenizer, _ in base.text_models():
        check_new_words(tokenizer, words, n, base.source)
    per_word = n if cfg.layerwise else 1
    token_map = TokenMap(n, {w: layer_token_names(w, per_word) for w in words})
    embeddings, scales, text_modules = [], [], []
    for _, tokenizer, encoder in base.text_models():  # the first encoder's draws come first: SD 1.x as before
        scales.append(embedding_scale(encoder))
        own = cfg.for_embeddings(*scales[-1])
        class_row = class_word_embedding(tokenizer, encoder, class_word).float().cpu()
        rows = {w: torch.randn(per_word, class_row.numel(), generator=generator) * own.init_std for w in words[:-1]}
        rows[words[-1]] = class_row.expand(per_word, -1).clone()
        first_id = len(tokenizer)
        add_tokens(tokenizer, encoder, token_map, rows)
        embeddings.append(ConceptEmbedding(encoder, first_id, per_word * len(words)))
        text_modules.append(target_modules(encoder, cfg.text_targets))
    cfg = cfg.for_embeddings(*scales[0])  # what the package records (the second encoder's follow its own scale)
    unet_modules = target_modules(base.unet, cfg.unet_targets)
    if not unet_modules:
        raise UserError(f"unet_targets {cfg.unet_targets} match no linear layer of the base's UNet")
    torch.manual_seed(cfg.seed)  # PEFT initialises lora_A with the global RNG
    models = [*base.text_encoders(), base.unet]
    for model, modules in zip(models, [*text_modules, unet_modules]):
        if modules:
            add_lora(model, modules, cfg.rank, cfg.alpha)
    processors = install_layer_processors(base.unet, base.tokenizer.model_max_length, layout=cfg.token_layout)
    meta = ConceptMeta(name=name, words=list(words), class_word=class_word, n_layers=n, layerwise=cfg.layerwise,
                       rank=cfg.rank, alpha=cfg.alpha, unet_modules=unet_modules, text_modules=text_modules[0],
                       prompt_templates=list(cfg.templates), base_fingerprint=base.fingerprint,
                       training=cfg.to_dict(), encoders=len(embeddings), text_modules_2=text_modules[1]
                       if len(text_modules) == 2 else [], token_layout=cfg.token_layout)
    second = (embeddings[1], scales[1]) if len(embeddings) == 2 else (None, None)
    return Concept(base, meta, embeddings[0], layerwise_encoder(base, token_map), processors, scales[0], *second)


def sample_grid(concept: Concept, cfg: TrainConfig, path: Path, prompts: list[str] | None = None) -> None:
    """A grid of the concept's prompts (rows) at LoRA scales cfg.sample_scales (columns)."""
    base = concept.base
    prompts = prompts or concept.meta.prompts()[:cfg.sample_prompts]
    for _, emb, _ in concept.embeddings():
        emb.sync()
    columns = []
    for scale in cfg.sample_scales:
        with lora_scale([base.unet, *base.text_encoders()], scale):
            columns.append(generate(base, concept.encoder, prompts, seed=cfg.seed, steps=cfg.sample_steps,
                                    guidance=cfg.sample_guidance, height=cfg.resolution, width=cfg.resolution))
    rows = [[col[i] for col in columns] for i in range(len(prompts))]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, prompts, [f"lora x{s}" for s in cfg.sample_scales]).save(path)


class Diverged(UserError):
    """The loss or a trained parameter became NaN or Inf."""


class Trainer:
    """The training loop: batches, noise, loss, optimizer step, checkpoints, previews."""

    def __init__(self, concept: Concept, examples: list[Example], cfg: TrainConfig, generator: torch.Generator):
        self.c, self.examples, self.gen = concept, examples, generator
        # the settings as this concept uses them: its embedding scale, and the token layout it resolved to
        self.cfg = replace(cfg.for_embeddings(*concept.embedding_scale), token_layout=concept.meta.token_layout)
        base = concept.base
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        self.params = concept.trainable()
        # each text encoder's token rows: its own learning rate and norm limit (its own embedding scale when unset)
        self.rows = [(emb.rows, cfg.for_embeddings(*scale)) for _, emb, scale in concept.embeddings()]
        groups = [{"params": [rows], "lr": own.lr_embedding} for rows, own in self.rows]
        text_models = base.text_encoders()
        for model, lr in [*((m, self.cfg.lr_text) for m in text_models), (base.unet, self.cfg.lr_unet)]:
            if lora_parameters(model):
                groups.append({"params": lora_parameters(model), "lr": lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)
        cfg = self.cfg
        device = base.device
        self.autocast = (torch.autocast(device.type, dtype=torch.float16 if cfg.mixed_precision == "fp16"
                                        else torch.bfloat16) if cfg.mixed_precision != "no"
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for model in text_models:
                model.gradient_checkpointing_enable()
        for model in (base.unet, *text_models):
            model.train()
        self.start = self.count = 0  # the step training (re)started from; steps taken so far

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        cfg, gen = self.cfg, self.gen
        picks = torch.randint(len(self.examples), (cfg.batch_size,), generator=gen).tolist()
        pixels, masks, captions = [], [], []
        for i in picks:
            px, mask = augment(self.examples[i], cfg.resolution, gen, cfg.min_crop, cfg.flip)
            pixels.append(px)
            masks.append(mask)
            captions.append(expand_caption(self.examples[i].caption, self.c.meta.phrase, gen, cfg.shuffle_captions))
        return torch.stack(pixels), torch.stack(masks), captions

    def loss(self, pixels: torch.Tensor, masks: torch.Tensor, captions: list[str]) -> torch.Tensor:
        base, cfg, gen = self.c.base, self.cfg, self.gen
        device, dtype = base.device, base.dtype
        with torch.no_grad():
            dist = base.vae.encode(pixels.to(device, dtype)).latent_dist
            latents = dist.sample(generator=gen).float() * base.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen)
        noise = noise.to(device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), generator=gen).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        capture = None
        if cfg.attn_reg_weight > 0:
            capture = AttentionCapture(self.c.encoder.concept_mask(captions))
        for proc in self.c.processors:
            proc.capture = capture
        with self.autocast:
            states, pooled = encode_prompts(self.c.encoder, captions)
            added = added_conditions(pooled, cfg.resolution, cfg.resolution, device, dtype)
            pred = base.unet(noisy.to(dtype), t, states.to(dtype), added_cond_kwargs=added).sample
        latent_masks = F.interpolate(masks, size=latents.shape[-2:], mode="area").to(device)
        loss = masked_mse(pred, target, latent_masks if cfg.masked_loss else None)
        if capture is not None:
            loss = loss + cfg.attn_reg_weight * attention_regulariser(capture, masks.to(device))
            for proc in self.c.processors:
                proc.capture = None
        return loss

    def step(self) -> float:
        """One optimizer step; a non-finite loss or parameter is a UserError (the training diverged)."""
        self.count += 1
        before, frozen = [], []
        for rows, own in self.rows:
            before.append(rows.detach().clone())
            limit = own.emb_norm_threshold
            frozen.append(None if limit == "off" else before[-1].norm(dim=-1) >= limit)
        loss = self.loss(*self.batch())
        if not bool(torch.isfinite(loss.detach())):
            raise self.diverged(f"the loss is {float(loss.detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for (rows, _), stop in zip(self.rows, frozen):
            if stop is not None and rows.grad is not None:
                rows.grad[stop] = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for (rows, _), stop, old in zip(self.rows, frozen, before):
            if stop is not None and bool(stop.any()):
                with torch.no_grad():  # weight decay and momentum would still move frozen rows
                    rows[stop] = old[stop]
        bad = next((name for name, p in self.params.items() if not bool(torch.isfinite(p.detach()).all())), None)
        if bad is not None:
            raise self.diverged(f"{bad} became NaN or Inf")
        return float(loss.detach())

    def diverged(self, what: str) -> Diverged:
        cfg = self.cfg
        return Diverged(f"training diverged at step {self.count}: {what}; lower the learning rates (lr_unet "
                         f"{cfg.lr_unet:g}, lr_text {cfg.lr_text:g}, lr_embedding {cfg.lr_embedding:g}) and train "
                         "again; no package was written")

    def run(self, work: Path, identity: dict, on_step: Callable[[int, float], None] | None = None,
            show_progress: bool = True) -> list[float]:
        """Train to cfg.steps from the last checkpoint in `work`; checkpoint on Ctrl-C and every N steps.

        If the training diverges, `work` (whose checkpoints could only lead to the same divergence) is removed.
        """
        cfg = self.cfg
        start, losses = load_checkpoint(work, self.params, self.optimizer, self.gen, identity)
        self.start = self.count = start
        columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, disable=not show_progress) as progress:
            task = progress.add_task("train", total=cfg.steps, completed=start, loss="-")
            step = start
            try:
                while step < cfg.steps:
                    losses.append(self.step())
                    step += 1
                    recent = losses[-10:]
                    progress.update(task, completed=step, loss=f"{sum(recent) / len(recent):.4f}")
                    if on_step:
                        on_step(step, losses[-1])
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                        save_checkpoint(work, step, self.params, self.optimizer, self.gen, identity, losses)
                    if cfg.preview_every and step % cfg.preview_every == 0 and step < cfg.steps:
                        sample_grid(self.c, cfg, work / "samples" / f"step_{step:06d}.png")
            except KeyboardInterrupt:
                save_checkpoint(work, step, self.params, self.optimizer, self.gen, identity, losses)
                raise
            except Diverged:
                shutil.rmtree(work, ignore_errors=True)
                raise
        return losses


# Settings that do not change the training's trajectory: a checkpoint stays valid when they change.
NOT_IN_IDENTITY = ("steps", "checkpoint_every", "preview", "sample_prompts", "sample_steps", "sample_guidance",
                   "sample_scales")


def check_resolution(base: Base, resolution: int) -> None:
    """The training resolution must be a multiple of what the base's VAE and UNet divide it by."""
    step = 2 ** (len(base.vae.config.block_out_channels) - 1) * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if resolution % step:
        raise InvalidArgument("resolution", f"{resolution} is not a multiple of {step}, which the base {base.source} "
                              f"needs (e.g. {max(step, resolution // step * step)})")


def check_out(out: Path) -> None:
    """`out` can become a new package folder: it is free (or an empty folder) and no parent is a file."""
    check_fresh_output(out, "out")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise InvalidArgument("out", f"{parent} is a file, so {out} cannot be created there")


def train_concept(base: Path | str | Base, data: Path, words: list[str], class_word: str, out: Path,
                  cfg: TrainConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  base_config: Path | None = None, name: str | None = None, show_progress: bool = True,
                  on_step: Callable[[int, float], None] | None = None,
                  restart_stale: bool = False) -> tuple[Path, list[float]]:
    """Train one concept and write its package at `out` (atomically). Returns (out, losses).

    `base` is a base's path (loaded here on `device`/`dtype`) or an already loaded `Base`, which the
    training changes (new tokens, LoRA adapters): pass a copy if it is needed afterwards.
    A crash or Ctrl-C leaves a checkpoint in `<out>.work/`; the same call resumes from it. A checkpoint
    of different settings is refused, or with `restart_stale` removed and the training started over.
    Without a final preview grid (cfg.preview_at_end) the package has no samples/ folder.
    """
    out = Path(out)
    cfg.check()
    check_out(out)
    examples = load_examples(Path(data))
    if isinstance(base, Base):
        device, dtype = base.device, base.dtype
    if cfg.mixed_precision == "fp16" and torch.device(device).type != "cuda":
        raise InvalidArgument("mixed_precision", "fp16 needs a CUDA device; use bf16 or no on the CPU")
    if dtype != torch.float32 and cfg.mixed_precision == "no":
        raise InvalidArgument("dtype", "a half-precision dtype needs mixed_precision fp16 or bf16 for training")
    if not isinstance(base, Base):
        base = load_base(base, device, dtype, base_config, sdxl=True)
    check_resolution(base, cfg.resolution)
    cfg = with_layout_of(base, cfg)  # the layout the package records, and the checkpoint's identity
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    concept = prepare_concept(base, words, class_word, cfg, name or out.name, gen)
    identity = {"base": base.fingerprint, "words": list(words), "class_word": class_word, "data": str(Path(data)),
                "config": {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_IDENTITY}}
    work = out.with_name(out.name + ".work")
    if restart_stale and checkpoint_identity(work) not in (None, identity):
        shutil.rmtree(work)
    trainer = Trainer(concept, examples, cfg, gen)
    losses = trainer.run(work, identity, on_step, show_progress)
    for model in (base.unet, *base.text_encoders()):
        model.eval()
    with staged_dir(out) as stage:
        tensors = concept.tensors()
        # no wall-clock figure in the package: the same inputs and seed must give the same bytes
        concept.meta.training = dict(trainer.cfg.to_dict(), final_loss=losses[-1], resumed_from=trainer.start)
        if cfg.preview_at_end:
            sample_grid(concept, cfg, work / "samples" / "final.png")
            shutil.copytree(work / "samples", stage / "samples")
        save_package(stage, concept.meta, tensors)
    shutil.rmtree(work, ignore_errors=True)
    return out, losses
