"""Build CUDA C++ kernels from ``csrc/`` into a torch extension, just in time.

``load_cuda_extension("vector_add", ["vector_add.cu", "vector_add_binding.cpp"])`` compiles the
sources with ``torch.utils.cpp_extension.load`` (nvcc + the host compiler, driven by ninja) for the
GPU in this machine, caches the build under ``~/.cache/miniinfer/extensions`` (keyed by a hash of the
sources, the torch version and the GPU architecture), and returns the imported module. The first
build takes a minute; later calls, even in new processes, reuse it.

On a machine without a CUDA GPU it raises :class:`CudaUnavailableError` straight away, saying why,
instead of failing deep inside the compiler.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch


class CudaUnavailableError(RuntimeError):
    """The CUDA kernels cannot be built or run here (no GPU, CPU-only torch, or no nvcc)."""


def csrc_dir() -> Path:
    """The ``csrc/`` folder of a source checkout (the kernels are built from source)."""
    path = Path(__file__).resolve().parents[2] / "csrc"
    if not path.is_dir():
        raise CudaUnavailableError(
            f"CUDA sources not found at {path}: the CUDA kernels build from a source checkout of miniinfer "
            "(git clone, then `pip install -e .`).")
    return path


@functools.cache
def cuda_build_problem() -> str | None:
    """Why CUDA kernels cannot be built here, or None when they can (asked once per process: it
    searches PATH, which is far too slow for a per-layer check)."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; CUDA kernels need a CUDA build of "
                "torch and a CUDA GPU. On this machine use the Triton kernels (interpreted on the CPU) or "
                "the torch reference instead.")
    if not torch.cuda.is_available():
        return "torch was built with CUDA but sees no GPU (torch.cuda.is_available() is False)."
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if shutil.which("nvcc") is None and not (cuda_home and Path(cuda_home, "bin", "nvcc").exists()):
        return "nvcc, the CUDA compiler, is not on PATH (set CUDA_HOME to your CUDA toolkit)."
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is missing: `pip install ninja` (torch's extension builder needs it)."
    return None


def cuda_kernels_available() -> bool:
    return cuda_build_problem() is None


def _build_key(name: str, sources: list[Path], flags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    major, minor = torch.cuda.get_device_capability()
    digest.update(f"{torch.__version__}|{torch.version.cuda}|sm_{major}{minor}|{' '.join(flags)}".encode())
    return f"{name}-{digest.hexdigest()[:16]}"


@functools.cache
def load_cuda_extension(name: str, sources: tuple[str, ...], extra_cuda_cflags: tuple[str, ...] = (),
                        verbose: bool = False):
    """Compile (or reuse) the extension ``name`` from files in ``csrc/`` and import it."""
    problem = cuda_build_problem()
    if problem:
        raise CudaUnavailableError(f"cannot build the CUDA kernel '{name}': {problem}")
    from torch.utils.cpp_extension import load

    paths = [csrc_dir() / s for s in sources]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"CUDA sources missing: {missing}")
    major, minor = torch.cuda.get_device_capability()
    # Build for exactly this GPU: smaller, faster to compile, and Hopper gets its own sm_90 code.
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    cuda_flags = ["-O3", "--use_fast_math", "-lineinfo", *extra_cuda_cflags]
    cache_root = Path(os.environ.get("MINIINFER_CACHE", Path.home() / ".cache" / "miniinfer")) / "extensions"
    build_dir = cache_root / _build_key(name, paths, cuda_flags)
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(p) for p in paths], extra_cflags=["-O3"], extra_cuda_cflags=cuda_flags,
                build_directory=str(build_dir), verbose=verbose)
