"""Where a map's target tokens look: the stage-1 diagnostic of image conditioning.

    python -m training.attention_probe --checkpoint DIR --data runs/data/test [--examples 8]

A generated map can only show the image's objects if each target (noisy latent) token reads the
clean RGB tokens at its own position. This runs stage-1 examples at t = 1 (pure noise: the image
is the only source) through the packed forward and reports, per decoder layer and head:

* where the target tokens' attention goes: clean VAE tokens of the RGB, its ViT tokens, the other
  target tokens, and the rest (prompt and image delimiters); the four add up to 1;
* `own_position`: the weight on the clean VAE token at the target's own position divided by the
  mean weight on a clean VAE token. 1 = no spatial correspondence (the token reads the image's
  average); a sharp lookup among N clean tokens approaches N.
* `vit_own_position`: the same over the ViT tokens, where their grid is the latent grid (the small
  preset's: 16 px latent tokens, 14 px ViT patches of the image resized by 7/8); NaN elsewhere.

Phase 2 of the bundled cooper-small scored 0.7-2.0 in every head, on both (108 clean tokens): it
made the same room-average map for every view. Phase 3 (the position-lookup init) has one head of
layer 0 at 46 on the ViT tokens, and maps with the large objects in them. Watch these numbers rise
in a run that is learning objects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from unittest import mock

import numpy as np
import torch

from cooper_model import modeling
from cooper_model.checkpoint import load_autoencoder, load_model
from cooper_model.packing import forward_packed
from cooper_model.tokenizer import load_tokenizer

from .stage1 import one_step_batches


@contextlib.contextmanager
def recorded_attention(length: int):
    """Records the attention probabilities [heads, length, length] of every SDPA call over a
    sequence of `length` tokens (the decoder's; the ViT's own calls are shorter) while computing
    the same output as before."""
    sdpa = modeling.F.scaled_dot_product_attention
    probs: list[torch.Tensor] = []

    def spy(q, k, v, attn_mask=None, enable_gqa=False, **kw):
        if q.shape[-2] == length and k.shape[-2] == length:
            keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = (q @ keys.transpose(-1, -2)).float() / q.shape[-1] ** 0.5
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            probs.append(scores.softmax(-1)[0])
        return sdpa(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    with mock.patch.object(modeling.F, "scaled_dot_product_attention", spy):
        yield probs


def own_position(weights: torch.Tensor) -> torch.Tensor:
    """[heads, n, n] weights of n targets on n same-grid tokens -> per head: the weight on the
    token at the target's own position over the mean weight on one."""
    return torch.diagonal(weights, dim1=1, dim2=2).mean(-1) / weights.mean((1, 2))


def probe_example(model, seq) -> dict[str, np.ndarray]:
    """Per layer x head: attention mass of the target tokens on each part, and `own_position`."""
    n = len(seq.noisy_latent_index)
    noisy = torch.tensor(seq.noisy_latent_index)
    noisy_set = set(seq.noisy_latent_index)
    clean = torch.tensor([i for i in seq.latent_index if i not in noisy_set])
    if len(clean) != n:
        raise ValueError("the example needs the clean VAE copy of the RGB (no VAE dropout) at the target's size")
    vit = torch.tensor(seq.vit_index, dtype=torch.long)
    with torch.no_grad(), recorded_attention(seq.length) as probs:
        forward_packed(model, seq)
    out = {k: [] for k in ("clean_vae", "vit", "target", "rest", "own_position", "vit_own_position")}
    for p in probs:  # [heads, length, length]
        rows = p[:, noisy]
        on_clean = rows[:, :, clean]
        out["clean_vae"].append(on_clean.sum(-1).mean(-1))
        out["vit"].append(rows[:, :, vit].sum(-1).mean(-1) if len(vit) else torch.zeros(p.shape[0]))
        out["target"].append(rows[:, :, noisy].sum(-1).mean(-1))
        out["own_position"].append(own_position(on_clean))
        out["vit_own_position"].append(own_position(rows[:, :, vit]) if len(vit) == n
                                       else torch.full((p.shape[0],), float("nan")))
    out["rest"] = [1 - a - b - c for a, b, c in zip(out["clean_vae"], out["vit"], out["target"])]
    return {k: torch.stack(v).numpy() for k, v in out.items()}


def probe(checkpoint: str, data_dir: str, examples: int = 8, seed: int = 0, tokenizer=None) -> dict:
    model = load_model(checkpoint).eval()
    vae, tokenizer = load_autoencoder(checkpoint), tokenizer or load_tokenizer(checkpoint)
    return {"checkpoint": str(checkpoint), **probe_model(model, vae, tokenizer, data_dir, examples, seed)}


def probe_model(model, vae, tokenizer, data_dir: str, examples: int = 8, seed: int = 0) -> dict:
    batches = one_step_batches(model, vae, tokenizer, data_dir, seed)
    picks = np.random.default_rng(seed).permutation(len(batches.dataset))[:examples]
    seqs = [batches.example(int(i), 0)[0] for i in picks]
    runs = [probe_example(model, seq) for seq in seqs]
    mean = {k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}
    return {"examples": len(runs), "clean_tokens": len(seqs[0].noisy_latent_index),
            **{k: np.round(v, 4).tolist() for k, v in mean.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="a split with stage1.jsonl")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = probe(args.checkpoint, args.data, args.examples)
    print(f"{result['checkpoint']}: {result['examples']} depth examples at t = 1, {result['clean_tokens']} clean tokens "
          "(own_position 1 = no correspondence)")
    for layer, (own, vit_own) in enumerate(zip(result["own_position"], result["vit_own_position"])):
        parts = " ".join(f"{k} {np.mean(result[k][layer]):.2f}" for k in ("clean_vae", "vit", "target", "rest"))
        print(f"  layer {layer}: own_position per head {' '.join(f'{x:.2f}' for x in own)}; "
              f"on the ViT {' '.join(f'{x:.1f}' for x in vit_own)}; mass {parts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
