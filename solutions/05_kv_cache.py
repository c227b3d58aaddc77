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
# # Chapter 05 — The KV cache
#
# **What you will build.** The memory that makes generation fast. Without it, every new token
# re-runs the model over the whole text so far; with it, the model runs once over the prompt
# (**prefill**) and then over one token per step (**decode**), reading the keys and values of all
# earlier tokens from the **KV cache**. You will write three pieces of `miniinfer/kv_cache.py` and
# `miniinfer/generate.py`: the bytes a token costs in the cache, the cache's update-and-attend step
# (with the offset causal mask and left padding), and the prefill + decode loop — then generate
# Shakespeare with them and measure the time per token with and without the cache.
#
# **What you need.** Chapter 03 (causal attention where the $L$ queries are the *last* $L$ of $S$
# keys, grouped-query attention) and chapter 04 (the Qwen2 model; its forward takes
# `positions` and an `attention=` context, and `logits_indices`).

# %%

import matplotlib.pyplot as plt
import numpy as np
import torch

import miniinfer
from miniinfer.course import check
from miniinfer.generate import generate
from miniinfer.kv_cache import KVCache
from miniinfer.sampling import SamplingParams

torch.manual_seed(0)
model, tokenizer = miniinfer.load_model(miniinfer.bundled_model_path("shakespeare"), device="cpu")
config = model.config
print(f"bundled model: {model.num_parameters() / 1e6:.1f} M parameters, {config.num_hidden_layers} layers, "
      f"H={config.num_attention_heads}, H_kv={config.num_key_value_heads}, D={config.head_dim}, "
      f"context {config.max_position_embeddings} tokens")

# %% [markdown]
# ## 1. Why a cache
#
# A decoder generates one token at a time: to choose token $t+1$ it needs the logits at position
# $t$, and those depend, through attention, on the keys $k_j$ and values $v_j$ of **every** earlier
# position $j \le t$, in every layer. The simplest loop feeds the whole sequence again at each step:
#
# $$\text{step } t:\quad \text{logits}_t = \text{model}(x_1, \dots, x_t)[t].$$
#
# But the model is **causal**: $k_j$ and $v_j$ depend only on tokens $1 \dots j$, so once computed
# they never change. Recomputing them is pure waste. A KV cache stores them, and step $t$ only
# computes the new token's query, key and value, appends the key and value, and attends over the
# $t$ stored ones. Counting floating-point operations (a multiply-add is two) for a model with $N$
# parameters in its matrices and $n_\ell$ layers of $H$ heads of size $D$:
#
# $$\text{cost of step } t \;\approx\; \underbrace{2N\,t + 4\,n_\ell\,H D\, t^2}_{\text{without cache}}
# \qquad\text{vs}\qquad \underbrace{2N + 4\,n_\ell\,H D\, t}_{\text{with cache}}.$$
#
# Without a cache the whole generation of $n$ tokens costs $O(n^2)$ matrix work (and $O(n^3)$
# attention); with it, $O(n)$ and $O(n^2)$. The price is memory: the cache holds two vectors per KV
# head, per layer, per token.
#
# The picture below shows which positions each step computes. Without a cache (left) every step
# redoes the whole triangle; with it (right) the prompt is computed once, in one parallel pass, and
# every later step computes one new position.

# %%
def draw_work(prompt_len: int = 5, new_tokens: int = 7):
    total = prompt_len + new_tokens
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, cached in zip(axes, (False, True)):
        grid = np.zeros((new_tokens, total))                 # rows: steps, columns: positions
        for step in range(new_tokens):
            length = prompt_len + step                        # tokens known before this step's choice
            if cached:
                lo = 0 if step == 0 else length - 1           # prefill computes the prompt, decode one token
                grid[step, lo:length] = 1 if step == 0 else 2
                grid[step, :lo] = 0.25                        # read from the cache
            else:
                grid[step, :length] = 3
        colours = plt.matplotlib.colors.ListedColormap(["white", "#cfe3f5", "#f2a65a", "#5a9bd4", "#c0504d"])
        norm = plt.matplotlib.colors.BoundaryNorm([0, 0.1, 0.5, 1.5, 2.5, 3.5], colours.N)
        ax.imshow(grid, cmap=colours, norm=norm, aspect="auto")
        ax.set_xticks(range(total))
        ax.set_xticklabels([f"p{i}" if i < prompt_len else f"g{i - prompt_len}" for i in range(total)], fontsize=7)
        ax.set_yticks(range(new_tokens))
        ax.set_yticklabels([f"step {s}" for s in range(new_tokens)], fontsize=8)
        computed = grid[grid >= 1].size
        ax.set_title(("with the cache" if cached else "without a cache") + f": {computed} positions computed",
                     fontsize=10)
        ax.set_xlabel("position (p = prompt, g = generated)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#c0504d", "#f2a65a", "#5a9bd4", "#cfe3f5")]
    fig.legend(handles, ["recomputed", "prefill", "decode (new token)", "read from the cache"], loc="lower center",
               ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))


draw_work()

# %% [markdown]
# ## 2. The layout and its memory
#
# `KVCache` preallocates, once, two tensors of shape
#
# $$[\,n_\ell,\; B,\; S_{\max},\; H_{kv},\; D\,]$$
#
# — layers, rows of the batch, slots, KV heads, head dimension — one for keys and one for values,
# and a counter `length`: how many slots are filled. Layer $\ell$'s cache is the view
# `keys[ℓ]`: `[B, S_max, H_kv, D]`, tokens first and heads second, the layout a linear projection
# produces (chapter 03), so storing a step is one slice assignment and nothing is ever copied or
# concatenated. Only $H_{kv}$ heads are stored: with grouped-query attention the $H$ query heads
# share them, and the cache shrinks by $H / H_{kv}$.

# %%
cache = KVCache.for_model(model, batch_size=2, max_len=64)
print("keys:", tuple(cache.keys.shape), cache.keys.dtype, "  values:", tuple(cache.values.shape))
print("layer 0's view [B, S_max, H_kv, D]:", tuple(cache.keys[0].shape), "  filled slots:", cache.length)

# %% [markdown]
# ### Exercise 5.1 — bytes per token
#
# Every token of context costs the same memory in every sequence: its key and its value, in every
# layer, $H_{kv} \cdot D$ numbers each. Write `kv_bytes_per_token(config, dtype)`, with `config`
# giving `num_hidden_layers`, `num_key_value_heads` and `head_dim`;
# `torch.empty((), dtype=dtype).element_size()` is the size of one number in bytes.

# %% tags=["exercise"] exercise="5.1"
def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the KV cache: key and value, H_kv·D numbers each, in every layer."""
    ### BEGIN SOLUTION
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize
    ### END SOLUTION


# %% tags=["check"] exercise="5.1"
check.kv_bytes_per_token(kv_bytes_per_token)

# %% [markdown]
# What it means, for our model and for a real one. Qwen2.5-7B has 28 layers, 28 query heads but only
# 4 KV heads of $D = 128$, in bfloat16; the same model *without* grouped-query attention would store
# all 28 heads.

# %%
from types import SimpleNamespace

ours = kv_bytes_per_token(config, torch.float32)
print(f"bundled model, float32: {ours / 1024:.1f} KiB per token, "
      f"{ours * config.max_position_embeddings / 2**20:.1f} MiB for a full {config.max_position_embeddings}-token "
      f"context;  the cache above: {cache.nbytes() / 2**20:.2f} MiB = 2 rows × 64 slots × {ours} B")
qwen7b = SimpleNamespace(num_hidden_layers=28, num_key_value_heads=4, head_dim=128)
mha7b = SimpleNamespace(num_hidden_layers=28, num_key_value_heads=28, head_dim=128)
for name, cfg in (("Qwen2.5-7B (GQA, 4 KV heads)", qwen7b), ("same without GQA (28 KV heads)", mha7b)):
    per_token = kv_bytes_per_token(cfg, torch.bfloat16)
    print(f"{name:32s} bfloat16: {per_token / 1024:5.0f} KiB per token, "
          f"{per_token * 32768 / 2**30:5.2f} GiB per 32k-token sequence")

# %% [markdown]
# A few gigabytes per long sequence: on a GPU the cache, not the weights, decides how many
# requests run at once. Chapter 07 allocates it in pages so that none of it is wasted.

# %% [markdown]
# ## 3. Prefill, decode, and the cache step
#
# The model hands every layer's new $q$, $k$, $v$ to `cache.attend(layer, q, k, v, scale)` (the
# attention hook of chapter 04). For $L$ new tokens when `start` slots are already filled, one
# layer does:
#
# 1. **store** $k, v$ `[B, L, H_kv, D]` into slots `start … start+L−1` of its cache;
# 2. **attend**: query $i$ sits at slot $\text{start}+i$ and sees slots $0 \dots \text{start}+i$ —
#    the causal mask of chapter 03 with the queries being the *last* $L$ of $S = \text{start}+L$ keys.
#
# The prefill is the case `start = 0, L = n` (a prompt of $n$ tokens); a decode step is `L = 1`, and
# its single query sees every filled slot; chapter 06 adds chunks (`start > 0, L > 1`).
#
# **Left padding.** Several prompts of different lengths can share a cache (a *static batch*,
# the baseline of chapter 06) if the shorter ones are padded on the left, so that every row's last
# prompt token sits in the same slot and the rows advance together. A boolean `key_padding_mask`
# `[B, S_max]` marks the slots that hold real tokens; padding slots must be hidden from every query.
# The masks of three steps:

# %%
def visibility(start: int, L: int, padding: torch.Tensor | None = None):
    end = start + L
    slot = torch.arange(end)
    mask = slot[None, :] <= torch.arange(start, end)[:, None]         # [L, S]
    if padding is not None:
        mask = mask[None] & padding[:, None, :end]                    # [B, L, S]
    return mask


def draw_masks():
    padding = torch.arange(8)[None, :] >= torch.tensor([[0], [3]])    # row 1 has 3 padding slots
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.9), gridspec_kw=dict(width_ratios=[6, 8, 8, 8]))
    panels = [("prefill: start=0, L=6", visibility(0, 6)), ("chunk: start=5, L=3", visibility(5, 3)),
              ("padded prefill, row 0", visibility(0, 6, padding[:, :6])[0]),
              ("padded prefill, row 1 (3 pads)", visibility(0, 6, padding[:, :6])[1])]
    for ax, (title, mask) in zip(axes, panels):
        ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key slot")
        ax.set_xticks(range(mask.shape[1]))
        ax.set_yticks(range(mask.shape[0]))
    axes[0].set_ylabel("query (new token)")
    fig.tight_layout()


draw_masks()

# %% [markdown]
# In the last panel the first three queries are padding: they see *no* slot at all. A softmax over
# nothing is $0/0$ = NaN, and a NaN value stored in the cache poisons every later query that
# multiplies it by a zero weight. The fix is cheap: let every query always see its own slot (what
# a padding row computes is thrown away anyway).
#
# ### Exercise 5.2 — update the cache and attend
#
# Write `attend_with_cache(k_cache, v_cache, start, q, k, v, scale, key_padding_mask=None)` for one
# layer: write `k`, `v` into their slots **in place** (the next step must find them), then return
# the attention of `q` `[B, L, H, D]` over the filled slots, `[B, L, H, D]`, with the causal mask
# offset by `start`, padding slots hidden, and scores multiplied by `scale`. Use
# `torch.nn.functional.scaled_dot_product_attention` (its `attn_mask` is boolean, True = may
# attend; `enable_gqa=True` handles $H \ne H_{kv}$; it wants heads before tokens) or your chapter 03
# attention with an explicit mask.

# %% tags=["exercise"] exercise="5.2"
import torch.nn.functional as F


def attend_with_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, scale: float, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """k_cache, v_cache: [B, S_max, H_kv, D], slots 0 … start−1 filled; q: [B, L, H, D]; k, v: [B, L, H_kv, D];
    key_padding_mask: [B, S_max] bool (True = real token) or None.  -> [B, L, H, D]."""
    ### BEGIN SOLUTION
    end = start + q.shape[1]
    k_cache[:, start:end] = k
    v_cache[:, start:end] = v
    keys, values = k_cache[:, :end], v_cache[:, :end]                               # [B, S, H_kv, D]
    query_slot = torch.arange(start, end, device=q.device)
    mask = torch.arange(end, device=q.device)[None, :] <= query_slot[:, None]      # [L, S]
    if key_padding_mask is not None:
        own_slot = torch.arange(end, device=q.device)[None, :] == query_slot[:, None]
        mask = (mask[None] & key_padding_mask[:, None, :end]) | own_slot[None]     # [B, L, S]
        mask = mask[:, None]                                                        # [B, 1, L, S]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)
    ### END SOLUTION


# %% tags=["check"] exercise="5.2"
check.attend_with_cache(attend_with_cache)

# %% [markdown]
# ### Exercise 5.3 — prefill, then decode
#
# Now the loop. `prefill_and_decode(model, cache, prompt_ids, max_new_tokens, next_token,
# eos_token_ids)` gets an empty `KVCache` of batch 1 and a rule `next_token(logits [V]) -> int`
# (greedy, sampling — the loop does not care). It must:
#
# * **prefill**: run the whole prompt of $n$ tokens once, `ids` `[1, n]` at positions
#   `[[0, 1, …, n−1]]`, through the cache: `model(ids, positions, attention=cache)`; the logits of the
#   last position give the first new token;
# * **decode**: feed back only the newest token, `[1, 1]`, at position `cache.length` (the number of
#   tokens already cached), one step per token;
# * stop after `max_new_tokens` tokens or right after a token in `eos_token_ids` (keep it), and
#   return the new tokens as a list of ints. The last token is never run through the model: nothing
#   would read its key and value (the check gives a cache with exactly the room the loop needs).
#
# `model(..., logits_indices=torch.tensor([L − 1]))` runs the LM head on the last row only — the
# `[V, E]` head is the biggest matrix of a small model, and it is wasted on the others.

# %% tags=["exercise"] exercise="5.3"
def prefill_and_decode(model, cache: KVCache, prompt_ids: list[int], max_new_tokens: int, next_token,
                       eos_token_ids=frozenset()) -> list[int]:
    """Prefill the prompt into the empty cache, then decode one token per step; return the new token ids."""
    ### BEGIN SOLUTION
    ids = torch.tensor([list(prompt_ids)])                          # [1, n]: the whole prompt
    positions = torch.arange(len(prompt_ids))[None]                 # [1, n]
    output = []
    with torch.inference_mode():
        while True:
            last = torch.tensor([ids.shape[1] - 1])
            logits = model(ids, positions, attention=cache, logits_indices=last)   # [1, V]
            token = int(next_token(logits[0].float()))
            output.append(token)
            if token in eos_token_ids or len(output) >= max_new_tokens:
                return output
            ids = torch.tensor([[token]])                           # only the new token
            positions = torch.tensor([[cache.length]])              # right after the cached ones
    ### END SOLUTION


# %% tags=["check"] exercise="5.3"
check.prefill_and_decode(prefill_and_decode)

# %% [markdown]
# ## 4. Plug it in
#
# `KVCache(..., attend_with_cache=fn)` (and `KVCache.for_model(model, ..., attend_with_cache=fn)`)
# makes the cache run *your* step in every layer. With your loop on top, the bundled model writes
# Shakespeare — here sampling (temperature 0.8, top-k 40, a fixed seed): the loop does not care how
# `next_token` chooses. The package's `generate` (which calls the package's versions of both) and
# the continuous-batching engine of the next chapter draw from the same seeded generator and must
# produce exactly the same tokens.

# %%
from miniinfer.sampling import make_generator, sample

prompt = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
prompt_ids = tokenizer.encode(prompt)
params = SamplingParams(temperature=0.8, top_k=40, max_tokens=60, seed=3)
generator = make_generator(params.seed)


def sample_next(logits: torch.Tensor) -> int:              # logits: [V]
    return int(sample(logits[None], [params], [generator])[0])


your_cache = KVCache.for_model(model, batch_size=1, max_len=len(prompt_ids) + params.max_tokens - 1,
                               attend_with_cache=attend_with_cache)
yours = prefill_and_decode(model, your_cache, prompt_ids, params.max_tokens, sample_next,
                           set(tokenizer.eos_token_ids))
print(prompt + tokenizer.decode(yours))
print("---")
package = generate(model, prompt_ids, params, set(tokenizer.eos_token_ids))
llm = miniinfer.LLM(device="cpu", num_kv_blocks=64)       # the engine of chapter 06, same weights
engine = llm.generate(prompt, params, use_tqdm=False)[0].token_ids
print(f"{len(yours)} tokens; equal to the package's generate: {yours == package}, to the engine's: "
      f"{yours == engine}; cache filled to {your_cache.length} of {your_cache.max_len} slots")

# %% [markdown]
# ## 5. Measure: time per token as the context grows
#
# One decode step with the cache against the same step without it (the whole sequence through the
# model), for contexts of 16 to 512 tokens. Without the cache the time grows with the context
# (linearly here, where the matrix products dominate; quadratically once attention does); with it
# the step stays almost flat — it reads a longer cache, but that is a small part of the work for
# this model. Timings vary between machines and runs, so this cell's numbers are not compared.

# %% tags=["nbval-ignore-output", "skip-grading"]
from miniinfer.course.timing import median_ms


contexts = [16, 64, 128, 256, 512]
generator = torch.Generator().manual_seed(0)
with_cache, without_cache, prefill_per_token = [], [], []
with torch.inference_mode():
    for context in contexts:
        ids = torch.randint(0, config.vocab_size, (1, context + 1), generator=generator)
        last = torch.tensor([context])
        # Without: the whole sequence, context + 1 tokens, for the logits of the last one.
        without_cache.append(median_ms(lambda: model(ids, logits_indices=last)))
        # With: prefill `context` tokens once, then time one decode step (reset the length each time).
        step_cache = KVCache.for_model(model, 1, context + 1)
        prefill_per_token.append(median_ms(lambda: (step_cache.reset(), model(
            ids[:, :context], torch.arange(context)[None], attention=step_cache, logits_indices=last - 1)),
            repeat=3) / context)

        def decode_step():
            step_cache.length = context
            return model(ids[:, context:], torch.tensor([[context]]), attention=step_cache,
                         logits_indices=torch.tensor([0]))

        with_cache.append(median_ms(decode_step))

fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(contexts, without_cache, "o-", color="#c0504d", label="without cache: recompute everything")
ax.plot(contexts, with_cache, "s-", color="#5a9bd4", label="with cache: one decode step")
ax.plot(contexts, prefill_per_token, "^--", color="#f2a65a", label="prefill, per prompt token")
ax.set_xlabel("context (tokens already in the sequence)")
ax.set_ylabel("ms per new token")
ax.set_title("Time per token, bundled model on this CPU")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
for context, a, b in zip(contexts, without_cache, with_cache):
    print(f"context {context:4d}: without cache {a:7.2f} ms, with cache {b:6.2f} ms  ({a / b:5.1f}×)")

# %% [markdown]
# The third line is the other side of the story: **prefill** processes the prompt's tokens all at
# once, in one pass of large matrix products, so its cost *per token* is far below a decode step's.
# A decode step does the same work as a 1-token prefill — tiny matrix-vector products — and on a GPU
# it is limited by reading the weights and the cache from memory, not by arithmetic. Serving
# therefore batches many decode steps together (chapter 06) and keeps the cache compact (chapter 07).
#
# ## Summary
#
# * Keys and values of a causal model never change once computed, so we store them: generation
#   becomes one **prefill** over the prompt plus one cheap **decode** step per token, $O(\text{context})$
#   each instead of re-running everything.
# * The cache is preallocated `[n_ℓ, B, S_max, H_kv, D]` per tensor and filled in place; a token costs
#   $2\,n_\ell H_{kv} D$ numbers — gigabytes for long contexts of large models, which is why GQA
#   exists and why the cache's memory decides how many requests fit.
# * The step writes the new keys at slots `start …` and attends with a causal mask offset by
#   `start`; left padding adds a key mask, and every query must see at least its own slot.
#
# **Going further** (no checks):
#
# 1. Store the cache in int8 with one scale per token and head. How does `kv_bytes_per_token`
#    change, and where in `attend_with_cache` do you dequantize?
# 2. Sliding-window attention keeps only the last $W$ tokens: turn the cache into a ring buffer of
#    $W$ slots. Which slot does position $p$ use, and what do the mask and the positions become?
# 3. Time a decode step of a static batch of $B = 1, 2, 4, 8, 16$ rows (left padding, `set_padding`).
#    How does the time per *token* change with $B$, and why would a GPU show a much larger gain?
# 4. `generate_static_batch` pads every prompt to the longest and keeps finished rows in the batch.
#    Count the wasted slot-steps for prompts of 5, 50 and 500 tokens generating 10, 100 and 20 tokens:
#    chapter 06 removes that waste.
