#!/usr/bin/env bash
# Everything `make test` runs, in order; the first failing step fails the run.
set -euo pipefail
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
export PYTHONUNBUFFERED=1

step() { echo; echo "=== $* ==="; date +%T; }

step "lint (ruff)"
"$VENV/bin/ruff" check .

step "chapters regenerated from solutions, solution notebooks fresh"
"$PY" -m miniinfer.course.notebooks check

step "CUDA sources compile (nvcc -arch=sm_90)"
"$PY" scripts/compile_cuda.py

step "validation tools for deploy/ and /metrics (best effort: their tests skip without them)"
bash scripts/ensure_tools.sh

step "unit tests (CPU; Triton kernels under TRITON_INTERPRET=1)"
"$PY" -m pytest -q --timeout=900 tests

step "answer key: pytest --nbval solutions/"
"$PY" -m pytest -q --timeout=1800 -p no:cacheprovider --nbval --nbval-current-env \
    --nbval-sanitize-with scripts/nbval_sanitize.cfg solutions/

step "the book: mkdocs build --strict, then every page in headless Chromium"
bash scripts/ensure_chromium.sh
"$PY" scripts/book.py build
"$PY" scripts/book.py check

echo; echo "all tests passed"; date +%T
