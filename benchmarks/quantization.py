"""Quantized matmuls on a GPU: batch-1 decode is a weight read, so fewer bits should mean more tokens/s.

    python benchmarks/quantization.py                 # all parts, writes results/quantization_<gpu>.json
    python benchmarks/quantization.py --quick         # fewer shapes, a 4-layer engine model (smoke test)
    python benchmarks/quantization.py --parts gemv fp8 stack engine

Parts:

* ``gemv``: x [M, K] @ W for M = 1 and 16 on 8192 x 8192 and the four matmuls of a Qwen2.5-7B layer
  (E = 3584, I = 18944, qkv N = 4608), group 128: bf16 cuBLAS (``F.linear``), W8A8 (``torch._int_mm``
  with per-token activation quantization), torch's ``_weight_int4pack_mm`` (tinygemm), our Triton int4
  kernel, our CUDA int4 kernel (tensor cores, M ≤ 16). Each call is timed as a CUDA-graph replay rotating through
  enough weight copies to exceed the 50 MB L2 (a weight read from L2 is not a decode step). "% floor":
  the time to read the weight bytes (and scales/zeros) once at the measured copy bandwidth, over the
  measured time. Every implementation is first checked against a float32 reference on weight set 0
  (a wrong result is reported as WRONG RESULT, not timed). With ``--isolate`` (the default) the part
  runs in a child process that logs each row as it goes; after a CUDA fault (CUDA FAULT / PROCESS
  DIED rows) a fresh child takes the implementations not yet run, so one broken kernel loses nothing
  else. The results JSON is written after this part and again at the end (``summary.complete``).
* ``fp8``: an M = N = K = 8192 GEMM, bf16 vs ``torch._scaled_mm`` (E4M3, row-wise scales).
* ``stack``: the 7B layer's four matmuls, summed, x 28 layers: batch-1 decode tok/s of the linear
  layers alone (an upper bound on the engine's, which also reads the KV cache and runs attention).
* ``engine``: a random-weight 7B-shaped model in the engine (CUDA graphs), batch-1 decode tok/s in
  bf16 and with ``quantize_model(model, "int4")`` (RTN g128: speed does not depend on how the integers
  were chosen) and "w8a8".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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
    """torch's _weight_int4pack_mm operands [(packed weight, scales_and_zeros [K/g, N, 2])] and set 0's
    integers q [N, K] (for the check), or None when this torch lacks them."""
    try:
        out, q0 = [], None
        for _ in range(sets):
            q = torch.randint(0, 16, (N, K), dtype=torch.int32, device="cuda")
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            w = torch._convert_weight_to_int4pack(packed_u8, 8)  # inner_k_tiles 8: K % 128 == 0
            sz = (torch.rand(K // g, N, 2, device="cuda") * 0.01).to(torch.bfloat16)
            out.append((w, sz))
            q0 = q if q0 is None else q0
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, out[0][0], g, out[0][1])
        torch.cuda.synchronize()
        return out, q0
    except Exception as error:  # noqa: BLE001 - torch version without it
        print(f"    (torch _weight_int4pack_mm unavailable: {type(error).__name__}: {error})", flush=True)
        return None


IMPLS = ("bf16 cuBLAS", "W8A8 _int_mm", "torch _weight_int4pack_mm", "ours: Triton int4", "ours: CUDA int4")
CHECK_TOL = {"W8A8 _int_mm": 5e-2}  # per-token int8 activations; the others: 2e-2 (bf16 output rounding)


class BenchmarkFault(RuntimeError):
    """A CUDA error: this process's context is dead, the rest must run in a fresh process."""


def _is_cuda_fault(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "CUDA error" in text or "AcceleratorError" in text or "illegal memory access" in text \
        or "device-side assert" in text


def check_output(impl: str, got: torch.Tensor, reference: torch.Tensor) -> str | None:
    """None, or why ``got`` (on the first weight set) is not ``reference`` (float32)."""
    if tuple(got.shape) != tuple(reference.shape):
        return f"wrong shape {tuple(got.shape)}, expected {tuple(reference.shape)}"
    got = got.float()
    if not torch.isfinite(got).all().item():
        return f"non-finite output ({(~torch.isfinite(got)).sum().item()} values)"
    scale = reference.abs().max().item()
    err = (got - reference).abs().max().item()
    tol = CHECK_TOL.get(impl, 2e-2)
    if err > tol * scale:
        where = divmod(int((got - reference).abs().argmax().item()), reference.shape[1])
        return f"max error {err:.3g} > {tol} x max|ref| {scale:.3g} at (m, n) = {where}"
    return None


def time_impls(M: int, K: int, N: int, g: int, bandwidth: float, skip: set | frozenset = frozenset(),
               emit=None) -> list[dict]:
    """Time every implementation on x [M, K] @ W [K, N]; each is first checked against a float32
    reference on weight set 0 (a wrong result is reported, not timed). ``skip``: impl names not to run
    (done, or failed, in an earlier process). ``emit(kind, payload)``: progress, called before each impl
    ("start", impl) and after it ("row", row), so that a parent process can tell where a child died.
    Raises :class:`BenchmarkFault` after recording the row of an impl that hit a CUDA error."""
    from miniinfer.kernels.int4_matmul import int4_gemv_cuda, int4_matmul_torch, int4_matmul_triton
    from miniinfer.quant.linear import int_mm
    from miniinfer.quant.quantize import quantize_per_token

    emit = emit or (lambda kind, payload: None)
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
        emit("row", rows[-1])

    def run(impl: str, weight_bytes: int, setup):
        """setup() -> (call(i), sets, reference float32 [M, N] for set 0), or None when unavailable."""
        if impl in skip:
            return
        emit("start", impl)
        print(f"  M={M} K={K} N={N}: {impl}", flush=True)
        try:
            made = setup()
            if made is None:
                record(impl, None, weight_bytes, "unavailable")
                return
            call, sets, reference = made
            wrong = check_output(impl, call(0), reference)
            torch.cuda.synchronize()
            if wrong:
                record(impl, None, weight_bytes, "WRONG RESULT", wrong[:300])
                return
            reference = None
            t, how = time_per_call(call, sets)
            record(impl, t, weight_bytes, how)
        except Exception as error:  # noqa: BLE001 - report, and go on unless the CUDA context is dead
            traceback.print_exc()
            fault = _is_cuda_fault(error)
            record(impl, None, weight_bytes, "CUDA FAULT" if fault else "failed", f"{type(error).__name__}: {error}"[:300])
            if fault:
                raise BenchmarkFault(f"{impl} at M={M} K={K} N={N}: {error}") from error
        finally:
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a dead context: the fault above is what matters
                pass

    def bf16():
        sets = num_sets(bf16_bytes)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
        return (lambda i: F.linear(xs[i % 4], ws[i])), sets, xs[0].float() @ ws[0].float().t()

    def w8a8():
        sets = num_sets(int8_bytes)
        w8 = [torch.randint(-127, 128, (K, N), dtype=torch.int8, device="cuda") for _ in range(sets)]
        s8 = torch.rand(N, device="cuda")

        def call(i):
            qx, sx = quantize_per_token(xs[i % 4])
            return (int_mm(qx, w8[i]).float() * sx * s8).to(torch.bfloat16)
        return call, sets, (xs[0].float() @ w8[0].float()) * s8

    def tinygemm():
        sets = num_sets(int4_bytes)
        made = tinygemm_sets(K, N, g, sets)
        if made is None:
            return None
        tg, q0 = made
        scale, zero = tg[0][1][..., 0].float(), tg[0][1][..., 1].float()  # [K/g, N]
        # torch's convention (test_linalg's _group_quantize_tensor): w[n, k] = (q - 8) * scale + zero
        w_kn = (q0.t().float() - 8) * scale.repeat_interleave(g, 0) + zero.repeat_interleave(g, 0)
        reference = xs[0].float() @ w_kn
        return (lambda i: torch._weight_int4pack_mm(xs[i % 4], tg[i][0], g, tg[i][1])), sets, reference

    layers = []

    def int4_layers():
        if not layers:
            layers.extend(int4_sets(K, N, g, num_sets(int4_bytes)))
        return layers

    def int4_reference():
        qweight, qzeros, scales = int4_layers()[0]
        return int4_matmul_torch(xs[0].float(), qweight, qzeros, scales.float(), g)

    def triton():
        ls = int4_layers()
        return (lambda i: int4_matmul_triton(xs[i % 4], *ls[i], g)), len(ls), int4_reference()

    def cuda_gemv():
        ls = int4_layers()
        return (lambda i: int4_gemv_cuda(xs[i % 4], *ls[i], g)), len(ls), int4_reference()

    run("bf16 cuBLAS", bf16_bytes, bf16)
    run("W8A8 _int_mm", int8_bytes, w8a8)
    run("torch _weight_int4pack_mm", int4_bytes, tinygemm)
    run("ours: Triton int4", int4_bytes, triton)
    run("ours: CUDA int4", int4_bytes, cuda_gemv)
    layers.clear()  # free the copies
    torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """"vs bf16": bf16 cuBLAS's time at the same (M, K, N) over each row's."""
    base = {(r["M"], r["K"], r["N"]): r["us"] for r in rows if r["impl"] == "bf16 cuBLAS" and r["us"]}
    for row in rows:
        b = base.get((row["M"], row["K"], row["N"]))
        row["vs bf16"] = round(b / row["us"], 2) if b and row["us"] else None


def gemv_child(rows_path: str, groups: list, g: int, bandwidth: float) -> int:
    """The gemv part in this process, appending progress to ``rows_path`` (JSON lines) as it goes; impls
    that already have a row there (from an earlier process) are skipped. Exit code 3: a CUDA fault."""
    done: dict = {}
    path = Path(rows_path)
    if path.exists():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            if "row" in item:
                r = item["row"]
                done.setdefault((r["M"], r["K"], r["N"]), set()).add(r["impl"])

    with path.open("a") as log:
        for M, K, N in groups:
            def emit(kind, payload, M=M, K=K, N=N):
                item = {"row": payload} if kind == "row" else {"start": [M, K, N, payload]}
                log.write(json.dumps(item) + "\n")
                log.flush()
            try:
                time_impls(M, K, N, g, bandwidth, skip=frozenset(done.get((M, K, N), ())), emit=emit)
            except BenchmarkFault as fault:
                print(f"    CUDA fault ({fault}); a fresh process takes the rest", flush=True)
                return 3
    return 0


def read_progress(rows_path: Path) -> tuple[list[dict], list | None]:
    """-> (rows so far, the [M, K, N, impl] started last without a row, or None)."""
    rows, pending = [], None
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            try:
                item = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if "start" in item:
                pending = item["start"]
            elif "row" in item:
                rows.append(item["row"])
                pending = None
    return rows, pending


def part_gemv(groups: list, g: int, bandwidth: float, isolate: bool) -> list[dict]:
    if not isolate:
        rows = []
        for M, K, N in groups:
            try:
                rows += time_impls(M, K, N, g, bandwidth)
            except BenchmarkFault as fault:
                print(f"    CUDA fault ({fault}); the context is dead: stopping the gemv part "
                      "(run with --isolate to go on in a fresh process)", flush=True)
                break
        add_ratios(rows)
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "gemv_rows.jsonl"
        for _attempt in range(2 * len(IMPLS) * len(groups)):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_gemv-child", str(rows_path),
                   "--_groups", json.dumps(groups), "--_bandwidth", repr(bandwidth), "--_group-size", str(g)]
            rc = subprocess.run(cmd).returncode
            if rc == 0:
                break
            rows, pending = read_progress(rows_path)
            if pending is None:
                if rc == 3:
                    continue  # the faulting impl wrote its row before exiting; go on in a fresh process
                print(f"    gemv child exited with {rc} outside any implementation; giving up on the rest",
                      flush=True)
                break
            M, K, N, impl = pending
            row = {"M": M, "K": K, "N": N, "impl": impl, "us": None, "weight MB": None, "% floor": None,
                   "timing": "PROCESS DIED", "note": f"the process died in it (exit code {rc})"}
            print(row, flush=True)
            with rows_path.open("a") as log:  # a new line first: the child may have died mid-line
                log.write("\n" + json.dumps({"row": row}) + "\n")
        rows, _ = read_progress(rows_path)
    add_ratios(rows)
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
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                    help="run the gemv part in a child process, and after a CUDA fault go on in a fresh one "
                         "(the faulting implementation is reported; the others keep their results)")
    ap.add_argument("--_gemv-child", dest="gemv_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_groups", dest="groups", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_bandwidth", dest="bandwidth", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_group-size", dest="group_size", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gemv_child:
        return gemv_child(args.gemv_child, [tuple(x) for x in json.loads(args.groups)], args.group_size,
                          args.bandwidth)
    if not torch.cuda.is_available():
        print("benchmarks/quantization.py needs a CUDA GPU (the CPU quality table is scripts/quant_quality.py)")
        return 1
    started = time.perf_counter()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    g = 128
    summary: dict = {"copy_bandwidth_TBps": round(bandwidth / 1e12, 3), "group_size": g}
    gemv_rows, stack_rows, fp8_rows, engine_rows = [], [], [], []
    columns = ["M", "K", "N", "impl", "us", "weight MB", "% floor", "vs bf16", "timing", "note"]

    def save(final: bool) -> None:
        summary["fp8"] = fp8_rows
        summary["stack_7b"] = stack_rows
        summary["engine"] = engine_rows
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["complete"] = final
        from miniinfer.kernels import int4_matmul

        # Our CUDA GEMV's launch: its CTA shape code and whether consecutive calls overlap (programmatic
        # dependent launch), as MINIINFER_INT4_CUDA_SHAPE / MINIINFER_INT4_PDL set them for this run.
        summary["int4_cuda_shape"] = int4_matmul.CUDA_DEFAULT_SHAPE
        summary["int4_cuda_pdl"] = int4_matmul.CUDA_PDL
        write_results("quantization", "int4/int8/FP8 matmuls and batch-1 decode (bf16 activations)", "cuda",
                      columns, gemv_rows, summary,
                      notes="group 128; weights rotated over copies larger than L2; CUDA-graph replays; each "
                            "implementation checked against a float32 reference before it is timed. "
                            "% floor = weight bytes / copy bandwidth / time.", out=args.out)

    if "gemv" in args.parts:
        groups = [(M, 8192, 8192) for M in (1, 16)]
        if not args.quick:
            groups += [(1, K, N) for K, N in LAYER_7B.values()]
        gemv_rows = part_gemv(groups, g, bandwidth, args.isolate)
        by = {(r["M"], r["K"], r["N"], r["impl"]): r for r in gemv_rows}

        def us(M, impl):
            return by.get((M, 8192, 8192, impl), {}).get("us")
        cuda1, triton1 = us(1, "ours: CUDA int4"), us(1, "ours: Triton int4")
        ours1 = min([t for t in (cuda1, triton1) if t], default=None)
        bf1, tg1 = us(1, "bf16 cuBLAS"), us(1, "torch _weight_int4pack_mm")
        t16 = min([t for t in (us(16, "ours: CUDA int4"), us(16, "ours: Triton int4")) if t], default=None)
        bf16_16 = us(16, "bf16 cuBLAS")
        summary |= {"gemv_8192_M1_ours_vs_bf16": round(bf1 / ours1, 2) if ours1 and bf1 else None,
                    "gemv_8192_M1_ours_vs_torch_int4pack": round(tg1 / ours1, 2) if ours1 and tg1 else None,
                    "gemv_8192_M16_ours_vs_bf16": round(bf16_16 / t16, 2) if t16 and bf16_16 else None,
                    "goals": {"M1_vs_bf16": 3.0, "M1_vs_int4pack": 1.6, "M16_vs_bf16": 2.0},
                    "gemv_not_timed": [f"M={r['M']} K={r['K']} N={r['N']} {r['impl']}: {r['timing']} {r['note']}"
                                       for r in gemv_rows if r["us"] is None]}
        save(final=False)  # the gemv rows are on disk whatever the later parts do
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
    save(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
