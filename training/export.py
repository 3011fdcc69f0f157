"""Re-save a trained checkpoint for shipping: another dtype, pipeline defaults, model card data.

    python -m training.export --checkpoint runs/stage1/export --out cooper_model/checkpoints/cooper-small \
        --dtype bfloat16 --defaults '{"num_steps": 3, "cfg_text_scale": 1.0}'

The network is stored in bf16 like upstream's `ema.safetensors` (half the bytes in git history);
the autoencoder stays fp32. Files of the target directory that are not part of a checkpoint
(a README model card) are kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cooper_model.checkpoint import load_autoencoder, load_model, read_config, save_checkpoint
from cooper_model.tokenizer import load_tokenizer

CHECKPOINT_FILES = ("ema.safetensors", "model.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json",
                    "cooper_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "training_run.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--defaults", default=None, help="JSON: pipeline_defaults to set (merged)")
    args = parser.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    config = read_config(src)
    if args.defaults:
        config.pipeline_defaults = {**config.pipeline_defaults, **json.loads(args.defaults)}
    model = load_model(src, config)
    vae = load_autoencoder(src)
    tokenizer = load_tokenizer(src)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        (out / name).unlink(missing_ok=True)
    save_checkpoint(out, model, vae, tokenizer, dtype=args.dtype)
    if (src / "training_run.json").is_file():
        shutil.copy(src / "training_run.json", out / "training_run.json")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(json.dumps({"out": str(out), "bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 2)}, indent=2))


if __name__ == "__main__":
    main()
