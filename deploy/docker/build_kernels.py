"""Compile MiniInfer's CUDA kernels (csrc/) at image build time, for the GPUs in TORCH_CUDA_ARCH_LIST.

Run in the CUDA *devel* stage (nvcc, a host compiler and ninja are there; no GPU is needed to compile):

    TORCH_CUDA_ARCH_LIST="8.0;9.0" python build_kernels.py --csrc /src/csrc --out /opt/miniinfer/kernels

Each extension becomes ``OUT/<name>.so`` (a fat binary for every listed architecture), which the runtime image
copies; ``MINIINFER_PREBUILT_KERNELS=OUT`` tells the engine where they are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# name -> sources in csrc/, the same list as the engine's loaders (miniinfer/kernels/*.py).
EXTENSIONS = {
    "miniinfer_vector_add": ("vector_add.cu", "vector_add_binding.cpp"),
    "miniinfer_paged_attention": ("paged_attention.cu", "paged_attention_binding.cpp"),
    "miniinfer_flash_attention": ("flash_attention.cu", "flash_attention_binding.cpp"),
    "miniinfer_int4_gemv": ("int4_gemv.cu", "int4_gemv_binding.cpp"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csrc", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from torch.utils.cpp_extension import load

    args.out.mkdir(parents=True, exist_ok=True)
    for name, sources in EXTENSIONS.items():
        paths = [args.csrc / s for s in sources]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            print(f"skip {name}: missing {missing}", file=sys.stderr)
            continue
        build = args.out / "build" / name
        build.mkdir(parents=True, exist_ok=True)
        load(name=name, sources=[str(p) for p in paths], extra_cflags=["-O3"],
             extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"], build_directory=str(build),
             verbose=True)
        shutil.copy2(build / f"{name}.so", args.out / f"{name}.so")
        print(f"built {args.out / f'{name}.so'}")
    shutil.rmtree(args.out / "build", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
