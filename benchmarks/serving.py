"""Serving under load: a request-rate sweep against ``miniinfer serve`` (Poisson arrivals, streaming clients).

    python benchmarks/serving.py                          # bundled model on CPU: starts a server, writes results/serving_cpu.json
    python benchmarks/serving.py --quick                  # fewer requests, three rates
    python benchmarks/serving.py --url http://host:8000 --model NAME --rates 1 4 16 inf --out results.json

For each offered load (requests per second; ``inf`` sends them all at once) the script sends
``--num-requests`` streaming completions whose arrival gaps are exponential (a Poisson process, the
usual model of independent users), and measures on the client side: time to first token (TTFT),
inter-token latency (ITL: gaps between streamed chunks), end-to-end latency, achieved throughput
(requests/s and generated tokens/s), and errors (503s from a full queue count separately).

Below the engine's capacity, latency stays near its unloaded value and throughput follows the offered
load; above it, throughput flattens at the capacity while the queue, and with it TTFT, grows without
bound for as long as the overload lasts — chapter 13's latency-against-load figure.

With a local server (no ``--url``) the script also runs the same requests offline through
``LLM.generate`` (all at once) and reports the server's throughput at saturation against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402

PROMPT_LINES = [
    "ROMEO.\n", "JULIET.\nO Romeo, Romeo,", "HAMLET.\nTo be, or not to be,", "KING LEAR.\nBlow, winds,",
    "MACBETH.\nIs this a dagger", "PORTIA.\nThe quality of mercy", "OTHELLO.\nIt is the cause,",
    "PROSPERO.\nOur revels now are ended.", "BRUTUS.\nRomans, countrymen,", "VIOLA.\nIf music be",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def one_request(client, url: str, body: dict) -> dict:
    """Stream one completion; return its client-side timings."""
    start = time.perf_counter()
    first = None
    last = start
    gaps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 500}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    except Exception as error:  # noqa: BLE001 - a failed request is a data point, not a crash
        return {"status": -1, "error": f"{type(error).__name__}: {error}"}
    end = time.perf_counter()
    return {"status": 200, "ttft": (first or end) - start, "itl": gaps, "e2e": end - start, "tokens": tokens}


async def run_rate(url: str, model: str, rate: float, num_requests: int, max_tokens: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for i in range(num_requests):
            body = {"model": model, "prompt": PROMPT_LINES[i % len(PROMPT_LINES)], "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(one_request(client, url, body)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok]
    itl = [gap for r in ok for gap in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "offered_rps": rate if math.isfinite(rate) else "inf",
        "requests": num_requests, "ok": len(ok), "rejected_503": sum(r["status"] == 503 for r in results),
        "errors": sum(r["status"] not in (200, 503) for r in results),
        "achieved_rps": round(len(ok) / wall, 3), "output_tok_s": round(tokens / wall, 1),
        "ttft_p50_s": _round(percentile(ttft, 0.5)), "ttft_p99_s": _round(percentile(ttft, 0.99)),
        "itl_p50_s": _round(percentile(itl, 0.5)), "itl_p99_s": _round(percentile(itl, 0.99)),
        "e2e_p50_s": _round(percentile(e2e, 0.5)), "e2e_p99_s": _round(percentile(e2e, 0.99)),
        "wall_s": round(wall, 3),
    }


def _round(value):
    return None if value is None else round(value, 4)


def offline_throughput(num_requests: int, max_tokens: int, args) -> float:
    """Generated tokens/s of the same requests through ``LLM.generate``, all at once (no server)."""
    import os

    import torch

    from miniinfer import LLM, SamplingParams

    # The same CPU threads as the server process (ServerProcess runs it with OMP_NUM_THREADS, default 1).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    llm = LLM(device=args.device, max_num_seqs=args.max_num_seqs)
    prompts = [PROMPT_LINES[i % len(PROMPT_LINES)] for i in range(num_requests)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, ignore_eos=True) for i in range(num_requests)]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start `miniinfer serve` on a free port)")
    parser.add_argument("--model", default="shakespeare", help="the served model name")
    parser.add_argument("--rates", nargs="+", default=["1", "2", "4", "8", "16", "inf"],
                        help="offered loads, requests/s ('inf' = all at once)")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32, help="engine batch limit of the local server")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="24 requests, rates 2 8 inf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/serving_<device>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_requests, args.rates = 24, ["2", "8", "inf"]
    rates = [float(r) for r in args.rates]

    server = None
    url = args.url
    if url is None:
        from miniinfer.server.testing import ServerProcess

        server = ServerProcess("--max-num-seqs", str(args.max_num_seqs), "--max-waiting", "100000",
                               "--log-level", "warning", *(["--device", args.device] if args.device != "cpu" else []))
        url = server.url
    rows = []
    try:
        asyncio.run(run_rate(url, args.model, math.inf, 4, 4, args.seed))  # warm-up
        for rate in rates:
            rows.append(asyncio.run(run_rate(url, args.model, rate, args.num_requests, args.max_tokens, args.seed)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    columns = list(rows[0])
    print_table(columns, rows)
    summary = {"num_requests": args.num_requests, "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs}
    saturated = [r for r in rows if r["offered_rps"] == "inf"]
    if server is not None and saturated:
        offline = offline_throughput(args.num_requests, args.max_tokens, args)
        summary["offline_output_tok_s"] = round(offline, 1)
        summary["server_vs_offline_at_saturation"] = round(saturated[0]["output_tok_s"] / offline, 3)
        print(f"offline LLM.generate: {offline:.1f} tok/s; server at saturation: {saturated[0]['output_tok_s']} "
              f"tok/s ({summary['server_vs_offline_at_saturation']:.2f}x)")
    finite = [r for r in rows if r["offered_rps"] != "inf" and r["ttft_p50_s"] is not None]
    if finite:
        summary["unloaded_ttft_p50_s"] = finite[0]["ttft_p50_s"]
        summary["max_achieved_rps"] = max(r["achieved_rps"] for r in rows)
        summary["itl_p50_median_s"] = statistics.median(r["itl_p50_s"] for r in finite if r["itl_p50_s"])
    write_results("serving", "Serving: latency against offered load (Poisson arrivals, streaming clients)",
                  args.device, columns, rows, summary=summary, out=args.out,
                  notes="Client-side timings over HTTP on the same machine as the server; each request generates "
                        f"{args.max_tokens} tokens (ignore_eos) after a one-line prompt, temperature 0.8. On a "
                        "shared CPU the absolute numbers depend on the machine's load.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
