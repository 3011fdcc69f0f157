"""Hand-made checks of the math: masks, positions, CFG, schedule, tables, and agreement of the
KV-cache inference path with one packed forward over the whole sequence."""

import numpy as np
import pytest
import torch

from cooper_model.config import preset
from cooper_model.inference import Inferencer, combine_cfg, shifted_timesteps
from cooper_model.modeling import (CooperModel, causal_mask, flattened_position_ids, packed_attention_mask, patchify,
                                   sincos_2d_table, unpatchify)
from cooper_model.packing import PackedSequence, forward_packed
from cooper_model.autoencoder import FluxAutoencoder
from cooper_model.tokenizer import byte_level_tokenizer


@pytest.fixture(scope="module")
def inferencer():
    torch.manual_seed(0)
    config = preset("bagel-tiny")
    model = CooperModel(config).eval()
    with torch.no_grad():  # upstream zero-initialises llm2vae; random here so velocities are informative
        model.llm2vae.weight.normal_(0, 0.5)
        model.llm2vae.bias.normal_(0, 0.1)
    vae = FluxAutoencoder(config.vae).eval()
    return Inferencer(model, vae, byte_level_tokenizer())


def test_packed_mask_hand_made():
    # text(2) | full image(3) | noise image(2) | text(2)
    mask = packed_attention_mask([2, 3, 2, 2], ["causal", "full", "noise", "causal"])
    T, F = True, False
    expected = torch.tensor([
        [T, F, F, F, F, F, F, F, F],
        [T, T, F, F, F, F, F, F, F],
        [T, T, T, T, T, F, F, F, F],
        [T, T, T, T, T, F, F, F, F],
        [T, T, T, T, T, F, F, F, F],
        [T, T, T, T, T, T, T, F, F],
        [T, T, T, T, T, T, T, F, F],
        [T, T, T, T, T, F, F, T, F],  # text after the noisy image never sees it
        [T, T, T, T, T, F, F, T, T],
    ])
    assert torch.equal(mask, expected)


def test_packed_mask_keeps_samples_apart():
    mask = packed_attention_mask([2, 2], ["causal", "causal"], sample_lens=[2, 2])
    assert not mask[2:, :2].any() and not mask[:2, 2:].any()


def test_causal_mask_with_cache():
    m = causal_mask(2, 3)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_cfg_arithmetic_hand_made():
    v, vt, vi = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    # no renorm effect when the guided norm is below the conditional one: min clamp at 1
    out = combine_cfg(v, vt, vi, text_scale=3.0, img_scale=1.0, renorm_type="global")
    # v' = 1 + 3 (2 - 1) = 4, renorm scale = |v| / |v'| = 0.5 -> 2
    assert torch.allclose(out, torch.tensor([[2.0, 0.0]]))
    out = combine_cfg(v, vt, vi, text_scale=3.0, img_scale=2.0, renorm_type="global", renorm_min=1.0)
    # v' = 4, v'' = 0 + 2 (4 - 0) = 8, renorm clamped to min 1 -> 8
    assert torch.allclose(out, torch.tensor([[8.0, 0.0]]))
    out = combine_cfg(v, vt, vi, text_scale=3.0, img_scale=2.0, renorm_type="text_channel")
    # text_channel renormalises v' to |v| = 2 first, then the image step: 0 + 2 (2 - 0) = 4
    assert torch.allclose(out, torch.tensor([[4.0, 0.0]]))
    # text scale <= 1 disables guidance altogether, as upstream
    assert torch.equal(combine_cfg(v, vt, vi, 1.0, 5.0), v)
    with pytest.raises(ValueError):
        combine_cfg(v, vt, vi, 2.0, 1.0, renorm_type="nope")


def test_channel_renorm_is_per_token():
    v = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    vt = torch.zeros_like(v)
    out = combine_cfg(v, vt, vt, 2.0, 1.0, renorm_type="channel")
    assert torch.allclose(out, v)  # each token scaled back to its own conditional norm


def test_shifted_schedule():
    t = shifted_timesteps(5, 3.0)
    assert t[0] == 1.0 and t[-1] == 0.0 and len(t) == 5
    raw = torch.linspace(1, 0, 5)
    assert torch.allclose(t, 3 * raw / (1 + 2 * raw))
    assert (t[:-1] > t[1:]).all()


def test_sincos_table_layout():
    table = sincos_2d_table(8, 3)
    # row index h*3 + w; first half encodes w, second half h; each half is [sin | cos]
    h, w = 2, 1
    row = table[h * 3 + w]
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    assert np.allclose(row[:4], np.concatenate([np.sin(w * omega), np.cos(w * omega)]))
    assert np.allclose(row[4:], np.concatenate([np.sin(h * omega), np.cos(h * omega)]))


def test_patchify_order_and_inverse():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (6, 8)
    # first token = top-left patch, flattened (row, col, channel)
    assert tokens[0].tolist() == [x[0, 0, 0], x[1, 0, 0], x[0, 0, 1], x[1, 0, 1], x[0, 1, 0], x[1, 1, 0], x[0, 1, 1], x[1, 1, 1]]
    assert torch.equal(unpatchify(tokens, 2, 3, 2, 2), x)
    assert flattened_position_ids(28, 42, 14, 7).tolist() == [0, 1, 2, 7, 8, 9]


def test_rope_positions_follow_upstream(inferencer):
    ctx = inferencer.new_context()
    ctx.add_text("ab")  # <|im_start|> a b <|im_end|>: 4 positions
    assert (ctx.rope, ctx.length) == (4, 4)
    ctx.add_image(np.zeros((40, 40, 3), np.uint8), vit=True, vae=True)  # two images, one position each
    assert ctx.rope == 6
    vae_tokens = (64 // 16) ** 2 + 2  # 40 px -> min short edge 64 -> 4x4 latent tokens
    vit_tokens = (42 // 14) ** 2 + 2  # 40 px -> min short edge 42 -> 3x3 patches
    assert ctx.length == 4 + vae_tokens + vit_tokens


def _context_and_packed(inferencer, text="where?", with_image=True, generator_seed=0):
    """The same conversation through the KV cache and as one packed sequence."""
    cfg = inferencer.config
    rng = torch.Generator().manual_seed(generator_seed)
    image = (torch.rand(3, 48, 64, generator=rng) * 2 - 1)
    latent = torch.randn(16, 8, 8, generator=rng)
    ctx = inferencer.new_context()
    seq = PackedSequence(inferencer.tokens)
    ctx.add_text("system")
    seq.add_text(inferencer.encode_text("system"))
    if with_image:
        inferencer.add_latent_image(ctx, latent)
        seq.add_latent_image(latent, cfg.latent_patch_size, cfg.vae.downsample, cfg.max_latent_size)
        inferencer.add_vit_image(ctx, image[:, :42, :56])
        seq.add_vit_image(image[:, :42, :56], cfg.vit.patch_size, cfg.vit_max_num_patch_per_side)
    return ctx, seq


def test_kv_cache_text_logits_match_packed_forward(inferencer):
    ctx, seq = _context_and_packed(inferencer)
    hidden = inferencer.add_text(ctx, "how far?")
    seq.add_text(inferencer.encode_text("how far?"), loss=True)
    packed = forward_packed(inferencer.model, seq)
    cached_logits = inferencer.model.logits(hidden[:-1])
    assert torch.allclose(cached_logits, packed["logits"], atol=1e-5, rtol=1e-5)


def test_kv_cache_velocity_matches_packed_forward(inferencer):
    ctx, seq = _context_and_packed(inferencer)
    ctx.add_text("depth please")
    seq.add_text(inferencer.encode_text("depth please"))
    x_t = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    t = 0.7
    v_cached = inferencer.velocity(ctx, x_t, t, 64, 64)
    seq.add_latent_image(unpatchify(x_t, 4, 4, 2, 16), 2, 8, inferencer.config.max_latent_size, t=t, noisy=True)
    v_packed = forward_packed(inferencer.model, seq)["velocity"]
    assert v_cached.abs().max() > 1e-3
    assert torch.allclose(v_cached, v_packed.float(), atol=1e-5, rtol=1e-5)


def test_noisy_latents_invisible_to_text_and_routed_to_generation_expert(inferencer):
    ctx, seq = _context_and_packed(inferencer, with_image=False)
    seq.add_latent_image(torch.randn(16, 4, 4), 2, 8, 8, t=0.5, noisy=True)
    seq.add_text(inferencer.encode_text("after"), loss=True)
    base = forward_packed(inferencer.model, seq)["logits"]
    seq.latents[-1] = seq.latents[-1] + 100.0  # change the noisy image only
    assert torch.allclose(forward_packed(inferencer.model, seq)["logits"], base, atol=1e-6)
    # text logits never touch the generation expert's weights
    model = inferencer.model
    saved = model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.clone()
    with torch.no_grad():
        model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.normal_()
    try:
        ctx2, _ = _context_and_packed(inferencer, with_image=False)
        logits = model.logits(inferencer.add_text(ctx2, "after"))
        ctx3, _ = _context_and_packed(inferencer, with_image=False)
        with torch.no_grad():
            model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.copy_(saved)
        assert torch.allclose(logits, model.logits(inferencer.add_text(ctx3, "after")), atol=1e-6)
    finally:
        with torch.no_grad():
            model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.copy_(saved)


def _packed_sampler(inferencer, prefix_text, x, timesteps, cfg=None):
    """Euler sampling that recomputes the whole packed sequence every step (no cache)."""
    cfg_c = inferencer.config
    for i in range(len(timesteps) - 1):
        t = float(timesteps[i])

        def v_of(with_text: bool, with_image: bool):
            _, seq = _context_and_packed(inferencer, with_image=with_image)
            if with_text:
                seq.add_text(inferencer.encode_text(prefix_text))
            seq.add_latent_image(unpatchify(x, 4, 4, 2, 16), 2, 8, cfg_c.max_latent_size, t=t, noisy=True)
            return forward_packed(inferencer.model, seq)["velocity"].float()

        v = v_of(True, True)
        if cfg is not None:
            v = combine_cfg(v, v_of(False, True), v_of(True, False), cfg[0], cfg[1], "global")
        x = x - v * float(timesteps[i] - timesteps[i + 1])
    return x


@pytest.mark.parametrize("guided", [False, True])
def test_four_step_generation_matches_uncached_sampler(inferencer, guided):
    from cooper_model.inference import ImageGenerationSettings

    ctx, _ = _context_and_packed(inferencer)
    cfg_text = ctx.copy()
    cfg_img, _ = _context_and_packed(inferencer, with_image=False)
    ctx.add_text("depth please")
    cfg_img.add_text("depth please")
    noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    settings = ImageGenerationSettings(num_steps=5, timestep_shift=3.0, cfg_text_scale=4.0 if guided else 1.0,
                                       cfg_img_scale=2.0 if guided else 1.0, cfg_interval=(0.0, 1.0))
    cached = inferencer.generate_latents(ctx, 64, 64, settings, cfg_text, cfg_img, noise=noise.clone())
    reference = _packed_sampler(inferencer, "depth please", noise.clone(), shifted_timesteps(5, 3.0),
                                cfg=(4.0, 2.0) if guided else None)
    assert (cached - noise).abs().max() > 1e-3
    assert torch.allclose(cached, reference, atol=1e-4, rtol=1e-4)
