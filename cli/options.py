"""Options several verbs share, so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path

import typer

Device = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, mps")
Dtype = typer.Option("float32", "--dtype", help="weights dtype: float32, float16, bfloat16")
Base = typer.Option(..., "--base", help="base model: a diffusers folder or a single .safetensors file")
BaseConfig = typer.Option(None, "--base-config", help="for a single-file --base: a local diffusers folder "
                                                      "with the same architecture's configs")
Seed = typer.Option(0, "--seed", help="random seed")


def words_list(words: str) -> list[str]:
    """'<w1> <w2>' -> ['<w1>', '<w2>']."""
    return words.split()


__all__ = ["Base", "BaseConfig", "Device", "Dtype", "Path", "Seed", "words_list"]
