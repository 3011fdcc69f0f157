"""The small preset's tokenizer and autoencoder trainers, run for real on the sample split."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cooper_model.checkpoint import load_autoencoder
from cooper_model.prompts import DEPTH_PROMPT
from cooper_model.tokenizer import SpecialTokens
from transformers import AutoTokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "training" / "data" / "sample"


def test_bpe_tokenizer_keeps_the_special_tokens_and_shortens_text(tmp_path):
    from training.tokenizer import main

    main(["--data", str(SAMPLE), "--out", str(tmp_path), "--vocab-size", "600"])
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    SpecialTokens.from_tokenizer(tok)  # raises if one is missing
    ids = tok.encode(DEPTH_PROMPT, add_special_tokens=False)
    assert tok.decode(ids) == DEPTH_PROMPT  # lossless
    assert tok.decode(tok.encode("über 3,5 m ≈ 💡", add_special_tokens=False)) == "über 3,5 m ≈ 💡"  # any text
    report = json.loads((tmp_path / "tokenizer_report.json").read_text())
    assert report["bpe_tokens"]["mean"] < report["byte_tokens"]["mean"] / 2


def test_autoencoder_trainer_writes_a_loadable_flux_layout_and_its_report(tmp_path):
    from training.autoencoder import main

    main(["--data", str(SAMPLE), "--out", str(tmp_path), "--steps", "3", "--batch", "2", "--crop", "32",
          "--threads", "1"])
    ae = load_autoencoder(tmp_path)
    assert ae.config.norm_num_groups == 8  # read back from the config written beside the weights
    report = json.loads((tmp_path / "ae_report.json").read_text())
    assert {"rgb_psnr_db", "depth_absrel", "segmentation_label_accuracy"} <= set(report)


def test_decoder_only_fine_tune_keeps_the_encoder_and_so_the_latent_space(tmp_path):
    from training.autoencoder import main

    base = tmp_path / "base"
    main(["--data", str(SAMPLE), "--out", str(base), "--steps", "2", "--batch", "2", "--crop", "32", "--threads", "1"])
    tuned = tmp_path / "tuned"
    main(["--data", str(SAMPLE), "--out", str(tuned), "--steps", "3", "--batch", "2", "--crop", "32", "--threads", "1",
          "--init-from", str(base), "--decoder-only"])
    before, after = load_autoencoder(base).state_dict(), load_autoencoder(tuned).state_dict()
    encoder = [k for k in before if ".encoder." in f".{k}"]
    decoder = [k for k in before if ".decoder." in f".{k}"]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
