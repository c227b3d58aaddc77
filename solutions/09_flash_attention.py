# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 09 — Flash attention: online softmax and tiling
#
# **What you will build.** Exact attention that never writes the $L \times S$ matrix of scores.
# Chapter 03 computed `softmax(q·kᵀ)·v` the obvious way: all scores, then all weights, then the
# output. On a GPU that is slow for a reason that has nothing to do with arithmetic — the score
# matrix goes out to memory and comes back, several times, and memory is the bottleneck. Flash
# attention computes the same numbers **one tile at a time** in on-chip memory, using a small
# piece of algebra, the **online softmax**. You will derive it and write the **merge rule** of two
# partial softmax results, a **blocked attention** in torch that never holds more than one tile of
# scores, the **causal tile bounds** that let a kernel skip half the work, and the **key loop of a
# Triton kernel**. Then your blocked attention runs the engine's prefill, and we place our kernels
# on the map of FlashAttention 2, 3 and 4.
#
# **What you need.** Chapter 03 (attention, the causal mask with a cached prefix, GQA), chapter
# 06 (the flat batch: `cu_seqlens_q`, `seq_lens`, chunked prefill) and chapter 07 (paged KV, block
# tables). The package code this chapter teaches is `miniinfer/kernels/online_softmax.py`,
# `miniinfer/kernels/flash_attention.py` and `miniinfer/kernels/flash_attention_triton.py`.

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import miniinfer.kernels  # noqa: F401  (on a machine without a GPU this sets TRITON_INTERPRET=1 before Triton loads)
from miniinfer import LLM, SamplingParams, bundled_model_path
from miniinfer.attention import grouped_query_attention
from miniinfer.components import Components
from miniinfer.course import unfinished_exercise
from miniinfer.kernels import online_softmax as package
from miniinfer.kernels.flash_attention import flash_attention

torch.manual_seed(0)
torch.set_num_threads(1)
device = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run (interpreted on a CPU)  # small tensors: one thread is as fast, and steady when the cores are shared
MODEL = bundled_model_path("shakespeare")


def agreement(difference: float, tolerance: float = 1e-5) -> str:
    """A difference as the answer key prints it: rounding noise differs between CPUs, the verdict does not."""
    return f"agree within {tolerance:g}" if difference <= tolerance else f"DIFFER by {difference:.2e}"


def reference_attention(q, k, v, causal, scale):
    """q [L, H, D], k, v [S, H_kv, D] -> [L, H, D] in float64: chapter 03's definition, the whole matrix."""
    return grouped_query_attention(q[None].double(), k[None].double(), v[None].double(), causal=causal,
                                   scale=scale)[0]


# %% [markdown]
# ## 1. Why naive attention is memory-bound
#
# One head of one sequence, $L$ queries and $S$ keys of dimension $D$. Naive attention runs three
# kernels, and each one goes through the GPU's main memory (HBM):
#
# 1. $\text{scores} = q k^\top \cdot \tfrac{1}{\sqrt D}$: reads $q, k$, **writes** $L \cdot S$ numbers;
# 2. $P = \text{softmax}(\text{scores})$: **reads and writes** $L \cdot S$ numbers (plus the mask);
# 3. $O = P v$: **reads** $L \cdot S$ numbers and $v$, writes $O$.
#
# That is $4 L S$ numbers of traffic for the matrix alone. The *arithmetic* is $L S D$
# multiply-adds for $qk^\top$ and as many for $Pv$: $4 L S D$ FLOPs. With $b$ bytes per number, the
# **arithmetic intensity** (FLOPs per byte moved) is
#
# $$ I_\text{naive} \approx \frac{4 L S D}{4 L S \, b} = \frac{D}{b}, \qquad
#    I_\text{flash} \approx \frac{4 L S D}{(2L + 2S) D \, b} \approx \frac{L}{b} \quad (L = S). $$
#
# For $D = 128$ in bf16 ($b = 2$) naive attention does 64 FLOPs per byte, whatever the length. An
# H200 computes 989 TFLOP/s (dense bf16) but moves only 4.8 TB/s: it needs about 206 FLOPs per
# byte to keep its tensor cores busy (the *ridge point* of its roofline). Naive attention sits far
# below it — **memory-bound** — and its traffic grows like $S^2$. Flash attention reads $q, k, v$
# once and writes $O$ once; the scores live and die in registers and shared memory, so its
# intensity grows with the length and it becomes **compute-bound**.

# %%
H200_TFLOPS, H200_TBPS = 989.0, 4.8  # dense bf16 tensor-core peak, HBM3e bandwidth (public specifications)
B, H, D, b = 8, 16, 128, 2           # the benchmark shape of this chapter: B 8, H 16, D 128, bf16
lengths = np.array([512, 1024, 2048, 4096, 8192, 16384, 32768])
naive_bytes = B * H * (4 * lengths**2 + 4 * lengths * D) * b   # the S×S matrix 4 times, plus q, k, v, o
flash_bytes = B * H * 4 * lengths * D * b                      # q, k, v read once, o written once
flops = B * H * 4 * lengths**2 * D                             # two matmuls (non-causal)

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
left.loglog(lengths, naive_bytes / 1e9, "o-", label="naive: S×S scores written and read")
left.loglog(lengths, flash_bytes / 1e9, "s-", label="flash: q, k, v read once, o written once")
left.set_xlabel("sequence length S (= L)")
left.set_ylabel("HBM traffic (GB)")
left.set_title(f"Bytes moved, B={B}, H={H}, D={D}, bf16", fontsize=10)
left.legend(fontsize=8)
ridge = H200_TFLOPS / H200_TBPS
right.semilogx(lengths, flops / naive_bytes, "o-", label="naive")
right.semilogx(lengths, flops / flash_bytes, "s-", label="flash")
right.axhline(ridge, color="k", linestyle="--", label=f"H200 ridge point ≈ {ridge:.0f} FLOP/byte")
right.set_yscale("log")
right.set_xlabel("sequence length S (= L)")
right.set_ylabel("arithmetic intensity (FLOP/byte)")
right.set_title("Below the ridge: memory-bound", fontsize=10)
right.legend(fontsize=8)
fig.tight_layout()

s = 4096
i = list(lengths).index(s)
print(f"S = {s}: the score matrices hold {B * H * s * s * b / 1e9:.1f} GB; naive attention moves "
      f"{naive_bytes[i] / 1e9:.1f} GB, flash {flash_bytes[i] / 1e9:.2f} GB")
print(f"time floors on an H200: naive ≥ {naive_bytes[i] / H200_TBPS / 1e9:.2f} ms of memory traffic, "
      f"flash ≥ {flops[i] / H200_TFLOPS / 1e9:.2f} ms of tensor-core arithmetic")

# %% [markdown]
# At $S = 4096$ the matrix alone is bigger than the inputs by a factor $S / D = 32$. Flash
# attention's whole game is to never let it reach HBM. Which needs one idea: a softmax that can
# be computed **one piece of the row at a time**.
#
# ## 2. The online softmax
#
# For one query with scores $s_1, \dots, s_S$ and values $v_1, \dots, v_S$, attention is
#
# $$ o = \sum_j \frac{e^{s_j}}{\sum_{j'} e^{s_{j'}}} \, v_j . $$
#
# Computed as written, $e^{s_j}$ overflows as soon as a score passes ~88 (float32). The safe form
# subtracts the maximum $m = \max_j s_j$ first — which seems to require *all* scores before the
# first weight. Instead, summarise any set $A$ of keys by three quantities:
#
# $$ m_A = \max_{j \in A} s_j, \qquad \ell_A = \sum_{j \in A} e^{s_j - m_A}, \qquad
#    o_A = \frac{1}{\ell_A} \sum_{j \in A} e^{s_j - m_A} \, v_j . $$
#
# $o_A$ is exactly attention restricted to the keys of $A$; $\ell_A$ is its softmax denominator
# measured relative to $m_A$. For two **disjoint** sets $A$ and $B$, the union has maximum
# $m = \max(m_A, m_B)$, and since $e^{s_j - m} = e^{s_j - m_A} e^{m_A - m}$,
#
# $$ \ell_{A \cup B} = \underbrace{\ell_A e^{m_A - m}}_{w_A} + \underbrace{\ell_B e^{m_B - m}}_{w_B},
#    \qquad
#    o_{A \cup B} = \frac{w_A \, o_A + w_B \, o_B}{w_A + w_B} . $$
#
# The factors $e^{m_A - m} \le 1$ only ever shrink numbers, so nothing overflows. The merge is
# exact, commutative and associative: keys can be processed in any grouping — one tile after the
# other (flash attention), or in a tree of independent partitions merged at the end (split-KV
# decoding, chapter 07's long-context kernel). An **empty** set has $m = -\infty$, $\ell = 0$ and
# an undefined $o$: it must contribute nothing, and $e^{-\infty - (-\infty)}$ is `nan`, so that
# case needs care.
#
# ### Exercise 9.1 — merging two partial results
#
# Write `merge_partials(o1, m1, l1, o2, m2, l2)` for batches of rows: `o: [..., D]`, `m, l: [...]`.
# Return `(o, m, l)` of the union. When both parts are empty, return `o = 0`, `m = -inf`, `l = 0`.
# The check feeds parts with empty sets (whose `o` is `nan`) and scores around ±800.

# %% tags=["exercise"] exercise="9.1"
def merge_partials(o1: torch.Tensor, m1: torch.Tensor, l1: torch.Tensor,
                   o2: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor):
    """(o, m, l) of the union of two disjoint sets of keys, from each set's (o [..., D], m [...], l [...])."""
    ### BEGIN SOLUTION
    m = torch.maximum(m1, m2)
    reference = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # both empty: any finite reference
    w1 = l1 * torch.exp(m1 - reference)  # each part's sum, relative to the common maximum
    w2 = l2 * torch.exp(m2 - reference)
    l = w1 + w2
    part1 = torch.where(w1[..., None] > 0, w1[..., None] * o1, torch.zeros_like(o1))  # not 0 · nan
    part2 = torch.where(w2[..., None] > 0, w2[..., None] * o2, torch.zeros_like(o2))
    o = (part1 + part2) / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    return o, m, l
    ### END SOLUTION


# %% tags=["check"] exercise="9.1"
from miniinfer.course import check

check.merge_partials(merge_partials)

# %% [markdown]
# Let us watch it work on one query over 256 keys, folded in tiles of 32. The scores drift upwards
# (later keys matter more), so the running maximum keeps growing. Each time it grows, the sum so
# far is **rescaled** by $e^{m_\text{old} - m_\text{new}}$ and drops; then the new tile's weights are
# added. At the end, $o$ equals the softmax over the whole row.

# %%
generator = torch.Generator().manual_seed(9)
NUM_KEYS, TILE, D_DEMO = 256, 32, 8
row_scores = (torch.randn(NUM_KEYS, generator=generator, dtype=torch.float64) * 1.5
              + torch.linspace(0, 6, NUM_KEYS, dtype=torch.float64))
row_values = torch.randn(NUM_KEYS, D_DEMO, generator=generator, dtype=torch.float64)


def tile_partial(scores, values):
    """(o [1, D], m [1], l [1]) of one tile of keys: the three numbers that summarise it."""
    m = scores.max()
    p = torch.exp(scores - m)
    return ((p @ values) / p.sum())[None], m[None], p.sum()[None]


def fold_tiles(merge):
    o = torch.zeros(1, D_DEMO, dtype=torch.float64)
    m, l = torch.full((1,), -math.inf, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    history = []
    for start in range(0, NUM_KEYS, TILE):
        m_before = m.item()
        o, m, l = merge(o, m, l, *tile_partial(row_scores[start:start + TILE], row_values[start:start + TILE]))
        history.append((start + TILE, m_before, m.item(), l.item()))
    return o, history


try:
    folded, history = fold_tiles(merge_partials)
except Exception as error:  # exercise 9.1 not written yet: show the package's merge meanwhile
    if unfinished_exercise(error) is None:
        raise
    print("⏳ Exercise 9.1 is not written yet: this figure uses the package's merge_partials")
    folded, history = fold_tiles(package.merge_partials)
exact = torch.softmax(row_scores, 0) @ row_values
print("folded tile by tile vs softmax over the whole row:", agreement((folded[0] - exact).abs().max(), 1e-12))

ends = np.array([h[0] for h in history])
fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
top.plot(np.arange(NUM_KEYS), row_scores, ".", color="grey", markersize=3, label="scores $s_j$")
top.step(ends, [h[2] for h in history], where="post", color="C3", label="running max $m$ (after the tile)")
for start in range(0, NUM_KEYS, TILE):
    top.axvline(start, color="k", alpha=0.1)
top.set_ylabel("score")
top.legend(fontsize=8, loc="upper left")
top.set_title(f"One query, {NUM_KEYS} keys, tiles of {TILE}: the running maximum and sum", fontsize=10)
rescaled = [h[3] - np.exp(row_scores[h[0] - TILE:h[0]].numpy() - h[2]).sum() for h in history]  # old ℓ, rescaled
bottom.bar(ends - TILE / 2, [h[3] for h in history], width=TILE * 0.8, color="C0", alpha=0.4,
           label=r"$\ell$ after the tile (relative to the new $m$)")
bottom.plot(ends - TILE / 2, rescaled, "v", color="C3", label=r"old $\ell$ rescaled by $e^{m_{old} - m_{new}}$")
bottom.set_xlabel("key index")
bottom.set_ylabel(r"$\ell = \sum e^{s_j - m}$")
bottom.legend(fontsize=8, loc="upper left")
fig.tight_layout()

# %% [markdown]
# ## 3. Tiling over keys and queries
#
# A GPU kernel gives each thread block a **tile of queries** ($B_m$ rows) and walks over the keys
# in **tiles of $B_n$**. For each key tile it computes a $B_m \times B_n$ tile of scores — in
# registers — and folds it into three running quantities per query: $m$, $\ell$ and an
# accumulator. FlashAttention-2's refinement: keep the accumulator **unnormalised**,
# $\text{acc} = \ell \cdot o$, so each tile costs one rescale and no division:
#
# $$ m' = \max(m, \operatorname{rowmax} s), \quad \alpha = e^{m - m'}, \quad p = e^{s - m'}, \quad
#    \ell' = \alpha \ell + \operatorname{rowsum} p, \quad \text{acc}' = \alpha \, \text{acc} + p \, V_\text{tile} , $$
#
# and divide by $\ell$ once, after the last tile. (This is exercise 9.1's merge with part $B$ = the
# new tile, written for the unnormalised accumulator.) Memory per query tile: the $B_m \times D$
# accumulator and one $B_m \times B_n$ tile of scores, whatever $S$ is.
#
# **GQA without repeating K/V.** With $H$ query heads and $H_{kv}$ key/value heads, the $G = H /
# H_{kv}$ query heads of a group read the *same* keys. Chapter 03 repeated `k` and `v` $G$ times —
# in a kernel that multiplies the K/V traffic by $G$ (4 for the bundled model, $H = 8$, $H_{kv} = 2$;
# 7 for Qwen2.5-7B, 28 query heads and 4 KV heads). Instead, view the query tile as
# `[H_kv, G, rows, D]`: the $G$ heads are just more rows against one key tile, loaded once. (Our
# Triton kernel goes further and makes the $G$ heads *rows* of one matrix multiply: a chunk of a
# few queries times $G$ heads fills the tensor core's tile better than the queries alone.)
#
# ### Exercise 9.2 — blocked attention, one score tile at a time
#
# Write `blocked_attention(q, k, v, causal, scale, block_m, block_n, on_score_tile=None)` for one
# sequence: `q: [L, H, D]`, `k, v: [S, H_kv, D]` → `[L, H, D]` in `q`'s dtype. Query $i$ sits at
# position $S - L + i$ (chapter 03's alignment: the last query sees every key); with `causal`, it
# sees keys $0 \dots S - L + i$. Loop over query tiles of `block_m` rows and, inside, over key tiles
# of `block_n`; compute the tile of scaled scores `s` — shape `[H_kv, G, rows, cols]` (or
# `[H, rows, cols]`) — and, **if `on_score_tile` is given, call `on_score_tile(qt, kt, s)`** with
# the numbers of the query tile and the key tile, before masking. You may visit every key tile and
# mask (exercise 9.3 will tell you which ones to skip).
#
# The check compares with a float64 oracle and also watches your function: it must never build a
# score-like tensor larger than one tile for all heads (`H · block_m · block_n` numbers), a whole
# row of $S$ scores, or call torch's fused attention. Math in the input's dtype is fine.

# %% tags=["exercise"] exercise="9.2"
def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                      block_m: int, block_n: int, on_score_tile=None) -> torch.Tensor:
    """softmax(q·kᵀ·scale [+ causal mask])·v, tile by tile: q [L, H, D], k, v [S, H_kv, D] -> [L, H, D]."""
    ### BEGIN SOLUTION
    L, H, D = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    G = H // H_kv
    out = torch.empty_like(q)
    for qt, q0 in enumerate(range(0, L, block_m)):
        q1 = min(q0 + block_m, L)
        q_tile = q[q0:q1].reshape(q1 - q0, H_kv, G, D).permute(1, 2, 0, 3)  # [H_kv, G, rows, D]
        m = torch.full((H_kv, G, q1 - q0), -math.inf, dtype=q.dtype, device=q.device)
        l = torch.zeros(H_kv, G, q1 - q0, dtype=q.dtype, device=q.device)
        acc = torch.zeros(H_kv, G, q1 - q0, D, dtype=q.dtype, device=q.device)
        positions = torch.arange(q0, q1, device=q.device) + (S - L)
        for kt, k0 in enumerate(range(0, S, block_n)):
            k1 = min(k0 + block_n, S)
            if causal and k0 > positions[-1]:
                break  # no query of this tile sees these keys (or any later ones)
            k_tile = k[k0:k1].permute(1, 0, 2)  # [H_kv, cols, D]: shared by the G heads of a group
            v_tile = v[k0:k1].permute(1, 0, 2)
            s = torch.einsum("ngrd,ncd->ngrc", q_tile, k_tile) * scale
            if on_score_tile is not None:
                on_score_tile(qt, kt, s)
            if causal:
                s = s.masked_fill(torch.arange(k0, k1, device=q.device)[None, :] > positions[:, None], -math.inf)
            m_new = torch.maximum(m, s.amax(-1))  # finite: key 0 is visible to every query
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new[..., None])
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + torch.einsum("ngrc,ncd->ngrd", p, v_tile)
            m = m_new
        out[q0:q1] = (acc / l[..., None]).permute(2, 0, 1, 3).reshape(q1 - q0, H, D)
    return out
    ### END SOLUTION


# %% tags=["check"] exercise="9.2"
check.blocked_attention(blocked_attention)

# %% [markdown]
# ## 4. Causal attention: skip the tiles nobody sees
#
# With a causal mask, query $i$ (at position $S - L + i$) sees keys $0 \dots S - L + i$. For a
# **query tile** of rows $[q_0, q_1)$ and a key tile $t$ holding keys $[t B_n, (t+1) B_n)$, three
# things can happen:
#
# * the tile lies after the last key that the tile's **last** query sees: every score would be
#   masked — **skip it** (no loads, no math). Roughly half of the tiles of a causal prefill;
# * every query of the tile, even the **first** (position $S - L + q_0$), sees every key of the
#   tile, and the tile lies inside the sequence — **no mask needed** (the cheaper loop);
# * otherwise the tile straddles the diagonal (or the sequence's end) — **compute with the mask**.
#
# Because visibility only grows with the key index going down, each kind is a contiguous run:
# tiles $[0, \text{full})$ unmasked, $[\text{full}, \text{visited})$ masked, the rest skipped. A
# kernel's key loop is exactly two `for` loops over these ranges.
#
# ### Exercise 9.3 — the causal tile bounds
#
# Write `causal_key_tiles(q_start, q_end, q_offset, S, block_n) -> (full, visited)` for the
# queries $[q_\text{start}, q_\text{end})$ at positions `q_offset + i` (`q_offset = S - L`, the
# cached prefix), over $S$ keys cut into tiles of `block_n`: `full` = the number of leading tiles
# that need no mask, `visited` = the number of leading tiles that must be computed at all. An empty
# query range visits nothing.

# %% tags=["exercise"] exercise="9.3"
def causal_key_tiles(q_start: int, q_end: int, q_offset: int, S: int, block_n: int) -> tuple[int, int]:
    """(full, visited): key tiles [0, full) need no mask, [full, visited) need it, the rest are skipped."""
    ### BEGIN SOLUTION
    if q_end <= q_start:
        return 0, 0
    last_key = min(q_offset + q_end - 1, S - 1)  # the last key the last query sees
    visited = last_key // block_n + 1 if last_key >= 0 else 0
    first_sees = min(q_offset + q_start, S - 1)  # the first query sees keys 0 … first_sees
    full = (first_sees + 1) // block_n if first_sees >= 0 else 0  # whole tiles inside that range
    return min(full, visited), visited
    ### END SOLUTION


# %% tags=["check"] exercise="9.3"
check.causal_key_tiles(causal_key_tiles)

# %% [markdown]
# The map of a causal prefill ($L = S = 256$, tiles of 32) and of a **chunk over a cached prefix**
# — the engine's chunked prefill, or a prompt whose beginning came from the radix cache of chapter
# 08: 96 new queries after 160 cached keys. The diagonal moves to the right by the prefix
# (bottom-right alignment): the new queries see the whole prefix, so most of their tiles need no
# mask at all.

# %%
def tile_map(L, S, block_m, block_n, tiles_fn):
    """[query tiles, key tiles] array: 2 = computed without mask, 1 = computed with mask, 0 = skipped."""
    grid = np.zeros((math.ceil(L / block_m), math.ceil(S / block_n)), dtype=int)
    for qt in range(grid.shape[0]):
        full, visited = tiles_fn(qt * block_m, min((qt + 1) * block_m, L), S - L, S, block_n)
        grid[qt, :visited] = 1
        grid[qt, :full] = 2
    return grid


try:
    causal_key_tiles(0, 1, 0, 1, 1)
    tiles_fn = causal_key_tiles
except Exception as error:  # exercise 9.3 not written yet
    if unfinished_exercise(error) is None:
        raise
    print("⏳ Exercise 9.3 is not written yet: the maps use the package's bounds")

    def tiles_fn(q_start, q_end, q_offset, S, block_n):
        _, last = package.causal_tile_range(q_start, q_end, q_offset, block_n)
        visited = max(0, min(last + 1, math.ceil(S / block_n)))
        full = 0
        while full < visited and (full + 1) * block_n <= S and not package.tile_needs_mask(full, q_start, q_offset,
                                                                                           block_n):
            full += 1
        return full, visited

from matplotlib.colors import ListedColormap

colours = ListedColormap(["#eeeeee", "#f4a261", "#2a9d8f"])
fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1]})
for ax, (L, S) in zip(axes, [(256, 256), (96, 256)]):
    grid = tile_map(L, S, 32, 32, tiles_fn)
    ax.imshow(grid, cmap=colours, vmin=0, vmax=2, extent=(0, S, L, 0))
    ax.plot([S - L, S], [0, L], color="k", linewidth=1)  # the diagonal j = S - L + i
    ax.set_xlabel("key position")
    ax.set_ylabel("query (new token)")
    counts = np.bincount(grid.ravel(), minlength=3)
    ax.set_title(f"L={L}, S={S}: {counts[2]} tiles unmasked, {counts[1]} masked, {counts[0]} skipped",
                 fontsize=9)
    ax.set_xticks(range(0, S + 1, 64))
    ax.set_yticks(range(0, L + 1, 32))
handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i)) for i in (2, 1, 0)]
fig.legend(handles, ["computed, no mask", "computed, masked", "skipped"], loc="lower center", ncol=3, fontsize=8)
fig.tight_layout(rect=(0, 0.06, 1, 1))

full_work = math.ceil(256 / 32) ** 2
print(f"causal prefill: {int((tile_map(256, 256, 32, 32, tiles_fn) > 0).sum())} of {full_work} tiles computed; "
      "the fraction tends to 1/2 as the tiles get small against S")

# %% [markdown]
# ## 5. Many sequences in one call: varlen and paged
#
# The engine never calls attention on a rectangle. A prefill step packs the new tokens of several
# prompts back to back (chapter 06): `q: [T, H, D]` with `cu_seqlens_q = [0, L_0, L_0 + L_1, …]`.
# Padding them to the longest would compute $B \cdot L_\text{max}^2$ scores instead of
# $\sum_b L_b^2$ — and the padded rows would be thrown away. A **varlen** kernel gives each thread
# block a (sequence, query tile) pair and reads the sequence's boundaries from `cu_seqlens`; its
# tiles never cross into the next sequence. The keys of each sequence come either packed the same
# way (`cu_seqlens_k`) or, in the engine, from the **paged** KV pool of chapter 07 through
# `block_table` and `seq_lens`: a chunk of new queries attends to its cached prefix wherever the
# blocks lie, with the bottom-right alignment of section 4 per sequence.
#
# The package's `flash_attention` takes all these layouts. Four prompts of 5, 40, 17 and 48
# tokens, packed; then the same keys scattered into a paged pool, with the queries being only the
# *last* few tokens of each (a chunk over a cached prefix):

# %%
generator = torch.Generator().manual_seed(1)
H_q, H_kv, D = 8, 2, 32  # the bundled model's attention shape: G = 4
prompt_lengths = [5, 40, 17, 48]
cu = torch.tensor([0, *np.cumsum(prompt_lengths)], dtype=torch.int32)
q = torch.randn(int(cu[-1]), H_q, D, generator=generator)
k = torch.randn(int(cu[-1]), H_kv, D, generator=generator)
v = torch.randn(int(cu[-1]), H_kv, D, generator=generator)
per_sequence = torch.cat([reference_attention(q[a:b], k[a:b], v[a:b], True, D ** -0.5)
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
for backend in ("torch", "triton"):
    on = "cpu" if backend == "torch" else device
    out = flash_attention(q.to(on), k.to(on), v.to(on), causal=True, cu_seqlens_q=cu.to(on), cu_seqlens_k=cu.to(on),
                          backend=backend).cpu()
    print(f"varlen, backend={backend:6s} vs per-sequence attention:",
          agreement((out.double() - per_sequence).abs().max()))
print(f"scores computed: packed Σ L² = {sum(n * n for n in prompt_lengths)}, "
      f"padded B·L_max² = {len(prompt_lengths) * max(prompt_lengths) ** 2}")

# Paged: the same keys in a pool of blocks of P = 16 tokens, in shuffled order; queries = the last 8 tokens.
P = 16
blocks_needed = [math.ceil(n / P) for n in prompt_lengths]
order = torch.randperm(sum(blocks_needed), generator=generator)
k_pool = torch.zeros(sum(blocks_needed), P, H_kv, D)
v_pool = torch.zeros_like(k_pool)
block_table = torch.zeros(len(prompt_lengths), max(blocks_needed), dtype=torch.int32)
used = 0
for b, (start, n) in enumerate(zip(cu[:-1].tolist(), prompt_lengths)):
    for j in range(blocks_needed[b]):
        block = int(order[used])
        used += 1
        block_table[b, j] = block
        rows = slice(start + j * P, start + min((j + 1) * P, n))
        k_pool[block, :rows.stop - rows.start] = k[rows]
        v_pool[block, :rows.stop - rows.start] = v[rows]
new = [min(8, n) for n in prompt_lengths]
q_new = torch.cat([q[start + n - m:start + n] for start, n, m in zip(cu[:-1].tolist(), prompt_lengths, new)])
cu_new = torch.tensor([0, *np.cumsum(new)], dtype=torch.int32)
paged = flash_attention(q_new, k_pool, v_pool, causal=True, cu_seqlens_q=cu_new, block_table=block_table,
                        seq_lens=torch.tensor(prompt_lengths, dtype=torch.int32), backend="torch")
dense_rows = torch.cat([per_sequence[start + n - m:start + n]
                        for start, n, m in zip(cu[:-1].tolist(), prompt_lengths, new)])
print(f"paged prefix, {new} new queries over {prompt_lengths} keys vs the full prefill's rows:",
      agreement((paged.double() - dense_rows).abs().max()))

# %% [markdown]
# The last check is the whole point of bottom-right alignment: the last 8 queries of a prompt,
# attending to a cached prefix through a shuffled block table, get exactly the rows they would
# have had in a prefill of the whole prompt. That is what lets chunked prefill (chapter 06) and
# the radix cache (chapter 08) skip recomputing a prefix without changing a single output.
#
# ## 6. A Triton kernel
#
# A Triton program works on whole tiles: `tl.load` of a `[BLOCK_N, D]` block of keys, `tl.dot` for
# a tile of scores on the tensor cores, `tl.max`/`tl.sum` along a row. Our teaching kernel serves
# one sequence: program `(tile, head)` computes `BLOCK_M` queries of one query head. The skeleton
# loads the query tile, sets up `m`, `l`, `acc`, and stores `acc / l` at the end; you write the
# body of the loop over key tiles. Two differences from exercise 9.2:
#
# * **`exp2` instead of `exp`.** GPUs compute $2^x$ natively; $e^x = 2^{x \log_2 e}$, so the kernel
#   receives `scale_log2 = scale · log2(e)` and uses `tl.exp2` throughout: the same numbers.
# * **A finite "minus infinity".** `m` starts at $-10^{30}$, not $-\infty$: then a row whose tile
#   is entirely masked gets $\alpha = 2^{0} = 1$ and $p = 2^{-\infty} = 0$, never `nan`.
#
# Keys of head `kv_head` sit at `k_head + key · stride_kt + d` (values likewise with `v_head`, same
# strides). Keys past the sequence's end (`key >= S`) must not be loaded (use `mask=` and
# `other=0.0`) and must get the score $-\infty$; with `CAUSAL`, so must keys after each row's
# position `pos`. Use `tl.dot(a, b, input_precision="ieee")` (exact float32, as the check compares
# with float64). On this machine the kernel runs in Triton's interpreter; on a GPU the same cell
# compiles it.
#
# ### Exercise 9.4 — the key loop of a Triton flash-attention kernel

# %% tags=["exercise"] exercise="9.4"
import triton
import triton.language as tl


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, L, S, G, scale_log2,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
                     CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     NUM_KV_TILES: tl.constexpr):
    """Program (tile, head): queries [tile·BLOCK_M, (tile+1)·BLOCK_M) of query head `head`.
    q, out: [L, H, D]; k, v: [S, H_kv, D] with the same strides; float32."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // G                            # GQA: G query heads share one KV head
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices of this tile
    row_ok = rows < L
    d = tl.arange(0, D)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    pos = S - L + rows                             # each query's position (bottom-right alignment)
    k_head = k_ptr + kv_head * stride_kh           # key j of this head: k_head + j * stride_kt + d
    v_head = v_ptr + kv_head * stride_kh
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)    # running max (log2 units), finite on purpose
    l = tl.zeros([BLOCK_M], tl.float32)            # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, D], tl.float32)       # unnormalised output
    for t in range(0, NUM_KV_TILES):
        n0 = t * BLOCK_N                           # this tile holds keys n0 … n0 + BLOCK_N - 1
        ### BEGIN SOLUTION
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < S
        k = tl.load(k_head + keys[:, None] * stride_kt + d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_head + keys[:, None] * stride_kt + d[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [BLOCK_M, BLOCK_N]
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
        ### END SOLUTION
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out, mask=row_ok[:, None])


# %% tags=["check"] exercise="9.4"
check.attention_kernel(attention_kernel)

# %% [markdown]
# The launcher gives one program per (query tile, query head). The package's kernel
# (`miniinfer/kernels/flash_attention_triton.py`) is the same loop with four additions you now
# know: varlen (`cu_seqlens`, grid axis per sequence), paged keys (a block-table lookup per key),
# **two loops** — unmasked tiles `[0, full)` then masked ones `[full, visited)`, exercise 9.3's
# bounds, so skipped tiles cost nothing and most tiles skip the mask arithmetic — and **GQA
# packing**: a program serves one KV head, and its rows are (query, head-of-the-group) pairs, so
# each K/V tile is loaded once for all $G$ heads. Here is yours next to it on the bundled model's
# shape:

# %%
from miniinfer.course.check.ch09_flash_attention import launch_attention_kernel

L_demo, S_demo = 21, 45
q_demo = torch.randn(L_demo, 8, 32, generator=generator)
k_demo = torch.randn(S_demo, 2, 32, generator=generator)
v_demo = torch.randn(S_demo, 2, 32, generator=generator)
expected = reference_attention(q_demo, k_demo, v_demo, True, 32 ** -0.5)
try:
    yours = launch_attention_kernel(attention_kernel, q_demo.to(device), k_demo.to(device), v_demo.to(device), True,
                                    32 ** -0.5).cpu()
    print("your kernel vs float64 attention:     ", agreement((yours.double() - expected).abs().max()))
except Exception as error:
    if unfinished_exercise(error) is None:
        raise
    print("⏳ Exercise 9.4 is not written yet")
theirs = flash_attention(q_demo.to(device), k_demo.to(device), v_demo.to(device), causal=True, backend="triton").cpu()
print("package's kernel vs float64 attention:", agreement((theirs.double() - expected).abs().max()))

# %% [markdown]
# ## 7. Plug it in: your blocked attention runs the engine's prefill
#
# `Components(attention=…)` (chapter 03) replaces the attention function of every layer, and the
# engine then runs its `"components"` attention backend: for every sequence of every step it
# gathers the sequence's keys and values from the paged pool and calls the function with the new
# queries, `causal=True`. We wrap your `blocked_attention` in that contract and count the score
# tiles it computes. A small token budget (`max_num_batched_tokens=20`) makes the engine cut the
# longer prompt into chunks, so later chunks attend to a cached prefix ($S > L$). Greedy decoding
# is deterministic: the text must be the default engine's, token for token (both on the CPU, in float32).

# %%
BLOCK_M, BLOCK_N = 16, 16
tile_counts = {"prefill": 0, "decode": 0}
call_shapes = []


def tiled_attention(q, k, v, *, causal=True, scale=None):
    """Components.attention's contract, q [B, L, H, D], k, v [B, S, H_kv, D], with your blocked attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kind = "decode" if q.shape[1] == 1 else "prefill"
    call_shapes.append((q.shape[1], k.shape[1]))

    def count(qt, kt, s):
        tile_counts[kind] += 1

    return torch.stack([blocked_attention(q[b], k[b], v[b], causal, scale, BLOCK_M, BLOCK_N, on_score_tile=count)
                        for b in range(q.shape[0])])


prompts = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name;\n"
           "Or, if thou wilt not, be but sworn my love, And I'll no longer be a Capulet.\n"]
greedy = SamplingParams(temperature=0.0, max_tokens=24)
default_llm = LLM(MODEL, device="cpu", num_kv_blocks=64, max_num_batched_tokens=20)
expected_outputs = default_llm.generate(prompts, greedy, use_tqdm=False)
student_llm = LLM(MODEL, device="cpu", num_kv_blocks=64, max_num_batched_tokens=20,
                  components=Components(attention=tiled_attention))
print("attention backends:", default_llm.engine.attention_backend, "→", student_llm.engine.attention_backend)
got_outputs = student_llm.generate(prompts, greedy, use_tqdm=False)
failed = [out.outputs[0].error for out in got_outputs if out.outputs[0].finish_reason == "error"]
if failed:  # the engine ends a request whose step raised, and runs on: say why here
    raise RuntimeError(f"a request failed inside the engine: {failed[0]}")
for prompt, e, g in zip(prompts, expected_outputs, got_outputs):
    print(f"--- identical token ids: {e.token_ids == g.token_ids}")
    print(prompt.split("\n")[0], "…" + g.text)
chunks = sorted({shape for shape in call_shapes if shape[0] > 1})
print("prefill calls (L new queries, S keys):", chunks)
print(f"score tiles computed: {tile_counts['prefill']} in prefill chunks, {tile_counts['decode']} in decode steps")

# %% [markdown]
# The prefill calls with $S > L$ are the chunks after the first: their queries sit after a cached
# prefix, read through the block table — section 5's bottom-right case, inside the engine. (On a
# GPU the engine does not call a Python function per sequence, of course: its prefill runs one of
# this chapter's kernels — Triton, CUDA or the flash-attn library, whichever measured fastest at
# start-up — over the whole packed batch, reading the cached prefix from the paged pool.)
#
# ## 8. FlashAttention 2, 3 and 4 on Hopper — and where our kernels stand
#
# The algorithm above is the one of **FlashAttention** (Dao et al., 2022), built on the online
# softmax (Milakov and Gimelshein, 2018; Rabe and Staats, 2021). What the later versions change is
# not the mathematics but how the work is laid onto the hardware.
#
# **FlashAttention-2** (Dao, 2023): fewer non-matmul FLOPs (the unnormalised accumulator, one
# division at the end); parallelism over **query tiles** as well as batch and heads, so a single
# long sequence fills the GPU; inside a thread block, warps split the *queries* rather than the
# keys, so they never exchange partial sums through shared memory; causal tile skipping. On an
# A100 it reaches 50–73 % of the tensor-core peak with `mma.sync`, `ldmatrix` and `cp.async`
# (asynchronous global→shared copies, double-buffered). On an H100 the same code stays around
# 35 %: Hopper's fastest tensor-core instructions need a different program structure.
#
# **FlashAttention-3** (Shah et al., 2024) is that structure, for Hopper (H100/H200):
#
# * **wgmma** — warpgroup-level MMA: four warps issue one large, *asynchronous* matrix multiply
#   whose operands come straight from shared memory; the warps can do other work while it runs.
# * **TMA** — the Tensor Memory Accelerator copies whole tiles between global and shared memory
#   from a descriptor, with no address arithmetic in the threads.
# * **Warp specialization** — a *producer* warpgroup only issues TMA loads of the next K/V tiles
#   into a ring of shared-memory buffers; *consumer* warpgroups only compute (and get more
#   registers, `setmaxnreg`).
# * **Ping-pong scheduling** — the exponentials are the bottleneck that remains: an H100 does
#   989 TFLOP/s of bf16 matmul but only about 3.9 T special-function operations per second (the
#   FA3 paper's numbers). Two consumer warpgroups alternate: one runs its softmax while the other
#   runs its GEMMs, and within a warpgroup the softmax of tile $j$ overlaps the GEMM of tile $j+1$.
# * FP8 with block scaling and "incoherent processing" (a random Hadamard rotation) to tame
#   outliers. Result: about 75 % of the H100's bf16 peak (~740 TFLOP/s).
#
# **FlashAttention-4** (2025, the `flash_attn.cute` package, written in Python over NVIDIA's CuTe
# DSL and compiled at first use; designed for Blackwell, with Hopper support) attacks the same
# exponential bottleneck, which gets worse when tensor cores double in speed and the
# special-function units do not:
#
# * **exp2 emulation** — part of the $2^x$ evaluations run on the ordinary FMA units as a
#   polynomial (split $x$ into integer and fraction, a short polynomial for $2^\text{fraction}$,
#   the integer added to the exponent bits), the rest on the special-function unit;
# * **lazy rescaling** — the rescale $\text{acc} \leftarrow \alpha \cdot \text{acc}$ is skipped unless
#   the running maximum grew by more than a threshold (e.g. $\log_2 256 = 8$ in log2 units). The
#   result stays exact, because $\ell$ and $\text{acc}$ are always relative to the *same* (stale)
#   maximum and the final division cancels it; the threshold only bounds how large $2^{s - m}$ may
#   grow (here $\le 256$), far from float32's limits. A separate warpgroup does the rescales that
#   remain, off the critical path.
#
# The lazy rule on section 2's drifting row: how many tiles need the rescale?

# %%
def count_rescales(scores, tile, threshold=0.0):
    """Tiles after the first whose accumulator must be rescaled: those whose maximum exceeds the maximum in
    use by more than `threshold` (natural-log units; 0 = every time the maximum grows)."""
    m_used, count = float(scores[:tile].max()), 0
    for start in range(tile, len(scores), tile):
        m_tile = float(scores[start:start + tile].max())
        if m_tile > m_used + threshold:
            m_used, count = m_tile, count + 1
    return count


long_row = (torch.randn(32768, generator=generator, dtype=torch.float64) * 2
            + torch.linspace(0, 8, 32768, dtype=torch.float64))
for name, scores in (("section 2's row (256 keys)", row_scores), ("a 32k-key row", long_row)):
    print(f"{name}: {len(scores) // 32} tiles of 32; rescales every time the max grows: {count_rescales(scores, 32)}, "
          f"lazy (threshold 8·ln 2): {count_rescales(scores, 32, 8 * math.log(2))}")

# %% [markdown]
# Our kernels on that map:
#
# | kernel | what it is | FA generation |
# |---|---|---|
# | `online_softmax.blocked_attention` (torch), your exercise 9.2 | the algorithm, one tile at a time, in Python | FA1/FA2 algorithm, no hardware mapping |
# | `flash_attention_triton.py` (Triton) | one program per (query tile, sequence, KV head); unnormalised accumulator, `exp2` with the scale folded in, unmasked and masked loops, causal skipping, GQA rows packed, varlen and paged | FA2's work partitioning. Triton lowers `tl.dot` to `wgmma` on Hopper and pipelines loads over `num_stages`, but the kernel has no explicit producer/consumer split or ping-pong |
# | `csrc/flash_attention.cu` (CUDA, `backend="cuda"`) | warp-level `mma.sync` (m16n8k16) fed by `ldmatrix`, K/V tiles double-buffered with `cp.async`, GQA heads packed into rows | FA2 on Ampere-era instructions; `wgmma` + TMA would be the step to FA3 |
# | `backend="flash_attn"` | the library itself: FA4 (`flash_attn.cute`) when importable, else FA2 | FA2 / FA4 |
#
# ## 9. Measure
#
# ### On this machine: memory
#
# The check of exercise 9.2 watches every tensor torch allocates; the same watcher measures the
# largest *score-like* tensor (no head-dim axis) of chapter 03's attention and of the tiled one, as
# the sequence grows ($H = 8$, $D = 48$, causal, tiles of 64). These are counts, not timings.

# %%
from miniinfer.course.check.ch09_flash_attention import TileGuard

H_m, D_m = 8, 48
memory_rows = []
for S_m in (128, 256, 512, 1024):
    q_m = torch.randn(S_m, H_m, D_m, generator=generator)
    k_m = torch.randn(S_m, 2, D_m, generator=generator)
    v_m = torch.randn(S_m, 2, D_m, generator=generator)
    sizes = {}
    for name, fn in (("naive (chapter 03)", lambda: grouped_query_attention(q_m[None], k_m[None], v_m[None])),
                     ("tiled, 64×64", lambda: package.blocked_attention(q_m, k_m, v_m, True, D_m ** -0.5, 64, 64))):
        with TileGuard(D_m) as guard:
            fn()
        sizes[name] = guard.largest_scores * 4  # float32 bytes
    memory_rows.append((S_m, sizes))
    print(f"S = {S_m:5d}: largest score tensor, naive {sizes['naive (chapter 03)'] / 2**20:7.2f} MiB, "
          f"tiled {sizes['tiled, 64×64'] / 2**10:.0f} KiB")

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, style in (("naive (chapter 03)", "o-"), ("tiled, 64×64", "s-")):
    ax.loglog([r[0] for r in memory_rows], [r[1][name] / 2**20 for r in memory_rows], style, label=name)
ax.set_xlabel("sequence length S (= L)")
ax.set_ylabel("largest score tensor (MiB)")
ax.set_title(f"Scores held at once, H={H_m}, float32", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ### On this machine: time
#
# On a CPU there is no small, fast memory under the program's control — the caches play that role,
# loosely — and a Python loop over tiles pays the interpreter's overhead on every tile. Three
# contenders at growing lengths: chapter 03's whole matrix, the package's tiled reference (which
# also skips the masked half of the causal work) and torch's fused CPU kernel
# (`scaled_dot_product_attention`). The tiled code is written for a GPU, where it is one kernel; on
# a CPU it is a readable reference. (Timings vary from machine to machine and run to run: this cell
# is not part of the answer key.)

# %% tags=["nbval-ignore-output", "skip-grading"]
from miniinfer.course.timing import best_ms

time_rows = []
for S_t in (128, 256, 512, 1024):
    q_t = torch.randn(S_t, H_m, D_m)
    k_t, v_t = torch.randn(S_t, 2, D_m), torch.randn(S_t, 2, D_m)
    q4, k4, v4 = q_t.transpose(0, 1)[None], k_t.transpose(0, 1)[None], v_t.transpose(0, 1)[None]
    time_rows.append((S_t, {
        "naive (chapter 03)": best_ms(lambda: grouped_query_attention(q_t[None], k_t[None], v_t[None]), repeat=3),
        "tiled torch, 128×128": best_ms(lambda: package.blocked_attention(q_t, k_t, v_t, True, D_m ** -0.5, 128, 128),
                                        repeat=3),
        "torch SDPA (fused)": best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q4, k4, v4, is_causal=True, enable_gqa=True), repeat=3),
    }))
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, style in (("naive (chapter 03)", "o-"), ("tiled torch, 128×128", "s-"), ("torch SDPA (fused)", "^-")):
    ax.loglog([r[0] for r in time_rows], [r[1][name] for r in time_rows], style, label=name)
ax.set_xlabel("sequence length S (= L)")
ax.set_ylabel("ms per call (best of 3)")
ax.set_title(f"Causal attention on this CPU, H={H_m}, H_kv=2, D={D_m}", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
for S_t, row in time_rows:
    print(f"S = {S_t:5d}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in row.items()))

# %% [markdown]
# ### On a GPU
#
# When this notebook runs on a CUDA machine, the next cell times our Triton kernel against torch's
# SDPA on the benchmark shape (causal, B 8, H 16, S 4096, D 128, bf16). Here it only says so.

# %% tags=["nbval-ignore-output", "skip-grading"]
if not torch.cuda.is_available():
    print("no CUDA GPU here: see the recorded H200 run below")
else:
    def gpu_ms(fn, repeat: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat

    B_g, H_g, S_g, D_g = 8, 16, 4096, 128
    q_g, k_g, v_g = (torch.randn(B_g, S_g, H_g, D_g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    causal_flops = 4 * B_g * H_g * S_g * S_g * D_g / 2
    contenders = {
        "triton (ours)": lambda: flash_attention(q_g, k_g, v_g, causal=True, backend="triton"),
        "cuda (ours)": lambda: flash_attention(q_g, k_g, v_g, causal=True, backend="cuda"),
        "torch SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(
            q_g.transpose(1, 2), k_g.transpose(1, 2), v_g.transpose(1, 2), is_causal=True),
    }
    for name, fn in contenders.items():
        try:
            ms = gpu_ms(fn)
        except Exception as error:  # noqa: BLE001 - e.g. the CUDA extension cannot be built here
            print(f"{name:>14s}: unavailable ({type(error).__name__}: {str(error)[:120]})")
            continue
        print(f"{name:>14s}: {ms:6.2f} ms, {causal_flops / ms / 1e9:6.1f} TFLOP/s on {torch.cuda.get_device_name()}")

# %% [markdown]
# ### On an H200
#
# `benchmarks/flash_attention.py --gpu` times every backend on the shape (causal, B 8,
# H 16, S 4096, D 128, bf16) next to torch's SDPA (its FlashAttention-2 and cuDNN back ends),
# sweeps S from 1k to 32k for D 64 and 128, causal and not, and records a packed varlen prefill
# and the engine's time to first token on a long prompt. Attention FLOPs are counted as
# $4 B H L S D$, halved when causal.

# %%
import json

from miniinfer.course.results import caption, load_result, results_dir

record = load_result("flash_attention", device="cuda")
if record is None and (results_dir() / "flash_attention_h200.json").exists():
    record = json.loads((results_dir() / "flash_attention_h200.json").read_text())
recorded = record is not None and not record.get("placeholder") and record.get("sweep", {}).get("rows")
if not recorded:
    print("GPU results not yet recorded: run `python benchmarks/flash_attention.py --gpu` on a CUDA machine "
          "(the chapter plots benchmarks/results/flash_attention_h200.json)")
else:
    print(caption(record))
    shape_rows = {row["backend"]: row for row in record["causal_b8_h16_s4096_d128"]["rows"] if row.get("tflops")}
    baseline = shape_rows.get("sdpa_flash", {}).get("tflops")
    for backend, row in shape_rows.items():
        versus = f"  ({row['tflops'] / baseline:.2f}× SDPA-flash)" if baseline else ""
        print(f"  causal B8 H16 S4096 D128, {backend:>12s}: {row['ms']:7.3f} ms, {row['tflops']:6.1f} TFLOP/s{versus}")
    sweep = record["sweep"]["rows"]
    backends = list(dict.fromkeys(r["backend"] for r in sweep))
    head_dims = sorted({r["D"] for r in sweep})
    fig, axes = plt.subplots(1, len(head_dims), figsize=(5.5 * len(head_dims), 3.8), squeeze=False)
    for ax, D_s in zip(axes[0], head_dims):
        for index, backend in enumerate(backends):
            for causal, style in ((True, "-"), (False, "--")):
                points = sorted((r["S"], r["tflops"]) for r in sweep
                                if r["backend"] == backend and r["D"] == D_s and bool(r["causal"]) == causal
                                and r.get("tflops"))
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=3, color=f"C{index}",
                            label=backend if causal else None)
        ax.set_xscale("log", base=2)
        lengths_swept = sorted({r["S"] for r in sweep})
        ax.set_xticks(lengths_swept, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths_swept])
        ax.set_xlabel("sequence length S")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"D = {D_s}: solid causal, dashed non-causal", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(caption(record), fontsize=8)
    fig.tight_layout()
    for section in ("varlen", "engine_ttft"):
        details = record.get(section) or {}
        rows = details.get("rows", []) if isinstance(details, dict) else []
        others = {k: v for k, v in details.items() if k != "rows"} if isinstance(details, dict) else {}
        if rows or others:
            print(f"{section}:", ", ".join(f"{k}={v}" for k, v in others.items()))
            for row in rows:
                print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

# %% [markdown]
# How to read the recorded run (the numbers above are the run's own; the pattern is what matters):
#
# * **SDPA-flash** is torch's bundled FlashAttention-2: an Ampere-era design that leaves Hopper's
#   `wgmma` and TMA unused, so it plateaus around a third of the H200's peak. Our **Triton** kernel
#   has the same FA2 structure, but Triton's compiler emits Hopper instructions for `tl.dot`, and
#   the kernel skips masks and whole tiles as in section 4: it edges past SDPA-flash.
# * **cuDNN** (NVIDIA's own kernels) and **FA4** are built for Hopper and later, with the techniques
#   of section 8 (`wgmma`, TMA, warp specialization, the softmax overlapped with the matrix
#   multiplies). They pull ahead as S grows: that is where the remaining factor lives.
# * Our **CUDA** kernel uses `mma.sync` with `ldmatrix` and `cp.async`, FA2 on Ampere-era
#   instructions, and trails: on Hopper those instructions cannot reach the `wgmma` rate.
# * Throughput climbs with S: short sequences have fewer key tiles per program to amortise loading
#   the query tile and writing the output, and (causal) a larger share of masked diagonal tiles.
# * The **varlen** rows compare one packed call with SDPA on the same prompts padded to the longest:
#   packing skips the padding's work entirely, which no kernel speed-up can match.
#
# ## Summary
#
# * Naive attention writes and reads an $L \times S$ matrix: $O(S^2)$ memory traffic at an
#   arithmetic intensity of about $D / b$ FLOPs per byte — memory-bound on any modern GPU.
# * A set of keys is summarised by $(m, \ell, o)$; two summaries **merge exactly** after rescaling
#   both to the larger maximum. So keys can be visited one tile at a time — the **online softmax**.
# * Flash attention keeps one $B_m \times B_n$ score tile on chip, an unnormalised accumulator per
#   query, one rescale per tile and one division at the end. GQA reads each K/V tile once per group.
# * **Causal**: tiles past the last query's position are skipped, tiles before the first query's
#   position need no mask; with a cached prefix the diagonal moves right (bottom-right alignment).
# * **Varlen** and **paged** layouts let one kernel serve a packed batch of prompts, each over its
#   cached prefix — the engine's prefill, chunked prefill and prefix-cache hits.
# * FA2 → FA3 → FA4 keep the algorithm and change the mapping: query-tile parallelism; then
#   Hopper's wgmma, TMA, warp specialization and ping-pong softmax; then exp2 emulation and lazy
#   rescaling against the exponential bottleneck.
#
# **Going further** (no checks):
#
# 1. Add `causal_key_tiles` to your blocked attention (two loops: unmasked, then masked tiles) and
#    count the masked tiles of a causal prefill against the tiles you computed before.
# 2. Make your Triton kernel skip the tiles past the diagonal (`if t * BLOCK_N <= last position`)
#    and serve several query heads of a group per program, as the package's kernel does. How many
#    K/V loads does that save for the bundled model ($G = 4$)?
# 3. Implement FA4's lazy rescaling in `blocked_attention`: keep the stale maximum unless a tile's
#    maximum exceeds it by more than 8·ln 2. Check that the output does not change, and count the
#    rescales on a causal prefill of real model scores (use `on_score_tile`).
# 4. Split-KV decoding: for one query over 32k keys, split the keys into 8 parts, compute each
#    part's $(o, m, \ell)$ independently and merge them with your `merge_partials` in a tree. Why
#    does a GPU need this for batch-1 decode but not for prefill?
# 5. Write a backward pass for one tile: what must the forward save (hint: $m + \log \ell$ per
#    query, the log-sum-exp) so that the backward can recompute $p$ instead of storing it?
