"""MiniInfer against its throughput and latency goals, with every baseline measured in the same run.

    python benchmarks/engine_throughput.py                  # CPU: the bundled model vs HF generate
    python benchmarks/engine_throughput.py --gpu            # CUDA (an H200): the goal table below
    python benchmarks/engine_throughput.py --gpu --quick    # the same code paths, ~10x smaller (smoke test)
    python benchmarks/engine_throughput.py --gpu --hf-throughput    # + HF generate on the 256 requests (slow)

GPU rows (random bf16 weights of real model shapes, built on the GPU; ``ignore_eos``, so every
request produces exactly the tokens it asked for; greedy unless said):

| key | workload | goal |
|---|---|---|
| ``batch1_05b_tok_s`` | Qwen2.5-0.5B shape, 1 request, 128-token prompt, 256 new; also HF | >= 1,200 tok/s |
| ``batch1_7b_pct_floor`` | Qwen2.5-7B shape (untied), the same request | >= 85 % of floor |
| ``throughput_256_greedy`` | 0.5B, 256 requests, prompt and output lengths U(100, 1024) | >= 30,000 tok/s |
| ``throughput_256_sampled_pct_of_greedy`` | the same, temperature 0.8, top_p 0.95, seeded | >= 90 % |
| ``decode_32k_pct_floor`` | 0.5B, 32,000-token prompt, then 128 tokens (``llm.stream``) | >= 40 % of floor |

**Floors.** A batch-1 decode step must read every weight once: ``floor tok/s = bandwidth / bytes per
token``, where bandwidth is measured in the same run by a 1 GiB device-to-device copy (``2 x bytes /
time``: each byte is read and written) and bytes per token = the weights a decode step reads (a tied
head counted once: it is the embedding table; an untied model's embedding table is only looked up,
one row per token, so it is counted as one row — ``pct_floor_all_weights`` counts it whole), plus,
at 32k, the KV cache read at that context (layers x 2 (K, V) x H_kv x D x 2 bytes x context, at the
mean context of the decode). ``% floor`` uses the decode rate (first to last token of the request),
``tok/s`` the whole request (prefill included). The KV reads of the 128-token-prompt rows
(< 1 % of the weights) are left out of their floors.

CPU rows (the bundled model, fp32, against HF ``generate`` on the same weights; greedy outputs must
equal HF's on the first 32 tokens before anything is timed):

| key | workload | goal |
|---|---|---|
| ``cpu_batch1_vs_hf`` | 1 request, 64-token prompt, 128 new tokens | >= 2x HF |
| ``cpu_batch16_vs_hf`` | 16 requests, prompts U(16, 128), 128 new tokens each | >= 2x HF |
| ``cpu_sampled_over_greedy`` | 32 requests, prompts U(16, 128), 128 new; sampled / greedy time | <= 1.2 |

HF runs a left-padded static batch until the longest output is done (that is how its batching
works); miniinfer gets separate requests. Times are the best of ``--repeat`` runs after a warm-up;
the prefix cache is emptied before every timed run, so no run reuses an earlier run's prefill.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_cuda, write_results  # noqa: E402

GOALS = {  # key: (comparison, goal)
    "batch1_05b_tok_s": (">=", 1200.0),
    "batch1_05b_pct_floor": None,
    "batch1_7b_pct_floor": (">=", 85.0),
    "throughput_256_greedy": (">=", 30000.0),
    "throughput_256_sampled_pct_of_greedy": (">=", 90.0),
    "decode_32k_pct_floor": (">=", 40.0),
    "cpu_batch1_vs_hf": (">=", 2.0),
    "cpu_batch16_vs_hf": (">=", 2.0),
    "cpu_sampled_over_greedy": ("<=", 1.2),
}
GPU_KEYS = ["batch1_05b_tok_s", "batch1_05b_pct_floor", "batch1_7b_pct_floor", "throughput_256_greedy",
            "throughput_256_sampled_pct_of_greedy", "decode_32k_pct_floor"]
CPU_KEYS = ["cpu_batch1_vs_hf", "cpu_batch16_vs_hf", "cpu_sampled_over_greedy"]

GPU_COLUMNS = ["row", "requests", "prompt tokens", "new tokens", "seconds", "tok/s", "decode tok/s", "TTFT s",
               "floor tok/s", "% floor", "HF tok/s", "vs HF", "backend", "graphs", "fused"]
CPU_COLUMNS = ["row", "requests", "prompt tokens", "new tokens", "seconds", "tok/s", "HF tok/s", "vs HF",
               "sampled/greedy", "backend"]

# Qwen2.5 shapes (miniinfer.models.config.Qwen2Config field names).
SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False),
}
EOS = 151643  # Qwen2.5's <|endoftext|> (never reached: ignore_eos)

NOTES_GPU = (
    "Random bf16 weights (std 0.02) of the Qwen2.5 shapes, built on the GPU; ignore_eos. Floors: floor "
    "tok/s = copy bandwidth / bytes read per decoded token; bandwidth from a 1 GiB device-to-device copy in "
    "this run (2 x bytes / time); bytes per token = all weights once (tied head = the embedding table, "
    "counted once; an untied embedding table counts as the one row a token looks up: pct_floor_all_weights "
    "counts it whole), plus at 32k the KV read per token (layers x 2 x H_kv x D x 2 bytes x the mean context "
    "of the decode). % floor uses the decode rate (first to last token); tok/s counts the whole request, "
    "prefill included; TTFT is the time to the first token (the prefill, chunked at "
    "max_num_batched_tokens). The 0.5B rows run an LLM loaded from a folder that HF's model was saved to "
    "(same weights), max_model_len 4096 (32768 for the 32k row); the 7B row drives LLMEngine on a model "
    "built in memory. HF generate: left-padded static batch, eager, its default cache. "
    "greedy_agreement_with_hf counts leading greedy tokens equal to HF's: with random weights the logits "
    "are nearly uniform, so bf16 rounding flips near-ties and the sequences part early (correctness on the "
    "GPU is tested by tests/gpu). Best of --repeat runs after a warm-up (the 256-request workload: one "
    "whole untimed pass each way); the prefix cache is emptied before each run.")
NOTES_CPU = (
    "Bundled shakespeare model, fp32, CPU; greedy unless said, ignore_eos. HF generate runs a left-padded "
    "static batch to the longest output; vs HF = HF time / miniinfer time (> 1: miniinfer is faster). Greedy "
    "outputs were checked equal to HF's (first 32 tokens of the batch-1 prompt) before timing. "
    "sampled/greedy = wall time of the 32 requests with temperature 0.8, top_p 0.95 (seeded) over the same "
    "requests greedy. Best of --repeat interleaved runs after a warm-up; the prefix cache is emptied before "
    "each run. On a shared CPU the absolute numbers move with the neighbours' load; the ratios less so "
    "(cpu_seconds: this process's CPU time, all threads, recorded beside the wall time).")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_cuda() -> None:
    """Release what dropped objects held (engines hold reference cycles: collect them first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def random_prompts(rng: random.Random, vocab: int, lengths: list[int]) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def greedy(n: int):
    from miniinfer import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def sampled(n: int, seed: int):
    from miniinfer import SamplingParams

    return SamplingParams(temperature=0.8, top_p=0.95, seed=seed, max_tokens=n, ignore_eos=True)


def engine_info(engine) -> dict:
    return {"backend": engine.attention_backend, "graphs": bool(engine.stats()["cuda_graphs"]),
            "fused": bool(getattr(engine.model, "fused_kernels", False))}


@dataclass
class Timed:
    seconds: float               # submission to the last token
    cpu_seconds: float           # this process's CPU time over the same span (all threads)
    tokens: int                  # new tokens, all requests
    first_token_s: float | None  # batch 1: time to the first token
    decode_tok_s: float | None   # batch 1: (tokens - 1) / (last token - first token)
    outputs: list


def drive(engine, prompts: list[list[int]], params: list, device: str) -> Timed:
    """Submit every request (``stream=False``), step the engine until all are done, time it."""
    if engine.radix_cache is not None:
        engine.radix_cache.clear()  # no prefill reused from an earlier run of the same prompts
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    request_ids = engine.add_requests(prompts, params, stream=False)
    finished: dict = {}
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output
        stamps.append(time.perf_counter())
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    outputs = [finished[r] for r in request_ids]
    counts = [len(o.outputs[0].token_ids) for o in outputs]
    wanted = [p.max_tokens for p in params]
    errors = [o.outputs[0].error for o in outputs if o.outputs[0].finish_reason == "error"]
    if errors or counts != wanted:
        raise RuntimeError(f"the engine returned {sum(counts)} tokens for {sum(wanted)} asked"
                           + (f"; errors: {errors[:3]}" if errors else ""))
    first = decode = None
    if len(prompts) == 1 and len(stamps) >= counts[0]:
        # Batch 1: after the prompt's last chunk every step yields exactly one token.
        n = counts[0]
        token_stamps = stamps[-n:]
        first = token_stamps[0] - started
        if n > 1 and token_stamps[-1] > token_stamps[0]:
            decode = (n - 1) / (token_stamps[-1] - token_stamps[0])
    return Timed(seconds, cpu_seconds, sum(counts), first, decode, outputs)


def best(runs: list[Timed]) -> Timed:
    return min(runs, key=lambda r: r.seconds)


def hf_generate(model, prompts: list[list[int]], new_tokens: list[int], device: str) -> float:
    """Seconds for HF to generate max(new_tokens) tokens for all prompts as one left-padded batch."""
    longest = max(len(p) for p in prompts)
    pad = 0
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    steps = max(new_tokens)
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, pad_token_id=pad, eos_token_id=None)
    synchronize(device)
    seconds = time.perf_counter() - started
    assert out.shape[1] == longest + steps
    return seconds


def hf_greedy(model, prompt: list[int], n: int, device: str) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------------------------------
# GPU: models, floors
# --------------------------------------------------------------------------------------------------

def build_model(shape: str, num_layers: int | None = None, max_positions: int = 32768, seed: int = 0):
    """A random-weight miniinfer Qwen2 of ``shape`` on the GPU in bf16, without touching files.

    Built under ``torch.device("cuda")`` (the random init runs on the GPU), in float32 as the loader's
    model class expects, then cast to bf16 with ``.to`` (which also casts the RoPE tables, as the loader
    does)."""
    from miniinfer.models.config import Qwen2Config
    from miniinfer.models.qwen2 import Qwen2ForCausalLM

    fields = dict(SHAPES[shape])
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    config = Qwen2Config(**fields, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=max_positions,
                         torch_dtype="bfloat16", eos_token_id=EOS)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)  # __init__ runs init_weights (normal(0, 0.02))
    model.to(device="cuda", dtype=torch.bfloat16)
    return model.requires_grad_(False).eval()


def hf_05b_config(max_positions: int):
    """HF transformers' Qwen2Config with Qwen2.5-0.5B's shapes."""
    from transformers import Qwen2Config

    s = SHAPES["0.5b"]
    return Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                       intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
                       num_attention_heads=s["num_attention_heads"],
                       num_key_value_heads=s["num_key_value_heads"],
                       max_position_embeddings=max_positions, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, torch_dtype="bfloat16", use_sliding_window=False,
                       bos_token_id=EOS, eos_token_id=EOS)


def weight_read_bytes(model) -> tuple[int, int]:
    """(bytes a batch-1 decode step reads, bytes of all weights): see the module docstring."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied table appears once
    if model.lm_head is None:
        return total, total
    table = model.model.embed_tokens.weight
    return total - table.numel() * table.element_size() + table.shape[1] * table.element_size(), total


def kv_read_bytes(config, context: float) -> float:
    """KV bytes a decode step reads at ``context`` tokens: layers x 2 (K, V) x H_kv x D x 2 bytes x context"""
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2 * context


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read and written (2 x bytes / time)."""
    n = 1 << 30
    buffers = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
    seconds = time_cuda(lambda: buffers[1].copy_(buffers[0]), warmup=3, repeat=20)
    buffers.clear()
    torch.cuda.empty_cache()
    return 2 * n / seconds


def floor_fields(tok_s: float | None, decode_tok_s: float | None, bytes_per_token: float,
                 bandwidth: float) -> dict:
    floor = bandwidth / bytes_per_token
    rate = decode_tok_s or tok_s
    return {"floor tok/s": round(floor, 1), "% floor": round(100 * rate / floor, 1) if rate else None,
            "floor_bytes_per_token": int(bytes_per_token)}


# --------------------------------------------------------------------------------------------------
# GPU run
# --------------------------------------------------------------------------------------------------

def run_gpu(args) -> tuple[list[dict], dict, str]:
    from miniinfer import LLM
    from miniinfer.engine import EngineConfig, LLMEngine

    device = "cuda"
    q = args.quick
    prompt_len, new_tokens = (16, 32) if q else (128, 256)
    num_requests = 26 if q else args.num_requests
    length_range = (10, 102) if q else (100, 1024)
    long_prompt, long_new = (3200, 16) if q else (32000, 128)
    long_max_len = 4096 if q else 32768
    layers_7b = 3 if q else None
    repeat = 1 if q else args.repeat
    rng = random.Random(0)
    rows: list[dict] = []
    summary: dict = {"quick": q, "engines": {}}
    started_all = time.perf_counter()

    bandwidth = copy_bandwidth()
    summary["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    print(f"device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s (2 x 1 GiB / time)", flush=True)

    # ---- 0.5B: HF's model saved once to a folder, loaded by both ---------------------------------
    folder = Path(tempfile.mkdtemp(prefix="qwen25-05b-random-"))
    try:
        from transformers import Qwen2ForCausalLM as HFQwen2

        torch.manual_seed(0)
        with torch.device("cuda"):
            hf_model = HFQwen2(hf_05b_config(long_max_len))
        hf_model = hf_model.to(torch.bfloat16).eval()
        hf_model.save_pretrained(folder)
        print(f"0.5B-shaped random model saved to {folder} ({time.perf_counter() - started_all:.0f} s)",
              flush=True)

        vocab = SHAPES["0.5b"]["vocab_size"]
        prompt = random_prompts(rng, vocab, [prompt_len])
        llm = None
        backends = [args.backend] if args.backend != "auto" else ["auto", "triton"]
        for backend in backends:
            try:
                llm = LLM(str(folder), device=device, dtype=torch.bfloat16, max_model_len=4096,
                          attention_backend=backend)
                drive(llm.engine, prompt, [greedy(8)], device)                       # warm-up: batch 1
                drive(llm.engine, random_prompts(rng, vocab, [300, 40, 700, 5]), [greedy(8)] * 4, device)
                break
            except Exception as error:  # noqa: BLE001 - report, try the next backend
                print(f"attention backend {backend!r} failed: {type(error).__name__}: {error}", flush=True)
                llm = None
                free_cuda()
        if llm is None:
            raise RuntimeError("no attention backend worked")
        engine = llm.engine
        backend_name = args.backend if args.backend != "auto" else engine.attention_backend
        info = engine_info(engine)
        summary["engines"]["0.5b"] = {**info, "max_model_len": engine.max_model_len,
                                      "max_num_seqs": engine.config.max_num_seqs}
        print(f"0.5B engine: {info}", flush=True)

        check = min(32, new_tokens)
        ours = drive(engine, prompt, [greedy(check)], device).outputs[0].outputs[0].token_ids
        agree = leading_agreement(hf_greedy(hf_model, prompt[0], check, device), ours)
        summary["greedy_agreement_with_hf"] = f"{agree}/{check} leading tokens"
        print(f"greedy agreement with HF: {agree}/{check} leading tokens (random weights: they part early)")

        # Row 1: batch 1, 0.5B, with HF generate on the same weights.
        read_bytes, all_bytes = weight_read_bytes(llm.model)
        run = best([drive(engine, prompt, [greedy(new_tokens)], device) for _ in range(repeat)])
        hf_generate(hf_model, prompt, [8], device)  # warm-up
        hf_s = min(hf_generate(hf_model, prompt, [new_tokens], device) for _ in range(repeat))
        row = {"row": "batch 1, 0.5B", "requests": 1, "prompt tokens": prompt_len, "new tokens": new_tokens,
               "seconds": round(run.seconds, 3), "tok/s": round(run.tokens / run.seconds, 1),
               "decode tok/s": round(run.decode_tok_s, 1) if run.decode_tok_s else None,
               "TTFT s": round(run.first_token_s, 4) if run.first_token_s else None,
               **floor_fields(run.tokens / run.seconds, run.decode_tok_s, read_bytes, bandwidth),
               "HF tok/s": round(new_tokens / hf_s, 1), "vs HF": round(hf_s / run.seconds, 2), **info}
        rows.append(row)
        summary["batch1_05b_tok_s"] = row["tok/s"]
        summary["batch1_05b_pct_floor"] = row["% floor"]
        print(row, flush=True)

        # Rows 3 and 4: 256 requests, greedy then sampled (same prompts and lengths).
        lengths = [rng.randint(*length_range) for _ in range(num_requests)]
        outs = [rng.randint(*length_range) for _ in range(num_requests)]
        prompts = random_prompts(rng, vocab, lengths)
        total_new = sum(outs)
        greedy_params = [greedy(n) for n in outs]
        sampled_params = [sampled(n, seed=1000 + i) for i, n in enumerate(outs)]
        # Warm-up: the whole workload once each way (kernel builds for every prefill shape and batch size).
        drive(engine, prompts, greedy_params, device)
        drive(engine, prompts, sampled_params, device)
        greedy_runs, sampled_runs = [], []
        for _ in range(repeat):
            greedy_runs.append(drive(engine, prompts, greedy_params, device))
            sampled_runs.append(drive(engine, prompts, sampled_params, device))
        greedy_run, sampled_run = best(greedy_runs), best(sampled_runs)
        greedy_tok_s = total_new / greedy_run.seconds
        sampled_tok_s = total_new / sampled_run.seconds
        hf_tok_s = hf_ratio = None
        if args.hf_throughput:
            hf_s = hf_generate(hf_model, prompts, outs, device)
            hf_tok_s, hf_ratio = round(total_new / hf_s, 1), round(hf_s / greedy_run.seconds, 2)
        common = {"requests": num_requests, "prompt tokens": sum(lengths), "new tokens": total_new, **info}
        rows.append({"row": f"{num_requests} requests, greedy", **common,
                     "seconds": round(greedy_run.seconds, 3), "tok/s": round(greedy_tok_s, 1),
                     "HF tok/s": hf_tok_s, "vs HF": hf_ratio})
        rows.append({"row": f"{num_requests} requests, sampled", **common,
                     "seconds": round(sampled_run.seconds, 3), "tok/s": round(sampled_tok_s, 1),
                     "pct_of_greedy": round(100 * sampled_tok_s / greedy_tok_s, 1)})
        summary["throughput_256_greedy"] = round(greedy_tok_s, 1)
        summary["throughput_256_sampled_pct_of_greedy"] = round(100 * sampled_tok_s / greedy_tok_s, 1)
        print(rows[-2], rows[-1], sep="\n", flush=True)
        summary["engine_stats_0.5b"] = {k: v for k, v in engine.stats().items()
                                        if isinstance(v, (int, float, bool))}
        del llm, engine, hf_model
        free_cuda()

        # ---- 7B shape, batch 1: built in memory, LLMEngine driven directly -------------------------
        t0 = time.perf_counter()
        model = build_model("7b", num_layers=layers_7b, max_positions=4096)
        read_bytes, all_bytes = weight_read_bytes(model)
        engine = LLMEngine(model, None, EngineConfig(attention_backend=backend_name, max_num_seqs=1,
                                                     max_model_len=1024))
        info = engine_info(engine)
        label = "7B" if layers_7b is None else f"7B shape, {layers_7b} layers"
        summary["engines"]["7b"] = {**info, "layers": model.config.num_hidden_layers,
                                    "weights_GB": round(all_bytes / 1e9, 3)}
        print(f"{label}: model and engine in {time.perf_counter() - t0:.0f} s, {all_bytes / 1e9:.2f} GB of "
              f"weights; {info}", flush=True)
        prompt = random_prompts(rng, SHAPES["7b"]["vocab_size"], [prompt_len])
        drive(engine, prompt, [greedy(8)], device)                                       # warm-up
        run = best([drive(engine, prompt, [greedy(new_tokens)], device) for _ in range(repeat)])
        row = {"row": f"batch 1, {label}", "requests": 1, "prompt tokens": prompt_len,
               "new tokens": new_tokens,
               "seconds": round(run.seconds, 3), "tok/s": round(run.tokens / run.seconds, 1),
               "decode tok/s": round(run.decode_tok_s, 1) if run.decode_tok_s else None,
               "TTFT s": round(run.first_token_s, 4) if run.first_token_s else None,
               **floor_fields(run.tokens / run.seconds, run.decode_tok_s, read_bytes, bandwidth), **info}
        rate = run.decode_tok_s or run.tokens / run.seconds
        row["pct_floor_all_weights"] = round(100 * rate / (bandwidth / all_bytes), 1)
        rows.append(row)
        summary["batch1_7b_pct_floor"] = row["% floor"]
        print(row, flush=True)
        del engine, model
        free_cuda()

        # ---- 0.5B at 32k context, batch 1, through LLM.stream ----------------------------------------
        llm = LLM(str(folder), device=device, dtype=torch.bfloat16, max_model_len=long_max_len,
                  max_num_seqs=1, attention_backend=backend_name)
        engine = llm.engine
        info = engine_info(engine)
        summary["engines"]["0.5b_32k"] = {**info, "max_model_len": engine.max_model_len,
                                          "max_num_batched_tokens": engine.max_num_batched_tokens}
        # Warm-up: a short request, then the whole workload once on other tokens (kernel builds for every
        # prefill chunk's shape), so the timed runs compile nothing.
        drive(engine, random_prompts(rng, vocab, [64]), [greedy(8)], device)
        drive(engine, random_prompts(rng, vocab, [long_prompt]), [greedy(4)], device)
        read_bytes, _ = weight_read_bytes(llm.model)
        mean_context = long_prompt + (long_new - 1) / 2
        bytes_per_token = read_bytes + kv_read_bytes(llm.model.config, mean_context)
        runs = []
        for _ in range(repeat):
            if engine.radix_cache is not None:
                engine.radix_cache.clear()
            prompt = random_prompts(rng, vocab, [long_prompt])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            stamps = []
            for _, output in llm.stream(prompt, greedy(long_new)):
                n = len(output.outputs[0].new_token_ids)
                if n:
                    stamps.append((time.perf_counter(), n))
            count = sum(n for _, n in stamps)
            if count != long_new:
                raise RuntimeError(f"32k stream returned {count} tokens for {long_new}")
            first, last = stamps[0][0], stamps[-1][0]
            runs.append((last - t0, first - t0, (count - stamps[0][1]) / (last - first)))
        seconds, ttft, decode = min(runs, key=lambda r: r[0])
        row = {"row": f"batch 1 at {long_prompt // 1000}k, 0.5B", "requests": 1, "prompt tokens": long_prompt,
               "new tokens": long_new, "seconds": round(seconds, 3), "tok/s": round(long_new / seconds, 1),
               "decode tok/s": round(decode, 1), "TTFT s": round(ttft, 4),
               **floor_fields(None, decode, bytes_per_token, bandwidth), **info,
               "kv_bytes_per_token": int(kv_read_bytes(llm.model.config, mean_context))}
        rows.append(row)
        summary["decode_32k_pct_floor"] = row["% floor"]
        summary["ttft_32k_s"] = row["TTFT s"]
        print(row, flush=True)
        del llm, engine
        free_cuda()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary["gpu_wall_s"] = round(time.perf_counter() - started_all, 1)
    return rows, summary, "Qwen2.5-0.5B / 7B shapes, random bf16 weights" + (" (--quick)" if q else "")


# --------------------------------------------------------------------------------------------------
# CPU run
# --------------------------------------------------------------------------------------------------

def run_cpu(args) -> tuple[list[dict], dict, str]:
    from transformers import AutoModelForCausalLM

    from miniinfer import LLM, bundled_model_path

    device = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    folder = bundled_model_path("shakespeare")
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(str(folder), device=device, dtype=torch.float32, attention_backend=args.backend)
    engine = llm.engine
    vocab = hf_model.config.vocab_size
    summary: dict = {"engines": {"bundled": engine_info(engine)}}

    # Correctness first: greedy tokens equal HF's exactly (fp32 on the CPU).
    prompt = random_prompts(rng, vocab, [args.prompt_len])
    check = min(32, args.new_tokens)
    ours = drive(engine, prompt, [greedy(check)], device).outputs[0].outputs[0].token_ids
    reference = hf_greedy(hf_model, prompt[0], check, device)
    if ours != reference:
        raise SystemExit(f"greedy outputs differ from HF's at token {leading_agreement(ours, reference)} of "
                         f"{check}: not timing a wrong engine\n  ours {ours}\n  HF   {reference}")
    summary["greedy_agrees_with_hf"] = True
    print(f"greedy outputs equal HF's on the first {check} tokens", flush=True)

    rows = []
    batch16 = random_prompts(rng, vocab, [rng.randint(16, 128) for _ in range(16)])
    workloads = (("cpu_batch1_vs_hf", "batch 1", prompt), ("cpu_batch16_vs_hf", "batch 16", batch16))
    for key, name, prompts in workloads:
        new = [args.new_tokens] * len(prompts)
        drive(engine, prompts[:2], [greedy(8)] * min(2, len(prompts)), device)       # warm-up both
        hf_generate(hf_model, prompts[:2], [8] * min(2, len(prompts)), device)
        ours, hf = [], []
        for _ in range(args.repeat):  # interleaved, so a noisy neighbour on a shared CPU hits both alike
            ours.append(drive(engine, prompts, [greedy(n) for n in new], device).seconds)
            hf.append(hf_generate(hf_model, prompts, new, device))
        ours_s, hf_s = min(ours), min(hf)
        row = {"row": name, "requests": len(prompts), "prompt tokens": sum(map(len, prompts)),
               "new tokens": sum(new),
               "seconds": round(ours_s, 3), "tok/s": round(sum(new) / ours_s, 1),
               "HF tok/s": round(sum(new) / hf_s, 1), "vs HF": round(hf_s / ours_s, 2),
               "backend": engine.attention_backend}
        rows.append(row)
        summary[key] = row["vs HF"]
        print(row, flush=True)

    # Sampled vs greedy: the same 32 requests.
    prompts = random_prompts(rng, vocab, [rng.randint(16, 128) for _ in range(32)])
    new = [args.new_tokens] * len(prompts)
    drive(engine, prompts[:4], [sampled(8, seed=i) for i in range(4)], device)           # warm-up
    greedy_runs, sampled_runs = [], []
    for _ in range(args.repeat):  # interleaved, as above
        greedy_runs.append(drive(engine, prompts, [greedy(n) for n in new], device))
        sampled_runs.append(drive(engine, prompts, [sampled(n, seed=1000 + i) for i, n in enumerate(new)],
                                  device))
    greedy_s, sampled_s = min(r.seconds for r in greedy_runs), min(r.seconds for r in sampled_runs)
    # CPU time moves less than wall time when neighbours load a shared machine: recorded beside it.
    greedy_cpu = min(r.cpu_seconds for r in greedy_runs)
    sampled_cpu = min(r.cpu_seconds for r in sampled_runs)
    common = {"requests": len(prompts), "prompt tokens": sum(map(len, prompts)), "new tokens": sum(new),
              "backend": engine.attention_backend}
    rows.append({"row": "32 requests, greedy", **common, "seconds": round(greedy_s, 3),
                 "tok/s": round(sum(new) / greedy_s, 1), "cpu_seconds": round(greedy_cpu, 3)})
    rows.append({"row": "32 requests, sampled", **common, "seconds": round(sampled_s, 3),
                 "tok/s": round(sum(new) / sampled_s, 1), "sampled/greedy": round(sampled_s / greedy_s, 3),
                 "cpu_seconds": round(sampled_cpu, 3)})
    summary["cpu_sampled_over_greedy"] = round(sampled_s / greedy_s, 3)
    summary["cpu_sampled_over_greedy_cpu_time"] = round(sampled_cpu / greedy_cpu, 3)
    print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows, summary, "bundled shakespeare (Qwen2), fp32"


# --------------------------------------------------------------------------------------------------

def goal_summary(summary: dict, keys: list[str]) -> dict:
    """summary['goals'] = the goals of this device's rows; summary[key] = {goal, actual, met}."""
    goals = {}
    for key in keys:
        actual = summary.get(key)
        goal = GOALS[key]
        entry: dict = {"goal": None if goal is None else f"{goal[0]} {goal[1]:g}", "actual": actual}
        if goal is not None:
            goals[key] = entry["goal"]
            met = actual >= goal[1] if goal[0] == ">=" else actual <= goal[1]
            entry["met"] = None if actual is None else met
        summary[key] = entry
    summary["goals"] = goals
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU workloads (needs CUDA)")
    parser.add_argument("--quick", action="store_true", help="GPU: ~10x smaller workloads (smoke test)")
    parser.add_argument("--hf-throughput", action="store_true", help="GPU: HF on the 256 requests too (slow)")
    parser.add_argument("--prompt-len", type=int, default=64, help="CPU batch-1 prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="CPU tokens per request")
    parser.add_argument("--num-requests", type=int, default=256, help="GPU throughput requests")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per measurement; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--backend", default="auto", help="attention backend (auto: falls back to triton)")
    parser.add_argument("--out", help="results JSON path")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU")
    started = time.perf_counter()
    if args.gpu:
        rows, summary, model_name = run_gpu(args)
        columns, keys, notes, device = GPU_COLUMNS, GPU_KEYS, NOTES_GPU, "cuda"
    else:
        rows, summary, model_name = run_cpu(args)
        columns, keys, notes, device = CPU_COLUMNS, CPU_KEYS, NOTES_CPU, "cpu"
    summary = goal_summary(summary, keys)
    print()
    print_table(columns, rows)
    print()
    for key in keys:
        entry = summary[key]
        verdict = "" if "met" not in entry else ("  met" if entry["met"] else "  NOT met")
        print(f"  {key:40s} {entry['actual']!s:>10}   goal {entry['goal'] or '-'}{verdict}")
    out = args.out
    if out is None and args.gpu and args.quick:
        from benchmarks.common import RESULTS_DIR, device_slug

        out = RESULTS_DIR / f"engine_throughput_{device_slug(device)}_quick.json"
    write_results("engine_throughput", f"miniinfer engine throughput and latency vs goals: {model_name}",
                  device, columns, rows, summary, notes=notes, out=out)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
