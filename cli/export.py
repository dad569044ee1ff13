from __future__ import annotations

from pathlib import Path

import typer

NAME = "export"


def run(model: Path = typer.Option(None, "--model", help="a FUSED folder (its fused_lora.safetensors)"),
        concept: Path = typer.Option(None, "--concept", help="a concept package"),
        fmt: str = typer.Option("kohya", "--format", help="kohya (AUTOMATIC1111, ComfyUI, kohya's scripts) | "
                                                          "diffusers"),
        collapse: str = typer.Option("mean", "--collapse", help="how a word's layer-wise tokens become one embedding: "
                                                                "mean | middle (the middle layer's)"),
        out: Path = typer.Option(..., "--out", help="folder to create")) -> None:
    """Export a fused model's or a package's LoRA in kohya or diffusers keys, with each concept's tokens as
    textual-inversion files and a note of the trigger words to type."""
    from rich import print

    from shared.atomic import check_fresh_output, staged_dir
    from shared.errors import UserError
    from shared.exchange import LORA_NAMES, exported, split_lora_and_embeddings
    from shared.fused_model import LORA_FILE, read_fused_lora
    from shared.package import EMBEDDING_KINDS, read_package
    from shared.tensor_files import save_tensors

    if (model is None) == (concept is None):
        raise UserError("give exactly one of --model FUSED and --concept PKG")
    check_fresh_output(out, "out")
    if model is not None:
        info, tensors = read_fused_lora(Path(model) / LORA_FILE)
        concepts = [(c["name"], list(c["tokens"])) for c in info["concepts"]]
        scale, source = 1.0, f"fused model {model}"
    else:
        meta, tensors = read_package(concept)
        concepts = [(meta.name, meta.words)]
        scale, source = meta.lora_scale, f"package {concept}"
    lora, sdxl = split_lora_and_embeddings(tensors)
    kinds = EMBEDDING_KINDS[:1 + sdxl]
    words = [(name, {kind: [tensors[f"{kind}.{w}"] for w in ws] for kind in kinds}) for name, ws in concepts]
    lora_out, embeddings = exported(lora, scale, words, fmt, collapse, sdxl)
    with staged_dir(out) as stage:
        save_tensors(stage / LORA_NAMES[fmt], lora_out, {"format": "pt", "mixshow_source": source})
        lines = [f"LoRA: {LORA_NAMES[fmt]} ({fmt} keys{', alpha = scale x rank' if fmt == 'kohya' else ''}), "
                 f"from {source}.",
                 f"Textual-inversion embeddings: embeddings/<trigger>.safetensors. Each concept's layer-wise "
                 f"tokens are collapsed into one embedding per word ({collapse} over the layers): these tools give "
                 "every cross-attention layer the same text embedding.", "", "Trigger words to type:"]
        for name, tensors_ti in embeddings.items():
            save_tensors(stage / "embeddings" / f"{name}.safetensors", tensors_ti, {"mixshow_collapse": collapse})
            loader = (f"pipe.load_textual_inversion(file, token='<{name}>')" if not sdxl else
                      f"pipe.load_textual_inversion(state['clip_l'], token='<{name}>', text_encoder=pipe.text_encoder, "
                      f"tokenizer=pipe.tokenizer) and the same with state['clip_g'], pipe.text_encoder_2, "
                      "pipe.tokenizer_2")
            lines.append(f"  {name}   (AUTOMATIC1111: embeddings/{name}.safetensors, type '{name}'; ComfyUI: "
                         f"'embedding:{name}'; diffusers: {loader})")
        (stage / "triggers.txt").write_text("\n".join(lines) + "\n")
    print(f"exported {len(embeddings)} concept(s) from {source} to {out} ({fmt}); trigger words in "
          f"{out / 'triggers.txt'}")
