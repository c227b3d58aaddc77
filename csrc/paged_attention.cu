// Paged attention, decode: one new query token per sequence attends to its paged KV cache.
//
//   out[b, h, :] = softmax(q[b, h, :] . K_b^T * scale) V_b        K_b, V_b = the first seq_lens[b]
//                                                               tokens of sequence b, read through
//                                                               block_tables[b] (the paged cache)
//
// Shapes: q, out [B, H, D]; k_cache, v_cache [num_blocks, P, H_kv, D]; block_tables [B, max_blocks]
// int32; seq_lens [B] int32. Token `pos` of sequence b lives at block block_tables[b, pos / P],
// offset pos % P. GQA: query head h reads KV head h / G with G = H / H_kv.
//
// Why the kernel looks like this (design for bandwidth on an H100: 132 SMs, ~3 TB/s):
//
// * Decode attention is memory-bound: every K and V byte is used for G dot products / G FMAs per
//   element (G = 7 for Qwen2.5 and 7B GQA), so the time floor is bytes(K + V) / bandwidth. The whole
//   design is about reading each K/V byte exactly once, with wide loads, and keeping enough of them
//   in flight.
// * One thread block serves one (sequence, KV head) pair and ALL G query heads that share that KV
//   head, so each K/V byte is loaded once, not G times. The G heads (padded to 16) are the M dimension
//   of a tensor-core MMA (mma.sync m16n8k16, fp32 accumulation): with FMAs the G x D multiply-adds per
//   token would cost ~40 % of the SM's FMA issue rate at 3 TB/s, with MMAs they cost a few percent.
// * Split-KV (flash-decoding): batch 64 x 2 KV heads is only 128 pairs for 132 SMs, far too few to keep
//   HBM busy, so the context is cut into partitions of `partition_size` tokens, one block each
//   (grid = partitions x (H_kv * head chunks) x B). Each block writes a partial result (normalised
//   output + running max + sum of exponentials); the LAST block of a pair to finish (atomic counter)
//   combines the partials in a fixed order p = 0, 1, ... so the result is deterministic, without a
//   second kernel launch (a second launch costs ~5 us against a ~50 us kernel). Sequences that fit in
//   one partition skip the partials and write the output directly.
// * Inside a block, 4 warps take 16-token tiles in turn and keep their own online-softmax state (FA2
//   style, all in registers); the 4 states are merged through shared memory at the end.
// * No shared-memory staging of K/V and no ldmatrix: each thread loads 16-byte chunks straight into
//   the registers that the MMA consumes. This works because a dot product does not care in which
//   order its terms are summed: the k (head-dim) axis of Q.K^T is permuted so that each thread's MMA
//   fragment elements are 8 contiguous dims (one 16-byte load), the same permutation applied to Q and
//   K. For P.V the n (head-dim) axis is permuted the same way and un-permuted when the output is
//   written; the token pairs that a B fragment needs are built with byte permutes (PRMT).
// * Every load of a tile (K and V, 8 or 16 x 16 bytes per thread) is issued before the first MMA, and
//   a warp's loads of one row are contiguous (4 threads x 16 B for K, 8 threads x 16 B for V), so each
//   warp instruction reads whole 32-byte sectors. The block-table entries of a partition are staged
//   in shared memory once, so the address of a token costs a shared load, not a dependent global load.
// * Only table entries of tokens < seq_len are ever read: entries past a sequence's end may be garbage.
//   Tokens past the end of a tile are neither loaded (their V is zero, so 0 x garbage cannot make NaN)
//   nor scored (-inf).
//
// Pure CUDA (no torch headers): csrc/paged_attention_binding.cpp calls the launcher at the bottom,
// and CI compiles this file alone with `nvcc -arch=sm_90 -c`. Needs sm_80+ (mma.sync bf16).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;             // query heads per block: the M of the m16n8k16 MMA
constexpr int kTile = 16;             // tokens per warp step: two n8 tiles of Q.K^T = one k16 step of P.V
constexpr int kMaxPartition = 1024;   // largest partition_size (sizes the shared block-table copy)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Element types: the MMA instruction and float <-> 16-bit conversions.
template <typename T>
struct Ops;

template <>
struct Ops<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
    // Two floats -> one register holding two bf16, `lo` in the low half (the lower k index).
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Ops<__half> {
    static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

// The i-th 32-bit word of a uint4 (i is a compile-time constant after unrolling, so this stays in
// registers: a run-time index would push the array to local memory).
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Two 16-bit elements from two tokens' words: the low (hi=false) or high (hi=true) halves of a and b,
// packed as (a's, b's) = (lower k, higher k) of a B fragment.
__device__ __forceinline__ uint32_t pair(uint32_t a, uint32_t b, bool hi) {
    return __byte_perm(a, b, hi ? 0x7632 : 0x5410);
}

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Dim permutation of the P.V output / V loads: thread row r (its groupID in the MMA fragment), n-tile
// nt (of D / 8) <-> physical dim. Thread r loads V[token][64 * (nt / 8) + 8 * r + (nt % 8)] for all nt,
// i.e. D / 64 contiguous 16-byte chunks, and 8 threads cover 128 contiguous bytes of a V row.
template <int D>
__device__ __forceinline__ int v_dim(int r, int nt) {
    return (nt >> 3) * 64 + r * 8 + (nt & 7);
}

// Grid: x = partition, y = KV head * num_chunks + head chunk, z = sequence. Block: 4 warps.
// Within a warp, lane = 4 * r + c (r = groupID 0..7, c = thread in group 0..3), the MMA fragment names.
template <typename T, int D, int kSubTiles>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(
    T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, float* __restrict__ tmp_out,
    float* __restrict__ tmp_ml, int* __restrict__ counters, int H, int H_kv, int G, int num_chunks, int max_blocks,
    int log2_P, int partition_size, int max_parts, int max_seq_len, float scale_log2) {
    static_assert(D == 64 || D == 128, "head dim must be 64 or 128");
    constexpr int kQWords = D / 8;      // 32-bit words of one Q row held by one thread (D / 4 elements)
    constexpr int kKSteps = D / 16;     // k16 steps of Q.K^T
    constexpr int kKChunks = D / 32;    // 16-byte chunks of one K row per thread
    constexpr int kNTiles = D / 8;      // n8 tiles of P.V (output dims)
    constexpr int kVChunks = D / 64;    // 16-byte chunks of one V row per thread
    constexpr int kBlockStride = kWarps * kTile * kSubTiles;  // tokens the 4 warps cover per step

    const int part = blockIdx.x;
    const int hk = blockIdx.y / num_chunks;
    const int chunk = blockIdx.y - hk * num_chunks;
    const int b = blockIdx.z;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int r = lane >> 2;
    const int c = lane & 3;

    const int rows_here = min(kRows, G - chunk * kRows);  // query heads of this block (<= 16)
    const int head0 = hk * G + chunk * kRows;               // its first query head
    // Clamped to the bound the grid was sized for (<= max_blocks * P, checked by the binding): a length
    // beyond it is a caller bug, and must not make the kernel write past its scratch or leave a counter
    // short of its count.
    const int seq_len = min(seq_lens[b], max_seq_len);

    if (seq_len <= 0) {  // nothing to attend to: define the output as zeros rather than leave it unwritten
        if (part == 0) {
            for (int i = threadIdx.x; i < rows_here * D; i += kThreads) {
                out[(static_cast<int64_t>(b) * H + head0 + i / D) * D + i % D] = Ops<T>::from_float(0.f);
            }
        }
        return;
    }
    const int num_parts = (seq_len + partition_size - 1) / partition_size;
    if (part >= num_parts) return;  // the whole block leaves: no barrier is skipped by part of a block

    const int part_start = part * partition_size;
    const int part_end = min(part_start + partition_size, seq_len);

    __shared__ int s_blocks[kMaxPartition];
    __shared__ float s_o[kWarps][kRows][D + 1];  // +1: fewer bank conflicts when the warps store
    __shared__ float s_m[kWarps][kRows];
    __shared__ float s_l[kWarps][kRows];
    __shared__ int s_is_last;

    // Stage this partition's block-table entries. partition_size and P are powers of two, so a
    // partition starts on a block boundary when P <= partition_size and holds <= partition_size / P
    // entries; when P > partition_size it touches one entry. Only entries of tokens < seq_len are read.
    const int first_entry = part_start >> log2_P;
    const int num_entries = ((part_end - 1) >> log2_P) - first_entry + 1;
    const int* table = block_tables + static_cast<int64_t>(b) * max_blocks + first_entry;
    for (int i = threadIdx.x; i < num_entries; i += kThreads) s_blocks[i] = table[i];

    // Q as MMA A fragments, loaded once. Thread (r, c) holds rows r and r + 8 (query heads head0 + r,
    // head0 + r + 8), dims {32 * j + 8 * c + e : j < D / 32, e < 8}: element e of chunk j is its local
    // element 8 j + e, and the k16 step s uses local words 2 s (virtual k = 2c, 2c+1) and 2 s + 1
    // (virtual k = 2c+8, 2c+9). K is loaded with exactly the same map, so sum_k Q[k] K[k] is unchanged.
    uint32_t qa[2][kQWords];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = r + 8 * i;
        const T* qrow = q + (static_cast<int64_t>(b) * H + head0 + row) * D;
#pragma unroll
        for (int j = 0; j < kKChunks; ++j) {
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (row < rows_here) v = load16(qrow + 32 * j + 8 * c);
            qa[i][4 * j + 0] = v.x;
            qa[i][4 * j + 1] = v.y;
            qa[i][4 * j + 2] = v.z;
            qa[i][4 * j + 3] = v.w;
        }
    }
    __syncthreads();  // s_blocks ready

    const int64_t token_stride = static_cast<int64_t>(H_kv) * D;  // elements between consecutive slots
    const T* k_head = k_cache + static_cast<int64_t>(hk) * D;
    const T* v_head = v_cache + static_cast<int64_t>(hk) * D;
    const int p_mask = (1 << log2_P) - 1;
    // Element offset of token t's row (this KV head) in the cache: slot = block * P + t % P.
    auto row_offset = [&](int t) -> int64_t {
        const int64_t block = s_blocks[(t >> log2_P) - first_entry];
        return ((block << log2_P) + (t & p_mask)) * token_stride;
    };

    float o[kNTiles][4];  // C fragments of P.V: rows r (o[.][0..1]) and r + 8 (o[.][2..3])
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()};  // running max (log2 units) of rows r, r + 8
    float l[2] = {0.f, 0.f};              // running sum of exp2(score - m), this thread's columns only

    for (int step0 = part_start + warp * kTile * kSubTiles; step0 < part_end; step0 += kBlockStride) {
        // 1. Issue every load of the step before any math, so they are all in flight together.
        //    K: thread (r, c) loads token tile + 8 j + r (the n index of its B fragment), 4 threads per
        //    row, D / 32 chunks. V: tokens tile + {2c, 2c+1, 2c+8, 2c+9} (the k indices of its P.V B
        //    fragment), dims v_dim(r, .), 8 threads per row.
        uint4 kreg[kSubTiles][2][kKChunks];
        uint4 vreg[kSubTiles][4][kVChunks];
#pragma unroll
        for (int st = 0; st < kSubTiles; ++st) {
            const int tile = step0 + st * kTile;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int t = tile + 8 * j + r;
                if (t < part_end) {
                    const T* row = k_head + row_offset(t) + 8 * c;
#pragma unroll
                    for (int ch = 0; ch < kKChunks; ++ch) kreg[st][j][ch] = load16(row + 32 * ch);
                } else {
#pragma unroll
                    for (int ch = 0; ch < kKChunks; ++ch) kreg[st][j][ch] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int t = tile + 2 * c + (i & 1) + 8 * (i >> 1);
                if (t < part_end) {
                    const T* row = v_head + row_offset(t) + 8 * r;
#pragma unroll
                    for (int ch = 0; ch < kVChunks; ++ch) vreg[st][i][ch] = load16(row + 64 * ch);
                } else {
                    // Zero, not garbage: p = 0 there, but 0 * NaN would still poison the sum.
#pragma unroll
                    for (int ch = 0; ch < kVChunks; ++ch) vreg[st][i][ch] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
        }

#pragma unroll
        for (int st = 0; st < kSubTiles; ++st) {
            const int tile = step0 + st * kTile;
            // 2. Scores S = Q K^T for 16 tokens: two n8 tiles, D / 16 k-steps each.
            float s[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
                for (int ks = 0; ks < kKSteps; ++ks) {
                    const uint32_t b0 = word(kreg[st][j][ks >> 1], (2 * ks) & 3);
                    const uint32_t b1 = word(kreg[st][j][ks >> 1], (2 * ks + 1) & 3);
                    Ops<T>::mma(s[j], qa[0][2 * ks], qa[1][2 * ks], qa[0][2 * ks + 1], qa[1][2 * ks + 1], b0, b1);
                }
            }
            // 3. Scale into log2 units, mask tokens past the end. C fragment element e of tile j is
            //    (row r + 8 (e >> 1), token tile + 8 j + 2 c + (e & 1)).
            float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int t = tile + 8 * j + 2 * c + (e & 1);
                    s[j][e] = t < part_end ? s[j][e] * scale_log2 : neg_inf();
                    tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
                }
            }
            // 4. Online softmax. A row's 16 scores are spread over the 4 threads of a quad (same r).
            //    The first tile of a step always holds a valid token (step0 < part_end), so after it m
            //    is finite and exp2(m_old - m_new) never sees -inf - (-inf).
            float alpha[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
                tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
                const float m_new = fmaxf(m[i], tile_max[i]);
                alpha[i] = exp2f(m[i] - m_new);
                m[i] = m_new;
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = exp2f(s[j][e] - m[e >> 1]);
            }
            l[0] = l[0] * alpha[0] + (s[0][0] + s[0][1]) + (s[1][0] + s[1][1]);
            l[1] = l[1] * alpha[1] + (s[0][2] + s[0][3]) + (s[1][2] + s[1][3]);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
                o[nt][0] *= alpha[0];
                o[nt][1] *= alpha[0];
                o[nt][2] *= alpha[1];
                o[nt][3] *= alpha[1];
            }
            // 5. O += P V. The two score C fragments are exactly the A fragment of one k16 step
            //    (k = token in the tile): a0 = (r, 2c..2c+1), a1 = (r+8, 2c..), a2 = (r, 2c+8..), a3 = (r+8, 2c+8..).
            const uint32_t pa0 = Ops<T>::pack(s[0][0], s[0][1]);
            const uint32_t pa1 = Ops<T>::pack(s[0][2], s[0][3]);
            const uint32_t pa2 = Ops<T>::pack(s[1][0], s[1][1]);
            const uint32_t pa3 = Ops<T>::pack(s[1][2], s[1][3]);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
                // B fragment (k = token, n = dim v_dim(r, nt)): b0 = tokens (2c, 2c+1), b1 = (2c+8, 2c+9).
                const int ch = nt >> 3;
                const int w = (nt & 7) >> 1;
                const bool hi = nt & 1;
                const uint32_t b0 = pair(word(vreg[st][0][ch], w), word(vreg[st][1][ch], w), hi);
                const uint32_t b1 = pair(word(vreg[st][2][ch], w), word(vreg[st][3][ch], w), hi);
                Ops<T>::mma(o[nt], pa0, pa1, pa2, pa3, b0, b1);
            }
        }
    }

    // 6. Merge the 4 warps' states through shared memory. l so far counts only this thread's columns.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    if (c == 0) {
        s_m[warp][r] = m[0];
        s_m[warp][r + 8] = m[1];
        s_l[warp][r] = l[0];
        s_l[warp][r + 8] = l[1];
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int d = v_dim<D>(2 * c + e, nt);  // C fragment column 2c + e of n-tile nt
            s_o[warp][r][d] = o[nt][e];
            s_o[warp][r + 8][d] = o[nt][2 + e];
        }
    }
    __syncthreads();

    // A warp that got no tile has m = -inf, l = 0, o = 0 and weighs exp2(-inf) = 0. Warp 0 always has
    // a tile, so M is finite and L >= 1 (the maximal score contributes exp2(0)).
    const bool single = num_parts == 1;
    for (int i = threadIdx.x; i < rows_here * D; i += kThreads) {
        const int g = i / D;
        const int d = i % D;
        float M = neg_inf();
#pragma unroll
        for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][g]);
        float L = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float f = exp2f(s_m[w][g] - M);
            L += f * s_l[w][g];
            acc += f * s_o[w][g][d];
        }
        const int64_t bh = static_cast<int64_t>(b) * H + head0 + g;
        if (single) {
            out[bh * D + d] = Ops<T>::from_float(acc / L);
        } else {
            tmp_out[(bh * max_parts + part) * D + d] = acc / L;
            if (d == 0) {
                tmp_ml[(bh * max_parts + part) * 2 + 0] = M;
                tmp_ml[(bh * max_parts + part) * 2 + 1] = L;
            }
        }
    }
    if (single) return;

    // 7. Split-KV combine by the last block of this (sequence, KV head, chunk) to finish: the CUDA
    //    "threadFenceReduction" pattern. Each block makes its partials visible device-wide, then
    //    counts itself in; the block that brings the count to num_parts reads everyone's partials
    //    (from L2: __ldcg, never a stale L1 line) and resets the counter for the next launch.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = counters + static_cast<int64_t>(b) * gridDim.y + blockIdx.y;
        const int prev = atomicAdd(counter, 1);
        const int last = prev == num_parts - 1;
        if (last) *counter = 0;  // every block of this pair has counted: safe to reset
        __threadfence();
        s_is_last = last;
    }
    __syncthreads();
    if (!s_is_last) return;
    for (int i = threadIdx.x; i < rows_here * D; i += kThreads) {
        const int g = i / D;
        const int d = i % D;
        const int64_t base = (static_cast<int64_t>(b) * H + head0 + g) * max_parts;
        float M = neg_inf();
        for (int p = 0; p < num_parts; ++p) M = fmaxf(M, __ldcg(tmp_ml + (base + p) * 2));
        float L = 0.f, acc = 0.f;
        for (int p = 0; p < num_parts; ++p) {  // fixed order: the result does not depend on who was last
            const float f = exp2f(__ldcg(tmp_ml + (base + p) * 2) - M) * __ldcg(tmp_ml + (base + p) * 2 + 1);
            L += f;
            acc += f * __ldcg(tmp_out + (base + p) * D + d);
        }
        out[(static_cast<int64_t>(b) * H + head0 + g) * D + d] = Ops<T>::from_float(acc / L);
    }
}

template <typename T, int D, int kSubTiles>
cudaError_t launch(void* out, const void* q, const void* k_cache, const void* v_cache, const int* block_tables,
                   const int* seq_lens, float* tmp_out, float* tmp_ml, int* counters, int B, int H, int H_kv,
                   int max_blocks, int log2_P, int partition_size, int max_parts, int max_seq_len, float scale,
                   cudaStream_t stream) {
    const int G = H / H_kv;
    const int num_chunks = (G + kRows - 1) / kRows;
    const dim3 grid(max_parts, H_kv * num_chunks, B);
    const float scale_log2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2(e))
    paged_decode_kernel<T, D, kSubTiles><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
        block_tables, seq_lens, tmp_out, tmp_ml, counters, H, H_kv, G, num_chunks, max_blocks, log2_P, partition_size,
        max_parts, max_seq_len, scale_log2);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(int D, void* out, const void* q, const void* k_cache, const void* v_cache,
                       const int* block_tables, const int* seq_lens, float* tmp_out, float* tmp_ml, int* counters,
                       int B, int H, int H_kv, int max_blocks, int log2_P, int partition_size, int max_parts,
                       int max_seq_len, float scale, cudaStream_t stream) {
    // D = 64 rows are short (128 B): two 16-token sub-tiles per warp step keep as many bytes in flight
    // per thread as one sub-tile does at D = 128.
    if (D == 64) {
        return launch<T, 64, 2>(out, q, k_cache, v_cache, block_tables, seq_lens, tmp_out, tmp_ml, counters, B, H,
                                H_kv, max_blocks, log2_P, partition_size, max_parts, max_seq_len, scale, stream);
    }
    return launch<T, 128, 1>(out, q, k_cache, v_cache, block_tables, seq_lens, tmp_out, tmp_ml, counters, B, H,
                             H_kv, max_blocks, log2_P, partition_size, max_parts, max_seq_len, scale, stream);
}

}  // namespace

// The launcher the binding calls. dtype_code: 1 = float16, 2 = bfloat16. All pointers are device
// pointers; q/out [B, H, D], caches [num_blocks, P, H_kv, D] contiguous and 16-byte aligned;
// max_seq_len bounds seq_lens (larger lengths are clamped to it) and sizes the grid:
// max_parts = ceil(max_seq_len / partition_size); tmp_out [B, H, max_parts, D] and tmp_ml
// [B, H, max_parts, 2] float32 scratch (unused when max_parts == 1); counters
// [B, H_kv * ceil(G / 16)] int32, zero before the first launch and left zero by every launch.
// Returns nullptr on success, else a message (so the binding needs no CUDA headers).
const char* miniinfer_launch_paged_decode_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                                                    const int* block_tables, const int* seq_lens, float* tmp_out,
                                                    float* tmp_ml, int* counters, int B, int H, int H_kv, int D,
                                                    int P, int max_blocks, int partition_size, int max_seq_len,
                                                    float scale, int dtype_code, void* stream) {
    if (B <= 0 || H <= 0) return nullptr;  // nothing to do
    if (H_kv <= 0 || H % H_kv != 0) return "H must be a positive multiple of H_kv";
    if (D != 64 && D != 128) return "head dim D must be 64 or 128";
    if (P <= 0 || (P & (P - 1)) != 0) return "block size P must be a power of two";
    if (partition_size < kTile || partition_size > kMaxPartition || (partition_size & (partition_size - 1)) != 0) {
        return "partition_size must be a power of two in [16, 1024]";
    }
    if (max_seq_len <= 0 || max_seq_len > static_cast<long long>(max_blocks) * P) {
        return "max_seq_len must be in [1, max_blocks * P]";
    }
    const int max_parts = (max_seq_len + partition_size - 1) / partition_size;
    if (B > 65535) return "batch larger than 65535 (grid z limit)";
    const int G = H / H_kv;
    if (static_cast<long long>(H_kv) * ((G + kRows - 1) / kRows) > 65535) return "too many KV heads (grid y limit)";
    int log2_P = 0;
    while ((1 << log2_P) < P) ++log2_P;
    auto s = static_cast<cudaStream_t>(stream);
    cudaError_t status;
    switch (dtype_code) {
        case 1:
            status = launch_dim<__half>(D, out, q, k_cache, v_cache, block_tables, seq_lens, tmp_out, tmp_ml, counters,
                                        B, H, H_kv, max_blocks, log2_P, partition_size, max_parts, max_seq_len, scale,
                                        s);
            break;
        case 2:
            status = launch_dim<__nv_bfloat16>(D, out, q, k_cache, v_cache, block_tables, seq_lens, tmp_out, tmp_ml,
                                               counters, B, H, H_kv, max_blocks, log2_P, partition_size, max_parts,
                                               max_seq_len, scale, s);
            break;
        default: return "unsupported dtype code (float16 and bfloat16 only)";
    }
    return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}
