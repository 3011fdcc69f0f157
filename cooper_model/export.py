"""The denoise step and the VAE decoder as ONNX graphs, for ONNX Runtime and TensorRT.

    python -m cooper_model.export --checkpoint DIR --out DIR --height 512 --width 512 [--dtype float16]

writes `denoise.onnx`, `vae_decoder.onnx` and `export.json` (shapes, names, versions, hashes).

The denoise graph is `Inferencer.velocity` for up to three context branches at once (conditional,
text-free, image-free), so one call does a whole CFG step:

    latents     [L, C]                     noisy latent tokens, shared by every branch
    timestep    [1]                        flow time t
    latent_pos  [L]                        rows of the latent position table
    rope_pos    [B]                        each branch's RoPE position (its context's next position)
    kv          [B, layers, 2, S, kv_heads, head_dim]   every layer's keys and values of each branch's
                                           context, zero-padded to the longest (S)
    kv_len      [B]                        each branch's real context length; the rest is masked
    -> velocity [B, L, C]

L, S and B are dynamic; layers, heads and head_dim are static (TensorRT's attention fusion fails on
grouped-query attention with dynamic head dimensions). The KV context is one tensor because
TensorRT cannot take a variable number of inputs (one input per layer would be 56 for BAGEL-7B).
The VAE decoder graph maps latents [1, z, h, w] to an image [1, 3, 8h, 8w] in [-1, 1].
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .autoencoder import FluxAutoencoder
from .modeling import CooperModel

log = logging.getLogger(__name__)

DENOISE_FILE = "denoise.onnx"
VAE_DECODER_FILE = "vae_decoder.onnx"
MANIFEST_FILE = "export.json"
DENOISE_INPUTS = ("latents", "timestep", "latent_pos", "rope_pos", "kv", "kv_len")
VAE_INPUTS = ("latent",)
# Bumped whenever the graphs' inputs, outputs or semantics change, so cached exports and engines
# made by an older version are never used.
FORMAT_VERSION = 1
OPSET = 18


# --------------------------------------------------------------------------------------------
# The graphs as modules (also what the `compile` backend compiles)
# --------------------------------------------------------------------------------------------


def _route(x: torch.Tensor, und_fn, gen_fn) -> torch.Tensor:
    """The routing of a generated image, [B, n, ...]: its start and end tokens use the
    understanding expert, the latent tokens between them the generation expert (static slices
    instead of `Routing`'s index tensors, so the graph has no data-dependent shapes)."""
    return torch.cat([und_fn(x[:, :1]), gen_fn(x[:, 1:-1]), und_fn(x[:, -1:])], dim=1)


class DenoiseStep(nn.Module):
    """`Inferencer.velocity` for B branches at once over packed, padded KV contexts (see the
    module docstring for the inputs). It uses the model's own submodules and weights."""

    def __init__(self, model: CooperModel, image_ends: torch.Tensor):
        super().__init__()
        self.model = model
        # Embeddings of <|vision_start|>, <|vision_end|>: constants of the checkpoint.
        self.register_buffer("image_ends", image_ends.detach().clone(), persistent=False)
        attn = model.language_model.model.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        # What runs one decoder layer; the compile backend swaps in a compiled version, which
        # every layer shares (same code, the weights are its inputs), so it compiles once.
        self.layer_fn = self._layer

    def forward(self, latents, timestep, latent_pos, rope_pos, kv, kv_len):
        model, lm = self.model, self.model.language_model.model
        branches, past = rope_pos.shape[0], kv.shape[3]
        tokens = model.embed_latents(latents, timestep, latent_pos)
        ends = self.image_ends.to(tokens.dtype)
        x = torch.cat([ends[:1], tokens, ends[1:]], dim=0)
        n = x.shape[0]
        x = x[None].expand(branches, n, x.shape[1]).contiguous()  # every layer sees one layout
        cos, sin = lm.rotary_emb(x, rope_pos[:, None])  # [B, 1, head_dim]: one position per image
        seen = torch.arange(past, device=kv.device)[None, :] < kv_len[:, None]
        mask = torch.cat([seen, torch.ones(branches, n, dtype=torch.bool, device=kv.device)], dim=1)[:, None, None]
        for i, layer in enumerate(lm.layers):
            x = self.layer_fn(layer, x, cos, sin, kv[:, i, 0], kv[:, i, 1], mask)
        x = _route(x, lm.norm, lm.norm_moe_gen)
        return model.velocity(x[:, 1:-1]).float()

    def _layer(self, layer, x, cos, sin, past_k, past_v, mask):
        attn = layer.self_attn
        b, n = x.shape[0], x.shape[1]
        h = _route(x, layer.input_layernorm, layer.input_layernorm_moe_gen)

        def qkv(t, q, k, v, qn, kn):
            return attn._qkv(t, q, k, v, qn, kn).reshape(t.shape[0], t.shape[1], -1, self.head_dim)

        qkv_all = _route(h, lambda t: qkv(t, attn.q_proj, attn.k_proj, attn.v_proj, attn.q_norm, attn.k_norm),
                         lambda t: qkv(t, attn.q_proj_moe_gen, attn.k_proj_moe_gen, attn.v_proj_moe_gen,
                                       attn.q_norm_moe_gen, attn.k_norm_moe_gen))
        q, k, v = qkv_all.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        k = torch.cat([past_k.to(k.dtype), k], dim=1).transpose(1, 2)  # [B, kv_heads, S + n, head_dim]
        v = torch.cat([past_v.to(v.dtype), v], dim=1).transpose(1, 2)
        # Grouped-query attention with static head counts: query head j reads kv head j // groups,
        # as SDPA's enable_gqa, written out so the exporters see plain shapes.
        groups = self.num_heads // self.num_kv_heads
        total = k.shape[2]
        k = k[:, :, None].expand(b, self.num_kv_heads, groups, total, self.head_dim).reshape(b, self.num_heads, total, self.head_dim)
        v = v[:, :, None].expand(b, self.num_kv_heads, groups, total, self.head_dim).reshape(b, self.num_heads, total, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        x = x + _route(out, attn.o_proj, attn.o_proj_moe_gen)
        return x + _route(x, lambda t: layer.mlp(layer.post_attention_layernorm(t)),
                          lambda t: layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(t)))


class VaeDecoder(nn.Module):
    """`FluxAutoencoder.decode`: latents [1, z, h, w] -> image [1, 3, 8h, 8w] in [-1, 1]."""

    def __init__(self, vae: FluxAutoencoder):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent).float()


def image_end_embeddings(inferencer) -> torch.Tensor:
    ids = torch.tensor([inferencer.tokens.start_of_image, inferencer.tokens.end_of_image], device=inferencer.device)
    with torch.no_grad():
        return inferencer.model.embed_text(ids)


def denoise_step_module(inferencer) -> DenoiseStep:
    return DenoiseStep(inferencer.model, image_end_embeddings(inferencer)).eval()


# --------------------------------------------------------------------------------------------
# Packing the KV contexts
# --------------------------------------------------------------------------------------------


@dataclass
class PackedContexts:
    kv: torch.Tensor  # [B, layers, 2, S, kv_heads, head_dim]
    kv_len: torch.Tensor  # [B] int64
    rope_pos: torch.Tensor  # [B] int64


def pack_contexts(contexts, pad_to: int | None = None, dtype: torch.dtype | None = None,
                  out: torch.Tensor | None = None) -> PackedContexts:
    """Every layer's (K, V) of each context, batch first (so the first b branches are a
    contiguous slice), zero-padded to the longest context or to `pad_to`. With `out` the keys and
    values are written into that buffer (the static buffer of a captured CUDA graph)."""
    lengths = [ctx.length for ctx in contexts]
    longest = max(lengths)
    if any(ctx.kv is None for ctx in contexts):
        raise ValueError("an empty context has no keys and values to pack")
    size = pad_to or longest
    if size < longest:
        raise ValueError(f"context of {longest} tokens does not fit a buffer of {size}")
    k0 = contexts[0].kv[0][0]
    layers, (_, heads, dim) = len(contexts[0].kv), k0.shape
    shape = (len(contexts), layers, 2, size, heads, dim)
    if out is None:
        out = torch.zeros(shape, dtype=dtype or k0.dtype, device=k0.device)
    elif out.shape[0] < len(contexts) or tuple(out.shape[1:]) != shape[1:]:
        raise ValueError(f"KV buffer of shape {tuple(out.shape)} cannot hold {shape}")
    for b, ctx in enumerate(contexts):
        n = ctx.length
        for i, (k, v) in enumerate(ctx.kv):
            out[b, i, 0, :n] = k
            out[b, i, 1, :n] = v
        out[b, :, :, n:].zero_()
    device = out.device
    return PackedContexts(out[: len(contexts)], torch.tensor(lengths, dtype=torch.long, device=device),
                          torch.tensor([ctx.rope for ctx in contexts], dtype=torch.long, device=device))


def bucket(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `length` (contexts are padded to it so shapes repeat)."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"context of {length} tokens exceeds the largest bucket {buckets[-1]}")


def context_buckets(max_context: int, smallest: int = 256) -> tuple[int, ...]:
    """Powers of two from `smallest` up to one that holds `max_context`."""
    out = [smallest]
    while out[-1] < max_context:
        out.append(out[-1] * 2)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Example inputs and export
# --------------------------------------------------------------------------------------------


def example_inputs(inferencer, height: int, width: int, branches: int = 3, context: int = 64):
    """Inputs of the denoise graph with the checkpoint's sizes (random values)."""
    config, device = inferencer.config, inferencer.device
    attn = inferencer.model.language_model.model.layers[0].self_attn
    layers = config.llm.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(*_latent_tokens(inferencer, height, width), generator=g)
    pos = inferencer._latent_positions(height, width)
    kv = torch.randn(branches, layers, 2, context, attn.num_kv_heads, attn.head_dim, generator=g)
    kv_len = torch.tensor([context - 3 * b for b in range(branches)], dtype=torch.long)
    rope = torch.tensor([10 - b for b in range(branches)], dtype=torch.long)
    dtype = inferencer.model.dtype
    return (latents.to(device), torch.tensor([0.5], device=device), pos.to(device), rope.to(device),
            kv.to(device, dtype), kv_len.to(device))


def _latent_tokens(inferencer, height, width):
    rows, cols = inferencer.latent_grid(height, width)
    return rows * cols, inferencer.config.patch_latent_dim


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    import onnx  # noqa: F401  (a clear ImportError when onnx is missing)

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                    opset_version=OPSET, external_data=True, optimize=True, verbose=False)
    program.save(str(path), external_data=_needs_external_data(module))


def _needs_external_data(module) -> bool:
    # protobuf caps one file at 2 GiB; a BAGEL-7B graph keeps its weights beside it
    return sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5 * 2**30


def export_denoise(inferencer, path: str | Path, height: int, width: int) -> Path:
    from torch.export import Dim

    path = Path(path)
    module = denoise_step_module(inferencer)
    args = example_inputs(inferencer, height, width)
    tokens, branches, context = Dim("latent_tokens", min=2), Dim("branches", min=1, max=3), Dim("context", min=2)
    dynamic = {"latents": {0: tokens}, "timestep": None, "latent_pos": {0: tokens}, "rope_pos": {0: branches},
               "kv": {0: branches, 3: context}, "kv_len": {0: branches}}
    _export(module, args, path, DENOISE_INPUTS, ("velocity",), dynamic)
    return path


def export_vae_decoder(inferencer, path: str | Path, height: int, width: int) -> Path:
    from torch.export import Dim

    path = Path(path)
    down = inferencer.config.vae.downsample
    latent = torch.randn(1, inferencer.config.latent_channels, height // down, width // down,
                         generator=torch.Generator().manual_seed(0)).to(inferencer.device)
    # diffusers' decoder halves nothing, so any size works; multiples of 2 keep the grid of patches
    h, w = Dim("latent_height", min=2), Dim("latent_width", min=2)
    _export(VaeDecoder(inferencer.vae).eval(), (latent,), path, VAE_INPUTS, ("image",), {"latent": {2: h, 3: w}})
    return path


@dataclass
class ExportManifest:
    format_version: int
    checkpoint_hash: str
    dtype: str
    height: int
    width: int
    layers: int
    kv_heads: int
    head_dim: int
    latent_dim: int
    latent_channels: int
    torch: str
    onnx: str
    files: dict  # file name -> sha256


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_hash(inferencer) -> str:
    """A hash of every tensor of the network and the autoencoder (what an export depends on)."""
    h = hashlib.sha256()
    for module in (inferencer.model, inferencer.vae):
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(image_end_embeddings(inferencer).to("cpu").float().numpy().tobytes())
    return h.hexdigest()


def export_all(inferencer, out: str | Path, height: int, width: int) -> ExportManifest:
    """Both graphs and their manifest into `out`."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    export_denoise(inferencer, out / DENOISE_FILE, height, width)
    export_vae_decoder(inferencer, out / VAE_DECODER_FILE, height, width)
    attn = inferencer.model.language_model.model.layers[0].self_attn
    manifest = ExportManifest(
        FORMAT_VERSION, weights_hash(inferencer), str(inferencer.model.dtype).removeprefix("torch."), height, width,
        inferencer.config.llm.num_hidden_layers, attn.num_kv_heads, attn.head_dim, inferencer.config.patch_latent_dim,
        inferencer.config.latent_channels, torch.__version__, onnx.__version__,
        {name: file_hash(out / name) for name in (DENOISE_FILE, VAE_DECODER_FILE)})
    (out / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    log.info("exported %s and %s to %s in %.1f s", DENOISE_FILE, VAE_DECODER_FILE, out, time.perf_counter() - start)
    return manifest


def read_manifest(out: str | Path) -> ExportManifest | None:
    file = Path(out) / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        return ExportManifest(**json.loads(file.read_text()))
    except (TypeError, ValueError):
        return None


def ensure_exported(inferencer, out: str | Path, height: int = 256, width: int = 256) -> Path:
    """`out` holds graphs of exactly these weights in this format (exported now if not)."""
    out = Path(out)
    if not export_is_current(inferencer, out):
        log.info("exporting ONNX graphs to %s (%s)", out, "stale export" if read_manifest(out) else "none yet")
        export_all(inferencer, out, height, width)
    return out


def export_is_current(inferencer, out: str | Path) -> bool:
    """Whether `out` holds both graphs, unchanged since export, of exactly these weights in this
    export format."""
    out = Path(out)
    manifest = read_manifest(out)
    return (manifest is not None and manifest.format_version == FORMAT_VERSION
            and manifest.checkpoint_hash == weights_hash(inferencer)
            and set(manifest.files) == {DENOISE_FILE, VAE_DECODER_FILE}
            and all((out / name).is_file() and file_hash(out / name) == digest for name, digest in manifest.files.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled one)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--height", type=int, default=512, help="example height (pixels); shapes stay dynamic")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 weights in the graphs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .pipeline import BUNDLED_CHECKPOINT, CooperPipeline

    pipe = CooperPipeline.from_pretrained(args.checkpoint or BUNDLED_CHECKPOINT, device=args.device, dtype=args.dtype)
    cfg = pipe.config
    side = cfg.max_latent_size * cfg.latent_downsample
    if max(args.height, args.width) > side or args.height % cfg.latent_downsample or args.width % cfg.latent_downsample:
        parser.error(f"--height/--width must be multiples of {cfg.latent_downsample} and at most {side} for this checkpoint")
    manifest = export_all(pipe.inferencer, args.out, args.height, args.width)
    print(json.dumps(asdict(manifest), indent=2))


if __name__ == "__main__":
    main()
