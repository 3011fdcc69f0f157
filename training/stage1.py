"""Stage 1 of COOPER: auxiliary modality generation (AMG, "BAGEL-PE").

    python -m training.stage1 --config training/configs/stage1_small.yaml [key=value ...]
    accelerate launch --config_file training/configs/accelerate/fsdp.yaml -m training.stage1 --config ...

Each example is BAGEL's editing sequence (upstream `pretrain_unified_depth.py`):
    [RGB as clean VAE latents] [RGB as ViT patches] [<depth-estimation>/<segmentation> prompt]
    [target map as noisy VAE latents x_t]  -> flow-matching MSE on v = eps - x0 at the noisy tokens.
Timesteps are logit-normal, t = sigmoid(N(0, 1)), then shifted s t / (1 + (s - 1) t); a share
`one_step_fraction` of examples is put at t = 1, the single step of the fast one-step sampler, in the
manner of Marigold's E2E-FT (which found the one-step fine-tune beats 50-step sampling). Conditional
dropout drops the prompt, the ViT copy or the VAE copy per example (CFG training; COOPER used 0).
The ViT and the autoencoder can be frozen (upstream freezes both). The EMA weights are what ships.

The frozen autoencoder's moments of every image are cached in memory on first use: the encoder then
runs once per image and flip, and each step only samples from the cached Gaussian.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn

from cooper_model import image_processor as ip
from cooper_model.autoencoder import FluxAutoencoder
from cooper_model.checkpoint import load_autoencoder, load_model
from cooper_model.codecs import default_palette
from cooper_model.config import preset
from cooper_model.modeling import CooperModel, patchify
from cooper_model.packing import PackedSequence, forward_packed
from cooper_model.tokenizer import SpecialTokens, load_tokenizer

from .engine import Trainer, TrainConfig, example_rng, torch_generator
from .stage1_data import Stage1Dataset

DEFAULTS = dict(
    data_dir=None,  # split directory with stage1.jsonl
    init_from=None,  # a release-layout checkpoint to fine-tune (e.g. BAGEL-7B-MoT); else `preset`
    preset="cooper-small",
    autoencoder=None,  # directory with ae.safetensors (default: init_from's)
    tokenizer=None,  # directory with the tokenizer (default: init_from's)
    class_names=None,  # segmentation classes (default: the data engine's catalogue)
    depth_kind="metric",
    timestep_shift=1.0,
    one_step_fraction=0.0,  # share of examples trained at t = 1 exactly: the one-step map (E2E-FT)
    attention_init="default",  # or "position_lookup" (see position_lookup_init)
    position_lookup_gain=1.5,
    text_dropout=0.0,
    vit_dropout=0.0,
    vae_dropout=0.0,
    freeze_vit=True,
    freeze_vae=True,
    flip=True,
    export_dir=None,  # write the EMA weights in the release layout here at the end
    dtype="float32",
)


def logit_normal_t(rng: np.random.Generator, shift: float) -> float:
    t = 1.0 / (1.0 + math.exp(-rng.standard_normal()))
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def position_lookup_init(model: CooperModel, gain: float = 1.5) -> None:
    """Start one query head per key group of every layer as a lookup of the ViT token at the
    query's own grid position. Meant for a model from scratch; on trained weights it overwrites
    those heads and every understanding-expert key.

    A map token must read the image at its own position. Both the latent and the ViT tokens carry
    the same fixed 2-D sin-cos table, but its channels are mostly low frequencies, so two positions'
    embeddings have cosine 0.77-0.98 over the grid: random q/k projections cannot tell them apart,
    and the model never learned to (training/README.md, the attention probe). Here the generation
    expert's query and the understanding expert's key of that head project both onto the table's
    highest frequencies (sin and cos of column and row), so q.k peaks at the same position. The key
    is the understanding expert's, which the ViT tokens use and the target tokens do not: a target
    token does not find itself (or the other noise tokens) as a generation-expert twin would. The
    q/k norm gains set the lookup's sharpness.
    """
    llm = model.language_model.model
    head_dim, hidden = llm.layers[0].self_attn.head_dim, model.config.hidden_size
    quarter = hidden // 4  # modeling.sincos_2d_table: [sin | cos] of the column, then of the row, fastest first
    freqs = head_dim // 4
    if freqs < 1 or hidden % 4:
        raise ValueError(f"position_lookup_init needs head_dim >= 4 and hidden % 4 == 0 (got {head_dim}, {hidden})")
    dims = torch.tensor([block * quarter + i for block in range(4) for i in range(freqs)])
    lookup = torch.zeros(head_dim, hidden)
    lookup[torch.arange(head_dim), dims] = 0.1  # the scale is normalised away by q/k norm
    for layer in llm.layers:
        attn = layer.self_attn
        n_kv = attn.k_proj.weight.shape[0] // head_dim
        group = attn.q_proj_moe_gen.weight.shape[0] // head_dim // n_kv
        for kv in range(n_kv):
            k_rows = slice(kv * head_dim, (kv + 1) * head_dim)
            q_rows = slice(kv * group * head_dim, (kv * group + 1) * head_dim)  # the group's first query head
            attn.k_proj.weight[k_rows] = lookup
            attn.k_proj.bias[k_rows] = 0
            attn.q_proj_moe_gen.weight[q_rows] = lookup
            attn.q_proj_moe_gen.bias[q_rows] = 0
        attn.q_norm_moe_gen.weight.fill_(gain)
        attn.k_norm.weight.fill_(gain)


class LatentCache:
    """Moments (mean, logvar) of the frozen encoder per (image key, flip)."""

    def __init__(self, vae: FluxAutoencoder):
        self.vae = vae
        self.store: dict = {}

    @torch.no_grad()
    def moments(self, key, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.store:
            weight = self.vae.model.encoder.conv_in.weight  # moments are kept on the CPU, wherever the encoder runs
            m = self.vae.model.encoder(pixels[None].to(weight.device, weight.dtype))[0].float().cpu()
            mean, logvar = torch.chunk(m, 2, dim=0)
            self.store[key] = (mean.to(torch.bfloat16), logvar.clamp(-30, 20).to(torch.bfloat16))
        mean, logvar = self.store[key]
        return mean.float(), logvar.float()

    def sample(self, key, pixels, generator) -> torch.Tensor:
        mean, logvar = self.moments(key, pixels)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        c = self.vae.config
        return c.scale_factor * (z - c.shift_factor)


class Stage1Objective(nn.Module):
    """The loss of one pack; wraps the model so accelerate (DDP / FSDP / DeepSpeed) can wrap it."""

    def __init__(self, model: CooperModel):
        super().__init__()
        self.model = model

    def forward(self, pack: dict) -> dict:
        out = forward_packed(self.model, pack["seq"])
        target = pack["target"].to(out["velocity"].device)
        err = (out["velocity"].float() - target).pow(2).mean(dim=-1)
        return {"loss_sum": err.sum(), "count": err.numel(), "tokens": float(pack["seq"].length)}


class Stage1Batches:
    """Builds the packed sequences of a step from example indices (all randomness seeded per example)."""

    def __init__(self, dataset: Stage1Dataset, model: CooperModel, vae: FluxAutoencoder, tokenizer, cfg: TrainConfig):
        self.dataset, self.model, self.cfg = dataset, model, cfg
        self.x = cfg.extra
        self.tokens = SpecialTokens.from_tokenizer(tokenizer)
        self.prompt_ids = {}
        self.tokenizer = tokenizer
        self.cache = LatentCache(vae) if self.x["freeze_vae"] else None
        self.vae = vae
        c = model.config
        self.c = c

    def _ids(self, prompt: str) -> list[int]:
        if prompt not in self.prompt_ids:
            self.prompt_ids[prompt] = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.prompt_ids[prompt]

    def _latent(self, key, pixels, g) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.sample(key, pixels, g)
        return self.vae.encode(pixels[None], sample=True, generator=g)[0]

    def example(self, index: int, step: int) -> tuple[PackedSequence, torch.Tensor]:
        """One example's sequence and its velocity target [n_latent_tokens, 64]."""
        c, x = self.c, self.x
        rng = example_rng(self.cfg.seed, step, index)
        flip = bool(x["flip"]) and rng.random() < 0.5
        ex = self.dataset.load(index, flip=flip)
        row = self.dataset.rows[index]
        g = torch_generator(rng)
        seq = PackedSequence(self.tokens)
        drop_vae, drop_vit, drop_text = (rng.random() < x["vae_dropout"], rng.random() < x["vit_dropout"],
                                         rng.random() < x["text_dropout"])
        lp = c.latent_patch_size
        if not drop_vae:
            seq.add_latent_image(self._latent((row["rgb_image"], flip), ip.to_tensor(ex.rgb), g), lp,
                                 c.vae.downsample, c.max_latent_size)
        if not drop_vit:
            # as the pipeline does: the ViT copy is resized from the VAE-sized image
            vit = ip.to_tensor(ip.resize(ex.rgb, c.vit_transform))
            seq.add_vit_image(vit, c.vit.patch_size, c.vit_max_num_patch_per_side)
        if not drop_text:
            seq.add_text(self._ids(ex.prompt))
        x0 = self._latent((row.get("depth_image") or row.get("label_image"), flip), ex.target, g)
        # t = 1 is pure noise: the step a one-step sampler takes, so its loss is the one-step map's
        # error (Marigold E2E-FT trains that step alone). The extra draw only when enabled, so runs
        # without it keep their example streams.
        one_step = x["one_step_fraction"] > 0 and rng.random() < x["one_step_fraction"]
        t = 1.0 if one_step else logit_normal_t(rng, x["timestep_shift"])
        eps = torch.randn(x0.shape, generator=g)
        seq.add_latent_image((1 - t) * x0 + t * eps, lp, c.vae.downsample, c.max_latent_size, t=t, noisy=True)
        return seq, patchify(eps - x0, lp)

    def __call__(self, indices: list[int], step: int):
        """Examples packed in order under the token budget; returns the packs and the loss-token count."""
        packs, count = [], 0
        seq, targets = PackedSequence(self.tokens), []
        for i in indices:
            one, v = self.example(i, step)
            if seq.length and seq.length + one.length > self.cfg.max_tokens_per_pack:
                packs.append({"seq": seq, "target": torch.cat(targets)})
                seq, targets = PackedSequence(self.tokens), []
            seq.extend(one)
            targets.append(v)
            count += v.shape[0]
        packs.append({"seq": seq, "target": torch.cat(targets)})
        return packs, count


def one_step_batches(model: CooperModel, vae: FluxAutoencoder, tokenizer, data_dir, seed: int = 0,
                     tasks=("depth",)) -> Stage1Batches:
    """Stage-1 examples for measuring a checkpoint: every target at t = 1 (the one-step map; the
    image is its only source), no flips or dropout, noise fixed by (seed, example)."""
    dataset = Stage1Dataset.for_model(data_dir, model.config, tasks=tasks)
    return Stage1Batches(dataset, model, vae, tokenizer,
                         TrainConfig(seed=seed, extra={**DEFAULTS, "one_step_fraction": 1.0, "flip": False}))


def build(cfg: TrainConfig):
    x = {**DEFAULTS, **cfg.extra}
    unknown = set(cfg.extra) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown stage-1 options {sorted(unknown)}")
    cfg.extra = x
    if not x["data_dir"]:
        raise ValueError("data_dir is required")
    if x["attention_init"] not in ("default", "position_lookup"):
        raise ValueError(f"unknown attention_init {x['attention_init']!r} (default, position_lookup)")
    torch.manual_seed(cfg.seed)
    if x["init_from"]:
        model = load_model(x["init_from"], dtype=x["dtype"]).train()
        config = model.config
    else:
        config = preset(x["preset"])
        model = CooperModel(config)
        model.language_model.init_moe()
    if x["attention_init"] == "position_lookup":  # on init_from's weights it overwrites those heads
        position_lookup_init(model, x["position_lookup_gain"])
    from training.data.catalogue import CLASS_NAMES

    if not config.class_names:
        config.class_names = list(x["class_names"] or CLASS_NAMES)
        config.palette = default_palette(len(config.class_names)).tolist()
    config.depth_kind = x["depth_kind"]
    if not x["init_from"]:  # from scratch: nothing is trained until `finish` records stage 1
        config.trained_stages = []
    vae = load_autoencoder(x["autoencoder"] or x["init_from"])
    tokenizer = load_tokenizer(x["tokenizer"] or x["init_from"])
    if len(tokenizer) > config.llm.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {config.llm.vocab_size}")
    for p in vae.parameters():
        p.requires_grad_(not x["freeze_vae"])
    if x["freeze_vit"]:
        for p in model.vit_model.parameters():
            p.requires_grad_(False)
    # Stage 1 has no text loss: the LM head takes no part (DDP would flag it unused).
    model.language_model.lm_head.weight.requires_grad_(False)
    model.latent_pos_embed.pos_embed.requires_grad_(False)
    model.vit_pos_embed.pos_embed.requires_grad_(False)
    dataset = Stage1Dataset.for_model(x["data_dir"], config)
    model.train()
    return model, vae, tokenizer, dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML of TrainConfig fields and stage-1 options")
    parser.add_argument("overrides", nargs="*", help="key=value (YAML values), after the file")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    model, vae, tokenizer, dataset = build(cfg)
    trainer = Trainer(cfg, Stage1Objective(model), len(dataset))
    acc = trainer.accelerator
    acc.print(f"stage 1: {len(dataset)} examples, {trainer.num_parameters / 1e6:.2f} M trainable parameters, "
              f"{acc.num_processes} process(es), start at step {trainer.step}")
    batches = Stage1Batches(dataset, model, vae, tokenizer, cfg)
    trainer.fit(batches)
    trainer.finish(vae, tokenizer, cfg.extra["export_dir"], stage="stage1")

if __name__ == "__main__":
    main()
