#!/usr/bin/env bash
# Create .venv and install torch + miniinfer[dev] into it. Safe to re-run.
#
# torch first, and on purpose: pip's default torch on Linux is a multi-GB CUDA build. On a machine
# without an NVIDIA GPU we install a CPU build, and we reuse a torch that is already importable.
set -euo pipefail
PYTHON="${1:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        # Reuse the torch that is already installed system-wide (e.g. a CUDA build on a GPU machine).
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        # Otherwise an isolated environment: nothing unexpected leaks in from the system's packages.
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if "$PY" -c "import torch" 2>/dev/null; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: reusing it"
elif command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" = "Darwin" ]; then
    echo "installing torch (GPU machine or macOS: PyPI's default build)"
    "${PIP[@]}" install torch
else
    echo "no NVIDIA GPU: installing a CPU build of torch"
    # A local wheel (find-links) or the PyTorch CPU index; never PyPI's CUDA build.
    "${PIP[@]}" install "torch==2.13.0+cpu" 2>/dev/null \
        || "${PIP[@]}" install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
        || "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
fi

"${PIP[@]}" install -q -e ".[dev]"
# Register this environment as the notebooks' "python3" kernel for JupyterLab, nbval and the grader.
"$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (miniinfer)" >/dev/null
"$PY" -c "import torch, miniinfer; print(f'ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}, miniinfer {miniinfer.__version__}')"
