#!/usr/bin/env bash
# The GPU benchmark of issue 10 in one run (~10 minutes on an H100/H200-class GPU): the bagel-7b
# architecture with random bf16 weights at 512x512.
#   bash scripts/gpu_bench.sh [OUT_DIR]          (default: $OUT, else out/gpu_bench)
# Needs torch with CUDA, onnx and onnxruntime; TensorRT is timed only where it is installed (its
# wheels are not carried to the lent machine). Writes OUT_DIR/*.json and OUT_DIR/*.log.
# 1. backends eager and compile (torch.compile + CUDA graphs over static KV buffers): 1/2/3-branch
#    denoise step on the real contexts, MFU against the measured bf16 matmul rate, VAE decode, a
#    whole map at COOPER's 50 steps, peak memory;
# 2. the sampling knobs against COOPER's evaluation settings (50 steps, CFG 3.0/1.5 on (0.4, 1]);
# 3. the memory plans (bf16, weight-only int8 / fp8 experts, maps-only placement, int8 + maps).
# NOT RUN YET: written without a GPU; expect to fix small things on the first run.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-out/gpu_bench}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" COOPER_CACHE="$OUT_DIR/cache" HF_HUB_OFFLINE=1
COMMON=(--preset bagel-7b --random-weights --device cuda --dtype bfloat16 --size 512)
run() {  # name, timeout seconds, bench arguments...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" python -m cooper_model.bench "${COMMON[@]}" "$@" --json-out "$OUT_DIR/$name.json" \
    > "$OUT_DIR/$name.log" 2>&1
  echo "   exit $? ($(date +%T)); $(tail -n 2 "$OUT_DIR/$name.log" | tr '\n' ' ')"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/gpu.txt"
run backends 300 --backends eager,compile,tensorrt --compile-mode default --steps 50 --repeat 3 --text-tokens 16
run knobs 180 --no-stages --backends eager --knobs --repeat 1
run memory 120 --no-stages --backends eager --steps 10 --repeat 1 --memory-plans none,int8,fp8,maps,int8+maps
ls -la "$OUT_DIR"
