"""Regional sampling, T2I-Adapter / ControlNet conditions and the scene CLI, on the tiny base with the
3 fused toy concepts and a tiny adapter and ControlNet built from config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from diffusers import ControlNetModel, StableDiffusionPipeline, T2IAdapter
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image, ImageDraw

from sample.conditions import ConditionSpec, LoadedCondition
from sample.regional import Box, RegionalProcessor, feature_grid
from sample.scene import Region, Scene, regional_processors, render
from shared.base import load_base
from shared.edlora import cross_attention_layers
from shared.fused_model import expand_prompt, load_fused
from shared.sampling import initial_latents
from tests.test_base_and_cli import run_cli

SIZE = 64


def build_condition_models(tiny_base, root):
    """A tiny T2I-Adapter, a tiny ControlNet (both fitting the tiny UNet), a misfit adapter and a sketch image,
    written into `root` (also used by tests/test_bad_input_sample.py)."""
    unet = load_base(tiny_base).unet
    channels = list(unet.config.block_out_channels)
    torch.manual_seed(0)
    T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=8,
               adapter_type="full_adapter").save_pretrained(root / "adapter")
    T2IAdapter(in_channels=3, channels=[c // 2 for c in channels], num_res_blocks=1, downscale_factor=8,
               adapter_type="full_adapter").save_pretrained(root / "adapter-misfit")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: give them weights to act
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            module.weight.normal_(0, 0.05)
    controlnet.save_pretrained(root / "controlnet")
    sketch = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(sketch).ellipse((8, 8, 40, 40), outline="white", width=3)
    sketch.save(root / "sketch.png")
    return root


@pytest.fixture(scope="module")
def condition_models(tiny_base, tmp_path_factory):
    return build_condition_models(tiny_base, tmp_path_factory.mktemp("conditions"))


@pytest.fixture(scope="module")
def fused(fused_three):
    return load_fused(fused_three["gradient"])


def _scene(**kw) -> Scene:
    values = dict(prompt="a photo of a garden", negative="blurry", steps=3, height=SIZE, width=SIZE, seed=7)
    values.update(kw)
    return Scene(**values)


def _inputs_of_every_cross_attention(base, encoder, scene, expand) -> dict:
    """The hidden states each cross-attention layer receives during one render (first UNet call)."""
    seen = {}
    handles = []
    for name in cross_attention_layers(base.unet):
        module = base.unet.get_submodule(name)

        def grab(mod, args, kwargs, name=name):
            seen.setdefault(name, (args[0] if args else kwargs["hidden_states"]).clone())
        handles.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        render(base, encoder, scene, expand)
    finally:
        for h in handles:
            h.remove()
    return seen


def _states(encoder, expand, prompts: list[str]) -> torch.Tensor:
    return torch.cat([encoder.encode([expand(p)]) for p in prompts], dim=1)


def test_region_prompt_changes_only_its_box(fused):
    """Isolation: at every cross-attention layer, region A's prompt moves the output inside A's box only."""
    base, encoder, concepts = fused
    expand = lambda t: expand_prompt(t, concepts)  # noqa: E731
    boxes = [Box(0.0, 0.0, 0.5, 0.5), Box(0.25, 0.5, 1.0, 1.0)]
    scene = _scene(regions=[Region("a <red-circle>", boxes[0]), Region("a <blue-square>", boxes[1])])
    assert_region_changes_only_its_box(base, encoder, expand, scene, boxes, "a <green-triangle> on the grass")


def assert_region_changes_only_its_box(base, encoder, expand, scene: Scene, boxes: list[Box], other: str) -> None:
    """At every cross-attention layer, the first region's prompt replaced by `other` moves the output inside the
    first box only."""
    inputs = _inputs_of_every_cross_attention(base, encoder, scene, expand)
    assert set(inputs) == set(cross_attention_layers(base.unet))
    layout = regional_processors(base)
    latent = initial_latents(base, 1, scene.height, scene.width, 0).shape[-2:]
    layout.set(boxes, tuple(latent))
    prompts = [scene.prompt] + [r.prompt for r in scene.regions]
    one = _states(encoder, expand, prompts)
    two = _states(encoder, expand, [prompts[0], other, *prompts[2:]])
    try:
        for name, hidden in inputs.items():
            attn = base.unet.get_submodule(name)
            h, w = feature_grid(tuple(latent), hidden.shape[1])
            inside = boxes[0].mask(h, w).flatten()
            with torch.no_grad():
                a = attn(hidden[:1], encoder_hidden_states=one)
                b = attn(hidden[:1], encoder_hidden_states=two)
            assert torch.equal(a[:, ~inside], b[:, ~inside]), name
            assert (a[:, inside] - b[:, inside]).abs().amax() > 1e-6, name
    finally:
        layout.set([], (0, 0))


def test_overlap_is_the_mean_of_the_two_regions(fused):
    base, encoder, concepts = fused
    expand = lambda t: expand_prompt(t, concepts)  # noqa: E731
    boxes = [Box(0.0, 0.0, 0.75, 0.75), Box(0.25, 0.25, 1.0, 1.0)]
    prompts = ["a photo of a garden", "a <red-circle>", "a <green-triangle>"]
    scene = _scene(regions=[Region(p, b) for p, b in zip(prompts[1:], boxes)])
    inputs = _inputs_of_every_cross_attention(base, encoder, scene, expand)
    name = cross_attention_layers(base.unet)[0]
    attn, hidden = base.unet.get_submodule(name), inputs[name][:1]
    processor = attn.processor
    assert isinstance(processor, RegionalProcessor)
    latent = tuple(initial_latents(base, 1, SIZE, SIZE, 0).shape[-2:])
    processor.layout.set(boxes, latent)
    states = _states(encoder, expand, prompts)
    try:
        with torch.no_grad():
            out = attn(hidden, encoder_hidden_states=states)
            length, span = base.tokenizer.model_max_length, states.shape[1] // 3
            k = processor.index
            regions = [AttnProcessor2_0()(attn, hidden, states[:, r * span + k * length: r * span + (k + 1) * length])
                       for r in (1, 2)]
    finally:
        processor.layout.set([], (0, 0))
    h, w = feature_grid(latent, hidden.shape[1])
    both = (boxes[0].mask(h, w) & boxes[1].mask(h, w)).flatten()
    only_first = (boxes[0].mask(h, w) & ~boxes[1].mask(h, w)).flatten()
    assert both.any() and only_first.any()
    assert torch.allclose(out[:, both], (regions[0][:, both] + regions[1][:, both]) / 2, atol=1e-6, rtol=1e-5)
    assert torch.allclose(out[:, only_first], regions[0][:, only_first], atol=1e-6, rtol=1e-5)


def test_no_regions_is_the_plain_pipeline_bitwise(tiny_base):
    """No regions: diffusers' own StableDiffusionPipeline with the same prompt and seed gives the same image."""
    from sample.models import load_scene_model

    scene = _scene(base=tiny_base)
    loaded = load_scene_model(scene, torch.device("cpu"), torch.float32)
    base = loaded.base
    ours = render(base, loaded.encoder, scene, loaded.expand, output_type="np")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    from shared.sampling import make_scheduler

    pipe.scheduler = make_scheduler(base, "dpm++")
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents(base, 1, SIZE, SIZE, scene.seed)
    plain = pipe(scene.prompt, negative_prompt=scene.negative, latents=latents, num_inference_steps=scene.steps,
                 guidance_scale=scene.guidance, height=SIZE, width=SIZE, output_type="np").images
    assert (ours == plain).all()


@pytest.mark.parametrize("kind", ["t2i-adapter", "controlnet"])
def test_condition_weights(kind, fused, condition_models):
    base, encoder, concepts = fused
    expand = lambda t: expand_prompt(t, concepts)  # noqa: E731
    model = condition_models / ("adapter" if kind == "t2i-adapter" else "controlnet")
    image = condition_models / "sketch.png"
    plain = render(base, encoder, _scene(), expand, output_type="np")
    zero = render(base, encoder, _scene(conditions=[ConditionSpec(kind, model, image, 0.0)]), expand,
                  output_type="np")
    some = render(base, encoder, _scene(conditions=[ConditionSpec(kind, model, image, 1.0)]), expand,
                  output_type="np")
    assert (zero == plain).all()
    assert abs(some - plain).max() > 1e-4
    # a box's own weight moves only that box's residuals
    box = Box(0.0, 0.5, 0.5, 1.0)
    low = LoadedCondition(ConditionSpec(kind, model, image, 1.0, [(box, 0.2)]), base.unet, 8, SIZE, SIZE)
    high = LoadedCondition(ConditionSpec(kind, model, image, 1.0, [(box, 0.9)]), base.unet, 8, SIZE, SIZE)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, base.unet.config.in_channels, SIZE // 8, SIZE // 8, generator=gen)
    text = encoder.encode(["a photo", "a photo"])
    with torch.no_grad():
        parts_low, mid_low = low.residuals(sample, torch.tensor(500), text)
        parts_high, mid_high = high.residuals(sample, torch.tensor(500), text)
    pairs = list(zip(parts_low, parts_high)) + ([(mid_low, mid_high)] if mid_low is not None else [])
    for a, b in pairs:
        inside = box.mask(*a.shape[-2:])
        assert torch.equal(a[..., ~inside], b[..., ~inside])
        assert (a[..., inside] - b[..., inside]).abs().amax() > 0


def _scene_yaml(tmp_path, fused_folder, condition_models, **extra) -> object:
    data = {"model": str(fused_folder), "prompt": "a photo of a garden", "negative": "blurry",
            "regions": [{"prompt": "a <red-circle>", "box": [0.0, 0.0, 0.5, 0.5]},
                        {"prompt": "a <blue-square>", "negative": "dark", "box": [0.0, 0.5, 0.5, 1.0]},
                        {"prompt": "a <green-triangle>", "box": [0.5, 0.25, 1.0, 0.75]}],
            "conditions": [{"type": "t2i-adapter", "model": str(condition_models / "adapter"),
                            "image": str(condition_models / "sketch.png"), "weight": 0.8,
                            "boxes": [{"box": [0.5, 0.25, 1.0, 0.75], "weight": 0.3}]}],
            "seed": 3, "steps": 3, "height": SIZE, "width": SIZE}
    data.update(extra)
    path = tmp_path / "scene.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "euler"])
def test_three_concepts_in_three_boxes_with_every_scheduler(scheduler, fused_three, condition_models, tmp_path,
                                                              monkeypatch, capsys):
    config = _scene_yaml(tmp_path, fused_three["gradient"], condition_models, scheduler=scheduler)
    code, out, err = run_cli(["sample", "--config", str(config), "--out", str(tmp_path / "scene.png")],
                             monkeypatch, capsys)
    assert code == 0, err
    image = Image.open(tmp_path / "scene.png")
    assert image.size == (SIZE, SIZE)
    # the file is exactly the library's render of the scene the YAML describes
    from sample.models import load_scene_model
    from sample.scene import read_scene

    scene = read_scene(config)
    assert [r.box for r in scene.regions] == [Box(0.0, 0.0, 0.5, 0.5), Box(0.0, 0.5, 0.5, 1.0),
                                              Box(0.5, 0.25, 1.0, 0.75)]
    assert scene.scheduler == scheduler and scene.conditions[0].weight == 0.8
    loaded = load_scene_model(scene, torch.device("cpu"), torch.float32)
    expected = render(loaded.base, loaded.encoder, scene, loaded.expand)[0]
    assert image.tobytes() == expected.tobytes()
    no_regions = Scene(**{**scene.__dict__, "regions": []})
    assert render(loaded.base, loaded.encoder, no_regions, loaded.expand)[0].tobytes() != expected.tobytes()
    overlay = Image.open(tmp_path / "scene_overlay.png").convert("RGB")
    scale = overlay.width // SIZE
    # each box's outline is drawn in its own colour at its top-left corner
    from sample.scene import COLOURS

    for i, (top, left) in enumerate([(0.0, 0.0), (0.0, 0.5), (0.5, 0.25)]):
        x, y = int(left * SIZE * scale) + 1, int(top * SIZE * scale) + 1
        assert overlay.getpixel((x, y)) == COLOURS[i], (i, overlay.getpixel((x, y)))


def test_packages_on_a_base_fuse_in_memory_like_mixshow_fuse(tiny_base, three_packages, fused_three, tmp_path,
                                                              monkeypatch, capsys):
    """`--base B --concept P1 --concept P2 --concept P3` fuses in memory with `mixshow fuse`'s defaults: the same
    scene image as from the FUSED folder of those packages; one package is applied as trained."""
    scene = ["--prompt", "a garden", "--region", "0,0,0.5,1:a <red-circle>", "--region", "0.5,0,1,1:a <blue-square>",
             "--steps", "3", "--height", str(SIZE), "--width", str(SIZE), "--seed", "5"]
    packages = [arg for p in three_packages for arg in ("--concept", str(p))]
    code, _, err = run_cli(["sample", "--base", str(tiny_base), *packages, *scene, "--out", str(tmp_path / "a.png")],
                           monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["sample", "--model", str(fused_three["gradient"]), *scene,
                            "--out", str(tmp_path / "b.png")], monkeypatch, capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    one = ["--prompt", "a <red-circle> on the grass", "--steps", "3", "--height", str(SIZE), "--width", str(SIZE)]
    code, _, err = run_cli(["sample", "--base", str(tiny_base), "--concept", str(three_packages[0]), *one,
                            "--out", str(tmp_path / "c.png")], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["sample", "--base", str(tiny_base), "--concept", str(three_packages[0]), *one[:1],
                            "a <blue-square>", *one[2:], "--out", str(tmp_path / "d.png")], monkeypatch, capsys)
    assert code == 2 and "lacks" in err and not (tmp_path / "d.png").exists()


def test_several_conditions_are_summed(fused, condition_models):
    """Two ControlNet conditions add their weighted residuals (0.5 + 0.25 = 0.75 of one at weight 1); an adapter
    beside them feeds the UNet's intra-block residuals with its own."""
    from sample.conditions import ConditionHook

    base, encoder, _ = fused
    image, net, adapter = (condition_models / "sketch.png", condition_models / "controlnet",
                           condition_models / "adapter")

    def load(kind, model, weight):
        return LoadedCondition(ConditionSpec(kind, model, image, weight), base.unet, 8, SIZE, SIZE)

    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, base.unet.config.in_channels, SIZE // 8, SIZE // 8, generator=gen)
    text = encoder.encode(["a photo", "a photo"])
    span = text.shape[1]
    with torch.no_grad():
        _, both = ConditionHook([load("controlnet", net, 0.5), load("controlnet", net, 0.25), load("t2i-adapter",
                                 adapter, 0.6)], span)._hook(base.unet, (sample, torch.tensor(300)),
                                                             {"encoder_hidden_states": text})
        one, one_mid = load("controlnet", net, 1.0).residuals(sample, torch.tensor(300), text)
        alone, _ = load("t2i-adapter", adapter, 0.6).residuals(sample, torch.tensor(300), text)
    for got, want in zip(both["down_block_additional_residuals"], one):
        assert torch.allclose(got, 0.75 * want, atol=1e-6, rtol=1e-5)
    assert torch.allclose(both["mid_block_additional_residual"], 0.75 * one_mid, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(both["down_intrablock_additional_residuals"], alone))


def test_scene_through_flags(fused_three, condition_models, tmp_path, monkeypatch, capsys):
    """The simple cases without YAML: --region and --condition flags give the same image as the YAML scene."""
    adapter, sketch = condition_models / "adapter", condition_models / "sketch.png"
    flags = ["--model", str(fused_three["gradient"]), "--prompt", "a photo of a garden", "--negative", "blurry",
             "--region", "0,0,0.5,0.5:a <red-circle>", "--condition", f"t2i-adapter:{adapter}:{sketch}:0.7",
             "--steps", "3", "--height", str(SIZE), "--width", str(SIZE), "--seed", "3"]
    code, _, err = run_cli(["sample", *flags, "--out", str(tmp_path / "flags.png")], monkeypatch, capsys)
    assert code == 0, err
    config = tmp_path / "scene.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(fused_three["gradient"]), "prompt": "a photo of a garden", "negative": "blurry",
        "regions": [{"prompt": "a <red-circle>", "box": [0, 0, 0.5, 0.5]}],
        "conditions": [{"type": "t2i-adapter", "model": str(adapter), "image": str(sketch), "weight": 0.7}],
        "steps": 3, "height": SIZE, "width": SIZE, "seed": 3}))
    code, _, err = run_cli(["sample", "--config", str(config), "--out", str(tmp_path / "yaml.png")],
                           monkeypatch, capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "flags.png").tobytes() == Image.open(tmp_path / "yaml.png").tobytes()
    assert (tmp_path / "flags_overlay.png").is_file()
    code, _, err = run_cli(["sample", "--config", str(config), "--seed", "4", "--out", str(tmp_path / "x.png")],
                           monkeypatch, capsys)
    assert code == 2 and "--seed" in err


# -- condition images in every mode Pillow opens --------------------------------------------------------------
def _gradient() -> np.ndarray:
    """(SIZE, SIZE) uint8: a ramp with every grey level present."""
    return (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 255 // (SIZE * SIZE - 1)).astype(np.uint8)


def test_sixteen_bit_condition_images_are_scaled_not_clipped(tmp_path):
    """I;16 PNGs: Pillow's convert("RGB") turns every value above 255 white; read as 16 bits they match the 8-bit
    image of the same content."""
    from sample.conditions import read_condition_image

    grey = _gradient()
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    eight = read_condition_image(tmp_path / "eight.png", SIZE, SIZE, 3)
    sixteen = read_condition_image(tmp_path / "sixteen.png", SIZE, SIZE, 3)
    assert sixteen.shape == (1, 3, SIZE, SIZE)
    assert torch.allclose(sixteen, eight, atol=1.5 / 255)
    assert float(sixteen.min()) == 0.0 and float(sixteen.mean()) < 0.6  # not clipped to white
    grey_only = read_condition_image(tmp_path / "sixteen.png", SIZE, SIZE, 1)
    assert grey_only.shape == (1, 1, SIZE, SIZE) and torch.allclose(grey_only[0, 0], sixteen[0, 0])


def test_transparent_and_cmyk_condition_images(tmp_path):
    """Transparent pixels become black (the sketch background) whatever colour they hold; opaque ones keep
    theirs; palette transparency counts too; CMYK is converted; a same-shape larger image is resized."""
    from sample.conditions import read_condition_image

    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:, : SIZE // 2, 3] = 255  # ... but only the left half is opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = read_condition_image(tmp_path / "rgba.png", SIZE, SIZE)[0]
    assert torch.all(got[0, :, : SIZE // 2] == 1.0) and torch.all(got[:, :, SIZE // 2:] == 0.0)

    palette = Image.new("P", (SIZE, SIZE), 1)
    palette.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, SIZE, SIZE // 2))  # top half: entry 0, white but transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    got = read_condition_image(tmp_path / "palette.png", SIZE, SIZE)[0]
    assert torch.all(got[:, : SIZE // 2] == 0.0)
    assert torch.all(got[1, SIZE // 2:] == 1.0) and torch.all(got[0, SIZE // 2:] == 0.0)

    Image.new("CMYK", (2 * SIZE, 2 * SIZE), (255, 0, 0, 0)).save(tmp_path / "cmyk.tif")
    got = read_condition_image(tmp_path / "cmyk.tif", SIZE, SIZE)[0]
    assert got.shape == (3, SIZE, SIZE)
    assert torch.all(got[0] == 0.0) and torch.all(got[1:] == 1.0)  # pure cyan


# -- LoRA scale through PEFT -----------------------------------------------------------------------------------
def _lora_text_encoder(tiny_base):
    """The tiny base's text encoder with a randomly initialised (non-zero) LoRA, and a batch of token ids."""
    from shared.lora import add_lora, target_modules
    from shared.names import TEXT_TARGETS

    base = load_base(tiny_base)
    model = base.text_encoder
    ids = base.tokenizer(["a photo of a toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(ids).last_hidden_state.clone()
    torch.manual_seed(0)
    add_lora(model, target_modules(model, TEXT_TARGETS), rank=4, alpha=4, init=False)
    return model, ids, plain, base.unet


def test_lora_scale_zero_is_the_base_and_previous_scales_come_back(tiny_base):
    from peft.tuners.lora import LoraLayer

    from shared.errors import InvalidArgument
    from shared.lora import lora_scale

    model, ids, plain, unet_without_lora = _lora_text_encoder(tiny_base)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers

    def out():
        with torch.no_grad():
            return model(ids).last_hidden_state

    full = out()
    assert (full - plain).abs().amax() > 1e-4  # the LoRA acts
    with lora_scale([unet_without_lora, model], 0.0):  # a model without LoRA layers is skipped
        assert torch.equal(out(), plain)  # scale 0: exactly the base model's output
    assert torch.equal(out(), full)

    for layer in layers:  # a scale set before (a caller's own): 0.3
        layer.set_scale("default", 0.3)
    before = {layer: dict(layer.scaling) for layer in layers}
    at_03 = out()
    with lora_scale([model], 0.5):
        assert all(abs(layer.scaling["default"] - 0.15 * 4 / 4) < 1e-12 for layer in layers)
        with lora_scale([model], 2.0):  # nested: multiplies the outer scale
            assert all(abs(layer.scaling["default"] - 0.3) < 1e-12 for layer in layers)
            assert torch.allclose(out(), at_03, atol=1e-6)
        assert all(abs(layer.scaling["default"] - 0.15) < 1e-12 for layer in layers)
    assert {layer: dict(layer.scaling) for layer in layers} == before  # 0.3 again, not 1.0
    assert torch.equal(out(), at_03)
    with pytest.raises(RuntimeError), lora_scale([model], 0.0):
        raise RuntimeError("inside")
    assert {layer: dict(layer.scaling) for layer in layers} == before  # restored on errors too
    with pytest.raises(InvalidArgument, match="not finite"), lora_scale([model], float("nan")):
        pass
