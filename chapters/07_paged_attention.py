# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 07 — Paged attention
#
# **What you will build.** The memory system of a serving engine. Instead of giving every request
# one contiguous slab of KV cache as long as the longest possible context, the engine cuts the
# cache into small fixed-size **blocks** and gives each request a **block table** — the list of
# its blocks — exactly as an operating system pages virtual memory. You will measure how much
# memory that saves, write the **slot mapping** (where a token's keys and values go), the **paged
# decode attention** that reads them back through the block table, and the **copy-on-write** rule
# that lets parallel samples share a prompt. Then you will watch the engine preempt requests when
# its pool runs dry, and read the Triton and CUDA kernels that do paged attention on a GPU.
#
# **What you need.** Chapter 03 (grouped-query attention), chapter 05 (the KV cache: prefill
# writes it, each decode step appends one token and attends to all of it) and chapter 06 (the
# engine's scheduler, `num_computed_tokens`, chunked prefill). The package code this chapter
# teaches is `miniinfer/engine/block_manager.py`, `miniinfer/engine/attention_context.py` and
# `miniinfer/kernels/paged_attention*.py`.

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import miniinfer.kernels  # noqa: F401  (on a machine without a GPU this sets TRITON_INTERPRET=1 before Triton loads)
from miniinfer import LLM, SamplingParams, bundled_model_path
from miniinfer.engine import EngineHooks
from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.sequence import Sequence

torch.manual_seed(0)
torch.set_num_threads(1)  # a 4 M-parameter model: one thread is as fast, and steady when the cores are shared
MODEL = bundled_model_path("shakespeare")

# %% [markdown]
# ## 1. How much memory does a request need?
#
# Every layer stores a key and a value vector for every token of every sequence: $H_{kv}$ heads of
# $D$ numbers each. One token therefore costs
#
# $$ \text{bytes per token} = 2 \cdot n_\text{layers} \cdot H_{kv} \cdot D \cdot s, $$
#
# with $s$ the bytes per number. For our 6-layer Shakespeare model in float32 that is small; for a
# 7-billion-parameter model in bfloat16 it is around 56 KiB — a 4096-token conversation holds
# about 230 MB (224 MiB) of keys and values, about 0.3 % of an 80 GB GPU for a single request. That
# sounds small until you count requests: the ~65 GB the weights leave free hold fewer than 300 such
# conversations, and a server wants to run as many at once as it can.

# %%
llm_config = LLM(MODEL, num_kv_blocks=64).config


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_number: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_number


ours = kv_bytes_per_token(llm_config.num_hidden_layers, llm_config.num_key_value_heads, llm_config.head_dim, 4)
seven_b = kv_bytes_per_token(28, 4, 128, 2)  # Qwen2.5-7B: 28 layers, H_kv = 4, D = 128, bfloat16
print(f"bundled model (fp32): {ours:,} bytes per token; 1024 tokens = {ours * 1024 / 2**20:.1f} MiB")
print(f"a 7B model (bf16):    {seven_b:,} bytes per token; 4096 tokens = {seven_b * 4096 / 2**20:.0f} MiB")

# %% [markdown]
# ### Fragmentation: reserving for the worst case
#
# The simple layout of chapter 05 is a tensor `[B, L_max, H_kv, D]` per layer: each request
# reserves room for the longest context `L_max` when it starts, because nobody knows in advance
# how long its answer will be. Real requests are mostly much shorter than `L_max` — lengths in
# chat and API traffic are heavy-tailed, roughly **lognormal**: many short requests, a few very
# long ones. The reserved-but-unused memory is wasted, and it limits how many requests fit at once.
#
# A paged layout reserves memory in blocks of $P$ tokens, one block at a time as the sequence
# grows. A sequence of length $n$ holds $\lceil n / P \rceil$ blocks, so it wastes at most $P - 1$
# slots, on average about $(P-1)/2$. The fraction of KV memory holding real tokens is
#
# $$ u_\text{contiguous} = \frac{\sum_i n_i}{N \cdot L_\text{max}}, \qquad
#    u_\text{paged}(P) = \frac{\sum_i n_i}{\sum_i P \lceil n_i / P \rceil}
#    \approx \frac{\bar n}{\bar n + (P-1)/2}. $$
#
# We draw a realistic population: prompts with a median of 300 tokens and answers with a median of
# 150 (lognormal, σ = 1), capped at `L_max` = 4096, and look at the server at a random moment, when
# each request has produced a random fraction of its answer.

# %%
rng = np.random.default_rng(0)
L_MAX = 4096
N = 10_000
prompt_lengths = rng.lognormal(np.log(300), 1.0, N)
output_lengths = rng.lognormal(np.log(150), 1.0, N)
lengths = np.minimum(prompt_lengths + rng.uniform(0, 1, N) * output_lengths, L_MAX).astype(int) + 1

block_sizes = [1, 4, 8, 16, 32, 64, 128, 256, 512]
contiguous = lengths.sum() / (N * L_MAX)
paged = [lengths.sum() / (P * np.ceil(lengths / P)).sum() for P in block_sizes]
approx = [lengths.mean() / (lengths.mean() + (P - 1) / 2) for P in block_sizes]

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
left.hist(lengths, bins=np.logspace(0, np.log10(L_MAX), 50), color="C0")
left.axvline(L_MAX, color="k", linestyle="--", label=f"L_max = {L_MAX} (reserved per request)")
left.axvline(np.median(lengths), color="C1", label=f"median = {np.median(lengths):.0f}")
left.set_xscale("log")
left.set_xlabel("tokens in the KV cache of one request")
left.set_ylabel("requests")
left.set_title("Lengths at a random moment (lognormal)")
left.legend(fontsize=8)
right.plot(block_sizes, [100 * u for u in paged], "o-", label="paged, block size P")
right.plot(block_sizes, [100 * u for u in approx], ":", color="grey", label=r"$\bar n / (\bar n + (P-1)/2)$")
right.axhline(100 * contiguous, color="C3", linestyle="--", label="contiguous, L_max per request")
right.set_xscale("log", base=2)
right.set_xlabel("block size P (tokens)")
right.set_ylabel("KV memory holding real tokens (%)")
right.set_ylim(0, 105)
right.set_title("Fraction of KV memory in use")
right.legend(fontsize=8, loc="center right")
fig.tight_layout()

print(f"mean length {lengths.mean():.0f} tokens, L_max {L_MAX}")
print(f"contiguous: {100 * contiguous:.1f} % of the reserved memory holds tokens")
for P, u in zip(block_sizes, paged):
    print(f"paged P={P:>3}: {100 * u:5.1f} %   ({u / contiguous:4.1f}x as many requests in the same memory)")

# %% [markdown]
# With `L_max`-sized reservations about 15 % of the memory holds tokens; with blocks of 16 (the
# engine's default, and vLLM's) about 99 % does, so six to seven times as many requests fit. Blocks
# too large waste memory again (a 512-token block is mostly empty for a 300-token request); blocks
# too small make the block tables long and the kernels' reads short and scattered. 16 to 64 is
# the usual compromise. That is the whole argument of the vLLM paper (Kwon et al., 2023,
# *Efficient Memory Management for Large Language Model Serving with PagedAttention*).

# %% [markdown]
# ## 2. Blocks, block tables and slots
#
# The engine's KV cache for one layer is a single tensor `[num_blocks, P, H_kv, D]`: a **pool** of
# blocks. `BlockManager` owns the block ids: a free list, and a reference count per block. A
# sequence's **block table** lists its blocks in position order, so the token at position `pos`
# lives in block `block_table[pos // P]`, at row `pos % P`. Blocks are taken from the free list
# when a sequence needs one and returned when it finishes, so the blocks of one sequence are
# scattered over the pool — which no longer matters, because everything goes through the table.
#
# Let us run the allocator by hand with $P = 4$: three requests arrive, decode a few tokens in
# turns (each allocation takes the next free block), the second one finishes, and a fourth
# request gets its blocks.

# %%
P = 4
manager = BlockManager(num_blocks=10, block_size=P)
requests = {name: Sequence(name, list(range(n)), SamplingParams()) for name, n in [("A", 6), ("B", 9), ("C", 3)]}
for seq in requests.values():  # prefill: every prompt gets its blocks
    manager.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
for _ in range(4):  # four decode steps, round robin: one new token each
    for seq in requests.values():
        manager.allocate(seq, 1)
        seq.token_ids.append(0)
        seq.num_computed_tokens += 1
manager.free(requests.pop("B"))  # B finishes: its blocks go back to the free list
requests["D"] = Sequence("D", list(range(11)), SamplingParams())
manager.allocate(requests["D"], 11)
requests["D"].num_computed_tokens = 11
for name, seq in requests.items():
    print(f"{name}: {seq.num_computed_tokens:2d} tokens, block table {seq.block_table}")
print("free blocks:", list(manager.free_blocks))


# %%
def draw_block_tables(tables: dict, lengths: dict, num_blocks: int, block_size: int, ref_counts=None, title=""):
    """Figure: each sequence's block table (top) pointing into the pool of physical blocks (bottom).

    A pool column is one block of block_size slots; filled slots are solid in the owner's colour,
    reserved but unused slots are pale, blocks shared by several sequences are hatched."""
    names = list(tables)
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    owners: dict[int, list[str]] = {}
    for name in names:
        for block in tables[name]:
            owners.setdefault(block, []).append(name)
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.55 * len(names)))
    cell = 1.0 / block_size
    for block in range(num_blocks):
        holders = owners.get(block, [])
        for row in range(block_size):
            colour, alpha, hatch = "white", 1.0, None
            if holders:
                name = holders[0]
                index = tables[name].index(block)
                filled = index * block_size + row < lengths[name]
                colour, alpha = colours[name], 0.9 if filled else 0.25
                hatch = "///" if len(holders) > 1 else None
            ax.add_patch(plt.Rectangle((block, 1 - (row + 1) * cell), 0.9, cell, facecolor=colour, alpha=alpha,
                                       edgecolor="grey" if block_size <= 8 else "none", hatch=hatch, linewidth=0.5))
        ax.add_patch(plt.Rectangle((block, 0), 0.9, 1, facecolor="none", edgecolor="grey", linewidth=0.8))
        label = str(block) if ref_counts is None else f"{block}\nref {ref_counts[block]}"
        ax.text(block + 0.45, -0.08, label, ha="center", va="top", fontsize=7)
    for i, name in enumerate(names):
        y = 1.9 + 0.75 * i
        ax.text(-0.3, y + 0.25, f"{name} ({lengths[name]} tok)", ha="right", va="center", fontsize=9)
        for j, block in enumerate(tables[name]):
            x = j * 1.05
            ax.add_patch(plt.Rectangle((x, y), 0.95, 0.5, facecolor=colours[name], alpha=0.5, edgecolor="black"))
            ax.text(x + 0.475, y + 0.25, str(block), ha="center", va="center", fontsize=8)
            ax.annotate("", xy=(block + 0.45, 1.02), xytext=(x + 0.475, y),
                        arrowprops=dict(arrowstyle="->", color=colours[name], alpha=0.6, lw=0.8))
    ax.text(-0.3, 0.5, f"pool\n(P = {block_size})", ha="right", va="center", fontsize=9)
    ax.set_xlim(-2.6, num_blocks + 0.2)
    ax.set_ylim(-0.45, 1.9 + 0.75 * len(names) + 0.1)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()


draw_block_tables({n: s.block_table for n, s in requests.items()},
                  {n: s.num_computed_tokens for n, s in requests.items()}, manager.num_blocks, P,
                  title="Block tables (top: logical block j of each sequence) → physical blocks of the pool (bottom)")


# %% [markdown]
# Each request wastes at most $P - 1$ slots (the pale ones). D got the last block never used and
# then blocks that B gave back, wherever they were; the white blocks are free (their old contents
# are still there, and harmless: nothing reads a slot that no block table points to).
#
# ### Exercise 7.1 — the slot mapping
#
# Attention kernels see the pool of one layer as a flat array of **slots**, `[num_blocks · P,
# H_kv, D]`: slot `block · P + offset` is row `offset` of block `block`. Before every step the
# model runner asks the block manager for the slots of the tokens it is about to compute, and
# `write_kv` stores each new token's key and value at its slot.
#
# Write `slot_mapping(block_table, start, end, block_size)`: the slots of positions
# `start … end-1` (a prefill chunk, or a single decoding token) of a sequence with that block
# table. The engine's `BlockManager.slots` calls it through `EngineHooks(slot_mapping=…)`.

# %% tags=["exercise"] exercise="7.1"
def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat slot ids (block * P + offset) of positions start … end-1; P = block_size."""
    # YOUR CODE HERE (Exercise 7.1)
    raise NotImplementedError("Exercise 7.1: implement `slot_mapping`")


# %% tags=["check"] exercise="7.1"
from miniinfer.course import check

check.slot_mapping(slot_mapping)


# %% [markdown]
# ## 3. Attention through a block table
#
# At a decode step every sequence $b$ has one new query per head, $q_{b,h} \in \mathbb{R}^D$, and
# `seq_lens[b]` = $S_b$ keys and values in the pool (the new token's own included: the engine
# writes it first). Its key at position $s$ is
# $k_{b,s} = \text{K}[\,\text{block\_tables}[b, \lfloor s/P \rfloor],\; s \bmod P\,]$, and with
# grouped-query attention query head $h$ reads KV head $\lfloor h / G \rfloor$, $G = H / H_{kv}$:
#
# $$ o_{b,h} = \sum_{s=0}^{S_b - 1} \operatorname{softmax}_s\!\Big( \text{scale}\cdot q_{b,h} \cdot
#    k_{b,s,\lfloor h/G \rfloor} \Big)\, v_{b,s,\lfloor h/G \rfloor}. $$
#
# Two things differ from chapter 03. The keys of a sequence are not contiguous: you **gather** them
# through the block table. And the batch is ragged: every sequence has its own length, so you
# must not read past `seq_lens[b]` — the rest of its last block holds stale values from an
# earlier owner, and the entries of `block_tables[b]` past its last block are padding.
#
# ### Exercise 7.2 — paged decode attention in torch
#
# Write `paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)`:
# `q [B, H, D]`, caches `[num_blocks, P, H_kv, D]`, `block_tables [B, M]` int32, `seq_lens [B]`
# int32 → `[B, H, D]` in q's dtype (compute in float32). A loop over the batch is fine; inside it,
# use tensor operations. This is the signature of the package's reference,
# `miniinfer.kernels.paged_attention.paged_decode_attention_torch`; the engine calls your function
# for every decode step through `EngineHooks(paged_decode_attention=…)`. The check compares with
# SDPA on the keys and values laid out densely, with garbage in every slot no sequence owns.

# %% tags=["exercise"] exercise="7.2"
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D]; k_cache, v_cache [num_blocks, P, H_kv, D]; block_tables [B, M]; seq_lens [B] -> [B, H, D]."""
    # YOUR CODE HERE (Exercise 7.2)
    raise NotImplementedError("Exercise 7.2: implement `paged_decode_attention`")


# %% tags=["check"] exercise="7.2"
check.paged_decode_attention(paged_decode_attention)


# %% [markdown]
# ### Prefill through a block table: new tokens after a cached prefix
#
# A decode step adds one token per sequence. A **prefill** step adds $L$ tokens to one sequence at
# once: a whole prompt, a chunk of one (chapter 06), or — with a prefix cache (chapter 08) — the part
# of a prompt that follows blocks another request already computed. Say $c$ tokens of the sequence
# are in the pool already (`num_computed_tokens`; with a prefix cache, a multiple of $P$) and the
# new ones sit at positions $c, \dots, c+L-1$. The engine first writes the new keys and values into
# their slots (the slot mapping of exercise 7.1), so the sequence now owns $S = c + L$ keys; then
# new token $i$, at position $c + i$, attends to
#
# $$ o_{i,h} = \sum_{s=0}^{c+i} \operatorname{softmax}_s\!\Big( \text{scale}\cdot q_{i,h} \cdot
#    k_{s,\lfloor h/G \rfloor} \Big)\, v_{s,\lfloor h/G \rfloor}: $$
#
# every cached key ($s < c$, gathered through the block table exactly as in a decode step) and the
# new keys up to its own position — the causal mask of chapter 03 for queries that come *after*
# cached keys (exercise 3.2), laid over a block table. A fresh prompt is the case $c = 0$; a decode
# step is $L = 1$. The prefix is never recomputed, only read: that is what makes a prefix-cache hit
# (chapter 08) or the next chunk of a long prompt cheap. The engine runs all of a step's prefills in
# one call, their queries packed as in chapter 06 (`cu_seqlens_q`), with `seq_lens[b]` $= c_b + L_b$;
# the torch reference is `miniinfer.kernels.paged_attention.paged_prefill_attention_torch`.

# %%
def plot_paged_prefill(P: int = 4, cached: int = 8, new: int = 5, table=(7, 2, 9, 4)) -> None:
    """Which keys each new token sees in a paged prefill: a cached prefix plus causal new tokens."""
    S = cached + new
    visible = np.arange(S)[None, :] <= (cached + np.arange(new))[:, None]  # [new, S]
    picture = np.where(visible, np.where(np.arange(S) < cached, 1, 2), 0)[:, :, None]
    colors = np.array([[0.93, 0.93, 0.93], [0.55, 0.70, 0.90], [0.95, 0.62, 0.35]])
    fig, ax = plt.subplots(figsize=(8, 2.9))
    ax.imshow(colors[picture[..., 0]], aspect="auto")
    for boundary in range(P, S, P):
        ax.axvline(boundary - 0.5, color="black", linewidth=1.5)
    for block in range(-(-S // P)):
        ax.text(block * P + (min(P, S - block * P) - 1) / 2, -0.9, f"block {table[block]}", ha="center", fontsize=9)
    ax.set_xticks(range(S), [str(s) for s in range(S)])
    ax.set_yticks(range(new), [f"new token at {cached + i}" for i in range(new)])
    ax.set_xlabel(f"key position s (P = {P}: position s lives in block_table[s // P], row s % P)")
    ax.set_ylim(new - 0.5, -1.5)
    ax.plot([], [], "s", color=colors[1], label=f"cached prefix, read only ({cached} tokens)")
    ax.plot([], [], "s", color=colors[2], label=f"new tokens, causal among themselves ({new})")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.95)
    ax.set_title("A paged prefill: every new token sees the whole cached prefix and the new tokens up to itself")
    fig.tight_layout()


plot_paged_prefill()

# %% [markdown]
# ### Plug them in
#
# `EngineHooks` is the explicit list of engine functions you may replace. Here the engine maps
# slots with your `slot_mapping` and runs every decode step's attention with your
# `paged_decode_attention` (prefill steps use the package's prefill kernel). Greedy decoding must
# give exactly the text the package's own functions give.

# %%
prompts = ["ROMEO:\nBut soft, what light", "KING HENRY:\nOnce more unto the breach"]
greedy = SamplingParams(temperature=0.0, max_tokens=40)
package_llm = LLM(MODEL, num_kv_blocks=64)
your_llm = LLM(MODEL, num_kv_blocks=64,
               hooks=EngineHooks(slot_mapping=slot_mapping, paged_decode_attention=paged_decode_attention))
expected = package_llm.generate(prompts, greedy, use_tqdm=False)
got = your_llm.generate(prompts, greedy, use_tqdm=False)
for prompt, mine, theirs in zip(prompts, got, expected):
    print(prompt + mine.text)
    print(f"--- identical to the package's output: {mine.token_ids == theirs.token_ids}\n")

# %% [markdown]
# ## 4. Sharing blocks: parallel sampling and copy-on-write
#
# With `SamplingParams(n=3)` the engine computes the prompt **once** and then forks three
# sequences that share its blocks: `BlockManager.fork` copies the block table and increments each
# block's reference count. Full blocks can be shared forever — nobody writes into them again. The
# last prompt block is usually only partly filled, though, and each sibling is about to write its
# own next token into it. Writing in place would overwrite the other siblings' keys; so the first
# sibling to write gets a **private copy** of that block (copy-on-write, as after a Unix `fork`).
# `BlockManager.allocate` decides and records the copy in `pending_copies`; the model runner, which
# owns the KV tensors, copies the block (in every layer) before the next forward.
#
# We step the engine by hand to see it: a 21-token prompt, blocks of 16, three samples. (The prefix
# cache of chapter 08 would hold one more reference on the full block; we switch it off here.)

# %%
llm = LLM(MODEL, num_kv_blocks=64, block_size=16, enable_prefix_caching=False)
engine = llm.engine
juliet = ("JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n"
          "Or, if thou wilt not, be but sworn my love,\nAnd I'll no longer be a Capulet.")
prompt_ids = llm.tokenizer.encode(juliet)[:21]
engine.add_request(prompt_ids, SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=20))


def snapshot(engine):
    seqs = sorted(engine.scheduler.running, key=lambda s: s.index)
    tables = {f"sample {s.index}": list(s.block_table) for s in seqs}
    lengths = {f"sample {s.index}": s.num_computed_tokens for s in seqs}
    return tables, lengths, list(engine.block_manager.ref_counts)


engine.step()  # prefill the prompt, sample the first tokens, fork the siblings
forked = snapshot(engine)
engine.step()  # each sibling writes its first sampled token: copy-on-write of the shared last block
after = snapshot(engine)
for name in forked[0]:
    print(f"{name}: after the fork {forked[0][name]}  →  after its first write {after[0][name]}")
print("reference counts of the prompt's blocks after the fork:", [forked[2][b] for b in forked[0]["sample 0"]])

# %%
draw_block_tables(*forked[:2], num_blocks=8, block_size=16, ref_counts=forked[2],
                  title="After the fork: three samples share both prompt blocks (hatched, ref 3)")
draw_block_tables(*after[:2], num_blocks=8, block_size=16, ref_counts=after[2],
                  title="After one decode step: the partly filled block was copied for two samples")


# %% [markdown]
# The full first block stays shared by all three (reference count 3) for their whole lives. The
# partly filled second block was copied for two samples; the third, by then its only holder,
# writes in place. Memory used: 4 blocks instead of the 6 that three independent requests need,
# and the prompt was computed once (`prefill_tokens_computed` counts 21, not 63).
#
# ### Exercise 7.3 — the copy-on-write decision
#
# Write the rule `BlockManager` applies before a sequence writes its next token, at position
# `num_computed_tokens`: `needs_copy_on_write(block_table, num_computed_tokens, block_size,
# ref_counts) -> bool`. A copy is needed only when that position falls *inside* a block the
# sequence already has (not at offset 0, where a fresh block starts) and that block is shared
# (reference count above 1). The engine asks through `EngineHooks(needs_copy_on_write=…)`.

# %% tags=["exercise"] exercise="7.3"
def needs_copy_on_write(block_table: list[int], num_computed_tokens: int, block_size: int,
                        ref_counts: list[int]) -> bool:
    """True when position num_computed_tokens lands inside a shared, partly filled block of block_table."""
    # YOUR CODE HERE (Exercise 7.3)
    raise NotImplementedError("Exercise 7.3: implement `needs_copy_on_write`")


# %% tags=["check"] exercise="7.3"
check.needs_copy_on_write(needs_copy_on_write)

# %% [markdown]
# Plugged in, with a wrapper that remembers the blocks it decided to copy: three samples from
# the same prompt, each from its own random stream, equal to what the package's rule produces.

# %%
copied = set()


def logged_needs_copy_on_write(block_table, num_computed_tokens, block_size, ref_counts):
    decision = needs_copy_on_write(block_table, num_computed_tokens, block_size, ref_counts)
    if decision:
        copied.add(block_table[num_computed_tokens // block_size])
    return decision


sampling = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=30)
yours = LLM(MODEL, num_kv_blocks=64, hooks=EngineHooks(needs_copy_on_write=logged_needs_copy_on_write))
mine = yours.generate([prompt_ids], sampling, use_tqdm=False)[0]
theirs = LLM(MODEL, num_kv_blocks=64).generate([prompt_ids], sampling, use_tqdm=False)[0]
for completion, reference in zip(mine.outputs, theirs.outputs):
    # The sampled text itself depends on the CPU's float rounding (a near-tie can flip a token), so
    # the answer key prints what must hold everywhere: your rule reproduces the package token for token.
    print(f"sample {completion.index}: {len(completion.token_ids)} tokens, same as the package: "
          f"{completion.token_ids == reference.token_ids}")
print(f"shared blocks your rule had copied: {sorted(copied)}; "
      f"prompt tokens computed: {yours.stats()['prefill_tokens_computed']}")

# %% [markdown]
# ## 5. When the pool runs out: preemption
#
# Blocks are handed out as sequences grow, so the engine can admit far more requests than
# worst-case reservations allow — and occasionally a growing sequence finds the pool empty. The
# scheduler (chapter 06) then first evicts unused prefix-cache blocks (chapter 08), and if that is
# not enough it **preempts** the most recently admitted running sequence: frees all its blocks and
# puts it back at the front of the waiting queue. When it is readmitted its prompt *and* the tokens
# it had generated are recomputed (a prefill), so its output is unchanged — only time is lost.
#
# Six short prompts that each generate 60 tokens need about 24 blocks of 16 in all; we give the
# engine 10 (and no prefix cache, so that a preempted sequence really recomputes everything).

# %%
story = ["ROMEO:", "JULIET:", "HAMLET:", "MACBETH:", "OTHELLO:", "PORTIA:"]
params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
tiny = LLM(MODEL, num_kv_blocks=10, block_size=16, enable_prefix_caching=False)
history = []
for text in story:
    tiny.engine.add_request(text, params)
results = {}
while tiny.engine.has_unfinished_requests():
    for output in tiny.engine.step():
        if output.finished:
            results[output.request_id] = output.token_ids
    stats = tiny.stats()
    history.append((stats["kv_blocks_used"], stats["num_running"], stats["num_waiting"], stats["num_preemptions"]))

roomy_llm = LLM(MODEL, num_kv_blocks=200, enable_prefix_caching=False)
roomy = roomy_llm.generate(story, params, use_tqdm=False)
print("stats:", {k: v for k, v in tiny.stats().items() if k in ("kv_blocks_total", "kv_blocks_free", "num_preemptions",
                                                                  "prompt_tokens", "prefill_tokens_computed",
                                                                  "recomputed_tokens")})
print("outputs equal to a roomy pool's:", [results[str(i)] for i in range(len(story))] == [o.token_ids for o in roomy])
print(f"engine steps: {tiny.stats()['num_steps']} with 10 blocks, {roomy_llm.stats()['num_steps']} with 200")

used, running, waiting, preemptions = map(np.array, zip(*history))
fig, ax = plt.subplots(figsize=(9, 3.4))
steps = np.arange(1, len(history) + 1)
ax.step(steps, used, where="post", label="KV blocks in use (of 10)")
ax.step(steps, running, where="post", label="running sequences")
ax.step(steps, waiting, where="post", label="waiting sequences")
for step in steps[np.flatnonzero(np.diff(preemptions, prepend=0))]:
    ax.axvline(step, color="C3", alpha=0.4, linewidth=1)
ax.plot([], [], color="C3", alpha=0.4, label="a preemption")
ax.set_xlabel("engine step")
ax.set_title("A pool of 10 blocks for 6 requests: the scheduler preempts and recomputes")
ax.legend(fontsize=8, ncol=2)
fig.tight_layout()

# %% [markdown]
# The pool stays nearly full the whole time — that is the point of paging — and the vertical
# lines mark the steps where a sequence had to give its blocks back. `prefill_tokens_computed`
# counts every token computed in a prefill, so it exceeds `prompt_tokens` by everything computed a
# second time: a preempted sequence's prompt *and* the tokens it had already generated, recomputed
# together when it is readmitted (`recomputed_tokens` counts the generated ones; with the prefix
# cache of chapter 08, blocks still cached would be spared — here it is off). The outputs are the
# same; the price is time (twice as many steps here, because fewer sequences fit in a step). vLLM can also *swap* a
# preempted sequence's blocks to CPU memory instead of dropping them; recomputing is simpler and,
# for short sequences, often as fast.

# %% [markdown]
# ## 6. The kernels
#
# Your exercise 7.2 is the package's **torch reference**: correct, readable, and slow — a Python
# loop over sequences, and a gather that copies every key and value once more before using it. On
# a GPU, decode attention is **memory-bound**: each key/value number is read once and used in
# only $G$ multiply-adds (one per query head sharing that KV head), so the figure of merit, as for
# chapter 00's vector add, is bytes per second against the copy bandwidth. A good kernel:
#
# * reads K and V **once, straight from the pool**, through the block table (no gather copy);
# * lets one program serve all $G$ query heads of a KV head, so a K/V tile is loaded once, not
#   $G$ times (the $G$ heads become the rows of a small matrix product);
# * **splits the context** (flash-decoding): with batch 64 and 2 KV heads there are only 128
#   (sequence, KV head) pairs for 132 SMs, so each context is cut into partitions handled by
#   separate programs, and a second step combines the partial results.
#
# Combining works because softmax can be merged: partition $p$ returns its running max $m_p$,
# its sum of exponentials $\ell_p = \sum_{s\in p} e^{x_s - m_p}$ and its normalised output $o_p$;
# with $m = \max_p m_p$,
#
# $$ o = \frac{\sum_p e^{m_p - m}\, \ell_p\, o_p}{\sum_p e^{m_p - m}\, \ell_p}. $$
#
# Here is the inner loop of the Triton kernel (`miniinfer/kernels/paged_attention_triton.py`):
# one tile of `BLOCK_N` tokens, gathered through the block table, then an online-softmax update.

# %%
from pathlib import Path

from miniinfer.kernels import paged_attention_triton

source = Path(paged_attention_triton.__file__).read_text()
start = source.index("        for it in range(0, PARTITION // BLOCK_N):")
print(source[start:source.index("        out = acc / l[:, None]")].rstrip())

# %% [markdown]
# On this machine the same kernel runs in Triton's interpreter (slowly, but exactly). We force a
# small partition so that the split-KV path and the combining kernel both run, and compare with
# the torch reference — and with your function.

# %%
from miniinfer.kernels.paged_attention import paged_decode_attention as package_decode
from miniinfer.kernels.paged_attention import paged_decode_attention_torch

generator = torch.Generator().manual_seed(0)
B, H, H_kv, D, P = 3, 8, 2, 32, 16
seq_lens = torch.tensor([100, 17, 64], dtype=torch.int32)
num_blocks = 24
k_cache = torch.randn(num_blocks, P, H_kv, D, generator=generator)
v_cache = torch.randn(num_blocks, P, H_kv, D, generator=generator)
block_tables = torch.randperm(num_blocks, generator=generator)[:B * 7].view(B, 7).to(torch.int32)
q = torch.randn(B, H, D, generator=generator)
scale = D ** -0.5
reference = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale)
triton_out = package_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, backend="triton",
                            partition_size=32, max_seq_len=100)
yours_out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
# The errors are float32 rounding (a few 1e-7, varying with the machine's summation order): print the
# bound they meet rather than digits that change from one computer to the next.
for name, out in (("Triton (interpreted, partitions of 32 tokens)", triton_out), ("your function", yours_out)):
    error = (out - reference).abs().max().item()
    print(f"{name} vs torch reference: max |error| {'<' if error < 1e-5 else '='} "
          f"{1e-5 if error < 1e-5 else error:.0e}")

# %% [markdown]
# The CUDA kernel in `csrc/paged_attention.cu` goes one step further: tensor-core MMA instructions
# for the $G$ heads, 16-byte loads straight into the registers the MMA consumes (no shared-memory
# staging), the block-table entries of a partition staged in shared memory, and the partial
# results combined by the *last* block of each (sequence, KV head) to finish, so there is a single
# launch. Its header comment explains each choice; here is the beginning:

# %%
from miniinfer.kernels.build import csrc_dir

cuda_source = (csrc_dir() / "paged_attention.cu").read_text()
print(cuda_source[cuda_source.index("// Why the kernel"):cuda_source.index("// * Split-KV")].rstrip())

# %% [markdown]
# ### Measured on an H100
#
# `python benchmarks/paged_attention.py` times the kernels on an H100 in bfloat16: batch 64,
# every sequence 4096 tokens, block tables randomly permuted, the attention shapes of Qwen2.5-0.5B
# and of a 7B model. Rows: the CUDA kernel, the Triton kernel, PyTorch SDPA on keys and values
# first gathered through the block table (what an engine without paged kernels pays), and SDPA on
# pre-gathered contiguous KV (not a real option, since gathering is part of the job; a reference
# point). Bandwidth counts every K/V byte once; the dashed line is a device-to-device copy
# measured in the same run.

# %%
from miniinfer.course.results import caption, load_result

record = load_result("paged_attention", device="cuda")
if record is None:
    print("no GPU result recorded yet: run `python benchmarks/paged_attention.py` on a CUDA machine")
else:
    rows = [row for row in record["rows"] if row.get("GB/s")]
    groups = list(dict.fromkeys(f"{row['shape'].split(' (')[0]}\nP={row['P']}" for row in rows))
    kernels = [k for k in ("cuda", "triton", "sdpa+gather", "sdpa") if any(r["kernel"] == k for r in rows)]
    first = {}  # the default configuration of each kernel: its first row in each group
    for row in rows:
        first.setdefault((f"{row['shape'].split(' (')[0]}\nP={row['P']}", row["kernel"]), row)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(kernels)
    for i, kernel in enumerate(kernels):
        xs = [g + (i - (len(kernels) - 1) / 2) * width for g in range(len(groups))]
        gbs = [first[(group, kernel)]["GB/s"] if (group, kernel) in first else 0 for group in groups]
        pct = [first[(group, kernel)]["% copy"] if (group, kernel) in first else 0 for group in groups]
        left.bar(xs, gbs, width, label=kernel)
        right.bar(xs, pct, width, label=kernel)
    copy_gbs = record["summary"].get("copy_GBs_reference")
    if copy_gbs:
        left.axhline(copy_gbs, color="k", linestyle="--", label="copy")
    right.axhline(100, color="k", linestyle="--")
    for ax, label in ((left, "achieved bandwidth (GB/s)"), (right, "% of copy bandwidth")):
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=len(kernels) + 1, fontsize=8)
    fig.suptitle("Paged decode attention (bf16)\n" + caption(record), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    print(record["notes"])
    print("default configurations:")
    for group in groups:
        print("  " + group.replace("\n", ", ") + ": " + ", ".join(
            f"{k} {first[(group, k)]['GB/s']:.0f} GB/s ({first[(group, k)]['% copy']:.0f} %)"
            for k in kernels if (group, k) in first))
    print("best paged kernel of the sweep:")
    for key, best in record["summary"].get("best_paged_kernel", {}).items():
        print(f"  {key}: {best['kernel']} ({best['variant']}) {best['GB/s']:.0f} GB/s = {best['% copy']:.0f} % of copy")

# %% [markdown]
# Reading the bars (of the run recorded when this chapter was written, 2026-11-26):
#
# * the two paged kernels reach about 70 % of the copy bandwidth on the small model's shape and
#   85–90 % on the 7B shape in their default configurations; the benchmark's sweep (at P = 16)
#   finds better ones with longer partitions — above 80 % on the small shape too;
# * gathering the keys and values into a contiguous tensor and then calling SDPA reaches about
#   30 %: the gather reads every K/V byte, writes a copy, and SDPA reads the copy again — three
#   passes over the data instead of one. That is what paged kernels save;
# * SDPA on KV that is *already* contiguous is faster still, but no engine gets contiguous KV for
#   free (that was section 1's problem): it is a ceiling, not an option;
# * the block size hardly matters to the kernels (16 vs 64), so it can be chosen for memory;
# * the small shape (D = 64, H_kv = 2) is harder: a token's key row is only 128 bytes, so the
#   fixed costs per token (a block-table lookup, address arithmetic) weigh more.
#
# ## Summary
#
# * Reserving `L_max` per request leaves most KV memory empty; blocks of $P$ tokens waste under
#   $P$ slots per sequence, so many times more requests fit in the same memory.
# * A **block table** maps a sequence's logical blocks to physical blocks; position `pos` lives in
#   slot `block_table[pos // P] · P + pos % P`. Kernels read keys and values through it.
# * **Reference counts** let sequences share blocks (parallel samples, and in chapter 08 cached
#   prefixes); **copy-on-write** gives a writer a private copy of a shared, partly filled block.
# * When the pool is full the scheduler **preempts** and later recomputes; outputs do not change.
# * Decode attention is memory-bound: a good paged kernel reads every K/V byte once, serves all
#   query heads of a KV head together and splits long contexts over many programs.
#
# **Going further** (no checks):
#
# 1. Redo the fragmentation figure for a contiguous layout that reserves `prompt + max_tokens`
#    (a request's own worst case) instead of `L_max`. How much of paging's advantage remains?
# 2. vectorise your `paged_decode_attention`: pad every sequence to the longest, gather all block
#    tables at once, and mask. Time both on a batch of 64 on the CPU. When does the padding cost
#    more than the Python loop?
# 3. In the preemption experiment, change the scheduler's victim to the sequence with the *most*
#    blocks (`miniinfer/engine/scheduler.py`, `_make_room`). Count the recomputed tokens.
# 4. Write a `write_kv` in Triton (one program per token, store its `[H_kv, D]` keys at its slot)
#    and compare with `miniinfer.kernels.paged_attention_triton.write_kv_kernel`.
