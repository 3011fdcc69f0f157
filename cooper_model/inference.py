"""Inference over a KV cache, as upstream's `InterleaveInferencer` does it, batch size 1.

A `Context` is the state of one conversation: the per-layer keys and values of everything added so
far, its length and the next RoPE position. Tensors in a context are never modified in place, so
`copy()` is cheap: that is how the text-free and image-free CFG contexts are kept beside the main one.

Sequence layout (upstream `prepare_prompts` / `prepare_vit_images` / `prepare_vae_images`):
- text: <|im_start|> ids <|im_end|>, causal, one position per token;
- ViT image: <|vision_start|> patches <|vision_end|>, full attention, understanding expert;
- VAE image: <|vision_start|> latent patches at t=0 <|vision_end|>, full attention, latent tokens
  on the generation expert;
- every token of an image shares one RoPE position, and the position advances by one after it;
- latents being generated use the same layout at the current position, attend to the context and
  to each other, and are never written to the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import image_processor as ip
from .autoencoder import FluxAutoencoder
from .backends.feature_cache import MODES as FEATURE_CACHE_MODES
from .backends.feature_cache import StepCache
from .config import ImageTransformConfig
from .modeling import CooperModel, causal_mask, flattened_position_ids, patchify, unpatchify
from .tokenizer import SpecialTokens

RENORM_TYPES = ("global", "channel", "text_channel")


class GenerationInterrupted(Exception):
    """A map generation stopped early because its caller's ``should_stop()`` said so (a robot node
    lets a waiting question go before the rest of a perception step)."""


def check_stop(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise GenerationInterrupted("generation interrupted by should_stop()")


@dataclass
class Context:
    inferencer: "Inferencer"
    vae_transform: ImageTransformConfig
    vit_transform: ImageTransformConfig
    kv: list | None = None
    length: int = 0
    rope: int = 0

    def copy(self) -> "Context":
        return dataclasses.replace(self, kv=None if self.kv is None else list(self.kv))

    def add_text(self, text: str) -> "Context":
        self.inferencer.add_text(self, text)
        return self

    def add_image(self, image, vit: bool = True, vae: bool = True, generator=None) -> "Context":
        self.inferencer.add_image(self, image, vit=vit, vae=vae, generator=generator)
        return self


def combine_cfg(v: torch.Tensor, v_text: torch.Tensor | None, v_img: torch.Tensor | None, text_scale: float,
                img_scale: float, renorm_type: str = "global", renorm_min: float = 0.0) -> torch.Tensor:
    """Three-branch classifier-free guidance exactly as upstream `_forward_flow`:
    v' = v_text + s_t (v - v_text), then v'' = v_img + s_i (v' - v_img), renormalised to at most
    the conditional norm. Guidance happens only when s_t > 1 (upstream ignores s_i otherwise)."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg renorm type {renorm_type!r} is not one of {RENORM_TYPES}")
    if text_scale <= 1.0:
        return v
    guided_text = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        scale = (v.norm(dim=-1, keepdim=True) / (guided_text.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
        guided_text = guided_text * scale
        return v_img + img_scale * (guided_text - v_img) if img_scale > 1.0 else guided_text
    guided = v_img + img_scale * (guided_text - v_img) if img_scale > 1.0 else guided_text
    if renorm_type == "global":
        scale = v.norm() / (guided.norm() + 1e-8)
    else:
        scale = v.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
    return guided * scale.clamp(renorm_min, 1.0)


def shifted_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """linspace(1, 0, N) mapped through t -> s t / (1 + (s - 1) t); N points give N - 1 Euler steps."""
    t = torch.linspace(1, 0, num_steps)
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class ImageGenerationSettings:
    num_steps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    # Speed knobs (defaults: upstream's sampling). False drops the image-free branch: a guided step
    # costs two forward passes instead of three.
    cfg_image_branch: bool = True
    cfg_first_steps: int | None = None  # guide only the first N steps (still inside cfg_interval)
    feature_cache: str = "none"  # "none", "reuse" (TeaCache-style), "taylor" (TaylorSeer-style)
    feature_cache_threshold: float = 0.1  # accumulated relative input change that forces a computed step

    def check_knobs(self) -> None:
        if self.cfg_first_steps is not None and int(self.cfg_first_steps) < 0:
            raise ValueError(f"cfg_first_steps must be >= 0 or None, got {self.cfg_first_steps}")
        if self.feature_cache not in FEATURE_CACHE_MODES:
            raise ValueError(f"feature_cache must be one of {', '.join(FEATURE_CACHE_MODES)}, got {self.feature_cache!r}")
        if not self.feature_cache_threshold >= 0:
            raise ValueError(f"feature_cache_threshold must be >= 0, got {self.feature_cache_threshold}")

    def guidance(self, timesteps: torch.Tensor) -> list[tuple[float, float]]:
        """(text scale, image scale) of each step; (1, 1) = unguided, one forward pass."""
        out = []
        for i in range(len(timesteps) - 1):
            t = float(timesteps[i])
            inside = self.cfg_interval[0] < t <= self.cfg_interval[1]
            if self.cfg_first_steps is not None and i >= self.cfg_first_steps:
                inside = False
            text = self.cfg_text_scale if inside else 1.0
            img = self.cfg_img_scale if inside and self.cfg_image_branch else 1.0
            out.append((text, img))
        return out


class Inferencer:
    """The model, its autoencoder, tokenizer and transforms, and the operations on contexts."""

    def __init__(self, model: CooperModel, vae: FluxAutoencoder, tokenizer, progress: bool = False):
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.tokens = SpecialTokens.from_tokenizer(tokenizer)
        self.config = model.config
        self.progress = progress
        # What runs the denoise step and the VAE decode (`backends/`); eager is the reference.
        from .backends.eager import EagerBackend
        self.backend = EagerBackend(self)
        self.last_denoise = {}  # counters of the last generate_latents: steps computed, cached, passes
        # Next tokens are chosen among the tokenizer's ids only: lm_head may have padding rows
        # (BAGEL-7B: 152,064 rows, 151,665 tokens; upstream slices its logits to 151,665).
        self.text_vocab_size = min(len(tokenizer), self.config.llm.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _positions(self, height: int, width: int, patch: int, max_side: int, what: str) -> torch.Tensor:
        """Table rows of an image's patches; an image beyond the checkpoint's tables is an error
        (upstream would index out of bounds)."""
        rows, cols = height // patch, width // patch
        if rows > max_side or cols > max_side:
            raise ValueError(f"{what} of {width}x{height} px needs {cols}x{rows} patches, but this checkpoint's "
                             f"position table covers {max_side}x{max_side} ({max_side * patch} px a side): "
                             f"use a smaller resolution")
        return flattened_position_ids(height, width, patch, max_side).to(self.device)

    def _latent_positions(self, height: int, width: int) -> torch.Tensor:
        return self._positions(height, width, self.config.latent_downsample, self.config.max_latent_size,
                               "a generated or VAE image")

    def new_context(self, vae_transform: ImageTransformConfig | None = None,
                    vit_transform: ImageTransformConfig | None = None) -> Context:
        """An empty context; images added to it are resized with these transforms (default: the
        checkpoint's)."""
        return Context(self, vae_transform or self.config.vae_transform, vit_transform or self.config.vit_transform)

    # Adding to a context --------------------------------------------------------------------
    def _extend(self, ctx: Context, embeds: torch.Tensor, positions: torch.Tensor, gen_mask: torch.Tensor,
                causal: bool) -> torch.Tensor:
        mask = causal_mask(embeds.shape[0], ctx.length, embeds.device) if causal else None
        hidden, kv = self.model.run_llm(embeds, positions.to(embeds.device), gen_mask.to(embeds.device), ctx.kv, mask)
        ctx.kv = kv
        ctx.length += embeds.shape[0]
        return hidden

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def add_text(self, ctx: Context, text: str) -> torch.Tensor:
        """Append <|im_start|> text <|im_end|>; returns the hidden states (logits come from them)."""
        ids = [self.tokens.bos] + self.encode_text(text) + [self.tokens.eos]
        return self.add_token_ids(ctx, ids)

    @torch.no_grad()
    def add_token_ids(self, ctx: Context, ids: list[int]) -> torch.Tensor:
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.arange(ctx.rope, ctx.rope + len(ids))
        hidden = self._extend(ctx, self.model.embed_text(ids_t), positions, torch.zeros(len(ids), dtype=torch.bool),
                              causal=True)
        ctx.rope += len(ids)
        return hidden

    def _image_tokens(self, inner: torch.Tensor) -> torch.Tensor:
        ends = self.model.embed_text(torch.tensor([self.tokens.start_of_image, self.tokens.end_of_image],
                                                  device=self.device))
        return torch.cat([ends[:1], inner.to(ends.dtype), ends[1:]], dim=0)

    @torch.no_grad()
    def add_image(self, ctx: Context, image, vit: bool = True, vae: bool = True, generator=None) -> None:
        """Upstream `update_context_image`: the VAE copy first (if any), then the ViT copy; each
        resizes the image with its own transform."""
        if not (vit or vae):
            raise ValueError("add_image needs vit=True or vae=True")
        image = ip.as_pil_rgb(image)
        if vae:
            pixels = ip.to_tensor(ip.resize(image, ctx.vae_transform)).to(self.device)
            latent = self.vae.encode(pixels[None], sample=True, generator=generator)[0]
            self.add_latent_image(ctx, latent)
        if vit:
            self.add_vit_image(ctx, ip.to_tensor(ip.resize(image, ctx.vit_transform)))

    @torch.no_grad()
    def add_vit_image(self, ctx: Context, pixels: torch.Tensor) -> None:
        p = self.config.vit.patch_size
        _, h, w = pixels.shape
        pos = self._positions(h, w, p, self.config.vit_max_num_patch_per_side, "a ViT image")
        patches = patchify(pixels.to(self.device), p)
        tokens = self._image_tokens(self.model.embed_vit_patches(patches, pos, [patches.shape[0]]))
        n = tokens.shape[0]
        self._extend(ctx, tokens, torch.full((n,), ctx.rope), torch.zeros(n, dtype=torch.bool), causal=False)
        ctx.rope += 1

    @torch.no_grad()
    def add_latent_image(self, ctx: Context, latent: torch.Tensor) -> None:
        """A clean (t = 0) VAE latent [16, H/8, W/8] as generation-expert tokens."""
        p = self.config.latent_patch_size
        c, hh, ww = latent.shape
        rows, cols = hh // p, ww // p
        latent = latent[:, : rows * p, : cols * p]
        pos = self._latent_positions(rows * p * self.config.vae.downsample, cols * p * self.config.vae.downsample)
        t0 = torch.zeros(1, device=self.device)
        tokens = self._image_tokens(self.model.embed_latents(patchify(latent, p), t0, pos))
        n = tokens.shape[0]
        gen_mask = torch.ones(n, dtype=torch.bool)
        gen_mask[0] = gen_mask[-1] = False
        self._extend(ctx, tokens, torch.full((n,), ctx.rope), gen_mask, causal=False)
        ctx.rope += 1

    # Text generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_text(self, ctx: Context, max_new_tokens: int = 500, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                      trace: dict | None = None) -> str:
        """Upstream `gen_text`: start from <|im_start|> at the next position, stop at <|im_end|>.
        The context is not changed (callers add the text back, re-tokenised, as upstream does).
        Only the tokenizer's ids are candidates (never lm_head's padding rows).
        `trace`, if given, receives the kept token ids (<|im_end|> included when it stopped there),
        their log-probabilities under the distribution sampled from (softmax of those logits /
        temperature, before top-p; temperature 1 when greedy) and whether it stopped at <|im_end|> (RL uses them)."""
        ctx = ctx.copy()
        sequence = [self.tokens.bos]
        current = self.tokens.bos
        logprobs, finished = [], False
        for step in range(max_new_tokens):
            hidden = self._decode_step(ctx, current)
            logits = self.model.logits(hidden[-1]).float()[: self.text_vocab_size]
            current = self._pick(logits, do_sample, temperature, top_p, generator)
            if trace is not None:
                scale = max(temperature, 1e-6) if do_sample else 1.0
                logprobs.append(float(torch.log_softmax(logits / scale, dim=-1)[current]))
            if current == self.tokens.eos or step == max_new_tokens - 1:
                finished = current == self.tokens.eos
                break  # upstream appends a token at the start of the next step, so neither is kept
            sequence.append(current)
        if trace is not None:
            ids = sequence[1:] + ([self.tokens.eos] if finished else [])
            trace.update(ids=ids, logprobs=logprobs[:len(ids)], finished=finished)
        text = self.tokenizer.decode(sequence, skip_special_tokens=False)
        return text.split("<|im_end|>")[0].split("<|im_start|>")[1]

    def _decode_step(self, ctx: Context, token: int) -> torch.Tensor:
        # One decoding step: the token joins the cache unwrapped and sees all of it.
        emb = self.model.embed_text(torch.tensor([token], device=self.device))
        hidden = self._extend(ctx, emb, torch.tensor([ctx.rope]), torch.zeros(1, dtype=torch.bool), causal=False)
        ctx.rope += 1
        return hidden

    @staticmethod
    def _pick(logits, do_sample, temperature, top_p, generator) -> int:
        if not do_sample:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            probs = probs / probs.sum()
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    # Image generation --------------------------------------------------------------------------
    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        d = self.config.latent_downsample
        return height // d, width // d

    def initial_noise(self, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        rows, cols = self.latent_grid(height, width)
        # Drawn on the CPU like upstream's `prepare_vae_latent`, so a seed means the same noise anywhere.
        return torch.randn(rows * cols, self.config.patch_latent_dim, generator=generator)

    @torch.no_grad()
    def velocity(self, ctx: Context, x_t: torch.Tensor, t: float, height: int, width: int) -> torch.Tensor:
        """One prediction of v = eps - x0 for latent tokens x_t at time t, the context read-only."""
        rows, cols = self.latent_grid(height, width)
        pos = self._latent_positions(height, width)
        t_tensor = torch.tensor([float(t)], device=self.device)
        tokens = self._image_tokens(self.model.embed_latents(x_t.to(self.device), t_tensor, pos.to(self.device)))
        n = tokens.shape[0]
        gen_mask = torch.ones(n, dtype=torch.bool, device=self.device)
        gen_mask[0] = gen_mask[-1] = False
        positions = torch.full((n,), ctx.rope, device=self.device)
        hidden, _ = self.model.run_llm(tokens, positions, gen_mask, ctx.kv, None)
        return self.model.velocity(hidden[1:-1]).float()

    @torch.no_grad()
    def generate_latents(self, ctx: Context, height: int, width: int, settings: ImageGenerationSettings,
                         cfg_text_ctx: Context | None = None, cfg_img_ctx: Context | None = None,
                         generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                         should_stop=None) -> torch.Tensor:
        """Rectified-flow Euler sampling with three-branch CFG inside the CFG interval. The
        branches of a step go to the backend together (one batched call where it can).
        ``should_stop()``, if given, is asked before each step (`GenerationInterrupted`)."""
        settings.check_knobs()
        x = (self.initial_noise(height, width, generator) if noise is None else noise).float().to(self.device)
        timesteps = shifted_timesteps(settings.num_steps, settings.timestep_shift)
        guidance = settings.guidance(timesteps)
        contexts = [ctx]
        if any(text > 1.0 for text, _ in guidance):
            if cfg_text_ctx is None:
                raise ValueError("cfg_text_scale > 1 needs a text-free context (cfg_text_ctx)")
            contexts.append(cfg_text_ctx)
            if any(text > 1.0 and img > 1.0 for text, img in guidance):
                if cfg_img_ctx is None:
                    raise ValueError("cfg_img_scale > 1 needs an image-free context (cfg_img_ctx)")
                contexts.append(cfg_img_ctx)
        step = self.backend.prepare(contexts, height, width)
        cache = StepCache(settings.feature_cache, settings.feature_cache_threshold, len(guidance))
        pos = self._latent_positions(height, width) if settings.feature_cache != "none" else None
        passes = 0
        for i in tqdm(range(len(guidance)), disable=not self.progress, desc="denoise", leave=False):
            check_stop(should_stop)
            t = float(timesteps[i])
            text_scale, img_scale = guidance[i]
            branches = 1 if text_scale <= 1.0 else 3 if img_scale > 1.0 else 2
            if pos is None:
                v = step(x, t, branches)
                passes += branches
            else:
                signal = self.model.embed_latents(x, torch.tensor([t], device=self.device), pos).float()
                before = cache.computed
                v = cache(i, t, branches, signal, lambda: step(x, t, branches))
                passes += branches * (cache.computed - before)
            if branches > 1:
                v = combine_cfg(v[0], v[1], v[2] if branches == 3 else None, text_scale, img_scale,
                                settings.cfg_renorm_type, settings.cfg_renorm_min)
            else:
                v = v[0]
            x = x - v * float(timesteps[i] - timesteps[i + 1])
        self.last_denoise = {"steps": len(guidance), "computed_steps": cache.computed if pos is not None else len(guidance),
                             "cached_steps": cache.skipped, "forward_passes": passes, "backend": self.backend.name}
        return x

    @torch.no_grad()
    def decode_latents(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latent tokens -> image [3, H, W] in the decoder's [-1, 1] range."""
        rows, cols = self.latent_grid(height, width)
        latent = unpatchify(tokens, rows, cols, self.config.latent_patch_size, self.config.latent_channels)
        return self.backend.decode(latent[None].to(self.device))[0].float()


def decode_depth01(image: torch.Tensor) -> torch.Tensor:
    """Upstream `decode_depth`: (x * 0.5 + 0.5).clamp(0, 1), mean over RGB -> [H, W] in [0, 1]."""
    return (image * 0.5 + 0.5).clamp(0, 1).mean(dim=0)
