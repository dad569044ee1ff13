"""ms per training step: ED-LoRA (mixshow) vs a plain PEFT LoRA on the same tiny base, side by side.

Both loops see the same batches (same augmentation, VAE encoding, noise and MSE loss). The
plain loop is the usual diffusers+PEFT recipe: UNet LoRA only, the prompt encoded once by a
frozen text encoder. Rounds alternate between the two so machine noise hits both alike.

    python bench/train_step.py [--base DIR] [--rounds 5] [--steps 10] [--resolution 64 128] [--device cpu]
    python bench/train_step.py --arch sdxl      # the tiny SDXL base: both token layouts (per block, per module)

On SDXL the plain recipe encodes the prompt once through both frozen encoders (penultimate states joined,
the second's pooled projection) and feeds the size micro-conditioning, as the ED-LoRA loop does.

At 64 px the tiny UNet sees 8x8 latents and the text encoder's share of a step is far above
what it is at real sizes; 128 px is printed beside it for that reason.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from client.config import TrainConfig  # noqa: E402
from client.dataset import load_examples  # noqa: E402
from client.train import Trainer, prepare_concept  # noqa: E402
from fixtures.tiny_base import make_tiny_base  # noqa: E402
from fixtures.toy_concepts import make_toy_concepts  # noqa: E402
from shared.base import load_base  # noqa: E402
from shared.edlora import TOKEN_LAYOUTS, added_conditions  # noqa: E402
from shared.lora import add_lora, lora_parameters, target_modules  # noqa: E402
from shared.names import UNET_TARGETS  # noqa: E402


class PlainLoRA:
    """The reference recipe: PEFT LoRA on the UNet, frozen text encoder, one encode per prompt."""

    def __init__(self, base_path: Path, trainer: Trainer, cfg: TrainConfig, device: str):
        self.base = load_base(base_path, device, sdxl=True)
        self.resolution = cfg.resolution
        add_lora(self.base.unet, target_modules(self.base.unet, UNET_TARGETS), cfg.rank, cfg.alpha)
        self.base.unet.train()
        self.opt = torch.optim.AdamW(lora_parameters(self.base.unet), lr=cfg.lr_unet, weight_decay=cfg.weight_decay)
        self.trainer, self.gen = trainer, torch.Generator().manual_seed(1)
        self.sched = trainer.noise_scheduler

    def step(self) -> float:
        pixels, _, captions = self.trainer.batch()
        base = self.base
        with torch.no_grad():
            latents = base.vae.encode(pixels.to(base.device)).latent_dist.sample(generator=self.gen)
            latents = latents * base.vae.config.scaling_factor
            states, added = self.encode(captions)
        noise = torch.randn(latents.shape, generator=self.gen).to(base.device)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=self.gen).to(base.device)
        pred = base.unet(self.sched.add_noise(latents, noise, t), t, states, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


    def encode(self, captions: list[str]) -> tuple[torch.Tensor, dict | None]:
        base, outs = self.base, []
        for _, tokenizer, encoder in base.text_models():
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            outs.append(encoder(ids.to(base.device), output_hidden_states=base.arch == "sdxl"))
        if base.arch != "sdxl":
            return outs[0][0], None
        states = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
        return states, added_conditions(outs[1].text_embeds, self.resolution, self.resolution, base.device,
                                        states.dtype)


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resolution", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", choices=("sd", "sdxl"), default="sd", help="the tiny base's architecture")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base_path = args.base or make_tiny_base(tmp / "base", arch=args.arch)
    make_toy_concepts(tmp / "toys", 1, images=6, size=max(args.resolution))
    layouts = TOKEN_LAYOUTS if args.arch == "sdxl" else ("block",)
    print(f"base {base_path} ({args.arch})  device {args.device}  batch {args.batch_size}  threads "
          f"{torch.get_num_threads()}  {args.rounds} alternating rounds x {args.steps} steps, median")
    for resolution in args.resolution:
        plain, results = measure(base_path, tmp / "toys" / "red-circle", resolution, args, layouts)
        for layout, (ed, n_layers) in results.items():
            what = f"layer-wise x{n_layers}" + (f", one token per {layout}" if args.arch == "sdxl" else "")
            print(f"{resolution:4d}px  ED-LoRA ({what}, text+unet LoRA): {ed:7.1f} ms/step   "
                  f"plain PEFT LoRA (unet LoRA, frozen text encoder{'s' if args.arch == 'sdxl' else ''}): "
                  f"{plain:7.1f} ms/step   ratio {ed / plain:.2f} (goal <= 1.3)")


def measure(base_path: Path, data: Path, resolution: int, args: argparse.Namespace,
            layouts: tuple[str, ...]) -> tuple[float, dict[str, tuple[float, int]]]:
    """Median ms/step of the plain loop and of ED-LoRA in each token layout at one resolution, rounds
    alternating: (plain, {layout: (ED-LoRA, its token count per word)})."""
    loops, counts = {}, {}
    for layout in layouts:
        cfg = TrainConfig(steps=10**6, resolution=resolution, batch_size=args.batch_size, token_layout=layout)
        base = load_base(base_path, args.device, sdxl=True)
        gen = torch.Generator().manual_seed(0)
        concept = prepare_concept(base, ["<bench1>", "<bench2>"], "toy", cfg, "bench", gen)
        loops[layout], counts[layout] = Trainer(concept, load_examples(data), cfg, gen), concept.meta.n_layers
    plain = PlainLoRA(base_path, loops[layouts[0]], cfg, args.device)
    for step in [plain.step, *(loop.step for loop in loops.values())]:
        timed(step, 3)
    times: dict[str, list[float]] = {name: [] for name in ("plain", *layouts)}
    for _ in range(args.rounds):
        times["plain"].append(timed(plain.step, args.steps))
        for layout, loop in loops.items():
            times[layout].append(timed(loop.step, args.steps))
    return statistics.median(times["plain"]), {layout: (statistics.median(times[layout]), counts[layout])
                                               for layout in layouts}

if __name__ == "__main__":
    main()
