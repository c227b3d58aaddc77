"""The CUDA flash-attention backend on a machine without a GPU: argument checks, clear errors, and a
lane-level NumPy emulation of ``csrc/flash_attention.cu``'s index maps.

The kernel itself runs only on a GPU (tests/gpu/test_flash_attention_cuda_gpu.py). Its fragment layouts
are easy to get subtly wrong and impossible to debug from a wrong number, so :func:`emulate` re-states
the kernel step by step in NumPy — the swizzled shared-memory tiles, ``ldmatrix`` (x4, and .trans for
V) per lane, ``mma.m16n8k16`` from the PTX ISA's fragment layout (lane = 4 g + t):

    A: reg0 = A[g][2t, 2t+1], reg1 = A[g+8][2t, ..], reg2 = A[g][2t+8, ..], reg3 = A[g+8][2t+8, ..]
    B: reg0 = B[2t, 2t+1][g], reg1 = B[2t+8, 2t+9][g]
    C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]

the causal tile bounds, the per-warp skip and the online softmax — and checks it against the float64
oracle on small odd shapes. Keep it in step with the .cu when the kernel's maps change.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from miniinfer.kernels.flash_attention import BACKENDS, flash_attention
from miniinfer.kernels.flash_attention_cuda import cuda_flash_supports, flash_attention_cuda

CSRC = Path(__file__).resolve().parents[1] / "csrc"

# ------------------------------------------------------------------------------------------------
# Argument checks and errors (no GPU needed)
# ------------------------------------------------------------------------------------------------


def test_cuda_is_a_backend():
    assert "cuda" in BACKENDS


@pytest.mark.parametrize("dtype, D, reason", [
    (torch.bfloat16, 64, "CUDA tensors"),
    (torch.float16, 128, "CUDA tensors"),
    (torch.float32, 64, "float16 and bfloat16"),
    (torch.bfloat16, 96, "head dims"),
    (torch.bfloat16, 32, "head dims"),
])
def test_supports_says_why(dtype, D, reason):
    q = torch.zeros(3, 4, D, dtype=dtype)
    k = torch.zeros(5, 2, D, dtype=dtype)
    problem = cuda_flash_supports(q, k)
    assert problem is not None and reason in problem, problem


def test_supports_paged_page_size():
    q = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    assert "power-of-two" in cuda_flash_supports(q, torch.zeros(2, 24, 2, 64, dtype=torch.bfloat16))
    assert "CUDA tensors" in cuda_flash_supports(q, torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16))


def test_flash_attention_cuda_backend_on_cpu_is_a_clear_error():
    q = torch.randn(5, 4, 64).bfloat16()
    k = torch.randn(7, 2, 64).bfloat16()
    with pytest.raises(ValueError, match=r"backend='cuda'.*CUDA tensors.*triton"):
        flash_attention(q, k, k, backend="cuda")


def test_flash_attention_cuda_backend_unsupported_head_dim():
    q = torch.randn(5, 4, 96).half()
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(q, q[:, :2], q[:, :2], backend="cuda")


def test_flash_attention_cuda_argument_structure():
    q = torch.randn(5, 4, 64).bfloat16()
    k = torch.randn(7, 2, 64).bfloat16()
    cu = torch.tensor([0, 5], dtype=torch.int32)
    pool = torch.randn(2, 16, 2, 64).bfloat16()
    table = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.tensor([7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"packed \[T, H, D\]"):
        flash_attention_cuda(q[None], k, k, cu, cu, None, None, True, 0.125)
    with pytest.raises(ValueError, match="both block_table"):
        flash_attention_cuda(q, pool, pool, cu, None, table, None, True, 0.125)
    with pytest.raises(ValueError, match="exactly one"):
        flash_attention_cuda(q, pool, pool, cu, cu, table, lens, True, 0.125)
    with pytest.raises(ValueError, match="exactly one"):
        flash_attention_cuda(q, k, k, cu, None, None, None, True, 0.125)
    with pytest.raises(ValueError, match="num_blocks"):
        flash_attention_cuda(q, k, k, cu, None, table, lens, True, 0.125)


def test_kernel_source_uses_the_required_instructions():
    source = (CSRC / "flash_attention.cu").read_text()
    for needle in ("mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                   "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "cp.async.cg.shared.global",
                   "cp.async.commit_group", "cp.async.wait_group", "exp2f"):
        assert needle in source, needle
    assert "flash_attention_forward" in (CSRC / "flash_attention_binding.cpp").read_text()


# ------------------------------------------------------------------------------------------------
# A lane-level emulation of the kernel (its constants and index maps, line by line)
# ------------------------------------------------------------------------------------------------

# Config<D> of the kernel (the same for D = 64 and 128): 4 warps, each owning M_TILES m16 tiles, i.e.
# WARP_ROWS = 32 consecutive rows of the CTA's BLOCK_M = 128; 64-key tiles.
WARPS, M_TILES, BLOCK_N = 4, 2, 64
THREADS, WARP_ROWS = 32 * WARPS, 16 * M_TILES
BLOCK_M = WARP_ROWS * WARPS
LANE = np.arange(32)
GRP, TIG = LANE >> 2, LANE & 3  # the fragment names g (row group) and t (thread in group)


def _round(x, dtype):
    return torch.from_numpy(np.asarray(x, np.float32)).to(dtype).float().numpy()


def _swizzle(row, chunk, D):
    return row * D + ((chunk ^ (row & 7)) << 3)


def _ldmatrix_x4(smem, addr, trans=False):
    """addr [32] element offsets (lanes 8j..8j+7: rows of matrix j) -> 4 registers, each [32 lanes, 2]."""
    regs = []
    for j in range(4):
        rows = np.stack([smem[a:a + 8] for a in addr[8 * j:8 * j + 8]])  # [8 rows, 8 elements]
        if trans:
            regs.append(np.stack([rows[2 * TIG, GRP], rows[2 * TIG + 1, GRP]], 1))
        else:
            regs.append(np.stack([rows[GRP, 2 * TIG], rows[GRP, 2 * TIG + 1]], 1))
    return regs


def _mma(c, a, b0, b1):
    A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for e in range(2):
        A[GRP, 2 * TIG + e], A[GRP + 8, 2 * TIG + e] = a[0][:, e], a[1][:, e]
        A[GRP, 2 * TIG + 8 + e], A[GRP + 8, 2 * TIG + 8 + e] = a[2][:, e], a[3][:, e]
        B[2 * TIG + e, GRP], B[2 * TIG + 8 + e, GRP] = b0[:, e], b1[:, e]
        C[GRP, 2 * TIG + e], C[GRP + 8, 2 * TIG + e] = c[:, e], c[:, 2 + e]
    Dm = (A @ B + C).astype(np.float32)
    return np.stack([Dm[GRP, 2 * TIG], Dm[GRP, 2 * TIG + 1], Dm[GRP + 8, 2 * TIG], Dm[GRP + 8, 2 * TIG + 1]], 1)


def _exp2(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp2(x).astype(np.float32)


def _cta(out, q, k, v, cu_q, cu_k, table, seq_lens, P, causal, scale, G, hk, b, m_tile, dtype):
    """One thread block of flash_attention_kernel (grid (H_kv, B, tiles), tile = gridDim.z - 1 - z)."""
    D = q.shape[-1]
    chunks, k_steps, d_tiles, n_tiles = D // 8, D // 16, D // 8, BLOCK_N // 8
    load_rows, load_passes = THREADS // chunks, BLOCK_N * chunks // THREADS
    assert load_rows % 8 == 0 and load_rows * load_passes == BLOCK_N
    paged = table is not None
    q_start, L = cu_q[b], cu_q[b + 1] - cu_q[b]
    k_start, S = (0, min(seq_lens[b], table.shape[1] * P)) if paged else (cu_k[b], cu_k[b + 1] - cu_k[b])
    rows, m0 = L * G, m_tile * BLOCK_M
    if m0 >= rows:
        return
    first_i, last_i = m0 // G, min(L - 1, (m0 + BLOCK_M - 1) // G)
    if causal:
        kv_end = max(0, min(S, S - L + last_i + 1))
        full_end = max(0, min(S - L + first_i + 1, kv_end)) // BLOCK_N * BLOCK_N
    else:
        kv_end, full_end = S, S // BLOCK_N * BLOCK_N
    s_q = np.full(BLOCK_M * D, np.nan, np.float32)
    s_k = np.full(2 * BLOCK_N * D, np.nan, np.float32)  # NaN: reading an unwritten slot poisons the result
    s_v = np.full(2 * BLOCK_N * D, np.nan, np.float32)
    for tid in range(THREADS):  # the Q copy loop: id = tid, tid + THREADS, ...
        for i in range(tid, BLOCK_M * chunks, THREADS):
            row, chunk = divmod(i, chunks)
            r = m0 + row
            src = q[q_start + r // G, hk * G + r % G, 8 * chunk:8 * chunk + 8] if r < rows else 0
            s_q[_swizzle(row, chunk, D) + np.arange(8)] = src

    def load_kv(n0, stage):
        for tid, pss in itertools.product(range(THREADS), range(load_passes)):
            ld_row, ld_chunk = divmod(tid, chunks)
            key = n0 + ld_row + pss * load_rows
            # The kernel's offset: the swizzle of the thread's first row, plus whole rows per pass.
            at = stage * BLOCK_N * D + _swizzle(ld_row, ld_chunk, D) + pss * load_rows * D + np.arange(8)
            if key >= S:
                s_k[at] = s_v[at] = 0
                continue
            k_row = k[table[b, key // P], key % P, hk] if paged else k[k_start + key, hk]
            v_row = v[table[b, key // P], key % P, hk] if paged else v[k_start + key, hk]
            s_k[at], s_v[at] = k_row[8 * ld_chunk:8 * ld_chunk + 8], v_row[8 * ld_chunk:8 * ld_chunk + 8]

    def load_q(warp, mt, ks):  # ldmatrix x4 of m-tile mt, k-step ks (re-read from shared memory every time)
        row = warp * WARP_ROWS + 16 * mt + (LANE & 15)
        return _ldmatrix_x4(s_q, row * D + (((2 * ks + (LANE >> 4)) ^ (LANE & 7)) << 3))

    warps = []
    for warp in range(WARPS):
        row0 = m0 + WARP_ROWS * warp
        warp_kv_end = 0
        if row0 < rows:
            warp_last_i = min(L - 1, (row0 + WARP_ROWS - 1) // G)
            warp_kv_end = max(0, min(S, S - L + warp_last_i + 1)) if causal else S
        fr = [row0 + 8 * r + GRP for r in range(2 * M_TILES)]  # r = 2 mt + h: row 16 mt + 8 h + g
        warps.append(dict(warp=warp, end=warp_kv_end, rows=fr, o=np.zeros((M_TILES, d_tiles, 32, 4), np.float32),
                          pos=[S - L + x // G if causal else np.full(32, S) for x in fr],
                          m=[np.full(32, -1e30, np.float32) for _ in fr],
                          l=[np.zeros(32, np.float32) for _ in fr]))
    num_tiles = -(-kv_end // BLOCK_N)
    if num_tiles:
        load_kv(0, 0)
    for tile in range(num_tiles):
        n0, stage = tile * BLOCK_N, tile & 1
        if tile + 1 < num_tiles:  # after the barrier, before the MMAs: into the buffer of tile - 1
            load_kv(n0 + BLOCK_N, (tile + 1) & 1)
        for w in (w for w in warps if n0 < w["end"]):
            s = np.zeros((M_TILES, n_tiles, 32, 4), np.float32)
            for ks in range(k_steps):
                qa = [load_q(w["warp"], mt, ks) for mt in range(M_TILES)]
                for pp in range(n_tiles // 2):
                    row = 16 * pp + (LANE & 7) + ((LANE >> 4) << 3)
                    chunk = 2 * ks + ((LANE >> 3) & 1)
                    kb = _ldmatrix_x4(s_k, stage * BLOCK_N * D + row * D + ((chunk ^ (LANE & 7)) << 3))
                    for mt in range(M_TILES):
                        s[mt, 2 * pp] = _mma(s[mt, 2 * pp], qa[mt], kb[0], kb[1])
                        s[mt, 2 * pp + 1] = _mma(s[mt, 2 * pp + 1], qa[mt], kb[2], kb[3])
            s *= np.float32(scale * math.log2(math.e))
            if n0 + BLOCK_N > full_end:  # a masked tile
                for mt, j, e in itertools.product(range(M_TILES), range(n_tiles), range(4)):
                    key = n0 + 8 * j + 2 * TIG + (e & 1)
                    s[mt, j, (key >= S) | (key > w["pos"][2 * mt + (e >> 1)]), e] = -np.inf
            for mt, (h, cols) in itertools.product(range(M_TILES), enumerate((slice(0, 2), slice(2, 4)))):
                r = 2 * mt + h
                mx = s[mt, :, :, cols].max(axis=(0, 2))
                mx = np.maximum(mx, mx[LANE ^ 1])
                mx = np.maximum(mx, mx[LANE ^ 2])
                m_new = np.maximum(w["m"][r], mx)
                alpha = _exp2(w["m"][r] - m_new)
                w["m"][r] = m_new
                s[mt, :, :, cols] = _exp2(s[mt, :, :, cols] - m_new[None, :, None])
                w["l"][r] = w["l"][r] * alpha + s[mt, :, :, cols].sum(axis=(0, 2))
                # (At D = 64 the kernel skips this when no row of the warp got a new max: alpha == 1 exactly.)
                w["o"][mt, :, :, cols] *= alpha[None, :, None]
            for kk in range(n_tiles // 2):
                pa = [[_round(s[mt, 2 * kk + j // 2][:, 2 * (j % 2):2 * (j % 2) + 2], dtype) for j in range(4)]
                      for mt in range(M_TILES)]
                for dp in range(d_tiles // 2):
                    row = 16 * kk + (LANE & 7) + (((LANE >> 3) & 1) << 3)
                    chunk = 2 * dp + (LANE >> 4)
                    vb = _ldmatrix_x4(s_v, stage * BLOCK_N * D + row * D + ((chunk ^ (LANE & 7)) << 3), trans=True)
                    for mt in range(M_TILES):
                        w["o"][mt, 2 * dp] = _mma(w["o"][mt, 2 * dp], pa[mt], vb[0], vb[1])
                        w["o"][mt, 2 * dp + 1] = _mma(w["o"][mt, 2 * dp + 1], pa[mt], vb[2], vb[3])
    for w in warps:
        for r in range(2 * M_TILES):
            mt, e0 = r >> 1, 2 * (r & 1)
            total = w["l"][r] + w["l"][r][LANE ^ 1]
            total = total + total[LANE ^ 2]
            inv = np.where(total > 0, 1 / np.where(total > 0, total, 1), 0)
            for lane in np.nonzero(w["rows"][r] < rows)[0]:
                row = w["rows"][r][lane]
                for j in range(d_tiles):
                    d = 8 * j + 2 * TIG[lane]
                    out[q_start + row // G, hk * G + row % G, d:d + 2] = w["o"][mt, j, lane, e0:e0 + 2] * inv[lane]


def emulate(q, k, v, cu_q, cu_k, table, seq_lens, causal, scale):
    """The whole launch on 16-bit torch inputs (K/V packed, or paged pools + table) -> float32 numpy."""
    dtype, (T, H, D), H_kv = q.dtype, q.shape, k.shape[-2]
    G, B = H // H_kv, len(cu_q) - 1
    P = k.shape[1] if table is not None else 1
    out = np.full((T, H, D), np.nan, np.float32)
    tiles = -(-max(cu_q[b + 1] - cu_q[b] for b in range(B)) * G // BLOCK_M)
    qn, kn, vn = (t.float().numpy() for t in (q, k, v))
    for z, b, hk in itertools.product(range(tiles), range(B), range(H_kv)):
        _cta(out, qn, kn, vn, cu_q, cu_k, table, seq_lens, P, causal, scale, G, hk, b, tiles - 1 - z, dtype)
    return out


def oracle(q, k, v, causal, scale):
    """q [L, H, D], k, v [S, H_kv, D] -> [L, H, D] float64 (zeros for a query that sees no key)."""
    L, H, _ = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    k, v = (t.double().repeat_interleave(H // H_kv, dim=1) for t in (k, v))
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    if causal:
        scores = scores.masked_fill(torch.arange(S)[None, :] > (torch.arange(L) + S - L)[:, None], float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).clamp(min=-1e300))
    total = weights.sum(-1, keepdim=True)
    return torch.einsum("hls,shd->lhd", weights / torch.where(total > 0, total, torch.ones_like(total)), v)


@pytest.mark.parametrize("q_lens, k_lens, H, H_kv, D, causal, P", [
    ([70], [70], 1, 1, 64, True, None),                      # two tiles, the diagonal masked
    ([5, 0, 33, 12], [130, 3, 20, 4], 2, 1, 64, True, None),  # varlen: prefix, empty, S < L (zeros), G = 2
    ([20], [150], 7, 1, 64, True, 16),                       # paged, G = 7 (rows of one query span warps)
    ([40], [100], 2, 2, 128, False, 32),                     # paged, D = 128, not causal, ragged last tile
    ([50, 7], [90, 7], 3, 1, 128, True, None),               # D = 128 causal, 150 rows: two CTAs, warps skip
])
def test_emulated_kernel_matches_oracle(q_lens, k_lens, H, H_kv, D, causal, P, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16
    cu_q = [0, *itertools.accumulate(q_lens)]
    q = torch.randn(cu_q[-1], H, D, generator=gen).to(dtype)
    if P is None:
        cu_k = [0, *itertools.accumulate(k_lens)]
        k, v = (torch.randn(cu_k[-1], H_kv, D, generator=gen).to(dtype) for _ in range(2))
        out = emulate(q, k, v, cu_q, cu_k, None, None, causal, D ** -0.5)
        pieces = [(k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]) for b in range(len(q_lens))]
    else:
        needed = [-(-n // P) for n in k_lens]
        num_blocks = sum(needed) + 3
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        width, starts = max(needed) + 1, [0, *itertools.accumulate(needed)]
        # Garbage past each sequence's end: the kernel must never read those entries.
        table = np.array([perm[starts[b]:starts[b + 1]] + [10**9] * (width - needed[b]) for b in range(len(needed))])
        k, v = (torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype) for _ in range(2))
        out = emulate(q, k, v, cu_q, None, table, k_lens, causal, D ** -0.5)
        pieces = []
        for b, n in enumerate(k_lens):
            pos = torch.arange(n)
            rows = torch.from_numpy(table[b][:needed[b]])[pos // P]
            pieces.append((k[rows, pos % P], v[rows, pos % P]))
    assert not np.isnan(out).any(), "the emulated kernel left an output unwritten or read unwritten shared memory"
    for b, (kb, vb) in enumerate(pieces):
        ref = oracle(q[cu_q[b]:cu_q[b + 1]], kb, vb, causal, D ** -0.5)
        # bf16 P before the P @ V MMA: ~2^-9 relative on weights that sum to 1, on unit-normal values.
        torch.testing.assert_close(torch.from_numpy(out[cu_q[b]:cu_q[b + 1]]).double(), ref, atol=1e-2, rtol=1e-2,
                                   msg=lambda m, b=b: f"sequence {b}: {m}")
