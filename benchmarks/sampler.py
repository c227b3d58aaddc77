"""The batched sampler (miniinfer.sampler) against the per-row ``sampling.sample``, stage by stage.

    python benchmarks/sampler.py                  # CPU
    python benchmarks/sampler.py --device cuda    # GPU (writes benchmarks/results/sampler_<card>.json)

For N rows in {1, 16, 64, 256} and V in {4096 (bundled-model-like), 151936 (Qwen2)}, three workloads:

* ``top_p``: temperature 0.8, top-p 0.95 — the usual chat setting, and what the old path sorts for;
* ``all``: temperature 0.8, top-k 50, top-p 0.95, min-p 0.05, repetition 1.1, frequency 0.2, presence 0.1,
  a logit bias, with a history of 512 prompt + 128 output tokens per row (the old path has no penalties:
  it is timed without them);
* ``greedy``: temperature 0.

Columns: ``build_ms`` (SamplingBatch.build on the host), ``batched_ms`` (sample_batch), ``graph_ms`` (the
same call captured in a CUDA graph and replayed: what is left without kernel-launch overhead), ``per_row_ms``
(``sampling.sample`` with a generator per row, the path the engine used before), ``speedup`` =
per_row / batched, and the stages of the batched path timed alone: ``process_ms`` (bias + penalties),
``top_k_ms``, ``softmax_ms``, ``top_p_ms`` (top_p_threshold — the Triton kernel on CUDA — + mask), ``draw_ms`` (uniforms + inverse CDF).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_cpu, time_cuda, write_results  # noqa: E402
from miniinfer import sampler as S  # noqa: E402
from miniinfer.sampling import SamplingParams, make_generator, sample  # noqa: E402

WORKLOADS = {
    "top_p": SamplingParams(temperature=0.8, top_p=0.95),
    "all": SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05, repetition_penalty=1.1,
                          frequency_penalty=0.2, presence_penalty=0.1, logit_bias={7: 2.0, 11: -5.0}),
    "greedy": SamplingParams(temperature=0.0),
}


def make_rows(params: SamplingParams, n: int, vocab: int, generator: torch.Generator) -> list[S.SamplingRow]:
    with_history = params.uses_penalties
    rows = []
    for i in range(n):
        prompt = torch.randint(vocab, (512,), generator=generator).tolist() if with_history else []
        output = torch.randint(vocab, (128,), generator=generator).tolist() if with_history else []
        rows.append(S.SamplingRow(params, seed=S.derive_seed(1234, i), step=len(output), prompt_token_ids=prompt,
                                  output_token_ids=output))
    return rows


def measure(name: str, N: int, V: int, logits: torch.Tensor, timeit, cuda: bool, per_row_limit: int,
            generator: torch.Generator) -> dict:
    """One row of the table: build, the whole batched sampler, each stage alone, the per-row baseline."""
    device = logits.device
    params = WORKLOADS[name]
    rows = make_rows(params, N, V, generator)
    big = N * V >= 64 * 151936
    build_ms = time_cpu(lambda: S.SamplingBatch.build(rows, V, device), warmup=1, repeat=3 if big else 10) * 1e3
    batch = S.SamplingBatch.build(rows, V, device)
    work = torch.empty_like(logits)
    batched_ms = timeit(lambda: S.sample_batch(work.copy_(logits), batch), big)
    graph_ms = None
    if cuda:  # the same call replayed from a CUDA graph: no per-kernel launch cost on the host
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                S.sample_batch(work.copy_(logits), batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            S.sample_batch(work.copy_(logits), batch)
        graph_ms = timeit(graph.replay, big)
    # Each stage alone, on the inputs it sees inside sample_batch.
    stages = {}
    processed = logits.clone()
    if batch.any_bias or batch.any_penalties:
        stages["process_ms"] = timeit(lambda: S.process_logits(work.copy_(logits), batch), big)
    S.process_logits(processed, batch)
    if not batch.all_greedy:
        tempered = processed / batch.temperature.unsqueeze(1)
        if batch.any_top_k:
            stages["top_k_ms"] = timeit(lambda: S._top_k_mask(work.copy_(tempered), batch), big)
            S._top_k_mask(tempered, batch)  # what the later stages see: top-k leaves most probabilities 0
        stages["softmax_ms"] = timeit(lambda: torch.softmax(tempered, dim=-1), big)
        probs = torch.softmax(tempered, dim=-1)
        if batch.any_top_p:
            def top_p():
                t = S.top_p_threshold(probs, batch.top_p)
                return probs.masked_fill(probs.view(torch.int32) < t.unsqueeze(1), 0.0)
            stages["top_p_ms"] = timeit(top_p, big)
        stages["draw_ms"] = timeit(lambda: S._inverse_cdf(probs, S.uniform_from_seed(batch.seeds, batch.steps)), big)
    # The old path: a Python loop over rows, a sort per row for top-p, a generator per row.
    per_row_ms = None
    if N <= per_row_limit:
        old_params = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                    min_p=params.min_p)
        generators = [make_generator(i, device) for i in range(N)]
        per_row_ms = timeit(lambda: sample(logits, [old_params] * N, generators), True)
    return {"workload": name, "N": N, "V": V, "build_ms": build_ms, "batched_ms": batched_ms, "graph_ms": graph_ms,
            "per_row_ms": per_row_ms, "speedup": per_row_ms / batched_ms if per_row_ms is not None else None,
            **stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 151936])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--max-per-row-rows", type=int, default=None,
                        help="skip the per-row baseline above this many rows at V > 4096 (CPU default: 64)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def timeit(fn, slow: bool = False) -> float:
        if cuda:
            return time_cuda(fn, warmup=3 if slow else 10, repeat=5 if slow else 30) * 1e3
        return time_cpu(fn, warmup=1, repeat=3 if slow else 10) * 1e3

    generator = torch.Generator().manual_seed(0)
    rows_out = []
    columns = ["workload", "N", "V", "build_ms", "batched_ms", "graph_ms", "per_row_ms", "speedup", "process_ms", "top_k_ms",
               "softmax_ms", "top_p_ms", "draw_ms"]
    for V in args.vocab:
        for N in args.rows:
            logits = (torch.randn(N, V, generator=generator) * 3).to(device)
            limit = args.max_per_row_rows if args.max_per_row_rows is not None else 64
            limit = 10**9 if cuda or V <= 4096 else limit
            for name in args.workloads:
                row = measure(name, N, V, logits, timeit, cuda, limit, generator)
                rows_out.append(row)
                per_row = "-" if row["per_row_ms"] is None else f"{row['per_row_ms']:9.3f}"
                print(f"{name:7s} N={N:4d} V={V:6d}: batched {row['batched_ms']:9.3f} ms, per-row {per_row} ms",
                      flush=True)
    print()
    print_table(columns, rows_out)
    speedups = [r["speedup"] for r in rows_out if r["speedup"] is not None and r["workload"] == "top_p"]
    summary = {"top_p_speedup_min": min(speedups) if speedups else None,
               "top_p_speedup_max": max(speedups) if speedups else None}
    notes = ("batched = miniinfer.sampler.sample_batch (radix-select top-p, per-row counter-based uniforms, inverse "
             "CDF in float64); per_row = miniinfer.sampling.sample (per-row sort for top-p, torch.multinomial with a "
             "generator per row); the per-row baseline has no penalties/bias (it does not support them). Stage "
             "times are each stage alone on the same inputs; build_ms is host time of SamplingBatch.build; graph_ms (CUDA) "
             "replays sample_batch from a CUDA graph.")
    write_results("sampler", "Batched sampler vs per-row sampling", device, columns, rows_out, summary=summary,
                  notes=notes, out=args.out)


if __name__ == "__main__":
    main()
