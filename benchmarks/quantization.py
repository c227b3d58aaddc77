"""Quantized matmuls on a GPU: batch-1 decode is a weight read, so fewer bits should mean more tokens/s.

    python benchmarks/quantization.py                 # all parts, writes results/quantization_<gpu>.json
    python benchmarks/quantization.py --quick         # fewer shapes, a 4-layer engine model (smoke test)
    python benchmarks/quantization.py --parts gemv fp8 stack engine

Parts:

* ``gemv``: x [M, K] @ W for M = 1 and 16 on 8192 x 8192 and the four matmuls of a Qwen2.5-7B layer
  (E = 3584, I = 18944, qkv N = 4608), group 128: bf16 cuBLAS (``F.linear``), W8A8 (``torch._int_mm``
  with per-token activation quantization), torch's ``_weight_int4pack_mm`` (tinygemm), our Triton int4
  kernel, our CUDA int4 GEMV (M = 1). Each call is timed as a CUDA-graph replay rotating through
  enough weight copies to exceed the 50 MB L2 (a weight read from L2 is not a decode step). "% floor":
  the time to read the weight bytes (and scales/zeros) once at the measured copy bandwidth, over the
  measured time.
* ``fp8``: an M = N = K = 8192 GEMM, bf16 vs ``torch._scaled_mm`` (E4M3, row-wise scales).
* ``stack``: the 7B layer's four matmuls, summed, x 28 layers: batch-1 decode tok/s of the linear
  layers alone (an upper bound on the engine's, which also reads the KV cache and runs attention).
* ``engine``: a random-weight 7B-shaped model in the engine (CUDA graphs), batch-1 decode tok/s in
  bf16 and with ``quantize_model(model, "int4")`` (RTN g128: speed does not depend on how the integers
  were chosen) and "w8a8".
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_cuda, time_per_call, write_results  # noqa: E402

E7, I7, QKV7 = 3584, 18944, 4608
SHAPES = {"8192x8192": (8192, 8192)}
LAYER_7B = {"qkv_proj": (E7, QKV7), "o_proj": (E7, E7), "gate_up_proj": (E7, 2 * I7), "down_proj": (I7, E7)}
L2_BYTES = 50 * 2**20


def copy_bandwidth() -> float:
    n = 1 << 30
    a, b = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    seconds = time_cuda(lambda: b.copy_(a), warmup=3, repeat=20)
    a = b = None
    torch.cuda.empty_cache()
    return 2 * n / seconds


def num_sets(weight_bytes: int) -> int:
    return max(2, min(16, -(-4 * L2_BYTES // max(1, weight_bytes))))


def int4_sets(K: int, N: int, g: int, sets: int):
    """Random int4 layers in our layout (qweight, qzeros, scales), ``sets`` copies."""
    out = []
    for _ in range(sets):
        qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda")
        qzeros = torch.randint(-2**31, 2**31 - 1, (K // g, N // 8), dtype=torch.int32, device="cuda")
        scales = (torch.rand(K // g, N, device="cuda") * 0.01).to(torch.bfloat16)
        out.append((qweight, qzeros, scales))
    return out


def tinygemm_sets(K: int, N: int, g: int, sets: int):
    """torch's _weight_int4pack_mm operands, or None when this torch lacks them."""
    try:
        out = []
        for _ in range(sets):
            q = torch.randint(0, 16, (N, K), dtype=torch.int32, device="cuda")
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            w = torch._convert_weight_to_int4pack(packed_u8, 8)
            sz = (torch.rand(K // g, N, 2, device="cuda") * 0.01).to(torch.bfloat16)
            out.append((w, sz))
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, out[0][0], g, out[0][1])
        return out
    except Exception as error:  # noqa: BLE001 - torch version without it
        print(f"    (torch _weight_int4pack_mm unavailable: {type(error).__name__}: {error})", flush=True)
        return None


def time_impls(M: int, K: int, N: int, g: int, bandwidth: float) -> list[dict]:
    from miniinfer.kernels.int4_matmul import int4_gemv_cuda, int4_matmul_triton
    from miniinfer.quant.linear import int_mm
    from miniinfer.quant.quantize import quantize_per_token

    rows = []
    xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    bf16_bytes, int8_bytes = 2 * K * N, K * N + 4 * N
    int4_bytes = K * N // 2 + (K // g) * N * 2 + (K // g) * N // 2

    def record(impl: str, seconds: float | None, weight_bytes: int, how: str, note: str = ""):
        floor = weight_bytes / bandwidth
        rows.append({"M": M, "K": K, "N": N, "impl": impl, "us": None if seconds is None else round(seconds * 1e6, 2),
                     "weight MB": round(weight_bytes / 1e6, 1),
                     "% floor": None if seconds is None else round(100 * floor / seconds, 1), "timing": how,
                     "note": note})
        print(rows[-1], flush=True)

    sets = num_sets(bf16_bytes)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
    t, how = time_per_call(lambda i: F.linear(xs[i % 4], ws[i]), sets)
    record("bf16 cuBLAS", t, bf16_bytes, how)
    ws = None

    sets = num_sets(int8_bytes)
    w8 = [torch.randint(-127, 128, (K, N), dtype=torch.int8, device="cuda") for _ in range(sets)]
    s8 = torch.rand(N, device="cuda")

    def w8a8(i):
        qx, sx = quantize_per_token(xs[i % 4])
        return (int_mm(qx, w8[i]).float() * sx * s8).to(torch.bfloat16)
    try:
        t, how = time_per_call(w8a8, sets)
        record("W8A8 _int_mm", t, int8_bytes, how, "includes the activation quantization")
    except Exception as error:  # noqa: BLE001
        record("W8A8 _int_mm", None, int8_bytes, "failed", f"{type(error).__name__}: {error}"[:200])
    w8 = None

    sets = num_sets(int4_bytes)
    tg = tinygemm_sets(K, N, g, sets)
    if tg is not None:
        t, how = time_per_call(lambda i: torch._weight_int4pack_mm(xs[i % 4], tg[i][0], g, tg[i][1]), sets)
        record("torch _weight_int4pack_mm", t, int4_bytes, how)
    tg = None
    layers = int4_sets(K, N, g, sets)
    try:
        t, how = time_per_call(lambda i: int4_matmul_triton(xs[i % 4], *layers[i], g), sets)
        record("ours: Triton int4", t, int4_bytes, how)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        record("ours: Triton int4", None, int4_bytes, "failed", f"{type(error).__name__}: {error}"[:200])
    if M == 1:
        try:
            t, how = time_per_call(lambda i: int4_gemv_cuda(xs[i % 4], *layers[i], g), sets)
            record("ours: CUDA int4 GEMV", t, int4_bytes, how)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            record("ours: CUDA int4 GEMV", None, int4_bytes, "failed", f"{type(error).__name__}: {error}"[:200])
    layers = None  # free the copies
    torch.cuda.empty_cache()
    base = rows[0]["us"]
    for row in rows:
        row["vs bf16"] = round(base / row["us"], 2) if row["us"] else None
    return rows


def part_fp8() -> list[dict]:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * n**3
    t_bf16 = time_cuda(lambda: a @ b.t(), warmup=5, repeat=20)
    rows = [{"impl": "bf16 matmul", "us": round(t_bf16 * 1e6, 1), "TFLOP/s": round(flops / t_bf16 / 1e12, 1),
             "vs bf16": 1.0}]
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        sa = torch.ones(n, 1, device="cuda")
        sb = torch.ones(1, n, device="cuda")
        t8 = time_cuda(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                       warmup=5, repeat=20)
        rows.append({"impl": "FP8 E4M3 _scaled_mm (row-wise scales)", "us": round(t8 * 1e6, 1),
                     "TFLOP/s": round(flops / t8 / 1e12, 1), "vs bf16": round(t_bf16 / t8, 2)})
        s1 = torch.ones((), device="cuda")
        t8t = time_cuda(lambda: torch._scaled_mm(a8, b8.t(), scale_a=s1, scale_b=s1, out_dtype=torch.bfloat16),
                        warmup=5, repeat=20)
        rows.append({"impl": "FP8 E4M3 _scaled_mm (per-tensor scales)", "us": round(t8t * 1e6, 1),
                     "TFLOP/s": round(flops / t8t / 1e12, 1), "vs bf16": round(t_bf16 / t8t, 2)})
    except Exception as error:  # noqa: BLE001
        rows.append({"impl": "FP8 _scaled_mm", "us": None, "note": f"{type(error).__name__}: {error}"[:200]})
    for r in rows:
        print(r, flush=True)
    return rows


def part_engine(quick: bool, bandwidth: float) -> list[dict]:
    import random

    from benchmarks.engine_throughput import (
        best,
        build_model,
        drive,
        greedy,
        random_prompts,
        weight_read_bytes,
    )
    from miniinfer.engine import EngineConfig, LLMEngine
    from miniinfer.quant.model import quantize_model

    rows = []
    layers = 4 if quick else None
    for method in ("bf16", "int4", "w8a8"):
        model = build_model("7b", num_layers=layers, max_positions=4096)
        if method != "bf16":
            quantize_model(model, method)
            torch.cuda.empty_cache()
        read_bytes = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers())
                         if b.dtype != torch.float32)
        read_bytes -= model.model.embed_tokens.weight.numel() * 2  # one row of the (untied) table is read
        _, all_bytes = weight_read_bytes(model)
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=1, max_model_len=1024))
        rng = random.Random(0)
        prompt = random_prompts(rng, model.config.vocab_size, [128])
        drive(engine, prompt, [greedy(8)], "cuda")
        run = best([drive(engine, prompt, [greedy(128)], "cuda") for _ in range(3)])
        rate = run.decode_tok_s or run.tokens / run.seconds
        rows.append({"model": f"7B shape{'' if layers is None else f', {layers} layers'}", "weights": method,
                     "decode tok/s": round(rate, 1), "bytes/token GB": round(read_bytes / 1e9, 2),
                     "% floor": round(100 * rate / (bandwidth / read_bytes), 1)})
        print(rows[-1], flush=True)
        del engine, model
        torch.cuda.empty_cache()
    base = rows[0]["decode tok/s"]
    for r in rows:
        r["vs bf16"] = round(r["decode tok/s"] / base, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["gemv", "fp8", "stack", "engine"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/quantization.py needs a CUDA GPU (the CPU quality table is scripts/quant_quality.py)")
        return 1
    started = time.perf_counter()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    g = 128
    summary: dict = {"copy_bandwidth_TBps": round(bandwidth / 1e12, 3), "group_size": g}
    gemv_rows, stack_rows, fp8_rows, engine_rows = [], [], [], []
    if "gemv" in args.parts:
        for M in (1, 16):
            gemv_rows += time_impls(M, 8192, 8192, g, bandwidth)
        if not args.quick:
            for K, N in LAYER_7B.values():
                gemv_rows += time_impls(1, K, N, g, bandwidth)
        by = {(r["M"], r["K"], r["N"], r["impl"]): r for r in gemv_rows}
        cuda1 = by.get((1, 8192, 8192, "ours: CUDA int4 GEMV"), {}).get("us")
        triton1 = by.get((1, 8192, 8192, "ours: Triton int4"), {}).get("us")
        ours1 = min([t for t in (cuda1, triton1) if t] or [None]) if (cuda1 or triton1) else None
        bf1 = by[(1, 8192, 8192, "bf16 cuBLAS")]["us"]
        tg1 = by.get((1, 8192, 8192, "torch _weight_int4pack_mm"), {}).get("us")
        t16 = by.get((16, 8192, 8192, "ours: Triton int4"), {}).get("us")
        bf16_16 = by[(16, 8192, 8192, "bf16 cuBLAS")]["us"]
        summary |= {"gemv_8192_M1_ours_vs_bf16": round(bf1 / ours1, 2) if ours1 else None,
                    "gemv_8192_M1_ours_vs_torch_int4pack": round(tg1 / ours1, 2) if ours1 and tg1 else None,
                    "gemv_8192_M16_ours_vs_bf16": round(bf16_16 / t16, 2) if t16 else None,
                    "goals": {"M1_vs_bf16": 3.0, "M1_vs_int4pack": 1.6, "M16_vs_bf16": 2.0}}
    if "stack" in args.parts and gemv_rows and not args.quick:
        impls = sorted({r["impl"] for r in gemv_rows if r["M"] == 1})
        for impl in impls:
            times = [next((r["us"] for r in gemv_rows if r["M"] == 1 and (r["K"], r["N"]) == shape
                           and r["impl"] == impl), None) for shape in LAYER_7B.values()]
            if None in times:
                continue
            per_token = 28 * sum(times) * 1e-6
            stack_rows.append({"impl": impl, "layer us": round(sum(times), 1),
                               "linear-only tok/s (28 layers)": round(1 / per_token, 1)})
        base = next((r["linear-only tok/s (28 layers)"] for r in stack_rows if r["impl"] == "bf16 cuBLAS"), None)
        for r in stack_rows:
            r["vs bf16"] = round(r["linear-only tok/s (28 layers)"] / base, 2) if base else None
        print_table(["impl", "layer us", "linear-only tok/s (28 layers)", "vs bf16"], stack_rows)
    if "fp8" in args.parts:
        fp8_rows = part_fp8()
        summary["fp8_gemm_8192_vs_bf16"] = max((r.get("vs bf16") or 0 for r in fp8_rows[1:]), default=None)
    if "engine" in args.parts:
        try:
            engine_rows = part_engine(args.quick, bandwidth)
            summary["engine_7b_int4_vs_bf16"] = next(r["vs bf16"] for r in engine_rows if r["weights"] == "int4")
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            summary["engine_error"] = f"{type(error).__name__}: {error}"[:300]
    if gemv_rows:
        print_table(["M", "K", "N", "impl", "us", "weight MB", "% floor", "vs bf16", "timing"], gemv_rows)
    if engine_rows:
        print_table(["model", "weights", "decode tok/s", "bytes/token GB", "% floor", "vs bf16"], engine_rows)
    summary["fp8"] = fp8_rows
    summary["stack_7b"] = stack_rows
    summary["engine"] = engine_rows
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_results("quantization", "int4/int8/FP8 matmuls and batch-1 decode (bf16 activations)", "cuda",
                  ["M", "K", "N", "impl", "us", "weight MB", "% floor", "vs bf16", "timing", "note"], gemv_rows,
                  summary, notes="group 128; weights rotated over copies larger than L2; CUDA-graph replays. "
                                 "% floor = weight bytes / copy bandwidth / time.", out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
