"""ED-LoRA training: loss, embeddings, frozen rows, masks, reproducible packages, resume, plain mode."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from client.dataset import load_examples
from client.train import Concept, Trainer, masked_mse, prepare_concept, train_concept
from shared.atomic import staged_dir
from shared.base import load_base
from shared.package import apply_concept, read_package, save_package
from shared.sampling import generate
from tests.conftest import TOY_WORDS, tiny_config


def _concept(tiny_base, cfg, words=("<redcir1>", "<redcir2>"), cls="toy") -> tuple[Concept, torch.Generator]:
    base = load_base(tiny_base)
    gen = torch.Generator().manual_seed(cfg.seed)
    return prepare_concept(base, list(words), cls, cfg, "red", gen), gen


def test_training_lowers_the_loss(trained):
    _, losses = trained
    assert len(losses) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss first 10 {first:.4f} -> last 10 {last:.4f}")
    assert last < first


def test_layer_embeddings_differ_across_layers(trained):
    pkg, _ = trained
    meta, tensors = read_package(pkg)
    for word in meta.words:
        emb = tensors[f"emb.{word}"]
        assert emb.shape == (meta.n_layers, 32)
        assert torch.cdist(emb, emb).add(torch.eye(meta.n_layers)).min() > 0  # all rows pairwise different


def test_non_concept_rows_unchanged_and_sample_reproduces_after_save_and_load(tiny_base, toys, tmp_path):
    cfg = tiny_config(steps=4)
    concept, gen = _concept(tiny_base, cfg)
    te = concept.base.text_encoder
    n_orig = concept.embedding.first_id
    original = load_base(tiny_base).text_encoder.get_input_embeddings().weight.detach().clone()
    initial_rows = concept.embedding.rows.detach().clone()
    trainer = Trainer(concept, load_examples(toys / "red-circle"), cfg, gen)
    for _ in range(cfg.steps):
        trainer.step()
    concept.embedding.sync()
    weight = te.get_input_embeddings().weight
    assert torch.equal(weight[:n_orig], original)  # bitwise
    assert not torch.equal(concept.embedding.rows, initial_rows)
    for model in (concept.base.unet, te):
        model.eval()
    prompts = ["photo of a <redcir1> <redcir2>", "a <redcir1> <redcir2> on the grass"]
    before = generate(concept.base, concept.encoder, prompts, seed=3, steps=3, height=64, width=64)
    with staged_dir(tmp_path / "pkg") as stage:
        save_package(stage, concept.meta, concept.tensors())
    fresh = load_base(tiny_base)
    _, encoder = apply_concept(fresh, tmp_path / "pkg")
    after = generate(fresh, encoder, prompts, seed=3, steps=3, height=64, width=64)
    for a, b in zip(before, after):
        assert a.tobytes() == b.tobytes()


def test_norm_threshold_freezes_a_row(tiny_base, toys):
    cfg = tiny_config(steps=3, emb_norm_threshold=0.0)  # every row is over the threshold: nothing may move
    concept, gen = _concept(tiny_base, cfg)
    rows = concept.embedding.rows.detach().clone()
    trainer = Trainer(concept, load_examples(toys / "red-circle"), cfg, gen)
    trainer.step()
    assert torch.equal(concept.embedding.rows, rows)
    lora_moved = any(p.abs().sum() > 0 for n, p in concept.base.unet.named_parameters() if "lora_B" in n)
    assert lora_moved


def test_masked_loss_gives_zero_gradient_outside_the_mask():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:7] = 1
    masked_mse(pred, torch.randn(2, 4, 8, 8), mask).backward()
    outside = (mask == 0).expand_as(pred)
    assert torch.count_nonzero(pred.grad[outside]) == 0
    assert torch.count_nonzero(pred.grad[~outside]) == (~outside).sum()


def test_masked_training_step_and_attention_regulariser_reach_the_embedding(tiny_base, toys):
    cfg = tiny_config(steps=1, masked_loss=True, attn_reg_weight=1.0, emb_norm_threshold=None)
    concept, gen = _concept(tiny_base, cfg)
    trainer = Trainer(concept, load_examples(toys / "red-circle"), cfg, gen)
    loss = trainer.loss(*trainer.batch())
    grad = torch.autograd.grad(loss, concept.embedding.rows)[0]
    assert torch.isfinite(loss) and grad.abs().sum() > 0


def test_resume_after_interrupt_equals_an_uninterrupted_run(tiny_base, toys, tmp_path):
    words, cls = TOY_WORDS["blue-square"]
    cfg = tiny_config(steps=6, checkpoint_every=2)
    straight, _ = train_concept(tiny_base, toys / "blue-square", words, cls, tmp_path / "a", cfg, show_progress=False)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_concept(tiny_base, toys / "blue-square", words, cls, tmp_path / "b", cfg, show_progress=False,
                      on_step=interrupt)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.work" / "checkpoint.safetensors").exists()
    resumed, losses = train_concept(tiny_base, toys / "blue-square", words, cls, tmp_path / "b", cfg,
                                    show_progress=False)
    assert len(losses) == 6 and not (tmp_path / "b.work").exists()
    a, b = load_file(str(straight / "edlora.safetensors")), load_file(str(resumed / "edlora.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_lora_mode_trains_and_samples(tiny_base, toys, tmp_path):
    words, cls = TOY_WORDS["green-triangle"]
    cfg = tiny_config(steps=20, layerwise=False)
    pkg, losses = train_concept(tiny_base, toys / "green-triangle", words, cls, tmp_path / "plain", cfg,
                                show_progress=False)
    meta, tensors = read_package(pkg)
    assert not meta.layerwise
    emb = tensors[f"emb.{words[0]}"]
    assert emb.shape[0] == meta.n_layers and torch.equal(emb, emb[:1].expand_as(emb))
    base = load_base(tiny_base)
    _, encoder = apply_concept(base, pkg)
    image = generate(base, encoder, [f"a {' '.join(words)}"], steps=3, height=64, width=64)[0]
    assert image.size == (64, 64) and (pkg / "samples" / "final.png").is_file()
    shutil.rmtree(pkg)


def test_previews_checkpointing_and_bf16_autocast(tiny_base, toys, tmp_path):
    words, cls = TOY_WORDS["red-circle"]
    cfg = tiny_config(steps=4, sample_every=2, gradient_checkpointing=True, mixed_precision="bf16",
                      sample_scales=[0.0, 1.0])
    pkg, losses = train_concept(tiny_base, toys / "red-circle", ["<ckpt1>", "<ckpt2>"], cls, tmp_path / "p", cfg,
                                show_progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sorted(p.name for p in (pkg / "samples").iterdir()) == ["final.png", "step_000002.png"]
    from PIL import Image

    grid = Image.open(pkg / "samples" / "final.png")
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64  # 2 prompts x 2 scales
