"""Serving under load: a request-rate sweep against ``miniinfer serve`` (Poisson arrivals, streaming clients).

    python benchmarks/serving.py                          # bundled model on CPU: starts a server, writes results/serving_cpu.json
    python benchmarks/serving.py --quick                  # fewer requests, three rates, one overhead pair
    python benchmarks/serving.py --overhead-requests 64 --overhead-repeats 9 --compare-engine-process --engine-cpus 0
                                                          # results/serving_cpu.json's run: both engine modes
    python benchmarks/serving.py --url http://host:8000 --model NAME --rates 1 4 16 inf --out results.json

A thin script over :mod:`miniinfer.server.bench` (also ``miniinfer bench serve``), which holds the load
generator and explains what is measured: for each offered load (``inf`` = all at once), TTFT, inter-token
latency, end-to-end latency, throughput and errors on the client side, the CPU seconds of the client and
(for a server it starts) of the server; and, with a server it starts, the server's throughput at
saturation against offline ``LLM.generate`` of the same requests, wall-clock and per CPU-second. This
script prints the table and writes the results JSON in the schema of ``benchmarks/common.py``.

Below the engine's capacity, latency stays near its unloaded value and throughput follows the offered
load; above it, throughput flattens at the capacity while the queue, and with it TTFT, grows without
bound for as long as the overload lasts — chapter 13's latency-against-load figure.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from miniinfer.server import bench  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_bench_serve_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="24 requests, rates 2 8 inf, one overhead pair")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_requests, args.rates, args.overhead_repeats = 24, [2.0, 8.0, math.inf], 1
    bench.check_arguments(args)
    report = bench.run_benchmark(args)
    print_table(report["columns"], report["rows"])
    overhead = report["summary"].get("overhead_at_saturation")
    if overhead is not None:
        print("\n".join(bench.overhead_lines(overhead)), flush=True)
    process_overhead = report["summary"].get("overhead_at_saturation_engine_process")
    if process_overhead is not None:
        print(f"engine {process_overhead['engine']}:\n  " + "\n  ".join(bench.overhead_lines(process_overhead)),
              flush=True)
    write_results("serving", "Serving: latency against offered load (Poisson arrivals, streaming clients)",
                  args.device or "cpu", report["columns"], report["rows"], summary=report["summary"],
                  out=args.out, notes=report["notes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
