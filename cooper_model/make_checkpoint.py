"""Write a randomly initialised checkpoint of a preset in the released layout.

    python -m cooper_model.make_checkpoint --preset cooper-small --out DIR [--seed 0] [--class-names a,b,c]

The bundled `checkpoints/cooper-small` was made like this (marked `trained: false`), with the
segmentation classes of the data engine's catalogue:

    python -m cooper_model.make_checkpoint --out cooper_model/checkpoints/cooper-small \
        --class-names "$(python -c 'from training.data.catalogue import CLASS_NAMES; print(",".join(CLASS_NAMES))')"

Tests and benchmarks use it to run the real code path without any download, until the project's
training code replaces it with trained weights.
"""

from __future__ import annotations

import argparse

import torch

from .autoencoder import FluxAutoencoder
from .checkpoint import save_checkpoint
from .codecs import default_palette
from .config import preset
from .modeling import CooperModel
from .tokenizer import byte_level_tokenizer


def random_checkpoint(name: str, out, seed: int = 0, class_names: list[str] | None = None, dtype="bfloat16"):
    torch.manual_seed(seed)
    config = preset(name)
    if class_names:
        config.class_names = list(class_names)
        config.palette = default_palette(len(class_names)).tolist()
    model = CooperModel(config)
    model.language_model.init_moe()  # the generation expert starts as a copy, as upstream
    vae = FluxAutoencoder(config.vae)
    tokenizer = byte_level_tokenizer() if config.llm.vocab_size <= 4096 else None  # small presets
    save_checkpoint(out, model, vae, tokenizer, dtype=dtype)
    return model, vae, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cooper-small")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--class-names", default=None,
                        help="comma-separated segmentation classes (index 0 = background); "
                             "default: generic names over the default palette")
    args = parser.parse_args(argv)
    names = args.class_names.split(",") if args.class_names else None
    random_checkpoint(args.preset, args.out, args.seed, names, args.dtype)
    print(f"wrote random {args.preset} checkpoint to {args.out}" + (f" with {len(names)} classes" if names else ""))


if __name__ == "__main__":
    main()
