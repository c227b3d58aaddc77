"""Chapter 12 benchmark: tensor, pipeline and expert parallelism over real processes.

CPU (default; gloo, 1/2/4 processes on this machine):

* **TP** 1/2/4: one forward of the bundled model on [1, 64] tokens: time and the collectives' bytes per
  token (two all-reduces per layer + the embedding's, one all-gather of the logits);
* **PP** p=2 and p=4: the bubble fraction of GPipe and 1F1B over micro-batch counts, measured from the
  timelines of real training steps (ops padded to fixed times, so that more processes than cores still
  behave like one device each; see ``run_pipeline_step``) against (p−1)/(m+p−1), and each schedule's peak
  of micro-batches held; the timelines of p=4, m=8 are stored for the chapter's figure;
* **EP** 2/4: the bundled ``shakespeare-moe`` expert-parallel on held-out text, capacity factors none /
  1.25 / 1.0: dropped share, all-to-all bytes per token, load imbalance (max/mean share) and aux loss.

    python benchmarks/parallelism.py            # -> benchmarks/results/parallelism_cpu.json

GPU (``--gpu``; NCCL, one process per GPU): batch-1 decode of the Qwen2.5-7B shape with random bf16
weights, TP 1/2/4 (as many as there are GPUs): tok/s, ms/token, weight GB per rank.

    python benchmarks/parallelism.py --gpu      # -> benchmarks/results/parallelism_<card>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from miniinfer.distributed import bench_tasks, testing  # noqa: E402
from miniinfer.distributed.group import WorkerPool  # noqa: E402
from miniinfer.distributed.pp import bubble_theory, measured_bubble  # noqa: E402

HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "shakespeare_heldout_slice.txt"


def cpu(args) -> None:
    import miniinfer

    dense = testing.build_model("shakespeare")
    moe = testing.build_model("shakespeare-moe")
    _, tokenizer = miniinfer.load_model(miniinfer.bundled_model_path("shakespeare-moe"))
    text_ids = tokenizer.encode(HELDOUT.read_text(encoding="utf-8")[:20000])
    rows, timelines = [], {}
    for world in (1, 2, 4):
        with WorkerPool(world, task_timeout_s=300) as pool:
            L = 64
            tp = pool.run(bench_tasks.tp_step_cost, dense, 1, L, 5)[0]
            reduce_bytes = tp["comm"].get("all_reduce", {}).get("bytes", 0)
            gather_bytes = tp["comm"].get("all_gather", {}).get("bytes", 0)
            rows.append({"part": "TP", "ranks": world, "setting": f"[1, {L}] forward", "ms": 1000 * tp["seconds"],
                         "all_reduce_calls": tp["comm"].get("all_reduce", {}).get("calls", 0),
                         "bytes_per_token": (reduce_bytes + gather_bytes) / L, "value": None, "theory": None})
            if world == 1:
                continue
            spec = (dict(num_layers=4, hidden_size=16, intermediate_size=16, num_heads=2, num_kv_heads=1), 0)
            pool.run(testing.pp_step, spec, 4, 4, 4, "1f1b", 0)  # warm-up
            for m in (1, 2, 4, 8, 16):
                for schedule in ("gpipe", "1f1b"):
                    results = pool.run(testing.pp_step, spec, m, 4, m, schedule, 0, (args.op_ms / 1000,
                                                                                     2 * args.op_ms / 1000))
                    rows.append({"part": "PP", "ranks": world, "setting": f"{schedule} m={m}",
                                 "value": measured_bubble(results), "theory": bubble_theory(world, m),
                                 "peak_micro_batches": max(r.peak_in_flight for r in results)})
                    if world == 4 and m == 8:
                        t0 = min(r.timeline[0][2] for r in results)
                        timelines[schedule] = [[(op, i, round(s - t0, 4), round(e - t0, 4)) for op, i, s, e
                                                in r.timeline] for r in results]
            per_rank = 128
            offset = 1000  # past the title page and the list of characters (one expert takes half of those)
            chunks = [text_ids[offset + r * per_rank:offset + (r + 1) * per_rank] for r in range(world)]
            for factor in (None, 1.25, 1.0):
                ep = pool.run(bench_tasks.ep_routing_cost, moe, chunks, factor)[0]
                layers = ep["layers"]
                rows.append({"part": "EP", "ranks": world, "setting": f"capacity {factor or 'none'}",
                             "ms": 1000 * ep["seconds"],
                             "dropped_share": sum(x["dropped_share"] for x in layers) / len(layers),
                             "bytes_per_token": sum(x["all_to_all_bytes"] for x in layers) / per_rank,
                             "imbalance": max(x["imbalance"] for x in layers),
                             "aux_loss": sum(x["aux_loss"] for x in layers) / len(layers)})
    columns = ["part", "ranks", "setting", "ms", "all_reduce_calls", "bytes_per_token", "value", "theory",
               "peak_micro_batches", "dropped_share", "imbalance", "aux_loss"]
    print_table(columns, rows)
    write_results("parallelism", "Tensor, pipeline and expert parallelism over gloo processes (CPU)", "cpu",
                  columns, rows, summary={"timelines_p4_m8": timelines, "op_ms": args.op_ms},
                  notes="gloo on a shared 2-core CPU: times are this machine's; bytes and bubbles carry over. PP ops "
                        "padded to op_ms (F) and 2*op_ms (B) by sleeping; 'value' is the measured bubble fraction. "
                        "EP: whole shakespeare-moe, 128 held-out tokens per rank (from token 1000 of the Macbeth slice); bytes_per_token counts both "
                        "all-to-alls of all 4 sparse layers (zero-padded capacity buffers included).")


def gpu(args) -> None:
    n_gpus = torch.cuda.device_count()
    rows = []
    for world in (1, 2, 4):
        if world > n_gpus:
            break
        with WorkerPool(world, backend="nccl", task_timeout_s=600, timeout_s=300) as pool:
            result = pool.run(bench_tasks.tp_decode_random, None, args.prompt_len, args.new_tokens)[0]
        rows.append({"tp": world, **result})
        print(rows[-1], flush=True)
    columns = ["tp", "tok_s", "ms_per_token", "weight_gb_per_rank", "memory_gb"]
    print_table(columns, rows)
    write_results("parallelism", "Qwen2.5-7B shape, random bf16 weights: batch-1 decode with tensor parallel (NCCL)",
                  "cuda", columns, rows, summary={"prompt_len": args.prompt_len, "new_tokens": args.new_tokens},
                  notes="eager (no CUDA graphs, no fused kernels): two all-reduces per layer per token.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="NCCL, Qwen2.5-7B shape, TP 1/2/4 decode")
    parser.add_argument("--op-ms", type=float, default=10.0, help="PP: forward op padded to this many ms")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
