from __future__ import annotations

from pathlib import Path

import typer

from cli.options import Base, BaseConfig, Device, Dtype

NAME = "stats"


def run(base: Path = Base, base_config: Path = BaseConfig,
        concept: Path = typer.Option(..., "--concept", help="the concept package to compute statistics for"),
        source: str = typer.Option("sample", "--source", help="sample: while sampling the concept's prompts; "
                                                              "train: random timesteps over its training latents"),
        samples: int = typer.Option(None, "--samples", help="images sampled / training latents used "
                                                            "(default: one per prompt template)"),
        data: Path = typer.Option(None, "--data", help="training images, for --source train"),
        steps: int = typer.Option(20, "--steps", help="DPM-Solver++ steps per sample (all recorded)"),
        pack: str = typer.Option("compact", "--pack", help="compact (default: per Gram the smallest faithful of "
                                                          "lowrank32/tri24/tri32), full32, full64, tri32, tri24, "
                                                          "tri16, lowrank32; see docs/fusion.md"),
        seed: int = typer.Option(0, "--seed"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Record the Grams of every adapted layer's inputs into PKG/stats.safetensors (raw activations never kept)."""
    from rich import print

    from client.dataset import load_examples
    from client.stats import check_stats_args, compute_stats
    from shared.base import load_base
    from shared.device import parse_device, parse_dtype
    from shared.package import read_package

    check_stats_args(source, samples, data, steps, seed, pack)  # everything cheap is checked before the base loads
    read_package(concept)
    if source == "train":
        load_examples(data)
    model = load_base(base, parse_device(device), parse_dtype(dtype), base_config, sdxl=True)
    path = compute_stats(model, concept, source, samples, data, steps, seed, pack)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
