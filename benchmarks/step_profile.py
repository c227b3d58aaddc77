"""Where a decode step's time goes: kernels per forward, GPU time, and the CPU phases of one engine step
(chapter 06).

    python benchmarks/step_profile.py          # CPU: the bundled model, batch 1 and 16, eager: phases only
    python benchmarks/step_profile.py --gpu    # CUDA: a Qwen2.5-0.5B shape (random bf16), batch 1 and 32

One engine step is ``schedule -> runner.run (prepare, forward or graph replay, sample) -> commit ->
_process``. This script wraps those methods of a live engine (and the model's forward /
``decode_graphs.replay``) with clocks, fills the engine with ``batch`` requests of a ``--context``-token
prompt, lets them prefill, and then times decode steps only:

* **step_ms** — wall time of ``engine.step()``, nothing synchronised (median): what a user sees per
  token. The step ends with the sampled tokens' copy to the host, so it includes the GPU's work.
* **phase columns** (mean ms per step) — from a separate **attributed** pass in which every wrapped
  phase calls ``torch.cuda.synchronize()`` before and after itself, so the GPU work a phase launches is
  charged to that phase (forward: the forward's kernels; sample: the sampler's kernels and the
  device->host copy of the tokens): ``schedule`` (the scheduler's plan), ``prepare`` (pack the batch
  into the pinned buffer + one host->device copy), ``forward`` (eager forward or graph replay),
  ``sample`` (batched sampler + the tokens' copy to the host), ``commit`` (counts, stops, frees),
  ``process`` (detokenize + output objects), ``other`` (the rest of ``step``: copy-on-write blocks,
  step bookkeeping). The synchronisations cost a little: ``step_ms_attributed`` is that pass's total.
* **forward_launch_ms** — the forward phase in the unsynchronised pass: the CPU time to *launch* the
  forward (the eager Python + kernel launches, or one graph replay); the GPU then runs behind it and
  the sampler's copy to the host waits for it.
* on CUDA, with ``torch.profiler``: **kernels_per_forward** (GPU kernels, memcpys and memsets of one
  decode forward, re-run on the step's inputs), **kernels_per_layer** ((whole forward - forward with
  one layer) / (layers - 1), measured eagerly: a graph replays the same kernels),
  **launches_per_forward** (what the CPU launches: every kernel eagerly, one graph with graphs),
  **gpu_ms** (the GPU's busy time in one whole step: the sum of its kernels' and copies' durations,
  median of 3 profiled steps) and **forward_gpu_ms** (the same for the forward alone).

Configurations on CUDA: (a) eager, unfused (``enforce_eager=True, enable_fused_kernels=False``: the
"before"), (b) eager, fused, (c) CUDA graphs, unfused, (d) CUDA graphs, fused (the engine's default).
Requests are greedy with ``ignore_eos``; the random-weight model has no tokenizer, so on CUDA
``process`` builds outputs but detokenizes nothing (on the CPU the bundled model's tokenizer runs).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "sample", "commit", "process")
CONFIGS = [  # (name, enforce_eager, enable_fused_kernels)
    ("a: eager, unfused", True, False),
    ("b: eager, fused", True, True),
    ("c: graphs, unfused", False, False),
    ("d: graphs, fused", False, True),
]
COLUMNS = ["config", "batch", "kernels_per_forward", "kernels_per_layer", "launches_per_forward", "gpu_ms",
           "forward_gpu_ms", "step_ms", *(f"{p}_ms" for p in PHASES), "other_ms", "forward_launch_ms"]


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseClock:
    """Wraps a live engine's step methods; while ``active``, adds each call's seconds to its phase.

    ``sync``: synchronise the GPU before and after every phase (the attributed pass). The latest
    forward call (eager forward or graph replay) is remembered so that it can be re-run under the
    profiler on the same inputs."""

    def __init__(self, engine):
        self.active = False
        self.sync = False
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.plans: list[tuple[int, bool]] = []   # (sequences, decode-only) of each timed step
        self.last_forward = None                  # (function, args, kwargs)
        scheduler, runner = engine.scheduler, engine.runner
        scheduler.schedule = self._wrap("schedule", scheduler.schedule, on_result=self._saw_plan)
        runner.prepare = self._wrap("prepare", runner.prepare)
        runner.sample = self._wrap("sample", runner.sample)
        scheduler.commit = self._wrap("commit", scheduler.commit)
        engine._process = self._wrap("process", engine._process)
        runner.model = self._wrap("forward", runner.model, remember=True)  # what the eager path calls
        if runner.decode_graphs is not None:
            graphs = runner.decode_graphs
            graphs.replay = self._wrap("forward", graphs.replay, remember=True)

    def _saw_plan(self, plan) -> None:
        self.plans.append((len(plan.seqs), plan.is_decode_only))

    def _wrap(self, phase: str, fn, remember: bool = False, on_result=None):
        def timed(*args, **kwargs):
            if remember:
                self.last_forward = (fn, args, kwargs)
            if not self.active:
                return fn(*args, **kwargs)
            if self.sync:
                synchronize()
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            if self.sync:
                synchronize()
            self.totals[phase] += time.perf_counter() - started
            if on_result is not None:
                on_result(result)
            return result

        return timed

    def start(self, sync: bool) -> None:
        self.active, self.sync = True, sync
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.plans = []

    def stop(self) -> None:
        self.active = False


def timed_steps(engine, clock: PhaseClock, steps: int, sync: bool, batch: int) -> tuple[list[float], dict]:
    """Run ``steps`` decode steps with the clock on: (seconds of each step, mean seconds per phase)."""
    clock.start(sync)
    times = []
    try:
        for _ in range(steps):
            if sync:
                synchronize()
            started = time.perf_counter()
            engine.step()
            if sync:
                synchronize()
            times.append(time.perf_counter() - started)
    finally:
        clock.stop()
    if clock.plans != [(batch, True)] * steps:
        raise RuntimeError(f"expected {steps} decode-only steps of {batch} sequences, got "
                           f"{clock.plans[:5]}...")
    return times, {phase: total / steps for phase, total in clock.totals.items()}


# --------------------------------------------------------------------------------------------------
# torch.profiler on CUDA
# --------------------------------------------------------------------------------------------------

def gpu_profile(fn) -> tuple[int, float]:
    """(GPU kernels + memcpys + memsets, their summed duration in ms) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(events), sum(e.time_range.elapsed_us() for e in events) / 1e3


@torch.inference_mode()
def rerun_forward(clock: PhaseClock):
    """The latest forward again, on the same inputs (it rewrites the same K/V into the same slots)."""
    fn, args, kwargs = clock.last_forward
    return fn(*args, **kwargs)


def forward_kernels_per_layer(model, clock: PhaseClock) -> float | None:
    """(kernels of the whole forward - kernels with the first layer only) / (layers - 1), eagerly."""
    layers = model.model.layers
    if len(layers) < 2:
        return None
    full, _ = gpu_profile(lambda: rerun_forward(clock))
    model.model.layers = layers[:1]
    try:
        one, _ = gpu_profile(lambda: rerun_forward(clock))
    finally:
        model.model.layers = layers
    return round((full - one) / (len(layers) - 1), 2)


# --------------------------------------------------------------------------------------------------

def profile_batch(engine, model, batch: int, context: int, steps: int, warmup: int, rng: random.Random,
                  gpu: bool, eager: bool) -> dict:
    from miniinfer import SamplingParams

    clock = engine._step_profile_clock
    vocab = model.config.vocab_size
    max_tokens = warmup + 2 * steps + 16
    prompts = [[rng.randrange(vocab) for _ in range(context)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request_ids = engine.add_requests(prompts, [params] * batch, stream=True)
    try:
        # Prefill until every request has its first token, then warm up with a few decode steps.
        started = set()
        while len(started) < batch:
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        for _ in range(warmup):
            engine.step()
        times, unsynced = timed_steps(engine, clock, steps, sync=False, batch=batch)
        times_attr, phases = timed_steps(engine, clock, steps, sync=True, batch=batch)
        row = {"batch": batch, "context": context,
               "step_ms": round(1e3 * statistics.median(times), 3),
               "step_ms_mean": round(1e3 * statistics.fmean(times), 3),
               "step_ms_attributed": round(1e3 * statistics.fmean(times_attr), 3)}
        for phase in PHASES:
            row[f"{phase}_ms"] = round(1e3 * phases[phase], 3)
        row["other_ms"] = round(1e3 * (statistics.fmean(times_attr) - sum(phases.values())), 3)
        row["forward_launch_ms"] = round(1e3 * unsynced["forward"], 3)
        row["unsynced_phase_ms"] = {phase: round(1e3 * value, 3) for phase, value in unsynced.items()}
        if gpu:
            profiled = [gpu_profile(engine.step) for _ in range(3)]
            row["kernels_per_step"] = int(statistics.median(k for k, _ in profiled))
            row["gpu_ms"] = round(statistics.median(ms for _, ms in profiled), 3)
            kernels, forward_ms = gpu_profile(lambda: rerun_forward(clock))
            row["kernels_per_forward"] = kernels
            row["forward_gpu_ms"] = round(forward_ms, 3)
            row["launches_per_forward"] = kernels if eager else 1
            if eager:
                row["kernels_per_layer"] = forward_kernels_per_layer(model, clock)
    finally:
        for request_id in request_ids:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
    return row


def free() -> None:
    gc.collect()  # engines hold reference cycles (runner <-> graphs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_gpu(args) -> tuple[list[dict], dict, list[str]]:
    from benchmarks.engine_throughput import build_model
    from miniinfer.engine import EngineConfig, LLMEngine

    model = build_model("0.5b", max_positions=4096)
    rng = random.Random(0)
    rows, per_layer = [], {}
    summary: dict = {"model": "Qwen2.5-0.5B shape, random bf16", "layers": model.config.num_hidden_layers}
    for name, enforce_eager, fused in CONFIGS:
        model.enable_fused_kernels(False)  # the engine only ever turns the fused path on
        t0 = time.perf_counter()
        config = EngineConfig(enforce_eager=enforce_eager, enable_fused_kernels=fused,
                              max_num_seqs=max(args.batches), max_model_len=args.max_model_len,
                              attention_backend=args.backend)
        engine = LLMEngine(model, None, config)
        if bool(model.fused_kernels) != fused or (engine.runner.decode_graphs is None) != enforce_eager:
            raise RuntimeError(f"{name}: the engine runs fused={model.fused_kernels}, "
                               f"graphs={engine.runner.decode_graphs is not None}")
        engine._step_profile_clock = PhaseClock(engine)
        print(f"== {name}: engine ready in {time.perf_counter() - t0:.1f} s, "
              f"backend {engine.attention_backend}", flush=True)
        for batch in args.batches:
            measured = profile_batch(engine, model, batch, args.context, args.steps, args.warmup, rng,
                                     gpu=True, eager=enforce_eager)
            row = {"config": name, **measured}
            if enforce_eager:
                per_layer[fused, batch] = row.get("kernels_per_layer")
            else:
                row["kernels_per_layer"] = per_layer.get((fused, batch))
            row.update(backend=engine.attention_backend, graphs=engine.runner.decode_graphs is not None,
                       fused=bool(model.fused_kernels))
            rows.append(row)
            print({k: row.get(k) for k in COLUMNS}, flush=True)
        del engine
        free()
    model.enable_fused_kernels(False)
    summary["speedup_d_over_a"] = {}
    for batch in args.batches:
        a = next(r for r in rows if r["config"].startswith("a") and r["batch"] == batch)
        d = next(r for r in rows if r["config"].startswith("d") and r["batch"] == batch)
        summary["speedup_d_over_a"][str(batch)] = round(a["step_ms"] / d["step_ms"], 2)
    notes = ["CUDA: 0.5B-shaped random bf16 model; kernel counts and GPU busy time from torch.profiler "
             "(kernels, memcpys and memsets); kernels_per_layer measured eagerly and shown for the graph "
             "configs too (a graph replays the kernels it recorded); launches_per_forward: CPU launches (1 "
             "graph replay with graphs)."]
    return rows, summary, notes


def run_cpu(args) -> tuple[list[dict], dict, list[str]]:
    from miniinfer import LLM, bundled_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(str(bundled_model_path("shakespeare")), device="cpu", dtype=torch.float32,
              max_num_seqs=max(args.batches), attention_backend=args.backend)
    engine = llm.engine
    engine._step_profile_clock = PhaseClock(engine)
    rng = random.Random(0)
    rows = []
    for batch in args.batches:
        measured = profile_batch(engine, llm.model, batch, args.context, args.steps, args.warmup, rng,
                                 gpu=False, eager=True)
        row = {"config": "cpu eager", **measured}
        row.update(backend=engine.attention_backend, graphs=False, fused=False)
        rows.append(row)
        print({k: row.get(k) for k in COLUMNS if row.get(k) is not None}, flush=True)
    notes = ["CPU: the bundled shakespeare model, fp32, eager (no CUDA graphs or fused kernels on a CPU), "
             "with its tokenizer (process_ms includes incremental detokenization); synchronisation is a "
             "no-op, so both passes measure the same thing and there are no kernel columns."]
    return rows, {"model": "bundled shakespeare, fp32"}, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="profile on CUDA (four configurations)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batches (GPU 1 32, CPU 1 16)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (GPU 512, CPU 256)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per pass (GPU 30, CPU 20)")
    parser.add_argument("--warmup", type=int, default=5, help="decode steps before timing")
    parser.add_argument("--max-model-len", type=int, default=1024, help="GPU engines' max_model_len")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--backend", default="auto", help="paged-attention backend")
    parser.add_argument("--out", help="results JSON path")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU")
    args.batches = args.batches or ([1, 32] if args.gpu else [1, 16])
    args.context = args.context or (512 if args.gpu else 256)
    args.steps = args.steps or (30 if args.gpu else 20)
    started = time.perf_counter()
    rows, summary, notes = (run_gpu if args.gpu else run_cpu)(args)
    notes.insert(0, "Decode steps only (after every request's prefill and a warm-up), greedy, ignore_eos, "
                 f"prompts of {args.context} random tokens. step_ms: median wall time of engine.step() with "
                 "nothing synchronised. Phase columns: mean ms per step from a separate attributed pass "
                 "that calls torch.cuda.synchronize() before and after each wrapped phase (schedule, "
                 "prepare = pack + upload, forward = eager forward or graph replay, sample = sampler + "
                 "device->host token copy, commit, process = detokenize + outputs; other = the rest of "
                 "step); step_ms_attributed is that pass's mean step. forward_launch_ms: the forward phase "
                 "in the unsynchronised pass (CPU launch time); unsynced_phase_ms has every phase of that "
                 "pass.")
    cpu_columns = ["config", "batch", "step_ms", *(f"{p}_ms" for p in PHASES), "other_ms"]
    columns = COLUMNS if args.gpu else cpu_columns
    print()
    print_table(columns, rows, floatfmt=".4g")
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    write_results("step_profile", "Where a decode step's time goes", "cuda" if args.gpu else "cpu", columns,
                  rows, summary=summary, notes=" ".join(notes), out=args.out)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
