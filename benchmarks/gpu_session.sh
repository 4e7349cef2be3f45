#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one command, sized for a session
# lent a GPU for a few minutes (about 8 minutes on an H100; no network needed).
# Run from the repository root; results go to $OUT (default: bench-gpu).
#   0. benchmarks/gpu_checks.py: no host sync in the step, chunked == dense on the GPU,
#      the fp16 path (logged to $OUT/checks.txt; a failure does not stop the benchmarks);
#   1. the divergences alone at 8,192 x 50,257 (dense vs chunked, Liger if installed);
#   2. the 14 experiments x 3 paths at the study's shapes (the reference in its own
#      process with CUDA_LAUNCH_BLOCKING=1), 2 warm-up + 5 timed steps each;
#   3. kl and layerwise-kl-cos again with torch.compile.
set -euo pipefail
out="${OUT:-bench-gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py="${PYTHON:-python3}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || true
for check in syncs losses fp16; do
    "$py" benchmarks/gpu_checks.py "$check" 2>&1 | tee -a "$out/checks.txt" || echo "check $check FAILED" | tee -a "$out/checks.txt"
done
"$py" -m kdlib bench --shapes study --sections divergence --out "$out/divergence"
"$py" -m kdlib bench --shapes study --sections train --warmup 2 --steps 5 --out "$out/train"
"$py" -m kdlib bench --shapes study --sections train --paths kdlib --exps kl layerwise-kl-cos \
    --compile --warmup 3 --steps 5 --out "$out/compile"
