"""Bad input to `mixshow sample`, `mixshow eval clip` and `mixshow eval fidelity`: each case is one clear
`error:` line with exit code 2, naming the flag or the YAML key, and nothing written (tests/badinput.py).

Every input a case names is copied into its sandbox first; the cases fail before any sampling.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.badinput import assert_clean_error
from tests.test_clip_eval import build_tiny_clip
from tests.test_regional import build_condition_models

SIZE = 64


@dataclass
class Kit:
    """Read-only originals; a case copies what it names into its sandbox."""

    base: Path
    fused: Path
    package: Path
    packages: list[Path]
    adapter: Path
    adapter_misfit: Path
    controlnet: Path
    clip: Path


@pytest.fixture(scope="module")
def kit(tiny_base, three_packages, fused_three, tmp_path_factory) -> Kit:
    root = build_condition_models(tiny_base, tmp_path_factory.mktemp("bad-input-kit"))
    clip = build_tiny_clip(tiny_base, root / "tiny-clip")
    return Kit(tiny_base, fused_three["gradient"], three_packages[0], list(three_packages), root / "adapter",
               root / "adapter-misfit", root / "controlnet", clip)


def place(src: Path, sandbox: Path, name: str | None = None) -> Path:
    """A copy of `src` (file or folder) inside the sandbox."""
    dst = sandbox / (name or src.name)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def sketch(path: Path, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    Image.new("RGB", size, "black").save(path)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def broken(path: Path) -> Path:
    path.write_bytes(b"not an image at all")
    return path


def truncated_png(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (its pixel data is a stub: only the header is read)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def scene_file(sandbox: Path, kit: Kit, text: str | None = None, **data) -> Path:
    """A scene YAML in the sandbox on a copy of the fused model: `data` merged into a valid scene, or `text`
    written as it is."""
    path = sandbox / "scene.yaml"
    if text is not None:
        path.write_text(text)
        return path
    scene = {"model": str(place(kit.fused, sandbox)), "prompt": "a photo of a garden", "steps": 2,
             "height": SIZE, "width": SIZE}
    scene.update(data)
    path.write_text(yaml.safe_dump(scene))
    return path


def condition(sandbox: Path, kit: Kit, image: Path, kind: str = "t2i-adapter", model: Path | None = None,
              **extra) -> dict:
    folder = model or (kit.adapter if kind == "t2i-adapter" else kit.controlnet)
    return {"type": kind, "model": str(place(folder, sandbox)), "image": str(image), **extra}


def sample_flags(sandbox: Path, kit: Kit, *flags: str) -> list[str]:
    return ["sample", "--model", str(place(kit.fused, sandbox)), "--prompt", "a <red-circle>", "--steps", "2",
            "--height", str(SIZE), "--width", str(SIZE), *flags]


def sample_yaml(sandbox: Path, kit: Kit, text: str | None = None, **data) -> list[str]:
    return ["sample", "--config", str(scene_file(sandbox, kit, text, **data))]


def references(sandbox: Path, name: str = "refs", bad: Path | None = None) -> Path:
    folder = sandbox / name
    folder.mkdir()
    sketch(folder / "good.png")
    if bad is not None:
        shutil.move(bad, folder / bad.name)
    return folder


def clip_args(sandbox: Path, kit: Kit, *flags: str, refs: Path | None = None) -> list[str]:
    refs = refs or references(sandbox)
    return ["eval", "clip", "--clip", str(place(kit.clip, sandbox)), "--model", str(place(kit.fused, sandbox)),
            "--concept", f"red-circle={refs}", "--prompt", "a photo of a {}", "--seeds", "1", "--steps", "2",
            "--size", str(SIZE), *flags]


def fidelity_args(sandbox: Path, kit: Kit, *flags: str, packages: list[Path] | None = None) -> list[str]:
    packages = packages if packages is not None else [kit.package]
    copies = [place(p, sandbox, f"pkg{i}") for i, p in enumerate(packages)]
    return ["eval", "fidelity", "--model", str(place(kit.fused, sandbox)), "--base", str(place(kit.base, sandbox)),
            *[a for c in copies for a in ("--concept", str(c))], *flags]


def not_utf8(sandbox: Path, kit: Kit) -> list[str]:
    path = sandbox / "scene.yaml"
    path.write_bytes("prompt: caf\u00e9\n".encode("latin-1"))
    return ["sample", "--config", str(path)]


# id: (build(sandbox, kit) -> arguments without --out, the expected text of the error line)
CASES = {
    # sample: flags
    "sample-guidance-nan": (lambda s, k: sample_flags(s, k, "--guidance", "nan"), "--guidance: nan is not finite"),
    "sample-guidance-inf": (lambda s, k: sample_flags(s, k, "--guidance", "inf"), "--guidance: inf is not finite"),
    "sample-guidance-below-1": (lambda s, k: sample_flags(s, k, "--guidance", "0.5"),
                                "--guidance: 0.5 is outside [1.0, 100.0]"),
    "sample-steps-zero": (lambda s, k: sample_flags(s, k, "--steps", "0"), "--steps: 0 is outside [1, 1000]"),
    "sample-seed-negative": (lambda s, k: sample_flags(s, k, "--seed", "-1"), "--seed: -1 is outside"),
    "sample-width-zero": (lambda s, k: sample_flags(s, k, "--width", "0"), "--width: 0 is outside [8, 4096]"),
    "sample-height-not-multiple": (lambda s, k: sample_flags(s, k, "--height", "72"),
                                   "--height: 72 is not a multiple of 16"),
    "sample-batch-zero": (lambda s, k: sample_flags(s, k, "--batch", "0"), "--batch: 0 is outside [1, 64]"),
    "sample-scheduler-unknown": (lambda s, k: sample_flags(s, k, "--scheduler", "heun"),
                                 "--scheduler: 'heun' is not one of dpm++, ddim, euler"),
    "sample-lora-scale-nan": (lambda s, k: ["sample", "--base", str(place(k.base, s)), "--concept",
                                            str(place(k.package, s)), "--prompt", "a <TOK>", "--lora-scale", "nan"],
                              "--lora-scale: nan is not finite"),
    "sample-lora-scale-negative": (lambda s, k: ["sample", "--base", str(place(k.base, s)), "--concept",
                                                 str(place(k.package, s)), "--prompt", "a <TOK>",
                                                 "--lora-scale", "-0.5"], "--lora-scale: -0.5 is outside [0.0, 4.0]"),
    "sample-lora-scale-on-fused-model": (lambda s, k: sample_flags(s, k, "--lora-scale", "0.5"),
                                         "--lora-scale: 0.5 would be ignored"),
    "sample-region-outside": (lambda s, k: sample_flags(s, k, "--region", "0,0,1.5,0.5:a <red-circle>"),
                              "lies outside [0, 1]"),
    "sample-region-nan": (lambda s, k: sample_flags(s, k, "--region", "nan,0,0.5,0.5:a <red-circle>"),
                          "is not finite"),
    "sample-region-three-numbers": (lambda s, k: sample_flags(s, k, "--region", "0,0,0.5:a <red-circle>"),
                                    "must be four numbers"),
    "sample-condition-weight-inf": (lambda s, k: sample_flags(
        s, k, "--condition", f"t2i-adapter:{place(k.adapter, s)}:{sketch(s / 'sketch.png')}:inf"),
        "weight: inf is not finite"),
    "sample-out-is-a-folder": (lambda s, k: [*sample_flags(s, k), "--out", str(folder(s / "dir.png"))],
                               "is a folder"),
    # sample: the scene YAML
    "yaml-not-utf8": (not_utf8, "is not UTF-8"),
    "yaml-not-yaml": (lambda s, k: sample_yaml(s, k, "prompt: [unclosed\n"), "is not valid YAML"),
    "yaml-empty": (lambda s, k: sample_yaml(s, k, ""), "must be a mapping"),
    "yaml-a-list": (lambda s, k: sample_yaml(s, k, "- prompt: a garden\n"), "must be a mapping"),
    "yaml-non-string-key": (lambda s, k: sample_yaml(s, k, "prompt: a\n1: 2\nx: 3\n"), "unknown key"),
    "yaml-guidance-inf": (lambda s, k: sample_yaml(s, k, guidance=float("inf")), "guidance: inf is not finite"),
    "yaml-steps-string": (lambda s, k: sample_yaml(s, k, steps="20"), "steps: '20' is not an integer"),
    "yaml-seed-fraction": (lambda s, k: sample_yaml(s, k, seed=1.5), "seed: 1.5 is not an integer"),
    "yaml-height-bool": (lambda s, k: sample_yaml(s, k, height=True), "height: True is not an integer"),
    "yaml-negative-number": (lambda s, k: sample_yaml(s, k, negative=3), "negative must be text"),
    "yaml-region-empty-box": (lambda s, k: sample_yaml(s, k, regions=[{"prompt": "a", "box": [0.5, 0, 0.5, 1]}]),
                              "regions[0].box [0.5, 0.0, 0.5, 1.0] is empty"),
    "yaml-region-nan-box": (lambda s, k: sample_yaml(s, k, regions=[{"prompt": "a",
                                                                      "box": [0, 0, float("nan"), 1]}]),
                            "regions[0].box [0.0, 0.0, nan, 1.0] is not finite"),
    "yaml-region-box-string": (lambda s, k: sample_yaml(s, k, regions=[{"prompt": "a", "box": "0000"}]),
                               "must be four numbers"),
    "yaml-regions-not-list": (lambda s, k: sample_yaml(s, k, regions={"prompt": "a"}), "regions must be a list"),
    "yaml-region-lacks-concept": (lambda s, k: sample_yaml(s, k, regions=[{"prompt": "a <purple-star>",
                                                                            "box": [0, 0, 0.5, 0.5]}]),
                                  "which this model lacks"),
    "yaml-condition-weight-negative": (lambda s, k: sample_yaml(s, k, conditions=[
        condition(s, k, sketch(s / "sketch.png"), weight=-1)]), "conditions[0].weight: -1 is outside [0.0, 10.0]"),
    "yaml-condition-box-weight-nan": (lambda s, k: sample_yaml(s, k, conditions=[
        condition(s, k, sketch(s / "sketch.png"), boxes=[{"box": [0, 0, 0.5, 0.5], "weight": float("nan")}])]),
        "boxes[0].weight: nan is not finite"),
    "yaml-unknown-key": (lambda s, k: sample_yaml(s, k, guidence=5.0), "unknown key 'guidence'"),
    # sample: condition images and models
    "condition-image-not-an-image": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, broken(s / "broken.png"))]), "cannot read condition image"),
    "condition-image-truncated": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, truncated_png(s / "cut.png"))]), "image file is truncated"),
    "condition-image-too-many-pixels": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, huge_png(s / "big.png", 9000, 9000))]), "9000x9000 pixels, more than the limit"),
    "condition-image-decompression-bomb": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, huge_png(s / "bomb.png", 30000, 30000))]), "too large to decode safely"),
    "condition-image-other-shape": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, sketch(s / "wide.png", (128, 64)))]), "their shapes differ"),
    "condition-image-missing": (lambda s, k: sample_yaml(s, k, conditions=[condition(s, k, s / "nope.png")]),
                                "does not exist"),
    "condition-controlnet-as-adapter": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, sketch(s / "sketch.png"), model=k.controlnet)]),
        "is not a T2IAdapter folder (its config.json names ControlNetModel); it is a ControlNetModel: use type "
        "controlnet"),
    "condition-base-as-controlnet": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, sketch(s / "sketch.png"), kind="controlnet", model=k.base)]), "has no config.json"),
    "condition-adapter-misfit": (lambda s, k: sample_yaml(s, k, conditions=[condition(
        s, k, sketch(s / "sketch.png"), model=k.adapter_misfit)]), "but this UNet's down blocks take"),
    # eval clip
    "clip-seeds-zero": (lambda s, k: clip_args(s, k, "--seeds", "0"), "--seeds: 0 is outside [1, 1000]"),
    "clip-steps-negative": (lambda s, k: clip_args(s, k, "--steps", "-2"), "--steps: -2 is outside [1, 1000]"),
    "clip-guidance-nan": (lambda s, k: clip_args(s, k, "--guidance", "nan"), "--guidance: nan is not finite"),
    "clip-size-zero": (lambda s, k: clip_args(s, k, "--size", "0"), "--size: 0 is outside [8, 4096]"),
    "clip-size-not-multiple": (lambda s, k: clip_args(s, k, "--size", "72"), "--size: 72 is not a multiple of 16"),
    "clip-scheduler-unknown": (lambda s, k: clip_args(s, k, "--scheduler", "pndm"),
                               "--scheduler: 'pndm' is not one of"),
    "clip-reference-truncated": (lambda s, k: clip_args(s, k, refs=references(s, bad=truncated_png(s / "cut.png"))),
                                 "cannot read reference image"),
    "clip-reference-bomb": (lambda s, k: clip_args(s, k, refs=references(s, bad=huge_png(s / "bomb.png", 30000,
                                                                                            30000))),
                            "too large to decode safely"),
    "clip-text-encoder-as-clip": (lambda s, k: ["eval", "clip", "--clip", str(place(k.base / "text_encoder", s)),
                                                "--model", str(place(k.fused, s)),
                                                "--concept", f"red-circle={references(s)}"],
                                  "model_type 'clip_text_model', not 'clip'"),
    "clip-concept-twice": (lambda s, k: clip_args(s, k, "--concept", f"red-circle={references(s, 'more')}"),
                           "given twice"),
    "clip-prompt-without-slot": (lambda s, k: clip_args(s, k, "--prompt", "a photo"), "exactly once"),
    "clip-json-is-a-folder": (lambda s, k: clip_args(s, k, "--json", str(folder(s / "j"))), "is a folder"),
    # eval fidelity
    "fidelity-seed-negative": (lambda s, k: fidelity_args(s, k, "--seed", "-1"), "--seed: -1 is outside"),
    "fidelity-seed-too-big": (lambda s, k: fidelity_args(s, k, "--seed", str(2**40)), "--seed: 1099511627776 is"),
    "fidelity-concept-twice": (lambda s, k: fidelity_args(s, k, packages=[k.package, k.package]), "given twice"),
    "fidelity-model-not-fused": (lambda s, k: ["eval", "fidelity", "--model", str(place(k.base, s)),
                                               "--concept", str(place(k.package, s))], "has no concepts.json"),
    "fidelity-json-is-a-folder": (lambda s, k: fidelity_args(s, k, "--json", str(folder(s / "j"))),
                                  "is a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, kit, tmp_path, monkeypatch, capsys):
    build, expect = CASES[case]
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    args = build(sandbox, kit)
    out = sandbox / "out.png"
    if args[0] == "sample" and "--out" not in args:
        args = [*args, "--out", str(out)]
    assert_clean_error(args, sandbox, expect, monkeypatch, capsys, out=out)
