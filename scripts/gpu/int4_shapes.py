"""Tune csrc/int4_gemv.cu on the card: every CTA shape code x K split, M = 1 and 16, on the benchmark's
shapes (8192², Qwen2.5-7B's four matmuls), bf16, group 128. Each variant is checked against the torch
reference, then timed as CUDA-graph replays over weight copies larger than L2 (benchmarks/quantization.py's
method). Prints a table and writes JSON (--out).

    python scripts/gpu/int4_shapes.py --out $OUT/int4_shapes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import time_per_call  # noqa: E402
from benchmarks.quantization import copy_bandwidth, int4_sets, num_sets  # noqa: E402
from miniinfer.env import card_name  # noqa: E402
from miniinfer.kernels.int4_matmul import (  # noqa: E402
    CUDA_SHAPES,
    cuda_split,
    int4_gemv_cuda,
    int4_matmul_torch,
    tile_int4_weight,
)

SHAPE_CODES = {code: f"{wn}x{wk} warps, " + (f"{u} in flight" if not stages else f"queue of {u}" if stages < 0
                                           else f"ring of {stages}")
               + (", tiled" if tiled else "") for code, (wn, wk, u, stages, tiled) in CUDA_SHAPES.items()}
MATRICES = [(8192, 8192), (3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--codes", type=int, nargs="*", default=sorted(SHAPE_CODES), help="shape codes to time")
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8], help="K splits (and the default)")
    ap.add_argument("--pdl", type=int, nargs="*", default=[0], choices=[0, 1],
                    help="time without (0) and/or with (1) programmatic dependent launch (consecutive calls overlap)")
    args = ap.parse_args()
    g = 128
    bandwidth = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for K, N in MATRICES:
        int4_bytes = K * N // 2 + (K // g) * N * 2 + (K // g) * N // 2
        sets = num_sets(int4_bytes)
        layers = int4_sets(K, N, g, sets)
        tiled_layers = [(tile_int4_weight(q), z, s) for q, z, s in layers] if any(
            CUDA_SHAPES[c][4] for c in args.codes) else None
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(num_sets(2 * K * N))]
        for M in args.ms:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            t_bf16, _ = time_per_call(lambda i, xs=xs, ws=ws: F.linear(xs[i % 4], ws[i % len(ws)]), len(ws))
            reference = int4_matmul_torch(xs[0].float(), *layers[0][:2], layers[0][2].float(), g)
            for code in args.codes:
                label = SHAPE_CODES[code]
                code_layers = tiled_layers if CUDA_SHAPES[code][4] else layers
                default_split = cuda_split(N, K, sms, None, code)[1]
                for split, pdl in [(s, p) for s in sorted({*args.splits, default_split}) for p in args.pdl]:
                    got = int4_gemv_cuda(xs[0], *code_layers[0], g, split_k=split, shape=code, pdl=bool(pdl))
                    err = (got.float() - reference).abs().max().item() / reference.abs().max().item()
                    if err > 2e-2:
                        rows.append({"K": K, "N": N, "M": M, "shape": label, "code": code, "split": split,
                                     "pdl": pdl, "error": err})
                        print("WRONG", rows[-1], flush=True)
                        continue
                    t, how = time_per_call(lambda i, s=split, c=code, p=pdl, xs=xs, ls=code_layers: int4_gemv_cuda(
                        xs[i % 4], *ls[i], g, split_k=s, shape=c, pdl=bool(p)), sets)
                    rows.append({"K": K, "N": N, "M": M, "shape": label, "code": code, "split": split, "pdl": pdl,
                                 "default split": split == default_split, "us": round(t * 1e6, 2),
                                 "bf16 us": round(t_bf16 * 1e6, 2), "vs bf16": round(t_bf16 / t, 2),
                                 "% floor": round(100 * int4_bytes / bandwidth / t, 1), "timing": how})
                    print(rows[-1], flush=True)
        layers = tiled_layers = ws = None  # free this matrix's copies before the next
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if "us" in r:
            key = (r["K"], r["N"], r["M"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print("\nbest per matrix:")
    for r in best.values():
        print(r)
    result = {"card": card_name("cuda"), "copy_bandwidth_TBps": round(bandwidth / 1e12, 3), "rows": rows,
              "best": list(best.values()), "command": "python scripts/gpu/int4_shapes.py"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
