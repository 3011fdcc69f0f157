"""The BAGEL-MoT network that COOPER is built on, in one file.

State-dict names and shapes are those of the released checkpoint (`reference/bagel-7b-mot.params.tsv`):
module registration order is the checkpoint's order. Everything here works on *packed* sequences of
one sample: a [N, hidden] tensor of tokens, an integer RoPE position per token, and a routing that
says which tokens use the generation expert (`*_moe_gen` weights: VAE latent tokens) and which the
understanding expert (text and ViT tokens). Attention is shared over the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipMLP

from .config import CooperConfig

# --------------------------------------------------------------------------------------------
# Position tables and small modules
# --------------------------------------------------------------------------------------------


def sincos_2d_table(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos table [grid_size**2, embed_dim], row index h * grid_size + w.

    As upstream (DiT's recipe): the first half of the channels encodes the column (w), the second
    half the row (h), each as [sin | cos] with frequencies 1 / 10000**(2i/d)."""

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([one_axis(embed_dim // 2, w), one_axis(embed_dim // 2, h)], axis=1)


def flattened_position_ids(height: int, width: int, patch: int, max_per_side: int) -> torch.Tensor:
    """Index into a (max_per_side x max_per_side) table for each patch, row-major ("extrapolate")."""
    rows, cols = height // patch, width // patch
    return (torch.arange(rows)[:, None] * max_per_side + torch.arange(cols)).flatten()


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)*(W/p), p*p*C], each patch flattened in (row, column, channel) order."""
    c, h, w = image.shape
    image = image.reshape(c, h // patch, patch, w // patch, patch)
    return torch.einsum("chpwq->hwpqc", image).reshape(-1, patch * patch * c)


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, patch: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify`: [rows*cols, p*p*C] -> [C, rows*p, cols*p]."""
    x = tokens.reshape(rows, cols, patch, patch, channels)
    return torch.einsum("hwpqc->chpwq", x).reshape(channels, rows * patch, cols * patch)


class PositionEmbedding(nn.Module):
    """A frozen sin-cos table stored as a parameter, as upstream (so it is in the state dict)."""

    def __init__(self, max_per_side: int, hidden_size: int):
        super().__init__()
        self.max_per_side = max_per_side
        self.hidden_size = hidden_size
        self.pos_embed = nn.Parameter(torch.zeros(max_per_side**2, hidden_size), requires_grad=False)
        self.reset_table()

    def reset_table(self) -> None:
        if self.pos_embed.device.type == "meta":
            return
        table = torch.from_numpy(sincos_2d_table(self.hidden_size, self.max_per_side)).float()
        with torch.no_grad():
            self.pos_embed.copy_(table.to(self.pos_embed.dtype))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the raw flow time t in [0, 1] ([cos | sin], 256 channels) + MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.reshape(-1, 1).float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class MLPConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------
# Routing and attention masks
# --------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """Which packed tokens use which expert. `gen` is None when every token is an understanding
    token (text, ViT): then the split costs nothing.

    One routing is handed to every layer, and with a device map the layers sit on several devices;
    accelerate's hooks move tensors but not this dataclass, so each layer takes the indices on its
    input's device, copied once per device."""

    und: torch.Tensor | None
    gen: torch.Tensor | None
    num_tokens: int
    _placed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_gen_mask(cls, gen_mask: torch.Tensor) -> "Routing":
        n = gen_mask.numel()
        if not bool(gen_mask.any()):
            return cls(None, None, n)
        return cls(torch.nonzero(~gen_mask).flatten(), torch.nonzero(gen_mask).flatten(), n)

    def indices(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(und, gen) on `device`."""
        if self.gen is None or self.gen.device == device:
            return self.und, self.gen
        if device not in self._placed:
            self._placed[device] = (None if self.und is None else self.und.to(device), self.gen.to(device))
        return self._placed[device]

    def apply(self, x: torch.Tensor, und_fn, gen_fn) -> torch.Tensor:
        if self.gen is None:
            return und_fn(x)
        und, gen = self.indices(x.device)
        gen_out = gen_fn(x[gen])
        out = gen_out.new_empty((self.num_tokens, *gen_out.shape[1:]))
        out[gen] = gen_out
        if und is not None and und.numel():
            out[und] = und_fn(x[und]).to(gen_out.dtype)
        return out


def causal_mask(num_query: int, num_past: int, device=None) -> torch.Tensor:
    """New tokens see the whole cache and, among themselves, only earlier tokens."""
    q = torch.arange(num_query, device=device)[:, None] + num_past
    k = torch.arange(num_past + num_query, device=device)[None, :]
    return k <= q


def packed_attention_mask(split_lens: list[int], attn_modes: list[str], sample_lens: list[int] | None = None,
                          device=None) -> torch.Tensor:
    """Dense boolean mask (True = may attend) of a packed training sequence, as upstream's
    `create_sparse_mask`: `causal` splits are causal; `full` splits (clean ViT/VAE images) see
    everything before them and each other; `noise` splits (latents being denoised) likewise, but
    no token outside a noise split may attend to it. Samples never see each other."""
    total = sum(split_lens)
    sample_lens = sample_lens or [total]
    if sum(sample_lens) != total:
        raise ValueError("sample_lens must add up to the split lengths")
    split_id = torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens))
    modes = [m if m in ("causal", "full", "noise") else None for m in attn_modes]
    if None in modes:
        raise ValueError(f"unknown attention mode in {attn_modes}")
    is_full = torch.tensor([m in ("full", "noise") for m in modes])[split_id]
    is_noise = torch.tensor([m == "noise" for m in modes])[split_id]
    sample_id = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens))
    idx = torch.arange(total)
    causal = idx[None, :] <= idx[:, None]
    same_split = split_id[:, None] == split_id[None, :]
    full = same_split & is_full[:, None]
    hidden_noise = is_noise[None, :] & ~same_split
    same_sample = sample_id[:, None] == sample_id[None, :]
    return (same_sample & (causal | full) & ~hidden_noise).to(device)


# --------------------------------------------------------------------------------------------
# Qwen2 Mixture-of-Transformers decoder
# --------------------------------------------------------------------------------------------


class MoTAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        h, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Registration order is the checkpoint's: und projections, their norms, then the gen twins.
        self.q_proj = nn.Linear(h, q_dim, bias=True)
        self.k_proj = nn.Linear(h, kv_dim, bias=True)
        self.v_proj = nn.Linear(h, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, h, bias=False)
        self.q_norm = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.q_norm_moe_gen = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm_moe_gen = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.q_proj_moe_gen = nn.Linear(h, q_dim, bias=True)
        self.k_proj_moe_gen = nn.Linear(h, kv_dim, bias=True)
        self.v_proj_moe_gen = nn.Linear(h, kv_dim, bias=True)
        self.o_proj_moe_gen = nn.Linear(q_dim, h, bias=False)

    def _qkv(self, x, q_proj, k_proj, v_proj, q_norm, k_norm):
        q = q_norm(q_proj(x).view(-1, self.num_heads, self.head_dim))
        k = k_norm(k_proj(x).view(-1, self.num_kv_heads, self.head_dim))
        v = v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        return torch.cat([q, k, v], dim=1)

    def forward(self, x, cos, sin, routing: Routing, past_kv, mask):
        qkv = routing.apply(
            x,
            lambda t: self._qkv(t, self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm),
            lambda t: self._qkv(t, self.q_proj_moe_gen, self.k_proj_moe_gen, self.v_proj_moe_gen,
                                self.q_norm_moe_gen, self.k_norm_moe_gen),
        )
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=0)
            v = torch.cat([past_kv[1], v], dim=0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=None if mask is None else mask[None, None], enable_gqa=True,
        )[0].transpose(0, 1).reshape(x.shape[0], -1)
        out = routing.apply(out, self.o_proj, self.o_proj_moe_gen)
        return out, (k, v)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, routing: Routing, past_kv=None, mask=None):
        h = routing.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        h, kv = self.self_attn(h, cos, sin, routing, past_kv, mask)
        x = x + h
        h = routing.apply(
            x,
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)),
        )
        return x + h, kv


class MoTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False

    def forward(self, x, position_ids, routing: Routing, past_key_values=None, mask=None):
        """x: [N, hidden]. Returns the final-normed hidden states and each layer's (K, V) over
        cache + new tokens (callers keep them to extend a KV cache)."""
        cos, sin = self.rotary_emb(x, position_ids[None])
        cos, sin = cos[0], sin[0]
        new_kv = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            if self.gradient_checkpointing and self.training:
                x, kv = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, routing, past, mask, use_reentrant=False)
            else:
                x, kv = layer(x, cos, sin, routing, past, mask)
            new_kv.append(kv)
        return routing.apply(x, self.norm, self.norm_moe_gen), new_kv


class MoTForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def init_moe(self) -> None:
        """Copy every understanding weight into its `_moe_gen` twin (starting from a plain LLM)."""
        state = self.state_dict()
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "_moe_gen" in name:
                    param.copy_(state[name.replace("_moe_gen", "")])


# --------------------------------------------------------------------------------------------
# SigLIP vision encoder with NaViT packing
# --------------------------------------------------------------------------------------------


class PackedSiglipEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        # Upstream builds a Conv2d and swaps in this Linear afterwards, so the position table
        # comes first in the state dict. Linear input order is (row, column, channel) of a patch.
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipEncoderLayer(nn.Module):
    """transformers' SigLIP attention and MLP, registered in upstream's order (attention first)."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attention_mask=mask)[0]
        return x + self.mlp(self.layer_norm2(x))


class PackedSiglipEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(config) for _ in range(num_layers)])


class PackedSiglipTransformer(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.embeddings = PackedSiglipEmbeddings(config)
        self.encoder = PackedSiglipEncoder(config, num_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """patches: [N, p*p*3] of several images back to back; attention stays inside an image."""
        x = self.embeddings(patches, position_ids)[None]
        mask = None
        if len(seq_lens) > 1:
            image_id = torch.repeat_interleave(torch.arange(len(seq_lens), device=x.device),
                                               torch.tensor(seq_lens, device=x.device))
            mask = (image_id[:, None] == image_id[None, :])[None, None]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x[0])


class PackedSiglipVisionModel(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        config._attn_implementation = "sdpa"
        self.config = config
        self.vision_model = PackedSiglipTransformer(config, num_layers)

    def forward(self, patches, position_ids, seq_lens):
        return self.vision_model(patches, position_ids, seq_lens)


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


class CooperModel(nn.Module):
    """BAGEL-MoT as COOPER uses it (upstream class `Bagel`). The autoencoder is separate
    (`autoencoder.py`): it lives in its own file and stays frozen."""

    def __init__(self, config: CooperConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.language_model = MoTForCausalLM(config.llm)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)
        self.vit_model = PackedSiglipVisionModel(config.vit, config.num_vit_layers)
        self.connector = MLPConnector(config.vit.hidden_size, hidden, config.connector_act)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        if self.llm2vae.weight.device.type != "meta":
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)

    POSITION_TABLES = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")
    NO_SPLIT_MODULES = ["MoTDecoderLayer", "SiglipEncoderLayer"]

    @staticmethod
    def is_generation_parameter(name: str) -> bool:
        """Whether a parameter serves the VAE tokens alone: the MoT generation expert (`*_moe_gen`),
        the timestep embedder and the latent projections. The rest (understanding expert, token
        embeddings, LM head, ViT, connector) is what every text and ViT token goes through."""
        return "moe_gen" in name or name.startswith(("time_embedder.", "vae2llm.", "llm2vae."))

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    # Token embedding --------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit_patches(self, patches: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        x = self.vit_model(patches.to(self.dtype), position_ids, seq_lens)
        return self.connector(x) + self.vit_pos_embed(position_ids)

    def embed_latents(self, latents: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Latent patch tokens [N, 64] at flow time t (a scalar or one value per token)."""
        return self.vae2llm(latents.to(self.dtype)) + self.time_embedder(t) + self.latent_pos_embed(position_ids)

    # LLM ---------------------------------------------------------------------------------------
    def run_llm(self, x, position_ids, gen_mask, past_key_values=None, mask=None):
        return self.language_model.model(x, position_ids, Routing.from_gen_mask(gen_mask), past_key_values, mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)
