"""SDXL-shaped bases: the tiny SDXL folder is a real diffusers SDXL pipeline, the one loader recognises it and
fingerprints both text encoders, and every stage (training, statistics, fusion, sampling, conditions, import,
export, evaluation) runs on it with the properties the SD 1.x suite checks."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from shared.base import load_base
from shared.errors import UserError


def test_tiny_sdxl_base_is_an_sdxl_pipeline(sdxl_base):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert max(unet.transformer_layers_per_block) > 1
    assert unet.projection_class_embeddings_input_dim == (pipe.text_encoder_2.config.projection_dim
                                                          + 6 * unet.addition_time_embed_dim)
    image = pipe("a red ball", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0


def test_load_base_recognises_sdxl_and_fingerprints_both_encoders(sdxl_base, tmp_path):
    base = load_base(sdxl_base, sdxl=True)
    assert base.arch == "sdxl" and base.text_encoder_2 is not None and base.tokenizer_2 is not None
    assert load_base(sdxl_base, sdxl=True).fingerprint == base.fingerprint
    # the same folder with one weight of the second text encoder changed: another base
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    with torch.no_grad():
        pipe.text_encoder_2.get_input_embeddings().weight[5] += 0.5
    pipe.save_pretrained(tmp_path / "changed", safe_serialization=True)
    assert load_base(tmp_path / "changed", sdxl=True).fingerprint != base.fingerprint


def test_an_sdxl_single_file_loads_as_the_same_base(sdxl_base, tmp_path):
    """`mixshow export-single-file` writes the SDXL folder in Stability's original key layout (the second text
    encoder in OpenCLIP's, q/k/v stacked); `load_base` reads it back with the folder as its config: every
    weight of every component bit for bit, hence the same fingerprint and the same image."""
    from safetensors import safe_open

    from shared.edlora import TokenMap
    from shared.ldm_export import SDXL_OPEN_CLIP_PREFIX, export_single_file
    from shared.package import layerwise_encoder
    from shared.sampling import generate

    ckpt = export_single_file(sdxl_base, tmp_path / "tiny-sdxl.safetensors")

    with safe_open(str(ckpt), "pt") as fh:
        keys = set(fh.keys())
    assert f"{SDXL_OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    folder, single = load_base(sdxl_base, sdxl=True), load_base(ckpt, config=sdxl_base, sdxl=True)
    assert single.arch == "sdxl" and single.fingerprint == folder.fingerprint
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    images = [generate(base, layerwise_encoder(base, TokenMap(1)), ["a red ball"], seed=1, steps=2, height=64,
                       width=64)[0] for base in (folder, single)]
    assert images[0].tobytes() == images[1].tobytes()


def test_verbs_without_sdxl_support_refuse_an_sdxl_base(sdxl_base):
    with pytest.raises(UserError, match="is an SDXL base"):
        load_base(sdxl_base)


def test_the_sd_tiny_base_stays_sd(tiny_base):
    assert load_base(tiny_base).arch == "sd"


def test_kohya_keys_for_sdxl_load_in_diffusers_and_give_the_same_weights(sdxl_base, tmp_path):
    """A LoRA on both text encoders and the UNet in kohya keys (`lora_te1_`, `lora_te2_`, `lora_unet_`, with
    `.alpha`): diffusers' SDXL `load_lora_weights` reads it and fusing it gives W0 + scale * B @ A everywhere."""
    from safetensors.torch import save_file

    from shared.exchange import to_kohya

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
    generator = torch.Generator().manual_seed(0)
    lora, expected = {}, {}
    for prefix, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(suffixes):
                down = torch.randn(2, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, 2, generator=generator) * 0.1
                lora[f"{prefix}.{name}.lora_A.weight"], lora[f"{prefix}.{name}.lora_B.weight"] = down, up
                expected[prefix, name] = module.weight.detach() + 0.5 * up @ down
    kohya = to_kohya(lora, 0.5, sdxl=True)
    assert {k.split("_", 2)[1] for k in kohya} == {"unet", "te1", "te2"}
    save_file(kohya, str(tmp_path / "lora.safetensors"))
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    pipe.fuse_lora()
    for (prefix, name), weight in expected.items():
        got = models[prefix].get_submodule(name)
        got = got.base_layer.weight if hasattr(got, "base_layer") else got.weight
        assert float((got.detach() - weight).norm() / weight.norm()) <= 1e-5, (prefix, name)


def _sdxl_concept(sdxl_base, layout: str, words=("<zz1>", "<zz2>")):
    """The tiny SDXL base with a concept's layer-wise tokens in both tokenizers and both embedding tables."""
    from shared.edlora import (
        LayerwiseTextEncoder,
        LayerwiseTextEncoderXL,
        TokenMap,
        add_tokens,
        layer_token_names,
        token_slots,
    )

    base = load_base(sdxl_base, sdxl=True)
    n = max(token_slots(base.unet, layout)) + 1
    tmap = TokenMap(n, {w: layer_token_names(w, n) for w in words})
    gen = torch.Generator().manual_seed(0)
    encoders = []
    for tokenizer, model in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        width = model.get_input_embeddings().weight.shape[1]
        add_tokens(tokenizer, model, tmap, {w: torch.randn(n, width, generator=gen) for w in words})
        encoders.append(LayerwiseTextEncoder(tokenizer, model, tmap, penultimate=True))
    return base, LayerwiseTextEncoderXL(*encoders), n


@pytest.mark.parametrize("layout", ["block", "module"])
def test_sdxl_layer_slices_read_their_own_tokens(sdxl_base, layout):
    """Both encoders encode each layer's copy of the prompt (penultimate hidden states, joined per token); a
    block reads only its slot's slice: per block, each block its own; per attention module, the blocks of one
    module share one. A prompt without concept words gives identical slices, and the pooled embedding is the
    second encoder's projection."""
    from shared.edlora import cross_attention_layers, install_layer_processors, sdxl_time_ids, token_slots

    base, enc, n = _sdxl_concept(sdxl_base, layout)
    layers, slots = cross_attention_layers(base.unet), token_slots(base.unet, layout)
    length = base.tokenizer.model_max_length
    width = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    assert width == base.unet.config.cross_attention_dim
    assert len(layers) > n if layout == "module" else len(layers) == n
    with torch.no_grad():
        states, pooled = enc.encode_with_pooled(["a photo of <zz1> <zz2>", "a photo of a dog"])
    assert states.shape == (2, n * length, width)
    assert pooled.shape == (2, base.text_encoder_2.config.projection_dim)
    copies = states.view(2, n, length, width)
    assert all(torch.equal(copies[1, k], copies[1, 0]) for k in range(n))
    assert all(not torch.equal(copies[0, k], copies[0, 0]) for k in range(1, n))
    install_layer_processors(base.unet, length, layout=layout)
    keys: dict[str, torch.Tensor] = {}
    hooks = [base.unet.get_submodule(f"{name}.to_k").register_forward_hook(
        lambda m, a, out, name=name: keys.__setitem__(name, out.detach().clone())) for name in layers]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"text_embeds": pooled[:1], "time_ids": sdxl_time_ids(64, 64, 1)}
    with torch.no_grad():
        base.unet(latents, 500, states[:1], added_cond_kwargs=cond)
        reference = dict(keys)
        for k in range(n):
            bumped = states[:1].clone()
            bumped[:, k * length:(k + 1) * length] += 0.5
            base.unet(latents, 500, bumped, added_cond_kwargs=cond)
            changed = [name for name in layers if not torch.equal(keys[name], reference[name])]
            assert changed == [name for name, slot in zip(layers, slots) if slot == k]
    for h in hooks:
        h.remove()


def test_sdxl_ed_lora_trains_saves_loads_and_samples_reproducibly(sdxl_base, toys, tmp_path):
    """ED-LoRA on the tiny SDXL base: the concept's tokens in both tokenizers and both embedding tables (the
    last word from the class word's row in each), LoRA on both text encoders and the UNet, the pooled embedding
    and size micro-conditioning in every step. The loss goes down; the package holds both encoders' rows; on a
    fresh base it leaves every other token row unchanged and samples the same image twice, bitwise. One token per
    block here; the fused packages below use one per attention module."""
    layout, steps = "block", 100
    from client.train import train_concept
    from shared.edlora import class_word_embedding, token_slots
    from shared.package import apply_concept, read_package
    from shared.sampling import generate
    from tests.conftest import TOY_WORDS, tiny_config

    words, cls = TOY_WORDS["red-circle"]
    pkg, losses = train_concept(sdxl_base, toys / "red-circle", words, cls, tmp_path / "pkg",
                                tiny_config(steps=steps, token_layout=layout), show_progress=False)
    assert len(losses) == steps and sum(losses[-10:]) < sum(losses[:10])
    meta, tensors = read_package(pkg)
    plain = load_base(sdxl_base, sdxl=True)
    assert meta.encoders == 2 and meta.token_layout == layout and meta.text_modules_2
    assert meta.n_layers == max(token_slots(plain.unet, layout)) + 1
    for suffix, encoder in (("", plain.text_encoder), ("_2", plain.text_encoder_2)):
        assert tensors[f"emb{suffix}.{words[0]}"].shape == (meta.n_layers, encoder.config.hidden_size)
    images = []
    for _ in range(2):
        base = load_base(sdxl_base, sdxl=True)
        _, encoder = apply_concept(base, pkg)
        for (_, tokenizer, model), (_, _, original) in zip(base.text_models(), plain.text_models()):
            count = original.get_input_embeddings().weight.shape[0]
            assert torch.equal(model.get_input_embeddings().weight[:count], original.get_input_embeddings().weight)
            assert len(tokenizer) == count + meta.n_layers * len(words)
        images.append(generate(base, encoder, [f"a photo of a {meta.phrase}"], seed=0, steps=3, height=64, width=64,
                               output_type="np"))
    assert torch.equal(torch.as_tensor(images[0]), torch.as_tensor(images[1]))
    assert float(torch.as_tensor(images[0]).std()) > 0
    # the class word's start moved in training, in each encoder
    for suffix, (_, tokenizer, model) in zip(("", "_2"), plain.text_models()):
        start = class_word_embedding(tokenizer, model, cls)
        assert not torch.allclose(tensors[f"emb{suffix}.{words[-1]}"][0], start)


def test_sdxl_train_and_stats_through_the_cli(sdxl_base, toys, tmp_path, monkeypatch, capsys):
    """`mixshow train` and `mixshow stats` on the SDXL base: the package, and Grams of the sites of both text
    encoders and of the UNet's spatial layers (cross-attention k/v stay the server's), each symmetric, positive
    semi-definite and as wide as its layer's input."""
    from shared.package import read_package
    from shared.stats_file import Stats
    from tests.test_base_and_cli import run_cli

    pkg = tmp_path / "pkg"
    code, out, err = run_cli(["train", "--base", str(sdxl_base), "--data", str(toys / "red-circle"), "--words",
                              "<xlred1> <xlred2>", "--class-word", "toy", "--out", str(pkg), "--steps", "3",
                              "--resolution", "64"], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["stats", "--base", str(sdxl_base), "--concept", str(pkg), "--samples", "1", "--steps",
                              "2"], monkeypatch, capsys)
    assert code == 0, err
    meta, _ = read_package(pkg)
    stats = Stats(pkg / "stats.safetensors")
    base = load_base(sdxl_base, sdxl=True)
    models = {"unet": base.unet} | {prefix: model for prefix, _, model in base.text_models()}
    seen = set()
    for prefix, modules in meta.lora_groups():
        for module in modules:
            if module.endswith(("attn2.to_k", "attn2.to_v")):
                continue
            d_in = models[prefix].get_submodule(module).in_features
            gram = stats.normalised(stats.key_for(prefix, module), d_in)
            assert gram.shape == (d_in, d_in) and torch.allclose(gram, gram.T)
            assert float(torch.linalg.eigvalsh(gram).min()) > -1e-6 * float(gram.diagonal().max())
            seen.add(prefix)
    assert seen == {"text_encoder", "text_encoder_2", "unet"}


@pytest.fixture(scope="module")
def sdxl_packages(sdxl_base, toys, tmp_path_factory) -> list:
    """Two concepts on the tiny SDXL base (short trainings, independent seeds, one token per attention module)
    with their statistics."""
    from client.stats import compute_stats
    from client.train import train_concept
    from tests.conftest import TOY_WORDS, tiny_config

    root = tmp_path_factory.mktemp("sdxl-packages")
    paths = []
    for seed, name in enumerate(("red-circle", "blue-square")):
        words, cls = TOY_WORDS[name]
        pkg, _ = train_concept(sdxl_base, toys / name, words, cls, root / name,
                               tiny_config(steps=20, seed=seed, token_layout="module"), show_progress=False)
        compute_stats(load_base(sdxl_base, sdxl=True), pkg, samples=1, steps=3, seed=seed, show_progress=False)
        paths.append(pkg)
    return paths


@pytest.fixture(scope="module")
def sdxl_fused(sdxl_base, sdxl_packages, tmp_path_factory):
    """The two SDXL packages fused by gradient fusion (fused LoRA in float32)."""
    from server.fuse import fuse

    folder = tmp_path_factory.mktemp("sdxl-fused") / "both"
    fuse(sdxl_base, sdxl_packages, folder, show_progress=False, lora_dtype=torch.float32)
    return folder


def _weights(model) -> dict:
    return {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}


def test_sdxl_fusion_folder_lora_closed_form_and_withdraw(sdxl_base, sdxl_packages, sdxl_fused, tmp_path):
    """Gradient fusion of two SDXL packages: the fused folder loads with plain StableDiffusionXLPipeline and
    samples through `load_fused`; fused_lora.safetensors on the base (diffusers' SDXL LoRA loader) gives the
    folder's weights in both text encoders and the UNet; a UNet spatial layer is the closed form
    (Σ W_i Ĝ_i + λ W0)(Σ Ĝ_i + λI)⁻¹ of the packages' own Grams; withdrawing one concept equals never adding it."""
    from server.fuse import fuse
    from shared.fused_model import apply_fused_lora, load_fused, read_concepts
    from shared.fusion import absolute_lam, fused_weight
    from shared.package import read_package
    from shared.sampling import generate
    from shared.stats_file import Stats

    both, one, withdrawn = sdxl_fused, tmp_path / "one", tmp_path / "withdrawn"
    assert read_concepts(both)["token_layout"] == "module"  # one token per attention module, as the packages
    pipe = StableDiffusionXLPipeline.from_pretrained(both, local_files_only=True)
    base = load_base(sdxl_base, sdxl=True)
    apply_fused_lora(base, both / "fused_lora.safetensors")
    for name, model in (("unet", base.unet), ("text_encoder", base.text_encoder),
                        ("text_encoder_2", base.text_encoder_2)):
        folder = _weights(getattr(pipe, name))
        for key, value in _weights(model).items():
            if key in folder and key.endswith("weight") and folder[key].shape == value.shape:
                assert float((value - folder[key]).norm() / folder[key].norm().clamp(min=1e-12)) <= 1e-5, key
    # closed form at one UNet self-attention projection
    plain = load_base(sdxl_base, sdxl=True)
    module = next(m for m in read_package(sdxl_packages[0])[0].unet_modules if m.endswith("attn1.to_q"))
    W0 = plain.unet.get_submodule(module).weight.detach()
    deltas, grams = [], []
    for pkg in sdxl_packages:
        meta, tensors = read_package(pkg)
        key = f"unet.{module}"
        up, down = tensors[f"{key}.lora_B.weight"].double(), tensors[f"{key}.lora_A.weight"].double()
        deltas.append(meta.lora_scale * up @ down)
        stats = Stats(pkg / "stats.safetensors")
        grams.append(stats.normalised(stats.key_for("unet", module), W0.shape[1]))
    S = sum(grams)
    expected = fused_weight(W0, deltas, grams, absolute_lam(S, 1e-4))
    got = pipe.unet.get_submodule(module).weight.detach().double()
    assert float((got - expected).norm() / (expected - W0.double()).norm()) <= 1e-4
    # withdraw == never added
    fuse(None, [], withdrawn, from_dir=both, remove=["blue-square"], show_progress=False, lora_dtype=torch.float32)
    fuse(sdxl_base, sdxl_packages[:1], one, show_progress=False, lora_dtype=torch.float32)
    a = StableDiffusionXLPipeline.from_pretrained(withdrawn, local_files_only=True)
    b = StableDiffusionXLPipeline.from_pretrained(one, local_files_only=True)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        wa, wb = _weights(getattr(a, name)), _weights(getattr(b, name))
        for key in wb:
            if key in wa and wa[key].shape == wb[key].shape:
                assert float((wa[key] - wb[key]).norm()) <= 1e-6 * max(1.0, float(wb[key].norm())), (name, key)
    fused_base, encoder, concepts = load_fused(both)
    images = [generate(fused_base, encoder, [f"a photo of a {' '.join(concepts[0]['tokens'])}"], seed=0, steps=3,
                       height=64, width=64, output_type="np") for _ in range(2)]
    assert torch.equal(torch.as_tensor(images[0]), torch.as_tensor(images[1]))


def test_sdxl_region_prompt_changes_only_its_box_and_the_cli_samples_a_scene(sdxl_fused, tmp_path, monkeypatch,
                                                                              capsys):
    """Regional sampling on the fused SDXL model: at every cross-attention block, region A's prompt moves the
    output inside A's box only (the global prompt's pooled embedding feeds the time embedding); `mixshow sample`
    renders the same scene from a YAML file."""
    import yaml

    from sample.regional import Box
    from sample.scene import Region, Scene
    from shared.fused_model import expand_prompt, load_fused
    from tests.test_base_and_cli import run_cli
    from tests.test_regional import assert_region_changes_only_its_box

    base, encoder, concepts = load_fused(sdxl_fused)
    expand = lambda t: expand_prompt(t, concepts)  # noqa: E731
    boxes = [Box(0.0, 0.0, 0.5, 0.5), Box(0.25, 0.5, 1.0, 1.0)]
    scene = Scene(prompt="a photo of a garden", negative="blurry", steps=3, height=64, width=64, seed=7,
                  regions=[Region("a <red-circle>", boxes[0]), Region("a <blue-square>", boxes[1])])
    assert_region_changes_only_its_box(base, encoder, expand, scene, boxes, "a <blue-square> on the grass")
    spec = {"model": str(sdxl_fused), "prompt": "a photo of a garden", "steps": 3, "height": 64, "width": 64,
            "regions": [{"prompt": "a <red-circle>", "box": [0.0, 0.0, 0.5, 0.5]}]}
    (tmp_path / "scene.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = run_cli(["sample", "--config", str(tmp_path / "scene.yaml"), "--out", str(tmp_path / "x.png")],
                             monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "x.png").stat().st_size > 0


def test_sdxl_conditions_t2i_adapter_and_controlnet(sdxl_base, sdxl_fused, tmp_path):
    """Conditions on SDXL: a T2I-Adapter of SDXL's layout (FullAdapterXL: four features, the last for the middle
    block) and a ControlNet with the UNet's text-time added embedding. With no regions and no concepts the
    adapter's scene is diffusers' own StableDiffusionXLAdapterPipeline; weight 0 is the plain render and
    weight 1 is not; the ControlNet's cross-attentions read the token slots of the UNet's own blocks."""
    from diffusers import ControlNetModel, StableDiffusionXLAdapterPipeline, T2IAdapter
    from PIL import Image, ImageDraw

    from sample.conditions import ConditionSpec, LoadedCondition
    from sample.scene import Scene, regional_processors, render
    from shared.edlora import LayerSliceProcessor, TokenMap
    from shared.fused_model import expand_prompt, load_fused
    from shared.package import layerwise_encoder
    from shared.sampling import initial_latents

    base = load_base(sdxl_base, sdxl=True)
    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=16,
                         adapter_type="full_adapter_xl")
    adapter.save_pretrained(tmp_path / "adapter")
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: give them weights to act
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            module.weight.normal_(0, 0.05)
    controlnet.save_pretrained(tmp_path / "controlnet")
    sketch = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(sketch).ellipse((8, 8, 40, 40), outline="white", width=3)
    sketch.save(tmp_path / "sketch.png")

    scene = Scene(prompt="a red ball", negative="blurry", steps=3, height=64, width=64, seed=2, scheduler="euler",
                  conditions=[ConditionSpec("t2i-adapter", tmp_path / "adapter", tmp_path / "sketch.png", 1.0)])
    ours = render(base, layerwise_encoder(base, TokenMap(1)), scene, output_type="np")
    pipe = StableDiffusionXLAdapterPipeline(**{**base.pipeline().components, "adapter": adapter})
    pipe.set_progress_bar_config(disable=True)
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    theirs = pipe("a red ball", negative_prompt="blurry", image=sketch, num_inference_steps=3, height=64, width=64,
                  latents=initial_latents(base, 1, 64, 64, 2), output_type="np", guidance_scale=scene.guidance,
                  adapter_conditioning_scale=1.0).images
    assert abs(ours - theirs).max() < 1e-5, abs(ours - theirs).max()

    model, encoder, concepts = load_fused(sdxl_fused)
    expand = lambda text: expand_prompt(text, concepts)  # noqa: E731
    plain = render(model, encoder, Scene(prompt="a <red-circle>", steps=3, height=64, width=64, seed=1), expand,
                   output_type="np")
    for kind, folder in (("t2i-adapter", "adapter"), ("controlnet", "controlnet")):
        renders = [render(model, encoder, Scene(prompt="a <red-circle>", steps=3, height=64, width=64, seed=1,
                                                conditions=[ConditionSpec(kind, tmp_path / folder,
                                                                          tmp_path / "sketch.png", w)]),
                          expand, output_type="np") for w in (0.0, 1.0)]
        assert (renders[0] == plain).all() and abs(renders[1] - plain).max() > 1e-4, kind
    regional_processors(model)
    loaded = LoadedCondition(ConditionSpec("controlnet", tmp_path / "controlnet", tmp_path / "sketch.png"),
                             model.unet, 8, 64, 64)
    own = model.unet.attn_processors
    slots = {n: (p.index, p.n_layers) for n, p in loaded.model.attn_processors.items() if n.endswith("attn2.processor")}
    assert slots and all(isinstance(own[n], LayerSliceProcessor) and slots[n] == (own[n].index, own[n].n_layers)
                         for n in slots)
    assert len({s for s, _ in slots.values()}) < len(slots)  # one token per attention module: blocks share slots


def test_sdxl_export_kohya_lora_and_two_encoder_embeddings_load_in_diffusers(sdxl_base, sdxl_fused, tmp_path,
                                                                             monkeypatch, capsys):
    """`mixshow export` of a fused SDXL model: kohya keys with lora_te1_ / lora_te2_ that diffusers' SDXL loader
    puts on the base as the fused folder's weights; each concept's embedding file holds clip_l and clip_g rows
    that load into their own text encoder."""
    from safetensors.torch import load_file

    from shared.exchange import collapse
    from shared.fused_model import read_fused_lora
    from tests.badinput import run_mixshow

    out = tmp_path / "kohya"
    code, _, err = run_mixshow(["export", "--model", sdxl_fused, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    keys = load_file(str(out / "lora.safetensors"))
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te1", "te2"}, sorted(keys)[:3]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name="lora.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    folder = StableDiffusionXLPipeline.from_pretrained(sdxl_fused, local_files_only=True)
    info, tensors = read_fused_lora(sdxl_fused / "fused_lora.safetensors")
    for name in ("unet", "text_encoder", "text_encoder_2"):
        adapted = sorted({k[len(name) + 1:].rsplit(".lora_", 1)[0] + ".weight" for k in tensors
                          if k.startswith(f"{name}.") and ".lora_A." in k})
        ours, theirs = dict(getattr(pipe, name).named_parameters()), dict(getattr(folder, name).named_parameters())
        assert adapted and max(float((ours[k] - theirs[k]).norm() / theirs[k].norm()) for k in adapted) <= 1e-5
    for concept in info["concepts"]:
        name = concept["name"]
        state = load_file(str(out / "embeddings" / f"{name}.safetensors"))
        assert set(state) == {"clip_l", "clip_g"}
        for key, kind, encoder, tokenizer in (("clip_l", "emb", pipe.text_encoder, pipe.tokenizer),
                                              ("clip_g", "emb_2", pipe.text_encoder_2, pipe.tokenizer_2)):
            pipe.load_textual_inversion(state[key], token=f"<{name}>", text_encoder=encoder, tokenizer=tokenizer)
            table = encoder.get_input_embeddings().weight
            ids = tokenizer.convert_tokens_to_ids([f"<{name}>"] + [f"<{name}>_{i}" for i in
                                                                   range(1, len(concept["tokens"]))])
            for row, q in zip(ids, concept["tokens"]):
                assert torch.allclose(table[row], collapse(tensors[f"{kind}.{q}"].float()).to(table), atol=1e-6)


def test_sdxl_end_to_end_fidelity_of_a_fused_model(sdxl_base, sdxl_packages, sdxl_fused, tmp_path):
    """`eval fidelity` on SDXL (both encoders' states, the pooled embedding and the size conditioning fed to the
    UNet): each concept of the fused model predicts noise nearer its own single-concept model than the base does
    (ratio < 1), and a model without a concept reports none for it."""
    from sample.evaluation import fidelity
    from server.fuse import fuse

    one = tmp_path / "red-only"
    fuse(sdxl_base, sdxl_packages[:1], one, show_progress=False, lora_dtype=torch.float32)
    results = fidelity([sdxl_fused, one], sdxl_packages, sdxl_base)
    assert set(results) == {"red-circle", "blue-square"}
    for name, row in results.items():
        assert 0 < row["both"] < 1, (name, row)
    assert 0 < results["red-circle"]["red-only"] < 1 and results["blue-square"]["red-only"] != \
        results["blue-square"]["red-only"]  # NaN: that model lacks the concept


def test_sdxl_preservation_prompts_keep_generic_prompts_closer_to_the_base(sdxl_base, sdxl_packages, sdxl_fused,
                                                                           tmp_path):
    """`fuse --preserve N` on SDXL: the generic prompts' Grams, recorded in both text encoders and the UNet,
    keep their text states (both encoders, and the pooled embedding) nearer the base's than plain fusion."""
    from server.fuse import fuse
    from server.preservation import GENERIC_PROMPTS
    from shared.edlora import TokenMap
    from shared.package import layerwise_encoder

    kept = tmp_path / "kept"
    fuse(sdxl_base, sdxl_packages, kept, preserve=4, show_progress=False, lora_dtype=torch.float32)

    def encode(folder):
        base = load_base(folder, sdxl=True)
        with torch.no_grad():
            states, pooled = layerwise_encoder(base, TokenMap(1)).encode_with_pooled(list(GENERIC_PROMPTS[:4]))
        return states, pooled

    reference = encode(sdxl_base)
    width = load_base(sdxl_base, sdxl=True).text_encoder.config.hidden_size
    drift = {}
    for name, folder in (("plain", sdxl_fused), ("preserve", kept)):
        states, pooled = encode(folder)
        gap = states - reference[0]
        drift[name] = (float(gap[..., :width].norm()), float(gap[..., width:].norm()),
                       float((pooled - reference[1]).norm()))
    assert all(p < q for p, q in zip(drift["preserve"], drift["plain"])), drift


def test_the_default_token_layout_is_per_module_on_sdxl_and_per_block_on_sd(sdxl_base, tiny_base):
    """The default ('auto') gives one token per attention module where a module holds several blocks (the
    tiny SDXL base: 11 blocks in 7 modules), and one per block on SD 1.x, where the two coincide: there the
    package records 'block', as every SD 1.x package did before."""
    from client.config import TrainConfig
    from client.train import prepare_concept
    from shared.edlora import token_slots
    from shared.errors import InvalidArgument

    assert TrainConfig().token_layout == "auto"
    for path, expected, tokens in ((sdxl_base, "module", 7), (tiny_base, "block", 7)):
        base = load_base(path, sdxl=True)
        concept = prepare_concept(base, ["<zz1>", "<zz2>"], "toy", TrainConfig(resolution=64), "z",
                                  torch.Generator().manual_seed(0))
        assert concept.meta.token_layout == concept.meta.training["token_layout"] == expected
        assert concept.meta.n_layers == max(token_slots(base.unet, expected)) + 1 == tokens
    assert len(token_slots(load_base(sdxl_base, sdxl=True).unet, "block")) == 11
    with pytest.raises(InvalidArgument, match="token_layout"):
        TrainConfig(token_layout="layer").check()
