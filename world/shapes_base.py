"""The shapes base: a small Stable-Diffusion-shaped pipeline trained from scratch on the shapes world, on CPU.

Same component classes and folder layout as SD 1.x: an AutoencoderKL (down-sampling factor 4: 64 px images,
16 x 16 x 8 latents) trained first on world renders, then a UNet2DConditionModel with cross-attention at
every resolution and a CLIPTextModel trained together on the latents of seeded scenes and their captions
(10% of captions dropped, for classifier-free guidance), with SD's noise schedule. The CLIP BPE vocabulary
is written locally and makes every world word one token. Training is resumable: a checkpoint (weights,
optimizer moments, step, the noise generator's state) is written every `checkpoint_every` steps and at the end of
each phase, so a run stopped and resumed ends with the same weights as one run straight through.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from shared.atomic import staged_dir, write_bytes_atomic
from shared.clip_vocab import write_tokenizer_files
from shared.errors import UserError
from shared.validate import number
from world.scenes import caption_variants, random_scene, render, world_words

SIZE = 64
LATENT_CHANNELS = 16  # 16 x 16 x 16 latents: a code 3x smaller than the pixels keeps fine textures and exact colours
MAX_TOKENS = 32  # world captions are at most ~25 tokens; a shorter context makes every cross-attention cheaper


@dataclass
class BaseTraining:
    """Every setting of `make-shapes-base`."""

    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    decoder_steps: int = 800  # the decoder alone, after the autoencoder: the latent space (and the UNet) unchanged
    steps: int = 7500
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    # The UNet sees the latents scaled to this standard deviation (the folder's scaling_factor). At unit
    # variance the 4,096 numbers of a 16 x 16 x 16 latent still show a scene's colours and shapes through
    # the noise of SD's last timesteps, so the UNet learnt to read them there instead of the caption (and
    # ignored the text entirely); at 0.25 the scene is hidden in the noise where sampling starts, but the
    # timesteps where an object's outline is still to be decided (signal-to-noise 0.1-1) are then only t = 50-300
    # of SD's 1,000, and shapes were learnt slowly: at step 1,500 of the 7,500-step schedule, 13% of prompts had
    # colour and shape right, against 31% at 0.5 (that band then t = 100-500), all else equal (docs/world.md).
    latent_std: float = 0.5
    scenes: int = 32_000  # distinct training scenes, encoded once (rendering + encoding cost a third of a step)
    checkpoint_every: int = 250
    seed: int = 0
    minutes: float = 52.0  # stop the UNet phase when the whole run reaches this budget (the weights so far are used)

    def check(self) -> BaseTraining:
        number("decoder_steps", self.decoder_steps, 0, 10_000_000, integer=True)
        for name in ("vae_steps", "vae_batch", "steps", "batch", "checkpoint_every", "scenes"):
            number(name, getattr(self, name), 1, 10_000_000, integer=True)
        number("warmup", self.warmup, 0, 10_000_000, integer=True)
        for name in ("vae_lr", "lr"):
            number(name, getattr(self, name), 0, 1, low_open=True)
        number("caption_dropout", self.caption_dropout, 0, 1)
        number("latent_std", self.latent_std, 0, 10, low_open=True)
        number("seed", self.seed, 0, 2**31, integer=True)
        number("minutes", self.minutes, 0, 10_000, low_open=True)
        return self


def build_components(work: Path) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """The untrained components (the tokenizer's files are written into `work`).

    Group norms have several channels per group (autoencoder 8 groups of 4-8, UNet 8 groups of 4-16): with one
    channel per group a GroupNorm is an instance norm, which removes each channel's mean over the image, and
    the first autoencoder trained here could not reproduce a flat background's colour.
    """
    vocab, merges = write_tokenizer_files(work / "tokenizer-src", world_words())
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=MAX_TOKENS, projection_dim=64, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # word embeddings at unit scale, not CLIP's 0.02 (the position embeddings' scale): from the first step the
    # captions give the UNet text states that differ, instead of nearly one state for every caption
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=8, sample_size=SIZE)
    return tokenizer, text_encoder, unet, vae


def sd_scheduler() -> PNDMScheduler:
    """SD's noise schedule (scaled linear 0.00085..0.012 over 1000 steps), saved as SD folders save it, with
    SD 2's v-prediction: an epsilon loss weighs a wrong scene at the noisy timesteps where the caption decides
    it by the signal-to-noise ratio, about 1/50 of the weight v-prediction gives it there."""
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type="v_prediction")


def scene_batch(first_seed: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Renders (count, 3, 64, 64) in [-1, 1] and captions of the seeded scenes first_seed ... first_seed+count-1."""
    images, captions = [], []
    for seed in range(first_seed, first_seed + count):
        # every third scene has one object: 60% single-object scenes in all, the prompts users start from
        scene = random_scene(seed, n_objects=1 if seed % 3 == 0 else None)
        images.append(np.asarray(render(scene, SIZE).image, dtype=np.float32))
        captions.append(caption_variants(scene, random.Random(seed + 1)))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return pixels, captions


class Checkpoint:
    """Weights + optimizer moments + progress of one training phase, in `work/<phase>.safetensors`."""

    def __init__(self, work: Path, phase: str):
        self.path, self.meta = work / f"{phase}.safetensors", work / f"{phase}.json"

    def save(self, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, step: int,
             info: dict, generator: torch.Generator | None = None) -> None:
        tensors = {f"model.{name}.{k}": v.detach().contiguous() for name, m in models.items()
                   for k, v in m.state_dict().items()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().contiguous()
        if generator is not None:
            tensors["rng"] = generator.get_state()
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.path)
        write_bytes_atomic(self.meta, json.dumps({"step": step, **info}).encode())

    def load(self, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
             generator: torch.Generator | None = None) -> dict | None:
        if not self.meta.is_file() or not self.path.is_file():
            return None
        tensors = load_file(str(self.path))
        for name, m in models.items():
            prefix = f"model.{name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for i, p in enumerate(params):
                state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
                if state:
                    optimizer.state[p] = state
        if generator is not None and "rng" in tensors:
            generator.set_state(tensors["rng"])
        return json.loads(self.meta.read_text())


def _progress(label: str, show: bool) -> Progress:
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), disable=not show)


def _autoencoder_phase(vae: AutoencoderKL, cfg: BaseTraining, work: Path, phase: str, params: list,
                       steps: int, first_seed: int, loss_of: Callable[[torch.Tensor], torch.Tensor],
                       lr_at: Callable[[int], float], show_progress: bool) -> None:
    """One resumable phase of autoencoder training: AdamW on `params`, `loss_of(pixels)` per batch of renders."""
    optimizer = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = Checkpoint(work, phase)
    state = ckpt.load({"vae": vae}, optimizer) or {"step": 0, "losses": []}
    losses: list[float] = state["losses"]
    with _progress(phase, show_progress) as progress:
        task = progress.add_task(phase, total=steps, completed=state["step"], loss="-")
        for step in range(state["step"], steps):
            pixels, _ = scene_batch(first_seed + step * cfg.vae_batch, cfg.vae_batch)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_of(pixels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            progress.update(task, completed=step + 1, loss=f"{np.mean(losses[-20:]):.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                ckpt.save({"vae": vae}, optimizer, step + 1, {"losses": losses})
    vae.eval().requires_grad_(False)


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """MSE + L1: the L1 term keeps flat colours exact."""
    return F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels)


def train_vae(vae: AutoencoderKL, cfg: BaseTraining, work: Path, show_progress: bool = True) -> float:
    """Reconstruction + a small KL term on world renders, decoding the posterior's mean: sampling it while its
    variance is still untrained buried the latents in unit noise and made the first run's autoencoder wash
    every colour out. Returns the standard deviation of the posterior means on held-out renders."""
    def loss_of(pixels: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(pixels).latent_dist
        return reconstruction_loss(vae.decode(posterior.mode()).sample, pixels) + 1e-6 * posterior.kl().mean()

    vae.train()
    _autoencoder_phase(vae, cfg, work, "vae", list(vae.parameters()), cfg.vae_steps, 10_000_000, loss_of,
                       lambda step: cfg.vae_lr, show_progress)
    with torch.no_grad():
        pixels, _ = scene_batch(20_000_000, 64)
        return float(vae.encode(pixels).latent_dist.mean.std())


def finetune_decoder(vae: AutoencoderKL, cfg: BaseTraining, work: Path, show_progress: bool = True) -> None:
    """Train the decoder alone on the frozen encoder's latents (SD's own VAE was improved this way): sharper,
    truer colours, and since the encoder is untouched the latents the UNet learns on stay the same."""
    decoder = [vae.decoder, vae.post_quant_conv]
    vae.requires_grad_(False)
    for m in decoder:
        m.requires_grad_(True).train()

    def loss_of(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mode()
        return reconstruction_loss(vae.decode(latents).sample, pixels)

    params = [p for m in decoder for p in m.parameters()]
    _autoencoder_phase(vae, cfg, work, "decoder", params, cfg.decoder_steps, 30_000_000, loss_of,
                       lambda step: cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.decoder_steps)),
                       show_progress)


def encoded_scenes(tokenizer: CLIPTokenizer, vae: AutoencoderKL, cfg: BaseTraining, work: Path,
                   show_progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, caption token ids) of the seeded training scenes 0 ... cfg.scenes-1, encoded once by the
    autoencoder's posterior mean (as it decodes; unscaled) and kept in `work/scenes.safetensors`."""
    path = work / "scenes.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        if "raw" in cached and cached["raw"].shape[0] == cfg.scenes:
            return cached["raw"], cached["ids"]
    latents, ids, chunk = [], [], 64
    with _progress("encode scenes", show_progress) as progress, torch.no_grad():
        task = progress.add_task("scenes", total=cfg.scenes, loss="-")
        for start in range(0, cfg.scenes, chunk):
            pixels, captions = scene_batch(start, min(chunk, cfg.scenes - start))
            latents.append(vae.encode(pixels).latent_dist.mode())
            ids.append(tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                 return_tensors="pt").input_ids)
            progress.update(task, completed=start + len(captions))
    out = {"raw": torch.cat(latents).contiguous(), "ids": torch.cat(ids).contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp))
    tmp.replace(path)
    return out["raw"], out["ids"]


def train_denoiser(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                   vae: AutoencoderKL, scaling: float, cfg: BaseTraining, work: Path, deadline: float,
                   show_progress: bool = True, stop_at_step: int | None = None) -> dict:
    """UNet + text encoder on noised latents of seeded scenes (v-prediction); stops at `deadline` (or at
    `stop_at_step`, a pause: the run is resumed later from the checkpoint)."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ckpt = Checkpoint(work, "unet")
    gen = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps and caption dropout, restored on resume
    state = ckpt.load({"unet": unet, "text_encoder": text_encoder}, optimizer, gen) or {"step": 0, "losses": []}
    made_for = state.get("schedule_steps", cfg.steps)
    if made_for != cfg.steps:  # the learning rate's cosine runs over cfg.steps: another length is another run
        raise UserError(f"the UNet checkpoint in {work} was made for a {made_for}-step schedule, not {cfg.steps}; "
                        f"resume with --steps {made_for}, or give a new --work folder to start again")
    losses: list[float] = state["losses"]

    def save(at: int) -> None:
        ckpt.save({"unet": unet, "text_encoder": text_encoder}, optimizer, at,
                  {"losses": losses, "schedule_steps": cfg.steps}, gen)

    noise_scheduler = DDPMScheduler.from_config(sd_scheduler().config)
    last = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
    lr_at: Callable[[int], float] = lambda s: cfg.lr * min(1.0, (s + 1) / max(1, cfg.warmup)) * \
        0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))  # noqa: E731
    all_latents, all_ids = encoded_scenes(tokenizer, vae, cfg, work, show_progress)
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    unet.train()
    text_encoder.train()
    step = state["step"]
    with _progress("unet + text encoder", show_progress) as progress:
        task = progress.add_task("unet", total=cfg.steps, completed=step, loss="-")
        while step < last and time.monotonic() < deadline:
            # each pass over the scenes in its own seeded order
            first = step * cfg.batch
            order = torch.randperm(cfg.scenes, generator=torch.Generator().manual_seed(cfg.seed + first // cfg.scenes))
            pick = order[torch.arange(first, first + cfg.batch) % cfg.scenes]
            latents, ids = all_latents[pick] * scaling, all_ids[pick].clone()
            drop = torch.rand(len(pick), generator=gen) < cfg.caption_dropout
            ids[drop] = empty
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
            loss = F.mse_loss(pred, noise_scheduler.get_velocity(latents, noise, t))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            progress.update(task, completed=step, loss=f"{np.mean(losses[-50:]):.4f}")
            if step % cfg.checkpoint_every == 0:
                save(step)
    save(step)
    return {"steps": step, "final_loss": float(np.mean(losses[-100:])) if losses else None}


def deterministic_posterior(vae: AutoencoderKL) -> None:
    """Give the encoder's posterior a variance of e^-30 (diffusers' floor). Its variance was never trained
    (the KL weight is 1e-6 and the mean is what is decoded), so it stayed near 1, larger than the latents
    themselves (std 0.64): every training that encodes images by sampling the posterior, as SD fine-tuning
    does (`mixshow train`, `mixshow stats`), learnt from noise. The means, and so the decoder and the UNet,
    are untouched."""
    half = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -30.0


def make_shapes_base(out: Path, cfg: BaseTraining | None = None, work: Path | None = None,
                     show_progress: bool = True, stop_at_step: int | None = None) -> dict:
    """Train the shapes base and write it as a diffusers folder at `out` (atomically); returns the run's record.

    `work` (default `<out>.work`) keeps the checkpoints, so the same call resumes after an interruption.
    `stop_at_step` pauses the run when the UNet phase reaches that step: nothing is written but the
    checkpoints, and the record says `paused`.
    """
    cfg = (cfg or BaseTraining()).check()
    out = Path(out)
    work = Path(work or out.with_name(out.name + ".work"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    torch.manual_seed(cfg.seed)
    tokenizer, text_encoder, unet, vae = build_components(work)
    scaling_file = work / "vae-std.json"
    if scaling_file.is_file():
        Checkpoint(work, "vae").load({"vae": vae}, None)
        vae.eval().requires_grad_(False)
        raw_std = json.loads(scaling_file.read_text())["raw_std"]
    else:
        raw_std = train_vae(vae, cfg, work, show_progress)
        write_bytes_atomic(scaling_file, json.dumps({"raw_std": raw_std}).encode())
    scaling = cfg.latent_std / raw_std
    vae.register_to_config(scaling_factor=scaling)
    record = train_denoiser(tokenizer, text_encoder, unet, vae, scaling, cfg, work,
                            start + cfg.minutes * 60, show_progress, stop_at_step)
    if stop_at_step is not None and record["steps"] < cfg.steps and record["steps"] >= stop_at_step:
        return {**record, "paused": True, "seconds_this_run": round(time.monotonic() - start, 1)}
    if cfg.decoder_steps:
        finetune_decoder(vae, cfg, work, show_progress)
    deterministic_posterior(vae)
    record.update(settings=asdict(cfg), scaling_factor=scaling, seconds_this_run=round(time.monotonic() - start, 1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with staged_dir(out) as stage:  # float16 on disk (half the bytes); load_base casts to the dtype asked for
        pipe.to(torch.float16).save_pretrained(stage, safe_serialization=True)
        (stage / "training.json").write_text(json.dumps(record, indent=1))
    return record
