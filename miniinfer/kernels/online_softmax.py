"""Chapter 09 — the online softmax, the idea behind flash attention, as small readable functions.

Attention of one query over S keys is ``softmax(s) · V`` with scores ``s = q·kᵀ · scale``. The softmax
needs the maximum and the sum over *all* S scores before any weight is known — which seems to force us to
hold a whole row of scores (or, for L queries, an [L, S] matrix) in memory. It does not: a softmax over a
set of keys can be summarised by three numbers per query,

* ``m`` — the largest score seen so far (subtracted before ``exp`` so nothing overflows),
* ``l`` — the sum of ``exp(s - m)`` over the keys seen so far,
* ``o`` — the softmax-weighted average of their values, ``Σ exp(s - m) · v / l``,

and two such summaries of *disjoint* sets of keys merge exactly into the summary of their union
(:func:`merge_partials`). So keys can be visited one tile at a time, keeping only one [L_tile, S_tile]
tile of scores alive (:func:`blocked_attention`), and with a causal mask whole tiles can be skipped
(:func:`causal_tile_range`). Flash attention is this recurrence, run in on-chip memory.

Everything here is a reference written to be read (natural-log ``exp``; the kernels use ``exp2`` with
``log2(e)`` folded into the scale, which is the same arithmetic). Shapes: one sequence, ``q: [L, H, D]``,
``k, v: [S, H_kv, D]``, ``G = H // H_kv`` query heads per KV head; the L queries are the *last* L of the
S positions (query i sits at position ``i + S - L``), as in :func:`miniinfer.attention.causal_mask`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["merge_partials", "causal_tile_range", "tile_needs_mask", "blocked_attention"]


def _safe(m: torch.Tensor) -> torch.Tensor:
    """m with -inf replaced by 0: the reference point of an *empty* partial (no keys, l = 0).

    ``exp(-inf - (-inf))`` is NaN; shifting an empty partial by 0 instead gives ``exp(-inf) = 0``,
    i.e. it contributes nothing, which is what an empty set of keys should do.
    """
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def merge_partials(o1: torch.Tensor, m1: torch.Tensor, l1: torch.Tensor,
                   o2: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two partial softmax results over disjoint sets of keys into the result over their union.

    o: [..., D] the *normalised* output over the part's keys (``Σ exp(s - m) v / l``), m: [...] the
    part's largest score, l: [...] its ``Σ exp(s - m)``. An empty part has ``m = -inf, l = 0`` (its o is
    ignored). Returns (o, m, l) of the union: both parts are re-expressed relative to the new maximum
    ``m = max(m1, m2)`` — a part whose maximum was lower gets its weights scaled down by
    ``exp(m_part - m) <= 1`` — and the outputs are averaged with weights proportional to their sums.
    The merge is exact (up to rounding), commutative and associative, so parts can be merged in any
    grouping: one key tile at a time (flash attention) or a tree of context partitions (split-KV decode).
    """
    m = torch.maximum(m1, m2)
    w1 = l1 * torch.exp(m1 - _safe(m))  # each part's sum of exp, now relative to the common maximum
    w2 = l2 * torch.exp(m2 - _safe(m))
    l = w1 + w2
    denom = torch.where(l > 0, l, torch.ones_like(l))  # both parts empty: output zeros, not NaN
    # An empty part's o may be anything (never written): weigh it out with where, not 0 · o (0 · NaN = NaN).
    part1 = torch.where(w1[..., None] > 0, w1[..., None] * o1, torch.zeros_like(o1))
    part2 = torch.where(w2[..., None] > 0, w2[..., None] * o2, torch.zeros_like(o2))
    o = (part1 + part2) / denom[..., None]
    return o, m, l


def causal_tile_range(q_start: int, q_end: int, q_offset: int, block_n: int) -> tuple[int, int]:
    """Which key tiles the queries ``[q_start, q_end)`` must visit under a causal mask.

    Query i sits at position ``q_offset + i`` (``q_offset = S - L``: the cached prefix before the new
    queries) and sees keys ``0 .. q_offset + i``. Key tile t holds keys ``[t·block_n, (t+1)·block_n)``.
    Returns ``(first_tile, last_tile)``, both inclusive: ``first_tile`` is 0 (every query sees key 0),
    ``last_tile`` holds the last key the *last* query sees, ``(q_offset + q_end - 1) // block_n``. Tiles
    after it are masked for every query of the tile and are skipped — about half the work of a causal
    prefill. An empty range, ``(0, -1)``, when no query sees any key (an empty query tile, or queries
    before the first key when S < L). The caller also stops at its last key, tile ``(S - 1) // block_n``.
    (The first query matters only for which visited tiles need the mask: :func:`tile_needs_mask`.)
    """
    last_key = q_offset + q_end - 1  # the last query's position: the furthest key anyone here may see
    if q_end <= q_start or last_key < 0:
        return 0, -1
    return 0, last_key // block_n


def tile_needs_mask(tile: int, q_start: int, q_offset: int, block_n: int) -> bool:
    """Whether key tile ``tile`` holds a key hidden from some query of a tile starting at ``q_start``.

    The first query (position ``q_offset + q_start``) sees the least; if it sees the tile's last key,
    every query sees the whole tile and the mask can be skipped (the kernels' cheaper loop).
    """
    return (tile + 1) * block_n - 1 > q_offset + q_start


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                      block_m: int, block_n: int, *,
                      on_score_tile: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Attention of one sequence, computed tile by tile with the online softmax: never an [L, S] matrix.

    q: [L, H, D], k, v: [S, H_kv, D] -> [L, H, D] in q's dtype, ``softmax(q·kᵀ·scale [+ causal mask])·v``
    with query i at position ``i + S - L`` (bottom-right causal alignment: the last query sees every key).
    Math in float32 (float64 for float64 inputs). Queries are cut into tiles of ``block_m`` rows, keys into
    tiles of ``block_n``; for each query tile we keep the running (o, m, l) of :func:`merge_partials`,
    unnormalised (``acc = o · l``) so each key tile costs one rescale:

        m_new = max(m, rowmax(s));  alpha = exp(m - m_new);  p = exp(s - m_new)
        l = alpha · l + rowsum(p);  acc = alpha · acc + p · V_tile;  m = m_new

    and divide by l once at the end. GQA without copying K/V: q is viewed as [H_kv, G, ...], so the G
    query heads of a group are extra rows against the same key tile. A query that sees no key (only when
    causal and S < L) gets zeros, as flash-attn does.

    ``on_score_tile(query_tile, key_tile, scores)``, if given, is called with every score tile computed,
    ``scores: [H_kv, G, rows, cols]`` (rows <= block_m, cols <= block_n) — to draw which tiles are
    visited, or to check that no larger matrix is ever built.
    """
    L, H, D = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    G = H // H_kv
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(L, H, D, dtype=q.dtype, device=q.device)
    q_offset = S - L  # the cached prefix: query i sits at position q_offset + i
    for qt, q0 in enumerate(range(0, L, block_m)):
        q1 = min(q0 + block_m, L)
        # [rows, H, D] -> [H_kv, G, rows, D]: query head h = KV head h // G, member h % G of its group
        q_tile = q[q0:q1].to(compute).view(q1 - q0, H_kv, G, D).permute(1, 2, 0, 3) * scale
        m = torch.full((H_kv, G, q1 - q0), float("-inf"), dtype=compute, device=q.device)  # running max
        l = torch.zeros(H_kv, G, q1 - q0, dtype=compute, device=q.device)                  # running sum
        acc = torch.zeros(H_kv, G, q1 - q0, D, dtype=compute, device=q.device)             # Σ p·v, unnormalised
        if causal:
            first, last = causal_tile_range(q0, q1, q_offset, block_n)
            last = min(last, (S - 1) // block_n)
        else:
            first, last = 0, (S - 1) // block_n
        positions = torch.arange(q0, q1, device=q.device) + q_offset
        for kt in range(first, last + 1):  # tiles past `last` are hidden from every query here: skipped
            k0, k1 = kt * block_n, min((kt + 1) * block_n, S)
            k_tile = k[k0:k1].to(compute).permute(1, 0, 2)  # [H_kv, cols, D], shared by the G heads
            v_tile = v[k0:k1].to(compute).permute(1, 0, 2)
            s = torch.einsum("kgrd,kcd->kgrc", q_tile, k_tile)  # [H_kv, G, rows, cols]: one score tile
            if causal and tile_needs_mask(kt, q0, q_offset, block_n):
                visible = torch.arange(k0, k1, device=q.device)[None, :] <= positions[:, None]  # [rows, cols]
                s = s.masked_fill(~visible, float("-inf"))
            if on_score_tile is not None:
                on_score_tile(qt, kt, s)
            m_new = torch.maximum(m, s.amax(dim=-1))
            alpha = torch.exp(m - _safe(m_new))          # how much the old maximum overestimated the weights
            p = torch.exp(s - _safe(m_new)[..., None])   # this tile's weights, relative to the new maximum
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + torch.einsum("kgrc,kcd->kgrd", p, v_tile)
            m = m_new
        tile_out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]  # no key seen: zeros
        out[q0:q1] = tile_out.permute(2, 0, 1, 3).reshape(q1 - q0, H, D).to(q.dtype)
    return out
