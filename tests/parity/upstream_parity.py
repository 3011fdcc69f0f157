"""Numerical parity of `cooper_model` with upstream BAGEL (ByteDance-Seed/Bagel) on the same weights.

    python tests/parity/upstream_parity.py --upstream /path/to/Bagel [--checkpoint DIR] [--prepare]

Preparing an upstream checkout (nothing of it is ever committed here):

    git clone https://github.com/ByteDance-Seed/Bagel /tmp/upstream_bagel
    pip install einops            # upstream's autoencoder needs it (or: pip install --target /tmp/upstream_bagel einops)
    python tests/parity/upstream_shims.py /tmp/upstream_bagel     # or pass --prepare below

`upstream_shims.py` (ours) writes a CPU `flash_attn_varlen_func`, replaces upstream's transformers
4.4x copies under `modeling/qwen2` and `modeling/siglip` by thin adapters of the installed
transformers, and edits upstream's `.to('cuda')` calls and hard-coded bf16 casts into no-ops so the
comparison runs in fp32 on a CPU. Its docstring lists every shim and edit.

Upstream is built as its loader (`app.py`) builds it: `Qwen2Config.from_json_file` + qk_norm,
untied embeddings, `Qwen2MoTDecoderLayer`; `SiglipVisionConfig.from_json_file` with rope=False and
one layer fewer; `BagelConfig(vit_max_num_patch_per_side, max_latent_size, latent_patch_size=2,
connector_act="gelu_pytorch_tanh")` with the sizes of the checkpoint; `convert_conv2d_to_linear`;
`ema.safetensors` and `ae.safetensors` loaded strictly. It is driven with its own `InterleaveInferencer`
methods (`update_context_text/image`, `gen_text`, `gen_image`, `interleave_inference`) and `Bagel`
methods (`prepare_vae_latent(_cfg)`, `_forward_flow`). Ours runs the same sequence through
`cooper_model.inference.Inferencer`.

Inputs are identical: byte-level token ids (<|im_start|>=257 ... <|vision_end|>=260), one 96x64
(W x H, not square) image (both sides get the same pixel tensors: upstream's transforms are given our resize +
to-tensor, so image *resizing* is not part of this comparison), the same torch seed before the VAE
sampling of the context image, and the same initial noise (upstream's `torch.randn` in
`prepare_vae_latent` is recorded and handed to ours). `llm2vae` is zero in the checkpoint (upstream
initialises it to zero), so it is set to the same random values in both before any velocity is computed.

Prints max-abs and max-relative (max-abs / max|upstream|) differences per quantity and exits 1 if
any quantity exceeds the tolerance (1e-4 on either measure).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = ROOT / "tests" / "fixtures" / "reference" / "bagel-tiny-ckpt"
TOL = 1e-4
SEED = 1234

SYSTEM = "You are a careful spatial reasoner. Answer briefly."
QUESTION = "How far is the chair from the table, in metres?"


# --------------------------------------------------------------------------------------------
# Building both models
# --------------------------------------------------------------------------------------------


def build_upstream(ckpt: Path, ours_config):
    from safetensors.torch import load_file

    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    llm_config = Qwen2Config.from_json_file(str(ckpt / "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"

    vit_config = SiglipVisionConfig.from_json_file(str(ckpt / "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers = vit_config.num_hidden_layers - 1

    ae = ours_config.vae  # sizes read off ae.safetensors; upstream's load_ae hard-codes the 7B ones
    vae_params = AutoEncoderParams(resolution=256, in_channels=ae.in_channels, downsample=8, ch=ae.ch,
                                   out_ch=ae.out_ch, ch_mult=list(ae.ch_mult), num_res_blocks=ae.num_res_blocks,
                                   z_channels=ae.z_channels, scale_factor=ae.scale_factor, shift_factor=ae.shift_factor)
    vae_model = AutoEncoder(vae_params)
    vae_model.load_state_dict(load_file(str(ckpt / "ae.safetensors")), strict=True)

    config = BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config, vae_config=vae_params,
        vit_max_num_patch_per_side=ours_config.vit_max_num_patch_per_side, connector_act="gelu_pytorch_tanh",
        latent_patch_size=2, max_latent_size=ours_config.max_latent_size,
    )
    language_model = Qwen2ForCausalLM(llm_config)
    vit_model = SiglipVisionModel(vit_config)
    model = Bagel(language_model, vit_model, config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    state = load_file(str(ckpt / "ema.safetensors"))
    model.load_state_dict(state, strict=True)  # bf16 file -> fp32 parameters
    return model.float().eval(), vae_model.float().eval()


class UpstreamTransform:
    """What upstream's `ImageTransform` offers the inferencer (`resize_transform` and `__call__`),
    here with our resize rule so that both implementations see identical pixels."""

    def __init__(self, cfg):
        self.cfg = cfg

    def resize_transform(self, image):
        from cooper_model import image_processor as ip

        return ip.resize(image, self.cfg)

    def __call__(self, image):
        from cooper_model import image_processor as ip

        return ip.to_tensor(ip.resize(image, self.cfg))


# --------------------------------------------------------------------------------------------
# Comparison table
# --------------------------------------------------------------------------------------------


class Table:
    def __init__(self):
        self.rows = []

    def add(self, name: str, ours, ref, note: str = "") -> None:
        ours = torch.as_tensor(ours).detach().double().cpu()
        ref = torch.as_tensor(ref).detach().double().cpu()
        if ours.shape != ref.shape:
            self.rows.append((name, float("inf"), float("inf"), 0.0, f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}"))
            return
        diff = (ours - ref).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        self.rows.append((name, diff, rel, scale, note))

    def add_equal(self, name: str, ours, ref) -> None:
        same = ours == ref
        self.rows.append((name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), 0.0,
                          f"ours={ours!r} upstream={ref!r}" if not same else f"identical ({ref!r})"))

    def failures(self):
        return [r for r in self.rows if not (r[1] <= TOL or r[2] <= TOL)]

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print(f"{'quantity':<{width}}  {'max_abs':>10}  {'max_rel':>10}  {'max|ref|':>9}  ok   note")
        for name, diff, rel, scale, note in self.rows:
            ok = diff <= TOL or rel <= TOL
            print(f"{name:<{width}}  {diff:10.3e}  {rel:10.3e}  {scale:9.3g}  {'yes' if ok else 'NO '}  {note}")


def kv_diff(ours_kv, up_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack every layer's K and V of both into comparable tensors [layers, 2, N, Hkv, D]."""
    ours = torch.stack([torch.stack([k, v]) for k, v in ours_kv])
    up = torch.stack([torch.stack([up_cache.key_cache[i], up_cache.value_cache[i]])
                      for i in range(len(up_cache.key_cache))])
    return ours, up


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def run(upstream_dir: Path, ckpt: Path) -> Table:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(upstream_dir))
    from PIL import Image

    from cooper_model import image_processor as ip
    from cooper_model.checkpoint import load_autoencoder, load_model
    from cooper_model.inference import ImageGenerationSettings, Inferencer
    from cooper_model.tokenizer import byte_level_tokenizer
    from data.data_utils import pil_img2rgb
    from inferencer import InterleaveInferencer

    torch.set_grad_enabled(False)
    table = Table()

    # Models ------------------------------------------------------------------------------------
    ours_model = load_model(ckpt, dtype="float32")
    ours_vae = load_autoencoder(ckpt, dtype="float32")
    up_model, up_vae = build_upstream(ckpt, ours_model.config)
    table.add("weights: every tensor of the state dict", torch.cat([v.flatten() for v in ours_model.state_dict().values()]),
              torch.cat([up_model.state_dict()[k].flatten() for k in ours_model.state_dict()]))

    g = torch.Generator().manual_seed(7)
    w = torch.randn(up_model.llm2vae.weight.shape, generator=g) * 0.1
    b = torch.randn(up_model.llm2vae.bias.shape, generator=g) * 0.1
    for m in (up_model, ours_model):
        m.llm2vae.weight.copy_(w)
        m.llm2vae.bias.copy_(b)

    tok = byte_level_tokenizer()
    new_token_ids = dict(zip(("bos_token_id", "eos_token_id", "start_of_image", "end_of_image"),
                             tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"])))
    assert list(new_token_ids.values()) == [257, 258, 259, 260], new_token_ids
    assert tok.encode(QUESTION) == tok.encode(QUESTION, add_special_tokens=False)  # upstream uses encode(prompt)

    ours = Inferencer(ours_model, ours_vae, tok)
    cfg = ours_model.config
    up = InterleaveInferencer(up_model, up_vae, tok, UpstreamTransform(cfg.vae_transform),
                              UpstreamTransform(cfg.vit_transform), new_token_ids)

    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, size=(64, 96, 3), dtype=np.uint8), "RGB")  # H=64, W=96: not square

    # Record what upstream draws or produces inside its own calls.
    seen = {}
    orig_encode, orig_decode = up_vae.encode, up_vae.decode
    orig_prepare_latent, orig_generate_image = up_model.prepare_vae_latent, up_model.generate_image

    def rec_encode(x):
        seen.setdefault("up_ctx_latent", []).append(z := orig_encode(x))
        return z

    def rec_decode(z):
        seen["up_decoded"] = out = orig_decode(z)
        return out

    def rec_prepare_latent(*a, **k):
        out = orig_prepare_latent(*a, **k)
        seen["up_noise"] = out["packed_init_noises"].clone()
        return out

    def rec_generate_image(*a, **k):
        seen["up_latents"] = out = orig_generate_image(*a, **k)
        return out

    up_vae.encode, up_vae.decode = rec_encode, rec_decode
    up_model.prepare_vae_latent, up_model.generate_image = rec_prepare_latent, rec_generate_image
    ours_encode = ours_vae.encode

    def rec_ours_encode(x, *a, **k):
        seen.setdefault("ours_ctx_latent", []).append(z := ours_encode(x, *a, **k))
        return z

    ours_vae.encode = rec_ours_encode

    # Contexts: [system text, image (VAE + ViT), question], as `interleave_inference` builds them --
    def upstream_contexts(vae: bool):
        gen = up.init_gen_context()
        cfg_text, cfg_img = copy.deepcopy(gen), copy.deepcopy(gen)
        shape = None
        for term in (SYSTEM, image, QUESTION):
            if isinstance(term, str):
                cfg_text = copy.deepcopy(gen)
                gen = up.update_context_text(term, gen)
                cfg_img = up.update_context_text(term, cfg_img)
            else:
                term = up.vae_transform.resize_transform(pil_img2rgb(term))
                gen = up.update_context_image(term, gen, vae=vae)
                shape = term.size[::-1]
                cfg_text = copy.deepcopy(gen)
        return gen, cfg_text, cfg_img, shape

    def ours_contexts(vae: bool):
        gen = ours.new_context()
        cfg_text, cfg_img = gen.copy(), gen.copy()
        for term in (SYSTEM, image, QUESTION):
            if isinstance(term, str):
                cfg_text = gen.copy()
                gen.add_text(term)
                cfg_img.add_text(term)
            else:
                gen.add_image(ip.resize(term, gen.vae_transform), vit=True, vae=vae)
                cfg_text = gen.copy()
        return gen, cfg_text, cfg_img

    torch.manual_seed(SEED)
    u_gen, u_cfg_text, u_cfg_img, shape = upstream_contexts(vae=True)
    torch.manual_seed(SEED)
    o_gen, o_cfg_text, o_cfg_img = ours_contexts(vae=True)
    H, W = shape

    table.add("context VAE latent (sampled, same seed)", seen["ours_ctx_latent"][0], seen["up_ctx_latent"][0])
    for name, o, u in (("gen", o_gen, u_gen), ("cfg_text (no question)", o_cfg_text, u_cfg_text),
                       ("cfg_img (no image)", o_cfg_img, u_cfg_img)):
        table.add_equal(f"context {name}: (length, rope)", (o.length, o.rope), (u["kv_lens"][0], u["ropes"][0]))
        if o.kv is None and u["past_key_values"].key_cache[0] is None:
            continue
        table.add(f"context {name}: KV cache, all layers", *kv_diff(o.kv, u["past_key_values"]))

    # (1) Text logits after the context --------------------------------------------------------
    def logits_of(inf_call, head):
        got = []
        handle = head.register_forward_hook(lambda mod, inp, out: got.append(out.detach().clone().reshape(-1, out.shape[-1])))
        try:
            text = inf_call()
        finally:
            handle.remove()
        return torch.cat(got), text

    steps = 6
    u_und, _, _, _ = upstream_contexts(vae=False)
    o_und, _, _ = ours_contexts(vae=False)
    for label, u_ctx, o_ctx in (("VAE+ViT ctx", u_gen, o_gen), ("ViT-only ctx", u_und, o_und)):
        u_logits, u_text = logits_of(lambda: up.gen_text(u_ctx, max_length=steps, do_sample=False),
                                     up_model.language_model.lm_head)
        o_logits, o_text = logits_of(lambda: ours.generate_text(o_ctx, max_new_tokens=steps),
                                     ours_model.language_model.lm_head)
        table.add(f"text logits, {steps} greedy steps ({label})", o_logits, u_logits)
        table.add_equal(f"generated text ({label})", o_text, u_text)

    # (2) One velocity prediction: upstream `_forward_flow` --------------------------------------
    gi = up_model.prepare_vae_latent(curr_kvlens=u_gen["kv_lens"], curr_rope=u_gen["ropes"],
                                     image_sizes=[(H, W)], new_token_ids=new_token_ids)
    x = gi.pop("packed_init_noises")
    ct = up_model.prepare_vae_latent_cfg(u_cfg_text["kv_lens"], u_cfg_text["ropes"], [(H, W)])
    ci = up_model.prepare_vae_latent_cfg(u_cfg_img["kv_lens"], u_cfg_img["ropes"], [(H, W)])
    cfg_kwargs = dict(
        cfg_text_packed_position_ids=ct["cfg_packed_position_ids"], cfg_text_packed_query_indexes=ct["cfg_packed_query_indexes"],
        cfg_text_key_values_lens=ct["cfg_key_values_lens"], cfg_text_past_key_values=u_cfg_text["past_key_values"],
        cfg_text_packed_key_value_indexes=ct["cfg_packed_key_value_indexes"],
        cfg_img_packed_position_ids=ci["cfg_packed_position_ids"], cfg_img_packed_query_indexes=ci["cfg_packed_query_indexes"],
        cfg_img_key_values_lens=ci["cfg_key_values_lens"], cfg_img_past_key_values=u_cfg_img["past_key_values"],
        cfg_img_packed_key_value_indexes=ci["cfg_packed_key_value_indexes"],
    )
    from cooper_model.inference import combine_cfg

    for t in (1.0, float(torch.tensor(0.6))):
        timestep = torch.tensor([t] * x.shape[0])
        v_up = up_model._forward_flow(x_t=x, timestep=timestep, past_key_values=u_gen["past_key_values"], **gi)
        v_ours = ours.velocity(o_gen, x, t, H, W)
        table.add(f"velocity t={t:.2f}, conditional", v_ours, v_up)
        v_text = ours.velocity(o_cfg_text, x, t, H, W)
        v_img = ours.velocity(o_cfg_img, x, t, H, W)
        for renorm in ("global", "channel", "text_channel"):
            v_up = up_model._forward_flow(x_t=x, timestep=timestep, past_key_values=u_gen["past_key_values"], **gi,
                                          cfg_renorm_type=renorm, cfg_text_scale=4.0, cfg_img_scale=2.0, **cfg_kwargs)
            v_o = combine_cfg(v_ours, v_text, v_img, 4.0, 2.0, renorm, 0.0)
            table.add(f"velocity t={t:.2f}, CFG 4/2 {renorm}", v_o, v_up)

    # (3) Four-step generation (num_timesteps=5) ---------------------------------------------------
    cases = [("no CFG", 1.0, 1.0, "global"), ("CFG 4/2 global", 4.0, 2.0, "global"),
             ("CFG 4/2 text_channel", 4.0, 2.0, "text_channel")]
    for name, st, si, renorm in cases:
        seen.pop("up_decoded", None)
        torch.manual_seed(SEED + 1)
        up.gen_image((H, W), u_gen, cfg_text_scale=st, cfg_img_scale=si, cfg_text_precontext=u_cfg_text,
                     cfg_img_precontext=u_cfg_img, cfg_interval=[0.0, 1.0], cfg_renorm_min=0.0, cfg_renorm_type=renorm,
                     num_timesteps=5, timestep_shift=3.0)
        settings = ImageGenerationSettings(num_steps=5, timestep_shift=3.0, cfg_text_scale=st, cfg_img_scale=si,
                                           cfg_interval=(0.0, 1.0), cfg_renorm_type=renorm, cfg_renorm_min=0.0)
        lat = ours.generate_latents(o_gen, H, W, settings, o_cfg_text, o_cfg_img, noise=seen["up_noise"])
        table.add(f"generate 4 steps, {name}: latent tokens", lat, seen["up_latents"][0])
        table.add(f"generate 4 steps, {name}: decoded image", ours.decode_latents(lat, H, W), seen["up_decoded"][0])

    # The same through upstream's `interleave_inference` end to end (its own context bookkeeping).
    seen.pop("ours_ctx_latent", None)
    torch.manual_seed(SEED)
    up.interleave_inference([SYSTEM, image, QUESTION], understanding_output=False, cfg_text_scale=4.0,
                            cfg_img_scale=2.0, cfg_interval=[0.0, 1.0], timestep_shift=3.0, num_timesteps=5,
                            cfg_renorm_type="global")
    torch.manual_seed(SEED)
    e_gen, e_cfg_text, e_cfg_img = ours_contexts(vae=True)
    settings = ImageGenerationSettings(num_steps=5, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=2.0,
                                       cfg_interval=(0.0, 1.0), cfg_renorm_type="global")
    lat = ours.generate_latents(e_gen, H, W, settings, e_cfg_text, e_cfg_img, noise=seen["up_noise"])
    table.add("interleave_inference e2e, CFG 4/2 global: latents", lat, seen["up_latents"][0])

    # (4) Autoencoder -------------------------------------------------------------------------------
    pixels = ip.to_tensor(image)[None]
    up_vae.reg.sample = False
    z_up = orig_encode(pixels)
    up_vae.reg.sample = True
    z_ours = ours_encode(pixels, sample=False)
    table.add("autoencoder encode, mean (sample=False)", z_ours, z_up)
    torch.manual_seed(99)
    z_up_s = orig_encode(pixels)
    torch.manual_seed(99)
    z_ours_s = ours_encode(pixels, sample=True)
    table.add("autoencoder encode, sampled (same seed)", z_ours_s, z_up_s)
    table.add("autoencoder decode", ours_vae.decode(z_up), orig_decode(z_up))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, type=Path, help="upstream BAGEL checkout with the shims")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="upstream-written checkpoint")
    parser.add_argument("--prepare", action="store_true", help="write the shims into the checkout first")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from upstream_shims import MARKER, prepare

    if args.prepare:
        prepare(args.upstream)
    if not (args.upstream / MARKER).is_file():
        print(f"{args.upstream}: not prepared; run `python tests/parity/upstream_shims.py {args.upstream}` "
              "or pass --prepare", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    table = run(args.upstream.resolve(), args.checkpoint.resolve())
    table.print()
    bad = table.failures()
    print(f"\n{len(table.rows) - len(bad)}/{len(table.rows)} quantities within {TOL:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
