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
# # Chapter 01 — Building blocks: Linear, SwiGLU MLP, RMSNorm, embedding, tied head
#
# **What you will build.** The pieces every layer of a modern decoder-only transformer is made of,
# with the same signatures as `miniinfer/layers.py`: a linear layer, RMSNorm, the SwiGLU gate of the
# feed-forward block, the token embedding and the (tied) language-model head. Then you plug your
# RMSNorm and SwiGLU into the real model and check that the bundled Shakespeare model writes the same
# text with them.
#
# **What you need.** Chapter 00 (a working environment) and basic PyTorch: tensors, broadcasting,
# `@`. No GPU: everything here runs on a laptop CPU in a few seconds.
#
# The shape letters used everywhere in the course: `B` batch, `L` sequence length, `T` packed tokens,
# `E` hidden size, `I` MLP (intermediate) size, `V` vocabulary size, `H`/`H_kv` query/key-value heads,
# `D` head dim. A `...` in a shape means "any leading dimensions".

# %% [markdown]
# ## 1. The map: where the parameters live
#
# A decoder-only transformer turns token ids into one score per vocabulary entry for the next token:
#
# ```
# ids [B, L] ─ embedding ─▶ x [B, L, E] ─▶ N × ┌ x = x + attention(RMSNorm(x))   ┐ ─▶ RMSNorm ─▶ LM head ─▶ logits [B, L, V]
#                                               └ x = x + MLP(RMSNorm(x))         ┘
# ```
#
# `x` is the **residual stream**: every block reads a normalised copy of it and *adds* its result
# back. Attention (chapters 02–03) mixes information *between* positions; everything in this chapter
# works on each token on its own. Here is the bundled model's configuration — the model that every
# chapter runs — and where its parameters are.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import miniinfer
from miniinfer.models.config import Qwen2Config

torch.manual_seed(0)
MODEL = miniinfer.bundled_model_path("shakespeare")
config = Qwen2Config.from_folder(MODEL)
print(f"E = {config.hidden_size}, I = {config.intermediate_size}, V = {config.vocab_size}, "
      f"layers = {config.num_hidden_layers}, H = {config.num_attention_heads}, H_kv = {config.num_key_value_heads}, "
      f"D = {config.head_dim}, tied head: {config.tie_word_embeddings}, rms_norm_eps = {config.rms_norm_eps:g}")

# %% [markdown]
# Every weight matrix of a Qwen2 model follows from seven numbers, so we can count the parameters
# with a few lines of arithmetic — and check the count against the real checkpoint:

# %%
def parameter_breakdown(E, I, V, layers, H, H_kv, D, tied):
    """Parameters of a Qwen2 model by kind (the q, k, v projections carry a bias, o_proj does not)."""
    attention = E * (H * D) + H * D + 2 * (E * (H_kv * D) + H_kv * D) + (H * D) * E  # q, k, v (+bias), o
    mlp = 3 * E * I                                                                    # gate, up, down
    return {
        "embedding": V * E,
        "LM head (untied)": 0 if tied else V * E,
        "attention": layers * attention,
        "MLP": layers * mlp,
        "norms": (2 * layers + 1) * E,
    }


model, tokenizer = miniinfer.load_model(MODEL)
ours = parameter_breakdown(config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers,
                           config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                           config.tie_word_embeddings)
assert sum(ours.values()) == model.num_parameters()
print(f"bundled model: {model.num_parameters():,} parameters")
for kind, count in ours.items():
    print(f"  {kind:17} {count:>10,}  ({count / model.num_parameters():5.1%})")

# %% [markdown]
# Compare with two real Qwen2.5 models (numbers from their `config.json` on the Hugging Face Hub).
# The embedding table has $V \cdot E$ parameters, and $V$ does not shrink with the model: a vocabulary
# of 152 000 tokens is 136 M parameters at $E = 896$. A small model therefore spends a large share of
# its parameters on the embedding — which is why small models **tie** the LM head to it (section 5):
# an untied head would double that share.

# %%
models = {
    "bundled (4.4 M)": ours,
    "Qwen2.5-0.5B": parameter_breakdown(896, 4864, 151936, 24, 14, 2, 64, tied=True),
    "Qwen2.5-7B": parameter_breakdown(3584, 18944, 152064, 28, 28, 4, 128, tied=False),
}
fig, ax = plt.subplots(figsize=(9, 3.2))
for row, (name, parts) in enumerate(models.items()):
    total, left = sum(parts.values()), 0.0
    for color, (kind, count) in enumerate(parts.items()):
        share = count / total
        ax.barh(row, share, left=left, color=f"C{color}", label=kind if row == 0 else None)
        if share > 0.06:
            ax.text(left + share / 2, row, f"{share:.0%}", ha="center", va="center", color="white", fontsize=9)
        left += share
    print(f"{name:16} {total / 1e6:8.1f} M parameters, embedding + head {(parts['embedding'] + parts['LM head (untied)']) / total:.0%}")
ax.set_yticks(range(len(models)), list(models))
ax.invert_yaxis()
ax.set_xlim(0, 1)
ax.set_xlabel("share of the parameters")
ax.set_title("Where the parameters are")
ax.legend(ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8)
fig.tight_layout();

# %% [markdown]
# ## 2. Linear layers
#
# Most of those parameters sit in **linear layers**: $y = x W^\top + b$, with $x$ of shape
# `[..., in]`, the weight $W$ of shape `[out, in]` and an optional bias $b$ `[out]`. PyTorch and HF
# checkpoints store $W$ as `[out, in]` so that the weights of one output feature form one contiguous
# row. Per token a linear layer costs $2 \cdot \text{in} \cdot \text{out}$ floating-point operations
# (a multiply and an add per weight) and reads every weight once — remember this for decoding, where
# one token's worth of arithmetic has to pay for reading the whole matrix.
#
# In a Qwen2 layer, the q, k and v projections have a bias, the output projection and the MLP
# matrices do not.
#
# ### Exercise 1.1 — `linear`
#
# Write `linear(x, weight, bias=None)`: `x @ weight.T`, plus `bias` when one is given. Any number of
# leading dimensions (`x` may even be a single vector `[in]`), and keep `x`'s dtype. (The one-liner
# `torch.nn.functional.linear` is what the package uses; write it yourself with `@`.)

# %% tags=["exercise"] exercise="1.1"
import torch


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] or None -> [..., out]."""
    ### BEGIN SOLUTION
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out
    ### END SOLUTION


# %% tags=["check"] exercise="1.1"
from miniinfer.course import check

check.linear(linear)

# %% [markdown]
# ## 3. RMSNorm
#
# Each block reads the residual stream through a normalisation: it rescales every token's vector to a
# fixed size, so that the block sees inputs of a predictable scale however large the stream has grown.
# LayerNorm (the original transformer's) subtracts the mean and divides by the standard deviation;
# **RMSNorm** (Zhang & Sennrich, 2019) skips the mean and just divides by the root mean square:
#
# $$ \operatorname{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{E}\sum_{j=1}^{E} x_j^2 + \epsilon}} \odot g, $$
#
# where $g$ `[E]` is a learned gain (the `weight`) and $\epsilon$ (`rms_norm_eps`, $10^{-6}$ here) keeps
# an all-zero vector from dividing by zero. No mean to subtract, no bias to add: fewer operations for
# the same quality, which is why LLaMA, Qwen and most recent models use it.
#
# The figure shows what it does to tokens of very different sizes: before, their RMS spans four
# orders of magnitude; after (with $g = 1$), every token has RMS 1 — only the *direction* of each
# vector survives.

# %%
E = 64
torch.manual_seed(0)
rows = torch.randn(200, E) * torch.logspace(-2, 2, 200)[:, None]  # token vectors of very different sizes
normalized = F.rms_norm(rows, (E,), eps=1e-6)
bins = np.linspace(-2.5, 2.5, 51)
fig, ax = plt.subplots(figsize=(8, 3))
ax.hist(rows.pow(2).mean(-1).sqrt().log10(), bins=bins, color="C0", label="before")
ax.hist(normalized.pow(2).mean(-1).sqrt().log10(), bins=bins, color="C1", label="after RMSNorm (gain 1)")
ax.set_xlabel("log10 of a token's RMS")
ax.set_ylabel("tokens")
ax.set_title("200 token vectors before and after RMSNorm")
ax.legend()
fig.tight_layout();

# %% [markdown]
# ### Why the statistics are computed in float32
#
# On a GPU the model runs in bfloat16 or float16. The mean of squares is where that hurts: float16
# overflows above 65 504, so an activation of 300 — common in the residual stream of large models — has
# a square float16 cannot hold.

# %%
x16 = torch.full((4,), 300.0, dtype=torch.float16)
print("mean of squares in float16:", x16.pow(2).mean().item(), "  in float32:", x16.float().pow(2).mean().item())

# %% [markdown]
# So the reference (like HF transformers) converts `x` to float32, computes the normalised vector there,
# converts it back to `x`'s dtype, and only then multiplies by the weight.
#
# ### Exercise 1.2 — `rms_norm`
#
# Write `rms_norm(x, weight, eps)` for `x [..., E]` and `weight [E]`: mean of squares over the last
# dimension, in float32; multiply by `torch.rsqrt(mean_square + eps)`; cast back to `x.dtype`; multiply
# by `weight`. The check compares with the package, with `torch.nn.functional.rms_norm` in float64 and
# with HF's `Qwen2RMSNorm`, and knows the usual slips (the variance instead of the mean square, a
# forgotten `eps` or `weight`, `sqrt` for `rsqrt`).

# %% tags=["exercise"] exercise="1.2"
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., E], weight [E] -> x / sqrt(mean(x**2) + eps) * weight, statistics in float32."""
    ### BEGIN SOLUTION
    x32 = x.float()
    mean_square = x32.pow(2).mean(dim=-1, keepdim=True)
    normalized = x32 * torch.rsqrt(mean_square + eps)
    return normalized.to(x.dtype) * weight
    ### END SOLUTION


# %% tags=["check"] exercise="1.2"
check.rms_norm(rms_norm)

# %% [markdown]
# ## 4. The SwiGLU MLP
#
# The feed-forward block widens each token's vector from $E$ to $I$ features, applies a nonlinearity,
# and projects back. Qwen2 (like LLaMA) uses a **gated** MLP, SwiGLU (Shazeer, 2020):
#
# $$ \operatorname{MLP}(x) = \Big(\operatorname{SiLU}(x W_\text{gate}^\top) \odot x W_\text{up}^\top\Big)\, W_\text{down}^\top,
# \qquad \operatorname{SiLU}(z) = z\,\sigma(z) = \frac{z}{1 + e^{-z}}. $$
#
# Two projections read the same input: `up` carries the content, `gate` decides per feature how much
# of it passes. SiLU is a smooth ReLU: it lets small negative values through (its minimum is about
# −0.28, at $z \approx -1.28$) and has a nonzero gradient everywhere.

# %%
z = torch.linspace(-5, 5, 401)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(z, F.relu(z), label="ReLU")
axes[0].plot(z, F.silu(z), label="SiLU = z·σ(z)")
axes[0].plot(z, F.gelu(z), "--", label="GELU")
axes[0].plot(z, torch.sigmoid(z), ":", label="σ(z)")
axes[0].set_ylim(-1, 5)
axes[0].axhline(0, color="grey", lw=0.5)
axes[0].legend()
axes[0].set_title("activation functions")
gate, up = torch.meshgrid(z, z, indexing="ij")
image = axes[1].imshow(F.silu(gate) * up, extent=(-5, 5, -5, 5), origin="lower", cmap="RdBu_r", vmin=-15, vmax=15)
axes[1].set_xlabel("up")
axes[1].set_ylabel("gate")
axes[1].set_title("SwiGLU: SiLU(gate) · up")
fig.colorbar(image, ax=axes[1])
fig.tight_layout();

# %% [markdown]
# The right panel shows the gating: with the gate negative the output is ≈ 0 whatever `up` says; with
# the gate positive, the output is linear in `up`. In the package, `SwiGLUMLP` keeps $W_\text{gate}$ and
# $W_\text{up}$ stacked in one `gate_up_proj` matrix `[2·I, E]` — one matmul instead of two, one pass
# over `x` — and splits the result:

# %%
import inspect

from miniinfer.layers import SwiGLUMLP

print(inspect.getsource(SwiGLUMLP.forward))
print(model.model.layers[0].mlp)

# %% [markdown]
# ### Exercise 1.3 — `swiglu`
#
# Write the gated activation `swiglu(gate, up)` = `silu(gate) * up`, elementwise, for any shape
# `[..., I]`. Write SiLU out, $z\,\sigma(z)$ with `torch.sigmoid`, rather than calling `F.silu`. The
# check also runs `SwiGLUMLP` with your function and compares it with HF's `Qwen2MLP`.

# %% tags=["exercise"] exercise="1.3"
import torch


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> silu(gate) * up, where silu(z) = z * sigmoid(z)."""
    ### BEGIN SOLUTION
    return gate * torch.sigmoid(gate) * up
    ### END SOLUTION


# %% tags=["check"] exercise="1.3"
check.swiglu(swiglu)

# %% [markdown]
# ## 5. Embedding and the tied LM head
#
# The **embedding** turns token ids into vectors: row `i` of a table `[V, E]` is the vector of token
# `i`. It is a lookup, but also a matrix product: `one_hot(ids) @ table` gives the same rows, which
# is why it can share its matrix with the other end of the model.
#
# The **LM head** turns the final hidden vector $h$ `[E]` into one score (logit) per vocabulary entry,
# `logits = h @ W.T` with $W$ `[V, E]`: the logit of token $v$ is the dot product of $h$ with row $v$.
# A **tied** model uses the embedding table as $W$: a token's input vector is also the direction that
# scores it as output. It saves $V \cdot E$ parameters — 1.05 M of the bundled model's 4.4 M (section 1)
# — and works well for small models. Large ones (Qwen2.5-7B) untie the two.
#
# A tied checkpoint has no `lm_head.weight` at all; the package's model returns the embedding table as
# its head:

# %%
print("tied:", model.lm_head is None, "| the head's weight is the embedding table:",
      model.lm_head_weight is model.model.embed_tokens.weight)

# %% [markdown]
# ### Exercise 1.4 — `embedding` and `lm_head`
#
# Write `embedding(ids, table)` (ids of any shape `[...]` → `[..., E]`: rows of the table, exactly) and
# `lm_head(hidden, weight)` (`[..., E]` and `[V, E]` → logits `[..., V]`). The check also feeds your
# embedding of a few ids straight into your head with the same table: each token's own logit must be
# the squared length of its embedding.

# %% tags=["exercise"] exercise="1.4"
import torch


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [...] (int64), table [V, E] -> [..., E]."""
    ### BEGIN SOLUTION
    return table[ids]
    ### END SOLUTION


def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [..., E], weight [V, E] (the embedding table when tied) -> logits [..., V]."""
    ### BEGIN SOLUTION
    return hidden @ weight.T
    ### END SOLUTION


# %% tags=["check"] exercise="1.4"
check.embedding_and_lm_head(embedding, lm_head)

# %% [markdown]
# ## 6. Plug it in
#
# The model does not call `miniinfer.layers.rms_norm` and `swiglu` directly: it calls whatever a
# `Components` object holds, and `Components()` holds the package's reference functions. Pass your own
# to `load_model` (or to `LLM`) and every RMSNorm and every MLP of the model runs your code — no
# monkey-patching, and a reference model can live next to yours.

# %%
from miniinfer import LLM, SamplingParams
from miniinfer.components import Components

mine = Components(rms_norm=rms_norm, swiglu=swiglu)
your_model, _ = miniinfer.load_model(MODEL, components=mine)
print("the model calls your functions:", your_model.model.layers[0].input_layernorm.fn is rms_norm,
      your_model.model.layers[0].mlp.fn is swiglu)

# A passage from Macbeth, one of the three plays the bundled model never saw in training.
PASSAGE = """MACBETH.
She should have died hereafter;
There would have been a time for such a word.
To-morrow, and to-morrow, and to-morrow,
Creeps in this petty pace from day to day,
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow; a poor player,
That struts and frets his hour upon the stage,
And then is heard no more: it is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.

[Enter a Messenger.]

Thou com'st to use thy tongue; thy story quickly.

MESSENGER.
Gracious my lord,
I should report that which I say I saw,
But know not how to do it.
"""
ids = torch.tensor([tokenizer.encode(PASSAGE)])  # [1, L]
with torch.inference_mode():
    reference_logits, your_logits = model(ids), your_model(ids)
print(f"{ids.shape[1]} tokens, logits {list(your_logits.shape)}; largest |difference| from the reference: "
      f"{(your_logits - reference_logits).abs().max().item():.4f}")

# %% [markdown]
# Now the full engine — `LLM` is what a user of the package calls — writing greedily (always the most
# likely token) with the reference components and with yours:

# %%
greedy = SamplingParams(temperature=0.0, max_tokens=48)
prompt = "ROMEO.\n"
reference_text = LLM(MODEL).generate(prompt, greedy, use_tqdm=False)[0].text
your_text = LLM(MODEL, components=mine).generate(prompt, greedy, use_tqdm=False)[0].text
print(prompt + your_text)
print("---\nidentical to the reference components:", your_text == reference_text)

# %% [markdown]
# ### How wrong is wrong?
#
# The checks compare numbers, not text, for a reason: some bugs leave the text plausible. A fair
# measure of a language model is its **loss** on text it has not seen — the average of
# $-\log p(\text{next token})$ over the passage, in nats; lower is better. Here is the loss of the
# model with your functions and with five plausible mistakes (made from the package's functions),
# each of which passes a glance at the code and gives tensors of the right shape:

# %%
def loss_on_passage(components=None) -> float:
    """Mean next-token cross-entropy (nats) of the bundled model on PASSAGE."""
    m, _ = miniinfer.load_model(MODEL, components=components)
    with torch.inference_mode():
        logits = m(ids)[0, :-1]  # the prediction for every token but the first
    return F.cross_entropy(logits, ids[0, 1:]).item()


# The mistakes are built from the package's functions (miniinfer.layers), not yours: the figure shows
# what each mistake costs, whatever state your own code is in.
from miniinfer import layers

variants = {
    "reference": Components(),
    "yours": mine,
    "RMSNorm: forgot the gain": Components(rms_norm=lambda x, w, eps: layers.rms_norm(x, torch.ones_like(w), eps)),
    "RMSNorm: subtracted the mean": Components(
        rms_norm=lambda x, w, eps: layers.rms_norm(x - x.mean(-1, keepdim=True), w, eps)),
    "SwiGLU: ReLU for SiLU": Components(swiglu=lambda gate, up: F.relu(gate) * up),
    "SwiGLU: sigmoid for SiLU": Components(swiglu=lambda gate, up: torch.sigmoid(gate) * up),
    "SwiGLU: gate and up swapped": Components(swiglu=lambda gate, up: layers.swiglu(up, gate)),
}
losses = {name: loss_on_passage(c) for name, c in variants.items()}
for name, loss in losses.items():
    print(f"{name:30} loss {loss:.2f}")
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.barh(list(losses), list(losses.values()), color=["C0", "C2"] + ["C3"] * (len(losses) - 2))
ax.axvline(losses["reference"], color="grey", ls="--", lw=1)
ax.invert_yaxis()
ax.set_xlabel("loss on a held-out Macbeth passage (nats / token, lower is better)")
ax.set_title("The same model, with small mistakes in its building blocks")
fig.tight_layout();

# %% [markdown]
# Subtracting the mean barely matters here (this model's residual stream has a mean near zero), and a
# ReLU costs a little; a check would still reject both, because the next checkpoint may not be so
# forgiving. Swapping `gate` and `up` is a disaster, and the text shows it:

# %%
print(prompt + LLM(MODEL, components=variants["SwiGLU: gate and up swapped"]).generate(
    prompt, greedy, use_tqdm=False)[0].text)

# %% [markdown]
# ## 7. Measure
#
# ### RMSNorm inside the model
#
# Let us follow the residual stream of the bundled model through its layers: the RMS of each token's
# vector before every block's norm, and right after it. The stream grows as the layers add their
# results, and each RMSNorm hands its block an input of a steady, learned scale.

# %%
with torch.inference_mode():
    L = ids.shape[1]
    cos, sin = model.model.rotary_emb.cos[:L], model.model.rotary_emb.sin[:L]
    x = model.model.embed_tokens(ids)
    stream_rms, normed_rms = [], []
    for layer in model.model.layers:  # the model's forward, unrolled (chapter 04 builds it)
        for norm, apply in ((layer.input_layernorm, lambda h: h + layer.self_attn(layer.input_layernorm(h), cos, sin, None)),
                            (layer.post_attention_layernorm, lambda h: h + layer.mlp(layer.post_attention_layernorm(h)))):
            stream_rms.append(x.pow(2).mean(-1).sqrt()[0])
            normed_rms.append(norm(x).pow(2).mean(-1).sqrt()[0])
            x = apply(x)
    stream_rms.append(x.pow(2).mean(-1).sqrt()[0])
    normed_rms.append(model.model.norm(x).pow(2).mean(-1).sqrt()[0])

names = [f"{i}.{part}" for i in range(config.num_hidden_layers) for part in ("attn", "mlp")] + ["final"]
fig, ax = plt.subplots(figsize=(10, 3.6))
for values, label, color in ((stream_rms, "residual stream (norm input)", "C0"), (normed_rms, "after RMSNorm", "C1")):
    stacked = torch.stack(values)  # [blocks, L]
    ax.plot(names, stacked.median(dim=1).values, "o-", color=color, label=label + " — median over tokens")
    ax.fill_between(names, stacked.min(dim=1).values, stacked.max(dim=1).values, color=color, alpha=0.2)
ax.set_yscale("log")
ax.set_ylabel("RMS of a token's vector")
ax.set_xlabel("block (layer.part)")
ax.tick_params(axis="x", rotation=60)
ax.set_title("Bundled model: the residual stream grows, every block reads a normalised copy")
ax.legend()
fig.tight_layout()
print("median RMS of the stream, first block -> final norm:",
      f"{stream_rms[0].median().item():.2f} -> {stream_rms[-1].median().item():.2f}")

# %% [markdown]
# ### Where the work goes
#
# Per token, a matrix `[out, in]` costs $2 \cdot \text{in} \cdot \text{out}$ FLOPs; attention adds
# about $4 \cdot S \cdot H \cdot D$ per layer for a context of $S$ tokens (chapter 03). Count the FLOPs
# of one forward over $L$ tokens, then time the same pieces on this CPU. In a model this small the LM
# head — one `[V, E]` matrix — costs as much as a couple of whole layers, which is why the engine
# computes logits only for the tokens it samples from.

# %%
E, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
H, H_kv, D, N = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_hidden_layers
L = 256
flops = {
    "attention projections": N * L * 2 * (E * (H + 2 * H_kv) * D + H * D * E),
    "attention scores": N * 4 * (L * (L + 1) // 2) * H * D,  # causal: token t attends to t + 1 keys
    "MLP": N * L * 2 * 3 * E * I,
    "LM head": L * 2 * V * E,
}
for part, count in flops.items():
    print(f"{part:22} {count / 1e6:8.1f} MFLOP  ({count / sum(flops.values()):5.1%})")

# %% tags=["nbval-ignore-output", "skip-grading"]
from miniinfer.course.timing import median_seconds


layer = model.model.layers[0]
with torch.inference_mode():
    x = torch.randn(1, L, E)
    cos, sin = model.model.rotary_emb.cos[:L], model.model.rotary_emb.sin[:L]
    seconds = {
        "norms (2 per layer)": N * 2 * median_seconds(lambda: layer.input_layernorm(x)),
        "attention (all of it)": N * median_seconds(lambda: layer.self_attn(x, cos, sin, None)),
        "MLP": N * median_seconds(lambda: layer.mlp(x)),
        "LM head": median_seconds(lambda: miniinfer.layers.lm_head(x, model.lm_head_weight)),
    }
total = sum(seconds.values())
fig, ax = plt.subplots(figsize=(8, 2.8))
ax.barh(list(seconds), [s * 1e3 for s in seconds.values()], color="C2")
ax.invert_yaxis()
ax.set_xlabel("milliseconds per forward of 256 tokens (this CPU)")
ax.set_title("Time by block")
fig.tight_layout()
for part, s in seconds.items():
    print(f"{part:22} {s * 1e3:7.2f} ms  ({s / total:5.1%})")

# %% [markdown]
# Compare the two lists. The matmuls (projections, MLP, head) take roughly their share of the FLOPs;
# attention usually takes more time than its FLOPs suggest, because its softmax and mask are
# elementwise passes over an `[L, L]` score matrix per head — memory-bound work, like chapter 00's
# vector add (chapter 09 fuses them away). The norms do a handful of operations per element and are
# cheap on a CPU; on a GPU, fast engines still fuse them with the residual add, to save the memory
# round trip.

# %% [markdown]
# ## Summary
#
# * A linear layer is `x @ W.T + b` with `W [out, in]`; it costs 2 FLOPs and one weight read per
#   weight per token.
# * RMSNorm divides each token's vector by its root mean square (no mean subtraction, no bias) and
#   multiplies by a learned gain; the statistics are computed in float32 because low-precision squares
#   overflow or lose digits.
# * The SwiGLU MLP gates one projection with the SiLU of another: `down(silu(gate(x)) * up(x))`.
# * The embedding is a row lookup; the LM head scores the vocabulary by dot products with the rows of
#   a `[V, E]` matrix — the same matrix when tied, which saves a large share of a small model.
# * `Components(rms_norm=…, swiglu=…)` runs your functions inside the real model.
#
# **Going further** (no checks):
#
# 1. Write LayerNorm (`(x - mean) / sqrt(var + eps) * g + b`) and time it against your RMSNorm on
#    `[4096, 4096]` inputs. Which costs more, and why?
# 2. Untie the bundled model's head: how many parameters would it add, and what share of the model
#    would then be embedding and head?
# 3. GeGLU replaces SiLU by GELU in the gate. Plug `lambda g, u: F.gelu(g) * u` into the model: what
#    happens to the text, and why is that no evidence that GeGLU is worse?
# 4. `SwiGLUMLP` fuses `gate_proj` and `up_proj` into one matmul. Time `x @ Wg.T, x @ Wu.T` against
#    `x @ torch.cat([Wg, Wu]).T` for one token (`x [1, 256]`) and for 1024 tokens. When does fusing pay?
