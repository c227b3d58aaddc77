#!/usr/bin/env bash
# One device call for a round of work on csrc/int4_gemv.cu: build, the GPU correctness tests of every CTA
# shape, then the shape x split sweep (scripts/gpu/int4_shapes.py) of the codes given (default: all).
#   bash scripts/gpu/int4_iterate.sh [shape codes...]      (writes $OUT/int4_shapes.json, $OUT/tests.txt)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MINIINFER_CACHE=${MINIINFER_CACHE:-/root/mi-cache}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
start=$(date +%s)
python3 -c "
import time; t = time.time()
from miniinfer.kernels.int4_matmul import _cuda_extension
_cuda_extension(); print(f'int4 extension built in {time.time() - t:.0f} s')"
python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_quant_gpu.py -k "cuda_int4 or graph or programmatic" 2>&1 | tail -15 | tee "$OUT/tests.txt"
echo "tests done at +$(( $(date +%s) - start )) s"
codes=("$@")
if [ ${#codes[@]} -eq 0 ]; then
    python3 scripts/gpu/int4_shapes.py --splits 1 2 --pdl 0 1 --out "$OUT/int4_shapes.json"
else
    python3 scripts/gpu/int4_shapes.py --codes "${codes[@]}" --splits 1 2 --pdl 0 1 --out "$OUT/int4_shapes.json"
fi
echo "sweep done at +$(( $(date +%s) - start )) s"
