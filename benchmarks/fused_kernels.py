"""Fused elementwise kernels vs the teaching functions: time, achieved bandwidth, kernels per call, and
kernels per model forward.

    python benchmarks/fused_kernels.py --device cuda    # the GPU benchmark, writes results/fused_kernels_<gpu>.json
    python benchmarks/fused_kernels.py --device cpu     # small sizes, torch references only (times mean little)

Ops (miniinfer.kernels.fused), each against what the readable model (chapter 04) runs for it:

* ``add_rms_norm``: ``s = x + residual; layers.rms_norm(s, w)`` vs ``fused_add_rms_norm``;
  bytes = read x, residual, w + write normed, sum = (4·T·E + E)·elt.
* ``rope``: ``rope.apply_rope(qkv[:, :H + H_kv], cos, sin)`` on cos/sin gathered beforehand (the model
  gathers once per forward) vs ``rope_qk_inplace_at_positions`` (gather inside, in place);
  bytes = read + write the q, k heads + the cos/sin rows + positions.
* ``silu_and_mul``: ``layers.swiglu(*gate_up.chunk(2, -1))`` vs ``silu_and_mul``; bytes = 3·T·I·elt.

Sizes: decode (T = 1) and prefill (T = 4096) of the Qwen2.5-0.5B shape (E = 896, H/H_kv = 14/2,
D = 64, I = 4864) and a 7B shape (E = 3584, 28/4, D = 128, I = 18944), bf16. GB/s counts the minimum
bytes above for both paths (effective bandwidth: the unfused path moves more). On a GPU each call is
timed as a CUDA-graph replay of 20 calls (no launch overhead in the numbers) rotating through enough
input sets to exceed the 50 MB L2 where the data is large; "kernels" is counted with torch.profiler.

Model: a random-weight Qwen2 of each shape (bf16) runs a batch-1 decode step over a 1024-token paged KV
cache (Triton write_kv + paged decode attention, as the engine does), unfused and fused: GPU kernels
per forward (torch.profiler, eager) and the forward's time as a CUDA-graph replay.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_cpu, time_cuda, time_per_call, write_results  # noqa: E402
from miniinfer import layers, rope  # noqa: E402
from miniinfer.kernels.fused import fused_add_rms_norm, rope_qk_inplace_at_positions, silu_and_mul  # noqa: E402

SHAPES = [  # (label, E, H, H_kv, D, I, layers, vocab)
    ("qwen2.5-0.5b", 896, 14, 2, 64, 4864, 24, 151936),
    ("7b", 3584, 28, 4, 128, 18944, 28, 152064),
]
COLUMNS = ["shape", "T", "op", "path", "time_us", "GB/s", "kernels", "speedup", "max_abs_diff"]
MODEL_COLUMNS = ["shape", "path", "kernels_per_forward", "kernels_per_layer", "graph_us", "eager_us",
                 "speedup", "max_logit_diff"]
L2_BYTES = 256 << 20  # rotate input sets until a round of calls touches this much memory


# --------------------------------------------------------------------------------------------------
# Timing and counting
# --------------------------------------------------------------------------------------------------

def count_kernels(fn) -> int | None:
    """GPU kernels (and memcpy/memset) launched by one call of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")  # one profile per call: intended
    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as error:  # noqa: BLE001 - a profiler problem must not stop the benchmark
        print(f"    (kernel count failed: {type(error).__name__}: {error})", flush=True)
        return None


# --------------------------------------------------------------------------------------------------
# Per-op benchmark
# --------------------------------------------------------------------------------------------------

def op_cases(E, H, H_kv, D, I, T, dtype, device, gen):  # noqa: E741 - the MLP width
    """{op: (bytes, make_inputs(), unfused(inputs), fused(inputs))}."""
    elt = torch.finfo(dtype).bits // 8
    cos_table, sin_table = (t.to(dtype).to(device) for t in rope.rope_cos_sin(32768, D, 1e6))

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    def norm_inputs():
        return rand(T, E), rand(T, E), 1 + 0.1 * rand(E)

    def rope_inputs():
        positions = torch.randint(0, 32768, (T,), generator=gen, device=device)
        return rand(T, H + 2 * H_kv, D), positions, cos_table[positions], sin_table[positions]

    def silu_inputs():
        return (rand(T, 2 * I),)

    def norm_unfused(x, r, w):
        return layers.rms_norm(x + r, w, 1e-6)

    def norm_fused(x, r, w):
        return fused_add_rms_norm(x, r, w, 1e-6)[0]

    def rope_unfused(qkv, positions, cos, sin):
        return rope.apply_rope(qkv[:, :H + H_kv], cos, sin)

    def rope_fused(qkv, positions, cos, sin):
        return rope_qk_inplace_at_positions(qkv, positions, cos_table, sin_table, H + H_kv)[:, :H + H_kv]

    def silu_unfused(gate_up):
        return layers.swiglu(*gate_up.chunk(2, dim=-1))

    return {
        "add_rms_norm": ((4 * T * E + E) * elt, norm_inputs, norm_unfused, norm_fused),
        "rope": (2 * T * (H + H_kv) * D * elt + T * D * elt + T * 8, rope_inputs, rope_unfused, rope_fused),
        "silu_and_mul": (3 * T * I * elt, silu_inputs, silu_unfused, silu_and_mul),
    }


def bench_op(device, label, T, op, nbytes, make_inputs, unfused, fused) -> list[dict]:
    """The unfused and the fused row of one op at one size."""
    num_sets = max(1, min(8, math.ceil(L2_BYTES / nbytes))) if device.type == "cuda" else 1
    sets = [make_inputs() for _ in range(num_sets)]
    # Correctness on the benchmark inputs (on copies: RoPE runs in place).
    diff = float((fused(*[t.clone() for t in sets[0]]).float()
                  - unfused(*[t.clone() for t in sets[0]]).float()).abs().max())
    rows, base = [], None
    for path, fn in (("unfused (teaching)", unfused), ("fused", fused)):
        name = path if device.type == "cuda" or path != "fused" else "fused (torch reference)"
        row = {"shape": label, "T": T, "op": op, "path": name}
        try:
            if device.type == "cuda":
                seconds, _ = time_per_call(lambda i, fn=fn: fn(*sets[i]), num_sets, repeat=20)
                row["kernels"] = count_kernels(lambda fn=fn: fn(*sets[0]))
            else:
                seconds = time_cpu(lambda fn=fn: fn(*sets[0]), warmup=2, repeat=10)
            row["time_us"] = seconds * 1e6
            row["GB/s"] = nbytes / seconds / 1e9
            base = base or seconds
            row["speedup"] = base / seconds
            if path == "fused":
                row["max_abs_diff"] = diff
        except Exception as error:  # noqa: BLE001 - report and go on
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc(limit=3)
        rows.append(row)
        print(f"  {label:13s} T={T:<5d} {op:13s} {name:24s} {row.get('time_us', float('nan')):9.2f} us "
              f"{row.get('GB/s', float('nan')):8.1f} GB/s kernels={row.get('kernels')}", flush=True)
    return rows


def bench_ops(device: torch.device, dtype: torch.dtype, token_counts, shapes) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for label, E, H, H_kv, D, I, _, _ in shapes:
        for T in token_counts:
            for op, case in op_cases(E, H, H_kv, D, I, T, dtype, device, gen).items():
                rows += bench_op(device, label, T, op, *case)
    return rows


# --------------------------------------------------------------------------------------------------
# Whole-model decode step
# --------------------------------------------------------------------------------------------------

class PagedDecodeContext:
    """Batch-1 decode over a paged cache with the package's Triton kernels (write_kv + paged decode),
    what the engine runs; fixed lengths, so a forward can be captured and replayed."""

    def __init__(self, num_layers, H_kv, D, context_len, dtype, device, block_size=16):
        from miniinfer.kernels.paged_attention import paged_decode_attention, write_kv

        self.write_kv, self.decode = write_kv, paged_decode_attention
        blocks = context_len // block_size + 1
        self.k = [torch.randn(blocks, block_size, H_kv, D, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.randn_like(k) for k in self.k]
        self.block_tables = torch.arange(blocks, dtype=torch.int32, device=device)[None]
        self.seq_lens = torch.tensor([context_len + 1], dtype=torch.int32, device=device)
        self.slots = torch.tensor([context_len], device=device)
        self.max_seq_len = blocks * block_size

    def attend(self, layer_index, q, k, v, scale):
        self.write_kv(k, v, self.k[layer_index], self.v[layer_index], self.slots, backend="triton")
        return self.decode(q, self.k[layer_index], self.v[layer_index], self.block_tables, self.seq_lens, scale,
                           backend="triton", max_seq_len=self.max_seq_len)


def bench_model(shape, dtype, context_len: int = 1024) -> list[dict]:
    from miniinfer.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

    label, E, H, H_kv, D, I, num_layers, vocab = shape
    config = Qwen2Config(vocab_size=vocab, hidden_size=E, intermediate_size=I, num_hidden_layers=num_layers,
                         num_attention_heads=H, num_key_value_heads=H_kv, head_dim=D, rope_theta=1e6,
                         tie_word_embeddings=label.startswith("qwen"))
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(device="cuda", dtype=dtype).eval()  # the RoPE tables too
    context = PagedDecodeContext(num_layers, H_kv, D, context_len, dtype, "cuda")
    ids = torch.tensor([123], device="cuda")
    positions = torch.tensor([context_len], device="cuda")
    rows_index = torch.tensor([0], device="cuda")

    @torch.inference_mode()
    def forward():
        return model(ids, positions, attention=context, logits_indices=rows_index)

    rows, logits, base = [], {}, None
    for fused in (False, True):
        model.enable_fused_kernels(fused)
        row = {"shape": label, "path": "fused" if fused else "unfused (readable)"}
        try:
            logits[fused] = forward().float()
            kernels = count_kernels(forward)
            row["kernels_per_forward"] = kernels
            row["kernels_per_layer"] = None if kernels is None else round(kernels / num_layers, 1)
            row["eager_us"] = time_cuda(forward, warmup=3, repeat=20) * 1e6
            seconds, how = time_per_call(lambda i: forward(), 1, inner=1, repeat=20)
            row["graph_us"] = seconds * 1e6 if how == "cuda graph" else None
            base = base or row["graph_us"]
            row["speedup"] = base / row["graph_us"] if base and row["graph_us"] else None
            if fused:
                row["max_logit_diff"] = float((logits[True] - logits[False]).abs().max())
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc(limit=4)
        rows.append(row)
        print(f"  model {label} {row['path']}: {row.get('kernels_per_forward')} kernels/forward, graph "
              f"{row.get('graph_us')} us, eager {row.get('eager_us')} us", flush=True)
    model.enable_fused_kernels(False)
    return rows


# --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default 1 4096; CPU 1 64)")
    parser.add_argument("--no-model", dest="model", action="store_false", help="skip the whole-model decode step")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    notes, summary = [], {}
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = False
        dtype, tokens = torch.bfloat16, args.tokens or [1, 4096]
        notes.append("bf16; op times are CUDA-graph replays of 20 calls (no launch overhead), rotating input sets "
                     "to exceed L2 where the data is large; GB/s = minimum bytes (see the script's docstring) / "
                     "time, the same bytes for both paths; kernels counted with torch.profiler.")
    else:
        dtype, tokens = torch.float32, args.tokens or [1, 64]
        print("CPU: small sizes, float32, torch references only (the 'fused' rows are the torch references of the "
              "fused ops, not fused kernels; the Triton kernels need a GPU). Times say little about a GPU.")
        notes.append("CPU run: small T, float32, torch references of the fused ops (no Triton), wall-clock medians.")
    print(f"== fused ops on {device} ({dtype}) ==", flush=True)
    rows = bench_ops(device, dtype, tokens, SHAPES)
    print()
    print_table(COLUMNS, rows, floatfmt=".4g")
    model_rows = []
    if device.type == "cuda" and args.model:
        print("\n== model decode step (batch 1, 1024-token paged context) ==", flush=True)
        for shape in SHAPES:
            try:
                model_rows += bench_model(shape, dtype)
                torch.cuda.empty_cache()  # the previous model's weights are gone
            except Exception as error:  # noqa: BLE001
                notes.append(f"model {shape[0]}: {type(error).__name__}: {error}")
                traceback.print_exc()
        print()
        print_table(MODEL_COLUMNS, model_rows, floatfmt=".4g")
        summary["model"] = model_rows
        notes.append("Model rows: random-weight bf16 Qwen2 of each shape, one decode token over a 1024-token paged "
                     "cache (Triton write_kv + paged decode attention); kernels per forward from torch.profiler "
                     "(eager); graph_us: one forward replayed as a CUDA graph.")
    elif device.type != "cuda":
        notes.append("Kernels per model forward are counted on a GPU only.")
    write_results("fused_kernels", "Fused elementwise kernels vs the teaching functions", device, COLUMNS, rows,
                  summary=summary, notes=" ".join(notes), out=args.out)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
