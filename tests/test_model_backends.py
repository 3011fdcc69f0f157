"""Backend selection and fallback, the TensorRT engine cache and precision policy, the compile
backend against eager, and the sampling knobs (CFG interval/branches/first steps, feature cache)."""

import json
import logging

import numpy as np
import pytest
import torch

from cooper_model import prompts
from cooper_model.backends import BackendUnavailable, parse_chain, select_backend
from cooper_model.backends.eager import EagerBackend
from cooper_model.backends.engine_cache import EngineCache, EngineKey, Target
from cooper_model.backends.feature_cache import StepCache
from cooper_model.backends.trt import denoise_profiles, resolve_precision, vae_profiles
from cooper_model.bench import random_pipeline
from cooper_model.image_processor import CooperInputError
from cooper_model.inference import combine_cfg, shifted_timesteps
from cooper_model.pipeline import BUNDLED_CHECKPOINT, CooperPipeline


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = random_pipeline("bagel-tiny", "cpu", "float32")
    torch.nn.init.normal_(p.inferencer.model.llm2vae.weight, std=0.2)
    return p


@pytest.fixture(scope="module")
def contexts(pipe):
    inf = pipe.inferencer
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        ctx, cfg_img = inf.new_context(), inf.new_context()
        ctx.add_image(rgb, generator=torch.Generator().manual_seed(0))
        cfg_text = ctx.copy()
        ctx.add_text(prompts.DEPTH_PROMPT)
        cfg_img.add_text(prompts.DEPTH_PROMPT)
    return ctx, cfg_text, cfg_img


# Chain ------------------------------------------------------------------------------------------

def test_parse_chain():
    assert parse_chain("tensorrt, onnxruntime,eager") == ["tensorrt", "onnxruntime", "eager"]
    assert parse_chain(["compile", "eager"]) == ["compile", "eager"]
    with pytest.raises(ValueError, match="unknown backend 'vulkan'"):
        parse_chain("tensorrt,vulkan")
    with pytest.raises(ValueError, match="empty"):
        parse_chain(" , ")


def test_unavailable_backend_falls_back_with_a_logged_reason(pipe, caplog):
    caplog.set_level(logging.WARNING)
    backend = select_backend("tensorrt,eager", pipe.inferencer)
    assert backend.name == "eager"
    assert len(backend.notes) == 1 and backend.notes[0].startswith("tensorrt: ")
    assert "backend tensorrt is unavailable here" in caplog.text


def test_a_chain_where_nothing_runs_says_why(pipe):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="no backend of 'tensorrt' can run here: tensorrt: "):
        select_backend("tensorrt", pipe.inferencer)


def test_from_pretrained_reports_the_active_backend():
    pipe = CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT, backend="tensorrt,compile,eager")
    assert pipe.backend == "compile"
    assert pipe.backend_notes and pipe.backend_notes[0].startswith("tensorrt: ")
    with pytest.raises(ValueError, match="unknown backend"):
        CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT, backend="fast")


def test_graph_backends_refuse_a_split_model():
    from cooper_model.backends.base import single_device

    split = random_pipeline("bagel-tiny", "cpu", "float32")
    split.inferencer.vae.to("meta")  # the autoencoder elsewhere than the network
    with pytest.raises(BackendUnavailable, match="split"):
        single_device(split.inferencer)
    with pytest.raises(BackendUnavailable, match="split"):
        select_backend("compile", split.inferencer)


# Engine cache -----------------------------------------------------------------------------------

H100 = Target("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0")


def key(**changes):
    fields = dict(graph="denoise", onnx_sha256="a" * 64, precision="bf16",
                  profiles=((("kv", (1, 2, 2, 256, 2, 16), (3, 2, 2, 256, 2, 16), (3, 2, 2, 256, 2, 16)),),),
                  target=H100)
    fields.update(changes)
    return EngineKey(**fields)


def test_engine_key_changes_with_every_field_and_only_then():
    base = key()
    assert key().digest() == base.digest() and key().stem() == base.stem()
    variants = [key(graph="vae_decoder"), key(onnx_sha256="b" * 64), key(precision="fp8"),
                key(profiles=((("kv", (1, 2, 2, 512, 2, 16), (3, 2, 2, 512, 2, 16), (3, 2, 2, 512, 2, 16)),),)),
                key(target=Target("NVIDIA H100 80GB HBM3", (9, 0), "10.14.1")),
                key(target=Target("NVIDIA GeForce RTX 4090", (8, 9), "10.13.0")),
                key(target=Target("Orin", (8, 7), "10.13.0"))]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and base.digest() not in digests
    assert "sm90" in base.stem() and "trt10.13.0" in base.stem()


def test_engine_cache_builds_once_then_loads(tmp_path):
    cache = EngineCache(tmp_path)
    builds = []

    def build():
        builds.append(1)
        return b"engine-bytes"

    assert cache.get_or_build(key(), build) == (b"engine-bytes", True)
    assert cache.get_or_build(key(), build) == (b"engine-bytes", False)
    assert EngineCache(tmp_path).get_or_build(key(), build) == (b"engine-bytes", False)  # a new process
    assert len(builds) == 1 and cache.builds == 1
    # another TensorRT or GPU is another entry: built, never served the first engine
    other = key(target=Target("NVIDIA H100 80GB HBM3", (9, 0), "10.14.1"))
    assert cache.load(other) is None
    assert cache.get_or_build(other, lambda: b"other-bytes") == (b"other-bytes", True)
    assert cache.load(key()) == b"engine-bytes"


def test_engine_cache_never_loads_a_foreign_or_damaged_engine(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    cache = EngineCache(tmp_path)
    engine, meta = cache.store(key(), b"engine-bytes"), cache.paths(key())[1]
    assert cache.load(key()) == b"engine-bytes"
    # an engine copied in under the right name but recorded for another GPU
    recorded = json.loads(meta.read_text())
    recorded["key"]["target"]["gpu_name"] = "NVIDIA A100-SXM4-80GB"
    meta.write_text(json.dumps(recorded))
    assert cache.load(key()) is None and "built for another target" in caplog.text
    # no metadata at all
    meta.unlink()
    assert cache.load(key()) is None and "no readable metadata" in caplog.text
    # bytes replaced after the fact
    cache.store(key(), b"engine-bytes")
    engine.write_bytes(b"engine-bytez")
    assert cache.load(key()) is None and "does not match its recorded hash" in caplog.text
    assert cache.get_or_build(key(), lambda: b"rebuilt")[1] is True
    assert cache.load(key()) == b"rebuilt"
    assert not list(tmp_path.glob("*.tmp*"))


def test_precision_policy():
    assert resolve_precision("auto", (9, 0)) == "bf16"
    assert resolve_precision("auto", (7, 5)) == "fp16"
    assert resolve_precision("fp8", (8, 9)) == "fp8" and resolve_precision("fp8", (9, 0)) == "fp8"
    with pytest.raises(BackendUnavailable, match="int8"):
        resolve_precision("fp8", (8, 7))  # Jetson Orin
    with pytest.raises(BackendUnavailable, match="8.0"):
        resolve_precision("bf16", (7, 5))
    assert resolve_precision("int8", (8, 7)) == "int8"
    with pytest.raises(ValueError):
        resolve_precision("int4", (9, 0))


def test_profiles_bucket_the_context_and_keep_head_dims_static():
    from cooper_model.config import preset

    config = preset("bagel-7b")
    profiles = denoise_profiles(config, resolutions=[(512, 512), (384, 512)], buckets=(512, 1024, 2048))
    assert len(profiles) == 3
    for size, profile in zip((512, 1024, 2048), profiles):
        shapes = {name: (lo, opt, hi) for name, lo, opt, hi in profile}
        lo, opt, hi = shapes["kv"]
        assert lo[1:] == opt[1:] == hi[1:] == (28, 2, size, 4, 128)  # only the branch count varies
        assert (lo[0], hi[0]) == (1, 3)
        assert shapes["latents"][0] == (24 * 32, 64) and shapes["latents"][2] == (32 * 32, 64)
    (vae,) = vae_profiles(config, resolutions=[(512, 512), (384, 512)])
    assert vae[0][1] == (1, 16, 48, 64) and vae[0][3] == (1, 16, 64, 64)


# Compile backend --------------------------------------------------------------------------------

def test_compile_backend_matches_eager(pipe, contexts):
    """torch.compile (inductor) of the batched step on CPU, padded to a context bucket."""
    inf = pipe.inferencer
    backend = select_backend("compile", inf)
    h, w = 64, 64
    x = inf.initial_noise(h, w, torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = EagerBackend(inf).prepare(list(contexts), h, w)(x, 0.5, 3)
        got = backend.prepare(list(contexts), h, w)(x, 0.5, 3)
    assert got.shape == ref.shape and ref.abs().max() > 0.1
    assert (got - ref).abs().max() < 1e-4


# Knobs ------------------------------------------------------------------------------------------

class CountingEager(EagerBackend):
    """The eager backend, recording the branch count of every computed step."""

    def prepare(self, contexts, height, width):
        step = super().prepare(contexts, height, width)
        self.calls = []

        def counted(x, t, branches):
            self.calls.append(branches)
            return step(x, t, branches)

        return counted


def sample(pipe, contexts, **knobs):
    inf = pipe.inferencer
    settings = pipe.settings("depth", **{"num_steps": 6, "cfg_interval": (0.0, 1.0), **knobs})
    backend = inf.backend = CountingEager(inf)
    try:
        with torch.inference_mode():
            x = inf.generate_latents(contexts[0], 64, 64, settings, contexts[1], contexts[2],
                                     noise=inf.initial_noise(64, 64, torch.Generator().manual_seed(7)))
    finally:
        inf.backend = EagerBackend(inf)
    return x, backend.calls, dict(inf.last_denoise)


def test_cfg_knobs_change_the_passes(pipe, contexts):
    _, calls, stats = sample(pipe, contexts)
    assert calls == [3] * 5 and stats["forward_passes"] == 15
    _, calls, _ = sample(pipe, contexts, cfg_image_branch=False)
    assert calls == [2] * 5
    _, calls, _ = sample(pipe, contexts, cfg_first_steps=2)
    assert calls == [3, 3, 1, 1, 1]
    _, calls, _ = sample(pipe, contexts, cfg_interval=(0.5, 1.0))
    t = shifted_timesteps(6, pipe.settings("depth").timestep_shift)[:-1]
    assert calls == [3 if 0.5 < float(ti) <= 1.0 else 1 for ti in t]
    for bad in (dict(cfg_first_steps=-1), dict(feature_cache="magic"), dict(feature_cache_threshold=-1.0)):
        with pytest.raises(CooperInputError):
            pipe.settings("depth", **bad)


def test_feature_cache_off_threshold_zero_is_exact(pipe, contexts):
    ref, _, _ = sample(pipe, contexts)
    got, calls, stats = sample(pipe, contexts, feature_cache="reuse", feature_cache_threshold=0.0)
    assert calls == [3] * 5 and stats["cached_steps"] == 0
    assert torch.equal(ref, got)


def test_feature_cache_keeps_cfg_active(pipe, contexts):
    """With a threshold nothing reaches, steps 1-3 reuse step 0's three branch velocities, and
    each of them is still guided: the result equals a hand-rolled loop that combines the cached
    branches with CFG at every step, and differs from caching the unguided velocity."""
    inf = pipe.inferencer
    got, calls, stats = sample(pipe, contexts, feature_cache="reuse", feature_cache_threshold=1e9)
    assert calls == [3, 3] and stats["computed_steps"] == 2 and stats["cached_steps"] == 3
    assert stats["forward_passes"] == 6
    s = pipe.settings("depth", num_steps=6, cfg_interval=(0.0, 1.0))
    ts = shifted_timesteps(6, s.timestep_shift)
    x = inf.initial_noise(64, 64, torch.Generator().manual_seed(7))
    step = EagerBackend(inf).prepare(list(contexts), 64, 64)
    guide = lambda v: combine_cfg(v[0], v[1], v[2], s.cfg_text_scale, s.cfg_img_scale,  # noqa: E731
                                  s.cfg_renorm_type, s.cfg_renorm_min)
    with torch.inference_mode():
        cached = step(x, float(ts[0]), 3)
        unguided = x.clone()
        for i in range(5):
            v = step(x, float(ts[i]), 3) if i == 4 else cached
            vu = step(unguided, float(ts[i]), 3)[0] if i == 4 else cached[0]
            x = x - guide(v) * float(ts[i] - ts[i + 1])
            unguided = unguided - vu * float(ts[i] - ts[i + 1])
    assert (got - x).abs().max() < 1e-5
    assert (got - unguided).abs().max() > 1e-2


def test_step_cache_computes_when_it_lacks_a_branch():
    cache = StepCache("taylor", 1e9, num_steps=5)
    computed = []

    def compute(branches, value):
        def run():
            computed.append(branches)
            return torch.full((branches, 2, 2), value)
        return run

    signal = torch.ones(2, 2)
    cache(0, 1.0, 1, signal, compute(1, 1.0))  # outside the CFG interval: one branch
    out = cache(1, 0.8, 3, signal, compute(3, 2.0))  # guidance starts: the cache has 1 branch, so compute
    assert computed == [1, 3] and out.shape[0] == 3
    cache(2, 0.6, 3, signal * 1.01, compute(3, 9.0))  # skipped: reuse (one 3-branch entry only)
    out = cache(3, 0.4, 1, signal * 1.02, compute(1, 9.0))  # skipped: taylor from the last two
    assert torch.allclose(out, torch.full((1, 2, 2), 4.0))  # 2 + (0.4 - 0.8) * (2 - 1) / (0.8 - 1.0)
    assert computed == [1, 3] and cache.skipped == 2
    cache(4, 0.2, 3, signal, compute(3, 5.0))  # last step: always computed
    assert computed == [1, 3, 3]


# Memory plans -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tolerance", [("int8", 0.02), ("fp8", 0.08)])
def test_weight_only_experts_shrink_and_stay_close(contexts, kind, tolerance):
    from cooper_model.backends.memory import WeightOnlyLinear, apply_memory_plan, bytes_on

    torch.manual_seed(0)
    p = random_pipeline("bagel-tiny", "cpu", "float32")
    torch.nn.init.normal_(p.inferencer.model.llm2vae.weight, std=0.2)
    inf = p.inferencer
    x = inf.initial_noise(64, 64, torch.Generator().manual_seed(8))
    ctx = inf.new_context().add_text(prompts.DEPTH_PROMPT)
    with torch.inference_mode():
        ref = inf.velocity(ctx, x, 0.5, 64, 64)
    before = bytes_on(inf.model, "cpu")
    done = apply_memory_plan(inf.model, kind)
    layers = p.config.llm.num_hidden_layers
    assert done == {kind: 14 * layers}  # q, k, v, o, gate, up, down of both experts
    layer = inf.model.language_model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, WeightOnlyLinear) and isinstance(layer.mlp_moe_gen.down_proj, WeightOnlyLinear)
    assert not any(isinstance(m, torch.nn.Linear) for m in inf.model.language_model.model.layers.modules())
    assert bytes_on(inf.model, "cpu") < before
    with torch.inference_mode():
        got = inf.velocity(inf.new_context().add_text(prompts.DEPTH_PROMPT), x, 0.5, 64, 64)
    error = float((got - ref).norm() / ref.norm())
    assert 0 < error < tolerance


def test_maps_plan_offloads_the_text_head_and_vit_and_maps_still_work():
    from cooper_model.backends.memory import apply_memory_plan

    p = random_pipeline("bagel-tiny", "cpu", "float32")
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ref = p.depth(rgb, num_steps=3)
    apply_memory_plan(p.inferencer.model, "maps")
    head = p.inferencer.model.language_model.lm_head
    assert head.weight.device.type == "meta" and hasattr(head, "_hf_hook")  # weights kept off the device
    got = p.depth(rgb, num_steps=3)
    assert np.abs(got.relative - ref.relative).max() < 1e-5
    with pytest.raises(ValueError, match="memory plan"):
        apply_memory_plan(p.inferencer.model, "int8+fp8")


def test_cuda_graphs_need_a_cuda_model(pipe):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="CUDA graphs need the model on a CUDA device"):
        select_backend("compile", pipe.inferencer, {"compile": {"cuda_graphs": True}})
    assert select_backend("compile", pipe.inferencer).cuda_graphs is False
