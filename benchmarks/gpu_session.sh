#!/usr/bin/env bash
# The GPU checks and measurements of docs/benchmarks.md, for a session lent a GPU
# (no network needed; kdlib runs from this working tree). Results go to $OUT
# (default: bench-gpu); every benchmark rewrites its bench.json / bench.md after
# each measurement, so a stage cut short keeps what it measured.
#
#   bash benchmarks/gpu_session.sh                      # every stage (~10 min on an H100)
#   bash benchmarks/gpu_session.sh checks divergence train compile   # ~5 min: one device call
#   bash benchmarks/gpu_session.sh reference             # ~5 min: a second call
#
# Stages (each under its own time limit; a failure is logged and the next stage runs):
#   checks      benchmarks/gpu_checks.py: no host sync in the step, chunked == dense on
#               the GPU (float32 and bf16 autocast), the fp16 + loss-scaling path
#   divergence  the divergences alone at 8,192 x 50,257: dense vs chunked (vs Liger)
#               (benchmarks/bench.py)
#   train       the 14 experiments, kdlib and cached paths, at the study's shapes
#               (python -m kdlib bench: kdlib's own step)
#   reference   the 14 experiments, the original method (each in its own process with
#               CUDA_LAUNCH_BLOCKING=1; benchmarks/bench.py); its rows give the "x reference" ratios
#   compile     kl and layerwise-kl-cos with torch.compile (python -m kdlib bench)
#   plan        `kdlib plan` measured on this GPU for colab-a100 (3 seeds), colab-t4 (1 seed)
#               and study: the sweeps' hours from kdlib's own step here, next to the estimates
#   precision   benchmarks/teacher_precision.py on the GPU: fp16 / bf16 teacher vs fp32
#   metrics     benchmarks/metrics_cost.py at the study's shapes: the test-metrics pass against the
#               student's and the teacher's perplexity passes (docs/protocol.md)
set -uo pipefail
out="${OUT:-bench-gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py="${PYTHON:-python3}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(checks plan divergence train reference compile)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log" || echo "== $name FAILED or timed out" | tee -a "$out/$name.log"
}

for s in "${stages[@]}"; do
    case "$s" in
        checks)
            for check in syncs losses fp16; do
                stage checks 120 "$py" benchmarks/gpu_checks.py "$check"
            done ;;
        divergence)
            stage divergence 120 "$py" benchmarks/bench.py --shapes study --sections divergence --out "$out/divergence" ;;
        train)
            stage train 240 "$py" -m kdlib bench --shapes study --warmup 3 --steps 10 --out "$out/train" ;;
        reference)
            stage reference 420 "$py" benchmarks/bench.py --shapes study --sections train --paths reference \
                --warmup 1 --steps 3 --out "$out/reference" ;;
        compile)
            stage compile 240 "$py" -m kdlib bench --shapes study --exps kl layerwise-kl-cos --compile \
                --warmup 3 --steps 10 --out "$out/compile" ;;
        plan)
            for p in "colab-a100 --seeds 0 1 2" "colab-t4 --seeds 0" "study"; do
                # shellcheck disable=SC2086
                stage plan 120 "$py" -m kdlib plan --preset $p --device measure --runs "$out/plan-runs"
            done ;;
        precision)
            stage precision 300 "$py" benchmarks/teacher_precision.py --out "$out/precision" ;;
        metrics)
            stage metrics 120 "$py" benchmarks/metrics_cost.py --shapes study --windows 512 --out "$out/metrics.json" ;;
        *)
            echo "unknown stage $s; stages: checks plan divergence train reference compile precision metrics" >&2
            exit 2 ;;
    esac
done

# One table with the ratios, from whatever stages have run so far (this call's or an earlier one's).
parts=()
for d in reference train divergence; do
    [ -s "$out/$d/bench.json" ] && parts+=("$out/$d/bench.json")
done
if [ ${#parts[@]} -gt 0 ]; then
    "$py" benchmarks/bench.py --merge "${parts[@]}" --out "$out/merged" > /dev/null && cat "$out/merged/bench.md"
fi
