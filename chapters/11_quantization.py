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
# # Chapter 11 — Quantization: fewer bits per weight
#
# **What you will build.** Decoding one token reads every weight of the model once, and does two
# floating-point operations with each: on a GPU, batch-1 decode is a memory-bandwidth problem. A
# 7B model in bf16 is 15 GB; in 4-bit integers it is 4 GB, so the same card can read it almost four
# times per the time it used to read it once. You will write the pieces that make that possible —
# **quantize and dequantize** with per-group scales (symmetric and asymmetric), **int4 packing**,
# the **GPTQ column update** that spreads each column's rounding error over the columns not yet
# quantized, and a **straight-through fake quantizer** for quantization-aware training — then
# quantize the bundled model with your own quantizer and run it in the engine.
#
# **What you need.** Chapter 01 (linear layers: `y = x Wᵀ`, W of shape [N, K]) and chapter 04
# (the model). The package code is `miniinfer/quant/` (formats, RTN, GPTQ, QAT, quantized linear
# layers, GPTQ checkpoints) and the kernels `miniinfer/kernels/int4_matmul*.py` and
# `csrc/int4_gemv.cu`.

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import miniinfer
from miniinfer import LLM, SamplingParams, bundled_model_path
from miniinfer.course import unfinished_exercise
from miniinfer.quant import FP8_E4M3, FP8_E5M2, int_format, quantize, quantize_dequantize, representable_values
from miniinfer.quant.data import calibration_evaluation_split, perplexity, token_windows
from miniinfer.quant.gptq import gptq_quantize
from miniinfer.quant.model import collect_hessians, quantize_model

torch.manual_seed(0)
torch.set_num_threads(1)  # a 4 M-parameter model: one thread is as fast, and steady when the cores are shared
MODEL = bundled_model_path("shakespeare")
model, tokenizer = miniinfer.load_model(MODEL, device="cpu")
calibration_text, evaluation_text = calibration_evaluation_split()
calibration_ids = tokenizer.encode(calibration_text)
evaluation_ids = tokenizer.encode(evaluation_text)[:2057]  # 8 windows of 256: enough to rank methods here
print(f"calibration: {len(calibration_ids)} tokens; evaluation: {len(evaluation_ids)} tokens (held-out Macbeth)")
print(f"fp32 perplexity: {perplexity(model, evaluation_ids):.2f}")

# %% [markdown]
# ## 1. Number formats: what 8 bits can hold
#
# An **integer** format with $b$ bits has $2^b$ evenly spaced levels: int8 holds −128 … 127, int4
# −8 … 7 (or 0 … 15 unsigned). A **scale** maps the levels onto the tensor's range,
# $w \approx s\,(q - z)$, so the spacing is the same everywhere: one step $s$.
#
# A **float** format spends bits on an exponent instead. FP8 comes in two flavours:
#
# | format | exponent / mantissa bits | largest value | smallest normal | relative step |
# |---|---|---|---|---|
# | E4M3 (`float8_e4m3fn`) | 4 / 3 | 448 | $2^{-6}$ | $2^{-3}$ |
# | E5M2 (`float8_e5m2`) | 5 / 2 | 57344 | $2^{-14}$ | $2^{-2}$ |
#
# Its levels are dense near zero and sparse far from it: the *relative* error is what stays
# constant. E4M3 has the precision, so it is the format of weights and activations in the
# forward pass; E5M2 has the range that gradients need in training.

# %%
for fmt in (FP8_E4M3, FP8_E5M2):
    print(f"FP8 {fmt.name}: max {fmt.max:g}, smallest normal {fmt.smallest_normal:g}, smallest subnormal "
          f"{fmt.smallest_subnormal:g}, {representable_values(fmt).numel()} finite values")
for bits in (8, 4):
    f = int_format(bits)
    print(f"int{bits}: {f.qmin} … {f.qmax} ({f.levels} levels)")

fig, axes = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True)
int4 = representable_values(int_format(4)).numpy() / 7 * 448  # int4 levels, scaled so that 7 ↦ 448
for ax, (name, values) in zip(axes, (("int4 (scaled to ±448)", int4),
                                     ("FP8 E4M3", representable_values(FP8_E4M3).numpy()))):
    ax.vlines(values, 0, 1, linewidth=0.8)
    ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, ha="right", va="center")
    ax.set_xscale("symlog", linthresh=2**-6)
axes[1].set_xlabel("value (symmetric log axis: linear within ±2⁻⁶, logarithmic beyond)")
axes[0].set_title("Where the levels are: evenly spaced integers vs floats dense near zero")
fig.tight_layout()


# %% [markdown]
# ## 2. Scales: symmetric or asymmetric, per tensor, per channel, per group
#
# A weight matrix $W$ of shape [N, K] (one row per output feature) is quantized in **groups** of
# $g$ consecutive inputs of a row; each group has its own scale (per channel is $g = K$, per tensor
# a single group). Within a group:
#
# * **symmetric**, signed integers, zero point 0:
#   $\;s = \max|w| / (2^{b-1} - 1), \quad q = \mathrm{clamp}(\mathrm{round}(w/s),\, -2^{b-1},\, 2^{b-1}-1)$;
# * **asymmetric**, unsigned integers $0 … 2^b-1$ stretched over $[\min, \max]$ (widened to
#   contain 0, so that zero is exact):
#   $\;s = (\max - \min)/(2^b - 1), \quad z = \mathrm{round}(-\min/s), \quad
#   q = \mathrm{clamp}(\mathrm{round}(w/s) + z,\, 0,\, 2^b - 1)$;
#
# and $\hat w = s\,(q - z)$. Inside the range, **no element is off by more than half a step**,
# $|\hat w - w| \le s/2$: that is the error bound of round-to-nearest (RTN). Asymmetric ranges fit
# groups that are not centred on zero (symmetric wastes half the levels of an all-positive group);
# symmetric saves the zero points and a subtraction.
#
# ### Exercise 11.1 — quantize with group-wise scales
#
# `quantize_groups(w, bits, group_size, symmetric)` takes w [N, K] (float32; K a multiple of
# `group_size`) and returns `(q, scale, zero)`: q [N, K] integers (int32), scale [N, K / g]
# float32, zero [N, K / g] int32 (all zeros when symmetric). Hint: `w.view(N, K // g, g)`.

# %% tags=["exercise"] exercise="11.1"
def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """w [N, K] -> (q [N, K] int32, scale [N, K/g] float32, zero [N, K/g] int32)."""
    # YOUR CODE HERE (Exercise 11.1)
    raise NotImplementedError("Exercise 11.1: implement `quantize_groups`")


# %% tags=["check"] exercise="11.1"
from miniinfer.course import check

check.quantize_groups(quantize_groups)


# %% [markdown]
# ### Exercise 11.2 — dequantize
#
# `dequantize_groups(q, scale, zero, group_size)` returns $\hat w = s\,(q - z)$ as float32 [N, K],
# each group's scale and zero point applied to its $g$ columns.

# %% tags=["exercise"] exercise="11.2"
def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, K], scale/zero [N, K/g] -> w [N, K] float32."""
    # YOUR CODE HERE (Exercise 11.2)
    raise NotImplementedError("Exercise 11.2: implement `dequantize_groups`")


# %% tags=["check"] exercise="11.2"
check.dequantize_groups(dequantize_groups)


# %% [markdown]
# How much does the group size buy? Here is the RTN error of a real weight of the bundled model
# (layer 0's `gate_up_proj`, [1024, 256]) against the group size, measured as the relative error
# of the layer's **output** on calibration text (what the next layer sees), not of the weights.

# %%
def quantize_fn(w, bits, g, symmetric):
    """Your quantizer when it is written, the package's meanwhile."""
    try:
        return dequantize_groups(*quantize_groups(w, bits, g, symmetric), g)
    except NotImplementedError as error:
        if unfinished_exercise(error) is None:
            raise
        return quantize_dequantize(w, bits, symmetric=symmetric, group_size=g)


windows = token_windows(calibration_ids, 256)[:4]
hessians = collect_hessians(model, ["model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"], windows)
W = model.model.layers[0].mlp.gate_up_proj.weight.detach()
H = hessians["model.layers.0.mlp.gate_up_proj"].float()


def output_error(W_hat, W, H):
    """‖(Ŵ − W) Xᵀ‖² / ‖W Xᵀ‖² = tr(Δ H Δᵀ) / tr(W H Wᵀ): the relative output error over the inputs X."""
    delta = W_hat - W
    return float(torch.einsum("nk,kl,nl->", delta, H, delta) / torch.einsum("nk,kl,nl->", W, H, W))


group_sizes = [256, 128, 64, 32, 16, 8]
fig, ax = plt.subplots(figsize=(6, 3.4))
for bits, style in ((4, "o-"), (3, "s--")):
    for symmetric in (True, False):
        errors = [output_error(quantize_fn(W, bits, g, symmetric), W, H) for g in group_sizes]
        ax.plot(group_sizes, errors, style, label=f"int{bits} {'sym' if symmetric else 'asym'}")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.invert_xaxis()
ax.set_xlabel("group size g (inputs per scale; 256 = per channel)")
ax.set_ylabel("relative output error")
ax.set_title("Round-to-nearest error vs group size")
ax.legend(fontsize=8)
fig.tight_layout()
bits_per_weight = {g: 4 + (16 + 4) / g for g in group_sizes}
print("int4 storage, bits per weight (fp16 scale + 4-bit zero per group):",
      {g: round(b, 2) for g, b in bits_per_weight.items()})


# %% [markdown]
# Each halving of the group shrinks the error (outliers spoil fewer neighbours) and costs
# $(16 + 4)/g$ more bits per weight. g = 128 (4.16 bits) is the usual compromise; going from 4 to 3
# bits doubles the step and roughly quadruples the squared error.
#
# ## 3. Packing: two weights per byte
#
# PyTorch has no 4-bit dtype, so int4 weights live two to a byte (or eight to an int32 word, the
# GPTQ layout the kernels read). Packing is the whole point of int4: the bytes read per token.
#
# ### Exercise 11.3 — pack and unpack int4
#
# `pack_int4(q)`: q [..., K] with values 0 … 15 and K even → uint8 [..., K/2], **the even index in
# the low nibble**: `byte i = q[2i] | q[2i+1] << 4`. `unpack_int4(packed)` inverts it.

# %% tags=["exercise"] exercise="11.3"
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] in 0 … 15 -> uint8 [..., K/2]."""
    # YOUR CODE HERE (Exercise 11.3)
    raise NotImplementedError("Exercise 11.3: implement `pack_int4`")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 [..., K] in 0 … 15."""
    # YOUR CODE HERE (Exercise 11.3)
    raise NotImplementedError("Exercise 11.3: implement `unpack_int4`")


# %% tags=["check"] exercise="11.3"
check.pack_int4(pack_int4, unpack_int4)

# %% [markdown]
# What that buys at decode time, for a Qwen2.5-7B shape (7.6 B parameters, untied head) on an H200
# (4.8 TB/s peak, about 4.2 TB/s achievable for a copy): a batch-1 decode step reads every weight once.

# %%
params_7b = 7.6e9
bandwidth = 4.2e12
for name, bits in (("bf16", 16), ("int8", 8 + 32 / 3584), ("int4 g128", 4 + 20 / 128)):
    gb = params_7b * bits / 8 / 1e9
    print(f"{name:10s} {gb:5.1f} GB per token → at most {bandwidth / (gb * 1e9):5.0f} tokens/s")

# %% [markdown]
# ## 4. Weights *and* activations: W8A8 and the outlier problem
#
# Weight-only quantization dequantizes on the fly and multiplies in bf16. **W8A8** also quantizes
# the activations, to use int8 tensor cores (twice the bf16 rate) — that pays off when compute,
# not bandwidth, is the limit (large batches, prefill). Activations change with every token, so
# their scales are computed at run time, **one per token** (row):
# $y_{tn} = s^x_t\, s^w_n \sum_k q^x_{tk} q^w_{nk}$, an exact int8 × int8 → int32 matmul
# (`torch._int_mm`) with both scales applied to the result.
#
# The trouble is **outlier features**: a few input channels are consistently 10–100× larger than
# the rest, so a per-token scale sized for them leaves the other channels only a few levels.
# SmoothQuant (Xiao et al., 2023) divides each input channel by $m_k = \max|x_k|^{\alpha} /
# \max|W_{:,k}|^{1-\alpha}$ and multiplies the weight's column by the same $m_k$: the product is
# unchanged, and part of the activation's range has moved into the weights, which are static and
# easier to quantize. The inputs of layer 0's `down_proj` show it:

# %%
captured = {}
hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach()))
model(windows[:1])
hook.remove()
x = captured["x"].reshape(-1, captured["x"].shape[-1])
W_down = model.model.layers[0].mlp.down_proj.weight.detach()
channel_max = x.abs().amax(dim=0)
print(f"down_proj inputs: largest channel max {channel_max.max():.2f}, median channel max {channel_max.median():.3f}"
      f" ({channel_max.max() / channel_max.median():.0f}x)")


def w8a8_error(x, W, smooth=None):
    """Relative output error of per-token int8 activations × per-channel int8 weights."""
    if smooth is not None:
        x, W = x / smooth, W * smooth
    qx = quantize(x, 8, symmetric=True)  # one scale per row = per token
    qw = quantize(W, 8, symmetric=True)  # one scale per output channel
    y_hat = (qx.q.float() * qx.scale) @ (qw.q.float() * qw.scale).T
    y = x @ W.T
    return float((y_hat - y).norm() / y.norm())


for alpha in (None, 0.25, 0.5, 0.75):
    smooth = None if alpha is None else (channel_max.clamp_min(1e-5) ** alpha
                                         / W_down.abs().amax(dim=0).clamp_min(1e-5) ** (1 - alpha))
    print(f"W8A8 {'no smoothing' if alpha is None else f'SmoothQuant α = {alpha}':22s} relative output error "
          f"{w8a8_error(x, W_down, smooth):.4f}")


# %% [markdown]
# Even in this small model, whose largest input channel is "only" a few times the median,
# migrating part of the range into the weights lowers the W8A8 error (α around 0.5–0.75 is the usual
# choice). In billion-parameter models, where a few channels reach 100× the median, the migration
# is what makes W8A8 work at all.
#
# ## 5. GPTQ: correct the remaining columns for each column's error
#
# RTN rounds every weight on its own. But the layer's output is what matters: over calibration
# inputs $X$ [n, K], the output error of a changed weight row $\delta$ is $\delta H \delta^\top$ with
# the (shared) Hessian $H = 2X^\top X / n$. GPTQ (Frantar et al., 2023) quantizes the columns one at a
# time, and after quantizing column $j$ moves the not-yet-quantized columns $F$ to compensate — the
# Optimal Brain Surgeon update:
#
# $$ e_j = w_j - q_j, \qquad W_{:,F} \mathrel{-}= \frac{e_j}{[H_F^{-1}]_{jj}}\,[H_F^{-1}]_{j,F}, \qquad
#    H^{-1}_{F \setminus j} = H_F^{-1} - \frac{H^{-1}_{F,j} H^{-1}_{j,F}}{[H_F^{-1}]_{jj}}. $$
#
# Recomputing the inverse after every column would cost $O(K^3)$ each time. The trick: the row
# $[H_F^{-1}]_{j,F} / \sqrt{[H_F^{-1}]_{jj}}$ at step $j$ is exactly row $j$ of the upper Cholesky factor
# $U$ of $H^{-1}$ ($H^{-1} = U^\top U$). One Cholesky factorisation gives every update:
#
# $$ \mathrm{err} = (w_j - q_j) / U_{jj}, \qquad W_{:, j:} \mathrel{-}= \mathrm{err}\; U_{j, j:}. $$
#
# Two more tricks in the package (`miniinfer/quant/gptq.py`): **lazy batches** (updates inside a block
# of 128 columns, the rest of the matrix updated once per block by one matmul) and **act_order**
# (columns with the largest $H_{kk}$ first, while many columns remain to absorb their error).
#
# ### Exercise 11.4 — the GPTQ column update
#
# `gptq_column_update(W, U, j, q_j)`: W [N, K] (float64, modified **in place**), U [K, K] the upper
# Cholesky factor of $H^{-1}$, q_j [N] the quantized column j. Compute err as above, apply the update
# to columns j … K−1 (column j becomes q_j), return err [N].

# %% tags=["exercise"] exercise="11.4"
def gptq_column_update(W: torch.Tensor, U: torch.Tensor, j: int, q_j: torch.Tensor) -> torch.Tensor:
    """W[:, j:] -= err ⊗ U[j, j:] with err = (W[:, j] − q_j) / U[j, j]; in place; returns err [N]."""
    # YOUR CODE HERE (Exercise 11.4)
    raise NotImplementedError("Exercise 11.4: implement `gptq_column_update`")


# %% tags=["check"] exercise="11.4"
check.gptq_column_update(gptq_column_update)

# %% [markdown]
# On the real `gate_up_proj` of layer 0 (int3, g128), the output error on the calibration inputs
# and — what counts — on held-out inputs:

# %%
held_out = collect_hessians(model, ["model.layers.0.mlp.gate_up_proj"],
                            token_windows(evaluation_ids, 256)[:4])["model.layers.0.mlp.gate_up_proj"].float()
rows = []
for bits in (4, 3):
    rtn = quantize_dequantize(W, bits, symmetric=False, group_size=128)
    for label, W_hat in (("RTN", rtn),
                         ("GPTQ", gptq_quantize(W, H, bits, 128, act_order=False, percdamp=0.1).weight),
                         ("GPTQ act_order", gptq_quantize(W, H, bits, 128, act_order=True, percdamp=0.1).weight)):
        rows.append((f"int{bits} {label}", output_error(W_hat, W, H), output_error(W_hat, W, held_out)))
print(f"{'':20s} {'calibration':>12s} {'held-out':>10s}")
for name, cal, held in rows:
    print(f"{name:20s} {cal:12.5f} {held:10.5f}")


# %% [markdown]
# ## 6. FP8 and mixed precision
#
# Hopper GPUs multiply FP8 E4M3 matrices on their tensor cores at twice the bf16 rate:
# `torch._scaled_mm(a_fp8, b_fp8, scale_a, scale_b)` takes one scale per row of `a` (per token) and
# per column of `b` (per output channel), accumulates in float32 and writes bf16. FP8's relative
# precision ($2^{-4}$ worst-case rounding for E4M3) makes a scale's only job to keep values below 448
# and away from the subnormals. The package's `FP8Linear` calls it on sm_89+ and emulates it
# exactly elsewhere (cast to FP8 and back), which is what runs here.
#
# **Which layers stay in bf16.** The package quantizes the four matmuls of every decoder layer,
# which hold almost all of a large model's bytes. It leaves the embedding table (a lookup reads one
# row per token: nothing to gain), the LM head (its logits feed the sampler directly; for the tied
# bundled model it *is* the embedding), the norms and biases (tiny), and attention's softmax and
# KV cache (activations, another chapter's problem).
#
# ## 7. Quantization-aware training
#
# After rounding, a model can be fine-tuned *through* the rounding: the forward pass uses
# $\hat w = \mathrm{dequantize}(\mathrm{quantize}(w))$, exactly what the integer model computes with,
# and the backward pass pretends rounding is the identity — the **straight-through estimator**.
# In PyTorch it is one line: $w + (\hat w - w)$`.detach()` has the value $\hat w$ and the gradient 1.
# The float weights keep receiving small updates; whenever one crosses a rounding boundary, the
# quantized model changes.
#
# ### Exercise 11.5 — fake quantization with a straight-through estimator
#
# `fake_quantize_ste(w, bits, group_size)`: asymmetric RTN with groups in the forward pass (your
# exercises 11.1–11.2, or `quantize_dequantize`), identity gradient in the backward pass; do not
# modify `w`. Then `qat_step(w, x, target, bits, group_size, lr)`: one step of QAT on a single
# layer — forward with the fake-quantized weight, mean squared error against `target`, backward,
# and return the updated float weights `w − lr · ∂loss/∂w` (a new tensor, without grad).

# %% tags=["exercise"] exercise="11.5"
def fake_quantize_ste(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Value: dequantize(quantize(w)); gradient w.r.t. w: the identity."""
    # YOUR CODE HERE (Exercise 11.5)
    raise NotImplementedError("Exercise 11.5: implement `fake_quantize_ste`")


def qat_step(w: torch.Tensor, x: torch.Tensor, target: torch.Tensor, bits: int, group_size: int,
             lr: float) -> torch.Tensor:
    """w [N, K], x [T, K], target [T, N] -> w after one SGD step on mean((x ŵᵀ − target)²)."""
    # YOUR CODE HERE (Exercise 11.5)
    raise NotImplementedError("Exercise 11.5: implement `qat_step`")


# %% tags=["check"] exercise="11.5"
check.fake_quantize_ste(fake_quantize_ste, qat_step)


# %% [markdown]
# The package's `quantize_model(model, "qat", calibration=ids)` wraps every decoder matmul in a
# `FakeQuantLinear`, fine-tunes the float weights for a few dozen Adam steps to match the fp32
# model's next-token distributions on the calibration text (distillation, as LLM-QAT does: the
# student learns to behave like the original, not to fit the text), then rounds them for real.
# That takes a couple of minutes on this CPU, so its result comes from the quality table below.
#
# ## 8. Plug it in: your quantizer runs in the engine
#
# `quantize_model(model, "int4", weight_fn=...)` builds every quantized layer from what
# `weight_fn(w)` returns: `(q, scale, zero)` with unsigned q — exactly your asymmetric
# `quantize_groups`. The layers store q in GPTQ's packed layout, and the engine runs them (on a GPU
# through the Triton/CUDA int4 kernels; here through dequantize + matmul).

# %%
def my_int4(w):
    return quantize_groups(w, 4, 128, symmetric=False)


llm = LLM(MODEL, device="cpu")
try:
    quantize_model(llm.model, "int4", weight_fn=my_int4)
    source = "your quantize_groups"
except NotImplementedError as error:
    if unfinished_exercise(error) is None:
        raise
    print(f"⏳ Exercise {unfinished_exercise(error)} is not written yet: the package's quantizer stands in")
    quantize_model(llm.model, "int4", group_size=128)
    source = "the package's quantizer"
print(llm.model.model.layers[0].mlp.gate_up_proj)
greedy = SamplingParams(temperature=0.0, max_tokens=40)
for prompt in ("ROMEO:\n", "KING.\nWhat news, my lord?\n\n"):
    print(repr(llm.generate([prompt], greedy, use_tqdm=False)[0].text))
print(f"int4 g128 ({source}): perplexity {perplexity(llm.model, evaluation_ids):.2f} "
      f"(fp32 {perplexity(model, evaluation_ids):.2f})")

# %% [markdown]
# ## 9. The quality table
#
# `scripts/quant_quality.py` quantizes the bundled model every way and measures the perplexity of
# the held-out text (the last two thirds of the Macbeth slice; the first third calibrates GPTQ and
# QAT). Its results, `benchmarks/results/quant_quality_cpu.json`:

# %%
results_dir = Path(miniinfer.__file__).resolve().parents[1] / "benchmarks" / "results"
quality = json.loads((results_dir / "quant_quality_cpu.json").read_text())
print(f"{'config':36s} {'bits/weight':>11s} {'perplexity':>10s} {'vs fp32':>8s}")
for row in quality["rows"]:
    print(f"{row['config']:36s} {row['bits/weight']:11.2f} {row['perplexity']:10.2f} {row['vs fp32 %']:+7.2f}%")
fig, ax = plt.subplots(figsize=(8, 4))
labels = [r["config"] for r in quality["rows"]]
values = [r["perplexity"] for r in quality["rows"]]
colours = ["grey" if r["method"] == "none" else "C1" if r["method"] in ("gptq", "qat") else "C0"
           for r in quality["rows"]]
ax.barh(labels[::-1], values[::-1], color=colours[::-1])
ax.axvline(values[0], color="grey", linestyle=":", linewidth=1)
ax.set_xlim(min(values) - 1.5, max(values) + 0.5)
ax.set_xlabel("held-out perplexity (lower is better)")
ax.set_title(f"Bundled model, quantized ({quality['summary']['evaluation_tokens']} held-out tokens)", fontsize=10)
fig.tight_layout()

# %% [markdown]
# Read it with the model's size in mind. The bundled model has 4 M parameters and was trained on
# a few MB of text: its weights are smooth, and even int4 RTN g128 loses less than half a percent.
# The 8-bit formats are indistinguishable from fp32 (differences of 0.1 % are within the noise of a
# 6 k-token test), and at int4 the differences between RTN, GPTQ and group sizes are noise-sized too
# (the notes in the JSON show how much GPTQ's result moves with its damping). int3 is where rounding
# starts to hurt and where GPTQ's error correction shows; QAT, which trains through the rounding,
# recovers all of int4's loss. The per-layer measurement of section 5 is the sharper test of GPTQ:
# its held-out output error is 30–50 % below RTN's. In billion-parameter models the end-to-end gaps
# are much larger.
#
# ## 10. Why int4 decode is faster, and where the kernel spends its time
#
# A GEMV of an 8192 × 8192 matrix reads 134 MB in bf16 and 34 MB in int4 g128 (weights, scales and
# zeros): at the H200's 4.2 TB/s that is 32 µs against 8 µs. Reaching 8 µs means everything that is
# not the read must fit in its shadow, and an int4 kernel has a lot besides the read: every weight
# has to become a number before it is multiplied. A budget: 67 M weights in 8 µs on 132 SMs is
# about two instructions per weight per SM cycle *in total*. Our CUDA kernel (`csrc/int4_gemv.cu`)
# is built around that budget:
#
# * **Tensor cores do the multiply-adds** (`mma.sync` m16n8k16, float32 accumulation), even at M = 1:
#   the token is one of eight columns of the B fragment and the other seven are zeros. Wasted
#   tensor-core work costs nothing in a memory-bound kernel, and M up to 16 comes almost free.
# * **Three instructions per two weights** turn nibbles into fp16/bf16: a shift, one `LOP3` that
#   drops nibbles k and k+4 into the low mantissa bits of the two halves of the number 1024 (so the
#   halves *are* 1024 + q, no conversion), one `HSUB2` of 1024 + zero. The scale is applied to each
#   group's float32 sum, once, not to every weight.
# * **The fragments follow the loads.** Which weight column is "row i" of the mma and which input is
#   "k j" is ours to choose as long as A and B agree, so each lane loads one 16-byte vector (8 inputs
#   of 4 columns) and that vector is exactly its share of four mmas.
# * **Loads a batch ahead.** A warp that loads, waits, computes and loads again leaves the memory
#   idle while it computes: each warp keeps the next steps' weights and inputs in flight while it
#   works on the current ones. Profiling the first version showed schedulers idle half the time,
#   waiting on exactly that.
#
# The Triton kernel (`miniinfer/kernels/int4_matmul_triton.py`) is the readable version of the same
# idea without the tensor-core fragments: it dequantizes a [BLOCK_K, BLOCK_N] tile with a shift, a
# mask, a subtraction and a multiply per weight. `benchmarks/quantization.py` measures both against
# cuBLAS bf16 and torch's int4 kernel (`_weight_int4pack_mm`) on a GPU:

# %%
gpu_file = results_dir / "quantization_h200.json"  # the ledger's run, by name (not whichever file sorts last)
if gpu_file.exists():
    gpu = json.loads(gpu_file.read_text())
    print(f"{gpu['card']}, {gpu['date'][:10]}")
    for row in gpu["rows"]:
        if row["K"] == 8192:
            print(f"M={row['M']:2d} {row['impl']:28s} {row['us'] or float('nan'):8.1f} µs  "
                  f"{row['% floor'] or float('nan'):5.1f} % of the weight-read floor  {row['vs bf16'] or float('nan'):.2f}x")
else:
    print("No GPU results yet: run `python benchmarks/quantization.py` on a CUDA machine.")

# %% [markdown]
# **What did not help, measured.** Two textbook remedies for a memory-bound kernel were tried on
# the H200 and kept as CTA shape codes of the same kernel, so that anyone can re-run the comparison
# (`scripts/gpu/int4_shapes.py --codes …`):
#
# * *More bytes in flight*: a ring of 5–16 steps per warp in shared memory, filled by `cp.async`
#   (up to ~120 KB requested per SM instead of at most 32 KB). If the kernel were waiting on DRAM
#   latency this would have helped; it was slower everywhere, and deeper rings slower still.
# * *Contiguous reads*: GPTQ's layout puts the four packed rows a warp reads 32 KB apart; a tiled
#   copy of the weights (`tile_int4_weight`) makes each warp's reads one contiguous stream. Equal at
#   M = 1 on 8192², faster at M = 16 and on the widest matrix.
#
# Both hypotheses were reasonable and both were wrong for M = 1: that is why the kernel is tuned by
# measurement, not by argument. A straight-line fit of time against bytes over the five matrices
# says ~4.5 µs of every call is fixed (launch inside a CUDA graph, the first load's latency, the
# CTA's reduction and its tail): a third of the 8192² time, and the next thing to attack.

# %%
variants_file = results_dir / "int4_variants_h200.json"
if variants_file.exists():
    variants = json.loads(variants_file.read_text())
    print(f"{variants['card']}, {variants['date'][:10]}: best of each data path (µs)")
    for row in variants["summary"]["best_per_data_path"]:
        if row["K"] == 8192:
            print(f"8192² M={row['M']:2d} {row['data path']:14s} {row['best us']:6.1f} µs  "
                  f"{row['% floor']:5.1f} % of the floor   ({row['shape']}, split {row['split']})")

# %% [markdown]
# ## Summary
#
# * Quantization stores $w \approx s\,(q - z)$ with few-bit integers $q$ and a scale (and zero
#   point) per group; round-to-nearest is off by at most half a step. Smaller groups, smaller error,
#   a few more bits per weight.
# * Weight-only int4 cuts the bytes a decode step reads by ~3.7× versus bf16: on a GPU that is
#   the speed-up to aim for. W8A8 and FP8 quantize activations too (per-token scales) to use faster
#   tensor cores when compute is the limit.
# * GPTQ rounds one column at a time and lets the remaining columns absorb the error, using the
#   inverse Hessian of the layer's inputs (one Cholesky factor gives every update).
# * QAT trains through the rounding with a straight-through estimator.
#
# **Going further** (no checks):
#
# 1. Implement act_order in your own GPTQ loop (`_student_gptq` in the check module is a start):
#    how much does it help at int3 on each of the four layer types?
# 2. Write a GPTQ checkpoint with `miniinfer.quant.checkpoint.save_gptq_checkpoint` and load it back
#    with `LLM(folder)`. Open `config.json` and the safetensors header: find `qweight`, `qzeros`,
#    `scales`, `g_idx`.
# 3. Quantize the KV cache to FP8 E4M3 with one scale per head: how much does perplexity move?
# 4. Run GPTQ on one layer with `percdamp` = 0.01 (the paper's default) and 0.3, calibrated on 500 and
#    on 3 500 tokens, and compare the held-out output errors: why does stronger damping help when
#    calibration data is scarce?
