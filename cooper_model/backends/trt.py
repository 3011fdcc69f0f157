"""TensorRT engines built from the exported graphs with the TensorRT Python API.

UNVERIFIED: no machine this code was written on has TensorRT and a GPU; the cache key logic, the
precision policy, the profile layout and the ONNX weight quantization are tested on CPU, the build
and execution only where TensorRT is installed.

- Precision (`precision=`): "fp16", "bf16" (Ampere and newer), "fp8" (Ada/Hopper, SM 8.9+: weights
  stored as FP8 E4M3 with per-channel scales) or "int8" (weight-only INT8, per-channel; the choice
  for Jetson Orin, SM 8.7, which has no FP8). "auto": bf16 where supported, else fp16. The FP8 and
  INT8 graphs are explicit (DequantizeLinear on each weight), built strongly typed.
- Profiles: the context length is padded up to a bucket (`context_buckets`), one optimisation
  profile per bucket with a fixed context size, 1-3 branches and the latent counts of `resolutions`.
- Engines are cached (`engine_cache.py`) under `engine_dir`, keyed by GPU name, compute capability,
  TensorRT version, precision, profiles and the ONNX file's hash.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .. import export as ex
from .base import Backend, BackendUnavailable, single_device
from .engine_cache import EngineCache, EngineKey, Target
from .ort import cache_root

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp16", "bf16", "fp8", "int8")
DEFAULT_CONTEXT_BUCKETS = (256, 512, 1024, 2048, 4096)


def resolve_precision(precision: str, capability: tuple[int, int]) -> str:
    """The precision to build for this GPU, or BackendUnavailable saying why it cannot be had."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown TensorRT precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    sm = tuple(capability)
    if precision == "auto":
        return "bf16" if sm >= (8, 0) else "fp16"
    if precision == "bf16" and sm < (8, 0):
        raise BackendUnavailable(f"bf16 needs compute capability 8.0 or newer, this GPU has {sm[0]}.{sm[1]}")
    if precision == "fp8" and sm < (8, 9):
        hint = " (Jetson Orin: use precision int8, weight-only)" if sm == (8, 7) else ""
        raise BackendUnavailable(f"fp8 needs Ada or Hopper (compute capability 8.9+), this GPU has {sm[0]}.{sm[1]}{hint}")
    return precision


def latent_token_range(config, resolutions=None) -> tuple[int, int, int]:
    """(min, opt, max) latent token counts: of the given (height, width) sizes, or of what the
    checkpoint's VAE transform can produce (short edge >= min_size, long edge <= max_size)."""
    d = config.latent_downsample
    if resolutions:
        counts = sorted((h // d) * (w // d) for h, w in resolutions)
        return counts[0], counts[len(counts) // 2], counts[-1]
    t = config.vae_transform
    lo, hi = t.min_size // d, t.max_size // d
    return lo * lo, (hi * (lo + hi) // 2), hi * hi


def denoise_profiles(config, resolutions=None, buckets=DEFAULT_CONTEXT_BUCKETS) -> tuple:
    """One profile per context bucket; each a tuple of (input, min, opt, max) shapes."""
    attn_layers, kvh = config.llm.num_hidden_layers, config.llm.num_key_value_heads
    head_dim = getattr(config.llm, "head_dim", None) or config.llm.hidden_size // config.llm.num_attention_heads
    lo, opt, hi = latent_token_range(config, resolutions)
    c = config.patch_latent_dim
    profiles = []
    for s in buckets:
        kv = lambda b: (b, attn_layers, 2, s, kvh, head_dim)  # noqa: E731
        profiles.append((("latents", (lo, c), (opt, c), (hi, c)), ("timestep", (1,), (1,), (1,)),
                         ("latent_pos", (lo,), (opt,), (hi,)), ("rope_pos", (1,), (3,), (3,)),
                         ("kv", kv(1), kv(3), kv(3)), ("kv_len", (1,), (3,), (3,))))
    return tuple(profiles)


def vae_profiles(config, resolutions=None) -> tuple:
    z, down = config.latent_channels, config.vae.downsample
    if resolutions:
        hs, ws = sorted(h // down for h, _ in resolutions), sorted(w // down for _, w in resolutions)
    else:
        t = config.vae_transform
        hs = ws = [t.min_size // down, t.max_size // down]
    return ((("latent", (1, z, hs[0], ws[0]), (1, z, hs[-1], ws[-1]), (1, z, hs[-1], ws[-1])),),)


def quantize_onnx_weights(src: str | Path, dst: str | Path, kind: str) -> Path:
    """Weight-only quantization of an ONNX graph: every 2-D float weight of a MatMul/Gemm becomes
    int8 or float8 E4M3 with one scale per output channel, behind a DequantizeLinear (the explicit
    form TensorRT builds strongly typed). The rest of the graph is unchanged."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if kind not in ("int8", "fp8"):
        raise ValueError(f"weight quantization {kind!r}: int8 or fp8")
    model = onnx.load(str(src), load_external_data=True)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    done = 0
    for name, init in list(inits.items()):
        users = consumers.get(name, [])
        if len(init.dims) != 2 or not users or any(n.op_type not in ("MatMul", "Gemm") or list(n.input).index(name) != 1
                                                   for n in users):
            continue
        if any(n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute) for n in users):
            axis = 0  # weight stored [out, in]
        else:
            axis = 1  # MatMul: x @ W with W [in, out]
        w = numpy_helper.to_array(init).astype(np.float32)
        amax = np.abs(w).max(axis=1 - axis, keepdims=True)
        if kind == "int8":
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            q = numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8), name + "_q")
        else:
            scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)  # E4M3's largest finite value
            q = helper.make_tensor(name + "_q", onnx.TensorProto.FLOAT8E4M3FN, w.shape,
                                   _to_float8e4m3(w / scale).tobytes(), raw=True)
        s = numpy_helper.from_array(scale.reshape(-1).astype(numpy_helper.to_array(init).dtype), name + "_scale")
        graph.initializer.remove(init)
        graph.initializer.extend([q, s])
        graph.node.insert(0, helper.make_node("DequantizeLinear", [q.name, s.name], [name], axis=axis,
                                              name=name + "_dequantize"))
        done += 1
    if kind == "fp8":  # float8 inputs of DequantizeLinear need opset 19
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < 19:
                op.version = 19
    dst = Path(dst)
    big = sum(len(i.raw_data) for i in graph.initializer) > 1.5 * 2**30
    onnx.save(model, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)
    log.info("%s: %d weights quantized to %s", dst.name, done, kind)
    return dst


def _to_float8e4m3(x):
    import ml_dtypes
    import numpy as np

    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, inferencer, precision: str = "auto", resolutions=None,
                 context_buckets=DEFAULT_CONTEXT_BUCKETS, engine_dir: str | Path | None = None,
                 onnx_dir: str | Path | None = None, workspace_gib: float = 8.0):
        super().__init__(inferencer)
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailable("TensorRT is not installed (pip install tensorrt, or use the x86_64/Jetson "
                                     "images in docker/)") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT needs a CUDA GPU and torch sees none")
        device = single_device(inferencer)
        if device.type != "cuda":
            raise BackendUnavailable(f"the model is on {device}; TensorRT runs only models on a CUDA device")
        self.trt, self.device = trt, device
        self.target = Target.current(device.index or 0)
        self.precision = resolve_precision(precision, self.target.compute_capability)
        self.buckets = tuple(sorted(context_buckets))
        self.onnx_dir = Path(onnx_dir) if onnx_dir else cache_root() / "onnx" / ex.weights_hash(inferencer)[:16]
        side = inferencer.config.vae_transform.max_size
        ex.ensure_exported(inferencer, self.onnx_dir, side, side)
        self.cache = EngineCache(engine_dir or cache_root() / "engines")
        self.workspace = int(workspace_gib * 2**30)
        config = inferencer.config
        denoise_onnx = self.onnx_dir / ex.DENOISE_FILE
        if self.precision in ("int8", "fp8"):
            quantized = self.onnx_dir / f"denoise.{self.precision}.onnx"
            if not quantized.is_file():
                quantize_onnx_weights(denoise_onnx, quantized, self.precision)
            denoise_onnx = quantized
        self.denoise = self._engine("denoise", denoise_onnx, denoise_profiles(config, resolutions, self.buckets),
                                    self.precision)
        vae_precision = "fp16" if self.precision in ("int8", "fp8") else self.precision
        self.vae_decoder = self._engine("vae_decoder", self.onnx_dir / ex.VAE_DECODER_FILE,
                                        vae_profiles(config, resolutions), vae_precision)

    # Building ---------------------------------------------------------------------------------
    def _engine(self, graph: str, onnx_path: Path, profiles, precision: str) -> "_Engine":
        key = EngineKey(graph, ex.file_hash(onnx_path), precision, profiles, self.target)
        data, _ = self.cache.get_or_build(key, lambda: self._build(onnx_path, profiles, precision))
        return _Engine(self.trt, data, self.device)

    def _build(self, onnx_path: Path, profiles, precision: str) -> bytes:
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        # Graphs whose weights already have their types (half-precision exports, quantized weights)
        # are built strongly typed; a float32 export gets the precision from builder flags.
        strongly_typed = precision in ("int8", "fp8") or self.inferencer.model.dtype != torch.float32
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if not strongly_typed:
            config.set_flag(trt.BuilderFlag.BF16 if precision == "bf16" else trt.BuilderFlag.FP16)
        for spec in profiles:
            profile = builder.create_optimization_profile()
            for name, lo, opt, hi in spec:
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        if hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = _progress_monitor(trt)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
        log.info("TensorRT build of %s took %.1f s", onnx_path.name, time.perf_counter() - start)
        return bytes(serialized)

    # Running ----------------------------------------------------------------------------------
    def prepare(self, contexts, height, width):
        inf = self.inferencer
        size = ex.bucket(max(c.length for c in contexts), self.buckets)
        profile = self.buckets.index(size)
        packed = ex.pack_contexts(contexts, pad_to=size, dtype=self.denoise.dtype("kv"))
        pos = inf._latent_positions(height, width).to(self.device)

        def step(x, t, branches):
            inputs = {"latents": x.to(self.device, torch.float32), "timestep": torch.tensor([t], device=self.device),
                      "latent_pos": pos, "rope_pos": packed.rope_pos[:branches], "kv": packed.kv[:branches],
                      "kv_len": packed.kv_len[:branches]}
            return self.denoise.run(profile, inputs, "velocity")

        return step

    def decode(self, latent):
        return self.vae_decoder.run(0, {"latent": latent.to(self.device, torch.float32)}, "image").float()

    def describe(self):
        return {"backend": self.name, "precision": self.precision, "gpu": self.target.gpu_name,
                "tensorrt": self.target.tensorrt_version, "context_buckets": list(self.buckets),
                "engines_built": self.cache.builds}


class _Engine:
    """A deserialized engine with one execution context per optimisation profile."""

    def __init__(self, trt, data: bytes, device):
        self.trt, self.device = trt, device
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built by another TensorRT version?)")
        self.contexts = {}

    def dtype(self, name: str) -> torch.dtype:
        t = self.trt
        table = {t.float32: torch.float32, t.float16: torch.float16, t.bfloat16: torch.bfloat16,
                 t.int32: torch.int32, t.int64: torch.int64, t.bool: torch.bool}
        return table[self.engine.get_tensor_dtype(name)]

    def run(self, profile: int, inputs: dict, output: str) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        ctx = self.contexts.get(profile)
        if ctx is None:
            ctx = self.contexts[profile] = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, stream.cuda_stream)
        keep = []
        for name, value in inputs.items():
            value = value.to(self.dtype(name)).contiguous()
            keep.append(value)
            ctx.set_input_shape(name, tuple(value.shape))
            ctx.set_tensor_address(name, value.data_ptr())
        out = torch.empty(tuple(ctx.get_tensor_shape(output)), dtype=self.dtype(output), device=self.device)
        ctx.set_tensor_address(output, out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out


def _progress_monitor(trt):
    class Progress(trt.IProgressMonitor):
        """Logs each build phase and, at most every 10 s, the step reached."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            log.info("TensorRT build: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name, step):
            now = time.monotonic()
            if now - self.last > 10:
                self.last = now
                log.info("TensorRT build: %s, step %d", phase_name, step)
            return True  # keep building

        def phase_finish(self, phase_name):
            log.debug("TensorRT build: %s done", phase_name)

    return Progress()
