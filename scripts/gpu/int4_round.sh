#!/usr/bin/env bash
# A tuning round in one device call: scripts/gpu/int4_iterate.sh (build, GPU tests, sweep of the codes given),
# then benchmarks/quantization.py with the fastest GPTQ-layout code (and launch mode) of the sweep at 8192² M = 1
# as the default.
#   bash scripts/gpu/int4_round.sh CODES...     (writes $OUT/int4_shapes.json, $OUT/quantization_h200.json)
set -uo pipefail
OUT=${OUT:-/tmp/out}
bash scripts/gpu/int4_iterate.sh "$@" | grep -v "^{'K'"
best=$(python3 -c "
import json
from miniinfer.kernels.int4_matmul import CUDA_SHAPES
rows = [r for r in json.load(open('$OUT/int4_shapes.json'))['rows'] if 'us' in r and r['K'] == 8192 and r['M'] == 1
        and not CUDA_SHAPES[r['code']][4] and r['split'] == 1]
best = min(rows, key=lambda r: r['us'])
print(best['code'], best.get('pdl', 0))")
read -r code pdl <<< "$best"
echo "default shape for the benchmark: $code, programmatic dependent launch: $pdl"
MINIINFER_INT4_CUDA_SHAPE=$code MINIINFER_INT4_PDL=$pdl PYTHONPATH=$PWD MINIINFER_CACHE=${MINIINFER_CACHE:-/root/mi-cache} \
    python3 benchmarks/quantization.py --out "$OUT/quantization_h200.json" 2>&1 | tail -45
