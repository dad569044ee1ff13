"""Statistics and fusion on trained toy concepts: quality, exactness of the outputs, add/withdraw, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from client.stats import compute_stats
from sample.evaluation import fidelity
from server.fuse import fuse
from server.report import table_of
from shared.base import load_base
from shared.fused_model import apply_fused_lora, load_fused
from shared.grams import GramRecorder
from shared.package import apply_concept
from shared.stats_file import Stats
from tests.conftest import tiny_config
from tests.test_base_and_cli import run_cli


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for sub in ("unet", "text_encoder"):
        path = next((folder / sub).glob("*.safetensors"))
        out.update({f"{sub}.{k}": v for k, v in load_file(str(path)).items()})
    return out


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in a)


def _max_change_rel(a: dict, ref: dict, base: dict) -> float:
    """max over fused layers of ||a - ref|| / ||ref - W0||: an error measured against what fusion changed."""
    changed = [k for k in ref if k in base and ref[k].shape == base[k].shape and not torch.equal(ref[k], base[k])]
    assert changed
    return max(float((a[k] - ref[k]).norm() / (ref[k] - base[k]).norm()) for k in changed)


def test_recorded_gram_equals_brute_force(tiny_base, three_packages):
    base = load_base(tiny_base)
    _, encoder = apply_concept(base, three_packages[0])
    site = "encoder.layers.2.self_attn.q_proj"
    seen = []
    hook = base.text_encoder.get_submodule(site).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with GramRecorder(base.text_encoder, [site]) as rec:
        encoder.encode(["photo of a <redcir1> <redcir2>", "a <redcir1> <redcir2> on the grass"])
    hook.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    assert rec.rows[site] == x.shape[0] == 2 * 7 * 77
    assert torch.allclose(rec.grams[site], x.T @ x, rtol=1e-12, atol=1e-9)


def test_stats_file_layout(three_packages):
    stats = Stats(three_packages[0] / "stats.safetensors")
    unet_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    key = stats.key_for("unet", f"{unet_q}.to_v")
    assert key == f"gram.unet.{unet_q}.to_q" and stats.rows(key) > 0
    assert stats.key_for("unet", f"{unet_q.replace('attn1', 'attn2')}.to_q").endswith("attn2.to_q")
    with pytest.raises(Exception, match="no Gram"):
        stats.key_for("unet", f"{unet_q.replace('attn1', 'attn2')}.to_k")  # text side: the server's job
    assert stats.normalised(key, 32).shape == (32, 32)


@pytest.mark.slow
def test_packings(tiny_base, three_packages, tmp_path, capsys):
    """Against fusion from the recorded float64 Grams: tri32 holds full32's numbers; lowrank32 is exact to
    float32 rounding; tri16 keeps each Gram within 1e-3 and PSD; the default `compact` keeps the fused
    weights, and their change, within 1e-3 on the tiny base's ill-conditioned Grams, where tri16 alone moves
    the change by ~6% and even the literal full32 by ~1e-3, and is no bigger than full32."""
    sizes, folders = {}, {}
    for packing in ("full64", "full32", "tri32", "tri24", "tri16", "lowrank32", "compact"):
        packed = []
        for seed, pkg in enumerate(three_packages):
            copy = tmp_path / packing / pkg.name
            shutil.copytree(pkg, copy)
            compute_stats(load_base(tiny_base), copy, samples=2, steps=10, seed=seed, packing=packing,
                          show_progress=False)
            packed.append(copy)
        sizes[packing] = (packed[0] / "stats.safetensors").stat().st_size
        folders[packing] = packed
    # at the tiny base's widths (32-64) the header and the per-row scales weigh in; SD 1.5: bench/fusion.py
    assert sizes["tri32"] < 0.6 * sizes["full32"] and sizes["tri16"] < 0.4 * sizes["full32"]
    assert sizes["compact"] <= max(sizes["tri16"], sizes["lowrank32"])
    stats = {packing: Stats(folders[packing][0] / "stats.safetensors") for packing in folders}
    exact = stats["full32"]
    for key in sorted(k for k in exact.keys if k.startswith("gram.")):
        d = exact.dim(key)
        reference = exact.normalised(key, d)
        assert torch.equal(stats["tri32"].normalised(key, d), reference)
        assert float((stats["lowrank32"].normalised(key, d) - reference).norm() / reference.norm()) <= 1e-6
        approx = stats["tri16"].normalised(key, d)
        assert float((approx - reference).norm() / reference.norm()) <= 1e-3
        eigen = torch.linalg.eigvalsh(approx)
        assert float(eigen.min()) >= -1e-12 * float(eigen.max())  # PSD up to float64 rounding
        assert stats["compact"].encoding(key) in ("lowrank32", "tri16", "tri24", "tri32")
    for packing in folders:
        fuse(tiny_base, folders[packing], tmp_path / f"fused-{packing}", show_progress=False)
    reference, base = _weights(tmp_path / "fused-full64"), _weights(tiny_base)
    fused = {packing: _weights(tmp_path / f"fused-{packing}") for packing in folders}
    of_weight = {packing: _max_rel(fused[packing], reference) for packing in folders}
    of_change = {packing: _max_change_rel(fused[packing], reference, base) for packing in folders}
    with capsys.disabled():
        print("\nfused weights vs the float64 Grams (full64), max over layers of ||W - W_64|| / ||W_64|| "
              "(and / ||W_64 - W0||), "
              "bytes of one stats file: " + ", ".join(f"{p} {of_weight[p]:.1e} ({of_change[p]:.1e}) {sizes[p]:,} B"
                                                       for p in folders))
    assert of_weight["tri32"] == of_weight["full32"]  # the same float32 numbers
    assert of_weight["compact"] <= 1e-3 and of_change["compact"] <= 1e-3
    assert sizes["compact"] <= sizes["tri32"] and of_change["compact"] < of_change["full32"]


def test_gradient_beats_average_for_every_concept(fused_three, three_packages, capsys):
    report = json.loads((fused_three["gradient"] / "fusion_report.json").read_text())
    Console(force_terminal=False, width=120).print(table_of(report))
    results = fidelity([fused_three["gradient"], fused_three["average"]], three_packages)
    with capsys.disabled():
        print()
        Console(width=120).print(table_of(report))
        for name, row in results.items():
            print(f"end-to-end {name}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    for name, entry in report["concepts"].items():
        assert entry["mean"]["fused"] < entry["mean"]["average"], name
        assert results[name]["gradient"] < results[name]["average"], name
    assert (fused_three["gradient"] / "fusion_report.png").stat().st_size > 10_000


def test_fused_folder_loads_plainly_and_fused_lora_gives_same_weights_and_image(tiny_base, fused_three, tmp_path,
                                                                               monkeypatch, capsys):
    folder = fused_three["gradient"]
    plain = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    image = plain("a photo of a red-circle/<redcir1>_0", num_inference_steps=2, height=64, width=64,
                  output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    fused_base, _, _ = load_fused(folder)
    lora_base = load_base(tiny_base)
    apply_fused_lora(lora_base, folder / "fused_lora.safetensors")
    for name in ("unet", "text_encoder"):
        a = dict(getattr(fused_base, name).named_parameters())
        b = dict(getattr(lora_base, name).named_parameters())
        # the folder is W0 + ΔW rounded once from float64; diffusers merges the LoRA in float32
        assert max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a) <= 1e-6
    assert fused_base.tokenizer.get_vocab() == lora_base.tokenizer.get_vocab()
    prompt = "a <red-circle> next to a <blue-square>"
    common = ["--prompt", prompt, "--steps", "3", "--height", "64", "--width", "64", "--seed", "2"]
    assert run_cli(["sample", "--model", str(folder), *common, "--out", str(tmp_path / "m.png")],
                   monkeypatch, capsys)[0] == 0
    assert run_cli(["sample", "--base", str(tiny_base), "--fused-lora", str(folder / "fused_lora.safetensors"),
                    *common, "--out", str(tmp_path / "l.png")], monkeypatch, capsys)[0] == 0
    m, lo = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("m", "l"))
    assert np.abs(m - lo).max() <= 1, "the two ways of loading the fused model give different images"


def test_add_then_remove_and_from_plus_add(tiny_base, three_packages, fused_three, tmp_path):
    first_two = three_packages[:2]
    fuse(tiny_base, first_two, tmp_path / "two", show_progress=False)
    report = fuse(None, [three_packages[2]], tmp_path / "two+1", from_dir=tmp_path / "two", show_progress=False)
    assert _max_rel(_weights(tmp_path / "two+1"), _weights(fused_three["gradient"])) <= 1e-6
    # the concepts read back from the state report their layers in model order, as the one added now and as a
    # fusion from scratch do (the chart's lines run over the same layers)
    scratch = json.loads((fused_three["gradient"] / "fusion_report.json").read_text())["concepts"]
    for name, entry in report["concepts"].items():
        assert list(entry["layers"]) == list(scratch[name]["layers"]), name
    fuse(None, [], tmp_path / "back", from_dir=fused_three["gradient"], remove=["green-triangle"],
         show_progress=False)
    assert _max_rel(_weights(tmp_path / "back"), _weights(tmp_path / "two")) <= 1e-6
    vocab = load_base(tmp_path / "back").tokenizer.get_vocab()
    assert vocab == load_base(tmp_path / "two").tokenizer.get_vocab()
    assert not any(t.startswith("green-triangle/") for t in vocab)
    names = [c["name"] for c in json.loads((tmp_path / "back" / "concepts.json").read_text())["concepts"]]
    assert names == ["red-circle", "blue-square"]


def test_the_fusion_state_keeps_each_concept_in_one_buffer_per_kind_and_round_trips(tiny_base, three_packages,
                                                                                      fused_three, tmp_path):
    """What a server holds per concept is its numbers, not ten thousand small tensors at fifty concepts: each
    concept's terms are views of one buffer per kind, its stats share the alias table of the others, and the
    state saved and loaded again is the same numbers bit for bit."""
    from server.fuse import module_dims, read_source
    from server.state import FusionState

    base = load_base(tiny_base)
    state, sources = FusionState(), [read_source(p, base, True) for p in three_packages]
    for src in sources:
        tensors = dict(src.tensors)
        terms = state.add(src.meta, src.tensors, src.stats, 1.0, module_dims(base))
        for kind in ("up", "down", "agram"):
            views = list(getattr(terms, kind).values())
            assert len(views) > 10 and len({v.untyped_storage().data_ptr() for v in views}) == 1
        qual = next(iter(terms.down))
        assert torch.equal(terms.down[qual], tensors[f"{qual}.lora_A.weight"].double())
        assert torch.equal(terms.up[qual], src.meta.lora_scale * tensors[f"{qual}.lora_B.weight"].double())
    assert sources[0].stats.aliases is sources[1].stats.aliases  # the same layers: one table
    state.save(tmp_path / "state.safetensors", {})
    again, _ = FusionState.load(tmp_path / "state.safetensors")
    flip_data_in_place(tmp_path / "state.safetensors")  # what was loaded is the loader's own copy
    assert again.names() == state.names()
    for a, b in zip(state.concepts, again.concepts):
        for kind in ("up", "down", "agram", "emb"):
            assert sorted(getattr(a, kind)) == sorted(getattr(b, kind))
            assert all(torch.equal(getattr(a, kind)[k], getattr(b, kind)[k]) for k in getattr(a, kind))
    # and the file is the one `mixshow fuse` wrote for the same three packages, byte for byte
    state.save(tmp_path / "again.safetensors", fused_three_state_info(fused_three))
    assert (tmp_path / "again.safetensors").read_bytes() == (fused_three["gradient"] /
                                                             "fusion_state.safetensors").read_bytes()


def test_a_read_package_owns_its_tensors(three_packages, tmp_path):
    """The tensors of a package are the server's own copies: rewriting the file in place afterwards changes none of
    them (what was checked is what is fused), and the file is not kept mapped by a fused concept's embedding rows."""
    from shared.package import read_package

    pkg = tmp_path / "pkg"
    shutil.copytree(three_packages[0], pkg)
    weights = pkg / "edlora.safetensors"
    meta, tensors = read_package(pkg)
    kept = {key: tensor.clone() for key, tensor in tensors.items()}
    flip_data_in_place(weights)
    assert all(torch.equal(tensors[key], kept[key]) for key in kept)
    maps = Path("/proc/self/maps")
    if maps.is_file():
        assert str(weights) not in maps.read_text()


def flip_data_in_place(path: Path) -> None:
    """Invert every data byte of a safetensors file, keeping its header and its inode."""
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    with path.open("r+b") as f:
        f.seek(header)
        f.write(bytes(b ^ 0xFF for b in raw[header:]))


def fused_three_state_info(fused_three) -> dict:
    from safetensors import safe_open

    with safe_open(str(fused_three["gradient"] / "fusion_state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["info"])


@pytest.mark.slow
def test_identical_words_both_survive(tiny_base, toys, tmp_path):
    from client.train import train_concept

    pkgs = []
    for seed, (name, data) in enumerate((("dog-a", "red-circle"), ("dog-b", "blue-square"))):
        pkg, _ = train_concept(tiny_base, toys / data, ["<dog1>", "<dog2>"], "dog", tmp_path / name,
                               tiny_config(steps=30, seed=seed), show_progress=False)
        compute_stats(load_base(tiny_base), pkg, samples=1, steps=5, show_progress=False)
        pkgs.append(pkg)
    fuse(tiny_base, pkgs, tmp_path / "fused", show_progress=False)
    base, encoder, concepts = load_fused(tmp_path / "fused")
    assert [c["name"] for c in concepts] == ["dog-a", "dog-b"]
    from shared.fused_model import expand_prompt
    from shared.sampling import generate

    images = [generate(base, encoder, [expand_prompt(f"a photo of a <{n}>", concepts)], seed=1, steps=3,
                       height=64, width=64)[0] for n in ("dog-a", "dog-b")]
    assert images[0].tobytes() != images[1].tobytes()


def _spoil_stats(pkg, change):
    """Rewrite the package's stats in the documented full32 layout ([d, d] float32 Grams, its metadata)
    with `change` applied to the first UNet Gram (the real writer refuses to write a spoiled Gram)."""
    from safetensors.torch import save_file

    path = pkg / "stats.safetensors"
    stats = Stats(path)
    keys = sorted(k for k in stats.keys if k.startswith("gram."))
    grams = {k: (stats.normalised(k, stats.dim(k)) * stats.rows(k)).float() for k in keys}
    key = next(k for k in keys if k.startswith("gram.unet."))
    grams[key] = change(grams[key]).contiguous()
    meta = {k: v for k, v in stats.meta.items() if k.startswith(("rows.", "alias.")) or k in ("format", "info")}
    save_file(grams, str(path), metadata={**meta, "packing": "full32"})


BAD = {
    "missing stats": (lambda p: (p / "stats.safetensors").unlink(), "is missing"),
    "truncated stats": (lambda p: (p / "stats.safetensors").write_bytes((p / "stats.safetensors").read_bytes()[:999]),
                        "damaged"),
    "gram wrong shape": (lambda p: _spoil_stats(p, lambda g: g[:-1, :-1].contiguous()), "shape"),
    "gram nan": (lambda p: _spoil_stats(p, lambda g: g.index_fill(0, torch.tensor([0]), float("nan"))), "NaN"),
    "gram not symmetric": (lambda p: _spoil_stats(p, lambda g: g + torch.triu(torch.ones_like(g)) * g.abs().max()),
                           "not symmetric"),
    "gram not psd": (lambda p: _spoil_stats(p, lambda g: g - 10 * g.diagonal().max() * torch.eye(g.shape[0])),
                     "not positive semi-definite"),
    "lora shape": (lambda p: _spoil_lora(p), "LoRA of"),
    "other base": (lambda p: _spoil_meta(p, "base_fingerprint", "0" * 64), "trained on base"),
}


def _spoil_lora(pkg):
    tensors = load_file(str(pkg / "edlora.safetensors"))
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, str(pkg / "edlora.safetensors"))


def _spoil_meta(pkg, key, value):
    meta = json.loads((pkg / "concept.json").read_text())
    meta[key] = value
    (pkg / "concept.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", list(BAD))
def test_fuse_bad_input(case, tiny_base, three_packages, tmp_path, monkeypatch, capsys):
    spoil, message = BAD[case]
    broken = tmp_path / "broken"
    shutil.copytree(three_packages[1], broken)
    spoil(broken)
    out = tmp_path / "fused"
    code, _, err = run_cli(["fuse", "--base", str(tiny_base), "--concept", str(three_packages[0]), "--concept",
                            str(broken), "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert not out.exists() and not list(tmp_path.glob(".fused*"))


def test_remove_unknown_name(fused_three, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["fuse", "--from", str(fused_three["gradient"]), "--remove", "nobody", "--out",
                            str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2 and "no concept of that name" in err and not (tmp_path / "x").exists()


def test_cli_fuse_prints_the_table(tiny_base, three_packages, fused_three, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["fuse", "--base", str(tiny_base), *sum((["--concept", str(p)] for p in three_packages),
                                                                      []), "--out", str(tmp_path / "f")],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "identity loss" in out and "red-circle" in out
    # the CLI's fusion is the library's: the same weights as fuse() with its defaults, and the table shows the
    # report it wrote
    assert _max_rel(_weights(tmp_path / "f"), _weights(fused_three["gradient"])) <= 1e-6
    report = json.loads((tmp_path / "f" / "fusion_report.json").read_text())
    mean = report["concepts"]["red-circle"]["mean"]["fused"]
    assert f"{mean:.4f}" in out


def test_preserve_keeps_generic_prompts_closer_to_the_base(tiny_base, three_packages, fused_three, tmp_path):
    from server.preservation import GENERIC_PROMPTS
    from shared.edlora import LayerwiseTextEncoder, TokenMap

    fuse(tiny_base, three_packages, tmp_path / "kept", preserve=4, show_progress=False)

    def encode(folder):
        base = load_base(folder)
        enc = LayerwiseTextEncoder(base.tokenizer, base.text_encoder, TokenMap(1))
        with torch.no_grad():
            return enc.encode(list(GENERIC_PROMPTS[:4]))

    reference = encode(tiny_base)
    drift = {name: float((encode(folder) - reference).norm()) for name, folder in
             (("plain", fused_three["gradient"]), ("preserve", tmp_path / "kept"))}
    assert drift["preserve"] < drift["plain"], drift
    assert json.loads((tmp_path / "kept" / "concepts.json").read_text())["preserve"] == 4


def test_text_side_row_form_matches_the_cholesky_form(tiny_base, three_packages, tmp_path, monkeypatch):
    """--kv-rows concept leaves fewer text rows than the width: the n x n row solve gives the d x d one's weights."""
    from server.fuse import Fusion

    calls = []
    original = Fusion.solve_site

    def spy(self, site_key, modules, S, grams=None, rows=None, extra=None):
        if rows:
            calls.append(sum(x.shape[0] for x in rows.values()) + (0 if extra is None else extra.shape[0]) < S.shape[0])
        return original(self, site_key, modules, S, grams, rows, extra)

    monkeypatch.setattr(Fusion, "solve_site", spy)
    fuse(tiny_base, three_packages[:1], tmp_path / "rows", kv_rows="concept", show_progress=False)
    assert calls and all(calls)  # every cross-attention site went through the row form
    monkeypatch.setattr(Fusion, "row_form", False)
    fuse(tiny_base, three_packages[:1], tmp_path / "cholesky", kv_rows="concept", show_progress=False)
    assert _max_rel(_weights(tmp_path / "rows"), _weights(tmp_path / "cholesky")) <= 1e-6


def test_cross_attention_kv_is_the_closed_form_of_the_fused_encoders_rows(tiny_base, three_packages, fused_three):
    """The k/v layers, whose inputs the server streams one concept at a time into per-slot Grams (154 text rows
    per concept against a width of 32: the Gram form), equal (Σ W_i Ĝ_i + λ W0)(Σ Ĝ_i + λI)⁻¹ with each Ĝ_i
    recomputed here from the fused folder's own text encoder on the concept's prompts."""
    from server.fuse import qualified_prompts
    from shared.edlora import cross_attention_layers, token_slots
    from shared.fusion import absolute_lam, fused_weight
    from shared.package import read_package

    folder = fused_three["gradient"]
    fused_base, encoder, concepts = load_fused(folder)
    plain = load_base(tiny_base)
    length = fused_base.tokenizer.model_max_length
    layers = cross_attention_layers(plain.unet)
    slots = token_slots(plain.unet)
    packages = [read_package(p) for p in three_packages]
    checked = 0
    for index in (0, len(layers) - 1):
        module = f"{layers[index]}.to_v"
        W0 = plain.unet.get_submodule(module).weight.detach().double()
        deltas, grams = [], []
        for record, (meta, tensors) in zip(concepts, packages):
            with torch.no_grad():
                states = encoder.encode(qualified_prompts(record)).double()
            x = states[:, slots[index] * length:(slots[index] + 1) * length].reshape(-1, states.shape[-1])
            assert x.shape[0] > x.shape[1]  # more rows than width: not the row form
            grams.append(x.T @ x / x.shape[0])
            key = f"unet.{module}"
            up, down = tensors[f"{key}.lora_B.weight"].double(), tensors[f"{key}.lora_A.weight"].double()
            deltas.append(meta.lora_scale * up @ down)
        expected = fused_weight(W0, deltas, grams, absolute_lam(sum(grams), 1e-4))
        got = fused_base.unet.get_submodule(module).weight.detach().double()
        assert float((got - expected).norm() / (expected - W0).norm()) <= 1e-4, module
        checked += 1
    assert checked == 2


@pytest.mark.parametrize("count", [3, 50])
def test_the_report_chart_keeps_its_layout_with_many_concepts(count, tmp_path):
    """The chart of a 50-concept round: no layout warning (one legend entry per concept made matplotlib give up
    its layout), and the figure widens with the concepts so that each bar group keeps its width."""
    import warnings

    from PIL import Image

    from server.report import IdentityReport

    report = IdentityReport("gradient", 1e-4, [], {}, lambda name, qual: None, set())
    layers = {f"unet.layer{j}": {"fused": 0.01 * j, "average": 0.02 * j, "sum": 0.5} for j in range(12)}
    report.data = {"method": "gradient", "lam": 1e-4, "columns": ["fused", "average", "sum"], "concepts": {
        f"concept-{i:02d}": {"mean": {"fused": 0.1, "average": 0.5, "sum": 0.9}, "layers": layers, "complete": True}
        for i in range(count)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.plot(tmp_path / "report.png")
    width = Image.open(tmp_path / "report.png").size[0]
    assert width >= 13 * 90 and (count < 30 or width > 20 * 90)


def test_own_preservation_prompts_are_recorded_kept_by_an_update_and_pull_the_fusion_to_the_base(
        tiny_base, three_packages, fused_three, tmp_path):
    """`preserve_prompts`: the fusion records the prompts it preserved; adding a concept to it gives the weights
    of a fusion from scratch with the same prompts; and on those prompts the text encoder stays nearer the base
    than without them."""
    from shared.edlora import LayerwiseTextEncoder, TokenMap

    prompts = ["a photo of a dog on the grass", "a blue house at night", "a painting of a tree"]
    fuse(tiny_base, three_packages[:2], tmp_path / "two", preserve=3, preserve_prompts=prompts, show_progress=False)
    fuse(None, [three_packages[2]], tmp_path / "two+1", from_dir=tmp_path / "two", show_progress=False)
    fuse(tiny_base, three_packages, tmp_path / "three", preserve=3, preserve_prompts=prompts, show_progress=False)
    for folder in ("two", "two+1", "three"):
        info = json.loads((tmp_path / folder / "concepts.json").read_text())
        assert (info["preserve"], info["preserve_prompts"]) == (3, prompts), folder
    assert _max_rel(_weights(tmp_path / "two+1"), _weights(tmp_path / "three")) <= 1e-6
    assert _max_rel(_weights(tmp_path / "three"), _weights(fused_three["gradient"])) > 1e-3  # they did count

    def encode(folder):
        base = load_base(folder)
        with torch.no_grad():
            return LayerwiseTextEncoder(base.tokenizer, base.text_encoder, TokenMap(1)).encode(prompts)

    reference = encode(tiny_base)
    drift = {name: float((encode(folder) - reference).norm()) for name, folder in
             (("plain", fused_three["gradient"]), ("preserve", tmp_path / "three"))}
    assert drift["preserve"] < drift["plain"], drift


def test_an_update_gives_a_new_concepts_new_layers_the_preservation_grams_too(tiny_base, toys, three_packages,
                                                                            tmp_path):
    """A concept added to a preserving fusion adapts layers no earlier concept did (the feed-forward layers):
    the update samples the recorded prompts, at the recorded size, for those sites alone, and ends where a
    fusion from scratch of the three with the same prompts does."""
    from client.stats import compute_stats
    from client.train import train_concept
    from shared.names import UNET_TARGETS
    from tests.conftest import tiny_config

    words, cls = ["<gretri1>", "<gretri2>"], "cube"
    pkg, _ = train_concept(tiny_base, toys / "green-triangle", words, cls, tmp_path / "green-triangle",
                           tiny_config(steps=20, seed=2, unet_targets=[*UNET_TARGETS, "ff.net.0.proj", "ff.net.2"]),
                           show_progress=False)
    compute_stats(load_base(tiny_base), pkg, samples=2, steps=10, seed=2, show_progress=False)
    prompts = ["a photo of a dog on the grass", "a blue house at night"]
    fuse(tiny_base, three_packages[:2], tmp_path / "two", preserve=2, preserve_prompts=prompts, show_progress=False)
    fuse(None, [pkg], tmp_path / "two+ff", from_dir=tmp_path / "two", show_progress=False)
    fuse(tiny_base, [*three_packages[:2], pkg], tmp_path / "scratch", preserve=2, preserve_prompts=prompts,
         show_progress=False)
    assert json.loads((tmp_path / "two+ff" / "concepts.json").read_text())["preserve_resolution"] == 64
    assert _max_rel(_weights(tmp_path / "two+ff"), _weights(tmp_path / "scratch")) <= 1e-6
