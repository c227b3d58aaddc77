"""miniinfer.quant on the CPU: formats, RTN against float64 formulas, packing, the quantized layers, GPTQ
against a straightforward float64 implementation, QAT's straight-through estimator, quantize_model,
GPTQ checkpoints (write, load back through load_model), LLM(quantization=...).

Sizes are awkward on purpose (N = 13, 37, 40; K = 48, 96, 192; groups of 16, 32, 48). Tolerances:
the error of RTN is bounded by half a scale step (plus float32 rounding of the division, 1e-6
relative); exact integer paths (W8A8's int32 sum, packing) are compared exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from miniinfer.quant import (
    FP8_E4M3,
    FP8_E5M2,
    FP8Linear,
    GroupQuantLinear,
    Int8Linear,
    W8A8Linear,
    dequantize,
    gptq_quantize,
    gptq_reference,
    int_format,
    pack_int4,
    pack_int32,
    quantize,
    quantize_dequantize,
    quantize_per_token,
    representable_values,
    unpack_int4,
    unpack_int32,
)
from miniinfer.quant.linear import int_mm
from miniinfer.quant.qat import FakeQuantLinear, fake_quantize_ste


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small tensors: one thread is as fast, and steady when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ formats

def test_int_formats():
    assert (int_format(8).qmin, int_format(8).qmax) == (-128, 127)
    assert (int_format(8, symmetric=False).qmin, int_format(8, symmetric=False).qmax) == (0, 255)
    assert (int_format(4).qmin, int_format(4).qmax) == (-8, 7)
    assert (int_format(4, False).qmax, int_format(3, False).qmax) == (15, 7)
    assert representable_values(int_format(4)).numel() == 16
    with pytest.raises(ValueError, match="bits"):
        int_format(9)


def test_fp8_formats():
    assert FP8_E4M3.max == 448.0 and FP8_E5M2.max == 57344.0
    assert FP8_E4M3.smallest_normal == 2.0**-6 and FP8_E5M2.smallest_normal == 2.0**-14
    assert FP8_E4M3.smallest_subnormal == 2.0**-9 and FP8_E5M2.smallest_subnormal == 2.0**-16
    e4m3, e5m2 = representable_values(FP8_E4M3), representable_values(FP8_E5M2)
    assert e4m3.numel() == 253 and e5m2.numel() == 247  # 256 patterns − NaNs (− infs) − the duplicate −0
    assert e4m3.max() == 448 and e5m2.max() == 57344
    # Relative spacing above the normal range is 2**-mantissa_bits.
    ones = e4m3[(e4m3 >= 1) & (e4m3 < 2)]
    assert torch.allclose(ones.diff(), torch.full_like(ones.diff(), 2.0**-3))


# ------------------------------------------------------------------------------------------------ RTN

def rtn_float64(w: torch.Tensor, bits: int, symmetric: bool, g: int) -> torch.Tensor:
    """The formulas of the module docstring, written out in float64 for one group at a time."""
    w = w.double()
    out = torch.empty_like(w)
    rows = w.reshape(-1, w.shape[-1])
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], g):
            x = rows[r, start:start + g]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = max(x.abs().max().item() / qmax, 1e-12)
                q = torch.clamp(torch.round(x / s), -qmax - 1, qmax)
                out.view(-1, w.shape[-1])[r, start:start + g] = q * s
            else:
                lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
                s = max((hi - lo) / (2**bits - 1), 1e-12)
                z = round(-lo / s)
                q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
                out.view(-1, w.shape[-1])[r, start:start + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,group_size", [((13, 96), None), ((37, 96), 32), ((5, 48), 16), ((3, 7, 48), 48)])
def test_rtn_matches_float64_formulas_and_error_bound(bits, symmetric, shape, group_size):
    w = torch.randn(*shape, generator=gen(bits)) * torch.rand(shape[-1], generator=gen(1)) * 3
    w[..., 0] += 2.0  # an outlier column
    qt = quantize(w, bits, symmetric=symmetric, group_size=group_size)
    deq = dequantize(qt, torch.float64)
    g = group_size or shape[-1]
    assert qt.scale.shape == (*shape[:-1], shape[-1] // g)
    fmt = int_format(bits, symmetric)
    assert int(qt.q.min()) >= fmt.qmin and int(qt.q.max()) <= fmt.qmax
    torch.testing.assert_close(deq, rtn_float64(w, bits, symmetric, g), atol=1e-5, rtol=1e-5)
    # The bound: at most half a step per element (float32 division adds ~1e-7 relative).
    step = qt.scale.double().repeat_interleave(g, dim=-1)
    assert ((deq - w.double()).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_rtn_per_tensor_and_zero_is_exact():
    w = torch.randn(17, 33, generator=gen(3))
    w[3, 4] = 0.0
    for symmetric in (True, False):
        qt = quantize(w, 8, symmetric=symmetric, per_tensor=True)
        assert qt.scale.numel() == 1
        deq = dequantize(qt)
        assert deq[3, 4] == 0.0  # zero is on the grid: asymmetric ranges are widened to contain it
        assert ((deq - w).abs() <= qt.scale / 2 * (1 + 1e-5)).all()
    assert quantize_dequantize(torch.zeros(4, 8), 4, group_size=4).abs().max() == 0  # an all-zero group


def test_error_shrinks_with_group_size():
    w = torch.randn(64, 256, generator=gen(4)) * torch.exp(torch.randn(256, generator=gen(5)))
    errors = [float((quantize_dequantize(w, 4, symmetric=False, group_size=g) - w).pow(2).mean())
              for g in (256, 128, 64, 32)]
    assert errors == sorted(errors, reverse=True)


def test_per_token_activation_quantization():
    x = torch.randn(9, 40, generator=gen(6))
    x[2] *= 100  # one loud token does not hurt the others: scales are per token
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (9, 1)
    assert ((q.float() * s - x).abs() <= s / 2 * (1 + 1e-5)).all()


# ------------------------------------------------------------------------------------------------ packing

def test_pack_int4_layout_and_roundtrip():
    q = torch.tensor([[1, 2, 15, 0, 7, 8]])
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x0F, 0x87]]
    q = torch.randint(0, 16, (5, 3, 38), generator=gen(7))
    assert torch.equal(unpack_int4(pack_int4(q)).long(), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 5))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int32_roundtrip(bits, dim):
    per_word = 32 // bits
    shape = (per_word * 3, 5) if dim == 0 else (5, per_word * 3)
    q = torch.randint(0, 2**bits, shape, generator=gen(bits))
    words = pack_int32(q, bits, dim)
    assert words.dtype == torch.int32 and words.shape[dim] == 3
    assert torch.equal(unpack_int32(words, bits, dim).long(), q)


def test_pack_int32_known_word():
    q = torch.tensor([1, 2, 3, 4, 5, 6, 7, 15]).view(8, 1)  # first value in the lowest nibble
    assert pack_int32(q, 4, 0).item() == 0xF7654321 - 2**32


# ------------------------------------------------------------------------------------------------ layers

def make_linear(K: int, N: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.exp(torch.randn(K) * 0.5))  # uneven input scales, like a real layer
    return linear.requires_grad_(False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_linear(symmetric):
    linear = make_linear(48, 37, bias=True)
    layer = Int8Linear.from_linear(linear, symmetric=symmetric)
    expected_w = quantize_dequantize(linear.weight, 8, symmetric=symmetric)
    torch.testing.assert_close(layer.dequantized_weight(), expected_w, atol=1e-6, rtol=0)
    x = torch.randn(3, 5, 48, generator=gen(8))
    torch.testing.assert_close(layer(x), x @ expected_w.T + linear.bias, atol=1e-5, rtol=1e-5)
    assert layer.weight_bytes() < linear.weight.numel() * 4 / 3  # int8 + per-row scale (and zero)


def test_int_mm_exact():
    a = torch.randint(-128, 128, (7, 1040), generator=gen(9), dtype=torch.int64).to(torch.int8)
    b = torch.randint(-128, 128, (1040, 24), generator=gen(10), dtype=torch.int64).to(torch.int8)
    assert torch.equal(int_mm(a, b), (a.long() @ b.long()).to(torch.int32))


def test_w8a8_linear_is_exact_integer_math():
    linear = make_linear(96, 40, bias=True, seed=1)
    layer = W8A8Linear.from_linear(linear)
    x = torch.randn(2, 3, 96, generator=gen(11))
    x[0, 1, 5] = 30.0  # an outlier feature
    qx, sx = quantize_per_token(x.reshape(-1, 96))
    qw = quantize(linear.weight, 8, symmetric=True)
    acc = qx.double() @ qw.q.double().T  # exact in float64 (|acc| < 2**53)
    expected = acc * sx.double() * qw.scale[:, 0].double()[None, :] + linear.bias.double()
    torch.testing.assert_close(layer(x).reshape(-1, 40).double(), expected, atol=1e-4, rtol=1e-5)
    # And close to the float layer (int8 on both sides: ~1 % error on these sizes).
    rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.03


def test_w8a8_smoothing_is_an_identity_on_the_float_math():
    linear = make_linear(48, 16, bias=False, seed=2)
    smooth = torch.rand(48, generator=gen(12)) + 0.5
    layer = W8A8Linear.from_linear(linear, smooth=smooth)
    rel = (layer.dequantized_weight() - linear.weight).norm() / linear.weight.norm()
    assert rel < 0.01


@pytest.mark.parametrize("bits,g,symmetric", [(4, 32, False), (4, 48, True), (3, 16, False), (8, 96, True),
                                              (2, 32, False)])
def test_group_quant_linear(bits, g, symmetric):
    linear = make_linear(96, 40, bias=True, seed=3)
    layer = GroupQuantLinear.from_linear(linear, bits, g, symmetric)
    expected_w = quantize_dequantize(linear.weight, bits, symmetric=symmetric, group_size=g)
    torch.testing.assert_close(layer.dequantized_weight(), expected_w, atol=1e-6, rtol=0)
    x = torch.randn(4, 96, generator=gen(13))
    torch.testing.assert_close(layer(x), x @ expected_w.T + linear.bias, atol=1e-5, rtol=1e-5)
    assert layer.packed == (32 % bits == 0)


def test_group_quant_linear_with_act_order_g_idx():
    K, N, g = 64, 24, 16
    q = torch.randint(0, 16, (K, N), generator=gen(14))
    scales, zeros = torch.rand(K // g, N, generator=gen(15)) + 0.1, torch.randint(0, 16, (K // g, N), generator=gen(16))
    perm = torch.randperm(K, generator=gen(17))
    g_idx = torch.empty(K, dtype=torch.long).index_copy_(0, perm, torch.arange(K) // g)
    layer = GroupQuantLinear(q, scales, zeros, 4, g, g_idx=g_idx)
    expected = (scales[g_idx] * (q - zeros[g_idx])).T  # [N, K]
    torch.testing.assert_close(layer.dequantized_weight(), expected.float())
    x = torch.randn(3, K, generator=gen(18))
    torch.testing.assert_close(layer(x), x @ expected.T.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_linear_emulation(fmt):
    linear = make_linear(48, 37, bias=True, seed=4)
    layer = FP8Linear.from_linear(linear, fmt)
    w = layer.dequantized_weight()
    # Weights land on the format's grid (after the per-channel scale), with its relative precision.
    f = FP8_E4M3 if fmt == "e4m3" else FP8_E5M2
    scaled = linear.weight / layer.scale[:, None]
    normal = scaled.abs() >= f.smallest_normal
    rel = ((w - linear.weight).abs() / linear.weight.abs())[normal]
    assert rel.max() <= f.relative_spacing / 2 * (1 + 1e-6)
    x = torch.randn(5, 48, generator=gen(19))
    sx = x.abs().amax(1, keepdim=True) / f.max
    xq = (x / sx).to(f.dtype).float() * sx
    torch.testing.assert_close(layer(x), xq @ w.T + linear.bias, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ GPTQ

def hessian(K: int, n: int, seed: int, dead: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(n, K, generator=gen(seed), dtype=torch.float64) * (torch.rand(K, generator=gen(seed + 1),
                                                                                     dtype=torch.float64) * 3)
    X = X + 0.5 * X[:, :1]  # correlated inputs: where GPTQ's error spreading pays off
    if dead is not None:
        X[:, dead] = 0
    return X, 2 * X.T @ X / n


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, None, 48])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_equals_straightforward_float64(act_order, group_size, symmetric):
    N, K = 13, 48
    W = torch.randn(N, K, generator=gen(20), dtype=torch.float64)
    _, H = hessian(K, 200, 21, dead=5)
    fast = gptq_quantize(W, H, 4, group_size, symmetric, act_order, blocksize=32, percdamp=0.01)
    slow = gptq_reference(W, H, 4, group_size, symmetric, act_order, percdamp=0.01)
    torch.testing.assert_close(fast.weight, slow.weight, atol=1e-10, rtol=0)
    assert torch.equal(fast.q, slow.q) and torch.equal(fast.g_idx, slow.g_idx)
    # The integers, scales, zeros and g_idx reproduce the weight exactly.
    rebuilt = fast.scales.gather(1, fast.g_idx.long()[None].expand(N, -1)) * (
        fast.q - fast.zeros.gather(1, fast.g_idx.long()[None].expand(N, -1)))
    torch.testing.assert_close(rebuilt, fast.weight, atol=1e-12, rtol=0)


def test_gptq_blocks_do_not_change_the_result():
    W = torch.randn(9, 96, generator=gen(22), dtype=torch.float64)
    _, H = hessian(96, 300, 23)
    a = gptq_quantize(W, H, 3, 32, blocksize=32)
    b = gptq_quantize(W, H, 3, 32, blocksize=128)
    c = gptq_quantize(W, H, 3, 32, blocksize=20)  # not a multiple of the group: blocks become groups
    torch.testing.assert_close(a.weight, b.weight, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.weight, c.weight, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, None), (4, None)])
def test_gptq_beats_rtn_on_output_error(bits, group_size):
    W = torch.randn(64, 96, generator=gen(24))
    X, H = hessian(96, 500, 25)
    X = X.float()
    err = {}
    for name, Wq in (("rtn", quantize_dequantize(W, bits, symmetric=False, group_size=group_size)),
                     ("gptq", gptq_quantize(W, H.float(), bits, group_size, act_order=True).weight),
                     ("gptq_plain", gptq_quantize(W, H.float(), bits, group_size).weight)):
        err[name] = float(((Wq - W) @ X.T).pow(2).sum())
    assert err["gptq"] < 0.8 * err["rtn"] and err["gptq_plain"] < 0.9 * err["rtn"], err


# ------------------------------------------------------------------------------------------------ QAT

def test_fake_quantize_ste_value_and_gradient():
    w = torch.randn(6, 32, generator=gen(26), requires_grad=True)
    out = fake_quantize_ste(w, 4, 16)
    torch.testing.assert_close(out.detach(), quantize_dequantize(w.detach(), 4, symmetric=False, group_size=16))
    (out * torch.arange(32.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(32.0).expand(6, 32))  # straight through: d out / d w = 1


def test_qat_reduces_output_error_of_one_layer():
    """Correlated inputs (as in a real layer): rounding each weight to its nearest level is not the best
    choice for the output, and training through the fake quantization finds better ones."""
    linear = make_linear(64, 32, bias=False, seed=5)
    x, _ = hessian(64, 256, 27)
    x = x.float()
    target = linear(x)
    fake = FakeQuantLinear(linear, 3, 32)
    with torch.no_grad():
        rtn_error = float((fake(x) - target).pow(2).mean())
    # Plain SGD with a small step: each weight moves in proportion to its gradient (Adam's equal-sized
    # steps make every weight hop across its rounding boundary and back, which raises the error here).
    optimizer = torch.optim.SGD(fake.parameters(), lr=1e-3)
    for _ in range(100):
        loss = (fake(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        qat_error = float((fake(x) - target).pow(2).mean())
    assert qat_error < 0.99 * rtn_error, (qat_error, rtn_error)
    # The trained float weights, rounded, are exactly what the fake-quant forward computed with.
    real = GroupQuantLinear.from_linear(fake.to_linear(), 3, 32)
    torch.testing.assert_close(real(x), fake(x).detach(), atol=1e-4, rtol=1e-5)
    assert math.isfinite(qat_error)
