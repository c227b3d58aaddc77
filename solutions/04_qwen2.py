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
# # Chapter 04 — Qwen2: the model, loading safetensors, tokenizer, sampling
#
# **What you will build.** The whole path from a checkpoint folder to generated text. You will read a
# Hugging Face `config.json`, assemble Qwen2 from the blocks of chapters 01–03, load its weights from
# a **safetensors** file (writing the function that fuses HF's separate q/k/v and gate/up projections
# into ours), check that our logits equal those of HF transformers, turn text into tokens and a stream
# of tokens back into text, and finally choose the next token: **greedy**, **temperature**, **top-k**
# and **top-p**. Your sampling distribution then runs inside the engine.
#
# **What you need.** Chapters 01 (RMSNorm, SwiGLU, embedding, tied head), 02 (RoPE) and 03 (GQA).
#
# Shapes: `V` vocabulary, `E` hidden size, `I` MLP size, `H`/`H_kv` query/KV heads, `D` head dimension,
# `B` batch, `L` tokens.

# %%
import inspect
import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import miniinfer
from miniinfer import LLM, SamplingParams
from miniinfer.components import Components
from miniinfer.course import check
from miniinfer.models import qwen2
from miniinfer.models.config import Qwen2Config

torch.manual_seed(0)
model_path = miniinfer.bundled_model_path("shakespeare")

# %% [markdown]
# ## 1. The configuration
#
# A checkpoint folder holds `config.json` (the hyper-parameters), `model.safetensors` (the weights),
# and the tokenizer files. `Qwen2Config.from_folder` reads the config, keeps the fields we need, and
# refuses — with a message — what we do not implement (another architecture, rope scaling, sliding
# windows).

# %%
config = Qwen2Config.from_folder(model_path)
print(sorted(p.name for p in model_path.iterdir()))
print(f"V = {config.vocab_size}, E = {config.hidden_size}, I = {config.intermediate_size}, "
      f"layers = {config.num_hidden_layers}")
print(f"H = {config.num_attention_heads}, H_kv = {config.num_key_value_heads}, D = {config.head_dim}, "
      f"rope_theta = {config.rope_theta:g}, tied embedding: {config.tie_word_embeddings}")

# %% [markdown]
# ## 2. The model in one small file
#
# `miniinfer/models/qwen2.py` is a decoder-only transformer: an embedding, $N$ identical **pre-norm**
# layers, a final RMSNorm and the LM head. Each layer adds two things to a running "residual stream"
# $x$ (shape `[B, L, E]`):
#
# $$ h = x + \text{Attn}\big(\text{RMSNorm}(x)\big), \qquad y = h + \text{MLP}\big(\text{RMSNorm}(h)\big). $$
#
# The norms sit *inside* the branches, so the stream itself is never normalised: each layer writes a
# correction onto it, and gradients (in training) flow straight down the additions. The whole layer:

# %%
print(inspect.getsource(qwen2.Qwen2DecoderLayer.forward))
print(inspect.getsource(qwen2.Qwen2Attention.forward))

# %% [markdown]
# Inside the attention, one fused projection `qkv_proj` produces the q, k and v heads of every token
# together, `[B, L, (H + 2·H_kv)·D]`, viewed as `[B, L, H + 2·H_kv, D]`: the first `H` heads are queries,
# then `H_kv` keys, then `H_kv` values. RoPE rotates the q and k heads in one call (they are adjacent),
# and the attention function is whatever `Components.attention` holds — your chapter 03 function, if
# you pass it. The module tree, with its parameter shapes:

# %%
model, tokenizer = miniinfer.load_model(model_path)
print(model)


def parameter_groups(model) -> dict[str, int]:
    groups = {"embedding (= tied LM head)": 0, "attention (qkv, o)": 0, "MLP (gate_up, down)": 0, "norms": 0}
    for name, p in model.named_parameters():
        key = ("embedding (= tied LM head)" if "embed" in name or "lm_head" in name
               else "attention (qkv, o)" if "self_attn" in name else "MLP (gate_up, down)" if "mlp" in name
               else "norms")
        groups[key] += p.numel()
    return groups


groups = parameter_groups(model)
total = sum(groups.values())
fig, ax = plt.subplots(figsize=(9, 1.8))
left = 0
for index, (name, count) in enumerate(groups.items()):
    ax.barh(0, count / 1e6, left=left, color=f"C{index}")
    if count / total > 0.05:
        ax.text(left + count / 2e6, 0, f"{name}\n{count / 1e6:.2f} M ({100 * count / total:.0f}%)", ha="center",
                va="center", fontsize=8, color="white")
    left += count / 1e6
ax.set_yticks([])
ax.set_xlim(0, left)
ax.set_xlabel("parameters (millions)")
ax.set_title(f"The {total / 1e6:.2f} M parameters of the bundled model (norms: {groups['norms']:,})", fontsize=10)
fig.tight_layout();

# %% [markdown]
# In a model this small the embedding table ($V \times E$) is a quarter of everything; in Qwen2.5-7B it is
# about 7%. Tying the LM head to it (the same `[V, E]` matrix maps ids to vectors and vectors back to
# scores) saves as much again.
#
# ## 3. Loading safetensors
#
# A `.safetensors` file is an 8-byte little-endian header length, a JSON header naming every tensor
# with its dtype, shape and byte range, then the raw bytes. Nothing in it is executable — unlike a
# pickled `pytorch_model.bin`, loading a file downloaded from the internet cannot run code. Let us
# read the header by hand:

# %%
weights_file = model_path / "model.safetensors"
with open(weights_file, "rb") as f:
    header_length = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(header_length))
names = [n for n in header if n != "__metadata__"]
print(f"{weights_file.name}: {weights_file.stat().st_size:,} bytes, header {header_length:,} bytes, {len(names)} tensors")
for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]:
    entry = header[name]
    print(f"  {name:<42} {entry['dtype']:>5} {str(entry['shape']):>12}  bytes {entry['data_offsets']}")

# %% [markdown]
# HF stores `q_proj`, `k_proj`, `v_proj` (and `gate_proj`, `up_proj`) as separate `[out, in]` matrices.
# Our model fuses them: one matmul with a `[(H + 2·H_kv)·D, E]` weight reads the layer's input once
# and launches one kernel instead of three, which matters most when decoding, where each layer is a
# handful of small matmuls. Since `Linear` computes `x @ W.T`, stacking the weights **along dim 0**
# (the output rows) stacks the outputs:
#
# $$ x\,[W_q; W_k; W_v]^\top = [\,x W_q^\top \;|\; x W_k^\top \;|\; x W_v^\top\,]. $$
#
# | our name (layer `i`) | built from (in this order) | shape |
# |---|---|---|
# | `model.layers.i.self_attn.qkv_proj.weight` | `q_proj.weight`, `k_proj.weight`, `v_proj.weight` | `[(H + 2·H_kv)·D, E]` |
# | `model.layers.i.self_attn.qkv_proj.bias` | `q_proj.bias`, `k_proj.bias`, `v_proj.bias` | `[(H + 2·H_kv)·D]` |
# | `model.layers.i.mlp.gate_up_proj.weight` | `gate_proj.weight`, `up_proj.weight` | `[2·I, E]` |
#
# Every other tensor keeps its HF name (our modules are named like HF's for that reason).
#
# ### Exercise 4.1 — `fuse_hf_tensors(hf, config)`
#
# Given the checkpoint's tensors `{HF name: tensor}` and the config, return our state dict: the same
# dict with, for every layer, the q/k/v weights and biases replaced by `qkv_proj.weight`/`.bias` and
# gate/up by `gate_up_proj.weight` (`torch.cat(..., dim=0)`). Do not modify the dict you are given
# (`dict(hf)` makes a shallow copy). The check draws random small configs and then loads your result
# into a real `Qwen2ForCausalLM` with `strict=True`.

# %% tags=["exercise"] exercise="4.1"
def fuse_hf_tensors(hf: dict[str, torch.Tensor], config: Qwen2Config) -> dict[str, torch.Tensor]:
    """HF names -> our state dict: q/k/v (weights and biases) -> qkv_proj, gate/up -> gate_up_proj (dim 0)."""
    ### BEGIN SOLUTION
    ours = dict(hf)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [ours.pop(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"]
            ours[f"{p}self_attn.qkv_proj.{kind}"] = torch.cat(parts, dim=0)
        ours[p + "mlp.gate_up_proj.weight"] = torch.cat([ours.pop(p + "mlp.gate_proj.weight"),
                                                         ours.pop(p + "mlp.up_proj.weight")], dim=0)
    return ours
    ### END SOLUTION


# %% tags=["check"] exercise="4.1"
check.fuse_hf_tensors(fuse_hf_tensors)

# %% [markdown]
# Now load the bundled model by hand with your function — exactly what `miniinfer.load_model` does,
# minus its checks — and compare with `load_model`'s model. The weights are stored in bfloat16 (half
# the file size) and widened to float32, in which a CPU computes fastest and exactly.

# %%
from safetensors import safe_open

from miniinfer.models.qwen2 import Qwen2ForCausalLM

line = "ROMEO.\nBut, soft! what light through yonder window breaks?"
ids = torch.tensor([tokenizer.encode(line)])
with safe_open(str(weights_file), framework="pt") as f:
    hf_tensors = {name: f.get_tensor(name) for name in f.keys()}
state = fuse_hf_tensors(hf_tensors, config)
my_model = Qwen2ForCausalLM(config)
my_model.load_state_dict(state, strict=True)  # strict: every name and shape must match the modules
my_model.eval().requires_grad_(False)
print(f"{len(hf_tensors)} HF tensors -> {len(state)} of ours; stored dtype {hf_tensors['model.norm.weight'].dtype}, "
      f"model dtype {next(my_model.parameters()).dtype}")

with torch.no_grad():
    print("same logits as miniinfer.load_model:", torch.equal(my_model(ids), model(ids)))

# %% [markdown]
# The real loader also checks every tensor against the shape the config implies *before* loading, and
# names the culprit when something is off. Two broken copies of the folder:

# %%
with tempfile.TemporaryDirectory() as tmp:
    broken = Path(tmp) / "model"
    shutil.copytree(model_path, broken)
    hf_config = json.loads((broken / "config.json").read_text())
    hf_config["num_key_value_heads"] = 4  # the weights were trained with 2
    (broken / "config.json").write_text(json.dumps(hf_config))
    for damage in ("config", "truncated"):
        if damage == "truncated":
            shutil.copy(model_path / "config.json", broken / "config.json")
            data = (model_path / "model.safetensors").read_bytes()
            (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
        try:
            miniinfer.load_model(broken)
        except ValueError as error:
            message = str(error).replace(str(broken), "<folder>")
            message = re.sub(r"; \w+Error: .*\)$", ")", message, flags=re.S)  # the library's detail varies by version
            print(f"{damage}: {message}")

# %% [markdown]
# ## 4. Same logits as HF transformers
#
# The bundled folder is an ordinary HF checkpoint, so `transformers` loads it too. Feeding both models
# the same tokens, the logits must agree to float32 rounding: the only differences are the order of
# floating-point operations (fused vs separate projections, our attention vs theirs).

# %%
import transformers
from transformers import AutoModelForCausalLM

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
hf_model = AutoModelForCausalLM.from_pretrained(model_path).eval()

passage = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
           "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
           "And by opposing end them.")
passage_ids = torch.tensor([tokenizer.encode(passage)])
with torch.no_grad():
    ours = model(passage_ids)
    theirs = hf_model(passage_ids).logits
error = (ours - theirs).abs().max().item()
print(f"{passage_ids.shape[1]} tokens, logits {tuple(ours.shape)} = [B, L, V], range "
      f"[{theirs.min().item():.0f}, {theirs.max().item():.0f}]")
print("max |ours - HF| < 1e-4:", error < 1e-4, "| same argmax at every position:",
      torch.equal(ours.argmax(-1), theirs.argmax(-1)))

# %% tags=["nbval-ignore-output"]
print(f"max |ours - HF| = {error:.1e}, relative to the logits' range: {error / (theirs.max() - theirs.min()).item():.1e}")

# %% [markdown]
# ## 5. Tokens in, text out
#
# The tokenizer is a byte-level BPE with $V$ = 4096 entries learned from Shakespeare: common words are
# one token (with their leading space), rarer ones split into pieces, and any byte can be represented,
# so nothing is ever "unknown".

# %%
pieces = [tokenizer.decode([i]) for i in tokenizer.encode(line)]
print(f"{len(pieces)} tokens:", " | ".join(p.replace("\n", "⏎") for p in pieces))
print("round trip exact:", tokenizer.decode(tokenizer.encode(passage)) == passage,
      "| vocabulary:", tokenizer.vocab_size, "| end-of-text ids:", sorted(tokenizer.eos_token_ids))

# %% [markdown]
# **Streaming** text back needs care: a byte-level token can end in the middle of a UTF-8 character
# (`é` is 2 bytes, `♥` 3, `🌹` 4), and such characters are rare in Shakespeare, so they are spelled
# byte by byte. Decoding each token alone prints `�` for the fragments. `IncrementalDetokenizer`
# holds text back until the character is complete:

# %%
from miniinfer.tokenizer import IncrementalDetokenizer

text = "Adieu, café ♥ 🌹"
stream = IncrementalDetokenizer(tokenizer)
print(f"{'token':>6}  {'decoded alone':<14} streamed")
for token_id in tokenizer.encode(text):
    print(f"{token_id:>6}  {tokenizer.decode([token_id])!r:<14} {stream.add(token_id)!r}")
print("streamed text == full decode:", stream.text == text)

# %% [markdown]
# ## 6. Generating, greedily
#
# Generation repeats one step: run the model on the sequence so far, take the logits of the **last**
# position (`[V]`), choose a token, append it. Here is the whole loop, with no KV cache (every step
# recomputes the full sequence — chapter 05 fixes that). The engine, with its paged cache and
# batching, must produce the same tokens.

# %%
@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]))[0, -1]  # [V]: the next-token scores
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


prompt = "JULIET.\nO Romeo, Romeo! wherefore art thou"
loop_ids = greedy_generate(model, tokenizer.encode(prompt), 40)
llm = LLM(model_path, num_kv_blocks=128)
engine_ids = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)[0].token_ids
print(prompt + tokenizer.decode(loop_ids))
print("\nthe engine produced the same tokens:", engine_ids == loop_ids)

# %% [markdown]
# ## 7. Sampling: temperature, top-k, top-p
#
# Greedy decoding is deterministic and tends to loop. Sampling draws the next token from a
# distribution built from the logits $z \in \mathbb{R}^V$, in three steps (the order of vLLM and HF):
#
# 1. **temperature** $T > 0$: $p_i \propto e^{z_i / T}$. $T < 1$ sharpens the distribution (towards
#    greedy as $T \to 0$), $T > 1$ flattens it (towards uniform). $T = 0$ means greedy.
# 2. **top-k**: keep the $k$ largest logits, drop the others ($k = 0$: off).
# 3. **top-p** (nucleus): of what is left, keep the **smallest** set of most likely tokens whose
#    probability sums to at least $p$ ($p = 1$: off). Unlike top-k, the number of tokens adapts: a
#    confident distribution keeps one or two, an uncertain one keeps many.
#
# "Dropping" a token means setting its logit to $-\infty$, so that the final softmax gives it exactly
# zero and renormalises the rest. Here are the model's next-token probabilities after a famous
# half-line, at three temperatures:

# %%
context = "ROMEO.\nBut, soft! what light through yonder"
with torch.no_grad():
    next_logits = model(torch.tensor([tokenizer.encode(context)]))[0, -1]  # [V]
order = next_logits.argsort(descending=True)[:15]


def token_label(token_id: int) -> str:
    """A printable label: the token's text (newlines as \\n), or its id when it is a piece of a UTF-8 character."""
    text = tokenizer.decode([token_id])
    return f"#{token_id}" if "\ufffd" in text else repr(text)[1:-1]


token_labels = [token_label(i) for i in order.tolist()]

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
for ax, T in zip(axes, (0.5, 1.0, 1.5)):
    probs = torch.softmax(next_logits / T, dim=-1)
    ax.bar(range(15), probs[order].numpy(), color="C0")
    ax.set_xticks(range(15))
    ax.set_xticklabels(token_labels, rotation=90, fontsize=8)
    ax.set_title(f"T = {T}: top token {probs.max().item():.0%}, top 15 hold {probs[order].sum().item():.0%}", fontsize=9)
axes[0].set_ylabel("probability")
fig.suptitle(f"Next token after {context!r}", fontsize=10)
fig.tight_layout();

# %% [markdown]
# ### Exercise 4.2 — `top_k_filter(logits, k)`
#
# `logits: [..., V]` (one row, or a batch of rows) → same shape, the `k` largest logits of each row
# kept **unchanged**, the others `-inf`. Logits **tied** with the k-th largest are all kept (so compare
# with the k-th largest value, as HF does, rather than keeping exactly `k` indices). `k = 0` and
# `k ≥ V` keep everything. `torch.topk(logits, k, dim=-1).values[..., -1:]` is the k-th largest value
# of each row.

# %% tags=["exercise"] exercise="4.2"
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept), -inf elsewhere. [..., V] -> [..., V]."""
    ### BEGIN SOLUTION
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))
    ### END SOLUTION


# %% tags=["check"] exercise="4.2"
check.top_k_filter(top_k_filter)

# %% [markdown]
# ### Exercise 4.3 — `top_p_filter(logits, p)`
#
# Sort each row's probabilities (the softmax of the logits) in descending order. Token number $r$ in
# that order is kept when the probability ranked **strictly above** it is still below $p$:
#
# $$ \text{keep}_r \iff \sum_{r' < r} p_{(r')} < p . $$
#
# So the top token is always kept, and so is the token whose probability *crosses* $p$ — the set's sum
# is at least $p$. (Keeping only tokens with `cumsum <= p` is the classic off-by-one: it can keep
# nothing at all.) Map the decision back to vocabulary order (`scatter` with the sort's indices), and
# return the logits with dropped entries at `-inf`. When `p >= 1` return the logits unchanged: in
# float32 the running sum can reach 1.0 before the last tokens and would drop them.

# %% tags=["exercise"] exercise="4.3"
def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens with probability sum >= p, -inf elsewhere.
    logits: [..., V] -> [..., V]."""
    ### BEGIN SOLUTION
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability ranked strictly above
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))
    ### END SOLUTION


# %% tags=["check"] exercise="4.3"
check.top_p_filter(top_p_filter)

# %% [markdown]
# ### Exercise 4.4 — `probabilities(logits, params)`
#
# The exact distribution the sampler draws from, for one row of logits `[V]` and a `SamplingParams`:
# if `params.temperature == 0`, a one-hot at the argmax (the first one on ties, like `torch.argmax`);
# otherwise divide by the temperature, apply your top-k, then your top-p, and take the softmax.
# Compute in float32 (`logits.float()`). The order matters: the nucleus of a sharpened distribution is
# smaller, and the nucleus is taken of the *renormalised* top-k distribution. The check compares with
# exact float64 distributions and recognises the wrong orders.

# %% tags=["exercise"] exercise="4.4"
def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the next token is drawn from: temperature, then top-k, then top-p.
    logits: [V] -> probs [V] (float32, sums to 1); temperature 0 -> one-hot at the argmax."""
    ### BEGIN SOLUTION
    logits = logits.float()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return torch.softmax(logits, dim=-1)
    ### END SOLUTION


# %% tags=["check"] exercise="4.4"
check.probabilities(probabilities)

# %% [markdown]
# What the filters do to the distribution of the half-line above (bars: what is left, renormalised;
# grey: the full distribution at the same temperature):

# %%
settings = [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0, top_p=0.8),
            SamplingParams(temperature=0.7, top_k=10, top_p=0.8)]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
for ax, params in zip(axes, settings):
    full = torch.softmax(next_logits / params.temperature, dim=-1)
    probs = probabilities(next_logits, params)
    ax.bar(range(15), full[order].numpy(), color="lightgrey", label="no filter")
    ax.bar(range(15), probs[order].numpy(), width=0.5, color="C1", label="filtered, renormalised")
    ax.set_xticks(range(15))
    ax.set_xticklabels(token_labels, rotation=90, fontsize=8)
    ax.set_title(f"T={params.temperature}, top_k={params.top_k}, top_p={params.top_p}: "
                 f"{int((probs > 0).sum())} tokens", fontsize=9)
axes[0].set_ylabel("probability")
axes[0].legend(fontsize=8)
fig.tight_layout();

# %% [markdown]
# And the sampler really draws from that distribution: 4000 seeded draws with `torch.multinomial`, the
# engine's sampling primitive, against the exact probabilities.

# %%
params = SamplingParams(temperature=0.9, top_p=0.9)
exact = probabilities(next_logits, params)
generator = torch.Generator().manual_seed(0)
draws = torch.multinomial(exact, 4000, replacement=True, generator=generator)
frequencies = torch.bincount(draws, minlength=exact.numel()).float() / draws.numel()
shown = exact.argsort(descending=True)[:12]
fig, ax = plt.subplots(figsize=(8, 3.2))
x = np.arange(len(shown))
ax.bar(x - 0.2, exact[shown].numpy(), width=0.4, label="exact probability")
ax.bar(x + 0.2, frequencies[shown].numpy(), width=0.4, label="frequency in 4000 draws")
ax.set_xticks(x)
ax.set_xticklabels([token_label(i) for i in shown.tolist()], rotation=90, fontsize=8)
ax.set_title(f"T={params.temperature}, top_p={params.top_p}: {int((exact > 0).sum())} tokens in the nucleus")
ax.legend(fontsize=8)
fig.tight_layout()
print(f"total variation distance between the frequencies and the exact distribution: "
      f"{0.5 * (frequencies - exact).abs().sum().item():.3f}; tokens drawn outside the nucleus: "
      f"{int((exact[draws] == 0).sum())}")

# %% [markdown]
# ## 8. Plug it in: your distribution inside the engine
#
# `Components(probabilities=...)` hands your function to the engine's sampler: for every sampled row of
# every step it calls `probabilities(logits [V], params)` and draws with `torch.multinomial` from the
# request's own generator, seeded by `SamplingParams.seed`. With the same seed, your function and the
# reference must produce the same text.

# %%
seeded = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=60, seed=1234)
prompts = ["ROMEO.\n", "HAMLET.\nTo be, or not to be"]
student_llm = LLM(model_path, components=Components(probabilities=probabilities), num_kv_blocks=128)
expected = llm.generate(prompts, seeded, use_tqdm=False)
got = student_llm.generate(prompts, seeded, use_tqdm=False)
for prompt, e, g in zip(prompts, expected, got):
    print(f"--- {prompt!r} → same tokens as the default sampler: {e.token_ids == g.token_ids}")
    print(prompt + g.text)

# %% [markdown]
# ## 9. Measure: how big is the nucleus?
#
# Top-k keeps the same number of candidates everywhere; top-p adapts to the model's confidence. We run
# the model once over the passage of section 4 and, at every position, count the tokens your
# `top_p_filter` keeps with $p = 0.9$, at two temperatures.

# %%
with torch.no_grad():
    passage_logits = model(passage_ids)[0]  # [L, V]: one next-token distribution per position
fig, ax = plt.subplots(figsize=(8, 3.4))
bins = np.logspace(0, np.log10(config.vocab_size), 25)
for T in (0.7, 1.0):
    sizes = (top_p_filter(passage_logits / T, 0.9) != float("-inf")).sum(-1)
    ax.hist(sizes.numpy(), bins=bins, alpha=0.6, label=f"T = {T}")
    print(f"T = {T}: nucleus (p = 0.9) sizes over {len(sizes)} positions: min {sizes.min().item()}, "
          f"median {sizes.median().item()}, max {sizes.max().item()}")
ax.set_xscale("log")
ax.set_xlabel("tokens in the nucleus (top-p = 0.9)")
ax.set_ylabel("positions")
ax.set_title("Top-p keeps 1 token where the model is sure and hundreds where it is not")
ax.legend(fontsize=8)
fig.tight_layout();

# %% [markdown]
# And the cost of one forward pass over the passage, ours against HF transformers', on this CPU
# (timings vary from machine to machine; not part of the answer key):

# %% tags=["nbval-ignore-output", "skip-grading"]
from miniinfer.course.timing import best_ms


long_ids = passage_ids.repeat(1, 4)  # a few hundred tokens
with torch.no_grad():
    ours_ms = best_ms(lambda: model(long_ids), repeat=15)
    hf_ms = best_ms(lambda: hf_model(long_ids), repeat=15)
print(f"forward over {long_ids.shape[1]} tokens: ours {ours_ms:.1f} ms, HF transformers {hf_ms:.1f} ms")

# %% [markdown]
# ## Summary
#
# * Qwen2 is embedding → $N$ pre-norm layers ($x + \text{Attn}(\text{RMSNorm}(x))$, then
#   $+\,\text{MLP}(\text{RMSNorm}(\cdot))$) → RMSNorm → LM head; `miniinfer/models/qwen2.py` holds all of it.
# * A safetensors file is a JSON header plus raw bytes: safe to load. The loader checks every shape
#   against `config.json` and fuses q/k/v and gate/up by stacking rows (dim 0).
# * Our logits match HF transformers' to float32 rounding; the tokenizer is byte-level BPE, and
#   streaming must hold back incomplete UTF-8 characters.
# * Sampling = temperature, then top-k (ties kept), then top-p (the token that crosses $p$ is kept),
#   then softmax over what is left. `Components(probabilities=...)` puts your distribution in the engine.
#
# **Going further** (no checks):
#
# 1. **min-p** sampling keeps the tokens whose probability is at least `min_p` times the top token's.
#    Write it, and compare its nucleus sizes with top-p's on the passage.
# 2. A **repetition penalty** divides the logits of tokens already in the sequence (HF: by a factor
#    > 1 if positive, multiplies if negative). Add it to the greedy loop of section 6: does the output
#    stop looping?
# 3. Load `Qwen/Qwen2.5-0.5B` (if you can download it) with `miniinfer.load_model` and compare with HF
#    transformers as in section 4. Its tied embedding is 136 M of its 494 M parameters — what share is
#    that, and how does it compare with the bundled model?
# 4. The loader stacks q/k/v at load time. What would change to *split* `qkv_proj` back into HF's three
#    tensors to save a checkpoint, and which test would prove the round trip exact?
