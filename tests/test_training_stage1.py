"""Stage-1 trainer: it learns, data parallelism is exact, and a killed run resumes losing nothing.

Runs on the upstream-written tiny checkpoint (random weights, 128 px) and the committed sample
split, a few steps each, one CPU thread per process so results are bit-reproducible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cooper_model.tokenizer import byte_level_tokenizer
from training.engine import DataOrder, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "reference" / "bagel-tiny-ckpt"
SAMPLE = ROOT / "training" / "data" / "sample"
ACCELERATE_2PROC = ROOT / "training" / "configs" / "accelerate" / "cpu_2proc.yaml"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    byte_level_tokenizer().save_pretrained(str(d))
    return d


def stage1_args(out: Path, tokenizer_dir: Path, **kw) -> list[str]:
    opts = dict(output_dir=out, init_from=TINY, tokenizer=tokenizer_dir, data_dir=SAMPLE, total_steps=4,
                batch_size=4, save_every=2, log_every=1, threads=1, lr=1e-3, warmup_steps=1, ema=0.9,
                freeze_vit=False, text_dropout=0.2, vit_dropout=0.2, vae_dropout=0.2, max_tokens_per_pack=200,
                export_dir=out / "export")
    opts.update(kw)
    return [f"{k}={v}" for k, v in opts.items()]


def run_stage1(args: list[str], processes: int = 1, wait: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if processes == 1:
        cmd = [sys.executable, "-m", "training.stage1", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_2PROC),
               "--main_process_port", str(29500 + os.getpid() % 400), "-m", "training.stage1", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    return proc


def weights(export_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / "ema.safetensors"))


def test_data_order_is_a_function_of_seed_and_step():
    order = DataOrder(10, 4, seed=3)
    batches = [order.batch(k) for k in range(5)]
    again = DataOrder(10, 4, seed=3)
    assert [again.batch(k) for k in (4, 0, 2)] == [batches[4], batches[0], batches[2]]
    # every epoch is a permutation: the first 20 positions cover each example twice
    assert sorted(sum(batches, [])) == sorted(list(range(10)) * 2)


def test_config_yaml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("total_steps: 7\nbetas: [0.8, 0.9]\ndata_dir: x\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml", ["lr=3e-4", "freeze_vit=false"])
    assert cfg.total_steps == 7 and cfg.betas == (0.8, 0.9) and cfg.lr == 3e-4
    assert cfg.extra == {"data_dir": "x", "freeze_vit": False}


def test_stage1_smoke_loss_falls_and_exports_release_layout(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    run_stage1(stage1_args(out, tokenizer_dir, total_steps=12, save_every=12, batch_size=4, text_dropout=0.0,
                           vit_dropout=0.0, vae_dropout=0.0, lr=3e-3))
    rows = np.genfromtxt(out / "log.csv", delimiter=",", names=True)
    assert len(rows) == 12
    assert rows["loss"][-3:].mean() < rows["loss"][:3].mean()  # it learns
    assert (rows["examples_per_s"] > 0).all()
    from cooper_model.pipeline import CooperPipeline

    pipe = CooperPipeline.from_pretrained(out / "export", tokenizer=byte_level_tokenizer())
    assert pipe.is_trained
    rgb = np.zeros((96, 128, 3), np.uint8)
    assert pipe.depth(rgb, num_steps=2).relative.shape == (96, 128)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tokenizer_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    run_stage1(stage1_args(one, tokenizer_dir, total_steps=3, save_every=3))
    run_stage1(stage1_args(two, tokenizer_dir, total_steps=3, save_every=3), processes=2)
    a, b = weights(one / "export"), weights(two / "export")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    # and the run really trained: weights moved from the initial checkpoint
    init = load_file(str(TINY / "ema.safetensors"))
    key = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    assert float((a[key].float() - init[key].float()).abs().max()) > 1e-4
    la = np.genfromtxt(one / "log.csv", delimiter=",", names=True)["loss"]
    lb = np.genfromtxt(two / "log.csv", delimiter=",", names=True)["loss"]
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def test_killed_run_resumes_from_its_last_checkpoint_and_loses_nothing(tmp_path, tokenizer_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_stage1(stage1_args(straight, tokenizer_dir, total_steps=6, save_every=2))
    proc = run_stage1(stage1_args(killed, tokenizer_dir, total_steps=6, save_every=2), wait=False)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_0000002" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: after the step-2 checkpoint, somewhere in step 3 or 4
    proc.wait()
    assert not (killed / "export").exists()
    resumed = run_stage1(stage1_args(killed, tokenizer_dir, total_steps=6, save_every=2))
    assert resumed.returncode == 0
    a, b = weights(straight / "export"), weights(killed / "export")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, worst
    # no temporary checkpoint directories are left behind, and only the newest ones are kept
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["step_0000004", "step_0000006"]


def test_one_step_fraction_trains_the_one_step_sampler(tokenizer_dir, tmp_path):
    """one_step_fraction=1 puts every target at t = 1 (pure noise, the one-step sampler's input);
    0 (the default) keeps the logit-normal stream untouched."""
    from training.stage1 import Stage1Batches, build

    def examples(**kw):
        cfg = TrainConfig.from_yaml(None, stage1_args(tmp_path / "r", tokenizer_dir, **kw))
        model, vae, tokenizer, dataset = build(cfg)
        batches = Stage1Batches(dataset, model, vae, tokenizer, cfg)
        return [batches.example(i, step=3) for i in range(4)]

    for seq, target in examples(one_step_fraction=1.0):
        noisy_t = seq.latent_t[-1]
        assert torch.all(noisy_t == 1.0)
        eps = seq.latents[-1]   # at t = 1 the noisy tokens are the noise itself
        assert target.shape == eps.shape and not torch.allclose(target, eps)
    default = examples()
    assert all(float(seq.latent_t[-1][0]) < 1.0 for seq, _ in default)
    again = examples(one_step_fraction=0.0)
    for (a, ta), (b, tb) in zip(default, again):
        assert torch.equal(ta, tb) and torch.equal(a.latents[-1], b.latents[-1])
