"""The FLUX autoencoder, built from diffusers' `AutoencoderKL`, reading and writing the original
FLUX / BAGEL `ae.safetensors` layout (`encoder.down.0.block.0.conv1`, ...).

Upstream (`modeling/autoencoder.py`) encodes as `scale * (sample - shift)` where `sample` draws from
the diagonal Gaussian even at inference, and decodes as `decoder(z / scale + shift)`.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL
from torch import nn

from .config import AutoencoderConfig


def _diffusers_kwargs(cfg: AutoencoderConfig) -> dict:
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=cfg.norm_num_groups, act_fn="silu", use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True, scaling_factor=cfg.scale_factor, shift_factor=cfg.shift_factor,
    )


_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}


def flux_to_diffusers_key(key: str, num_levels: int) -> str:
    side, rest = key.split(".", 1)
    rest = re.sub(r"^norm_out\.", "conv_norm_out.", rest)
    rest = re.sub(r"^mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m.group(1)) - 1}.", rest)
    rest = re.sub(r"^mid\.attn_1\.(norm|q|k|v|proj_out)\.", lambda m: f"mid_block.attentions.0.{_ATTN[m.group(1)]}.", rest)
    level = (lambda i: i) if side == "encoder" else (lambda i: num_levels - 1 - i)
    kind = "down" if side == "encoder" else "up"
    rest = re.sub(rf"^{kind}\.(\d+)\.block\.(\d+)\.",
                  lambda m: f"{kind}_blocks.{level(int(m.group(1)))}.resnets.{m.group(2)}.", rest)
    rest = re.sub(rf"^{kind}\.(\d+)\.(downsample|upsample)\.conv\.",
                  lambda m: f"{kind}_blocks.{level(int(m.group(1)))}.{m.group(2)}rs.0.conv.", rest)
    rest = rest.replace(".nin_shortcut.", ".conv_shortcut.")
    return f"{side}.{rest}"


def diffusers_to_flux_key(key: str, num_levels: int) -> str:
    side, rest = key.split(".", 1)
    rest = re.sub(r"^conv_norm_out\.", "norm_out.", rest)
    rest = re.sub(r"^mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", rest)
    rest = re.sub(r"^mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
                  lambda m: f"mid.attn_1.{_ATTN_BACK[m.group(1)]}.", rest)
    level = (lambda i: i) if side == "encoder" else (lambda i: num_levels - 1 - i)
    kind = "down" if side == "encoder" else "up"
    rest = re.sub(rf"^{kind}_blocks\.(\d+)\.resnets\.(\d+)\.",
                  lambda m: f"{kind}.{level(int(m.group(1)))}.block.{m.group(2)}.", rest)
    rest = re.sub(rf"^{kind}_blocks\.(\d+)\.(downsample|upsample)rs\.0\.conv\.",
                  lambda m: f"{kind}.{level(int(m.group(1)))}.{m.group(2)}.conv.", rest)
    rest = rest.replace(".conv_shortcut.", ".nin_shortcut.")
    return f"{side}.{rest}"


def _is_attn_projection(flux_key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", flux_key))


def infer_autoencoder_config(shapes: dict[str, tuple[int, ...]]) -> AutoencoderConfig:
    """Read the sizes off a FLUX-layout state dict (the file carries no config)."""
    ch = shapes["encoder.conv_in.weight"][0]
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in levels)
    blocks = {int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block.")}
    return AutoencoderConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
                             z_channels=shapes["encoder.conv_out.weight"][0] // 2,
                             in_channels=shapes["encoder.conv_in.weight"][1], out_ch=shapes["decoder.conv_out.weight"][0])


class FluxAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.model = AutoencoderKL(**_diffusers_kwargs(config))

    # The original file layout ---------------------------------------------------------------
    def flux_state_dict(self) -> dict[str, torch.Tensor]:
        n = len(self.config.ch_mult)
        out = {}
        for key, value in self.model.state_dict().items():
            flux_key = diffusers_to_flux_key(key, n)
            out[flux_key] = value[:, :, None, None] if _is_attn_projection(flux_key) else value
        return out

    def flux_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.flux_state_dict().items()}

    def load_flux_state_dict(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        n = len(self.config.ch_mult)
        converted = {}
        for key, value in state.items():
            converted[flux_to_diffusers_key(key, n)] = value[:, :, 0, 0] if _is_attn_projection(key) else value
        self.model.load_state_dict(converted, strict=True, assign=assign)

    # Encode / decode ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.model.encoder.conv_in.weight.dtype

    def encode(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """images in [-1, 1], [B, 3, H, W] -> scaled latents [B, 16, H/8, W/8]. With no generator
        the noise comes from torch's global RNG, like upstream's `randn_like`."""
        moments = self.model.encoder(images.to(self.dtype))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        z = mean
        if sample:
            if generator is None:
                noise = torch.randn_like(mean)
            else:
                noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.dtype) / self.config.scale_factor + self.config.shift_factor
        return self.model.decoder(z)
