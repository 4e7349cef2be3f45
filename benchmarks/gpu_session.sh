#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one command, sized for a session
# lent a GPU for a few minutes (about 7 minutes on an H100; no network needed).
# Run from the repository root; results go to $OUT (default: bench-gpu).
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
"$py" -m kdlib bench --shapes study --sections divergence --out "$out/divergence"
"$py" -m kdlib bench --shapes study --sections train --warmup 2 --steps 5 --out "$out/train"
"$py" -m kdlib bench --shapes study --sections train --paths kdlib --exps kl layerwise-kl-cos \
    --compile --warmup 3 --steps 5 --out "$out/compile"
