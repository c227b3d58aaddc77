"""Flash attention forward: our Triton and CUDA kernels, the flash-attn library, torch SDPA (flash and
cuDNN), on the shapes chapter 09 discusses, plus the engine's time to first token on a 30k-token prompt.

    python benchmarks/flash_attention.py --gpu            # everything, writes results/flash_attention_<gpu>.json
    python benchmarks/flash_attention.py --gpu --quick    # a smoke test (~10x smaller)
    python benchmarks/flash_attention.py --cpu            # tiny sizes, torch reference vs tiled (times mean little)

Parts (``part`` column of the rows):

* ``headline`` — causal, B 8, H 16, S 4096, D 128, bf16 (the issue's comparison shape), every backend;
* ``sweep`` — S = 1k … 32k with B·S = 32k tokens, D 64 and 128, causal and not, H 16;
* ``varlen`` — 64 prompts of U(100, 4096) tokens, H 16, D 128, causal: packed varlen (ours, flash-attn)
  against SDPA's flash backend over the same prompts padded to the longest (what a framework without
  varlen does);
* ``engine`` — the engine's TTFT for one 30,000-token prompt on the Qwen2.5-0.5B shape (random bf16
  weights, 24 layers, H/H_kv 14/2, D 64), chunked at 8,192 tokens, for each prefill kernel.

FLOPs: 4·B·H·S²·D for full attention (two matmuls of 2·S²·D each), half of that when causal; varlen
counts each prompt's own L²/2. TFLOP/s = FLOPs / median time (CUDA events, after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_cpu, time_cuda, write_results  # noqa: E402

COLUMNS = ["part", "backend", "B", "H", "H_kv", "S", "D", "causal", "ms", "TFLOP/s", "x SDPA-flash", "max err"]

NOTES = (
    "bf16 inputs, fp32 accumulation. Backends: sdpa_flash / sdpa_cudnn = torch.nn.functional."
    "scaled_dot_product_attention restricted with torch.nn.attention.sdpa_kernel to the flash / cuDNN "
    "backend, inputs [B, H, S, D] (transposed views of [B, S, H, D]); triton = miniinfer flash_attention "
    "(backend='triton'); cuda = miniinfer flash_attention (backend='cuda', csrc/flash_attention.cu); "
    "flash_attn = the flash-attn library (FA4, flash_attn.cute, when installed). max err = largest "
    "|out - SDPA-math fp32| on the first query block of each shape (a check, not a timing). Median of "
    "CUDA-event timings after warm-up. Engine rows: LLMEngine on a random-weight Qwen2.5-0.5B-shaped "
    "model, enforce_eager, prefix cache emptied between runs, TTFT = add_request to the first token, best "
    "of 3 after a warm-up pass on other tokens.")


def flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, causal: bool) -> float:
    full = 4.0 * batch * heads * q_len * k_len * head_dim
    return full / 2 if causal else full


# --------------------------------------------------------------------------------------------------
# Backends: each returns fn(q, k, v) on [B, S, H, D] tensors (dense, equal lengths)
# --------------------------------------------------------------------------------------------------

def sdpa(kind: str, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_math": SDPBackend.MATH}[kind]

    def run(q, k, v):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    return run


def ours(backend: str, causal: bool):
    from miniinfer.kernels.flash_attention import flash_attention

    return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend)


def available_backends(device: str) -> list[str]:
    names = ["sdpa_flash", "sdpa_cudnn", "triton"]
    try:
        from miniinfer.kernels.flash_attention_cuda import cuda_flash_supports

        probe = torch.empty(1, 1, 128, device=device, dtype=torch.bfloat16)
        if cuda_flash_supports(probe, probe) is None:
            names.append("cuda")
        else:
            print("cuda backend: " + str(cuda_flash_supports(probe, probe)), flush=True)
    except Exception as error:  # noqa: BLE001 - not built / not there: left out, said why
        print(f"cuda backend unavailable: {error}", flush=True)
    from miniinfer.kernels.flash_attention import flash_attn_library

    found = flash_attn_library()
    if found is not None:
        names.append("flash_attn")
        print(f"flash_attn backend: {found[0]}", flush=True)
    else:
        print("flash_attn backend: not installed", flush=True)
    return names


def make_fn(name: str, causal: bool):
    if name.startswith("sdpa"):
        return sdpa(name, causal)
    return ours(name, causal)


def check_error(fn, q, k, v, causal: bool) -> float:
    """Largest error against SDPA's math backend in fp32 on the first 128 queries (the last ones when
    causal would see everything; the first see a masked triangle: both kinds of tile)."""
    out = fn(q, k, v)
    L = min(128, q.shape[1])
    G = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(G, dim=2)
    vf = v.float().repeat_interleave(G, dim=2)
    qf = q[:, :L].float()
    scores = torch.einsum("blhd,bshd->bhls", qf, kf) * q.shape[-1] ** -0.5
    if causal:
        S = k.shape[1]
        offset = S - q.shape[1]
        mask = torch.arange(S, device=q.device)[None, :] > (offset + torch.arange(L, device=q.device))[:, None]
        scores = scores.masked_fill(mask, float("-inf"))
    ref = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), vf)
    return float((out[:, :L].float() - ref).abs().max())


def time_dense(name: str, B: int, H: int, H_kv: int, S: int, D: int, causal: bool, device: str,
               baseline_ms: float | None, part: str, repeat: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(S * 7 + D)
    q = torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, S, H_kv, D, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, S, H_kv, D, device=device, dtype=torch.bfloat16, generator=gen)
    row = {"part": part, "backend": name, "B": B, "H": H, "H_kv": H_kv, "S": S, "D": D, "causal": causal}
    try:
        fn = make_fn(name, causal)
        row["max err"] = round(check_error(fn, q, k, v, causal), 4)
        seconds = time_cuda(lambda: fn(q, k, v), warmup=3, repeat=repeat)
    except Exception as error:  # noqa: BLE001 - a backend that cannot run this shape: say so, go on
        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        print(f"  {name} S={S} D={D} causal={causal}: {row['error']}", flush=True)
        return row
    row["ms"] = round(seconds * 1e3, 4)
    row["TFLOP/s"] = round(flops(B, H, S, S, D, causal) / seconds / 1e12, 1)
    if baseline_ms:
        row["x SDPA-flash"] = round(baseline_ms / row["ms"], 3)
    return row


def dense_part(part: str, shapes: list[tuple], backends: list[str], device: str, repeat: int) -> list[dict]:
    rows = []
    for B, H, H_kv, S, D, causal in shapes:
        baseline = time_dense("sdpa_flash", B, H, H_kv, S, D, causal, device, None, part, repeat)
        baseline["x SDPA-flash"] = 1.0 if "ms" in baseline else None
        rows.append(baseline)
        for name in backends:
            if name != "sdpa_flash":
                rows.append(time_dense(name, B, H, H_kv, S, D, causal, device, baseline.get("ms"), part, repeat))
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# varlen
# --------------------------------------------------------------------------------------------------

def varlen_part(backends: list[str], device: str, num_prompts: int, max_len: int, repeat: int) -> list[dict]:
    from miniinfer.kernels.flash_attention import flash_attention

    rng = random.Random(0)
    lengths = [rng.randint(100, max_len) for _ in range(num_prompts)]
    H, D = 16, 128
    T = sum(lengths)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(T, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(T, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(T, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    L = max(lengths)
    useful = sum(flops(1, H, n, n, D, True) for n in lengths)
    # SDPA over a padded batch: every prompt padded to the longest, causal (padding rows are wasted work).
    padded = [torch.zeros(num_prompts, L, H, D, device=device, dtype=torch.bfloat16) for _ in range(3)]
    for b, (start, n) in enumerate(zip(cu.tolist(), lengths)):
        for dst, src in zip(padded, (q, k, v)):
            dst[b, :n] = src[start:start + n]
    rows = []
    base = {"part": "varlen", "B": num_prompts, "H": H, "H_kv": H, "S": L, "D": D, "causal": True}
    sdpa_fn = sdpa("sdpa_flash", True)
    seconds = time_cuda(lambda: sdpa_fn(*padded), warmup=3, repeat=repeat)
    baseline_ms = seconds * 1e3
    rows.append({**base, "backend": "sdpa_flash (padded)", "ms": round(baseline_ms, 3),
                 "TFLOP/s": round(useful / seconds / 1e12, 1), "x SDPA-flash": 1.0})
    for name in backends:
        if name.startswith("sdpa"):
            continue
        row = {**base, "backend": f"{name} (packed)"}
        try:
            fn = lambda n=name: flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=n,
                                                max_seqlen_q=L, max_seqlen_k=L)
            out = fn()
            first = slice(0, lengths[0])
            ref = sdpa("sdpa_math", True)(q[None, first].float(), k[None, first].float(), v[None, first].float())[0]
            row["max err"] = round(float((out[first].float() - ref).abs().max()), 4)
            seconds = time_cuda(fn, warmup=3, repeat=repeat)
            row.update({"ms": round(seconds * 1e3, 3), "TFLOP/s": round(useful / seconds / 1e12, 1),
                        "x SDPA-flash": round(baseline_ms / (seconds * 1e3), 3)})
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# engine TTFT
# --------------------------------------------------------------------------------------------------

def random_tokens(seed: int, vocab: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(count)]


def ttft(engine, prompt: list[int], params) -> tuple[float, list[int] | None]:
    """Seconds from add_request to the end of a one-token request (its prefill), and that token."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.add_request(prompt, params)
    token = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                token = output.token_ids
    torch.cuda.synchronize()
    return time.perf_counter() - started, token


def engine_part(prompt_len: int, repeat: int, num_layers: int | None) -> list[dict]:
    from benchmarks.engine_throughput import SHAPES, build_model
    from miniinfer.engine import EngineConfig, LLMEngine
    from miniinfer.engine.attention_backends import available_prefill_kernels
    from miniinfer.sampling import SamplingParams

    max_len = 32768
    model = build_model("0.5b", num_layers=num_layers, max_positions=max_len)
    reasons = available_prefill_kernels(torch.device("cuda"), torch.bfloat16, model.config.head_dim)
    vocab = SHAPES["0.5b"]["vocab_size"]
    rng = random.Random(3)
    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first_tokens = {}
    for kernel in ["auto", "paged_triton", "flash_triton", "flash_cuda", "flash_attn"]:
        row = {"part": "engine", "backend": kernel, "B": 1, "H": model.config.num_attention_heads,
               "H_kv": model.config.num_key_value_heads, "S": prompt_len, "D": model.config.head_dim,
               "causal": True}
        if kernel != "auto" and reasons[kernel]:
            row["error"] = reasons[kernel]
            rows.append(row)
            continue
        try:
            started = time.perf_counter()
            engine = LLMEngine(model, None, EngineConfig(attention_backend="triton", prefill_kernel=kernel,
                                                         max_num_seqs=1, max_model_len=max_len, enforce_eager=True))
            row["startup s"] = round(time.perf_counter() - started, 2)
            row["chosen"] = engine.prefill_kernel
            row["chunk"] = engine.max_num_batched_tokens

            ttft(engine, [rng.randrange(vocab) for _ in range(prompt_len)], params)  # warm-up: every chunk shape compiles
            prompt = random_tokens(11, vocab, prompt_len)
            times = []
            for _ in range(repeat):
                if engine.radix_cache is not None:
                    engine.radix_cache.clear()
                seconds, token = ttft(engine, prompt, params)
                times.append(seconds)
            first_tokens[kernel] = token
            row["TTFT s"] = round(min(times), 4)
            row["ms"] = round(min(times) * 1e3, 1)
            del engine
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    # Where the time goes: the best kernel with one 32k-token chunk (a single step), and a profile.
    timed = [r for r in rows if "TTFT s" in r and r["backend"] != "auto"]
    if timed:
        best = min(timed, key=lambda r: r["TTFT s"])["backend"]
        row = {"part": "engine", "backend": f"{best}, one chunk", "B": 1, "H": model.config.num_attention_heads,
               "H_kv": model.config.num_key_value_heads, "S": prompt_len, "D": model.config.head_dim, "causal": True}
        try:
            engine = LLMEngine(model, None, EngineConfig(attention_backend="triton", prefill_kernel=best,
                                                         max_num_seqs=1, max_model_len=max_len, enforce_eager=True,
                                                         max_num_batched_tokens=max_len))
            row["chunk"] = engine.max_num_batched_tokens
            ttft(engine, [rng.randrange(vocab) for _ in range(prompt_len)], params)
            times = []
            for _ in range(repeat):
                engine.radix_cache.clear()
                times.append(ttft(engine, random_tokens(11, vocab, prompt_len), params)[0])
            row["TTFT s"] = round(min(times), 4)
            row["ms"] = round(min(times) * 1e3, 1)
            engine.radix_cache.clear()
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                ttft(engine, random_tokens(12, vocab, prompt_len), params)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            print(table, flush=True)
            row["profile_top"] = [(e.key[:60], round(e.device_time_total / 1e3, 2)) for e in
                                  sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]]
            del engine
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)
    reference = first_tokens.get("paged_triton")
    for row in rows:
        if row["backend"] in first_tokens and reference is not None:
            row["same first token"] = first_tokens[row["backend"]] == reference
    return rows


# --------------------------------------------------------------------------------------------------

def run_gpu(args) -> tuple[list[dict], dict]:
    device = "cuda"
    backends = available_backends(device)
    quick = args.quick
    repeat = 5 if quick else 20
    rows: list[dict] = []
    summary: dict = {"backends": backends}
    started = time.perf_counter()
    parts = set(args.parts)

    if "headline" in parts:
        shape = (2, 16, 16, 2048, 128, True) if quick else (8, 16, 16, 4096, 128, True)
        headline = dense_part("headline", [shape], backends, device, repeat)
        rows += headline
        print_table(COLUMNS, headline)
        by = {r["backend"]: r for r in headline}
        summary["headline"] = {name: by[name].get("TFLOP/s") for name in by}
        for name in ("triton", "cuda", "flash_attn"):
            if by.get(name, {}).get("x SDPA-flash") is not None:
                summary[f"{name}_vs_sdpa_flash"] = by[name]["x SDPA-flash"]
                cudnn = by.get("sdpa_cudnn", {}).get("ms")
                if cudnn:
                    summary[f"{name}_vs_cudnn"] = round(cudnn / by[name]["ms"], 3)
    if "sweep" in parts:
        lengths = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
        tokens = 8192 if quick else 32768
        shapes = [(max(1, tokens // S), 16, 16, S, D, causal) for D in (64, 128) for causal in (True, False)
                  for S in lengths]
        sweep = dense_part("sweep", shapes, backends, device, max(3, repeat // 2))
        rows += sweep
        print_table(COLUMNS, sweep)
    if "varlen" in parts:
        varlen = varlen_part(backends, device, 8 if quick else 64, 1024 if quick else 4096, repeat)
        rows += varlen
        print_table(COLUMNS, varlen)
        for row in varlen:
            if "x SDPA-flash" in row and row["backend"] != "sdpa_flash (padded)":
                summary[f"varlen_{row['backend'].split()[0]}_vs_padded_sdpa"] = row["x SDPA-flash"]
    if "engine" in parts:
        engine = engine_part(3000 if quick else 30000, 2 if quick else 3, 4 if quick else None)
        rows += engine
        print_table(COLUMNS + ["TTFT s", "chosen", "startup s"], engine)
        timed = {r["backend"]: r["TTFT s"] for r in engine if "TTFT s" in r}
        summary["engine_ttft_30k_s"] = timed
        if timed:
            summary["engine_ttft_30k_best_s"] = min(timed.values())
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return rows, summary


def run_cpu(args) -> tuple[list[dict], dict]:
    """Tiny sizes on the CPU: the tiled reference against naive attention (fp32). Not a speed claim."""
    from miniinfer.kernels.flash_attention import flash_attention

    rows = []
    for S in (256, 512, 1024):
        q = torch.randn(1, S, 4, 32)
        k = torch.randn(1, S, 4, 32)
        v = torch.randn(1, S, 4, 32)
        naive = sdpa("sdpa_math", True)
        tiled = lambda q, k, v: flash_attention(q, k, v, causal=True, backend="torch")
        for name, fn in (("sdpa_math", naive), ("torch (tiled)", tiled)):
            seconds = time_cpu(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), warmup=1, repeat=5)
            rows.append({"part": "cpu", "backend": name, "B": 1, "H": 4, "H_kv": 4, "S": S, "D": 32,
                         "causal": True, "ms": round(seconds * 1e3, 3),
                         "TFLOP/s": round(flops(1, 4, S, S, 32, True) / seconds / 1e12, 4)})
    print_table(COLUMNS, rows)
    return rows, {}


def legacy_sections(rows: list[dict]) -> dict:
    """The per-part sections chapter 09 reads (besides the flat rows)."""
    def pick(part, keys):
        return [{k: r.get(k) for k in keys} | ({"error": r["error"]} if "error" in r else {})
                for r in rows if r["part"] == part]

    return {
        "causal_b8_h16_s4096_d128": {"rows": [{"backend": r["backend"], "ms": r.get("ms"), "tflops": r.get("TFLOP/s")}
                                               for r in rows if r["part"] == "headline"]},
        "sweep": {"rows": [{"backend": r["backend"], "S": r["S"], "D": r["D"], "causal": r["causal"],
                            "tflops": r.get("TFLOP/s")} for r in rows if r["part"] == "sweep"]},
        "varlen": {"rows": pick("varlen", ["backend", "B", "S", "ms", "TFLOP/s", "x SDPA-flash"])},
        "engine_ttft": {"rows": pick("engine", ["backend", "chosen", "S", "TTFT s", "startup s"])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", action="store_true", help="the real benchmark (a CUDA GPU)")
    where.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--quick", action="store_true", help="a ~10x smaller smoke test")
    parser.add_argument("--parts", nargs="+", default=["headline", "sweep", "varlen", "engine"],
                        choices=["headline", "sweep", "varlen", "engine"])
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows of --parts in the existing results file (the commands of both "
                             "runs are recorded)")
    parser.add_argument("--out", default=None, help="results path (default benchmarks/results/flash_attention_<dev>.json)")
    args = parser.parse_args()
    gpu = args.gpu or (not args.cpu and torch.cuda.is_available())
    previous = None
    if args.update and gpu:
        from benchmarks.common import RESULTS_DIR, device_slug

        existing = Path(args.out) if args.out else RESULTS_DIR / f"flash_attention_{device_slug('cuda')}.json"
        previous = json.loads(existing.read_text()) if existing.exists() else None
    rows, summary = run_gpu(args) if gpu else run_cpu(args)
    columns = COLUMNS + (["TTFT s", "chosen", "startup s", "same first token", "error"] if gpu else [])
    path = write_results("flash_attention", "Flash attention forward: ours vs SDPA vs flash-attn; engine TTFT",
                         "cuda" if gpu else "cpu", columns, rows, summary=summary, notes=NOTES, out=args.out)
    if gpu:
        record = json.loads(Path(path).read_text())
        if previous is not None:  # --update: the other parts' rows and summary from the earlier run
            kept = [r for r in previous["rows"] if r.get("part") not in set(args.parts)]
            rows = kept + rows
            record["rows"] = rows
            record["summary"] = {**previous.get("summary", {}), **summary}
            record["command"] = f"{previous.get('command')} ({previous.get('date')}); then {record['command']}"
        record.update(legacy_sections(rows))
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        import os

        if os.environ.get("OUT"):
            Path(os.environ["OUT"], Path(path).name).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
