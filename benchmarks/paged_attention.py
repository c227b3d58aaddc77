"""Paged decode attention: the CUDA kernel, the Triton kernel and SDPA, in GB/s against the copy bandwidth.

    python benchmarks/paged_attention.py            # on a CUDA GPU: the issue-6 benchmark, writes the JSON
    python benchmarks/paged_attention.py --quick    # anywhere: tiny shapes through torch + Triton (CPU interpreter)

Setup (GPU): bf16, batch B = 64, every sequence 4096 tokens long, block size P = 16 (and 64), block
tables randomly permuted; the GQA shapes of Qwen2.5-0.5B (H = 14, H_kv = 2, D = 64) and of a 7B
(H = 28, H_kv = 4, D = 128). Decode is memory-bound, so the figure of merit is achieved bandwidth:

    bytes that must move = all K and V of all sequences once (2 * B * S * H_kv * D * 2 B)
                           + q and out (2 * B * H * D * 2 B) + block tables + seq_lens

over the median time, compared with the copy bandwidth measured in the same run (a 1 GiB
device-to-device copy, bytes read + written). Rows: the CUDA kernel (csrc/paged_attention.cu), the
Triton kernel, SDPA on KV gathered through the block table (gather included: what an engine without
paged kernels pays) and SDPA alone on pre-gathered contiguous KV (a lower bound for SDPA).

Timing: each kernel is checked against the torch reference on the benchmark inputs first (max error
printed), then 20 calls are captured in a CUDA graph and the replays timed with CUDA events (median),
so host launch overhead is out of the numbers. Two input sets (disjoint halves of the cache, 2 x 134 MB
and 2 x 537 MB, far above the 50 MB L2) alternate between calls. A backend that fails prints its
error and the others still run; the JSON is written whatever happens.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_cpu, time_cuda, time_per_call, write_results  # noqa: E402
from miniinfer.kernels.paged_attention import (  # noqa: E402
    default_partition_size,
    paged_decode_attention_cuda,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
)

SHAPES = [  # (label, H, H_kv, D)
    ("qwen2.5-0.5b", 14, 2, 64),
    ("7b", 28, 4, 128),
]
COLUMNS = ["shape", "P", "kernel", "variant", "time_us", "GB/s", "% copy", "rel_err", "max_abs_err", "correct",
           "timing"]
GOAL_PERCENT = 80.0
REL_TOL = 2e-2  # bf16 operands: errors land between 1e-3 and 1e-2 (p and the output rounded to bf16)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.float(), ref.float()
    if torch.isnan(out).any():
        return float("nan"), float("nan")
    return float((out - ref).norm() / ref.norm()), float((out - ref).abs().max())


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------

def copy_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy of num_bytes, counting bytes read + written."""
    src = torch.rand(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: [dst.copy_(src) for _ in range(5)], warmup=3, repeat=15) / 5
    return 2 * num_bytes / seconds / 1e9


def make_inputs(B, S, P, H, H_kv, D, num_sets, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = S // P
    num_blocks = num_sets * B * blocks_per_seq
    # Random values (never zeros: they hide wrong indexing); random, disjoint block ids per set.
    k_cache = torch.randn(num_blocks, P, H_kv, D, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn(num_blocks, P, H_kv, D, device="cuda", dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    tables = [perm[i * B * blocks_per_seq:(i + 1) * B * blocks_per_seq].view(B, blocks_per_seq).contiguous()
              for i in range(num_sets)]
    qs = [torch.randn(B, H, D, device="cuda", dtype=dtype, generator=gen) for _ in range(num_sets)]
    seq_lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, qs, seq_lens


def sdpa_decode(q, k, v, scale):
    """q [B, H, D]; k, v [B, H_kv, S, D] -> [B, H, D] through torch SDPA (GQA natively when it can)."""
    G = q.shape[1] // k.shape[1]
    try:
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=G > 1)
    except TypeError:  # torch < 2.5: no enable_gqa, repeat the KV heads (G times the bytes)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                             scale=scale)
    return out.squeeze(2)


def gather_kv(cache, table, S):
    """[num_blocks, P, H_kv, D] through table [B, S / P] -> [B, H_kv, S, D] (a strided view of the gather)."""
    B = table.shape[0]
    return cache[table.long()].view(B, S, *cache.shape[2:]).transpose(1, 2)


def bench_shape(label, H, H_kv, D, P, B, S, sweep, copy_gbs_ref, skip, num_sets=2):
    dtype = torch.bfloat16
    scale = D ** -0.5
    shape = f"{label} (H={H}, H_kv={H_kv}, D={D})"
    print(f"\n== {shape}, P={P}, B={B}, S={S}, {dtype} ==", flush=True)
    k_cache, v_cache, tables, qs, seq_lens = make_inputs(B, S, P, H, H_kv, D, num_sets, dtype)
    elt = k_cache.element_size()
    bytes_moved = (2 * B * S * H_kv * D * elt + 2 * B * H * D * elt + tables[0].numel() * 4 + B * 4)
    ref = paged_decode_attention_torch(qs[0].float(), k_cache, v_cache, tables[0], seq_lens, scale)  # fp32 math

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    cuda_default = default_partition_size(B * H_kv * math.ceil(H // H_kv / 16), S, num_sms)
    triton_default = default_partition_size(B * H_kv, S, num_sms)
    variants = [("cuda", f"part={cuda_default}", dict(partition_size=None))]
    if sweep:
        variants += [("cuda", f"part={p}", dict(partition_size=p)) for p in (256, 1024) if p != cuda_default]
    variants.append(("triton", f"part={triton_default} bn=64 st=default", dict()))
    if sweep:
        variants += [("triton", f"part={triton_default} bn={bn} st={st} w={w}",
                      dict(block_n=bn, num_stages=st, num_warps=w))
                     for bn, st, w in ((32, 2, 4), (64, 3, 4), (128, 2, 4), (128, 3, 8))]
        variants += [("triton", f"part={p} bn=64 st=default", dict(partition_size=p))
                     for p in (256, 1024) if p != triton_default]
    variants += [("sdpa+gather", "gather + SDPA", dict()), ("sdpa", "SDPA on pre-gathered KV", dict())]

    def make_call(kernel, options):
        """call(set_index, out=None) -> [B, H, D] for one backend on the benchmark inputs."""
        if kernel in ("cuda", "triton"):
            fn = paged_decode_attention_cuda if kernel == "cuda" else paged_decode_attention_triton
            return lambda i, out=None: fn(qs[i], k_cache, v_cache, tables[i], seq_lens, scale, max_seq_len=S,
                                          out=out, **options)
        if kernel == "sdpa+gather":
            return lambda i, out=None: sdpa_decode(qs[i], gather_kv(k_cache, tables[i], S),
                                                   gather_kv(v_cache, tables[i], S), scale)
        pre_gathered = [(gather_kv(k_cache, t, S).contiguous(), gather_kv(v_cache, t, S).contiguous())
                        for t in tables]
        return lambda i, out=None: sdpa_decode(qs[i], *pre_gathered[i], scale)

    rows = []
    for kernel, variant, options in variants:
        row = {"shape": shape, "P": P, "kernel": kernel, "variant": variant}
        if kernel in skip:
            row["error"], row["correct"] = skip[kernel], False
            rows.append(row)
            continue
        try:
            call = make_call(kernel, options)
            if kernel in ("cuda", "triton"):
                out = call(0, out=torch.full_like(qs[0], float("nan")))  # poisoned: unwritten elements show
            else:
                out = call(0)
            torch.cuda.synchronize()
            row["rel_err"], row["max_abs_err"] = rel_error(out, ref)
            row["correct"] = bool(row["rel_err"] < REL_TOL)  # NaN compares False
            print(f"  {kernel:12s} {variant:32s} rel err {row['rel_err']:.2e}  max abs err {row['max_abs_err']:.2e}"
                  f"{'' if row['correct'] else '   <-- WRONG'}", flush=True)
            seconds, row["timing"] = time_per_call(call, num_sets)
            row["time_us"] = seconds * 1e6
            row["GB/s"] = bytes_moved / seconds / 1e9
            row["% copy"] = 100 * row["GB/s"] / copy_gbs_ref
            print(f"  {'':12s} {'':32s} {row['time_us']:8.1f} us  {row['GB/s']:7.0f} GB/s  {row['% copy']:5.1f} % of copy"
                  f"  ({row['timing']})", flush=True)
        except Exception as error:  # noqa: BLE001 - one failing backend must not stop the others
            row["error"] = f"{type(error).__name__}: {error}"
            row["correct"] = False
            print(f"  {kernel:12s} {variant:32s} FAILED: {row['error']}", flush=True)
            traceback.print_exc(limit=3)
        rows.append(row)
        call = None  # free what the call holds (pre-gathered KV) before the next backend
    return rows, bytes_moved


def preflight(backend: str) -> None:
    """Run one backend on small inputs of both benchmark shapes and both block sizes; exit 1 if wrong.

    Runs in a subprocess of the benchmark: a kernel that faults leaves the CUDA context unusable, and
    must not take the other backends' measurements down with it.
    """
    fn = paged_decode_attention_cuda if backend == "cuda" else paged_decode_attention_triton
    worst = 0.0
    for label, H, H_kv, D in SHAPES:
        for P in (16, 64):
            k_cache, v_cache, tables, qs, seq_lens = make_inputs(4, 1024, P, H, H_kv, D, 1, torch.bfloat16, seed=P)
            seq_lens = torch.tensor([1024, 1, 77, 1000], dtype=torch.int32, device="cuda")
            ref = paged_decode_attention_torch(qs[0].float(), k_cache, v_cache, tables[0], seq_lens, D ** -0.5)
            out = fn(qs[0], k_cache, v_cache, tables[0], seq_lens, D ** -0.5, out=torch.full_like(qs[0], float("nan")))
            torch.cuda.synchronize()
            err, max_abs = rel_error(out, ref)
            print(f"preflight {backend} {label} P={P}: rel err {err:.2e}, max abs err {max_abs:.2e}", flush=True)
            worst = max(worst, err) if err == err else float("inf")
    if not worst < REL_TOL:
        raise SystemExit(1)


def run_preflight(backend: str) -> str | None:
    """None when the backend ran correctly in a subprocess, else why not (its output's tail)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--preflight", backend], capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    print(output[-3000:] if result.returncode else output, flush=True)
    print(f"  ({backend} preflight: exit {result.returncode}, {time.perf_counter() - started:.0f} s)", flush=True)
    return None if result.returncode == 0 else f"preflight failed (exit {result.returncode}): {output[-300:]}"


def run_gpu(args) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, summary, notes = [], {}, []
    copy_start = copy_end = None
    try:
        # Build the CUDA extension and compile the Triton kernels in a subprocess first (the build is
        # cached on disk, so this process reuses it); a backend that faults or is wrong there is skipped.
        skip = {}
        for backend in ("cuda", "triton"):
            problem = run_preflight(backend)
            if problem:
                skip[backend] = problem
                notes.append(f"{backend} skipped: {problem}")
        copy_start = copy_bandwidth_gbs()
        print(f"copy bandwidth (1 GiB device-to-device, read + write): {copy_start:.0f} GB/s", flush=True)
        for label, H, H_kv, D in SHAPES:
            for P in args.block_sizes:
                try:
                    shape_rows, bytes_moved = bench_shape(label, H, H_kv, D, P, args.batch, args.context,
                                                          sweep=args.sweep and P == args.block_sizes[0],
                                                          copy_gbs_ref=copy_start, skip=skip)
                    torch.cuda.empty_cache()  # the previous shape's caches are gone
                    rows += shape_rows
                    summary.setdefault("bytes_moved", {})[f"{label} P={P}"] = bytes_moved
                except Exception as error:  # noqa: BLE001
                    notes.append(f"{label} P={P}: {type(error).__name__}: {error}")
                    traceback.print_exc()
        copy_end = copy_bandwidth_gbs()
        print(f"\ncopy bandwidth at the end: {copy_end:.0f} GB/s", flush=True)
    finally:
        copy_ref = max(c for c in (copy_start, copy_end, 1.0) if c)
        for row in rows:  # percentages against the better of the two copy measurements (conservative)
            if row.get("GB/s"):
                row["% copy"] = 100 * row["GB/s"] / copy_ref
        summary.update({"copy_GBs_start": copy_start, "copy_GBs_end": copy_end, "copy_GBs_reference": copy_ref,
                        "goal_percent_of_copy": GOAL_PERCENT})
        best = {}
        for row in rows:
            if row["kernel"] in ("cuda", "triton") and row.get("correct") and row.get("% copy"):
                key = f"{row['shape']} P={row['P']}"
                if key not in best or row["% copy"] > best[key]["% copy"]:
                    best[key] = {"kernel": row["kernel"], "variant": row["variant"], "GB/s": row["GB/s"],
                                 "% copy": row["% copy"], "goal_met": row["% copy"] >= GOAL_PERCENT}
        summary["best_paged_kernel"] = best
        print()
        print_table(COLUMNS, rows, floatfmt=".4g")
        for key, value in best.items():
            print(f"best: {key}: {value['kernel']} ({value['variant']}) {value['GB/s']:.0f} GB/s = "
                  f"{value['% copy']:.1f} % of copy -> goal {'met' if value['goal_met'] else 'NOT met'}")
        notes.append(f"B={args.batch}, context {args.context}, bf16; bytes = K + V of all sequences once + q + out + "
                     "block tables + seq_lens; % copy against the larger of the copy bandwidths measured at the "
                     "start and the end of the run; times are CUDA-graph replays of 20 calls alternating 2 input "
                     "sets.")
        write_results("paged_attention", "Paged decode attention: achieved bandwidth vs copy bandwidth", "cuda",
                      COLUMNS, rows, summary=summary, notes=" ".join(notes), out=args.out)


# --------------------------------------------------------------------------------------------------
# CPU smoke mode
# --------------------------------------------------------------------------------------------------

def run_quick(args) -> None:
    """Tiny shapes through the torch reference and the Triton kernel (interpreted on a CPU)."""
    rows = []
    B, S, P = 3, 100, 16
    for label, H, H_kv, D in SHAPES:
        for dtype in (torch.float32, torch.float16):
            gen = torch.Generator().manual_seed(0)
            blocks = B * math.ceil(S / P)
            k_cache = torch.randn(blocks, P, H_kv, D, generator=gen).to(dtype)
            v_cache = torch.randn(blocks, P, H_kv, D, generator=gen).to(dtype)
            tables = torch.randperm(blocks, generator=gen).to(torch.int32).view(B, -1)
            q = torch.randn(B, H, D, generator=gen).to(dtype)
            seq_lens = torch.tensor([S, S // 2 + 1, 1], dtype=torch.int32)
            scale = D ** -0.5
            ref = paged_decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, scale)
            inputs = (q, k_cache, v_cache, tables, seq_lens, scale)
            calls = {
                "torch": lambda inputs=inputs: paged_decode_attention_torch(*inputs),
                "triton": lambda inputs=inputs: paged_decode_attention_triton(*inputs, partition_size=64, block_n=32),
            }
            for kernel, call in calls.items():
                row = {"shape": f"{label} (H={H}, H_kv={H_kv}, D={D})", "P": P, "kernel": kernel,
                       "variant": str(dtype).replace("torch.", ""), "timing": "cpu wall"}
                try:
                    row["rel_err"], row["max_abs_err"] = rel_error(call(), ref)
                    row["correct"] = bool(row["rel_err"] < (1e-4 if dtype == torch.float32 else 5e-3))
                    row["time_us"] = time_cpu(call, warmup=1, repeat=2) * 1e6
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {error}"
                    row["correct"] = False
                    traceback.print_exc(limit=3)
                rows.append(row)
    print_table(COLUMNS, rows, floatfmt=".3g")
    out = args.out or Path(tempfile.gettempdir()) / "paged_attention_quick.json"  # keep smoke runs out of results/
    write_results("paged_attention", "Paged decode attention (CPU smoke test)", "cpu", COLUMNS, rows,
                  notes="--quick: tiny shapes, Triton under the CPU interpreter; times mean nothing.", out=out)
    if not all(row.get("correct") for row in rows):
        raise SystemExit("some kernels disagree with the reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny shapes, torch + Triton")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="only the default configuration of each kernel")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--preflight", choices=["cuda", "triton"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    started = time.perf_counter()
    if args.preflight:
        preflight(args.preflight)
    elif args.quick or not torch.cuda.is_available():
        if not args.quick:
            print("no CUDA GPU: running the CPU smoke test (--quick)")
        run_quick(args)
    else:
        run_gpu(args)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
