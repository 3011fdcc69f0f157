#!/usr/bin/env bash
# The recipe for the small checkpoint, end to end, on a 2-core CPU. Run state goes to runs/
# (git-ignored); every step is resumable: rerun the script after an interruption. Status: a first
# run stopped at STAGE1_STEPS=700 (5,600 examples) had learned the scene prior but not yet
# image-conditioned maps (aligned AbsRel 0.23, mIoU 0.07 on the test split), so the bundled
# checkpoint is still the random one; the targets need far more steps (see training/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/env.sh
# 1. synthetic data: 800 training scenes x 3 views, 60 test scenes x 3 views, 320x240
python -m training.data.synth --out runs/data --num-scenes 800 --views-per-scene 3 --seed 0 --split train --traces-per-view 1
python -m training.data.synth --out runs/data --num-scenes 60 --views-per-scene 3 --seed 0 --split test --traces-per-view 1
# 2. tokenizer (byte-level BPE on the project's text) and autoencoder (RGB, depth and segmentation images)
python -m training.tokenizer --data runs/data/train --out runs/tokenizer
[ -f runs/ae/ae_report.json ] || python -m training.autoencoder --data runs/data/train --out runs/ae --steps 1200 --batch 6 --crop 96 --threads 2
# 3. stage 1 (auxiliary modality generation); writes the EMA weights to runs/stage1/export
python -m training.stage1 --config training/configs/stage1_small.yaml total_steps="${STAGE1_STEPS:-1800}"
# 4. evaluation on the held-out test split
python -m training.evaluate --checkpoint runs/stage1/export --data runs/data/test --out runs/eval --threads 2
