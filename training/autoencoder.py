"""Train the small preset's FLUX-layout autoencoder on the project's images and maps.

    python -m training.autoencoder --data runs/data/train --out runs/ae [--steps 3000]

Released BAGEL uses FLUX's pretrained autoencoder, which cannot be shipped at small size; the small
preset trains its own on what it will encode and decode: RGB camera images, depth pseudo-images and
segmentation colour images, in equal parts. The encoder *samples* its latent (upstream encodes with
`sample=True` even at inference), so the decoder is trained on samples too; a small KL term keeps
the latent near the scale that `scale_factor`/`shift_factor` expect. Writes `ae.safetensors`
(the released layout) and `ae_report.json` with the round-trip quality.

    python -m training.autoencoder --data runs/data/train --out runs/ae_dec --init-from CKPT --decoder-only

fine-tunes only the decoder of an existing autoencoder. The encoder, and so the latent space a
stage-1 model was trained in, stays exactly as it was: the model keeps working and its maps are
decoded better.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cooper_model import image_processor as ip
from cooper_model.autoencoder import FluxAutoencoder
from cooper_model.checkpoint import load_autoencoder
from cooper_model.codecs import SegmentationCodec, default_palette
from cooper_model.config import preset

from .data.catalogue import CLASS_NAMES
from .stage1_data import Stage1Dataset


def training_crops(dataset: Stage1Dataset, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    """A batch of random crops, one third RGB, one third depth targets, one third segmentation."""
    out = []
    for _ in range(batch):
        ex = dataset.load(int(rng.integers(len(dataset))), flip=bool(rng.integers(2)))
        # rows alternate depth / segmentation: a quarter RGB, three eighths of each map
        image = ip.to_tensor(ex.rgb) if rng.random() < 0.25 else ex.target
        if not crop:  # whole images (all of one split share a size)
            out.append(image)
            continue
        _, h, w = image.shape
        y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
        out.append(image[:, y:y + crop, x:x + crop])
    return torch.stack(out)


@torch.no_grad()
def round_trip_report(ae: FluxAutoencoder, dataset: Stage1Dataset, seg_codec: SegmentationCodec, limit: int = 64,
                      seed: int = 0) -> dict:
    """RGB PSNR, depth AbsRel and segmentation label accuracy after encode (sampled) -> decode."""
    ae.eval()
    g = torch.Generator().manual_seed(seed)
    psnr, absrel, acc = [], [], []
    codec = dataset.depth_codec
    for i in range(min(limit, len(dataset))):
        ex = dataset.load(i)
        rgb = ip.to_tensor(ex.rgb)[None]
        rec = ae.decode(ae.encode(rgb, sample=True, generator=g)).clamp(-1, 1)
        mse = F.mse_loss(rec * 0.5 + 0.5, rgb * 0.5 + 0.5).item()
        psnr.append(10 * math.log10(1.0 / max(mse, 1e-12)))
        rec = ae.decode(ae.encode(ex.target[None], sample=True, generator=g))[0]
        if ex.task == "depth":
            unit = (rec * 0.5 + 0.5).clamp(0, 1).mean(0).numpy()
            pred = codec.min_depth + unit * (codec.max_depth - codec.min_depth)
            valid = np.isfinite(ex.depth_m) & (ex.depth_m > codec.min_depth) & (ex.depth_m < codec.max_depth)
            absrel.append(float(np.mean(np.abs(pred[valid] - ex.depth_m[valid]) / ex.depth_m[valid])))
        else:
            labels = seg_codec.decode(ip.to_uint8(rec))
            acc.append(float((labels == ex.labels).mean()))
    ae.train()
    return {"rgb_psnr_db": float(np.mean(psnr)), "depth_absrel": float(np.mean(absrel)) if absrel else None,
            "segmentation_label_accuracy": float(np.mean(acc)) if acc else None, "images": min(limit, len(dataset))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a split directory with stage1.jsonl")
    parser.add_argument("--eval-data", default=None, help="split for the round-trip report (default: --data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="cooper-small")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=0, help="random crop size; 0 = whole images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", default=None, help="a directory with ae.safetensors to start from")
    parser.add_argument("--decoder-only", action="store_true",
                        help="train the decoder alone (needs --init-from): the latent space stays as it was")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = preset(args.preset)
    palette = np.asarray(config.palette, dtype=np.uint8) if config.palette else default_palette(len(CLASS_NAMES))
    class_names = config.class_names or list(CLASS_NAMES)
    dataset = Stage1Dataset(args.data, config.vae_transform, config.depth_range, palette)
    if args.decoder_only and not args.init_from:
        parser.error("--decoder-only needs --init-from (a trained encoder to keep)")
    ae = (load_autoencoder(args.init_from) if args.init_from else FluxAutoencoder(config.vae)).train()
    if args.decoder_only:
        ae.model.encoder.requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "ae_log.csv", "w")
    log.write("step,loss,l1,kl,seconds\n")
    start = time.time()
    bar = tqdm(range(args.steps), desc="autoencoder")
    for step in bar:
        x = training_crops(dataset, rng, args.batch, args.crop)
        with torch.set_grad_enabled(not args.decoder_only):
            moments = ae.model.encoder(x)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = ae.model.decoder(z)
        l1 = (rec - x).abs().mean()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = l1 + F.mse_loss(rec, x) + (0.0 if args.decoder_only else args.kl_weight) * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            log.write(f"{step},{loss.item():.5f},{l1.item():.5f},{kl.item():.3f},{time.time() - start:.1f}\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ae.eval()
    state = {k: v.detach().contiguous() for k, v in ae.flux_state_dict().items()}
    tmp = out / "ae.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "ae.safetensors")
    eval_set = Stage1Dataset(args.eval_data or args.data, config.vae_transform, config.depth_range, palette)
    report = round_trip_report(ae, eval_set, SegmentationCodec(palette, class_names))
    report.update(steps=args.steps, batch=args.batch, crop=args.crop, seconds=round(time.time() - start, 1),
                  command="python -m training.autoencoder " + " ".join(argv or __import__("sys").argv[1:]))
    # the group count is not in the tensor shapes: record the autoencoder's config beside it
    (out / "cooper_config.json").write_text(json.dumps({"vae": dataclasses.asdict(ae.config)}, indent=2) + "\n")
    (out / "ae_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
