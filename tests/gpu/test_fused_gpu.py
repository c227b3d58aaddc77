"""Fused kernels on a CUDA GPU: the Triton kernels against the torch references in bf16, fp16 and fp32,
inside a CUDA graph, and the model's fused forward path against the readable one.

    python -m pytest -m gpu tests/gpu/test_fused_gpu.py -q

Tolerances cover only roundings that can flip: both sides compute in float32 (the GPU may contract
``a * b - c * d`` into an FMA, and the norm sums in another order), so a value that lands near a
rounding boundary of the storage dtype can round the other way: one ulp of the dtype, two where a
rounded value is multiplied again (the RMSNorm gain). bf16 atol = rtol = 1.6e-2 (2^-8 relative is
one ulp), fp16 4e-3, fp32 1e-5. Residual sums are exact (one float32 add rounded once, in both).

Model checks, on the trained bundled model: float32 greedy continuations are identical fused and
unfused (the same math up to float32 last bits); bf16 logits agree to bf16 precision and are no
further from the float32 logits than the unfused bf16 ones are; the engine (paged attention, CUDA
graphs) gives the same greedy tokens with the fused path turned on.
"""

from __future__ import annotations

import pytest
import torch

from miniinfer import layers, rope
from miniinfer.kernels.fused import (
    fused_add_rms_norm,
    fused_add_rms_norm_torch,
    rope_qk_inplace,
    rope_qk_inplace_at_positions,
    rope_qk_inplace_at_positions_torch,
    rope_qk_inplace_torch,
    silu_and_mul,
    silu_and_mul_torch,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.float32: dict(atol=1e-5, rtol=1e-5)}


def strided(rows, cols, dtype, gen, pad=8, scale=1.0):
    """A [rows, cols] CUDA view with row stride cols + pad."""
    return (scale * torch.randn(rows, cols + pad, generator=gen)).to(dtype).cuda()[:, :cols]


def mean_error(x, oracle):
    return float((x.double() - oracle).abs().mean())


# ------------------------------------------------------------------------------------------------
# Kernels against the references
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E", [(1, 896), (3, 1000), (17, 48), (17, 3584), (4096, 896), (5, 8192)])
def test_add_rms_norm(T, E, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, r = strided(T, E, dtype, gen, scale=3.0), strided(T, E, dtype, gen)
    w = (1 + 0.2 * torch.randn(E, generator=gen)).to(dtype).cuda()
    for residual in (r, None):
        ref_normed, ref_sum = fused_add_rms_norm_torch(x, residual, w, 1e-6)
        normed, residual_out = fused_add_rms_norm(x, residual, w, 1e-6)  # auto: Triton on the GPU
        assert residual_out is x if residual is None else torch.equal(residual_out, ref_sum)
        assert not torch.isnan(normed).any()
        torch.testing.assert_close(normed, ref_normed, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,H_kv,D", [(1, 14, 2, 64), (3, 4, 4, 32), (17, 7, 1, 128), (4096, 14, 2, 64),
                                        (4096, 28, 4, 128)])
def test_rope_in_place(T, H, H_kv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    heads, rotated = H + 2 * H_kv, H + H_kv
    cos_table, sin_table = (t.cuda() for t in rope.rope_cos_sin(32768, D, 1e6))
    positions = torch.randint(0, 32768, (T,), generator=gen).cuda()
    for at_positions in (False, True):
        buffer = torch.randn(T, heads * D + 8, generator=gen).to(dtype).cuda()
        before = buffer.clone()
        qkv = buffer[:, :heads * D].view(T, heads, D)
        want = qkv.clone()
        if at_positions:
            rope_qk_inplace_at_positions_torch(want, positions, cos_table, sin_table, rotated)
            rope_qk_inplace_at_positions(qkv, positions, cos_table, sin_table, rotated)
        else:
            cos, sin = cos_table[positions], sin_table[positions]
            rope_qk_inplace_torch(want, cos, sin, rotated)
            rope_qk_inplace(qkv, cos, sin, rotated)
        torch.testing.assert_close(qkv, want, **TOL[dtype])
        assert torch.equal(buffer[:, rotated * D:], before[:, rotated * D:]), "v heads or padding were written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 4864), (3, 1000), (17, 48), (4096, 4864), (7, 18944)])
def test_silu_and_mul(T, I, dtype, seed):  # noqa: E741 - the MLP width
    gen = torch.Generator().manual_seed(seed)
    gate_up = strided(T, 2 * I, dtype, gen, scale=4.0)
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0], device="cuda").to(dtype)
    out = silu_and_mul(gate_up)
    assert out.shape == (T, I) and not torch.isnan(out).any()
    torch.testing.assert_close(out, silu_and_mul_torch(gate_up), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_at_least_as_accurate_as_unfused(dtype, seed):
    """Against float64: SiLU-and-mul and RoPE (16-bit tables, as in a bf16 model) round once fused, two or
    three times unfused."""
    gen = torch.Generator().manual_seed(seed)
    gate, up = (strided(64, 4864, dtype, gen, scale=3.0) for _ in range(2))
    gate_up = torch.cat([gate, up], dim=-1)
    oracle = layers.swiglu(gate.double(), up.double())
    assert mean_error(silu_and_mul(gate_up), oracle) <= mean_error(layers.swiglu(gate, up), oracle) + 1e-7
    cos_table, sin_table = (t.to(dtype).cuda() for t in rope.rope_cos_sin(4096, 64, 1e6))
    positions = torch.randint(0, 4096, (64,), generator=gen).cuda()
    qkv = torch.randn(64, 18, 64, generator=gen).to(dtype).cuda()
    cos, sin = cos_table[positions], sin_table[positions]
    oracle = rope.apply_rope(qkv.double(), cos.double(), sin.double())
    fused = rope_qk_inplace_at_positions(qkv.clone(), positions, cos_table, sin_table)
    assert mean_error(fused, oracle) <= mean_error(rope.apply_rope(qkv, cos, sin), oracle) + 1e-7


def test_empty_token_dim():
    x, w = torch.randn(0, 896, device="cuda"), torch.randn(896, device="cuda")
    assert fused_add_rms_norm(x, x, w, 1e-6)[0].shape == (0, 896)
    cos, sin = (t.cuda() for t in rope.rope_cos_sin(16, 64, 1e4))
    qkv = torch.randn(0, 18, 64, device="cuda")
    assert rope_qk_inplace_at_positions(qkv, torch.zeros(0, dtype=torch.long, device="cuda"), cos, sin, 16) is qkv
    assert silu_and_mul(torch.randn(0, 20, device="cuda")).shape == (0, 10)


def test_kernels_in_cuda_graph(seed):
    """Capture all three, change the inputs in place, replay: the results follow the new inputs."""
    gen = torch.Generator().manual_seed(seed)
    T, E, I, D = 4, 896, 4864, 64
    x, r = (torch.randn(T, E, generator=gen).bfloat16().cuda() for _ in range(2))
    w = torch.randn(E, generator=gen).bfloat16().cuda()
    qkv = torch.randn(T, 18, D, generator=gen).bfloat16().cuda()
    positions = torch.arange(T, device="cuda")
    cos, sin = (t.cuda() for t in rope.rope_cos_sin(128, D, 1e6))
    gate_up = torch.randn(T, 2 * I, generator=gen).bfloat16().cuda()

    def step():
        rope_qk_inplace_at_positions(qkv, positions, cos, sin, 16)
        return fused_add_rms_norm(x, r, w, 1e-6), silu_and_mul(gate_up)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (normed, residual_out), act = step()
    for t in (x, r, gate_up, qkv):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype).cuda())
    positions.copy_(torch.tensor([100, 7, 0, 127]))
    qkv_before = qkv.clone()
    graph.replay()
    ref_normed, ref_sum = fused_add_rms_norm_torch(x, r, w, 1e-6)
    torch.testing.assert_close(normed, ref_normed, **TOL[torch.bfloat16])
    assert torch.equal(residual_out, ref_sum)
    torch.testing.assert_close(act, silu_and_mul_torch(gate_up), **TOL[torch.bfloat16])
    rope_qk_inplace_at_positions_torch(qkv_before, positions, cos, sin, 16)
    torch.testing.assert_close(qkv, qkv_before, **TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

PROMPTS = ["ROMEO.\nBut soft, what light", "First Witch.\nWhen shall we three meet again", "KING LEAR.\nNothing",
           "JULIET.\nO Romeo, Romeo", "HAMLET.\nTo be, or not to be"]


def bundled(dtype):
    from miniinfer import bundled_model_path
    from miniinfer.loader import load_model

    return load_model(bundled_model_path("shakespeare"), dtype=dtype, device="cuda")


@torch.inference_mode()
def test_model_fused_logits_bf16():
    model32, tokenizer = bundled(torch.float32)
    model16, _ = bundled(torch.bfloat16)
    ids = torch.tensor([tokenizer.encode(PROMPTS[0] + " " + PROMPTS[4])], device="cuda")
    reference = model32(ids).float()
    unfused = model16(ids).float()
    model16.enable_fused_kernels()
    fused = model16(ids).float()
    model32.enable_fused_kernels()
    fused32 = model32(ids).float()
    torch.testing.assert_close(fused32, reference, atol=1e-4, rtol=1e-4)
    err_fused = float((fused - reference).norm() / reference.norm())
    err_unfused = float((unfused - reference).norm() / reference.norm())
    print(f"bf16 logits vs fp32: fused rel err {err_fused:.2e}, unfused {err_unfused:.2e}")
    assert err_fused < 2e-2 and err_fused <= 1.25 * err_unfused + 1e-3
    assert float((fused - unfused).norm() / unfused.norm()) < 2e-2


@torch.inference_mode()
def test_model_fused_greedy_identical_fp32():
    from miniinfer.generate import generate
    from miniinfer.sampling import SamplingParams

    model, tokenizer = bundled(torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        unfused = generate(model, ids, params)
        model.enable_fused_kernels()
        fused = generate(model, ids, params)
        model.enable_fused_kernels(False)
        assert fused == unfused, f"greedy continuation of {prompt!r} differs"


@pytest.mark.parametrize("dtype, minimum", [(torch.float32, 0.99), (torch.bfloat16, 0.9)])
def test_engine_with_fused_kernels(dtype, minimum):
    """The engine's paged attention and CUDA-graph decode with the fused path: through the engine option
    when the engine has one, else switched by hand before the first step captures a graph."""
    from miniinfer import LLM, SamplingParams
    from miniinfer.engine import EngineConfig

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    has_option = "enable_fused_kernels" in EngineConfig.__dataclass_fields__
    outputs = []
    for fused in (False, True):
        llm = LLM(device="cuda", dtype=dtype, max_num_seqs=8, **({"enable_fused_kernels": fused} if has_option else {}))
        if not has_option:
            llm.engine.model.enable_fused_kernels(fused)
        outputs.append([o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)])
        assert llm.engine.model.fused_kernels == fused
    agree = sum(u == v for a, b in zip(*outputs) for u, v in zip(a, b)) / sum(len(a) for a in outputs[0])
    print(f"{dtype} fused vs unfused engine greedy agreement: {agree:.3f}")
    assert agree >= minimum
