#!/usr/bin/env bash
# The GPU benchmark, prepared for one H200 (or any CUDA GPU), within 8 minutes: the engine's
# CUDA tests (CUDA graphs against eager evaluation); bench/gpu.py (a check against the CPU;
# seconds per step at 128-1024 px against the fp32 reference in fp32, TF32, bf16, bf16 with
# cudnn.benchmark and bf16 without CUDA graphs, peak memory; where a step's time goes; whole
# 300-iteration runs with and without graphs; time to the reference's loss; k = 1, 2, 4, 8
# runs batched as a worker batches jobs); then whether torch.compile pays there
# (bench/compile.py: CUDA graphs at 128 px, inductor's default at 512 px). Needs python3
# with torch, numpy and pillow and, for the tests, pytest; from the repository root:
#   bash bench/gpu.sh [results.json]
set -uo pipefail
cd "$(dirname "$0")/.."
# The repository's own photo and painting, or a folder given in STYLEQUEUE_SAMPLE_IMAGES.
images=(${STYLEQUEUE_SAMPLE_IMAGES:+--images "$STYLEQUEUE_SAMPLE_IMAGES"})
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
echo "## CUDA tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_losses.py -k cuda 2>&1 | tail -25
timeout 300 python3 bench/gpu.py --device cuda "${images[@]}" ${1:+--json "$1"}
echo
echo "## torch.compile"
for run in "128 reduce-overhead" "512 default"; do
    set -- $run
    mode=$([ "$2" = default ] || echo "--mode $2")
    timeout 60 python3 bench/compile.py --device cuda "${images[@]}" --size "$1" \
        --samples 20 $mode 2>&1 | grep -v "^W[0-9]" | tail -3
done
