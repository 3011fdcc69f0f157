"""Checkpoint layout: manifests of the real model, upstream-written tiny checkpoint, round trips,
and a clear error for every kind of broken checkpoint."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import REFERENCE
from cooper_model import CheckpointError, CooperPipeline, load_autoencoder, load_model, save_checkpoint
from cooper_model.autoencoder import FluxAutoencoder
from cooper_model.config import AutoencoderConfig, preset
from cooper_model.make_checkpoint import random_checkpoint
from cooper_model.modeling import CooperModel, sincos_2d_table
from cooper_model.tokenizer import byte_level_tokenizer

TINY = REFERENCE / "bagel-tiny-ckpt"


def manifest(name):
    with open(REFERENCE / name) as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return [(r[0], tuple(int(x) for x in r[1].split(","))) for r in rows]


@pytest.mark.parametrize("name,file", [("bagel-7b", "bagel-7b-mot.params.tsv"), ("bagel-tiny", "bagel-tiny.params.tsv")])
def test_state_dict_matches_reference_manifest_row_by_row(name, file):
    with torch.device("meta"):
        model = CooperModel(preset(name))
    rows = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = manifest(file)
    assert len(rows) == len(expected)
    for mine, ref in zip(rows, expected):
        assert mine == ref


def test_7b_parameter_count():
    with torch.device("meta"):
        model = CooperModel(preset("bagel-7b"))
    counts = json.loads((REFERENCE / "param_counts.json").read_text())
    total = sum(v.numel() for v in model.state_dict().values())
    assert total == 14_607_260_128
    assert str(total) in json.dumps(counts)


@pytest.mark.parametrize("config,file", [(AutoencoderConfig(), "flux-ae.params.tsv"),
                                         (AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1), "flux-ae-tiny.params.tsv")])
def test_autoencoder_matches_reference_manifest(config, file):
    with torch.device("meta"):
        ae = FluxAutoencoder(config)
    assert ae.flux_shapes() == dict(manifest(file))


def test_upstream_tiny_checkpoint_loads_every_tensor():
    model = load_model(TINY, dtype="float32")
    stored = load_file(str(TINY / "ema.safetensors"))
    state = model.state_dict()
    assert set(stored) == set(state)
    for key, value in stored.items():
        assert torch.equal(state[key], value.float()), key
    # the stored sin-cos tables are the ones this code computes
    assert torch.allclose(stored["vit_pos_embed.pos_embed"].float(),
                          torch.from_numpy(sincos_2d_table(64, 7)).float().to(torch.bfloat16).float())
    ae = load_autoencoder(TINY)
    ae_stored = load_file(str(TINY / "ae.safetensors"))
    for key, value in ae.flux_state_dict().items():
        assert torch.equal(value, ae_stored[key]), key


def test_position_tables_are_regenerated_when_dropped(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt)
    state = load_file(str(ckpt / "ema.safetensors"))
    for key in CooperModel.POSITION_TABLES:
        del state[key]
    save_file(state, str(ckpt / "ema.safetensors"))
    # without the tables the grid sizes are not in the files: they come from cooper_config.json
    preset("bagel-tiny").save_pretrained(ckpt)
    model = load_model(ckpt, dtype="float32")
    assert torch.allclose(model.latent_pos_embed.pos_embed, torch.from_numpy(sincos_2d_table(64, 8)).float())
    assert not model.latent_pos_embed.pos_embed.requires_grad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    torch.manual_seed(1)
    model, vae, tok = random_checkpoint("bagel-tiny", tmp_path / "a", dtype=dtype)
    loaded = load_model(tmp_path / "a", dtype=dtype)
    save_checkpoint(tmp_path / "b", loaded, load_autoencoder(tmp_path / "a"), tok, dtype=dtype)
    for name in ("ema.safetensors", "ae.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(loaded.dtype)), key


def test_sharded_checkpoint_with_index(tmp_path):
    ckpt = tmp_path / "sharded"
    shutil.copytree(TINY, ckpt)
    state = load_file(str(ckpt / "ema.safetensors"))
    (ckpt / "ema.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for file, file_keys in shards.items():
        save_file({k: state[k] for k in file_keys}, str(ckpt / file))
        weight_map.update({k: file for k in file_keys})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_model(ckpt, dtype="float32")
    assert torch.equal(model.state_dict()[keys[0]], state[keys[0]].float())


def _broken(tmp_path, edit):
    ckpt = tmp_path / "broken"
    shutil.copytree(TINY, ckpt)
    edit(ckpt)
    return ckpt


def _edit_weights(fn):
    def edit(ckpt):
        state = load_file(str(ckpt / "ema.safetensors"))
        fn(state)
        save_file(state, str(ckpt / "ema.safetensors"))
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda c: (c / "ema.safetensors").unlink(), "no network weights"),
    (_edit_weights(lambda s: s.pop("language_model.lm_head.weight")), "missing tensor 'language_model.lm_head.weight'"),
    (_edit_weights(lambda s: s.__setitem__("extra.weight", torch.zeros(2))), "unexpected tensor 'extra.weight'"),
    (_edit_weights(lambda s: s.__setitem__("vae2llm.bias", torch.zeros(3))), "tensor 'vae2llm.bias' has shape [3], expected [64]"),
    (lambda c: (c / "ae.safetensors").unlink(), "ae.safetensors: missing autoencoder weights"),
])
def test_broken_checkpoints_name_file_and_key(tmp_path, edit, message):
    ckpt = _broken(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, dtype="float32")
        load_autoencoder(ckpt)
    assert message in str(err.value)
    assert str(ckpt) in str(err.value)


def test_missing_config_and_tokenizer_are_clear(tmp_path):
    ckpt = _broken(tmp_path, lambda c: (c / "llm_config.json").unlink())
    with pytest.raises(FileNotFoundError, match="llm_config.json"):
        load_model(ckpt)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        CooperPipeline.from_pretrained(TINY)
    with pytest.raises(CheckpointError, match="not found"):
        CooperPipeline.from_pretrained(tmp_path / "nowhere")


def test_pickle_files_are_never_read(tmp_path):
    # A checkpoint with only a pickled state dict is refused, not unpickled.
    ckpt = _broken(tmp_path, lambda c: (c / "ema.safetensors").rename(c / "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="no network weights"):
        load_model(ckpt)


def test_tiny_checkpoint_runs_with_explicit_tokenizer():
    pipe = CooperPipeline.from_pretrained(TINY, tokenizer=byte_level_tokenizer())
    out = pipe.depth(np.full((50, 70, 3), 128, np.uint8), num_steps=3)
    assert out.relative.shape == (50, 70)
    assert out.depth is None  # released-style (no cooper_config.json): relative depth


# The autoencoder against an independent functional implementation of the FLUX architecture,
# reading the original-layout tensors directly: catches any slip in the diffusers key mapping.
def _flux_reference(sd, x, cfg, decode=False):
    def norm(h, p):
        return F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def conv(h, p, **kw):
        return F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], **kw)

    def resnet(h, p):
        y = conv(F.silu(norm(h, p + ".norm1")), p + ".conv1", padding=1)
        y = conv(F.silu(norm(y, p + ".norm2")), p + ".conv2", padding=1)
        skip = conv(h, p + ".nin_shortcut") if p + ".nin_shortcut.weight" in sd else h
        return skip + y

    def attn(h, p):
        y = norm(h, p + ".norm")
        b, c, hh, ww = y.shape
        q, k, v = (conv(y, p + n).reshape(b, c, -1).transpose(1, 2) for n in (".q", ".k", ".v"))
        w = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)
        return h + conv((w @ v).transpose(1, 2).reshape(b, c, hh, ww), p + ".proj_out")

    n = len(cfg.ch_mult)
    if not decode:
        h = conv(x, "encoder.conv_in", padding=1)
        for i in range(n):
            for j in range(cfg.num_res_blocks):
                h = resnet(h, f"encoder.down.{i}.block.{j}")
            if i != n - 1:
                h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2)
        h = resnet(attn(resnet(h, "encoder.mid.block_1"), "encoder.mid.attn_1"), "encoder.mid.block_2")
        return conv(F.silu(norm(h, "encoder.norm_out")), "encoder.conv_out", padding=1)
    h = conv(x, "decoder.conv_in", padding=1)
    h = resnet(attn(resnet(h, "decoder.mid.block_1"), "decoder.mid.attn_1"), "decoder.mid.block_2")
    for i in reversed(range(n)):
        for j in range(cfg.num_res_blocks + 1):
            h = resnet(h, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv", padding=1)
    return conv(F.silu(norm(h, "decoder.norm_out")), "decoder.conv_out", padding=1)


def test_autoencoder_agrees_with_functional_flux_reference():
    ae = load_autoencoder(TINY)
    sd = load_file(str(TINY / "ae.safetensors"))
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = _flux_reference(sd, x, ae.config)
        mean = moments[:, :16]
        expected_z = 0.3611 * (mean - 0.1159)
        assert torch.allclose(ae.encode(x, sample=False), expected_z, atol=1e-4)
        # sampling draws from the global RNG like upstream's randn_like
        torch.manual_seed(7)
        sampled = ae.encode(x, sample=True)
        torch.manual_seed(7)
        noise = torch.randn_like(mean)
        assert torch.allclose(sampled, 0.3611 * (mean + torch.exp(0.5 * moments[:, 16:]) * noise - 0.1159), atol=1e-4)
        z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(1))
        expected = _flux_reference(sd, z / 0.3611 + 0.1159, ae.config, decode=True)
        assert torch.allclose(ae.decode(z), expected, atol=1e-4)
