"""Tokenizers: the checkpoint's Qwen2 tokenizer files, or the byte-level vocabulary of the small
checkpoints (ids 0-255 are UTF-8 bytes, then <|endoftext|>, <|im_start|>, <|im_end|>,
<|vision_start|>, <|vision_end|> = 256..260, as in upstream's tiny test configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class SpecialTokens:
    """Upstream's `new_token_ids`: text segments are <|im_start|> ... <|im_end|>, images are
    <|vision_start|> ... <|vision_end|>."""

    bos: int
    eos: int
    start_of_image: int
    end_of_image: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"])
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("tokenizer lacks <|im_start|>, <|im_end|>, <|vision_start|> or <|vision_end|>")
        return cls(*ids)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass tokenizer=... explicitly")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
