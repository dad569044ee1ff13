from __future__ import annotations

from pathlib import Path

import typer

from cli.options import Base, BaseConfig, Device, Dtype, scales_list, words_list

NAME = "train"


def run(base: Path = Base, base_config: Path = BaseConfig,
        data: Path = typer.Option(..., "--data", help="concept folder: images + .txt captions with <TOK>"),
        words: str = typer.Option(..., "--words", help="the concept's new words, e.g. '<cat1> <cat2>'"),
        class_word: str = typer.Option(..., "--class-word", help="one-token class word, e.g. cat"),
        out: Path = typer.Option(..., "--out", help="package folder to create"),
        config: Path = typer.Option(None, "--config", help="YAML file of training settings"),
        steps: int = typer.Option(None, "--steps"),
        batch_size: int = typer.Option(None, "--batch-size"),
        resolution: int = typer.Option(None, "--resolution"),
        rank: int = typer.Option(None, "--rank"),
        plain: bool = typer.Option(None, "--plain/--layerwise", help="plain-LoRA mode: one embedding per word"),
        masked_loss: bool = typer.Option(None, "--masked-loss/--no-masked-loss"),
        mixed_precision: str = typer.Option(None, "--mixed-precision", help="no | fp16 | bf16"),
        gradient_checkpointing: bool = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
        preview: str = typer.Option(None, "--preview", help="preview grids: auto (default: at the end when the grid "
                                    "costs at most a quarter of the run) | none | end | 'every N'"),
        preview_prompts: int = typer.Option(None, "--preview-prompts", help="prompts (rows) of a preview grid "
                                            "(default 1)"),
        preview_steps: int = typer.Option(None, "--preview-steps", help="sampling steps of a preview (default 10)"),
        preview_scales: str = typer.Option(None, "--preview-scales", help="LoRA scales (columns) of a preview grid, "
                                           "e.g. '0,1' (the default)"),
        sample_every: int = typer.Option(None, "--sample-every", help="old form of --preview 'every N' (0: end)"),
        checkpoint_every: int = typer.Option(None, "--checkpoint-every"),
        seed: int = typer.Option(None, "--seed"),
        name: str = typer.Option(None, "--name", help="package name (default: the --out folder's name)"),
        stats: bool = typer.Option(False, "--stats", help="compute the package's statistics right after training"),
        stats_source: str = typer.Option("sample", "--stats-source", help="sample | train (see `mixshow stats`)"),
        device: str = Device, dtype: str = Dtype) -> None:
    """Train one concept as an ED-LoRA and write its concept package (resumes after a crash or Ctrl-C)."""
    import copy

    from rich import print

    from client.config import load_config
    from client.stats import check_stats_args, compute_stats
    from client.train import train_concept
    from shared.base import load_base
    from shared.device import parse_device, parse_dtype
    from shared.errors import InvalidArgument

    overrides = dict(steps=steps, batch_size=batch_size, resolution=resolution, rank=rank,
                     layerwise=None if plain is None else not plain, masked_loss=masked_loss,
                     mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                     preview=preview, sample_every=sample_every, checkpoint_every=checkpoint_every, seed=seed,
                     sample_prompts=preview_prompts, sample_steps=preview_steps,
                     sample_scales=None if preview_scales is None else scales_list(preview_scales))
    cfg = load_config(config, overrides)
    if stats:
        try:
            check_stats_args(stats_source, None, data, 20, 0)
        except InvalidArgument as exc:
            raise InvalidArgument("stats_source" if exc.argument == "source" else exc.argument, exc.message) from None
    torch_device, torch_dtype = parse_device(device), parse_dtype(dtype)
    model = base
    pristine = None
    if stats:  # load the base once: train on it, record the statistics on an untouched copy
        model = load_base(base, torch_device, torch_dtype, base_config, sdxl=True)
        pristine = copy.deepcopy(model)
    pkg, losses = train_concept(model, data, words_list(words), class_word, out, cfg, torch_device, torch_dtype,
                                base_config, name)
    first, last = losses[:10], losses[-10:]
    if pristine is not None:
        path = compute_stats(pristine, pkg, stats_source, data=data)
        print(f"statistics written to {path}")
    grid = pkg / "samples" / "final.png"
    preview_note = f"; preview grid {grid}" if grid.is_file() else ""
    print(f"package written to {pkg}  (loss {sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f}"
          f"{preview_note})")
