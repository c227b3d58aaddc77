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
# # Chapter 03 — Attention: scaled dot-product, causal mask, MHA, GQA
#
# **What you will build.** The four functions of `miniinfer/attention.py`: a numerically stable
# **softmax**, the **causal mask** for queries that follow cached keys, plain **multi-head attention**
# (MHA), and **grouped-query attention** (GQA), the variant Qwen2 uses, in which several query heads
# share one key/value head. Then you plug your GQA into the real engine and watch the bundled model
# generate exactly the same text with it, look at what its attention heads attend to, and count how
# many bytes of KV cache each token costs for real models.
#
# **What you need.** Chapter 01 (a linear projection turns `[B, L, E]` into `[B, L, H·D]`, which we view
# as `[B, L, H, D]`) and chapter 02 (q and k are rotated by RoPE *before* attention, so the dot products
# below already know the relative positions).
#
# Shapes in this chapter: `B` batch, `L` queries, `S` keys/values (`S ≥ L`), `H` query heads, `H_kv`
# key/value heads, `G = H / H_kv` query heads per KV head, `D` head dimension.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import miniinfer
from miniinfer import LLM, SamplingParams
from miniinfer.components import Components
from miniinfer.course import check

torch.manual_seed(0)
model_path = miniinfer.bundled_model_path("shakespeare")


# %% [markdown]
# ## 1. The idea: a soft lookup table
#
# Each token asks a question (its **query** $q$), every earlier token offers a label (its **key** $k$)
# and a payload (its **value** $v$). The answer is an average of the values, weighted by how well
# each key matches the query. For one head, with the $L$ queries stacked in $Q \in \mathbb{R}^{L\times D}$
# and the $S$ keys and values in $K, V \in \mathbb{R}^{S\times D}$:
#
# $$ \text{Attention}(Q, K, V) \;=\; \text{softmax}\!\left(\frac{Q K^\top}{\sqrt{D}} + M\right) V, $$
#
# where the softmax runs along each row (over the keys) and the mask $M$ holds $0$ where a query may
# look and $-\infty$ where it may not (a future token). The weights of a row are positive and sum to
# one, so each output is a convex combination of value vectors.
#
# | tensor | shape | what it holds |
# |---|---|---|
# | `q` | `[B, L, H, D]` | one query vector per token and head |
# | `k`, `v` | `[B, S, H_kv, D]` | keys and values of every visible token (cached + new) |
# | scores, weights | `[B, H, L, S]` | one row of `S` numbers per query and head |
# | output | `[B, L, H, D]` | back to the layout of `q`, ready for the output projection |
#
# We keep tokens before heads (`[B, L, H, D]`) because that is what a projection produces and what a
# KV cache stores: no transposes on the way in or out.
#
# ### Why divide by $\sqrt{D}$?
#
# If the coordinates of $q$ and $k$ are roughly independent with unit variance, $q\cdot k$ is a sum of
# $D$ such products: its variance is $D$. Without the scale, a bigger head makes the scores spread
# wider, the softmax saturates to a one-hot, and its gradients vanish in training. Dividing by
# $\sqrt{D}$ brings the variance back to 1 whatever $D$ is — the model was trained that way, so
# inference must do exactly the same.

# %%
def attention_sharpness(D: int, scaled: bool, S: int = 64, trials: int = 200) -> float:
    """Average largest softmax weight of a query over S random keys (1.0 = one-hot)."""
    g = torch.Generator().manual_seed(D)
    q = torch.randn(trials, 1, D, generator=g)
    k = torch.randn(trials, S, D, generator=g)
    scores = (q @ k.transpose(1, 2)).squeeze(1) * (D ** -0.5 if scaled else 1.0)
    return torch.softmax(scores, dim=-1).amax(dim=-1).mean().item()


head_dims = [4, 8, 16, 32, 64, 128, 256]
fig, ax = plt.subplots(figsize=(7, 3.4))
ax.plot(head_dims, [attention_sharpness(D, False) for D in head_dims], "o-", label="softmax(q·kᵀ)")
ax.plot(head_dims, [attention_sharpness(D, True) for D in head_dims], "s-", label="softmax(q·kᵀ / √D)")
ax.axhline(1 / 64, color="grey", ls=":", label="uniform over S = 64 keys")
ax.set_xscale("log", base=2)
ax.set_xlabel("head dimension D")
ax.set_ylabel("mean of the largest weight")
ax.set_title("Without 1/√D, attention over random keys turns one-hot as D grows")
ax.legend(fontsize=8)
ax.grid(alpha=0.3);

# %% [markdown]
# ## 2. A softmax that does not overflow
#
# $\text{softmax}(x)_i = e^{x_i} / \sum_j e^{x_j}$ looks harmless, but `float32` overflows at
# $e^{88.7}$: a logit of 100 gives `inf`, and `inf / inf` is `nan`. Very negative rows fail the other
# way, every $e^{x_j}$ underflows to 0 and we divide $0/0$. The fix costs one reduction: the softmax
# does not change when the same number is subtracted from every entry of a row,
#
# $$ \text{softmax}(x)_i \;=\; \frac{e^{x_i - m}}{\sum_j e^{x_j - m}}, \qquad m = \max_j x_j, $$
#
# so with $m$ the row's maximum the largest exponent is $e^0 = 1$ (no overflow) and the denominator is
# at least 1 (no $0/0$). Masked entries ($-\infty$) become $e^{-\infty} = 0$, exactly.

# %%
logits = torch.tensor([100.0, 101.0, 102.0])
print("naive:         ", (logits.exp() / logits.exp().sum()).tolist())
print("max subtracted:", [round(p, 4) for p in ((logits - logits.max()).exp() / (logits - logits.max()).exp().sum()).tolist()])


# %% [markdown]
# ### Exercise 3.1 — `softmax(x, dim)`
#
# Normalise over the axis `dim` (any axis, negative ones included), subtracting the maximum along that
# axis first (`x.amax(dim, keepdim=True)` keeps the axis so that it broadcasts). Do not modify `x` in
# place. The check compares with `torch.softmax` on random shapes and axes, on logits around ±1000,
# on rows of very different scales and on rows with `-inf` entries.

# %% tags=["exercise"] exercise="3.1"
def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax over ``dim``.  x: [...] -> same shape, each slice along dim sums to 1."""
    # YOUR CODE HERE (Exercise 3.1)
    raise NotImplementedError("Exercise 3.1: implement `softmax`")


# %% tags=["check"] exercise="3.1"
check.softmax(softmax)


# %% [markdown]
# ## 3. The causal mask, for queries that follow cached keys
#
# A language model must not look ahead: token $i$ sees tokens $0 \dots i$. When the $L$ queries are
# the whole sequence ($S = L$), the allowed pairs form the lower triangle. But during inference the
# queries are often only the **last** $L$ of the $S$ tokens: the first $S - L$ keys come from the KV
# cache (chapter 05), filled by earlier steps. Query $i$ then sits at position $i + (S - L)$ and may see
#
# $$ \text{key } j \quad\text{iff}\quad j \le i + (S - L). $$
#
# The triangle slides right by $S - L$ — it is aligned to the **bottom-right** corner. Two cases
# matter most: **prefill** ($S = L$, the whole prompt at once) and **decode** ($L = 1$, one new token,
# which sees every key). Chunked prefill (chapter 06) sits in between. Note that PyTorch's
# `F.scaled_dot_product_attention(..., is_causal=True)` aligns its triangle to the *top-left*: right
# when $S = L$, wrong otherwise.

# %%
def draw_mask(ax, L: int, S: int, title: str):
    allowed = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + (S - L)
    ax.imshow(allowed.numpy(), cmap="Blues", vmin=-0.3, vmax=1.2)
    ax.set_xticks(range(S))
    ax.set_yticks(range(L))
    ax.set_xticklabels(range(S), fontsize=7)
    ax.set_yticklabels([f"{i} (pos {i + S - L})" for i in range(L)], fontsize=7)
    if S > L:
        ax.axvline(S - L - 0.5, color="C3", lw=2)
        ax.text((S - L) / 2 - 0.5, (L - 1) / 2, "cached keys", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("key j")
    ax.set_title(title, fontsize=9)


fig, axes = plt.subplots(1, 3, figsize=(11, 3.3), gridspec_kw={"width_ratios": [6, 8, 8]})
draw_mask(axes[0], 6, 6, "prefill: L = S = 6")
draw_mask(axes[1], 3, 8, "chunk after a cache: L = 3, S = 8")
draw_mask(axes[2], 1, 8, "decode: L = 1, S = 8")
axes[0].set_ylabel("query i")
fig.suptitle("Causal masks (blue = may attend), aligned to the bottom-right", fontsize=10)
fig.tight_layout();


# %% [markdown]
# ### Exercise 3.2 — `causal_mask(L, S, device)`
#
# Return a `bool` tensor `[L, S]` on `device`, `True` where query `i` may attend key `j`. One line is
# enough: `torch.tril(..., diagonal=...)` keeps the entries on and below a shifted diagonal. The
# check tries squares, decoding rows, and blocks of queries after a cached prefix.

# %% tags=["exercise"] exercise="3.2"
def causal_mask(L: int, S: int, device=None) -> torch.Tensor:
    """bool [L, S]: True where query i (at position i + S - L) may attend key j, i.e. j <= i + (S - L)."""
    # YOUR CODE HERE (Exercise 3.2)
    raise NotImplementedError("Exercise 3.2: implement `causal_mask`")


# %% tags=["check"] exercise="3.2"
check.causal_mask(causal_mask)


# %% [markdown]
# ## 4. Multi-head attention
#
# A model does not attend once but $H$ times in parallel, each **head** with its own slice of the
# projections, so different heads can track different relations (the previous token, the speaker's
# name, the matching bracket…). With `q, k, v` all `[B, L or S, H, D]` the computation is a batched
# matrix product over `(B, H)`:
#
# 1. scores `[B, H, L, S]` $= q\,k^\top \cdot$ scale — `torch.einsum("blhd,bshd->bhls", q, k)` reads the
#    tokens-first layout directly;
# 2. where the mask is `False`, the score becomes $-\infty$ (`masked_fill(~mask, float("-inf"))`);
# 3. softmax over the keys (the last axis);
# 4. weights times values, back to `[B, L, H, D]`: `torch.einsum("bhls,bshd->blhd", weights, v)`.
#
# ### Exercise 3.3 — `scaled_dot_product_attention(q, k, v, mask=None, scale=None)`
#
# `mask` is `bool`, broadcastable to `[B, H, L, S]` (a `[L, S]` causal mask, or `[B, 1, L, S]`);
# `scale=None` means $1/\sqrt{D}$. You may use `torch.softmax` or your own `softmax`. The check
# compares with PyTorch's `F.scaled_dot_product_attention` computed in float64, and recognises a
# missing scale, a softmax over the wrong axis and an inverted mask.

# %% tags=["exercise"] exercise="3.3"
def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(q·kᵀ · scale, -inf where mask is False) · v.
    q: [B, L, H, D], k, v: [B, S, H, D], mask: bool broadcastable to [B, H, L, S] -> [B, L, H, D]."""
    # YOUR CODE HERE (Exercise 3.3)
    raise NotImplementedError("Exercise 3.3: implement `scaled_dot_product_attention`")


# %% tags=["check"] exercise="3.3"
check.scaled_dot_product_attention(scaled_dot_product_attention)


# %% [markdown]
# ## 5. Grouped-query attention
#
# During decoding, each new token reads the keys and values of **every** earlier token, of every
# layer: the KV cache, not the arithmetic, sets the speed, and its size sets how many requests fit on
# a GPU. **Multi-query attention** (MQA, Shazeer 2019) keeps $H$ query heads but a single key/value
# head that all of them share: the cache shrinks $H$-fold, at some cost in quality. **Grouped-query
# attention** (GQA, Ainslie et al. 2023) is the middle ground: $H_{kv}$ KV heads, each shared by a group
# of $G = H / H_{kv}$ consecutive query heads. Query head $h$ uses KV head
#
# $$ \text{kv}(h) \;=\; \lfloor h / G \rfloor , $$
#
# the order of HF's `repeat_kv` (heads `0…G−1` share KV head 0, and so on), which is how every Qwen2
# checkpoint was trained. The bundled model has $H = 8$, $H_{kv} = 2$; Qwen2.5-7B has $28$ and $4$.

# %%
def draw_grouping(ax, H: int, H_kv: int, title: str):
    G = H // H_kv
    for h in range(H):
        ax.add_patch(plt.Rectangle((h, 1.2), 0.9, 0.8, color=f"C{h // G}", alpha=0.85))
        ax.text(h + 0.45, 1.6, f"q{h}", ha="center", va="center", fontsize=8, color="white")
    for j in range(H_kv):
        center = j * G + (G - 0.1) / 2
        ax.add_patch(plt.Rectangle((center - 0.45, 0), 0.9, 0.8, color=f"C{j}"))
        ax.text(center, 0.4, f"kv{j}", ha="center", va="center", fontsize=8, color="white")
        for h in range(j * G, (j + 1) * G):
            ax.plot([h + 0.45, center], [1.2, 0.8], color=f"C{j}", lw=0.8)
    ax.set_xlim(-0.2, H)
    ax.set_ylim(-0.1, 2.1)
    ax.axis("off")
    ax.set_title(title, fontsize=9)


fig, axes = plt.subplots(3, 1, figsize=(7, 4.6))
draw_grouping(axes[0], 8, 8, "MHA: H = H_kv = 8 (every query head has its own keys and values)")
draw_grouping(axes[1], 8, 2, "GQA: H = 8, H_kv = 2, G = 4 (the bundled model)")
draw_grouping(axes[2], 8, 1, "MQA: H = 8, H_kv = 1 (one KV head for all)")
fig.tight_layout();


# %% [markdown]
# ### Exercise 3.4 — `grouped_query_attention(q, k, v, *, causal=True, scale=None)`
#
# `q: [B, L, H, D]`, `k, v: [B, S, H_kv, D]` → `[B, L, H, D]`; with `causal=True`, use the
# bottom-right mask of exercise 3.2 (the queries are the last `L` of the `S` positions). This is the
# function the model calls in every layer (`Components.attention`), so it must handle MHA
# (`H_kv = H`), MQA (`H_kv = 1`), a single decoding query and a cached prefix.
#
# Two ways to write it:
#
# * **Materialise**: `k.repeat_interleave(G, dim=2)` (and the same for `v`) gives `[B, S, H, D]`, then
#   it is plain MHA. Correct, and accepted by the check — but it copies the keys and values `G` times,
#   which for decoding means `G` times the memory traffic of the very tensor that dominates it.
# * **Broadcast** (the reference): view `q` as `[B, L, H_kv, G, D]`, so each KV head meets its `G`
#   query heads as extra rows of one matmul. No copy; the cache is read once per group.
#
# Watch the grouping: `repeat_interleave` (`h // G`) and `repeat` (`h % H_kv`) give different answers,
# and only one matches the checkpoint.

# %% tags=["exercise"] exercise="3.4"
def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """GQA: query head h uses KV head h // G, G = H / H_kv.
    q: [B, L, H, D], k, v: [B, S, H_kv, D] -> [B, L, H, D]; causal: bottom-right mask (j <= i + S - L)."""
    # YOUR CODE HERE (Exercise 3.4)
    raise NotImplementedError("Exercise 3.4: implement `grouped_query_attention`")


# %% tags=["check"] exercise="3.4"
check.grouped_query_attention(grouped_query_attention)

# %% [markdown]
# ## 6. Plug it in: your attention inside the engine
#
# `Components(attention=...)` replaces the attention function of every layer. `LLM` notices that the
# attention is not the default one and switches the engine to its `"components"` backend: instead of
# its own paged-attention kernels, for each sequence of each step it gathers that sequence's keys and
# values from the paged KV cache (chapter 07) and calls **your** function with `causal=True` — a
# block of new queries after cached keys, exactly the case of exercise 3.2. Greedy decoding is
# deterministic, so the text must be identical to the default engine's, token for token.

# %%
prompts = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo! wherefore art thou"]
greedy = SamplingParams(temperature=0.0, max_tokens=40)

default_llm = LLM(model_path, num_kv_blocks=128)
student_llm = LLM(model_path, components=Components(attention=grouped_query_attention), num_kv_blocks=128)
print("engine attention backends:", default_llm.engine.attention_backend, "→", student_llm.engine.attention_backend)

expected = default_llm.generate(prompts, greedy, use_tqdm=False)
got = student_llm.generate(prompts, greedy, use_tqdm=False)
for prompt, e, g in zip(prompts, expected, got):
    print(f"--- {prompt!r} → identical token ids: {e.token_ids == g.token_ids}")
    print(prompt + g.text)

# %% [markdown]
# ## 7. What do the heads look at?
#
# The same hook lets us *observe* attention. `recording_attention` below computes exactly what your
# `grouped_query_attention` computes, with your `causal_mask` and `softmax`, but it materialises the
# weights `[B, H, L, S]` and keeps a copy for each layer (the model calls it once per layer, in
# order). We run the plain forward of chapter 04 (`load_model`) on a famous line.

# %%
recorded: list[torch.Tensor] = []
mask_and_softmax = (causal_mask, softmax)  # yours (the package's, below, while yours are not written yet)


def recording_attention(q, k, v, *, causal=True, scale=None):
    """Same contract as grouped_query_attention; appends this layer's weights [H, L, S] (batch row 0) to `recorded`."""
    B, L, H, D = q.shape
    S, G = k.shape[1], H // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)  # fine for a figure
    scores = torch.einsum("blhd,bshd->bhls", q, k) * (D ** -0.5 if scale is None else scale)
    mask_fn, softmax_fn = mask_and_softmax
    if causal:
        scores = scores.masked_fill(~mask_fn(L, S, q.device), float("-inf"))
    weights = softmax_fn(scores, dim=-1)
    recorded.append(weights[0])
    return torch.einsum("bhls,bshd->blhd", weights, v)


model, tokenizer = miniinfer.load_model(model_path, components=Components(attention=recording_attention))
line = "ROMEO.\nBut, soft! what light through yonder window breaks?"
ids = tokenizer.encode(line)
recorded.clear()
try:
    with torch.no_grad():
        model(torch.tensor([ids]))
except NotImplementedError:  # exercise 3.1 or 3.2 not written yet: look at the package's weights meanwhile
    from miniinfer import attention as package_attention

    print("⏳ your softmax or causal_mask is not written yet: the figures below use the package's")
    mask_and_softmax = (package_attention.causal_mask, package_attention.softmax)
    recorded.clear()
    with torch.no_grad():
        model(torch.tensor([ids]))
labels = [repr(tokenizer.decode([i]))[1:-1] for i in ids]  # repr shows a newline as \n
print(f"{len(ids)} tokens, {len(recorded)} layers recorded, weights per layer: {list(recorded[0].shape)} = [H, L, S]")

# %% [markdown]
# Each layer holds `H = 8` maps of `L × L` weights. Rather than print 48 of them, we score every head on
# three simple questions and draw the winners, next to the first head of the first layer:
#
# * **previous token** — how much weight does query $i$ put on key $i - 1$, on average?
# * **one key for all** — is there an earlier key $j \ge 1$ that the later queries (from $j + 2$ on) all
#   look at?
# * **breadth** — the entropy of a row, $-\sum_j w_{ij} \log w_{ij}$ (low = a few keys, high = spread out).

# %%
from matplotlib.colors import PowerNorm  # a square-root colour scale: small weights stay visible

weights = torch.stack(recorded)  # [layers, H, L, L]
num_layers, H, L, _ = weights.shape
i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
previous = weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)  # [layers, H]
later = ((i >= j + 2) & (j >= 1) & (j <= L - 5)).float()  # queries at least 2 after key j; keep 4+ of them
column = ((weights * later).sum(-2) / later.sum(-2).clamp_min(1)).amax(-1)  # [layers, H]
entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(-1)  # [layers, H]


def best(score: torch.Tensor, taken: list) -> tuple[int, int]:
    """(layer, head) with the highest score, among the heads not drawn yet."""
    order = score.flatten().argsort(descending=True).tolist()
    return next(divmod(k, H) for k in order if divmod(k, H) not in taken)


group = H // model.config.num_key_value_heads  # G
chosen = [(0, 0)]
for score in (previous, column, entropy):
    chosen.append(best(score, chosen))
what = ["the first head of layer 0", f"previous token: {previous[chosen[1]]:.0%} on key i - 1",
        f"one key for all: {column[chosen[2]]:.0%} on one key", f"broadest: entropy {entropy[chosen[3]]:.2f} nats"]
panels = list(zip(chosen, what))
fig, axes = plt.subplots(1, 4, figsize=(13, 4.2))
for ax, ((layer, head), what) in zip(axes, panels):
    ax.imshow(weights[layer, head].numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1))
    ax.set_title(f"layer {layer}, head {head} (KV head {head // group})\n{what}", fontsize=8)
    ax.set_xticks(range(L))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_yticks(range(L))
    ax.set_yticklabels(labels if ax is axes[0] else [], fontsize=6)
fig.suptitle("Attention weights of the bundled model (rows: queries, columns: keys; brighter = more weight)",
             fontsize=10)
fig.tight_layout()
print("mean entropy of a row (nats), per layer:", [round(x, 2) for x in entropy.mean(-1).tolist()],
      f"(uniform over all {L} keys: {math.log(L):.2f})")

# %% [markdown]
# Every map is lower-triangular (the causal mask) and every row sums to one; the first rows are bright
# simply because they have only a few keys to share their weight. Beyond that, heads specialise: a
# previous-token head draws a bright line just below the diagonal; a "one key for all" head a bright
# column, often on a punctuation mark or the newline after the speaker's name — a place to park weight
# when nothing else is relevant (an *attention sink*); broad heads average over the whole line. The
# $G = 4$ query heads of a KV group read the same keys, but with different queries, so their patterns
# can differ completely.

# %% [markdown]
# ## 8. Measure: what the KV heads cost
#
# Per token, the cache stores one key and one value vector per KV head and per layer:
#
# $$ \text{KV bytes per token} \;=\; 2 \cdot n_\text{layers} \cdot H_{kv} \cdot D \cdot \text{bytes per element}. $$
#
# Query heads cost nothing here — only $H_{kv}$ counts. Below, three real shapes in bfloat16 (2 bytes),
# each with its actual number of KV heads (GQA) and, for comparison, as if it were MHA ($H_{kv} = H$) or
# MQA ($H_{kv} = 1$).

# %%
cfg = model.config
shapes = {  # name: (layers, H, H_kv, D)
    "bundled shakespeare": (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
    "Qwen2.5-0.5B": (24, 14, 2, 64),
    "Qwen2.5-7B": (28, 28, 4, 128),
}


def kv_bytes_per_token(layers: int, H_kv: int, D: int, bytes_per_element: int = 2) -> int:
    return 2 * layers * H_kv * D * bytes_per_element


print(f"{'model':<22}{'layers':>7}{'H':>4}{'H_kv':>6}{'D':>5}{'MHA':>11}{'GQA':>11}{'MQA':>11}   GQA at 32k tokens")
rows = {}
for name, (layers, H, H_kv, D) in shapes.items():
    rows[name] = [kv_bytes_per_token(layers, h, D) for h in (H, H_kv, 1)]
    mha, gqa, mqa = (b / 1024 for b in rows[name])
    print(f"{name:<22}{layers:>7}{H:>4}{H_kv:>6}{D:>5}{mha:>8.1f} KiB{gqa:>7.1f} KiB{mqa:>7.1f} KiB"
          f"   {rows[name][1] * 32768 / 2**30:.3f} GiB")

fig, ax = plt.subplots(figsize=(8, 3.8))
x = np.arange(len(rows))
for offset, (label, index) in zip((-0.27, 0, 0.27), (("MHA (H_kv = H)", 0), ("GQA (actual)", 1), ("MQA (H_kv = 1)", 2))):
    values = [r[index] / 1024 for r in rows.values()]
    bars = ax.bar(x + offset, values, width=0.27, label=label)
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
ax.set_xticks(x)
ax.set_xticklabels(list(rows))
ax.set_yscale("log")
ax.set_ylabel("KV cache per token (KiB, bf16)")
ax.set_title("Only the KV heads fill the cache: GQA cuts it by H / H_kv")
ax.legend(fontsize=8)
fig.tight_layout();


# %% [markdown]
# For Qwen2.5-7B, GQA turns 392 KiB per token into 56 KiB: a 32k-token conversation needs 1.75 GiB of
# cache instead of 12.25 GiB, so about seven times more concurrent requests fit in the same GPU memory
# — and every decoding step reads seven times fewer bytes.
#
# ### Time on this machine: broadcasting vs copying the KV heads
#
# One decoding step (`L = 1`) of one layer of Qwen2.5-7B's attention (`H = 28`, `H_kv = 4`, `D = 128`),
# for growing contexts `S`: your broadcasting GQA, the "materialise" version that first repeats `k` and
# `v` to 28 heads, and PyTorch's fused `F.scaled_dot_product_attention(..., enable_gqa=True)`. (CPU
# timings vary from run to run; this cell's numbers are not part of the answer key.)

# %% tags=["nbval-ignore-output", "skip-grading"]
def materialised_gqa(q, k, v, *, causal=True, scale=None):
    G = q.shape[2] // k.shape[2]
    mask = causal_mask(q.shape[1], k.shape[1]) if causal else None
    return scaled_dot_product_attention(q, k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2), mask, scale)


def torch_sdpa(q, k, v, *, causal=True, scale=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2)  # L = 1: every key is visible, no mask needed

from miniinfer.course.timing import best_ms

contexts = [256, 1024, 4096, 8192]
timings = {"your GQA (broadcast)": [], "repeat KV, then MHA": [], "torch SDPA (enable_gqa)": []}
for S in contexts:
    q = torch.randn(1, 1, 28, 128)
    k, v = torch.randn(1, S, 4, 128), torch.randn(1, S, 4, 128)
    for label, fn in zip(timings, (grouped_query_attention, materialised_gqa, torch_sdpa)):
        timings[label].append(best_ms(lambda: fn(q, k, v, causal=True)))

fig, ax = plt.subplots(figsize=(7, 3.6))
for label, values in timings.items():
    ax.plot(contexts, values, "o-", label=label)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context length S (keys)")
ax.set_ylabel("ms per decode step, one layer")
ax.set_title("Decode attention, Qwen2.5-7B shapes, on this CPU")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
for label, values in timings.items():
    print(f"{label:<26}" + "  ".join(f"S={S}: {t:.2f} ms" for S, t in zip(contexts, values)))

# %% [markdown]
# Repeating `k` and `v` writes `G = 7` copies of the KV bytes and then reads them again; at decode,
# where moving bytes is nearly the whole cost, that makes it the slowest of the three. On a GPU the
# lesson is the same; chapters 07 and 09 write kernels that read each KV head once per group, straight
# from a paged cache.

# %% [markdown]
# ## Summary
#
# * Attention is $\text{softmax}(QK^\top/\sqrt{D} + M)\,V$; the $1/\sqrt{D}$ keeps the scores' variance at
#   one, and the max subtraction keeps the softmax finite.
# * The causal mask of a block of $L$ queries after $S - L$ cached keys is the lower triangle shifted
#   right by $S - L$ (bottom-right aligned): query $i$ sees keys $j \le i + S - L$.
# * GQA shares each of $H_{kv}$ KV heads among $G = H/H_{kv}$ consecutive query heads ($h \mapsto h // G$);
#   MHA and MQA are its two extremes. The KV cache, and the bytes each decoding step reads, scale with
#   $H_{kv}$, not $H$.
# * `Components(attention=...)` runs your function in every layer of the model and, through the
#   engine's `"components"` backend, on the paged KV cache — with the same greedy output.
#
# **Going further** (no checks):
#
# 1. Sliding-window attention (Mistral, some Qwen2 layers) lets query $i$ see only the last $W$ keys.
#    Add a `window` argument to your `causal_mask`; what does it do to the KV cache a server must keep?
# 2. Write the attention of one query row by row over blocks of keys, keeping a running maximum and a
#    running sum (the *online softmax*). Why does this remove the need to store the `[L, S]` scores?
#    (Chapter 09 builds flash attention on it.)
# 3. Convert an MHA checkpoint to GQA by mean-pooling the key and value heads of each group (the
#    "uptraining" recipe of the GQA paper). Try it on random weights: how far do the outputs move?
# 4. In the heat maps, find a head whose weight sits on the previous token. Does it stay that way on
#    other lines of Shakespeare?
