"""Why do decode steps slow down with long prompts on the H200? (issue 17's long-prompt serving run: offline
LLM.generate at 45 ms per step with ~1,000-token prompts against 3.4 ms with one-line prompts, same batch 128.)

    python3 scripts/gpu/long_context_steps.py --folder /root/qwen25-05b-random --out $OUT/long_context_steps.json

For prompts of several lengths (bench serve's prompt_text: a line + N random words), 128 requests at once:
step the engine until every request decodes, then time decode steps (wall, synchronised), note whether a
CUDA graph replayed, and profile one step's kernels (torch.profiler: top kernels by GPU time)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

from miniinfer import LLM, SamplingParams  # noqa: E402
from miniinfer.server.bench import prompt_text  # noqa: E402


def timed_steps(engine, count: int, sync) -> list[float]:
    """Seconds of each of ``count`` engine steps (synchronised)."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - started)
    return times


def profiled_steps(engine, count: int, sync, top: int) -> tuple[list, list]:
    """torch.profiler over ``count`` steps: the ``top`` events by GPU time and by own CPU time, as
    ``(name, ms, calls)``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            engine.step()
        sync()
    events = prof.key_averages()
    gpu = sorted((e for e in events if e.device_time_total > 0), key=lambda e: -e.device_time_total)[:top]
    cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return ([(e.key[:90], round(e.device_time_total / 1e3, 3), e.count) for e in gpu],
            [(e.key[:90], round(e.self_cpu_time_total / 1e3, 3), e.count) for e in cpu])


def abort_all(engine, ids) -> None:
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--words", type=int, nargs="+", default=[0, 250, 1000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cuda (the run), cpu (a check of this script)")
    args = parser.parse_args()
    if not (args.folder / "config.json").exists():
        import serving_h200
        serving_h200.build_folder(args.folder, "0.5b", "cuda", 4096)
    llm = LLM(str(args.folder), device=args.device, max_num_seqs=args.batch)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    engine, runner = llm.engine, llm.engine.runner
    info = {"backend": repr(runner.backend), "num_kv_blocks": engine.num_kv_blocks,
            "max_num_batched_tokens": engine.max_num_batched_tokens, "max_model_len": engine.max_model_len,
            "graphs": runner.decode_graphs is not None, "sampling": "temperature 0.8, seed, ignore_eos"}
    print(info, flush=True)
    replays = {"n": 0}
    if runner.decode_graphs is not None:
        original = runner.decode_graphs.replay

        def counted(*a, **k):
            replays["n"] += 1
            return original(*a, **k)
        runner.decode_graphs.replay = counted
    rows = []
    for words in args.words:
        params = SamplingParams(temperature=0.8, seed=0, max_tokens=args.steps + 40, ignore_eos=True)
        ids = [engine.add_request(prompt_text(i, words), params) for i in range(args.batch)]
        start = time.perf_counter()
        prefill_steps = 0
        while engine.counters["num_decode_only_steps"] == 0 or any(
                r.seqs[0].num_computed_tokens < len(r.seqs[0].prompt_token_ids)
                for r in (engine.requests[i] for i in ids) if r.seqs):
            engine.step()
            prefill_steps += 1
        sync()
        prefill_s = time.perf_counter() - start
        for _ in range(3):
            engine.step()
        sync()
        before, r0 = engine.counters["num_decode_only_steps"], replays["n"]
        times = timed_steps(engine, args.steps, sync)
        decode_only = engine.counters["num_decode_only_steps"] - before
        top, cpu_top = profiled_steps(engine, 1, sync, 12)
        row = {"prompt_words": words, "prompt_tokens": len(engine.requests[ids[0]].seqs[0].prompt_token_ids),
               "prefill_steps": prefill_steps, "prefill_s": round(prefill_s, 3),
               "decode_step_ms_median": round(1e3 * sorted(times)[len(times) // 2], 3),
               "decode_step_ms_min": round(1e3 * min(times), 3), "decode_only_steps": decode_only,
               "graph_replays": replays["n"] - r0,
               "top_gpu_kernels_ms": top,
               "top_cpu_self_ms": cpu_top}
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("top")}), flush=True)
        rows.append(row)
        abort_all(engine, ids)
    # Steady state of continuous batching: finishing times staggered (max_tokens 64 + i % batch), so about one
    # request finishes per step and its seat goes to a waiting prompt at once: the step mixes that prompt's
    # prefill into the decodes (an eager step, no CUDA graph).
    staggered = []
    for words in args.words:
        ids = [engine.add_request(prompt_text(i, words), SamplingParams(
            temperature=0.8, seed=i, max_tokens=64 + i % args.batch, ignore_eos=True)) for i in range(3 * args.batch)]
        finished = engine.counters["num_requests_finished"]
        while engine.counters["num_requests_finished"] - finished < args.batch // 2:
            engine.step()
        steps, mixed = engine.counters["num_steps"], engine.counters["num_decode_only_steps"]
        times = timed_steps(engine, args.steps, sync)
        num_steps = engine.counters["num_steps"] - steps
        decode_only = engine.counters["num_decode_only_steps"] - mixed
        gpu_top, cpu_top = profiled_steps(engine, 5, sync, 15)
        row = {"prompt_words": words, "steps": num_steps, "decode_only_steps": decode_only,
               "step_ms_median": round(1e3 * sorted(times)[len(times) // 2], 3),
               "step_ms_mean": round(1e3 * sum(times) / len(times), 3),
               "five_steps_gpu_kernels_ms": gpu_top, "five_steps_cpu_self_ms": cpu_top}
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("five")}), flush=True)
        staggered.append(row)
        abort_all(engine, ids)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    args.out.write_text(json.dumps({"card": card, "info": info, "rows": rows, "staggered": staggered}, indent=1))


if __name__ == "__main__":
    main()
