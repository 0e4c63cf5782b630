#!/usr/bin/env bash
# The GPU benchmark, prepared for one H200 (or any CUDA GPU): seconds per step at 512 and
# 1024 px in fp32, TF32 and bf16 with peak memory, and the throughput of k = 1, 2, 4, 8 runs
# batched as a worker batches jobs, at 128, 256 and 512 px. Never run on a GPU yet: its
# time there is an estimate (a few minutes on an H200; the timeout below is 8).
# Needs python3 with torch, numpy and pillow; run from the repository root:
#   bash bench/gpu.sh [results.json]
set -euo pipefail
cd "$(dirname "$0")/.."
# The sample photos if they are beside the checkout, else the repository's presets.
images="${STYLEQUEUE_SAMPLE_IMAGES:-../shared/images}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. timeout 480 python3 bench/gpu.py --device cuda --images "$images" \
    --sizes 512,1024 --modes fp32,tf32,bf16 --steps 30 --batches 1,2,4,8 --batch-sizes 128,256,512 \
    --repeats 10 ${1:+--json "$1"}
