#!/usr/bin/env bash
# The GPU run of issue 13's draft: distil shakespeare-draft (1.67 M parameters) from the bundled target,
# export it, measure its greedy agreement with the target exactly as evaluate.py does, pack it.
#
#   bash scripts/bundled_models/distill_draft_gpu.sh [distill_draft.py options, e.g. --time-budget-s 200]
#
# Needs .gpu/bundled_data/ (tokens/ + corpus/manifest.json, ~3 MB, from
# `distill_draft.py --prepare-from`; carry it to the GPU machine) and the bundled target in
# miniinfer/data/models/shakespeare. No network. Default: ~4.5 min of training, ~5.5 min in all.
# Writes into $OUT (default .gpu/out): shakespeare-draft/ (the HF folder), shakespeare-draft.tar.gz +
# metrics.json (finalize.py's input), distill_draft.json (the run), distill_draft.log.
# Then, back on the CPU machine:
#   python scripts/bundled_models/finalize.py --from <that folder> --models shakespeare-draft
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

OUT="${OUT:-.gpu/out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
  echo "distill_draft_gpu.sh: $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  ls -la .gpu/bundled_data/tokens
  "$PYTHON" scripts/bundled_models/distill_draft.py --out "$OUT/shakespeare-draft" \
    --work "${BUNDLED_WORK:-/tmp/bundled_work}" \
    --command "bash scripts/bundled_models/distill_draft_gpu.sh${*:+ $*}" "$@"
  ls -la "$OUT" "$OUT/shakespeare-draft"
} 2>&1 | tee "$OUT/distill_draft.log"
