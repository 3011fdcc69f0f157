"""Benchmark of the model's stages on the current device.

    python -m cooper_model.bench                                   # bundled small checkpoint, CPU
    python -m cooper_model.bench --preset bagel-7b --random-weights --device cuda --dtype bfloat16 --size 512
    python -m cooper_model.bench --checkpoint /models/COOPER --device cuda --dtype bfloat16 --json

Prints the median of `--repeat` runs for: ViT encode, VAE encode, context prefill, one denoise step
per CFG branch count (1, 2, 3 forward passes), VAE decode, a whole depth map, text tokens/s, and
peak memory. Random weights (`--random-weights`) time the real sizes without the real files.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from . import image_processor as ip
from .autoencoder import FluxAutoencoder
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


def run(pipe: CooperPipeline, size: int, repeat: int, steps: int, text_tokens: int) -> dict:
    inf, cfg = pipe.inferencer, pipe.config
    device = inf.device
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    size = min(size, cfg.max_latent_size * cfg.latent_downsample)  # what the checkpoint's tables cover
    vae_t = ip.ImageTransformConfig(size, min(size, cfg.vae_transform.min_size), cfg.vae_transform.stride)
    vit_size = min(size, cfg.vit_max_num_patch_per_side * cfg.vit.patch_size)
    vit_t = ip.ImageTransformConfig(vit_size, min(vit_size, cfg.vit_transform.min_size), cfg.vit_transform.stride)
    image = ip.resize(ip.as_pil_rgb(rgb), vae_t)
    h, w = image.height, image.width
    pixels = ip.to_tensor(image)[None].to(device)
    vit_pixels = ip.to_tensor(ip.resize(image, vit_t))
    results = {"height": h, "width": w}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    with torch.inference_mode():
        results["vit_encode_s"] = _time(lambda: inf.add_vit_image(inf.new_context(vae_t, vit_t), vit_pixels), device, repeat)
        results["vae_encode_s"] = _time(lambda: inf.vae.encode(pixels), device, repeat)

        def prefill():
            ctx = inf.new_context(vae_t, vit_t)
            ctx.add_image(image)
            ctx.add_text("<depth-estimation>Estimate the depth of the image and generate the depth map.</depth-estimation>")
            return ctx

        results["prefill_s"] = _time(prefill, device, repeat)
        ctx = prefill()
        x = inf.initial_noise(h, w).to(device)
        results["latent_tokens"] = x.shape[0]
        results["context_tokens"] = ctx.length
        step = _time(lambda: inf.velocity(ctx, x, 0.5, h, w), device, repeat)
        for branches in (1, 2, 3):
            results[f"denoise_step_{branches}branch_s"] = step * branches
        results["vae_decode_s"] = _time(lambda: inf.decode_latents(x, h, w), device, repeat)
        results["text_tokens_per_s"] = text_tokens / _time(
            lambda: inf.generate_text(ctx, max_new_tokens=text_tokens), device, max(1, repeat // 2))
    results["depth_map_s"] = _time(lambda: pipe.depth(rgb, num_steps=steps, vae_resolution=size,
                                                      vit_resolution=vit_size), device, max(1, repeat // 2))
    results["depth_map_steps"] = steps
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help=f"checkpoint directory (default {BUNDLED_CHECKPOINT})")
    parser.add_argument("--preset", default=None, help="with --random-weights: bagel-7b, bagel-tiny, cooper-small")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--size", type=int, default=256,
                        help="square input image side (pixels), capped to what the checkpoint covers")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps for the whole depth map")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    if args.random_weights:
        name = args.preset or "cooper-small"
        pipe = random_pipeline(name, args.device, dtype)
    else:
        name = args.checkpoint or str(BUNDLED_CHECKPOINT)
        pipe = CooperPipeline.from_pretrained(name, device=args.device, dtype=dtype)
    results = {"model": name, "device": args.device, "dtype": dtype, "torch": torch.__version__,
               "machine": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
    results.update(run(pipe, args.size, args.repeat, args.steps, args.text_tokens))
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
