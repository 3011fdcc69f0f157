"""Benchmark of the model's stages, backends, sampling knobs and memory plans on this device.

    python -m cooper_model.bench                                   # bundled small checkpoint, CPU
    python -m cooper_model.bench --backends eager,compile,onnxruntime --knobs --eval-data runs/data/test
    python -m cooper_model.bench --preset bagel-7b --random-weights --device cuda --dtype bfloat16 --size 512 \\
        --backends eager,compile --memory-plans none,int8,fp8,maps

Everything printed is measured in this run (medians of `--repeat`):
- stages: ViT encode, VAE encode, context prefill, text tokens/s;
- per backend: the denoise step with 1, 2 and 3 CFG branches over the real contexts of a depth map
  (conditional, text-free, image-free: three different lengths), the VAE decode and a whole depth
  map; each also as a speed-up against eager from the same run (eager_s / backend_s);
- on CUDA: the GPU's bf16 matmul rate (measured), each step's model FLOPs utilisation against it,
  peak memory;
- `--knobs`: whole-map time, speed-up, forward passes and the change of the depth map against the
  reference setting for fewer steps, a narrower CFG interval, no image-CFG branch, CFG on the first
  steps only and the feature caches; with `--eval-data` also AbsRel / delta1 on that split;
- `--memory-plans`: weights on the device and peak memory of each plan (`backends/memory.py`).
Random weights (`--random-weights`) time the real sizes without the real files.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import numpy as np
import torch

from . import image_processor as ip
from . import prompts
from .autoencoder import FluxAutoencoder
from .alignment import depth_metrics
from .backends import BackendUnavailable
from .backends.memory import apply_memory_plan, bytes_on
from .checkpoint import _dtype
from .config import preset
from .inference import Inferencer
from .modeling import CooperModel
from .pipeline import BUNDLED_CHECKPOINT, CooperPipeline
from .tokenizer import byte_level_tokenizer


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeat):
    fn()  # warm-up (compilation, allocator)
    samples = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def random_pipeline(name: str, device, dtype) -> CooperPipeline:
    """Random weights of a preset built directly on the device (no files)."""
    config = preset(name)
    with torch.device(device):
        model = CooperModel(config).to(_dtype(dtype)).eval()
        vae = FluxAutoencoder(config.vae).to(_dtype(dtype)).eval()
    tokenizer = byte_level_tokenizer()
    if config.llm.vocab_size < len(tokenizer):
        raise ValueError(f"{name} vocabulary is smaller than the byte tokenizer")
    return CooperPipeline(Inferencer(model, vae, tokenizer), config)


class Scene:
    """A depth-map job at the benchmark's size: the image, the transforms, the three contexts."""

    def __init__(self, pipe: CooperPipeline, size: int):
        cfg, inf = pipe.config, pipe.inferencer
        self.rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        self.size = min(size, cfg.max_latent_size * cfg.latent_downsample)  # what the tables cover
        self.vae_t = ip.ImageTransformConfig(self.size, min(self.size, cfg.vae_transform.min_size), cfg.vae_transform.stride)
        self.vit_size = min(self.size, cfg.vit_max_num_patch_per_side * cfg.vit.patch_size)
        self.vit_t = ip.ImageTransformConfig(self.vit_size, min(self.vit_size, cfg.vit_transform.min_size),
                                             cfg.vit_transform.stride)
        self.image = ip.resize(ip.as_pil_rgb(self.rgb), self.vae_t)
        self.h, self.w = self.image.height, self.image.width
        self.inf = inf

    def contexts(self):
        """As `CooperPipeline._generate_map` builds them: [image, prompt], [image], [prompt]."""
        inf = self.inf
        with torch.inference_mode():
            ctx, cfg_img = inf.new_context(self.vae_t, self.vit_t), inf.new_context(self.vae_t, self.vit_t)
            ctx.add_image(self.image, generator=torch.Generator().manual_seed(0))
            cfg_text = ctx.copy()
            ctx.add_text(prompts.DEPTH_PROMPT)
            cfg_img.add_text(prompts.DEPTH_PROMPT)
        return [ctx, cfg_text, cfg_img]

    def depth(self, pipe, **settings):
        return pipe.depth(self.rgb, vae_resolution=self.size, vit_resolution=self.vit_size, **settings)


def stages(pipe, scene: Scene, repeat: int, text_tokens: int) -> dict:
    inf, device = pipe.inferencer, pipe.inferencer.device
    pixels = ip.to_tensor(scene.image)[None].to(device)
    vit_pixels = ip.to_tensor(ip.resize(scene.image, scene.vit_t))
    out = {}
    with torch.inference_mode():
        out["vit_encode_s"] = _time(lambda: inf.add_vit_image(inf.new_context(scene.vae_t, scene.vit_t), vit_pixels),
                                    device, repeat)
        out["vae_encode_s"] = _time(lambda: inf.vae.encode(pixels), device, repeat)
        out["prefill_s"] = _time(scene.contexts, device, repeat)
        ctx = scene.contexts()[0]
        out["text_tokens_per_s"] = text_tokens / _time(lambda: inf.generate_text(ctx, max_new_tokens=text_tokens),
                                                       device, max(1, repeat // 2))
    return out


def step_flops(config, context_lengths, latent_tokens: int) -> float:
    """Model FLOPs of one denoise step over these contexts (one branch each): 2 per multiply-add
    of every linear layer, plus QK^T and PV. The two image-end tokens use the other expert but
    cost the same."""
    llm = config.llm
    h, inter, layers = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers
    heads, kvh = llm.num_attention_heads, llm.num_key_value_heads
    hd = getattr(llm, "head_dim", None) or h // heads
    n = latent_tokens + 2
    linear = h * heads * hd + 2 * h * kvh * hd + heads * hd * h + 3 * h * inter
    total = 0.0
    for s in context_lengths:
        total += layers * (2 * n * linear + 4 * heads * hd * n * (s + n))
    return total + 2 * latent_tokens * config.patch_latent_dim * h * 2 * len(context_lengths)


def matmul_rate(device, dtype, size: int = 8192, repeat: int = 20) -> float:
    """Measured dense matmul FLOP/s of this GPU in `dtype` (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _time(lambda: [a @ b for _ in range(repeat)], device, 3) / repeat
    return 2 * size**3 / seconds


def _interleaved(fns: dict, device, repeat: int, warmup: bool = True) -> dict:
    """Median seconds of each function, timed in rounds (a, b, c, a, b, c, ...) so that a load
    that comes and goes on a shared machine hits every candidate alike."""
    for fn in fns.values() if warmup else ():
        fn()  # warm-up (compilation, allocator)
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def backends(pipe, scene: Scene, names, repeat: int, steps: int, options: dict, peak_rate: float | None) -> dict:
    from .backends import select_backend

    inf, device = pipe.inferencer, pipe.inferencer.device
    contexts = scene.contexts()
    x = inf.initial_noise(scene.h, scene.w, torch.Generator().manual_seed(0)).to(device)
    flops = {f"{b}branch": step_flops(pipe.config, [c.length for c in contexts[:b]], x.shape[0]) for b in (1, 2, 3)}
    created, results, unavailable = {}, {}, {}
    for name in names:
        try:
            start = time.perf_counter()
            created[name] = select_backend(name, inf, options)
            results[name] = {"setup_s": time.perf_counter() - start}
        except BackendUnavailable as exc:
            unavailable[name] = str(exc)
    original = inf.backend

    def on(backend, fn):
        def run():
            inf.backend = backend
            return fn()
        return run

    try:
        with torch.inference_mode():
            steps_of = {n: b.prepare(contexts, scene.h, scene.w) for n, b in created.items()}
            timed = {"prepare_s": {n: on(b, lambda b=b: b.prepare(contexts, scene.h, scene.w)) for n, b in created.items()}}
            for k in (1, 2, 3):
                timed[f"denoise_step_{k}branch_s"] = {n: (lambda f=f, k=k: f(x, 0.5, k)) for n, f in steps_of.items()}
            timed["vae_decode_s"] = {n: on(b, lambda: inf.decode_latents(x, scene.h, scene.w)) for n, b in created.items()}
            for key, fns in timed.items():
                for n, seconds in _interleaved(fns, device, repeat).items():
                    results[n][key] = seconds
        maps = {n: on(b, lambda: scene.depth(pipe, num_steps=steps)) for n, b in created.items()}
        for n, seconds in _interleaved(maps, device, max(1, repeat // 2)).items():
            results[n]["depth_map_s"] = seconds
        for n, b in created.items():
            r = results[n]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            on(b, lambda: scene.depth(pipe, num_steps=steps))()
            r["depth_map_forward_passes"] = inf.last_denoise["forward_passes"]
            if device.type == "cuda":
                r["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if peak_rate:
                for k in (1, 2, 3):
                    r[f"denoise_step_{k}branch_mfu"] = flops[f"{k}branch"] / r[f"denoise_step_{k}branch_s"] / peak_rate
    finally:
        inf.backend = original
    base = results.get("eager")
    if base:
        for r in results.values():
            for k in ("denoise_step_1branch_s", "denoise_step_2branch_s", "denoise_step_3branch_s", "vae_decode_s",
                      "depth_map_s"):
                r[k[:-2] + "_speedup"] = base[k] / r[k]
    return {"contexts": [c.length for c in contexts], "latent_tokens": x.shape[0], "step_flops": flops,
            "backends": results, "unavailable": unavailable}


KNOBS = {
    "reference": {},
    "half_steps": {"num_steps": "half"},
    "cfg_interval_0.6": {"cfg_interval": (0.6, 1.0)},
    "no_image_cfg": {"cfg_image_branch": False},
    "cfg_first_2_steps": {"cfg_first_steps": 2},
    "cache_reuse_0.1": {"feature_cache": "reuse", "feature_cache_threshold": 0.1},
    "cache_taylor_0.1": {"feature_cache": "taylor", "feature_cache_threshold": 0.1},
    "fast": {"num_steps": "half", "cfg_image_branch": False, "feature_cache": "taylor", "feature_cache_threshold": 0.1},
    "one_step_no_cfg": {"num_steps": 2, "cfg_text_scale": 1.0},
}


def depth_eval_set(split_dir: str, limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB, metres) pairs of a data split's Stage-1 depth rows (`stage1.jsonl`: `rgb_image`,
    `depth_image` as uint16 with `depth_scale`), read directly so the model package needs no
    training code."""
    from pathlib import Path

    from PIL import Image

    root, pairs = Path(split_dir), []
    with open(root / "stage1.jsonl") as f:
        for row in map(json.loads, f):
            if row["task"] != "depth":
                continue
            raw = np.asarray(Image.open(root / row["depth_image"])).astype(np.float32)
            depth = np.where(raw > 0, raw / float(row.get("depth_scale", 1000.0)), np.nan).astype(np.float32)
            pairs.append((np.asarray(Image.open(root / row["rgb_image"]).convert("RGB")), depth))
            if len(pairs) >= limit:
                break
    return pairs


def knobs(pipe, scene: Scene, repeat: int, eval_data: str | None, eval_images: int,
          reference_overrides: dict | None = None) -> dict:
    """Each knob against the reference (the checkpoint's depth settings, with `reference_overrides`
    on top, e.g. COOPER's evaluation settings for a checkpoint whose default is one step), in the
    same run."""
    reference_overrides = dict(reference_overrides or {})
    reference = pipe.settings("depth", **reference_overrides)
    samples = None
    if eval_data:
        samples = depth_eval_set(eval_data, eval_images)
    device, rows = pipe.inferencer.device, {}
    ref_map = None
    every = {}
    for name, knob in KNOBS.items():
        settings = {**reference_overrides,
                    **{k: (max(2, (reference.num_steps + 1) // 2) if v == "half" else v) for k, v in knob.items()}}
        out = scene.depth(pipe, **settings)
        row = {"settings": settings, "forward_passes": pipe.inferencer.last_denoise["forward_passes"],
               "cached_steps": pipe.inferencer.last_denoise["cached_steps"]}
        if ref_map is None:
            ref_map = out.relative
        row["mean_abs_change_vs_reference"] = float(np.abs(out.relative - ref_map).mean())
        if samples:
            scores = [depth_metrics(pipe.depth(rgb, **settings).relative, gt, pipe.depth_range, align=True)
                      for rgb, gt in samples]
            scores = [m for m in scores if m]
            row.update({f"eval_{k}": float(np.mean([m[k] for m in scores])) for k in scores[0]} if scores else {})
        rows[name] = row
        every[name] = lambda settings=settings: scene.depth(pipe, **settings)
    # each setting has just run once (its quality map): that was the warm-up
    for name, seconds in _interleaved(every, device, max(1, repeat // 2), warmup=False).items():
        rows[name]["depth_map_s"] = seconds
    for row in rows.values():
        row["speedup"] = rows["reference"]["depth_map_s"] / row["depth_map_s"]
    return {"reference_settings": {"num_steps": reference.num_steps, "cfg_interval": reference.cfg_interval,
                                   "cfg_text_scale": reference.cfg_text_scale, "cfg_img_scale": reference.cfg_img_scale},
            "eval_images": len(samples) if samples else 0, "knobs": rows}


def memory_plans(make_pipe, plans, scene_size: int, steps: int) -> dict:
    """Each plan on a freshly built model: weights on the device, then peak memory of a depth map."""
    rows = {}
    for plan in plans:
        pipe = make_pipe()
        device = pipe.inferencer.device
        did = apply_memory_plan(pipe.inferencer.model, plan)
        row = {"applied": did, "weights_on_device_gib": bytes_on(pipe.inferencer.model, device) / 2**30}
        scene = Scene(pipe, scene_size)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        scene.depth(pipe, num_steps=steps)
        _sync(device)
        row["depth_map_s"] = time.perf_counter() - start  # one map (the first: includes warm-up)
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows[plan] = row
        del pipe, scene
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help=f"checkpoint directory (default {BUNDLED_CHECKPOINT})")
    parser.add_argument("--preset", default=None, help="with --random-weights: bagel-7b, bagel-tiny, cooper-small")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--size", type=int, default=256,
                        help="square input image side (pixels), capped to what the checkpoint covers")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of a whole depth map")
    parser.add_argument("--backends", default="eager",
                        help="backends to time, e.g. eager,compile,onnxruntime,tensorrt (eager first: the "
                             "others are reported as speed-ups against it; those that cannot run here are "
                             "listed as unavailable with the reason)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the compile backend")
    parser.add_argument("--onnx-dir", default=None, help="exported graphs (default: the cache)")
    parser.add_argument("--knobs", action="store_true", help="time the sampling knobs against the reference")
    parser.add_argument("--eval-data", default=None, help="with --knobs: a synthetic split for AbsRel / delta1")
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--knob-reference", default=None,
                        help='with --knobs: JSON settings of the reference, e.g. \'{"num_steps": 9, "cfg_text_scale": 3.0}\'')
    parser.add_argument("--memory-plans", default=None, help="comma-separated plans, e.g. none,int8,fp8,maps")
    parser.add_argument("--no-stages", action="store_true", help="skip ViT/VAE/prefill/text timings")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    if args.random_weights:
        name = args.preset or "cooper-small"

        def make_pipe():
            return random_pipeline(name, args.device, dtype)
    else:
        name = args.checkpoint or str(BUNDLED_CHECKPOINT)

        def make_pipe():
            return CooperPipeline.from_pretrained(name, device=args.device, dtype=dtype)
    pipe = make_pipe()
    device = torch.device(args.device)
    results = {"model": name, "device": args.device, "dtype": dtype, "torch": torch.__version__,
               "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
    scene = Scene(pipe, args.size)
    results.update(height=scene.h, width=scene.w)
    peak = None
    if device.type == "cuda":
        peak = matmul_rate(device, _dtype(dtype))
        results["matmul_tflops_measured"] = peak / 1e12
    if not args.no_stages:
        results.update(stages(pipe, scene, args.repeat, args.text_tokens))
    options = {"compile": {"mode": args.compile_mode} if args.compile_mode else {},
               "onnxruntime": {"onnx_dir": args.onnx_dir} if args.onnx_dir else {}}
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    results.update(backends(pipe, scene, names, args.repeat, args.steps, options, peak))
    results.update(results["backends"].get("eager", {}))  # the reference figures at the top level too
    if args.knobs:
        results["knobs"] = knobs(pipe, scene, args.repeat, args.eval_data, args.eval_images,
                                 json.loads(args.knob_reference) if args.knob_reference else None)
    if args.memory_plans:
        del pipe
        gc.collect()
        results["memory_plans"] = memory_plans(make_pipe, args.memory_plans.split(","), args.size, args.steps)
    if device.type == "cpu":
        import resource

        results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    if args.json:
        print(json.dumps(results, default=str))
        return
    _print(results)


def _print(results, indent=""):
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print(value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{str(key):34s} {value:.4g}")
        else:
            print(f"{indent}{str(key):34s} {value}")


if __name__ == "__main__":
    main()
