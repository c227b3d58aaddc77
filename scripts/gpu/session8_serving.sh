#!/usr/bin/env bash
# One device call (2026-12-03, issue 17): the machine's CPU topology, then the serving overhead at saturation
# with 768 requests per run (engine thread vs engine process on `--engine-cpus auto`, uvloop installed as an
# installed server has it), then py-spy profiles of both server processes during a saturated run.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MINIINFER_CACHE=/root/mi-cache
OUT=${OUT:-/tmp/out}
FOLDER=${FOLDER:-/root/qwen25-05b-random}
lscpu > /tmp/lscpu.txt
for cpu in /sys/devices/system/cpu/cpu[0-9]*; do
    echo "$(basename "$cpu") $(cat "$cpu/topology/core_cpus_list" 2>/dev/null || cat "$cpu/topology/thread_siblings_list")"
done | sort -V > "$OUT/cpu_topology.txt"
grep -E "Model name|Thread|Core|Socket|NUMA node|MHz" /tmp/lscpu.txt; tr '\n' ' ' < "$OUT/cpu_topology.txt"; echo
timeout ${SATURATION_TIMEOUT:-330} python3 scripts/gpu/serving_h200.py --folder "$FOLDER" --rates inf \
    --num-requests ${NUM_REQUESTS:-768} --overhead-repeats 3 --compare-engine-process --engine-cpus auto \
    --out "$OUT/serving_h200_saturation.json" > "$OUT/serving_h200_saturation.log" 2>&1
tail -12 "$OUT/serving_h200_saturation.log"
timeout ${PROFILE_TIMEOUT:-150} python3 scripts/gpu/serving_profile.py --folder "$FOLDER" --num-requests 1024 \
    --out-dir "$OUT/serving_profile" 2>&1 | head -40
