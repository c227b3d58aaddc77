"""A lane-level NumPy emulation of csrc/paged_attention.cu, for checking its index maps without a GPU.

The CUDA kernel cannot run on a machine without a GPU, and its MMA fragment layouts and dim permutations
are easy to get subtly wrong. This file re-states the kernel line by line in NumPy, one warp's 32 lanes
at a time, with ``mma.m16n8k16`` emulated from the PTX ISA's fragment layout (groupID = lane >> 2,
tid = lane & 3):

    A: reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
    B: reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
    C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]

(a 32-bit word is a (lo, hi) pair of 16-bit values, lo = the lower k index), and runs the blocks of a
launch in a random order (so the "last block combines" path sees any completion order). It checks
against the torch reference. Keep it in step with the .cu when the kernel's maps change.

    python tests/gpu/cuda_kernel_emulator.py      # a few shapes, ~3 s on a CPU
"""

import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from miniinfer.kernels.paged_attention import paged_decode_attention_torch  # noqa: E402


def rnd(x, dt):  # round float32 array to the 16-bit dtype and back
    return torch.from_numpy(np.asarray(x, np.float32)).to(dt).float().numpy()


def mma(c, a, b):
    # c: [32,4] floats, a: [32,4,2], b: [32,2,2]
    A = np.zeros((16, 16), np.float32)
    Bm = np.zeros((16, 8), np.float32)
    C = np.zeros((16, 8), np.float32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, 2 * t : 2 * t + 2] = a[lane, 0]
        A[g + 8, 2 * t : 2 * t + 2] = a[lane, 1]
        A[g, 2 * t + 8 : 2 * t + 10] = a[lane, 2]
        A[g + 8, 2 * t + 8 : 2 * t + 10] = a[lane, 3]
        Bm[2 * t : 2 * t + 2, g] = b[lane, 0]
        Bm[2 * t + 8 : 2 * t + 10, g] = b[lane, 1]
        C[g, 2 * t : 2 * t + 2] = c[lane, 0:2]
        C[g + 8, 2 * t : 2 * t + 2] = c[lane, 2:4]
    Dm = A.astype(np.float64) @ Bm.astype(np.float64) + C
    out = np.zeros_like(c)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out[lane, 0:2] = Dm[g, 2 * t : 2 * t + 2]
        out[lane, 2:4] = Dm[g + 8, 2 * t : 2 * t + 2]
    return out


def word(v, i):  # v: [8] values of a uint4 -> (lo, hi)
    return v[2 * i : 2 * i + 2]


def pair(a, b, hi):
    return np.array([a[1] if hi else a[0], b[1] if hi else b[0]], np.float32)


def shfl_xor(x, m):  # x: [32]
    return x[np.arange(32) ^ m]


def v_dim(r, nt):
    return (nt >> 3) * 64 + r * 8 + (nt & 7)


def kernel_block(
    part,
    y,
    b,
    q,
    kc,
    vc,
    bt,
    sl,
    tmp_out,
    tmp_ml,
    counters,
    out,
    H,
    H_kv,
    G,
    num_chunks,
    log2_P,
    partition_size,
    max_parts,
    scale_log2,
    D,
    kSubTiles,
    dt,
    gridDim_y,
):
    kWarps, kRows, kTile = 4, 16, 16
    kQWords, kKSteps, kKChunks, kNTiles, kVChunks = D // 8, D // 16, D // 32, D // 8, D // 64
    kBlockStride = kWarps * kTile * kSubTiles
    hk = y // num_chunks
    chunk = y - hk * num_chunks
    rows_here = min(kRows, G - chunk * kRows)
    head0 = hk * G + chunk * kRows
    seq_len = min(int(sl[b]), MAXSEQ[0])
    if seq_len <= 0:
        if part == 0:
            for i in range(rows_here * D):
                out[b, head0 + i // D, i % D] = 0
        return "done"
    num_parts = (seq_len + partition_size - 1) // partition_size
    if part >= num_parts:
        return "skip"
    part_start = part * partition_size
    part_end = min(part_start + partition_size, seq_len)
    first_entry = part_start >> log2_P
    num_entries = ((part_end - 1) >> log2_P) - first_entry + 1
    assert num_entries <= 1024
    s_blocks = [int(bt[b, first_entry + i]) for i in range(num_entries)]
    kflat = kc.reshape(-1)
    vflat = vc.reshape(-1)
    qflat = q.reshape(-1)
    token_stride = H_kv * D
    p_mask = (1 << log2_P) - 1

    def row_offset(t):
        idx = (t >> log2_P) - first_entry
        assert 0 <= idx < num_entries, "table index out of staged range"
        blk = s_blocks[idx]
        assert blk >= 0, "read a garbage block id"
        return ((blk << log2_P) + (t & p_mask)) * token_stride

    s_o = np.zeros((kWarps, kRows, D), np.float32)
    s_m = np.zeros((kWarps, kRows), np.float32)
    s_l = np.zeros((kWarps, kRows), np.float32)
    for warp in range(kWarps):
        # qa[lane][i][word] -> (lo,hi)
        qa = np.zeros((32, 2, kQWords, 2), np.float32)
        for lane in range(32):
            r, c = lane >> 2, lane & 3
            for i in range(2):
                row = r + 8 * i
                base = (b * H + head0 + row) * D
                for j in range(kKChunks):
                    v = np.zeros(8, np.float32)
                    if row < rows_here:
                        v = qflat[base + 32 * j + 8 * c : base + 32 * j + 8 * c + 8]
                    for w in range(4):
                        qa[lane, i, 4 * j + w] = word(v, w)
        o = np.zeros((32, kNTiles, 4), np.float32)
        m = np.full((32, 2), -np.inf, np.float32)
        l = np.zeros((32, 2), np.float32)
        step0 = part_start + warp * kTile * kSubTiles
        while step0 < part_end:
            kreg = np.zeros((32, kSubTiles, 2, kKChunks, 8), np.float32)
            vreg = np.zeros((32, kSubTiles, 4, kVChunks, 8), np.float32)
            for lane in range(32):
                r, c = lane >> 2, lane & 3
                for st in range(kSubTiles):
                    tile = step0 + st * kTile
                    for j in range(2):
                        t = tile + 8 * j + r
                        if t < part_end:
                            base = hk * D + row_offset(t) + 8 * c
                            for ch in range(kKChunks):
                                kreg[lane, st, j, ch] = kflat[base + 32 * ch : base + 32 * ch + 8]
                    for i in range(4):
                        t = tile + 2 * c + (i & 1) + 8 * (i >> 1)
                        if t < part_end:
                            base = hk * D + row_offset(t) + 8 * r
                            for ch in range(kVChunks):
                                vreg[lane, st, i, ch] = vflat[base + 64 * ch : base + 64 * ch + 8]
            for st in range(kSubTiles):
                tile = step0 + st * kTile
                s = np.zeros((32, 2, 4), np.float32)
                for j in range(2):
                    for ks in range(kKSteps):
                        a = np.stack(
                            [qa[:, 0, 2 * ks], qa[:, 1, 2 * ks], qa[:, 0, 2 * ks + 1], qa[:, 1, 2 * ks + 1]],
                            1,
                        )
                        bfr = np.zeros((32, 2, 2), np.float32)
                        for lane in range(32):
                            bfr[lane, 0] = word(kreg[lane, st, j, ks >> 1], (2 * ks) & 3)
                            bfr[lane, 1] = word(kreg[lane, st, j, ks >> 1], (2 * ks + 1) & 3)
                        s[:, j] = mma(s[:, j], a, bfr)
                tile_max = np.full((32, 2), -np.inf, np.float32)
                for lane in range(32):
                    c = lane & 3
                    for j in range(2):
                        for e in range(4):
                            t = tile + 8 * j + 2 * c + (e & 1)
                            s[lane, j, e] = s[lane, j, e] * scale_log2 if t < part_end else -np.inf
                            tile_max[lane, e >> 1] = max(tile_max[lane, e >> 1], s[lane, j, e])
                alpha = np.zeros((32, 2), np.float32)
                for i in range(2):
                    tm = tile_max[:, i]
                    tm = np.maximum(tm, shfl_xor(tm, 1))
                    tm = np.maximum(tm, shfl_xor(tm, 2))
                    m_new = np.maximum(m[:, i], tm)
                    with np.errstate(invalid="raise"):
                        alpha[:, i] = np.exp2(m[:, i] - m_new)
                    m[:, i] = m_new
                for j in range(2):
                    for e in range(4):
                        s[:, j, e] = np.exp2(s[:, j, e] - m[:, e >> 1])
                l[:, 0] = l[:, 0] * alpha[:, 0] + (s[:, 0, 0] + s[:, 0, 1]) + (s[:, 1, 0] + s[:, 1, 1])
                l[:, 1] = l[:, 1] * alpha[:, 1] + (s[:, 0, 2] + s[:, 0, 3]) + (s[:, 1, 2] + s[:, 1, 3])
                o[:, :, 0:2] *= alpha[:, None, 0:1]
                o[:, :, 2:4] *= alpha[:, None, 1:2]
                pa = np.stack(
                    [
                        rnd(s[:, 0, 0:2], dt),
                        rnd(s[:, 0, 2:4], dt),
                        rnd(s[:, 1, 0:2], dt),
                        rnd(s[:, 1, 2:4], dt),
                    ],
                    1,
                )
                for nt in range(kNTiles):
                    ch = nt >> 3
                    w = (nt & 7) >> 1
                    hi = bool(nt & 1)
                    bfr = np.zeros((32, 2, 2), np.float32)
                    for lane in range(32):
                        bfr[lane, 0] = pair(
                            word(vreg[lane, st, 0, ch], w), word(vreg[lane, st, 1, ch], w), hi
                        )
                        bfr[lane, 1] = pair(
                            word(vreg[lane, st, 2, ch], w), word(vreg[lane, st, 3, ch], w), hi
                        )
                    o[:, nt] = mma(o[:, nt], pa, bfr)
            step0 += kBlockStride
        for i in range(2):
            l[:, i] += shfl_xor(l[:, i], 1)
            l[:, i] += shfl_xor(l[:, i], 2)
        for lane in range(32):
            r, c = lane >> 2, lane & 3
            if c == 0:
                s_m[warp, r] = m[lane, 0]
                s_m[warp, r + 8] = m[lane, 1]
                s_l[warp, r] = l[lane, 0]
                s_l[warp, r + 8] = l[lane, 1]
            for nt in range(kNTiles):
                for e in range(2):
                    d = v_dim(2 * c + e, nt)
                    s_o[warp, r, d] = o[lane, nt, e]
                    s_o[warp, r + 8, d] = o[lane, nt, 2 + e]
    single = num_parts == 1
    for i in range(rows_here * D):
        g, d = i // D, i % D
        M = max(s_m[w, g] for w in range(kWarps))
        L = 0.0
        acc = 0.0
        for w in range(kWarps):
            f = np.exp2(s_m[w, g] - M)
            L += f * s_l[w, g]
            acc += f * s_o[w, g, d]
        bh = b * H + head0 + g
        if single:
            out[b, head0 + g, d] = acc / L
        else:
            tmp_out[(bh * max_parts + part) * D + d] = acc / L
            if d == 0:
                tmp_ml[(bh * max_parts + part) * 2] = M
                tmp_ml[(bh * max_parts + part) * 2 + 1] = L
    if single:
        return "done"
    ci = b * gridDim_y + y
    prev = counters[ci]
    counters[ci] += 1
    last = prev == num_parts - 1
    if last:
        counters[ci] = 0
    if not last:
        return "partial"
    for i in range(rows_here * D):
        g, d = i // D, i % D
        base = (b * H + head0 + g) * max_parts
        M = max(tmp_ml[(base + p) * 2] for p in range(num_parts))
        L = 0.0
        acc = 0.0
        for p in range(num_parts):
            f = np.exp2(tmp_ml[(base + p) * 2] - M) * tmp_ml[(base + p) * 2 + 1]
            L += f
            acc += f * tmp_out[(base + p) * D + d]
        out[b, head0 + g, d] = acc / L
    return "combined"


MAXSEQ = [0]


def run(q, kc, vc, bt, sl, scale, partition_size, dt, max_seq_len=None, seed=0):
    B, H, D = q.shape
    P, H_kv = kc.shape[1], kc.shape[2]
    G = H // H_kv
    num_chunks = (G + 15) // 16
    max_seq_len = max_seq_len or bt.shape[1] * P
    MAXSEQ[0] = max_seq_len
    max_parts = (max_seq_len + partition_size - 1) // partition_size
    log2_P = P.bit_length() - 1
    out = np.full((B, H, D), np.nan, np.float32)
    tmp_out = np.full(B * H * max_parts * D, np.nan, np.float32)
    tmp_ml = np.full(B * H * max_parts * 2, np.nan, np.float32)
    counters = np.zeros(B * H_kv * num_chunks, np.int64)
    blocks = [(p, y, b) for p in range(max_parts) for y in range(H_kv * num_chunks) for b in range(B)]
    random.Random(seed).shuffle(blocks)  # any completion order
    for p, y, b in blocks:
        kernel_block(
            p,
            y,
            b,
            q,
            kc,
            vc,
            bt,
            sl,
            tmp_out,
            tmp_ml,
            counters,
            out,
            H,
            H_kv,
            G,
            num_chunks,
            log2_P,
            partition_size,
            max_parts,
            scale * 1.4426950408889634,
            D,
            2 if D == 64 else 1,
            dt,
            H_kv * num_chunks,
        )
    assert (counters == 0).all(), "counters not reset"
    return out


def main():
    torch.manual_seed(0)

    def case(P, H, H_kv, D, lens, part, dt):
        B = len(lens)
        maxb = max((l + P - 1) // P for l in lens) + 1
        nb = sum((l + P - 1) // P for l in lens) + 3
        perm = torch.randperm(nb)
        bt = torch.full((B, maxb), -1, dtype=torch.int32)
        i = 0
        for b, l in enumerate(lens):
            n = (l + P - 1) // P
            bt[b, :n] = perm[i : i + n].int()
            i += n
        kc = torch.randn(nb, P, H_kv, D).to(dt)
        vc = torch.randn(nb, P, H_kv, D).to(dt)
        q = torch.randn(B, H, D).to(dt)
        sl = torch.tensor(lens, dtype=torch.int32)
        ref = paged_decode_attention_torch(q.float(), kc.float(), vc.float(), bt, sl, D**-0.5).numpy()
        out = run(
            q.float().numpy(),
            kc.float().numpy(),
            vc.float().numpy(),
            bt.numpy(),
            sl.numpy(),
            D**-0.5,
            part,
            dt,
        )
        assert not np.isnan(out).any(), "unwritten output"
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        print(
            f"P={P} H={H} H_kv={H_kv} D={D} lens={lens} part={part} {dt}: rel err {err:.2e} max abs {np.abs(out - ref).max():.2e}"
        )
        assert err < 1e-2

    case(16, 14, 2, 64, [1, 15, 16, 17, 150], 64, torch.bfloat16)
    case(1, 4, 1, 128, [1, 3, 70], 32, torch.float16)
    case(64, 28, 4, 128, [65, 200], 128, torch.bfloat16)
    case(16, 2, 2, 64, [33], 1024, torch.float16)
    case(16, 36, 2, 64, [40, 5], 16, torch.bfloat16)  # G = 18 > 16: two head chunks


if __name__ == "__main__":
    main()
