// Flash attention, forward: exact softmax(Q K^T * scale [+ causal mask]) V of packed variable-length
// sequences, without ever writing the [L, S] score matrix. FA2-style, for sm_80+ (built for sm_90).
//
//   q, out [T, H, D]       packed queries, sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1]
//   k, v   [S_tot, H_kv, D] packed keys/values by cu_seqlens_k           (dense)
//          [num_blocks, P, H_kv, D] pools read through block_table [B, M]  (paged; seq_lens [B] keys)
//
// Query i of a sequence with L queries and S keys sits at position S - L + i; with `causal` it sees
// keys 0 .. S - L + i (bottom-right alignment, as flash-attn). A query that sees no key gets zeros.
// GQA: query head h reads KV head h / G, G = H / H_kv.
//
// Where this kernel sits on the FA map (chapter 09): it is FlashAttention-2 written out by hand —
// warp-synchronous tensor cores (mma.sync m16n8k16), ldmatrix, cp.async. FA3 on Hopper replaces mma.sync
// by the asynchronous warpgroup MMA (wgmma, operands straight from shared memory), cp.async by TMA bulk
// copies, and splits the CTA into producer and consumer warps (warp specialization) with the softmax of
// one warpgroup overlapping the MMAs of another (ping-pong). FA4 (Blackwell) moves the accumulators to
// tensor memory. None of that here: the point is to see every step of the FA2 recipe.
//
// How the work is cut, and why:
//
// * A CTA = 4 warps = kBlockM = 128 rows of (query, head) pairs of ONE KV head hk of ONE sequence. Row r
//   is query r / G, query head hk * G + r % G ("GQA packing", as in the Triton kernel): all G heads that
//   share a KV head are rows of the same Q K^T, so each K/V tile is loaded once per group, and a decode
//   or chunked-prefill call with few queries still fills the 16 rows of an MMA.
// * Each warp owns 32 consecutive rows of those, two m16 tiles of the MMA, for the whole kernel (FA2:
//   split Q across warps, not K/V, so warps never exchange softmax state). Its output accumulator O
//   (32 x D, fp32) and running max m / sum l live in registers; its Q stays in shared memory and is
//   read with ldmatrix as MMA A fragments when needed (see Config for why).
// * The CTA walks the keys in tiles of kBlockN = 64. K and V tiles go global -> shared memory with
//   cp.async (asynchronous 16-byte copies that bypass the registers), double-buffered: tile j + 1 is in
//   flight while tile j is multiplied. Each warp then reads the whole K and V tile from shared memory
//   with ldmatrix (K plain, V transposed) into B fragments, and uses every B fragment for both of its
//   m-tiles: shared-memory reads per MMA are half what they would be with 16 rows per warp.
// * Online softmax in registers, in log2 units (scale * log2(e) folded into one multiply, exp2f = one
//   MUFU.EX2 instruction): m_new = max(m, rowmax(s)), alpha = 2^(m - m_new), p = 2^(s - m_new),
//   l = l * alpha + rowsum(p), O = O * alpha + p V. The C fragments of S = Q K^T are, register for
//   register, the A fragments of P V (after rounding p to 16 bits), so P never touches shared memory.
// * Causal: key tiles past the CTA's last query position are never loaded; tiles that every row sees
//   in full run without any mask; only the diagonal tiles (and a sequence's ragged last tile) are
//   masked. A warp whose own rows end before a diagonal tile skips its MMAs for it.
// * Heaviest CTAs first: blockIdx.z counts query tiles from the END of the sequence, and z is the
//   slowest-varying grid index, so the long causal rows start first and the short ones fill the tail.
//
// Shared memory: Q [128][D] + K [2][64][D] + V [2][64][D], 16-bit = 96 KiB at D = 128, 48 KiB at D = 64
// (two CTAs, 8 warps, per SM: the registers allow no more). Rows are D * 2 = 128 or 256 bytes, so without care the 8 rows that
// one ldmatrix phase reads (same column chunk) would all sit in the same 4 banks: an 8-way conflict.
// The layout is XOR-swizzled instead: the 16-byte chunk c of row r is stored at chunk c ^ (r & 7). The 8
// rows of an 8x8 ldmatrix matrix are consecutive (r & 7 takes all 8 values), so their chunks land on 8
// different 4-bank groups: conflict-free reads, and the cp.async writes of a row stay a permutation.
//
// Pure CUDA (no torch headers): csrc/flash_attention_binding.cpp checks the tensors and calls the
// launcher at the bottom; CI compiles this file alone with `nvcc -arch=sm_90 -c`.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace {

// The tile configuration per head dim. A warp owns kMTiles m16 tiles (16 kMTiles rows); every K/V
// fragment it reads from shared memory feeds kMTiles MMAs, so two m-tiles per warp halve the
// shared-memory traffic per FLOP (with one m-tile, 16 rows per warp, there is one 512-byte ldmatrix.x4
// per two MMAs, which is about what the shared memory can deliver: the tensor cores wait on it). The
// price is registers: O is kMTiles x D / 8 x 4 fp32 per thread (128 at D = 128), S is kMTiles x
// kBlockN / 8 x 4 (64). The Q fragments (another 64 at D = 128) do not fit as well, so Q stays in shared
// memory and is re-read per k-step, as FA2 does. (The previous configuration, 1 m-tile per warp = 64
// rows per CTA with Q in registers, measured 0.72-0.75x SDPA-flash on an H200.)
template <int D>
struct Config {
    static constexpr int kWarps = 4;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kMTiles = 2;                    // m16 tiles per warp
    static constexpr int kBlockM = 16 * kMTiles * kWarps;  // rows of (query, head) pairs per CTA: 128
    static constexpr int kBlockN = 64;                   // keys per K/V tile
    static constexpr int kMinBlocks = 2;                 // CTAs per SM: caps registers at 255 per thread
    // Skip O *= alpha when no row's max moved (see attend). At D = 128 the vote's extra live values make
    // the compiler spill ~10 registers inside the main loop, so there O is always rescaled.
    static constexpr bool kLazyRescale = D <= 64;
    // Q [kBlockM][D] + K, V [2][kBlockN][D], 16-bit: 96 KiB at D = 128, 48 KiB at D = 64.
    static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * D * 2;
};

constexpr float kNegBig = -1.0e30f;   // the running max starts finite: see "rows that see no key" below

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// ------------------------------------------------------------------------------------------------
// PTX wrappers
// ------------------------------------------------------------------------------------------------

// The MMA D = A B + C, m16n8k16, fp32 accumulators. Fragment layout (PTX ISA; lane = 4 g + t, g = the
// "group" 0..7, t = 0..3; a 32-bit register holds two 16-bit values, the lower k index in the low half):
//   A (16 x 16, row-major): a0 = A[g][2t, 2t+1]  a1 = A[g+8][2t, 2t+1]  a2 = A[g][2t+8, +9]  a3 = A[g+8][2t+8, +9]
//   B (16 x 8, "col"):     b0 = B[2t, 2t+1][g]  b1 = B[2t+8, 2t+9][g]
//   C (16 x 8):            c0, c1 = C[g][2t, 2t+1]  c2, c3 = C[g+8][2t, 2t+1]
template <typename T>
struct Ops;

template <>
struct Ops<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // Two floats -> one register of two bf16, `lo` in the low half (the lower k index).
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <>
struct Ops<__half> {
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously (the data does not pass through registers). With
// valid == false, 0 source bytes are read and the 16 destination bytes are zero-filled: rows past a
// sequence's end become zeros in shared memory, never garbage (0 * NaN would poison P V).
// `.cg` caches in L2 only: K/V tiles are reused by other CTAs (through L2), not by this SM's L1.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// Close the group of cp.async issued so far by this thread; wait until at most N groups are pending.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix x4: four 8x8 matrices of 16-bit values. Lanes 8j .. 8j+7 give the shared addresses of the 8
// rows (16 contiguous bytes each) of matrix j; afterwards register j of lane l holds row l / 4, elements
// 2 (l % 4) and 2 (l % 4) + 1 of matrix j — exactly an MMA fragment's (g, 2t) pattern.
// With .trans each matrix is transposed on the way: register j of lane l holds elements
// [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4], i.e. two ROWS of one column: what a B fragment of P V needs
// from V stored [key][dim].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// Element offset of (row, 16-byte chunk c) in a swizzled [rows][D] tile: chunk c is stored at c ^ (row & 7).
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// ------------------------------------------------------------------------------------------------
// The kernel
// ------------------------------------------------------------------------------------------------

struct Params {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    const int* cu_seqlens_q;  // [B + 1]
    const int* cu_seqlens_k;  // [B + 1] (dense)
    const int* block_table;   // [B, M] (paged)
    const int* seq_lens;      // [B] (paged)
    // Element strides. Dense K/V: stride_kb = stride_vb = 0, (stride_kt, stride_kh) of [S_tot, H_kv, D].
    int64_t stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh;
    int64_t stride_ot, stride_oh, stride_bt;
    int G;           // query heads per KV head
    int max_blocks;  // M, the block table's width: a paged sequence has at most M * P keys
    int log2_P;      // page size P = 1 << log2_P
    int causal;
    float scale_log2;  // scale * log2(e)
};

// Grid (H_kv, B, query tiles); Config<D>::kThreads threads. Template: element type, head dim, paged K/V.
template <typename T, int D, bool kPaged>
__global__ void __launch_bounds__(Config<D>::kThreads, Config<D>::kMinBlocks) flash_attention_kernel(const Params p) {
    static_assert(D == 64 || D == 128, "head dim must be 64 or 128");
    using Cfg = Config<D>;
    constexpr int kThreads = Cfg::kThreads;
    constexpr int kMTiles = Cfg::kMTiles;    // m16 tiles per warp
    constexpr int kWarpRows = 16 * kMTiles;  // rows per warp
    constexpr int kBlockM = Cfg::kBlockM;
    constexpr int kBlockN = Cfg::kBlockN;
    constexpr int kChunks = D / 8;           // 16-byte chunks per row
    constexpr int kKSteps = D / 16;          // k16 steps of Q K^T (over dims)
    constexpr int kDTiles = D / 8;           // n8 tiles of P V (output dims)
    constexpr int kNTiles = kBlockN / 8;     // n8 tiles of Q K^T (keys)
    constexpr int kLoadPasses = kBlockN * kChunks / kThreads;  // 16-byte copies per thread per K (or V) tile
    static_assert(kBlockN * kChunks % kThreads == 0 && kBlockM * kChunks % kThreads == 0, "tile/threads");
    static_assert(kBlockN % 16 == 0, "key tiles are whole k16 steps of P V");

    extern __shared__ __align__(128) unsigned char smem[];
    T* s_q = reinterpret_cast<T*>(smem);  // [kBlockM][D]
    T* s_k = s_q + kBlockM * D;           // [2][kBlockN][D]
    T* s_v = s_k + 2 * kBlockN * D;       // [2][kBlockN][D]

    const int hk = blockIdx.x;
    const int b = blockIdx.y;
    const int m_tile = gridDim.z - 1 - blockIdx.z;  // heaviest (last) query tiles are scheduled first
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;  // fragment row group
    const int t = lane & 3;   // fragment column pair

    const int q_start = p.cu_seqlens_q[b];
    const int L = p.cu_seqlens_q[b + 1] - q_start;
    int k_start = 0, S;
    if constexpr (kPaged) {
        // Never read past the block table's width, whatever seq_lens says (a caller bug, memory-safe here).
        S = static_cast<int>(min(static_cast<long long>(p.seq_lens[b]), static_cast<long long>(p.max_blocks) << p.log2_P));
    } else {
        k_start = p.cu_seqlens_k[b];
        S = p.cu_seqlens_k[b + 1] - k_start;
    }
    S = max(S, 0);
    const int G = p.G;
    const int rows = L * G;  // (query, head) rows of this sequence and KV head
    const int m0 = m_tile * kBlockM;
    if (m0 >= rows) return;  // the grid is sized for the longest sequence: this tile is past our end

    // --- Which key tiles this CTA visits ------------------------------------------------------------
    // kv_end: one past the last key the tile's last query may see; full_end: keys below it (rounded down
    // to a tile) are visible to the tile's FIRST query, hence to every row: no mask needed there.
    const int first_i = m0 / G;
    const int last_i = min(L - 1, (m0 + kBlockM - 1) / G);
    int kv_end, full_end;
    if (p.causal) {
        kv_end = max(0, min(S, S - L + last_i + 1));
        full_end = max(0, min(S - L + first_i + 1, kv_end)) / kBlockN * kBlockN;
    } else {
        kv_end = S;
        full_end = S / kBlockN * kBlockN;
    }
    // The same bound for this warp's own kWarpRows rows: tiles past it are fully masked for the warp.
    const int warp_row0 = m0 + warp * kWarpRows;
    int warp_kv_end = 0;
    if (warp_row0 < rows) {
        const int warp_last_i = min(L - 1, (warp_row0 + kWarpRows - 1) / G);
        warp_kv_end = p.causal ? max(0, min(S, S - L + warp_last_i + 1)) : S;
    }
    // This thread's fragment rows: r = 2 mt + h is row warp_row0 + 16 mt + 8 h + g (rows g and g + 8 of
    // the warp's m16 tile mt). Padding rows (past L) get positions >= S: they see every key, compute
    // harmless numbers (their Q is zero), and are never stored.
    int pos[2 * kMTiles];
#pragma unroll
    for (int r = 0; r < 2 * kMTiles; ++r) {
        const int row = warp_row0 + 8 * r + g;  // 16 mt + 8 h == 8 r
        pos[r] = p.causal ? S - L + row / G : S;
    }

    const T* q_ptr = static_cast<const T*>(p.q);
    const T* k_ptr = static_cast<const T*>(p.k);
    const T* v_ptr = static_cast<const T*>(p.v);
    const int* table = p.block_table + static_cast<int64_t>(b) * p.stride_bt;
    const int p_mask = (1 << p.log2_P) - 1;

    // --- Async copies ---------------------------------------------------------------------------------
    // Q tile: row r of the CTA is query (m0 + r) / G, head hk G + (m0 + r) % G: any row address works,
    // which is all GQA packing needs. Thread tid copies chunk tid % kChunks of rows tid / kChunks + ...
    for (int id = tid; id < kBlockM * kChunks; id += kThreads) {
        const int row = id / kChunks, chunk = id % kChunks;
        const int r = m0 + row;
        const bool ok = r < rows;
        const T* src = q_ptr;
        if (ok) {
            const int i = r / G, head = hk * G + r % G;
            src = q_ptr + static_cast<int64_t>(q_start + i) * p.stride_qt + static_cast<int64_t>(head) * p.stride_qh +
                  chunk * 8;
        }
        cp_async_16(smem_addr(s_q + swizzle<D>(row, chunk)), src, ok);
    }
    cp_async_commit();

    // K and V tile of keys [n0, n0 + kBlockN) into buffer `stage`. Paged: the key's block comes from the
    // block table (one cached load per row), its slot is key % P; the tile needs no alignment to pages,
    // so any power-of-two P works. Keys >= S: zero-filled, and their table entries are never read.
    // Thread tid copies chunk tid % kChunks of rows tid / kChunks + kLoadRows * pass; kLoadRows is a
    // multiple of 8, so the swizzle is the same in every pass. The pass loop is deliberately NOT
    // unrolled: unrolled, the compiler precomputes one 64-bit source pointer per pass and, with the
    // accumulators taking ~200 registers, spills them to local memory.
    constexpr int kLoadRows = kThreads / kChunks;
    static_assert(kLoadRows % 8 == 0, "rows per pass keep the swizzle");
    const int ld_row = tid / kChunks, ld_chunk = tid % kChunks;
    const int ld_offset = swizzle<D>(ld_row, ld_chunk);
    const T* k_head = k_ptr + static_cast<int64_t>(hk) * p.stride_kh + ld_chunk * 8;
    const T* v_head = v_ptr + static_cast<int64_t>(hk) * p.stride_vh + ld_chunk * 8;
    auto load_kv = [&](int n0, int stage) {
        const uint32_t dst_k = smem_addr(s_k + stage * kBlockN * D + ld_offset);
        const uint32_t dst_v = smem_addr(s_v + stage * kBlockN * D + ld_offset);
#pragma unroll 1
        for (int pass = 0; pass < kLoadPasses; ++pass) {
            const int key = n0 + ld_row + pass * kLoadRows;
            const bool ok = key < S;
            const T* src_k = k_ptr;
            const T* src_v = v_ptr;
            if (ok) {
                int64_t off_k, off_v;
                if constexpr (kPaged) {
                    const int64_t block = __ldg(table + (key >> p.log2_P));
                    const int64_t slot = key & p_mask;
                    off_k = block * p.stride_kb + slot * p.stride_kt;
                    off_v = block * p.stride_vb + slot * p.stride_vt;
                } else {
                    off_k = static_cast<int64_t>(k_start + key) * p.stride_kt;
                    off_v = static_cast<int64_t>(k_start + key) * p.stride_vt;
                }
                src_k = k_head + off_k;
                src_v = v_head + off_v;
            }
            const uint32_t step = 2 * pass * kLoadRows * D;  // bytes
            cp_async_16(dst_k + step, src_k, ok);
            cp_async_16(dst_v + step, src_v, ok);
        }
    };

    // --- Per-warp state, all in registers ------------------------------------------------------------
    // O accumulator, C fragments of m-tile mt: o[mt][j][0..1] row 16 mt + g, dims 8j + 2t + {0,1};
    // o[mt][j][2..3] row 16 mt + g + 8.
    float o[kMTiles][kDTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int j = 0; j < kDTiles; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    }
    // Running max (log2 units) and sum of this thread's rows r = 2 mt + h; l holds partial sums over this
    // thread's columns, the quad is summed at the end. Rows that see no key: m starts at a large FINITE
    // negative number, so a fully masked tile gives alpha = 2^(m - m) = 1 and p = 2^(-inf - m) = 0 (never
    // -inf - -inf = NaN); l stays 0 and the row is written as zeros.
    float m_run[2 * kMTiles], l_run[2 * kMTiles];
#pragma unroll
    for (int r = 0; r < 2 * kMTiles; ++r) {
        m_run[r] = kNegBig;
        l_run[r] = 0.f;
    }

    const int num_tiles = (kv_end + kBlockN - 1) / kBlockN;
    if (num_tiles > 0) {
        load_kv(0, 0);
        cp_async_commit();
        cp_async_wait<0>();  // Q and K/V tile 0 have landed ...
        __syncthreads();     // ... for every thread's copies

        // Q fragments of m-tile mt, k16 step ks: matrices 0 = rows 0-7 / dims 16ks..+7 (a0), 1 = rows 8-15 /
        // same dims (a1), 2 = rows 0-7 / dims 16ks+8..+15 (a2), 3 = rows 8-15 / those (a3). Lane l addresses
        // row l % 16 of the m-tile, chunk 2 ks + l / 16; the m-tile starts at a multiple of 16, so its row's
        // swizzle key (row & 7) is l & 7. Q stays in shared memory and is re-read at every k-step of every
        // key tile (as FA2 does): kept in registers (another 64 at D = 128, 32 at D = 64) it would push the
        // accumulators into local memory.
        auto load_q = [&](int mt, int ks, uint32_t (&a)[4]) {
            const int row = warp * kWarpRows + 16 * mt + (lane & 15);
            const int chunk = 2 * ks + (lane >> 4);
            ldmatrix_x4(a, smem_addr(s_q + row * D + ((chunk ^ (lane & 7)) << 3)));
        };

        // One online-softmax step over the tile in buffer `stage` (keys n0 ..). kMasked: apply the key
        // bound and the causal mask (the diagonal and the ragged last tile only).
        auto attend = [&](auto masked_tag, int n0, int stage) {
            constexpr bool kMasked = decltype(masked_tag)::value;
            const uint32_t k_base = smem_addr(s_k + stage * kBlockN * D);
            const uint32_t v_base = smem_addr(s_v + stage * kBlockN * D);

            // 1. S = Q K^T: kNTiles n8 tiles of keys for each of the warp's kMTiles m-tiles. K is stored
            //    [key][dim], which is B = K^T in "col" layout: a plain ldmatrix row (= one key, 8 dims) gives
            //    lane (g, t) B[2t, 2t+1][g]. x4 loads two n8 tiles x two k halves: matrices 0 = keys
            //    16pp + 0..7 / dims lo (b0 of tile 2pp), 1 = same keys / dims hi (b1), 2 = keys 16pp + 8..15 /
            //    dims lo (b0 of tile 2pp + 1), 3 = hi. Each K fragment feeds 2 kMTiles MMAs: the more rows a
            //    warp owns, the fewer shared-memory bytes per MMA (the point of two m-tiles per warp).
            float s[kMTiles][kNTiles][4];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
                for (int j = 0; j < kNTiles; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
            }
#pragma unroll
            for (int ks = 0; ks < kKSteps; ++ks) {
                uint32_t qa[kMTiles][4];
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) load_q(mt, ks, qa[mt]);
#pragma unroll
                for (int pp = 0; pp < kNTiles / 2; ++pp) {
                    const int row = 16 * pp + (lane & 7) + ((lane >> 4) << 3);
                    const int chunk = 2 * ks + ((lane >> 3) & 1);
                    uint32_t kb[4];
                    ldmatrix_x4(kb, k_base + 2 * (row * D + ((chunk ^ (lane & 7)) << 3)));
#pragma unroll
                    for (int mt = 0; mt < kMTiles; ++mt) {
                        Ops<T>::mma(s[mt][2 * pp], qa[mt], kb[0], kb[1]);
                        Ops<T>::mma(s[mt][2 * pp + 1], qa[mt], kb[2], kb[3]);
                    }
                }
            }
            // 2. Log2 units; mask. Element e of tile j of m-tile mt is (this thread's row r = 2 mt + (e >> 1),
            //    key n0 + 8j + 2t + (e & 1)).
            float mx[2 * kMTiles];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                mx[2 * mt] = mx[2 * mt + 1] = neg_inf();
#pragma unroll
                for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mt][j][e] * p.scale_log2;
                        if constexpr (kMasked) {
                            const int key = n0 + 8 * j + 2 * t + (e & 1);
                            if (key >= S || key > pos[2 * mt + (e >> 1)]) x = neg_inf();
                        }
                        s[mt][j][e] = x;
                    }
                    mx[2 * mt] = fmaxf(mx[2 * mt], fmaxf(s[mt][j][0], s[mt][j][1]));
                    mx[2 * mt + 1] = fmaxf(mx[2 * mt + 1], fmaxf(s[mt][j][2], s[mt][j][3]));
                }
            }
            // 3. Online softmax. A row's kBlockN scores live in the 4 lanes of a quad (same g): two
            //    xor-shuffles give every lane the row max; sums stay per-lane until the end (they only get
            //    rescaled).
#pragma unroll
            for (int r = 0; r < 2 * kMTiles; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            }
            float alpha[2 * kMTiles];
            bool unchanged = true;  // no row's max moved: every alpha is exactly 2^0 = 1
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                const int lo = 2 * mt, hi = 2 * mt + 1;
                const float m_new_lo = fmaxf(m_run[lo], mx[lo]), m_new_hi = fmaxf(m_run[hi], mx[hi]);
                alpha[lo] = exp2f(m_run[lo] - m_new_lo);
                alpha[hi] = exp2f(m_run[hi] - m_new_hi);
                unchanged = unchanged && m_new_lo == m_run[lo] && m_new_hi == m_run[hi];
                m_run[lo] = m_new_lo;
                m_run[hi] = m_new_hi;
                float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
                for (int j = 0; j < kNTiles; ++j) {
                    s[mt][j][0] = exp2f(s[mt][j][0] - m_new_lo);
                    s[mt][j][1] = exp2f(s[mt][j][1] - m_new_lo);
                    s[mt][j][2] = exp2f(s[mt][j][2] - m_new_hi);
                    s[mt][j][3] = exp2f(s[mt][j][3] - m_new_hi);
                    sum_lo += s[mt][j][0] + s[mt][j][1];
                    sum_hi += s[mt][j][2] + s[mt][j][3];
                }
                l_run[lo] = l_run[lo] * alpha[lo] + sum_lo;
                l_run[hi] = l_run[hi] * alpha[hi] + sum_hi;
            }
            // O *= alpha: kMTiles x D / 2 multiplications per thread. kLazyRescale: skipped when no row of the
            // whole warp got a new max (a warp-uniform vote, so the branch does not diverge); late in a long
            // row that is the common case, and multiplying by exactly 1 changes nothing.
            if (!Cfg::kLazyRescale || !__all_sync(0xffffffffu, unchanged)) {
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
                    for (int j = 0; j < kDTiles; ++j) {
                        o[mt][j][0] *= alpha[2 * mt];
                        o[mt][j][1] *= alpha[2 * mt];
                        o[mt][j][2] *= alpha[2 * mt + 1];
                        o[mt][j][3] *= alpha[2 * mt + 1];
                    }
                }
            }
            // 4. O += P V, k16 step kk = keys 16kk .. 16kk + 15. The A fragment of P (m-tile mt) is the C
            //    fragments of score tiles 2kk (a0: row g, keys 2t..; a1: row g + 8) and 2kk + 1 (a2, a3),
            //    rounded to T. V is [key][dim]; B[k = key][n = dim] needs two keys of one dim per register:
            //    ldmatrix.trans. Matrices: 0 = keys 16kk + 0..7 / dims 16dp..+7 (b0 of dim tile 2dp),
            //    1 = keys +8..15 / same dims (b1), 2 = keys 0..7 / dims 16dp+8..+15 (b0 of tile 2dp + 1),
            //    3 = keys 8..15 / those (b1). Each V fragment, too, feeds 2 kMTiles MMAs.
#pragma unroll
            for (int kk = 0; kk < kNTiles / 2; ++kk) {
                uint32_t pa[kMTiles][4];
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) {
                    pa[mt][0] = Ops<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = Ops<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = Ops<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = Ops<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < kDTiles / 2; ++dp) {
                    const int row = 16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3);
                    const int chunk = 2 * dp + (lane >> 4);
                    uint32_t vb[4];
                    ldmatrix_x4_trans(vb, v_base + 2 * (row * D + ((chunk ^ (lane & 7)) << 3)));
#pragma unroll
                    for (int mt = 0; mt < kMTiles; ++mt) {
                        Ops<T>::mma(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
                        Ops<T>::mma(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
                    }
                }
            }
        };

        // --- The main loop: double-buffered K/V tiles, one barrier per tile -------------------------
        // Iteration j: wait for tile j (the only group in flight) and barrier, which (a) makes every
        // thread's copies of tile j visible and (b) proves every warp has finished tile j - 1, so its
        // buffer ((j + 1) & 1) is free; start copying tile j + 1 into it, then compute on tile j while
        // tile j + 1 travels. (Tile 0 was waited for above, with Q.)
        for (int tile = 0; tile < num_tiles; ++tile) {
            const int n0 = tile * kBlockN;
            if (tile > 0) {
                cp_async_wait<0>();
                __syncthreads();
            }
            if (tile + 1 < num_tiles) {
                load_kv(n0 + kBlockN, (tile + 1) & 1);
                cp_async_commit();
            }
            if (n0 < warp_kv_end) {  // warp-uniform: the whole warp runs (or skips) the MMAs together
                if (n0 + kBlockN <= full_end) {
                    attend(std::false_type{}, n0, tile & 1);
                } else {
                    attend(std::true_type{}, n0, tile & 1);
                }
            }
        }
    }

    // --- Epilogue: O / l, rounded to T -------------------------------------------------------------
    T* out_ptr = static_cast<T*>(p.out);
#pragma unroll
    for (int r = 0; r < 2 * kMTiles; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;  // a row that saw no key: zeros, not NaN
        const int row = warp_row0 + 8 * r + g;
        const int mt = r >> 1, e0 = 2 * (r & 1);
        // Each lane writes 2 adjacent dims (4 bytes) per n8 tile; the 4 lanes of a quad cover 16 contiguous bytes.
        if (row < rows) {
            T* dst = out_ptr + static_cast<int64_t>(q_start + row / G) * p.stride_ot +
                     static_cast<int64_t>(hk * G + row % G) * p.stride_oh + 2 * t;
#pragma unroll
            for (int j = 0; j < kDTiles; ++j) {
                *reinterpret_cast<uint32_t*>(dst + 8 * j) = Ops<T>::pack(o[mt][j][e0] * inv, o[mt][j][e0 + 1] * inv);
            }
        }
    }
}

template <typename T, int D, bool kPaged>
cudaError_t launch(const Params& params, int H_kv, int B, int num_m_tiles, cudaStream_t stream) {
    constexpr int kSmem = Config<D>::kSmemBytes;
    auto kernel = flash_attention_kernel<T, D, kPaged>;
    // More than 48 KiB of dynamic shared memory must be asked for; and prefer the largest shared-memory
    // carveout so that two CTAs (2 x 96 KiB at D = 128) fit on one SM. Once per device and kernel (a bit
    // per device): later launches, e.g. inside CUDA-graph capture, make no attribute calls.
    static unsigned long long configured = 0;
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return status;
    const unsigned long long bit = 1ull << (device & 63);
    if (!(configured & bit)) {
        status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
        if (status != cudaSuccess) return status;
        status = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared));
        if (status != cudaSuccess) return status;
        configured |= bit;  // (a benign race between host threads: both would set the same values)
    }
    const dim3 grid(H_kv, B, num_m_tiles);
    kernel<<<grid, Config<D>::kThreads, kSmem, stream>>>(params);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(int D, bool paged, const Params& params, int H_kv, int B, int num_m_tiles,
                         cudaStream_t stream) {
    if (D == 64) {
        return paged ? launch<T, 64, true>(params, H_kv, B, num_m_tiles, stream)
                     : launch<T, 64, false>(params, H_kv, B, num_m_tiles, stream);
    }
    return paged ? launch<T, 128, true>(params, H_kv, B, num_m_tiles, stream)
                 : launch<T, 128, false>(params, H_kv, B, num_m_tiles, stream);
}

}  // namespace

// The launcher the binding calls (so the binding needs no CUDA headers). All pointers are device
// pointers, 16-byte aligned; q/out rows and K/V rows have contiguous D. strides (elements, 11 values):
// q (token, head), k (block, token, head), v (block, token, head), out (token, head), block_table (row).
// Dense K/V: block_table, seq_lens null, k/v block strides 0. Paged: cu_seqlens_k null, P a power of
// two. max_seqlen_q bounds the query lengths (it sizes the grid); longer sequences are cut short.
// dtype_code: 1 = float16, 2 = bfloat16. Returns nullptr on success, else a message.
const char* miniinfer_launch_flash_attention(void* out, const void* q, const void* k, const void* v,
                                             const int* cu_seqlens_q, const int* cu_seqlens_k,
                                             const int* block_table, const int* seq_lens, const int64_t* strides,
                                             int B, int H, int H_kv, int D, int P, int max_blocks, int max_seqlen_q,
                                             bool causal, float scale, int dtype_code, void* stream) {
    if (B <= 0 || H <= 0 || max_seqlen_q <= 0) return nullptr;  // nothing to do
    if (H_kv <= 0 || H % H_kv != 0) return "H must be a positive multiple of H_kv";
    if (D != 64 && D != 128) return "head dim D must be 64 or 128";
    const bool paged = block_table != nullptr;
    if (paged && (seq_lens == nullptr || P <= 0 || (P & (P - 1)) != 0)) return "paged K/V needs seq_lens and P = 2^n";
    if (!paged && cu_seqlens_k == nullptr) return "dense K/V needs cu_seqlens_k";
    if (B > 65535) return "batch larger than 65535 (grid y limit)";
    const int G = H / H_kv;
    const long long rows = static_cast<long long>(max_seqlen_q) * G;
    const int block_m = D == 64 ? Config<64>::kBlockM : Config<128>::kBlockM;  // rows per CTA
    const long long num_m_tiles = (rows + block_m - 1) / block_m;
    if (num_m_tiles > 65535) return "max_seqlen_q * G too large (grid z limit: 65535 query tiles)";
    if (rows > (1LL << 30)) return "max_seqlen_q * G too large";

    Params params;
    params.q = q;
    params.k = k;
    params.v = v;
    params.out = out;
    params.cu_seqlens_q = cu_seqlens_q;
    params.cu_seqlens_k = cu_seqlens_k;
    params.block_table = block_table;
    params.seq_lens = seq_lens;
    params.stride_qt = strides[0];
    params.stride_qh = strides[1];
    params.stride_kb = strides[2];
    params.stride_kt = strides[3];
    params.stride_kh = strides[4];
    params.stride_vb = strides[5];
    params.stride_vt = strides[6];
    params.stride_vh = strides[7];
    params.stride_ot = strides[8];
    params.stride_oh = strides[9];
    params.stride_bt = strides[10];
    params.G = G;
    params.max_blocks = paged ? max_blocks : 0;
    int log2_P = 0;
    while (paged && (1 << log2_P) < P) ++log2_P;
    params.log2_P = log2_P;
    params.causal = causal ? 1 : 0;
    params.scale_log2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2(e))

    auto s = static_cast<cudaStream_t>(stream);
    cudaError_t status;
    switch (dtype_code) {
        case 1: status = launch_dtype<__half>(D, paged, params, H_kv, B, static_cast<int>(num_m_tiles), s); break;
        case 2:
            status = launch_dtype<__nv_bfloat16>(D, paged, params, H_kv, B, static_cast<int>(num_m_tiles), s);
            break;
        default: return "unsupported dtype code (float16 and bfloat16 only)";
    }
    return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}
