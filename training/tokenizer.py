"""Train the small preset's tokenizer: a byte-level BPE (Hugging Face `tokenizers`) on the
project's own text, with the real model's special tokens.

    python -m training.tokenizer --data runs/data/train --out runs/tokenizer [--vocab-size 2048]

The corpus is every prompt COOPER uses (system prompts, the depth / segmentation tool prompts, the
reflection prompt) and the data engine's questions, answers and reasoning traces. The byte-level
alphabet is always included, so any text still encodes. `--compare` prints the sequence lengths of
the corpus under this BPE and under plain bytes (the earlier choice), which is what decides: fewer
tokens per prompt means shorter packed sequences in training and fewer decoding steps in reasoning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cooper_model import prompts
from cooper_model.tokenizer import SPECIAL_TOKENS, byte_level_tokenizer


def corpus(data_dir: str | Path) -> list[str]:
    data_dir = Path(data_dir)
    texts = [v for k, v in vars(prompts).items() if k.isupper() and isinstance(v, str)]
    with open(data_dir / "questions.jsonl") as f:
        for line in f:
            q = json.loads(line)
            texts.append(q["question"])
            texts.append(str(q.get("answer", "")))
    sft = data_dir / "Interleaved_SFT.jsonl"
    if sft.is_file():
        with open(sft) as f:
            for line in f:
                for item in json.loads(line)["interleaved_reason"]:
                    if item["type"] == "text":
                        texts.append(item["value"])
    return texts


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def length_stats(tokenizer, texts: list[str]) -> dict:
    lens = np.array([len(tokenizer.encode(t, add_special_tokens=False)) for t in texts])
    return {"mean": float(lens.mean()), "p95": float(np.percentile(lens, 95)), "max": int(lens.max())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    texts = corpus(args.data)
    tokenizer = train_bpe(texts, args.vocab_size)
    out = Path(args.out)
    tokenizer.save_pretrained(str(out))
    report = {"vocab_size": len(tokenizer), "corpus_texts": len(texts),
              "bpe_tokens": length_stats(tokenizer, texts), "byte_tokens": length_stats(byte_level_tokenizer(), texts),
              "depth_prompt": {"bpe": len(tokenizer.encode(prompts.DEPTH_PROMPT, add_special_tokens=False)),
                               "bytes": len(prompts.DEPTH_PROMPT.encode())}}
    (out / "tokenizer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
