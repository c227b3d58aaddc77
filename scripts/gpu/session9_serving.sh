#!/usr/bin/env bash
# Two device calls (2026-12-03, issue 17), on one warm machine:
#   PART=long   serving with long prompts (each request: its line + 1000 random words, about 1,000 tokens with
#               the synthetic word-level tokenizer, no shared prefix), 128 tokens out: a rate sweep on the
#               thread-mode server, then server-vs-offline pairs at saturation for both engine modes
#   PART=steady the overhead at saturation over a run 4x longer than the ledger's (3072 requests = 24 batches of
#               128): how much of the loss is the first and last steps, how much the steady state
# Each writes its JSON and log under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MINIINFER_CACHE=/root/mi-cache
OUT=${OUT:-/tmp/out}
FOLDER=${FOLDER:-/root/qwen25-05b-random}
case "${PART:-long}" in
  long)
    timeout ${LONG_TIMEOUT:-540} python3 scripts/gpu/serving_h200.py --folder "$FOLDER" --skip-warm-up \
        --rates 16 64 inf --num-requests 256 --prompt-words 1000 --overhead-requests 512 --overhead-repeats 3 \
        --compare-engine-process --engine-cpus auto --out "$OUT/serving_h200_long_prompts.json" \
        > "$OUT/serving_h200_long_prompts.log" 2>&1
    tail -22 "$OUT/serving_h200_long_prompts.log" ;;
  steady)
    timeout ${STEADY_TIMEOUT:-540} python3 scripts/gpu/serving_h200.py --folder "$FOLDER" --skip-warm-up \
        --rates inf --num-requests 3072 --overhead-repeats 3 --engine-process --engine-cpus auto \
        --out "$OUT/serving_h200_steady_state.json" > "$OUT/serving_h200_steady_state.log" 2>&1
    tail -14 "$OUT/serving_h200_steady_state.log" ;;
esac
