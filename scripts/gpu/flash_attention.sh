#!/usr/bin/env bash
# Chapter 09 on a lent GPU machine: install flash-attn-4 from carried wheels (when present), run the flash
# attention GPU tests, our CUDA kernel's check script, and benchmarks/flash_attention.py.
#
#   bash scripts/gpu/flash_attention.sh stash DIR     # keep DIR's files under /root/whl (one call per part)
#   bash scripts/gpu/flash_attention.sh [install] [tests] [cuda] [bench] [QUICK=1 for --quick]
#
# The flash-attn-4 wheels (pip download --pre --no-deps --python-version 3.12 --platform
# manylinux_2_28_x86_64 --only-binary=:all: flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 ...) exceed
# one call's transfer limit: nvidia-cutlass-dsl-libs-cu13 travels in parts (split -n 4), stashed by
# earlier calls and joined here, its sha256 checked before pip installs anything (--no-deps --no-index).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MINIINFER_CACHE="${MINIINFER_CACHE:-/tmp/miniinfer-cache}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
WHL=/root/whl
if [ "${1:-}" = stash ]; then mkdir -p "$WHL"; cp -v "$2"/* "$WHL"/; ls -la "$WHL"; exit 0; fi
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(install tests cuda bench)
status=0
run() { echo "=== $* ($(date -u +%T))"; "$@" || { echo "!!! failed: $*"; status=1; }; }
install_fa4() {
  if python3 -c "import flash_attn.cute" 2>/dev/null; then echo "flash-attn-4 already installed"; return 0; fi
  ls "$WHL"/cu13.part.* >/dev/null 2>&1 || { echo "no carried flash-attn-4 wheels: skipped"; return 0; }
  local wheel="$WHL/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"
  cat "$WHL"/cu13.part.* > "$wheel"
  echo "$(cat "$WHL"/cu13.sha256)  $wheel" | sha256sum -c - || return 1
  python3 -m pip install --no-deps --no-index "$WHL"/*.whl 2>&1 | tail -3
  python3 -c "import flash_attn.cute as f; print('flash_attn.cute', getattr(f, '__version__', '?'))"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for part in "${parts[@]}"; do
  case "$part" in
    install) run install_fa4 ;;
    tests) run python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_flash_attention_gpu.py tests/gpu/test_prefill_kernels_gpu.py \
             $(ls tests/gpu/test_flash_attention_cuda_gpu.py 2>/dev/null) 2>&1 | tee "$OUT/flash_gpu_tests.txt" ;;
    cuda) if [ -f scripts/gpu/flash_cuda_check.py ]; then run python3 scripts/gpu/flash_cuda_check.py; \
          else echo "=== skipped: scripts/gpu/flash_cuda_check.py does not exist"; fi ;;
    bench) run python3 benchmarks/flash_attention.py --gpu ${QUICK:+--quick} ;;
    *) echo "unknown part $part"; status=1 ;;
  esac
done
echo "=== done ($(date -u +%T)), status $status"
exit $status
