"""The exported ONNX graphs under ONNX Runtime against eager PyTorch, and the onnxruntime backend.

Model: upstream's tiny architecture (`bagel-tiny`: 2 layers, 4 query / 2 KV heads) with random
weights, fp32. Tolerances (fp32 graph vs eager; the kernels differ, the math does not):
- velocity (values of order 1): max abs difference 1e-4, with and without batched CFG;
- decoded image in [-1, 1]: 1e-4;
- a whole 4-step depth map in [0, 1]: 1e-3;
- weight-only int8 / fp8 graphs vs the fp32 graph: relative L2 error 3% / 10%.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from cooper_model import export as ex  # noqa: E402
from cooper_model import prompts  # noqa: E402
from cooper_model.backends.trt import quantize_onnx_weights  # noqa: E402
from cooper_model.bench import random_pipeline  # noqa: E402

VELOCITY_ATOL = 1e-4
IMAGE_ATOL = 1e-4
DEPTH_ATOL = 1e-3
EXPORT_SIZE = (64, 64)


def tiny_pipeline():
    torch.manual_seed(0)
    pipe = random_pipeline("bagel-tiny", "cpu", "float32")
    # llm2vae starts at zero (upstream's init): give it weights so velocities are not all zero
    torch.nn.init.normal_(pipe.inferencer.model.llm2vae.weight, std=0.2)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def onnx_dir(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    ex.export_all(pipe.inferencer, out, *EXPORT_SIZE)
    return out


@pytest.fixture(scope="module")
def contexts(pipe):
    """The three contexts of a depth map, each of another length: [image, prompt], [image], [prompt]."""
    inf = pipe.inferencer
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    with torch.inference_mode():
        ctx, cfg_img = inf.new_context(), inf.new_context()
        ctx.add_image(rgb, generator=torch.Generator().manual_seed(0))
        cfg_text = ctx.copy()
        ctx.add_text(prompts.DEPTH_PROMPT)
        cfg_img.add_text(prompts.DEPTH_PROMPT)
    assert len({c.length for c in (ctx, cfg_text, cfg_img)}) == 3
    return [ctx, cfg_text, cfg_img]


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_denoise(sess, inf, contexts, x, t, height, width):
    packed = ex.pack_contexts(contexts)
    feeds = {"latents": x.numpy(), "timestep": np.array([t], np.float32),
             "latent_pos": inf._latent_positions(height, width).numpy(), "rope_pos": packed.rope_pos.numpy(),
             "kv": packed.kv.numpy(), "kv_len": packed.kv_len.numpy()}
    return sess.run(None, feeds)[0]


def test_denoise_graph_has_six_inputs_whatever_the_depth_and_static_head_dims(pipe, onnx_dir):
    graph = onnx.load(str(onnx_dir / ex.DENOISE_FILE), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert list(inputs) == list(ex.DENOISE_INPUTS)
    llm = pipe.config.llm
    head_dim = llm.hidden_size // llm.num_attention_heads
    b, layers, two, s, kvh, hd = inputs["kv"]
    assert isinstance(b, str) and isinstance(s, str)  # dynamic: branches, context length
    assert (layers, two, kvh, hd) == (llm.num_hidden_layers, 2, llm.num_key_value_heads, head_dim)
    assert isinstance(inputs["latents"][0], str) and inputs["latents"][1] == pipe.config.patch_latent_dim
    manifest = json.loads((onnx_dir / ex.MANIFEST_FILE).read_text())
    assert manifest["format_version"] == ex.FORMAT_VERSION and set(manifest["files"]) == {ex.DENOISE_FILE, ex.VAE_DECODER_FILE}


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_velocity_matches_eager_without_and_with_batched_cfg(pipe, onnx_dir, contexts, branches):
    """One call for 1, 2 or 3 branches over contexts of three lengths (padded and masked), at a
    resolution other than the export's (latent count is dynamic)."""
    inf = pipe.inferencer
    sess = session(onnx_dir / ex.DENOISE_FILE)
    h, w = 96, 128
    x = inf.initial_noise(h, w, torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = torch.stack([inf.velocity(c, x, 0.63, h, w) for c in contexts[:branches]]).numpy()
    got = run_denoise(sess, inf, contexts[:branches], x, 0.63, h, w)
    assert got.shape == ref.shape == (branches, x.shape[0], x.shape[1])
    assert np.abs(ref).max() > 0.1  # a real signal, not zeros
    assert np.abs(got - ref).max() < VELOCITY_ATOL
    # the branches differ (each sees its own context), so batching kept them apart
    if branches > 1:
        assert np.abs(ref[0] - ref[1]).max() > 1e-3


def test_padding_beyond_the_longest_context_changes_nothing(pipe, onnx_dir, contexts):
    inf = pipe.inferencer
    sess = session(onnx_dir / ex.DENOISE_FILE)
    h, w = 64, 64
    x = inf.initial_noise(h, w, torch.Generator().manual_seed(4))
    tight = run_denoise(sess, inf, contexts, x, 0.5, h, w)
    packed = ex.pack_contexts(contexts, pad_to=ex.bucket(max(c.length for c in contexts), (256, 512)))
    feeds = {"latents": x.numpy(), "timestep": np.array([0.5], np.float32),
             "latent_pos": inf._latent_positions(h, w).numpy(), "rope_pos": packed.rope_pos.numpy(),
             "kv": packed.kv.numpy(), "kv_len": packed.kv_len.numpy()}
    assert packed.kv.shape[3] == 256
    assert np.abs(sess.run(None, feeds)[0] - tight).max() < VELOCITY_ATOL


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_vae_decoder_graph_matches_eager(pipe, onnx_dir, size):
    inf = pipe.inferencer
    down = pipe.config.vae.downsample
    latent = torch.randn(1, pipe.config.latent_channels, size[0] // down, size[1] // down,
                         generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = inf.vae.decode(latent).float().numpy()
    got = session(onnx_dir / ex.VAE_DECODER_FILE).run(None, {"latent": latent.numpy()})[0]
    assert got.shape == ref.shape == (1, 3, *size)
    assert np.abs(got - ref).max() < IMAGE_ATOL


def test_depth_map_through_onnxruntime_backend_matches_eager(pipe, onnx_dir):
    rgb = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    settings = dict(num_steps=4, cfg_interval=(0.0, 1.0))
    pipe.use_backend("eager")
    ref = pipe.depth(rgb, **settings)
    assert pipe.inferencer.last_denoise["forward_passes"] == 3 * 3  # 3 steps, 3 branches each
    try:
        assert pipe.use_backend("onnxruntime", {"onnxruntime": {"onnx_dir": onnx_dir}}) == "onnxruntime"
        got = pipe.depth(rgb, **settings)
        assert pipe.inferencer.last_denoise["backend"] == "onnxruntime"
    finally:
        pipe.use_backend("eager")
    assert got.relative.shape == ref.relative.shape == (90, 120)
    assert ref.relative.std() > 1e-3
    assert np.abs(got.relative - ref.relative).max() < DEPTH_ATOL


def test_fallback_chain_skips_tensorrt_and_uses_onnxruntime(pipe, onnx_dir, caplog):
    caplog.set_level("WARNING")
    try:
        name = pipe.use_backend("tensorrt,onnxruntime,eager", {"onnxruntime": {"onnx_dir": onnx_dir}})
        notes = pipe.backend_notes
    finally:
        pipe.use_backend("eager")
    assert name == "onnxruntime"
    assert len(notes) == 1 and notes[0].startswith("tensorrt: ")
    assert "tensorrt" in caplog.text and ("not installed" in caplog.text or "CUDA" in caplog.text)


def test_export_is_current_until_weights_or_files_change(pipe, onnx_dir, tmp_path):
    inf = pipe.inferencer
    assert ex.export_is_current(inf, onnx_dir)
    assert not ex.export_is_current(inf, tmp_path)  # nothing there
    manifest = json.loads((onnx_dir / ex.MANIFEST_FILE).read_text())
    for key, value in (("checkpoint_hash", "0" * 64), ("format_version", ex.FORMAT_VERSION - 1)):
        (tmp_path / ex.MANIFEST_FILE).write_text(json.dumps({**manifest, key: value}))
        for name in manifest["files"]:
            (tmp_path / name).write_bytes((onnx_dir / name).read_bytes())
        assert not ex.export_is_current(inf, tmp_path), key
    (tmp_path / ex.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert ex.export_is_current(inf, tmp_path)
    (tmp_path / ex.VAE_DECODER_FILE).write_bytes(b"truncated")
    assert not ex.export_is_current(inf, tmp_path)
    with torch.no_grad():
        weight = inf.model.llm2vae.bias
        weight.add_(1.0)
        try:
            assert not ex.export_is_current(inf, onnx_dir)
        finally:
            weight.sub_(1.0)


@pytest.mark.parametrize("kind,tolerance", [("int8", 0.03), ("fp8", 0.10)])
def test_weight_only_quantized_graph_stays_close(pipe, onnx_dir, contexts, tmp_path, kind, tolerance):
    """The graphs the TensorRT backend builds for int8 (Jetson Orin) and fp8 (Ada/Hopper) run under
    ONNX Runtime here: every MatMul weight is quantized and the velocity stays close."""
    path = quantize_onnx_weights(onnx_dir / ex.DENOISE_FILE, tmp_path / f"denoise.{kind}.onnx", kind)
    graph = onnx.load(str(path)).graph
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(dequantized) >= 2 * 7 * pipe.config.llm.num_hidden_layers  # q,k,v,o,gate,up,down per expert
    assert len(dequantized) <= len(matmuls)
    inf = pipe.inferencer
    h, w = 64, 64
    x = inf.initial_noise(h, w, torch.Generator().manual_seed(6))
    ref = run_denoise(session(onnx_dir / ex.DENOISE_FILE), inf, contexts, x, 0.4, h, w)
    got = run_denoise(session(path), inf, contexts, x, 0.4, h, w)
    error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < error < tolerance
