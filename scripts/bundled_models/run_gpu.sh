#!/usr/bin/env bash
# The GPU step: train, export (checked against transformers), measure and pack the three bundled models.
#
#   bash scripts/bundled_models/run_gpu.sh [pipeline.py options, e.g. --models shakespeare]
#
# Needs .gpu/bundled_data/ (from prepare_corpus.py + train_tokenizer.py; carry it to the GPU machine)
# and writes into $OUT (default .gpu/out): <model>.tar.gz x 3, metrics.json, run_gpu.log.
# Then, back on a CPU machine: python scripts/bundled_models/finalize.py --from <that folder>
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

OUT="${OUT:-.gpu/out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
  echo "run_gpu.sh: $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" scripts/bundled_models/pipeline.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/run_gpu.log"
