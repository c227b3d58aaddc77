"""What this machine has, and what of MiniInfer will run where: ``python -m miniinfer.env``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess

import torch


def _version(distribution: str) -> str | None:
    # Read the installed metadata rather than importing: importing transformers takes seconds.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvcc_version() -> str | None:
    if shutil.which("nvcc") is None:
        return None
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    release = [line for line in out.splitlines() if "release" in line]
    return release[0].split("release")[-1].strip() if release else "unknown"


def card_name(device: str | torch.device | None = None) -> str:
    """What benchmark results call the card: the GPU's name for a CUDA device (when there is one), else
    the CPU's model with its core count and torch's thread count ("AMD EPYC (2 cores, 1 torch threads)")."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment() -> dict[str, str]:
    """Versions and devices, as strings (a missing piece reads 'not installed' / 'none')."""
    import miniinfer.kernels  # noqa: F401  (decides the Triton mode)
    from miniinfer.kernels.build import cuda_build_problem

    cuda = torch.cuda.is_available()
    triton = _version("triton")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    problem = cuda_build_problem()
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})",
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "triton": triton or "not installed",
        "transformers": _version("transformers") or "not installed",
        "nvcc": _nvcc_version() or "not found",
        "torch reference kernels": "run here",
        "Triton kernels": ("not available (pip install triton)" if triton is None
                           else "interpreted on the CPU (TRITON_INTERPRET=1): correct but slow" if interpreted
                           else "compiled for the GPU"),
        "CUDA kernels (csrc/)": "built and run here" if problem is None else f"not here: {problem}",
    }


def report() -> str:
    env = environment()
    width = max(map(len, env))
    return "\n".join(f"{key.rjust(width)} : {value}" for key, value in env.items())


if __name__ == "__main__":
    print(report())
