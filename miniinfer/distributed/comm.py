"""The collectives we use, counted: every call adds its bytes to :data:`STATS` (for the chapter's
"bytes communicated per token" and the benchmark), then calls ``torch.distributed``.

Bytes are what this rank *contributes* (the tensor it passes in), the usual way to state a
collective's size; a ring all-reduce of ``n`` bytes over ``N`` ranks moves ``2·(N−1)/N·n`` bytes per
rank on the wire (:func:`ring_all_reduce_bytes`).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

__all__ = ["STATS", "reset_stats", "all_reduce", "all_gather_last", "all_to_all", "ring_all_reduce_bytes",
           "snapshot"]

STATS: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # op -> [calls, bytes]


def reset_stats() -> None:
    STATS.clear()


def snapshot() -> dict[str, dict[str, int]]:
    return {op: {"calls": calls, "bytes": nbytes} for op, (calls, nbytes) in STATS.items()}


def _count(op: str, t: torch.Tensor) -> None:
    entry = STATS[op]
    entry[0] += 1
    entry[1] += t.numel() * t.element_size()


def ring_all_reduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return 2 * (world_size - 1) / world_size * nbytes


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group``, in place; returns ``t``."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        _count("all_reduce", t)
        dist.all_reduce(t, group=group)
    return t


def all_gather_last(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along the last dim, in rank order. t: [..., n] -> [..., N·n]."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    _count("all_gather", t)
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=-1)


def all_to_all(t: torch.Tensor, group=None) -> torch.Tensor:
    """t: [N, ...] -> [N, ...]: row r goes to rank r, and row r of the result came from rank r."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t.clone()
    _count("all_to_all", t)
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t.contiguous(), group=group)
    return out
