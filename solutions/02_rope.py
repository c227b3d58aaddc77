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
# # Chapter 02 — Rotary position embedding: traditional vs Qwen2 (half-split), offsets, slices
#
# **What you will build.** Rotary position embedding (RoPE), the way Qwen2, LLaMA and most current
# models tell attention where each token sits: the table of rotation angles, the rotation itself in
# its two conventions — *interleaved* (the paper's, "traditional") and *half-split* (Qwen2's) — and
# the positions of tokens given as an offset, a slice or a tensor. You will see why the two
# conventions are the same rotation in a different order of coordinates, plug your RoPE into the
# bundled model, and watch it write nonsense when the wrong convention is plugged in.
#
# **What you need.** Chapter 01 (the model's building blocks and the `Components` hook). The
# attention that consumes the rotated vectors is chapter 03's subject; here we only need that
# attention compares a query $q$ and a key $k$ by their dot product $q \cdot k$.
#
# Shapes: `H` query heads, `H_kv` key/value heads, `D` head dim, `T` packed tokens, `B`, `L` batch and
# sequence length, `S` number of positions in a table; `*` means any leading token dimensions
# (`[B, L]` or `[T]`).

# %% [markdown]
# ## 1. The idea: rotate pairs of coordinates by an angle proportional to the position
#
# Attention compares every query with every key by a dot product, and a dot product knows nothing of
# order: shuffle the tokens and the scores are shuffled with them. Something must tell the model
# where each token is. RoPE (Su et al., 2021, *RoFormer*) does it by **rotating** the query and key
# vectors of a token at position $p$. Split the $D$ coordinates of a head into $D/2$ pairs; rotate
# pair $i$ by the angle $p\,\theta_i$:
#
# $$ \begin{pmatrix} a' \\ b' \end{pmatrix} = \begin{pmatrix} \cos p\theta_i & -\sin p\theta_i \\
#    \sin p\theta_i & \cos p\theta_i \end{pmatrix} \begin{pmatrix} a \\ b \end{pmatrix},
#    \qquad \theta_i = \text{theta}^{-2i/D}, \quad i = 0, \dots, D/2 - 1 . $$
#
# The frequencies fall geometrically from $\theta_0 = 1$ radian per token to about $1/\text{theta}$
# (`rope_theta` = 10 000 in the bundled model, 1 000 000 in Qwen2.5). Fast pairs distinguish
# neighbours; slow pairs turn so little that they tell distant positions apart without wrapping around.
#
# Why a rotation? Because rotations compose: $R(\alpha)^\top R(\beta) = R(\beta - \alpha)$. For a query
# at position $m$ and a key at position $n$,
#
# $$ \big(R(m\theta)\,q\big) \cdot \big(R(n\theta)\,k\big) = q \cdot R\big((n - m)\,\theta\big)\,k , $$
#
# so the score depends on the two contents and on the **distance** $n - m$ only — yet each token is
# rotated on its own, knowing only its own position. That is what lets a KV cache (chapter 05) store
# every key once, already rotated, and reuse it for every later query.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import miniinfer
from miniinfer import rope
from miniinfer.models.config import Qwen2Config

torch.manual_seed(0)
MODEL = miniinfer.bundled_model_path("shakespeare")
config = Qwen2Config.from_folder(MODEL)
D, THETA, CONTEXT = config.head_dim, config.rope_theta, config.max_position_embeddings
print(f"bundled model: D = {D}, rope_theta = {THETA:g}, max_position_embeddings = {CONTEXT}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for head_dim, theta, label in ((D, THETA, f"bundled: D={D}, theta={THETA:g}"), (128, 1e6, "Qwen2.5: D=128, theta=1e6")):
    i = np.arange(head_dim // 2)
    freq = theta ** (-2 * i / head_dim)
    axes[0].semilogy(i / (head_dim // 2), freq, "o-", ms=3, label=label)
    axes[1].semilogy(i / (head_dim // 2), 2 * np.pi / freq, "o-", ms=3, label=label)
axes[0].set_title("frequency θ_i (radians per token)")
axes[1].set_title("wavelength 2π/θ_i (tokens per turn)")
axes[1].axhline(CONTEXT, color="grey", ls="--", lw=1)
axes[1].text(0, CONTEXT * 1.3, f"bundled context ({CONTEXT})", fontsize=8)
for ax in axes[:2]:
    ax.set_xlabel("pair index i / (D/2)")
    ax.legend(fontsize=8)
# A rotation picture: one fast pair and one slow pair of the bundled model, at positions 0..7.
ax = axes[2]
ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="lightgrey"))
for i, color in ((0, "C0"), (3, "C1")):
    angle_step = THETA ** (-2 * i / D)
    for p in range(8):
        angle = p * angle_step
        ax.annotate("", xy=(np.cos(angle), np.sin(angle)), xytext=(0, 0),
                    arrowprops=dict(arrowstyle="->", color=color, alpha=0.35 + 0.65 * p / 7))
        ax.text(np.cos(angle) * (1.1 + 0.12 * i), np.sin(angle) * (1.1 + 0.12 * i), str(p), color=color,
                fontsize=8, ha="center", va="center")
    ax.plot([], [], color=color, label=f"pair {i}: θ = {angle_step:.2f} rad/token")
ax.legend(fontsize=8, loc="lower left")
ax.set_aspect("equal")
ax.set_xlim(-1.6, 1.6)
ax.set_ylim(-1.6, 1.6)
ax.set_title("the pair (1, 0) at positions 0…7")
fig.tight_layout();

# %% [markdown]
# In the bundled model ($D = 32$, 16 pairs) the fastest pair turns once every 6 tokens, the slowest
# once every ~35 000 — far beyond the 1024 positions it was trained on.
#
# ## 2. The tables
#
# The angles $p\,\theta_i$ do not depend on the input, so a model computes $\cos$ and $\sin$ once, as
# two tables `[S, D/2]` (row $p$, column $i$), and looks rows up by position. The reference computes
# them exactly as HF transformers does, in float32: the inverse frequencies
# `1 / theta ** (arange(0, D, 2) / D)` — note that `arange(0, D, 2)` already holds the $2i$ — then
# one float32 product per angle. (Matching HF's arithmetic, not just its math, matters at long
# positions: at $p = 10\,000$ a float32 angle is only good to about $10^{-3}$ radians, so two
# different-but-accurate recipes disagree by that much.)
#
# ### Exercise 2.1 — `rope_cos_sin`
#
# Write `rope_cos_sin(max_positions, head_dim, theta)` returning `(cos, sin)`, each `[max_positions,
# head_dim // 2]`, float32, with `cos[p, i] = cos(p · theta ** (-2i / head_dim))`. (`device` says where
# to create the tables; pass it to `torch.arange`.) The check knows the classic slips: the exponent off
# by a factor 2, positions starting at 1, cos and sin swapped.

# %% tags=["exercise"] exercise="2.1"
import torch


def rope_cos_sin(max_positions: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (cos, sin), each [max_positions, head_dim // 2] float32: cos[p, i] = cos(p * theta ** (-2i / D))."""
    ### BEGIN SOLUTION
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # [D/2]
    angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)  # [S, D/2]
    return angles.cos(), angles.sin()
    ### END SOLUTION


# %% tags=["check"] exercise="2.1"
from miniinfer.course import check

check.rope_cos_sin(rope_cos_sin)

# %% [markdown]
# ## 3. Which coordinates form a pair? Two conventions
#
# The math says "pairs"; it does not say which coordinates. Two conventions exist, and a checkpoint
# only works with the one it was trained with:
#
# * **interleaved** ("traditional"): pair $i$ is $(x_{2i}, x_{2i+1})$ — neighbours. The RoFormer paper,
#   Meta's original LLaMA code (which views the pairs as complex numbers), GPT-J.
# * **half-split**: pair $i$ is $(x_i, x_{i + D/2})$ — the same slot in the two halves of the head.
#   GPT-NeoX, and the `rotate_half` of HF's LLaMA and Qwen2 code — hence **every Qwen2 checkpoint**.
#
# Half-split is the cheaper one to write with tensors: the two halves are contiguous blocks, so the
# rotation is two multiplies and a concatenation, with no strided gathers:
#
# $$ \text{out} = \big[\, x_1 \cos - x_2 \sin \;,\; x_2 \cos + x_1 \sin \,\big], \qquad
#    x_1 = x_{[0, D/2)},\; x_2 = x_{[D/2, D)} , $$
#
# with `cos`, `sin` the table rows at the token's position (one value per pair, shared by both halves).

# %%
fig, axes = plt.subplots(2, 1, figsize=(9, 2.6))
D_show = 8
for ax, (name, partner) in zip(axes, (("interleaved: (2i, 2i+1)", lambda j: j // 2),
                                      ("half-split: (i, i + D/2)", lambda j: j % (D_show // 2)))):
    for j in range(D_show):
        pair = partner(j)
        ax.add_patch(plt.Rectangle((j, 0), 0.95, 0.9, color=f"C{pair}", alpha=0.8))
        ax.text(j + 0.47, 0.45, f"x{j}\npair {pair}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xlim(0, D_show)
    ax.set_ylim(0, 0.9)
    ax.set_axis_off()
    ax.set_title(name, fontsize=10, loc="left")
fig.tight_layout();

# %% [markdown]
# ### Exercise 2.2 — `apply_rope` (half-split, Qwen2)
#
# Write `apply_rope(x, cos, sin)` for `x [*, H, D]` and `cos`, `sin` `[*, D/2]` — one row per token,
# the same for every head. Insert a head axis into `cos` and `sin` (`unsqueeze(-2)`) so that they
# broadcast over `H`, and build a new tensor (don't modify `x` in place). Note that `cos` may have fewer
# leading dimensions than `x`: for a plain forward over `[B, L]` the model passes the table rows
# `[L, D/2]` once for the whole batch, and broadcasting takes care of `B`.
#
# The model calls your function **once per layer on the query and key heads together**,
# `[*, H + H_kv, D]`: RoPE treats every head alike, so nothing changes for you. The check compares
# with the package, with a rotation done in complex numbers, and with HF's `apply_rotary_pos_emb`.

# %% tags=["exercise"] exercise="2.2"
import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE: x [*, H, D], cos and sin [*, D//2] -> [*, H, D]; pairs (x[i], x[i + D/2])."""
    ### BEGIN SOLUTION
    x1, x2 = x.chunk(2, dim=-1)  # [*, H, D/2] each: the two coordinates of every pair
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [*, 1, D/2]: broadcast over the heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    ### END SOLUTION


# %% tags=["check"] exercise="2.2"
check.apply_rope(apply_rope)

# %% [markdown]
# ### Exercise 2.3 — `apply_rope_interleaved`
#
# Now the traditional convention, pairs $(x_{2i}, x_{2i+1})$: take the even and the odd coordinates
# (`x[..., 0::2]`, `x[..., 1::2]`), rotate them as above, and put every rotated pair back in its
# place — stack the two results on a new last axis and flatten it.

# %% tags=["exercise"] exercise="2.3"
import torch


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE: x [*, H, D], cos and sin [*, D//2] -> [*, H, D]; pairs (x[2i], x[2i+1])."""
    ### BEGIN SOLUTION
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # [*, H, D/2, 2]
    return rotated.flatten(-2)
    ### END SOLUTION


# %% tags=["check"] exercise="2.3"
check.apply_rope_interleaved(apply_rope_interleaved)

# %% [markdown]
# ### One rotation, two orders of coordinates
#
# The two conventions apply the same $D/2$ planar rotations; they only number the coordinates
# differently. Let $P$ be the permutation that lists the even coordinates first, then the odd ones
# (`rope.interleaved_to_half_split`). It sends the interleaved pair $(2i, 2i+1)$ to the half-split pair
# $(i, i + D/2)$, so
#
# $$ R_\text{half}(P x) = P\, R_\text{interleaved}(x) \quad\text{for every } x , $$
#
# and, since a permutation does not change dot products, $P q \cdot P k = q \cdot k$: a model trained
# with one convention runs with the other if every q and k head is permuted — that is, if the rows of
# its q and k projection weights (and biases) are reordered once. HF's script that converts Meta's
# LLaMA checkpoints does exactly that.

# %%
torch.manual_seed(0)
x = torch.randn(5, 3, D, dtype=torch.float64)  # [T, H, D]
cos, sin = (t.double() for t in rope.rope_cos_sin(5, D, THETA))
left = apply_rope(rope.interleaved_to_half_split(x), cos, sin)
right = rope.interleaved_to_half_split(apply_rope_interleaved(x, cos, sin))
print("R_half(P x) == P R_interleaved(x):", torch.allclose(left, right, atol=1e-12))
print("but R_half(x) == R_interleaved(x):", torch.allclose(apply_rope(x, cos, sin), apply_rope_interleaved(x, cos, sin)))

# %% [markdown]
# ## 4. The relative-position property, measured
#
# Take one query vector and one key vector, put the query at every position $m$ and the key at every
# position $n$, and compute all the scores $R(m\theta) q \cdot R(n\theta) k$. If the score depends only
# on $n - m$, the matrix is constant along its diagonals.

# %%
S = 64
cos_table, sin_table = rope.rope_cos_sin(S, D, THETA)
torch.manual_seed(0)
q, k = torch.randn(D), torch.randn(D)
q_at = rope.apply_rope(q.expand(S, 1, D), cos_table, sin_table)[:, 0]  # [S, D]: q at positions 0..S-1
k_at = rope.apply_rope(k.expand(S, 1, D), cos_table, sin_table)[:, 0]
scores = q_at @ k_at.T  # [m, n]
diagonal_spread = max((torch.diagonal(scores, offset).max() - torch.diagonal(scores, offset).min()).item()
                      for offset in range(-S + 1, S))
print("every diagonal is constant (to float32 rounding):", diagonal_spread < 1e-5 * scores.abs().max().item() * S)

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
image = axes[0].imshow(scores, cmap="RdBu_r")
axes[0].set_xlabel("key position n")
axes[0].set_ylabel("query position m")
axes[0].set_title("q·k after RoPE: constant along diagonals")
fig.colorbar(image, ax=axes[0])
# Long-range decay (RoFormer §3.4.3): with q = k = all ones, the score is Σ_i 2 cos(d θ_i) / D.
distance = np.unique(np.logspace(0, np.log10(20000), 600).astype(int))
for head_dim, theta, label in ((D, THETA, f"D={D}, theta={THETA:g} (bundled)"), (128, 1e4, "D=128, theta=1e4"),
                               (128, 1e6, "D=128, theta=1e6 (Qwen2.5)")):
    freq = theta ** (-2 * np.arange(head_dim // 2) / head_dim)
    axes[1].plot(distance, np.cos(np.outer(distance, freq)).mean(axis=1), lw=1, label=label)
axes[1].set_xscale("log")
axes[1].set_xlabel("distance n − m (tokens)")
axes[1].set_ylabel("score / |q||k|")
axes[1].set_title("q = k: the score decays with distance")
axes[1].legend(fontsize=8)
fig.tight_layout();

# %% [markdown]
# Right: for a query equal to its key, the score falls as they move apart (with ripples), and a larger
# `theta` stretches the decay over longer distances — one reason long-context models raise it. This is
# a tendency, not a rule: trained q and k vectors can still attend far back when it matters.
#
# ## 5. Positions: offsets, slices, packed tensors
#
# Each token's rotation needs its position, and a model is handed positions in three shapes:
#
# * **an offset**: `length` new tokens after `offset` tokens already processed — with a KV cache,
#   the first decode step of a 7-token prompt has `offset = 7, length = 1` (positions start at 0, so
#   the 8th token sits at position 7);
# * **a slice** `start:stop[:step]`, a contiguous range of positions;
# * **a tensor** with one position per token: a packed batch of several sequences (chapter 06) restarts
#   at each sequence's own offset, e.g. `[0, 1, 2, 3, 0, 1, 5]`.
#
# ### Exercise 2.4 — `make_positions`
#
# Write `make_positions(spec, length=None, device=None)` returning an int64 tensor:
# an `int` offset gives `offset, …, offset + length − 1` (raise `ValueError` if `length` is missing or
# the offset is negative); a `slice` gives its range (a missing start means 0, a missing step 1; raise
# `ValueError` without a stop); a tensor is returned as int64 on `device` (its own device when
# `device` is None).

# %% tags=["exercise"] exercise="2.4"
import torch


def make_positions(spec: int | slice | torch.Tensor, length: int | None = None, device=None) -> torch.Tensor:
    """int offset (+ length), slice, or tensor of positions -> int64 positions."""
    ### BEGIN SOLUTION
    if isinstance(spec, torch.Tensor):
        return spec.to(device=device if device is not None else spec.device, dtype=torch.long)
    if isinstance(spec, slice):
        if spec.stop is None:
            raise ValueError("a positions slice needs a stop")
        return torch.arange(spec.start or 0, spec.stop, spec.step or 1, device=device)
    if length is None:
        raise ValueError("an int offset needs length=")
    if spec < 0:
        raise ValueError(f"positions offset must be >= 0, got {spec}")
    return torch.arange(spec, spec + length, device=device)
    ### END SOLUTION


# %% tags=["check"] exercise="2.4"
check.make_positions(make_positions)

# %% [markdown]
# Because each token is rotated on its own, rotating a whole sequence at once or in pieces — a prompt,
# then one token at a time at its offset — gives the same vectors. This is what makes a KV cache
# possible: a key rotated once stays valid for every later query.

# %%
rotary = rope.RotaryEmbedding(D, max_positions=CONTEXT, theta=THETA, apply_fn=apply_rope)
L, prompt_length = 11, 7
torch.manual_seed(0)
x = torch.randn(L, 3, D)  # [T, H, D]
whole = apply_rope(x, *rotary.cos_sin(make_positions(0, length=L)))
prompt = apply_rope(x[:prompt_length], *rotary.cos_sin(make_positions(slice(0, prompt_length))))
decoded = [apply_rope(x[p : p + 1], *rotary.cos_sin(make_positions(p, length=1))) for p in range(prompt_length, L)]
print("whole sequence == prompt + one token at a time:",
      torch.allclose(whole, torch.cat([prompt, *decoded]), atol=1e-6))

# %% [markdown]
# ## 6. Plug it in
#
# `Components(apply_rope=…)` makes every attention layer of the model rotate its queries and keys with
# your function. First your half-split RoPE — the text must be exactly the reference's:

# %%
from miniinfer import LLM, SamplingParams
from miniinfer.components import Components

greedy = SamplingParams(temperature=0.0, max_tokens=48)
prompt = "KING HENRY.\n"


def write(components=None, llm=None):
    llm = llm or LLM(MODEL, components=components)
    return llm.generate(prompt, greedy, use_tqdm=False)[0].text


reference_text = write()
your_text = write(Components(apply_rope=apply_rope))
print(prompt + your_text)
print("---\nidentical to the reference:", your_text == reference_text)

# %% [markdown]
# Now the lesson every inference engineer learns once: plug in the **other** convention. Every shape is
# right, nothing crashes — and the text degrades:

# %%
wrong_text = write(Components(apply_rope=apply_rope_interleaved))
print(prompt + wrong_text)

# %% [markdown]
# How bad is it? Measure the model's **loss** on a passage it never saw in training (the opening of
# *Twelfth Night*, held out): the mean of $-\log p(\text{next token})$, in nats, lower is better. With
# the wrong convention the model is almost as lost as with no position information at all (RoPE
# replaced by the identity): the rotations it sees are not the ones it learned to read.

# %%
import torch.nn.functional as F

from miniinfer.tokenizer import Tokenizer

tokenizer = Tokenizer.from_folder(MODEL)
PASSAGE = """DUKE.
If music be the food of love, play on,
Give me excess of it; that, surfeiting,
The appetite may sicken and so die.
That strain again, it had a dying fall;
O, it came o'er my ear like the sweet sound
That breathes upon a bank of violets,
Stealing and giving odour. Enough; no more;
'Tis not so sweet now as it was before.
O spirit of love, how quick and fresh art thou,
That notwithstanding thy capacity
Receiveth as the sea, nought enters there,
Of what validity and pitch soe'er,
But falls into abatement and low price
Even in a minute! So full of shapes is fancy,
That it alone is high fantastical.
"""


def loss_on_passage(model) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on PASSAGE."""
    ids = torch.tensor([tokenizer.encode(PASSAGE)])  # [1, L]
    with torch.inference_mode():
        logits = model(ids)[0, :-1]  # the prediction for every token but the first
    return F.cross_entropy(logits, ids[0, 1:]).item()


variants = {
    "reference (half-split)": Components(),
    "yours (half-split)": Components(apply_rope=apply_rope),
    "interleaved: wrong convention": Components(apply_rope=apply_rope_interleaved),
    "no RoPE at all": Components(apply_rope=lambda x, cos, sin: x),
}
losses = {}
for name, components in variants.items():
    model, _ = miniinfer.load_model(MODEL, components=components)
    losses[name] = loss_on_passage(model)
for name, loss in losses.items():
    print(f"{name:30} loss {loss:.2f}")

# %% [markdown]
# And the cure, from section 3: keep the interleaved RoPE, but reorder the rows of every q and k head
# in the fused `qkv_proj` weight and bias with $P^{-1}$ (`half_split_to_interleaved`). Then the
# interleaved model computes $P^{-1} q$ and $P^{-1} k$ where the original computed $q$ and $k$, rotates
# them into $P^{-1} R_\text{half}(q)$ and $P^{-1} R_\text{half}(k)$, and every attention score is
# unchanged. The values (`v`) are not rotated and stay as they are.

# %%
def permute_qk_rows_to_interleaved(model) -> None:
    """Reorder each q and k head's output rows (weight and bias of qkv_proj) from half-split to interleaved."""
    H, H_kv, D = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            qkv = layer.self_attn.qkv_proj
            weight = qkv.weight.view(H + 2 * H_kv, D, -1)  # [heads, D, E]: row d of every head
            weight[: H + H_kv] = rope.half_split_to_interleaved(weight[: H + H_kv].transpose(1, 2)).transpose(1, 2)
            bias = qkv.bias.view(H + 2 * H_kv, D)
            bias[: H + H_kv] = rope.half_split_to_interleaved(bias[: H + H_kv])


model, _ = miniinfer.load_model(MODEL, components=Components(apply_rope=apply_rope_interleaved))
permute_qk_rows_to_interleaved(model)
losses["interleaved + permuted q/k rows"] = loss_on_passage(model)
print(f"interleaved RoPE + permuted q/k rows: loss {losses['interleaved + permuted q/k rows']:.2f}")

llm = LLM(MODEL, components=Components(apply_rope=apply_rope_interleaved))
permute_qk_rows_to_interleaved(llm.model)
print("its greedy text is identical to the reference:", write(llm=llm) == reference_text)

fig, ax = plt.subplots(figsize=(8, 2.8))
ax.barh(list(losses), list(losses.values()), color=["C0", "C2", "C3", "C7", "C1"])
ax.axvline(losses["reference (half-split)"], color="grey", ls="--", lw=1)
ax.invert_yaxis()
ax.set_xlabel("loss on a held-out passage (nats / token, lower is better)")
ax.set_title("The bundled model with each RoPE variant")
fig.tight_layout();

# %% [markdown]
# ## 7. Measure: the cost of the two conventions
#
# The half-split form reads two contiguous halves; the interleaved form reads every other element
# (strided) and writes through a stack. The complex-number form (Meta's LLaMA code) views each pair as
# one complex number and multiplies by $e^{i p \theta}$. Same math, different memory access. Here is the
# time of each on this CPU for one layer's queries and keys over 1024 tokens of the bundled model
# (timings vary from machine to machine, so they are not part of the answer key).

# %% tags=["nbval-ignore-output", "skip-grading"]
from miniinfer.course.timing import median_seconds


def apply_rope_complex(x, cos, sin):
    """Meta-LLaMA style: interleaved pairs as complex numbers times e^{i·angle}."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * torch.complex(cos, sin).unsqueeze(-2)).flatten(-2).to(x.dtype)


T = CONTEXT
heads = config.num_attention_heads + config.num_key_value_heads
x = torch.randn(T, heads, D)
cos, sin = rotary.cos_sin(torch.arange(T))
timings = {
    "half-split (reference)": median_seconds(lambda: rope.apply_rope(x, cos, sin), repeat=15),
    "half-split (yours)": median_seconds(lambda: apply_rope(x, cos, sin), repeat=15),
    "interleaved (reference)": median_seconds(lambda: rope.apply_rope_interleaved(x, cos, sin), repeat=15),
    "interleaved (yours)": median_seconds(lambda: apply_rope_interleaved(x, cos, sin), repeat=15),
    "complex numbers": median_seconds(lambda: apply_rope_complex(x, cos, sin), repeat=15),
}
assert torch.allclose(apply_rope_complex(x, cos, sin), rope.apply_rope_interleaved(x, cos, sin), atol=1e-5)
fig, ax = plt.subplots(figsize=(8, 2.8))
ax.barh(list(timings), [s * 1e3 for s in timings.values()], color=["C0", "C0", "C1", "C1", "C2"])
ax.invert_yaxis()
ax.set_xlabel(f"milliseconds for x [{T}, {heads}, {D}] (this CPU)")
ax.set_title("RoPE: same rotation, different memory access")
fig.tight_layout()
for name, s in timings.items():
    print(f"{name:24} {s * 1e3:6.3f} ms")

# %% [markdown]
# If the complex-number form wins on your machine, that is because torch multiplies complex tensors in
# one vectorised pass, where the two real forms take several elementwise passes and a concatenation.
# On a GPU the gap between the conventions is small once the rotation is fused into the attention or
# the qkv-projection kernel — what remains is the rule that a checkpoint must be run with the
# convention it was trained with (or permuted, as above).
#
# ## Summary
#
# * RoPE rotates pair $i$ of every query and key head by $p\,\theta_i$, $\theta_i = \text{theta}^{-2i/D}$;
#   scores then depend only on the distance between positions, and each token is rotated on its own.
# * The cos/sin tables `[S, D/2]` are computed once (in float32, the way the checkpoint's framework
#   did) and indexed by position.
# * Interleaved pairs $(2i, 2i+1)$ and half-split pairs $(i, i+D/2)$ are the same rotation in
#   permuted coordinates; Qwen2 checkpoints need half-split, or their q/k rows permuted.
# * Positions come as an offset (KV cache), a slice or a per-token tensor (packed batches); rotating in
#   pieces equals rotating the whole sequence.
#
# **Going further** (no checks):
#
# 1. Long-context tricks change the frequencies: "NTK-aware" scaling raises `theta`, YaRN rescales
#    some frequencies and not others. Plot the wavelengths of `theta = 1e4` against `theta = 1e4 · 8`
#    for $D = 128$: which pairs change most, and why would that help a model run past its training length?
# 2. Compute `rope_cos_sin` in float64 and in float32 for 32 768 positions. How large is the error of
#    the float32 angles at the last position, in radians? Why does the reference still use float32?
# 3. Some models (GPT-J, Phi) rotate only the first part of each head (`partial_rotary_factor`). Write
#    `apply_rope_partial(x, cos, sin, rotary_dim)` from your `apply_rope`.
# 4. Check on the bundled model that permuting the q/k rows *and* using interleaved RoPE gives logits
#    equal to the original's to float32 rounding — and find the largest difference. Where does it come from?
