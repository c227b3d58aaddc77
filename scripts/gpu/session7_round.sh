#!/usr/bin/env bash
# One device call (2026-12-03): the int4 PDL re-check (build, GPU tests, sweep of codes 0/13 with and without
# PDL), then benchmarks/quantization.py with PDL on if every test passed, then the serving overhead at
# saturation with 384 requests per run, engine thread vs engine process (unpinned: the server's GPU default).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MINIINFER_CACHE=/root/mi-cache
OUT=${OUT:-/tmp/out}
bash scripts/gpu/int4_pdl_check.sh 2>&1 | tee "$OUT/int4_pdl_check.txt" | tail -30
if grep -q " passed" "$OUT/int4_pdl_check.txt" && ! grep -q "failed" "$OUT/int4_pdl_check.txt"; then
    MINIINFER_INT4_PDL=1 timeout 200 python3 benchmarks/quantization.py --out "$OUT/quantization_h200.json" 2>&1 | tail -40
fi
timeout 330 python3 scripts/gpu/serving_h200.py --rates inf --num-requests 384 --overhead-repeats 3 \
    --compare-engine-process --out "$OUT/serving_h200_saturation.json" > "$OUT/serving_h200_saturation.log" 2>&1
tail -16 "$OUT/serving_h200_saturation.log"
