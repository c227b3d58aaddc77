"""Prefix-cache eviction when the KV pool is full of cached prefixes (a long-running server's steady state).

    python benchmarks/cache_eviction.py                 # bundled model on CPU, writes results/cache_eviction_cpu.json
    python benchmarks/cache_eviction.py --quick         # a smaller pool and fewer requests
    python benchmarks/cache_eviction.py --tiny          # a 2-layer, width-64 random model (the GPU's regime: fast
                                                        # steps, so the walks' cost shows), results/cache_eviction_tiny_cpu.json

Every finished request leaves its prompt's blocks in the radix cache, so after enough distinct long prompts
the pool holds nothing free: each block a decoding sequence grows into, and each admitted prompt, must be
evicted from the cache first. Choosing victims (``lru_eviction_order``) walks the whole tree. The
scheduler evicts a batch of 1/64 of the pool per walk (:meth:`~miniinfer.engine.scheduler.Scheduler._evict`);
this script measures that against evicting exactly the shortfall (one walk per block: the scheduler before
the change) and against no prefix cache at all, on the same requests: long distinct prompts (``bench serve``'s
``prompt_text``: a line and N random words) through ``LLM.generate``, in two halves, the second on a full pool.

Columns: ``walks`` — calls of ``lru_eviction_order`` in the second half; ``ms/step`` and ``tok/s`` of the
second half (CPU time of this process, one torch thread); ``vs no cache`` — the second half's tok/s over the
no-cache engine's. Outputs (sampled with per-request seeds; greedy with ``--tiny``) must be identical in all
three.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from miniinfer import LLM, SamplingParams  # noqa: E402
from miniinfer.engine import EngineHooks  # noqa: E402
from miniinfer.engine import scheduler as scheduler_module  # noqa: E402
from miniinfer.engine.radix_cache import lru_eviction_order  # noqa: E402
from miniinfer.server.bench import prompt_text  # noqa: E402

COLUMNS = ["eviction", "kv blocks", "requests", "prompt tokens", "walks", "ms/step", "tok/s", "vs no cache",
           "same outputs"]


def run(mode: str, args) -> dict:
    walks = {"n": 0}

    def counted(root, num_blocks, ref_counts):
        walks["n"] += 1
        return lru_eviction_order(root, num_blocks, ref_counts)

    batch_fraction = scheduler_module.EVICTION_BATCH_FRACTION
    if mode == "per block (before)":
        scheduler_module.EVICTION_BATCH_FRACTION = 0.0
    try:
        llm = LLM(args.model, device="cpu", max_num_seqs=args.max_num_seqs, num_kv_blocks=args.blocks,
                  enable_prefix_caching=mode != "no cache", hooks=EngineHooks(lru_eviction_order=counted))
        prompts = [prompt_text(i, args.words) for i in range(args.requests)]
        params = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
                  for i in range(args.requests)]
        half = args.requests // 2
        first = llm.generate(prompts[:half], params[:half], use_tqdm=False)
        walks["n"] = 0
        steps = llm.engine.counters["num_steps"]
        cpu = time.process_time()
        second = llm.generate(prompts[half:], params[half:], use_tqdm=False)
        cpu = time.process_time() - cpu
        steps = llm.engine.counters["num_steps"] - steps
    finally:
        scheduler_module.EVICTION_BATCH_FRACTION = batch_fraction
    tokens = sum(len(o.outputs[0].token_ids) for o in second)
    return {"eviction": mode, "kv blocks": args.blocks, "requests": args.requests,
            "prompt tokens": round(sum(len(o.prompt_token_ids) for o in first + second) / args.requests),
            "walks": walks["n"] if mode != "no cache" else None, "ms/step": 1e3 * cpu / steps, "tok/s": tokens / cpu,
            "_outputs": [o.outputs[0].token_ids for o in first + second]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakespeare")
    parser.add_argument("--blocks", type=int, default=4096, help="KV pool (blocks of 16 tokens)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--words", type=int, default=450, help="random words per prompt (~1.7 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature (seeded per request); --tiny: 0, greedy, so that sampling over "
                             "its 151,936-token vocabulary does not outweigh the rest of the step")
    parser.add_argument("--quick", action="store_true", help="1024 blocks, 64 requests")
    parser.add_argument("--tiny", action="store_true",
                        help="instead of --model: Qwen2.5-0.5B's vocabulary on 2 layers of width 64, random weights, "
                             "a synthetic word-level tokenizer (scripts/gpu/serving_h200.py --shape tiny); defaults "
                             "then: 8192 blocks, 512 requests of 500 words, 64 tokens out, batch 128")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.requests = 1024, 64
    torch.set_num_threads(1)
    if args.tiny:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "gpu"))
        import serving_h200

        folder = Path(tempfile.mkdtemp(prefix="miniinfer-tiny-")) / "tiny"
        serving_h200.build_folder(folder, "tiny", "cpu", 2048)
        args.model = str(folder)
        args.blocks, args.requests, args.words, args.max_tokens, args.max_num_seqs = 8192, 512, 500, 64, 128
        args.temperature = 0.0
        if args.out is None:
            args.out = str(Path(__file__).parent / "results" / "cache_eviction_tiny_cpu.json")
    else:
        from miniinfer.cli import _model_path

        args.model = str(_model_path(args.model))
    rows = [run(mode, args) for mode in ("no cache", "per block (before)", "batched (1/64 of the pool)")]
    reference, expected = rows[0], rows[0]["_outputs"]
    for row in rows:
        row["vs no cache"] = row["tok/s"] / reference["tok/s"]
        row["same outputs"] = row.pop("_outputs") == expected
    print_table(COLUMNS, rows)
    write_results("cache_eviction", "Prefix-cache eviction on a full KV pool: a walk per block vs per batch",
                  "cpu", COLUMNS, rows, summary={"model": args.model, "words": args.words,
                                                 "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs},
                  notes="Second half of the requests, on a pool full of the first half's cached prompts; CPU time "
                        "of this process, one torch thread.", out=args.out)


if __name__ == "__main__":
    main()
