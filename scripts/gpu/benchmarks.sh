#!/usr/bin/env bash
# One call on a lent GPU machine: every GPU benchmark and GPU test, results into benchmarks/results and $OUT.
#
#   bash scripts/gpu/benchmarks.sh [vector_add] [paged] [gpu_tests] [engine] [profile] [sampler] [fused]
#                                  [flash] [quant] [spec] [parallel]           (default: all)
#   QUICK=1 bash scripts/gpu/benchmarks.sh engine     # engine_throughput --quick: ~10x smaller, a smoke test
#
# Each part runs even if an earlier one failed; the exit status says whether all passed. sampler and
# fused run their benchmark script when it exists (and say "skipped" otherwise).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MINIINFER_CACHE="${MINIINFER_CACHE:-/tmp/miniinfer-cache}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(vector_add paged gpu_tests engine profile sampler fused flash quant spec parallel)
status=0
run() { echo "=== $* ($(date -u +%T))"; "$@" || { echo "!!! failed: $*"; status=1; }; }
run_if() { if [ -f "$2" ]; then run "$@"; else echo "=== skipped: $2 does not exist"; fi; }
quick=(); [ -n "${QUICK:-}" ] && quick=(--quick)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in "${parts[@]}"; do
  case "$part" in
    vector_add) run python3 benchmarks/vector_add.py ;;
    paged) run python3 benchmarks/paged_attention.py ;;
    gpu_tests) run python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu ;;
    engine) run python3 benchmarks/engine_throughput.py --gpu ${quick[@]+"${quick[@]}"} ;;
    profile) run python3 benchmarks/step_profile.py --gpu ;;
    sampler) run_if python3 benchmarks/sampler.py --device cuda ;;
    fused) run_if python3 benchmarks/fused_kernels.py --device cuda ;;
    flash) run python3 benchmarks/flash_attention.py --gpu ${quick[@]+"${quick[@]}"} ;;  # FA4 rows need flash-attn-4
    quant) run python3 benchmarks/quantization.py ${quick[@]+"${quick[@]}"} ;;
    spec) run python3 benchmarks/speculative.py --gpu ${quick[@]+"${quick[@]}"} ;;
    parallel) run python3 benchmarks/parallelism.py --gpu ;;  # TP 1/2/4 as far as the GPUs go
    *) echo "unknown part $part"; status=1 ;;
  esac
done
echo "=== done ($(date -u +%T)), status $status"
exit $status
