"""Fused kernels on the CPU: the torch references against the teaching functions, the Triton kernels
(under TRITON_INTERPRET=1, set by ``miniinfer.kernels`` before triton is imported) against the
references, and the model's fused forward path against the readable one.

Sizes are odd (T in {1, 3, 17}, E in {48, 896, 1000}, D in {32, 64, 128}, H/H_kv in {14/2, 4/4, 7/1})
and small, because the interpreter runs each program in NumPy. Inputs have strided rows (views of a
wider buffer), so a kernel that assumes contiguity fails; outputs of in-place kernels are checked for
untouched neighbours (v heads, padding columns). bfloat16 is tested only through the torch references
here: the interpreter computes bf16 wrongly; tests/gpu/test_fused_gpu.py covers it on a GPU.

Tolerances, and why:
* float32 kernel vs reference: the same float32 formulas; only the norm's sum of squares is summed in
  another order (~1e-7 relative) and exp may differ in the last bit: atol = rtol = 1e-5 (norm) or
  1e-6 (RoPE, SiLU).
* float16 kernel vs reference: the same float32 math rounded to fp16, except that a last-bit
  difference before a rounding can flip it: one or two fp16 ulps, atol = rtol = 4e-3.
* Residual sums are compared exactly: one float32 add rounded once, in both.
* Accuracy against a float64 oracle (16-bit dtypes): the fused kernels round once where the unfused
  bf16/fp16 code rounds two or three times, so their mean error must not exceed the unfused one's.
"""

from __future__ import annotations

import pytest
import torch

from miniinfer import layers, rope
from miniinfer.attention import grouped_query_attention
from miniinfer.components import Components
from miniinfer.kernels import triton_available
from miniinfer.kernels.fused import (
    fused_add_rms_norm,
    fused_add_rms_norm_torch,
    fused_add_rms_norm_triton,
    rope_qk_inplace,
    rope_qk_inplace_at_positions,
    rope_qk_inplace_at_positions_torch,
    rope_qk_inplace_torch,
    silu_and_mul,
    silu_and_mul_torch,
    silu_and_mul_triton,
)
from miniinfer.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}
TIGHT = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def strided(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator, pad: int = 5, scale: float = 1.0):
    """A [rows, cols] view with row stride cols + pad (random values in the padding too)."""
    buffer = (scale * torch.randn(rows, cols + pad, generator=gen)).to(dtype)
    return buffer[:, :cols]


def mean_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((x.double() - oracle).abs().mean())


# ------------------------------------------------------------------------------------------------
# fused_add_rms_norm
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_rms_norm_reference_is_the_unfused_math(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, r = strided(5, 48, dtype, gen), strided(5, 48, dtype, gen)
    w = (1 + 0.2 * torch.randn(48, generator=gen)).to(dtype)
    normed, residual_out = fused_add_rms_norm(x, r, w, 1e-6, backend="torch")
    assert torch.equal(residual_out, x + r)
    assert torch.equal(normed, layers.rms_norm(x + r, w, 1e-6))
    normed, residual_out = fused_add_rms_norm(x, None, w, 1e-6)  # auto on a CPU: the reference
    assert residual_out is x and torch.equal(normed, layers.rms_norm(x, w, 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("E", [48, 896, 1000])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_add_rms_norm_triton_matches_reference(T, E, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, r = strided(T, E, dtype, gen, scale=3.0), strided(T, E, dtype, gen)
    w = (1 + 0.2 * torch.randn(E, generator=gen)).to(dtype)
    eps = 1e-6
    for residual in (r, None):
        ref_normed, ref_sum = fused_add_rms_norm_torch(x, residual, w, eps)
        normed, residual_out = fused_add_rms_norm_triton(x, residual, w, eps)
        assert normed.shape == (T, E) and normed.dtype == dtype
        if residual is None:
            assert residual_out is x
        else:
            assert torch.equal(residual_out, ref_sum), "the residual sum must round like the unfused add"
        torch.testing.assert_close(normed, ref_normed, **TOL[dtype])


@needs_triton
def test_add_rms_norm_triton_large_rows_and_leading_dims(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8192, generator=gen)
    w = torch.randn(8192, generator=gen)
    torch.testing.assert_close(fused_add_rms_norm_triton(x, x, w, 1e-5)[0], fused_add_rms_norm_torch(x, x, w, 1e-5)[0],
                               **TOL[torch.float32])
    x3, r3 = torch.randn(2, 3, 40, generator=gen).half(), torch.randn(2, 3, 40, generator=gen).half()
    w3 = torch.randn(40, generator=gen).half()
    normed, residual_out = fused_add_rms_norm(x3, r3, w3, 1e-6, backend="triton")
    assert normed.shape == residual_out.shape == (2, 3, 40)
    torch.testing.assert_close(normed, layers.rms_norm(x3 + r3, w3, 1e-6), **TOL[torch.float16])
    assert torch.equal(residual_out, x3 + r3)


# ------------------------------------------------------------------------------------------------
# RoPE on q and k, in place
# ------------------------------------------------------------------------------------------------

ROPE_CASES = [(T, H, H_kv, D) for (H, H_kv) in [(14, 2), (4, 4), (7, 1)] for D, T in [(32, 1), (64, 3), (128, 17)]]


def make_qkv(T, heads, D, dtype, gen, pad=5):
    """[T, heads, D] view of a [T, heads * D + pad] buffer (the qkv projection with a padded row), and the buffer."""
    buffer = torch.randn(T, heads * D + pad, generator=gen).to(dtype)
    return buffer[:, :heads * D].view(T, heads, D), buffer


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,H_kv,D", ROPE_CASES)
def test_rope_triton_matches_reference_in_place(T, H, H_kv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    heads, rotated = H + 2 * H_kv, H + H_kv
    cos_table, sin_table = rope.rope_cos_sin(300, D, 10000.0)
    positions = torch.randint(0, 300, (T,), generator=gen)
    positions[0] = 299  # the last table row
    for at_positions in (False, True):
        qkv, buffer = make_qkv(T, heads, D, dtype, gen)
        before = buffer.clone()
        want = qkv.clone()
        if at_positions:
            rope_qk_inplace_at_positions_torch(want, positions, cos_table, sin_table, rotated)
            out = rope_qk_inplace_at_positions(qkv, positions, cos_table, sin_table, rotated, backend="triton")
        else:
            cos, sin = cos_table[positions], sin_table[positions]
            rope_qk_inplace_torch(want, cos, sin, rotated)
            out = rope_qk_inplace(qkv, cos, sin, rotated, backend="triton")
        assert out is qkv
        torch.testing.assert_close(qkv, want, **TIGHT[dtype])
        # v heads and the padding columns are untouched, bit for bit
        assert torch.equal(buffer[:, rotated * D:], before[:, rotated * D:])
        # and the rotated heads really changed (position 299 is never the identity rotation)
        assert not torch.equal(qkv[0, :rotated], before[0, :rotated * D].view(rotated, D))


def test_rope_reference_is_apply_rope(seed):
    """float32: exactly rope.apply_rope on the first heads; the rest untouched."""
    gen = torch.Generator().manual_seed(seed)
    qkv, _ = make_qkv(4, 8, 16, torch.float32, gen)
    original = qkv.clone()
    cos, sin = rope.rope_cos_sin(10, 16, 10000.0)
    positions = torch.tensor([3, 0, 9, 3])
    rope_qk_inplace(qkv, cos[positions], sin[positions], 6)
    assert torch.equal(qkv[:, :6], rope.apply_rope(original[:, :6], cos[positions], sin[positions]))
    assert torch.equal(qkv[:, 6:], original[:, 6:])
    again = original.clone()
    rope_qk_inplace_at_positions(again, positions, cos, sin, 6)
    assert torch.equal(again, qkv)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("torch", torch.float16),
                                           pytest.param("triton", torch.float16, marks=needs_triton)])
def test_rope_fused_is_at_least_as_accurate_as_unfused(backend, dtype, seed):
    """With 16-bit tables (a bf16 model's buffers) the unfused apply_rope rounds every product; the fused
    kernel computes in float32 and rounds once."""
    gen = torch.Generator().manual_seed(seed)
    T, heads, D = 17, 6, 64
    cos_table, sin_table = (t.to(dtype) for t in rope.rope_cos_sin(200, D, 10000.0))
    positions = torch.randint(0, 200, (T,), generator=gen)
    qkv, _ = make_qkv(T, heads, D, dtype, gen)
    cos, sin = cos_table[positions], sin_table[positions]
    oracle = rope.apply_rope(qkv.double(), cos.double(), sin.double())
    unfused = rope.apply_rope(qkv, cos, sin)
    fused = rope_qk_inplace_at_positions(qkv.clone(), positions, cos_table, sin_table, backend=backend)
    assert mean_error(fused, oracle) <= mean_error(unfused, oracle) + 1e-6


# ------------------------------------------------------------------------------------------------
# silu_and_mul
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_and_mul_reference(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gate_up = strided(7, 2 * 48, dtype, gen, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    out = silu_and_mul(gate_up, backend="torch")
    assert out.shape == (7, 48) and out.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(out, layers.swiglu(gate, up))  # float32: the teaching function, exactly
    oracle = layers.swiglu(gate.double(), up.double())
    assert mean_error(out, oracle) <= mean_error(layers.swiglu(gate, up), oracle) + 1e-7


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(100) = inf: intended
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("I", [48, 1000, 4864])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_silu_and_mul_triton_matches_reference(T, I, dtype, seed):  # noqa: E741 - the MLP width
    gen = torch.Generator().manual_seed(seed)
    gate_up = strided(T, 2 * I, dtype, gen, scale=4.0)  # |gate| up to ~16: exp overflows in fp16 math too
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0]).to(dtype)  # saturated sigmoid, no NaN
    out = silu_and_mul_triton(gate_up)
    ref = silu_and_mul_torch(gate_up)
    assert out.shape == (T, I) and out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, **TIGHT[dtype])
    if dtype == torch.float16:
        oracle = layers.swiglu(*gate_up.double().chunk(2, dim=-1))
        assert mean_error(out, oracle) <= mean_error(layers.swiglu(*gate_up.chunk(2, dim=-1)), oracle) + 1e-7


# ------------------------------------------------------------------------------------------------
# Empty inputs, argument checks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_token_dim(backend):
    x, w = torch.randn(0, 48), torch.randn(48)
    normed, residual_out = fused_add_rms_norm(x, torch.randn(0, 48), w, 1e-6, backend=backend)
    assert normed.shape == residual_out.shape == (0, 48)
    qkv = torch.randn(0, 8, 16)
    cos, sin = rope.rope_cos_sin(10, 16, 10000.0)
    assert rope_qk_inplace(qkv, cos[:0], sin[:0], 6, backend=backend).shape == (0, 8, 16)
    assert rope_qk_inplace_at_positions(qkv, torch.zeros(0, dtype=torch.long), cos, sin, 6,
                                        backend=backend).shape == (0, 8, 16)
    assert silu_and_mul(torch.randn(0, 96), backend=backend).shape == (0, 48)


def test_bad_arguments_raise_clear_errors():
    x, w = torch.randn(3, 48), torch.randn(48)
    with pytest.raises(ValueError, match="backend"):
        fused_add_rms_norm(x, None, w, 1e-6, backend="cuda")
    with pytest.raises(ValueError, match="weight"):
        fused_add_rms_norm(x, None, torch.randn(40), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, x.half(), w, 1e-6)
    cos, sin = rope.rope_cos_sin(10, 16, 10000.0)
    with pytest.raises(ValueError, match="num_rotated_heads"):
        rope_qk_inplace(torch.randn(3, 4, 16), cos[:3], sin[:3], 5)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_qk_inplace(torch.randn(3, 4, 16), cos[:2], sin[:2])
    with pytest.raises(ValueError, match="positions"):
        rope_qk_inplace_at_positions(torch.randn(3, 4, 16), torch.zeros(2, dtype=torch.long), cos, sin)
    with pytest.raises(ValueError, match="2·I"):
        silu_and_mul(torch.randn(3, 7))


# ------------------------------------------------------------------------------------------------
# The model's fused forward path
# ------------------------------------------------------------------------------------------------

def tiny_model(seed: int, tie: bool = False, H: int = 4, H_kv: int = 2, D: int = 16) -> Qwen2ForCausalLM:
    """A random float32 Qwen2 whose norm gains and biases are random too (a wrong one shows up)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=H, num_key_value_heads=H_kv, head_dim=D, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.2 if "norm" in name or name.endswith("bias") else 0.1) * torch.randn_like(p))
    return model


class RecordingContext:
    """A minimal AttentionContext for packed tokens of one sequence: causal attention over them, recording
    what each layer hands over (the contract: q [*, H, D], k, v [*, H_kv, D])."""

    def __init__(self):
        self.calls = []

    def attend(self, layer_index, q, k, v, scale):
        self.calls.append((layer_index, q.clone(), k.clone(), v.clone(), scale))
        return grouped_query_attention(q[None], k[None], v[None], causal=True, scale=scale)[0]


def run_both(model, backend, fn):
    model.enable_fused_kernels(False)
    unfused = fn()
    model.enable_fused_kernels(backend=backend)
    try:
        fused = fn()
    finally:
        model.enable_fused_kernels(False)
    return unfused, fused


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("tie", [False, True])
def test_fused_forward_matches_unfused(backend, tie, seed):
    model = tiny_model(seed, tie=tie)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # plain causal forward [B, L]
        unfused, fused = run_both(model, backend, lambda: model(ids))
        assert fused.shape == unfused.shape == (2, 9, 101)
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
        # packed [T] with an attention context, positions not starting at 0, logits on chosen rows
        packed, positions, rows = ids[0], torch.arange(5, 14), torch.tensor([8, 2])
        contexts = []

        def packed_forward():
            contexts.append(RecordingContext())
            return model(packed, positions, attention=contexts[-1], logits_indices=rows)

        unfused, fused = run_both(model, backend, packed_forward)
        assert fused.shape == (2, 101)
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
        for (li, *tensors, scale), (lj, *tensors_f, scale_f) in zip(*(c.calls for c in contexts), strict=True):
            assert li == lj and scale == scale_f
            for a, b in zip(tensors, tensors_f):
                assert a.shape == b.shape
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fused_greedy_generation_with_kv_cache_matches(backend, seed):
    """The [B, L] layout through the chapter-05 KV cache: prefill, then one token at a time."""
    from miniinfer.generate import generate
    from miniinfer.sampling import SamplingParams

    model = tiny_model(seed, H=7, H_kv=1, D=8)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    unfused, fused = run_both(model, backend, lambda: generate(model, [5, 17, 42, 3], params))
    assert fused == unfused


def test_enable_fused_kernels_flag_and_refusals():
    model = tiny_model(0)
    assert model.fused_kernels is False
    assert model.enable_fused_kernels() is model and model.fused_kernels and model.fused_backend == "auto"
    model.enable_fused_kernels(False)
    assert not model.fused_kernels
    with pytest.raises(ValueError, match="backend"):
        model.enable_fused_kernels(backend="cuda")
    config = model.config

    def my_rms_norm(x, weight, eps):
        return layers.rms_norm(x, weight, eps)

    custom = Qwen2ForCausalLM(config, Components(rms_norm=my_rms_norm))
    with pytest.raises(ValueError, match="rms_norm"):
        custom.enable_fused_kernels()
    assert not custom.fused_kernels
    custom.enable_fused_kernels(False)  # turning it off is always allowed
    # A custom attention still runs in the fused path (it is called there too): allowed.
    Qwen2ForCausalLM(config, Components(attention=lambda *a, **k: grouped_query_attention(*a, **k))) \
        .enable_fused_kernels()
