"""ED-LoRA training: loss, embeddings, frozen rows, masks, reproducible packages, resume, plain mode,
previews, divergence; a federated client's round: seeds, one base load, resume after being killed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import shared.base
from client.config import TrainConfig
from client.dataset import load_examples
from client.round import NodeSettings, client_seed, package_for, round_train_config
from client.train import Concept, Trainer, masked_mse, prepare_concept, train_concept
from protos import mixshow_pb2 as pb
from shared.atomic import staged_dir
from shared.base import load_base
from shared.errors import UserError
from shared.package import apply_concept, read_package, save_package
from shared.sampling import generate
from tests.badinput import run_mixshow
from tests.conftest import TOY_WORDS, tiny_config

ROOT = Path(__file__).resolve().parent.parent


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


def test_unset_token_settings_follow_the_base_embedding_scale(tiny_base, toys):
    """A base whose token embeddings are k times larger gets k times the initialisation, learning rate and norm
    limit, so its tokens train the same way: the first (Adam) step moves them k times as far, and none is frozen."""
    from shared.edlora import embedding_scale

    moves, configs = {}, {}
    for k in (1.0, 20.0):
        base = load_base(tiny_base)
        with torch.no_grad():
            base.text_encoder.get_input_embeddings().weight.mul_(k)
        norm, rms = embedding_scale(base.text_encoder)
        cfg = tiny_config(steps=1, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        concept = prepare_concept(base, ["<redcir1>", "<redcir2>"], "toy", cfg, "red", gen)
        trainer = Trainer(concept, load_examples(toys / "red-circle"), cfg, gen)
        configs[k] = trainer.cfg
        assert trainer.cfg.emb_norm_threshold == pytest.approx(1.4 * norm) and concept.meta.training == \
            trainer.cfg.to_dict()
        assert concept.embedding.rows.norm(dim=-1).max() < trainer.cfg.emb_norm_threshold  # nothing frozen at step 0
        rows = concept.embedding.rows.detach().clone()
        trainer.step()
        moves[k] = (concept.embedding.rows.detach() - rows).abs()
        assert (moves[k] > 0).all()
    assert configs[20.0].lr_embedding == pytest.approx(20 * configs[1.0].lr_embedding)
    assert configs[20.0].init_std == pytest.approx(20 * configs[1.0].init_std)
    assert float(moves[20.0].mean() / moves[1.0].mean()) == pytest.approx(20, rel=0.02)
    # set explicitly, a value is kept whatever the base
    assert tiny_config(lr_embedding=1e-3).for_embeddings(50.0, 2.0).lr_embedding == 1e-3


def test_masked_loss_gives_zero_gradient_outside_the_mask():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:7] = 1
    masked_mse(pred, torch.randn(2, 4, 8, 8), mask).backward()
    outside = (mask == 0).expand_as(pred)
    assert torch.count_nonzero(pred.grad[outside]) == 0
    assert torch.count_nonzero(pred.grad[~outside]) == (~outside).sum()


def test_masked_training_step_and_attention_regulariser_reach_the_embedding(tiny_base, toys):
    cfg = tiny_config(steps=1, masked_loss=True, attn_reg_weight=1.0, emb_norm_threshold="off")
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
    assert image.size == (64, 64)
    assert sorted(p.name for p in pkg.iterdir()) == ["concept.json", "edlora.safetensors"]  # preview none
    shutil.rmtree(pkg)


def test_previews_checkpointing_and_bf16_autocast(tiny_base, toys, tmp_path):
    words, cls = TOY_WORDS["red-circle"]
    cfg = tiny_config(steps=4, preview="every 2", gradient_checkpointing=True, mixed_precision="bf16",
                      sample_scales=[0.0, 1.0], sample_prompts=2)
    pkg, losses = train_concept(tiny_base, toys / "red-circle", ["<ckpt1>", "<ckpt2>"], cls, tmp_path / "p", cfg,
                                show_progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sorted(p.name for p in (pkg / "samples").iterdir()) == ["final.png", "step_000002.png"]
    from PIL import Image

    grid = Image.open(pkg / "samples" / "final.png")
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64  # 2 prompts x 2 scales


def test_preview_settings_and_the_old_sample_every_key(tmp_path):
    from client.config import load_config

    assert TrainConfig().preview == "auto" and TrainConfig(preview=" every  5 ").preview == "every 5"
    assert TrainConfig(preview="every 5").preview_every == 5 and TrainConfig(preview="end").preview_every == 0
    config = tmp_path / "old.yaml"
    for text, preview in (("sample_every: 0\n", "end"), ("sample_every: 7\n", "every 7"), ("{}\n", "auto")):
        config.write_text(text)
        assert load_config(config, {}).preview == preview
    config.write_text("sample_every: 7\n")
    assert load_config(config, {"preview": "none"}).preview == "none"  # a flag beats the file
    config.write_text("lr_unet: 1e-4\nmixed_precision: no\n")  # YAML 1.1 reads these as a string and false
    cfg = load_config(config, {})
    assert cfg.lr_unet == 1e-4 and cfg.mixed_precision == "no"


def test_cli_without_preview_writes_no_samples_and_mentions_no_grid(tiny_base, toys, tmp_path, monkeypatch,
                                                                      capsys):
    words, cls = TOY_WORDS["green-triangle"]
    pkg = tmp_path / "pkg"
    code, out, err = run_mixshow(["train", "--base", tiny_base, "--data", toys / "green-triangle", "--words",
                                  " ".join(words), "--class-word", cls, "--out", pkg, "--steps", "2",
                                  "--resolution", "64", "--preview", "none"], monkeypatch, capsys)
    assert code == 0, err
    assert "package written to" in out and "preview grid" not in out
    assert not (pkg / "samples").exists() and not pkg.with_name("pkg.work").exists()
    assert json.loads((pkg / "concept.json").read_text())["training"]["preview"] == "none"


def test_a_diverging_training_stops_and_leaves_neither_package_nor_checkpoints(tiny_base, toys, tmp_path):
    words, cls = TOY_WORDS["red-circle"]
    cfg = tiny_config(steps=8, checkpoint_every=1, lr_unet=1e30, lr_text=1e30, lr_embedding=1e30)
    seen = []
    with pytest.raises(UserError, match="training diverged at step") as info:
        train_concept(tiny_base, toys / "red-circle", words, cls, tmp_path / "pkg", cfg, show_progress=False,
                      on_step=lambda step, loss: seen.append(step))
    assert seen and len(seen) < cfg.steps  # it ran, checkpointed, and stopped early
    assert f"step {len(seen) + 1}" in str(info.value)
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "pkg.work").exists()
    assert list(tmp_path.iterdir()) == []


def test_client_seeds_hash_the_whole_name():
    assert client_seed("client-1") != client_seed("client-2")
    assert client_seed("client-1") == client_seed("client-1") == 417203287  # stable across runs and machines
    assert len({client_seed(f"client-{i}") for i in range(200)}) == 200
    assert 0 <= client_seed("x" * 1000) < 2**32
    assert round_train_config(pb.RoundConfig(steps=40), "client-1").checkpoint_every == 4
    assert round_train_config(pb.RoundConfig(steps=5), "client-1").checkpoint_every == 1


def _node(tiny_base, toys, work_dir: Path, name: str = "client-7") -> NodeSettings:
    words, cls = TOY_WORDS["blue-square"]
    return NodeSettings(name, toys / "blue-square", words, cls, Path(tiny_base), work_dir)


@pytest.mark.slow
def test_a_client_round_loads_the_base_once(tiny_base, toys, tmp_path, monkeypatch):
    fingerprint = load_base(tiny_base).fingerprint
    loads = []
    real = shared.base._load_components

    def counted(path, config, allow_sdxl):
        loads.append(path)
        return real(path, config, allow_sdxl)

    monkeypatch.setattr(shared.base, "_load_components", counted)
    config = pb.RoundConfig(base_fingerprint=fingerprint, steps=2, resolution=64, stats_samples=1)
    node = _node(tiny_base, toys, tmp_path / "client")
    pkg, reused = package_for(config, node)
    assert not reused and (pkg / "stats.safetensors").is_file() and len(loads) == 1
    assert read_package(pkg)[0].training["seed"] == client_seed("client-7")
    (pkg / "stats.safetensors").unlink()  # trained, but killed before its statistics: only those are redone
    weights = (pkg / "edlora.safetensors").read_bytes()
    pkg, reused = package_for(config, node)
    assert not reused and (pkg / "stats.safetensors").is_file() and len(loads) == 2
    assert (pkg / "edlora.safetensors").read_bytes() == weights
    assert package_for(config, node) == (pkg, True) and len(loads) == 2  # reused: no load at all


KILLED_CLIENT = """
import sys
from pathlib import Path
import torch
from client.round import NodeSettings, package_for
from protos import mixshow_pb2 as pb
fingerprint, base, data, work, words, cls, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))  # as in the test process: the same float results
node = NodeSettings("client-7", Path(data), words.split(), cls, Path(base), Path(work))
package_for(pb.RoundConfig(base_fingerprint=fingerprint, steps=10, resolution=64, stats_samples=1), node)
"""


@pytest.mark.slow
def test_a_killed_client_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(tiny_base, toys,
                                                                                          tmp_path):
    fingerprint = load_base(tiny_base).fingerprint
    config = pb.RoundConfig(base_fingerprint=fingerprint, steps=10, resolution=64, stats_samples=1)
    killed = _node(tiny_base, toys, tmp_path / "killed")
    pkg = killed.work_dir / fingerprint[:16] / killed.name
    checkpoint = pkg.with_name(pkg.name + ".work") / "checkpoint.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tmp_path / "client.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_CLIENT), fingerprint, str(tiny_base),
                                 str(killed.data_dir), str(killed.work_dir), " ".join(killed.words),
                                 killed.class_word, str(torch.get_num_threads())],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.time() + 300
            while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert checkpoint.exists(), log.read_text()[-2000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not pkg.exists()
    with safe_open(str(checkpoint.with_suffix(".safetensors")), framework="pt") as f:
        step = json.loads(f.metadata()["checkpoint"])["step"]
    assert 0 < step < 10  # a checkpoint every step (10 // 10)

    resumed, reused = package_for(config, killed)
    assert not reused and not checkpoint.parent.exists() and (resumed / "stats.safetensors").is_file()
    assert read_package(resumed)[0].training["resumed_from"] == step
    cfg = dataclasses.replace(round_train_config(config, killed.name), preview="none")  # previews change no weight
    uninterrupted, losses = train_concept(tiny_base, killed.data_dir, killed.words, killed.class_word,
                                          tmp_path / "straight" / killed.name, cfg, show_progress=False)
    assert len(losses) == 10 and read_package(uninterrupted)[0].training["resumed_from"] == 0
    a, b = load_file(str(resumed / "edlora.safetensors")), load_file(str(uninterrupted / "edlora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
