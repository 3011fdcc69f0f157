"""The stage-1 attention probe: its recorded attention is the attention the model computes, and
its per-head accounting of where the target tokens look adds up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cooper_model import modeling
from cooper_model.tokenizer import byte_level_tokenizer
from training.attention_probe import probe, recorded_attention

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "reference" / "bagel-tiny-ckpt"
SAMPLE = ROOT / "training" / "data" / "sample"


def test_recorded_probabilities_reproduce_the_attention_output():
    """Grouped-query heads, scaling and the boolean mask as SDPA applies them: probs @ v equals the
    output the model gets, and calls of another length (the ViT's) are not recorded."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 7, 16, generator=g) for h in (6, 2, 2))
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    with recorded_attention(7) as probs:
        out = modeling.F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)
        modeling.F.scaled_dot_product_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], enable_gqa=True)
    assert len(probs) == 1 and probs[0].shape == (6, 7, 7)
    assert torch.allclose(probs[0] @ v[0].repeat_interleave(3, dim=0), out[0], atol=1e-5)
    assert modeling.F.scaled_dot_product_attention is F.scaled_dot_product_attention  # restored


def test_probe_accounts_for_every_target_token_attention():
    result = probe(TINY, SAMPLE, examples=2, tokenizer=byte_level_tokenizer())
    layers = len(result["own_position"])
    assert layers > 0 and result["examples"] == 2 and result["clean_tokens"] > 1
    parts = np.array([result[k] for k in ("clean_vae", "vit", "target", "rest")])  # [4, layers, heads]
    assert (parts >= -1e-3).all() and np.allclose(parts.sum(0), 1.0, atol=1e-3)
    assert (parts[0] > 0).all()  # the target tokens do see the clean image tokens
    own = np.array(result["own_position"])
    assert np.isfinite(own).all() and (own > 0).all() and (own < result["clean_tokens"]).all()


def test_position_lookup_init_makes_target_tokens_read_the_vit_token_at_their_position():
    """From scratch, `attention_init: position_lookup` starts one query head per key group of every
    layer as a lookup of the ViT token at the target's own grid position; default init reads the
    ViT's average. Measured by the probe on the bundled preset's sizes (ViT grid = latent grid)."""
    from training.attention_probe import probe_model
    from training.engine import TrainConfig
    from training.stage1 import build

    bundled = ROOT / "cooper_model" / "checkpoints" / "cooper-small"

    def vit_own(init):
        cfg = TrainConfig.from_yaml(None, [f"data_dir={SAMPLE}", f"autoencoder={bundled}", f"tokenizer={bundled}",
                                           f"attention_init={init}", "threads=1"])
        model, vae, tokenizer, _ = build(cfg)
        result = probe_model(model.eval(), vae, tokenizer, SAMPLE, examples=2)
        return np.array(result["vit_own_position"]), np.array(result["vit"])  # [layers, heads]

    own, mass = vit_own("position_lookup")
    lookup_heads = [0, 3]  # the first query head of each of the 2 key groups
    assert (own[:, lookup_heads] > 5).all() and (mass[:, lookup_heads] > 0.5).all()
    own, _ = vit_own("default")
    assert (own < 2).all()
