"""An automatic TP × PP planner from a cost model (decode, one replica of the model over a node's GPUs).

For every split ``tp · pp ≤ num_gpus`` (tp dividing the heads), a decode step of ``batch`` sequences at
``context`` tokens costs, per pipeline stage of ``L/pp`` layers on ``tp`` GPUs:

* **memory time**: the stage's weights and KV cache read once, ``(W + KV)/(tp·pp) / HBM bandwidth``
  (decode is memory bound; K/V heads are replicated when H_kv < tp, so the KV share stops shrinking);
* **compute time**: ``2 · params/(tp·pp) · batch / FLOP rate`` (the larger of the two counts);
* **TP communication**: 2 all-reduces of ``[batch, E]`` per layer, each ``latency + 2(tp−1)/tp · bytes / link``;
* **PP communication**: one ``[batch, E]`` send per stage boundary.

With ``pp`` micro-batches in flight the pipeline is full, so throughput = batch / stage time, while one
token's latency is the sum over the stages. Splits whose weights + KV do not fit ``memory_gb`` are
refused. :func:`plan` ranks the feasible splits by throughput (ties: latency).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cluster", "plan", "split_cost", "H200_NODE", "CPU_GLOO"]


@dataclass(frozen=True)
class Cluster:
    num_gpus: int
    memory_gb: float          # per GPU, usable
    hbm_gbps: float           # memory bandwidth per GPU, GB/s
    tflops: float             # dense bf16 TFLOP/s per GPU
    link_gbps: float          # all-reduce bus bandwidth per GPU, GB/s (NVLink)
    link_latency_us: float    # per collective


H200_NODE = Cluster(num_gpus=8, memory_gb=135, hbm_gbps=4800, tflops=990, link_gbps=450, link_latency_us=10)
CPU_GLOO = Cluster(num_gpus=4, memory_gb=8, hbm_gbps=20, tflops=0.1, link_gbps=2, link_latency_us=200)


def split_cost(config, cluster: Cluster, tp: int, pp: int, batch: int, context: int, dtype_bytes: int = 2) -> dict:
    E, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    H, H_kv, D, I = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size
    per_layer = E * (H + 2 * H_kv) * D + H * D * E + 3 * E * I
    params = L * per_layer + V * E * (1 if config.tie_word_embeddings else 2)
    kv_heads_per_rank = max(1, H_kv // tp)
    kv_bytes = 2 * (L / pp) * kv_heads_per_rank * D * dtype_bytes * batch * context   # per GPU
    weight_bytes = params * dtype_bytes / (tp * pp)
    fits = (weight_bytes + kv_bytes) / 1e9 <= cluster.memory_gb
    memory_s = (weight_bytes + kv_bytes) / (cluster.hbm_gbps * 1e9)
    compute_s = 2 * params / (tp * pp) * batch / (cluster.tflops * 1e12)
    message = batch * E * dtype_bytes
    tp_comm_s = 0.0 if tp == 1 else (2 * L / pp) * (cluster.link_latency_us * 1e-6 +
                                                    2 * (tp - 1) / tp * message / (cluster.link_gbps * 1e9))
    pp_comm_s = 0.0 if pp == 1 else cluster.link_latency_us * 1e-6 + message / (cluster.link_gbps * 1e9)
    stage_s = max(memory_s, compute_s) + tp_comm_s + pp_comm_s
    return {"tp": tp, "pp": pp, "gpus": tp * pp, "fits": fits, "memory_gb_per_gpu": (weight_bytes + kv_bytes) / 1e9,
            "stage_ms": 1e3 * stage_s, "token_latency_ms": 1e3 * stage_s * pp, "tokens_per_s": batch / stage_s,
            "tp_comm_share": tp_comm_s / stage_s}


def plan(config, cluster: Cluster, batch: int = 1, context: int = 4096, dtype_bytes: int = 2,
         max_latency_ms: float | None = None) -> list[dict]:
    """Every split, best first (throughput, then latency); those that do not fit in memory, or exceed
    ``max_latency_ms`` per token, come last with ``fits: False``."""
    rows = []
    for tp in range(1, cluster.num_gpus + 1):
        if config.num_attention_heads % tp or (config.num_key_value_heads >= tp and config.num_key_value_heads % tp) \
                or (config.num_key_value_heads < tp and tp % config.num_key_value_heads):
            continue
        for pp in range(1, cluster.num_gpus // tp + 1):
            if pp > config.num_hidden_layers:
                continue
            row = split_cost(config, cluster, tp, pp, batch, context, dtype_bytes)
            if max_latency_ms is not None and row["token_latency_ms"] > max_latency_ms:
                row["fits"] = False
            rows.append(row)
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"], r["token_latency_ms"]))
