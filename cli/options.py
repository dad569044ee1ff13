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


def package_fuser(device, base_config: Path | None):
    """How sampling fuses several --concept packages: the server's fusion with its defaults."""

    def fuse_packages(base: Path, packages: list[Path], out: Path) -> None:
        from server.fuse import fuse

        fuse(base, packages, out, device=device, base_config=base_config, show_progress=False)
    return fuse_packages


def words_list(words: str) -> list[str]:
    """'<w1> <w2>' -> ['<w1>', '<w2>']."""
    return words.split()


def scales_list(text: str) -> list[float]:
    """'0,0.7,1' -> [0.0, 0.7, 1.0] (TrainConfig checks the range and finiteness)."""
    from shared.errors import InvalidArgument

    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidArgument("sample_scales", f"{text!r} is not a list of numbers separated by commas, "
                                               "e.g. 0,1") from None


__all__ = ["Base", "BaseConfig", "Device", "Dtype", "Path", "Seed", "package_fuser", "scales_list", "words_list"]
