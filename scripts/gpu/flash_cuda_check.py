"""Build, check and time our CUDA flash-attention kernel (csrc/flash_attention.cu) on one GPU.

    python scripts/gpu/flash_cuda_check.py              # build + correctness matrix + timings (~2-4 min on an H200)
    python scripts/gpu/flash_cuda_check.py --no-perf    # build + correctness only
    OUT=/some/dir python scripts/gpu/flash_cuda_check.py   # also writes $OUT/flash_cuda_check.json

1. Builds the extension (JIT, timed; the compiler's message is printed if it fails).
2. Correctness matrix against a float64 oracle, simplest case first: one line per case with the max
   absolute error, the tolerance, and on failure where the worst element is (sequence, query, head,
   dim), the kernel's and the oracle's values there and how many elements/rows are off — enough to tell
   a fragment-layout bug (every row off) from a masking bug (some rows) from a tail bug (last tile).
   Cases: varlen batches with odd lengths (S > L, S < L, an empty sequence), GQA ratios 1/2/7/8, D 64
   and 128, bf16 and fp16, causal and not, paged K/V with permuted block tables (P 16, 64, 256), q as a
   strided slice of a fused QKV tensor.
3. Timings, B 8, H 16, S 4096, bf16: causal and not, D 128 and 64, for our CUDA kernel, our Triton
   kernel (flash_attention backend='triton'), torch SDPA with the flash backend and with the cuDNN
   backend (torch.nn.attention.sdpa_kernel): ms and TFLOP/s, FLOPs = 4·B·H·S²·D (halved when causal),
   and the CUDA kernel's max difference from SDPA-flash on that input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from miniinfer.kernels.flash_attention import flash_attention  # noqa: E402

TOL = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}  # (atol, rtol), as the GPU tests
Q_LENS = [1, 97, 300, 0, 513, 64, 40]
K_LENS = [1, 97, 1000, 5, 513, 1500, 10]
SHAPES = [(8, 8, 64), (16, 8, 128), (14, 2, 128), (28, 4, 64), (32, 4, 128)]  # (H, H_kv, D): G = 1, 2, 7, 7, 8
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def log(message: str = "") -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------

def oracle(q, k, v, causal, scale):
    """q [L, H, D], k, v [S, H_kv, D] -> [L, H, D] float64 (zeros for a query that sees no key)."""
    L, H, _ = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    k, v = (t.double().repeat_interleave(H // H_kv, dim=1) for t in (k, v))
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    if causal:
        visible = torch.arange(S, device=q.device)[None, :] <= (torch.arange(L, device=q.device) + S - L)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).clamp(min=-1e300))
    total = weights.sum(-1, keepdim=True)
    return torch.einsum("hls,shd->lhd", weights / torch.where(total > 0, total, torch.ones_like(total)), v)


def cumulative(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")


def varlen_case(q_lens, k_lens, H, H_kv, D, dtype, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=gen).to(dtype).cuda()
    k = torch.randn(sum(k_lens), H_kv, D, generator=gen).to(dtype).cuda()
    v = torch.randn(sum(k_lens), H_kv, D, generator=gen).to(dtype).cuda()
    cu_q, cu_k = cumulative(q_lens), cumulative(k_lens)
    bounds = list(itertools.accumulate(k_lens, initial=0))
    pieces = [(k[bounds[b]:bounds[b + 1]], v[bounds[b]:bounds[b + 1]]) for b in range(len(k_lens))]
    call = dict(q=q, k=k, v=v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    return call, pieces


def paged_case(prefix, new, P, H, H_kv, D, dtype, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = [p + n for p, n in zip(prefix, new)]
    needed = [math.ceil(n / P) for n in lengths]
    num_blocks = sum(needed) + 5
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width, cursor, tables = max(needed) + 2, 0, []
    for n in needed:  # permuted blocks; garbage (never to be read) past each sequence's end
        tables.append(perm[cursor:cursor + n] + [-1 if j % 2 else num_blocks + 999 for j in range(width - n)])
        cursor += n
    table = torch.tensor(tables, dtype=torch.int32, device="cuda")
    k_pool = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype).cuda()
    v_pool = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype).cuda()
    q = torch.randn(sum(new), H, D, generator=gen).to(dtype).cuda()
    pieces = []
    for b, n in enumerate(lengths):
        pos = torch.arange(n, device="cuda")
        blocks = table[b].long()[pos // P]
        pieces.append((k_pool[blocks, pos % P], v_pool[blocks, pos % P]))
    call = dict(q=q, k=k_pool, v=v_pool, causal=causal, cu_seqlens_q=cumulative(new), block_table=table,
                seq_lens=torch.tensor(lengths, dtype=torch.int32, device="cuda"))
    return call, pieces


def fused_qkv_case(lengths, H, H_kv, D, dtype, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), (H + 2 * H_kv) * D, generator=gen).to(dtype).cuda()
    q = qkv[:, :H * D].view(-1, H, D)
    k = qkv[:, H * D:(H + H_kv) * D].view(-1, H_kv, D)
    v = qkv[:, (H + H_kv) * D:].view(-1, H_kv, D)
    cu = cumulative(lengths)
    bounds = list(itertools.accumulate(lengths, initial=0))
    pieces = [(k[bounds[b]:bounds[b + 1]], v[bounds[b]:bounds[b + 1]]) for b in range(len(lengths))]
    return dict(q=q, k=k, v=v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu), pieces


def cases(seed):
    """(name, builder) simplest first, so the first failure points at the smallest broken feature."""
    out = []
    bf16, fp16 = torch.bfloat16, torch.float16
    for causal in (False, True):  # one tile, one head: the bare MMA / ldmatrix / softmax path
        out.append((f"smoke L=S=64 H=1 D=64 bf16 causal={causal}",
                    lambda c=causal: varlen_case([64], [64], 1, 1, 64, bf16, c, seed)))
    out.append(("smoke L=S=64 H=1 D=128 bf16 causal=False", lambda: varlen_case([64], [64], 1, 1, 128, bf16, False, seed)))
    out.append(("one seq L=S=200 H=2 D=128 fp16 causal=True", lambda: varlen_case([200], [200], 2, 2, 128, fp16, True, seed)))
    out.append(("one seq L=S=77 H=4 H_kv=2 D=64 bf16 causal=True (G=2)",
                lambda: varlen_case([77], [77], 4, 2, 64, bf16, True, seed)))
    for dtype, (H, H_kv, D), causal in itertools.product((bf16, fp16), SHAPES, (True, False)):
        out.append((f"varlen H={H} H_kv={H_kv} D={D} {DTYPE_NAMES[dtype]} causal={causal}",
                    lambda a=(H, H_kv, D, dtype, causal): varlen_case(Q_LENS, K_LENS, *a, seed)))
    prefix, new = [0, 700, 31, 1200, 3], [300, 1, 97, 64, 20]
    for P, (H, H_kv, D), causal in itertools.product((16, 64, 256), [(8, 8, 64), (14, 2, 128), (32, 4, 128)],
                                                     (True, False)):
        out.append((f"paged P={P} H={H} H_kv={H_kv} D={D} bf16 causal={causal}",
                    lambda a=(P, H, H_kv, D, bf16, causal): paged_case(prefix, new, *a, seed)))
    out.append(("paged P=16 H=28 H_kv=4 D=64 fp16 causal=True",
                lambda: paged_case(prefix, new, 16, 28, 4, 64, fp16, True, seed)))
    out.append(("strided q/k/v slices of a fused QKV, H=14 H_kv=2 D=64 fp16 causal=True",
                lambda: fused_qkv_case([33, 200, 1], 14, 2, 64, fp16, True, seed)))
    return out


def compare(out, call, pieces):
    """Max error and, when off, a description of where and how."""
    q, cu = call["q"], call["cu_seqlens_q"].tolist()
    D = q.shape[-1]
    atol, rtol = TOL[q.dtype]
    worst = {"max_abs_err": 0.0}
    bad_total = bad_rows = nan = 0
    for b, (kb, vb) in enumerate(pieces):
        got = out[cu[b]:cu[b + 1]].double()
        if got.numel() == 0:
            continue
        ref = oracle(q[cu[b]:cu[b + 1]], kb, vb, call["causal"], D ** -0.5)
        nan += int(torch.isnan(got).sum())
        err = (got - ref).abs().nan_to_num(float("inf"))
        bad = err > atol + rtol * ref.abs()
        bad_total += int(bad.sum())
        bad_rows += int(bad.any(-1).sum())
        value = float(err.max())
        if value > worst["max_abs_err"]:
            i, h, d = (int(x) for x in torch.nonzero(err == err.max())[0])
            L, S = cu[b + 1] - cu[b], kb.shape[0]
            worst = {"max_abs_err": value, "sequence": b, "query": i, "position": S - L + i, "L": L, "S": S,
                     "head": h, "dim": d, "got": float(got[i, h, d]), "expected": float(ref[i, h, d])}
    total_rows = out.shape[0] * out.shape[1]
    ok = bad_total == 0 and nan == 0
    return ok, dict(worst, bad_elements=bad_total, bad_rows=f"{bad_rows}/{total_rows}", nan=nan, atol=atol, rtol=rtol)


def run_correctness(seed):
    results, first_failure = [], None
    for name, build in cases(seed):
        try:
            call, pieces = build()
            out = flash_attention(backend="cuda", **call)
            torch.cuda.synchronize()
            ok, info = compare(out, call, pieces)
            line = f"{'ok  ' if ok else 'FAIL'} {name:70s} max_abs_err={info['max_abs_err']:.2e} (atol {info['atol']:.0e})"
            if not ok:
                line += f"\n       {json.dumps({k: v for k, v in info.items() if k not in ('atol', 'rtol')})}"
        except Exception as error:  # noqa: BLE001 - report, and stop if the CUDA context is gone
            ok, info = False, {"error": f"{type(error).__name__}: {error}"}
            line = f"ERROR {name}: {info['error']}\n{traceback.format_exc(limit=3)}"
        log(line)
        results.append({"case": name, "ok": ok, **info})
        if not ok and first_failure is None:
            first_failure = name
        if "error" in info and ("illegal" in info["error"] or "CUDA error" in info["error"]):
            log("!!! a CUDA error: the context is unusable, stopping the matrix here")
            break
    return results, first_failure


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def time_ms(fn, warmup=3, iters=10, repeats=3):
    """Median over `repeats` of the mean time of `iters` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return sorted(samples)[len(samples) // 2]


def perf_config(B, H, S, D, causal):
    """Time every backend on one shape; returns the row for the report."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, S, D] for SDPA
    flops = 4 * B * H * S * S * D / (2 if causal else 1)

    def sdpa_with(backend):
        def fn():
            with sdpa_kernel(backend):
                return sdpa(qs, ks, vs, is_causal=causal)
        return fn

    backends = {
        "cuda (ours)": lambda: flash_attention(q, k, v, causal=causal, backend="cuda"),
        "triton (ours)": lambda: flash_attention(q, k, v, causal=causal, backend="triton"),
        "sdpa flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
    }
    config = f"B={B} H={H} S={S} D={D} bf16 causal={causal}"
    row = {"config": config, "flops": flops, "backends": {}}
    for name, fn in backends.items():
        try:
            ms = time_ms(fn)
            row["backends"][name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
            log(f"{config:40s} {name:14s} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s")
        except Exception as error:  # noqa: BLE001 - a backend missing here is recorded, not fatal
            row["backends"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            log(f"{config:40s} {name:14s} unavailable: {type(error).__name__}: {str(error)[:200]}")
    try:  # the same input through ours and SDPA-flash: a correctness check at full size
        ours = flash_attention(q, k, v, causal=causal, backend="cuda").float()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = sdpa(qs, ks, vs, is_causal=causal).transpose(1, 2).float()
        row["max_abs_diff_vs_sdpa_flash"] = float((ours - ref).abs().max())
        log(f"{config:40s} max |cuda - sdpa flash| = {row['max_abs_diff_vs_sdpa_flash']:.2e}")
    except Exception as error:  # noqa: BLE001
        row["max_abs_diff_vs_sdpa_flash"] = f"{type(error).__name__}: {str(error)[:300]}"
    timings = row["backends"]
    if "ms" in timings.get("cuda (ours)", {}):
        for other in ("sdpa flash", "sdpa cudnn", "triton (ours)"):
            if "ms" in timings.get(other, {}):
                key = "cuda_speedup_vs_" + other.split(" (")[0].replace(" ", "_")
                row[key] = round(timings[other]["ms"] / timings["cuda (ours)"]["ms"], 3)
    return row


def run_perf(B=8, H=16, S=4096):
    rows = []
    for causal, D in ((True, 128), (True, 64), (False, 128), (False, 64)):
        rows.append(perf_config(B, H, S, D, causal))
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-perf", action="store_true", help="skip the timings")
    parser.add_argument("--no-correctness", action="store_true", help="skip the correctness matrix")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("MINIINFER_TEST_SEED", 1234)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        log("no CUDA GPU: nothing to check")
        return 1
    report = {"script": "scripts/gpu/flash_cuda_check.py", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "seed": args.seed}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    log(json.dumps(report))

    status = 0
    started = time.perf_counter()
    try:
        from miniinfer.kernels.flash_attention_cuda import _extension

        _extension()
        report["build_s"] = round(time.perf_counter() - started, 1)
        log(f"=== extension built (or loaded from cache) in {report['build_s']} s")
    except Exception as error:  # noqa: BLE001 - the compiler's message is what the reader needs
        report["build_error"] = f"{type(error).__name__}: {error}"
        log(f"!!! build failed after {time.perf_counter() - started:.0f} s:\n{error}")
        traceback.print_exc()
        status = 1

    if status == 0 and not args.no_correctness:
        log(f"=== correctness (seed {args.seed}; oracle: float64 softmax(QK^T)V)")
        results, first_failure = run_correctness(args.seed)
        passed = sum(r["ok"] for r in results)
        report["correctness"] = {"passed": passed, "cases": len(results), "first_failure": first_failure,
                                 "results": results}
        log(f"=== correctness: {passed}/{len(results)} cases pass"
            + (f"; FIRST FAILURE: {first_failure}" if first_failure else ""))
        if first_failure:
            status = 1
    if "build_error" not in report and not args.no_perf:  # timed even after a failed case: numbers help too
        log("=== timings (median of 3 x 10 calls)")
        try:
            report["perf"] = run_perf()
        except Exception as error:  # noqa: BLE001
            report["perf_error"] = f"{type(error).__name__}: {error}"
            log(f"!!! timings failed: {error}")
            traceback.print_exc()
            status = 1
    report["total_s"] = round(time.perf_counter() - started, 1)
    log(f"=== done in {report['total_s']} s, status {status}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(os.path.join(out_dir, "flash_cuda_check.json"), "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {os.path.join(out_dir, 'flash_cuda_check.json')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
