#!/usr/bin/env bash
# Device calls of 2026-12-03 (issue 17), one PART each, on one warm machine:
#   PART=long   serving with long prompts (each request: its line + 1000 random words, about 1,000 tokens with
#               the synthetic word-level tokenizer, no shared prefix), 128 tokens out: a rate sweep on the
#               thread-mode server, then server-vs-offline pairs at saturation for both engine modes
#   PART=steady the overhead at saturation over a run 4x longer than the ledger's (3072 requests = 24 batches of
#               128): how much of the loss is the first and last steps, how much the steady state
#   PART=interval the ledger's workload (768 one-line prompts, 128 tokens out) on the engine-process server with
#               --stream-interval 1, 2 and 4 (RUNS="1:auto 4:none": interval and --engine-cpus), each against its
#               own offline pairs: what fewer, merged SSE events buy, and what pinning the engine's process does
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
  interval)
    # RUNS: "interval:cpus" pairs (cpus: an --engine-cpus value, or none: the engine's process not pinned)
    for run in ${RUNS:-1:auto 2:auto 4:auto}; do
      n=${run%%:*}; cpus=${run#*:}; name=serving_h200_stream_interval_${n}_cpus_${cpus}
      timeout ${INTERVAL_TIMEOUT:-180} python3 scripts/gpu/serving_h200.py --folder "$FOLDER" --skip-warm-up \
          --rates inf --num-requests 768 --overhead-repeats 3 --engine-process \
          $([ "$cpus" = none ] || echo --engine-cpus "$cpus") \
          --stream-interval $n --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
      tail -9 "$OUT/$name.log"
    done ;;
esac
