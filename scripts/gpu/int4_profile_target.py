"""A few launches of our CUDA int4 kernel for a profiler (Nsight Compute):

    ncu -k regex:int4_matmul_kernel -c 2 --section SpeedOfLight --section WarpStateStats \\
        python scripts/gpu/int4_profile_target.py --K 8192 --N 8192 --M 1 --shape 7 --split 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quantization import int4_sets  # noqa: E402
from miniinfer.kernels.int4_matmul import int4_gemv_cuda  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--K", type=int, default=8192)
ap.add_argument("--N", type=int, default=8192)
ap.add_argument("--M", type=int, default=1)
ap.add_argument("--shape", type=int, default=0)
ap.add_argument("--split", type=int, default=None)
args = ap.parse_args()
layer = int4_sets(args.K, args.N, 128, 1)[0]
x = torch.randn(args.M, args.K, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    int4_gemv_cuda(x, *layer, 128, split_k=args.split, shape=args.shape)
torch.cuda.synchronize()
