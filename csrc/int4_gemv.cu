// int4 matmul for decode (M = 1 … 16 tokens) in GPTQ's layout, on tensor cores:
//
//     out[m, n] = sum_k x[m, k] * scales[g, n] * (q[k, n] - zeros[g, n]),   g = k / group_size
//
//   x        [M, K]        fp16 / bf16, rows contiguous (the decode tokens; M <= 16)
//   qweight  [K/8, N]      int32: input k's 4-bit value for output n is (qweight[k/8, n] >> 4*(k%8)) & 15
//   qzeros   [G, N/8]      int32: zero point of group g, output n is (qzeros[g, n/8] >> 4*(n%8)) & 15
//   scales   [G, N]        x's dtype
//   out      [M, N]        x's dtype
//   partial  [splits, M, N] float32 and counters int32 [N/32 tiles]: only when K is split (see below)
//
// Decode reads every weight once and does 2M flops with it, so its speed is the speed of reading the
// weights: int4 is a quarter of bf16's bytes, and the whole game is to keep everything else (turning
// nibbles into numbers, multiplying, adding) cheaper than the read. An H200 reads 4.2 TB/s; an 8192²
// int4 matrix is 33.5 MB, 8 µs. The arithmetic budget in that time is what decides the design:
//
// * The products go to the TENSOR CORES (mma.sync m16n8k16, fp32 accumulation). For M = 1 the n8 side
//   carries one real token and seven zeros: wasted tensor-core work costs nothing here, and M up to 8
//   (16 with a second mma) is nearly free. The CUDA cores only dequantize.
// * Dequantizing two nibbles costs three instructions, no int-to-float conversion: a shift and a LOP3
//   put nibbles k and k+4 of a word into the low mantissa bits of the two halves of the number 1024
//   (fp16: 0x6400; bf16: 128 = 0x4300), giving exactly (1024 + q) in each half; HSUB2 of (1024 + zero)
//   leaves q − zero, a small integer, exact in both formats. The scale is NOT applied per weight: the
//   tensor cores add x · (q − zero) over a group in float32, and the group's sum is multiplied by its
//   scale once (sum_k x_k s (q_k − z) = s · sum_k x_k (q_k − z)). So a weight costs 1.5 instructions on
//   the CUDA cores, and the result is closer to exact than dequantizing to x's dtype would be.
// * The fragments are chosen to fit the loads, not the other way round. An mma multiplies A [16 rows ×
//   16 k] by B [16 k × 8 tokens]; which weight column is "row i" and which input is "k j" is ours to
//   choose, as long as A and B agree. Lane (g = lane/4, t = lane%4) loads ONE 16-byte vector: packed
//   row r0+t (8 inputs) of columns 4g … 4g+3. A warp's load is 4 rows × 128 contiguous bytes: whole
//   cache lines. Those 32 weights are exactly its share of four mmas: columns (4g, 4g+1) and (4g+2, 4g+3)
//   are its two A rows g and g+8 for two column pairs, and the LOP3 pairs (k, k+4) of its row are its
//   A k-pairs (2t, 2t+1), (2t+8, 2t+9) for two k halves. B is x for the same physical inputs: one
//   16-byte load of x[m, 8(r0+t) … +7] and four byte permutes into the same (k, k+4) pairs. The C
//   fragment a lane ends with is then for its own 4 columns: the scales it needs are the ones it loads.
// * Latency, not bandwidth, is the enemy at this size: a warp that loads, waits, computes, loads again
//   leaves DRAM idle while it computes. Each warp keeps the NEXT kUnroll steps' weights and x in flight
//   while it works on the current ones (a register double buffer), and the next group's scales and
//   zeros are fetched a group ahead.
// * A CTA is kWarpsN × kWarpsK warps: kWarpsN side by side on 32 columns each, kWarpsK taking
//   contiguous runs of the K range (so a warp's consecutive steps share a group) and adding their sums
//   through shared memory. Narrow layers (N = 3584: 112 tiles of 32 columns for 132 SMs) also split K
//   across CTAs: each writes float32 partial sums, and the LAST CTA of a tile to finish (an atomic
//   ticket) adds them in split order and writes the output. One launch, no memset, no extra reduction
//   kernel, and the same sum on every run.
//
// Pure CUDA (no torch headers): the binding calls the launcher; CI compiles this file with nvcc alone.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kRowsPerStep = 4;  // packed rows (32 inputs) a warp reads per step: lane t reads row +t
// The CTA shape is a template: kWarpsN warps side by side (32 columns each) times kWarpsK warps that
// split the inputs, and kUnroll steps whose weight loads a thread has in flight at once. The launcher
// takes a `shape` code (the table in `launch`; miniinfer/kernels/int4_matmul.py mirrors it) so that a
// benchmark can compare them on the real card without rebuilding.

template <typename T>
struct Ops;

template <>
struct Ops<__half> {
    static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves: its mantissa unit is 1
    static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
        uint32_t r;
        asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
        return r;
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        uint32_t r;
        asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
        return r;
    }
    static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
    static __device__ __forceinline__ float to_float(uint32_t bits) {
        return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
};

template <>
struct Ops<__nv_bfloat16> {
    static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves: its mantissa unit is 1
    static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
        uint32_t r;
        asm("sub.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
        return r;
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        uint32_t r;
        asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
        return r;
    }
    static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
    static __device__ __forceinline__ float to_float(uint32_t bits) { return __uint_as_float(bits << 16); }
};

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// A weight vector read once: stream it past L1 (which keeps x, scales and zeros).
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// 16 bytes global -> shared without passing through registers (cp.async, sm_80+), bypassing L1; with
// src_bytes = 0 nothing is read and the 16 bytes are zero-filled (a row past the end of a K slice).
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, int src_bytes) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Programmatic dependent launch (sm_90+). In a chain of kernels, the next one normally starts only after
// this one has finished to the last CTA and the launch machinery has caught up: each GEMV pays the
// previous kernel's tail and its own ramp as idle DRAM time (a few µs per call, against ~8 µs of reading
// at 8192²). Launched with the programmatic-serialization attribute (`launch(..., pdl = 1)`), a kernel may
// start while its predecessor is still running: it streams its WEIGHTS, which no kernel before it writes,
// and waits (griddepcontrol.wait: the predecessor complete, its memory visible) only before it reads x,
// the previous kernel's output, or writes anything. Launched without the attribute, both are no-ops.
// x is read with ld.global.cg (L2, coherent), not the read-only path: with PDL the kernel is already
// resident while its predecessor writes x, and data read through the non-coherent path must not change
// during the kernel's lifetime.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Bytes of dynamic shared memory the ring of kStages steps takes (0: the register path, no ring).
template <int kTokenTiles, int kWarps, int kStages>
constexpr int ring_bytes() {
    return kStages > 0 ? kWarps * kStages * (1 + kTokenTiles) * 32 * 16 : 0;
}

template <typename T, int kTokenTiles, int kWarpsN, int kWarpsK, int kUnroll, int kStages, bool kTiled>
// Registers: 16 warps per SM (<= 128 registers a thread) for one token tile, 8 for two (<= 255).
__global__ void __launch_bounds__(kWarpsN * kWarpsK * 32, (kTokenTiles == 1 ? 16 : 8) / (kWarpsN * kWarpsK))
int4_matmul_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                   const T* __restrict__ scales, T* __restrict__ out, float* __restrict__ partial,
                   int* __restrict__ counters, int M, int N, int K, int group_size, int rows_per_split) {
    using O = Ops<T>;
    pdl_launch_dependents();  // the next kernel may be scheduled now; it waits for us before reading our output
    constexpr int kWarps = kWarpsN * kWarpsK;
    constexpr int kThreads = kWarps * 32;
    constexpr int kTileN = 32 * kWarpsN;  // columns of a CTA: kWarpsN warps side by side
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wn = warp % kWarpsN, wk = warp / kWarpsN;  // the warp's column block and K lane
    const int g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int col0 = tile * kTileN + wn * 32 + 4 * g;  // this lane's 4 columns col0 … col0+3 (N % 8 == 0: all or none)
    const bool col_ok = col0 < N;
    const int row_begin = split * rows_per_split;
    const int row_end = min(row_begin + rows_per_split, K / 8);
    const int split_steps = (row_end - row_begin + kRowsPerStep - 1) / kRowsPerStep;
    // Each warp of the K lanes takes a contiguous run of steps, so that consecutive steps share a group:
    // the group's scale then multiplies a float32 sum once per group, not every weight.
    const int per_warp = (split_steps + kWarpsK - 1) / kWarpsK;
    const int s_begin = wk * per_warp;
    const int s_end = min(s_begin + per_warp, split_steps);
    const int group_rows = group_size / 8;  // a multiple of 4: a step never straddles two groups
    const int num_groups = K / group_size;

    // acc[token tile][column pair][C fragment]: C(row i, token j), i = g / g+8, j = 2t / 2t+1.
    // part: the same for the current group, before its scale.
    float acc[kTokenTiles][2][4], part[kTokenTiles][2][4];
#pragma unroll
    for (int mt = 0; mt < kTokenTiles; ++mt)
#pragma unroll
        for (int cp = 0; cp < 2; ++cp)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][cp][i] = part[mt][cp][i] = 0.f;

    if (s_begin < s_end) {  // the same for the whole warp
        // Where this lane's 16-byte weight vector of packed row `row` lives (in uint4 units). GPTQ's layout:
        // row-major [K/8, N/4]. The tiled layout (int4_matmul.tile_int4_weight) stores each 32-column block's
        // steps one after the other, a step's 32 vectors in lane order: a warp's run is one contiguous stream.
        auto weight_index = [&](int row) -> int64_t {
            if constexpr (kTiled) {
                const int column_block = col0 / 32;
                return (static_cast<int64_t>(column_block) * (K / 32) + row / kRowsPerStep) * 32 + lane;
            } else {
                return static_cast<int64_t>(row) * (N / 4) + col0 / 4;
            }
        };
        // The group parameters of this lane's 4 columns: raw words of the next group are loaded a group
        // ahead, so that a group change does not wait on memory.
        auto load_params = [&](int group, uint2& sc, uint32_t& zw) {
            sc = make_uint2(0u, 0u);
            zw = 0u;
            if (col_ok && group < num_groups) {
                sc = __ldg(reinterpret_cast<const uint2*>(scales + static_cast<int64_t>(group) * N + col0));
                zw = __ldg(qzeros + static_cast<int64_t>(group) * (N / 8) + col0 / 8) >> ((col0 % 8) * 4);
            }
        };
        uint32_t zero2[4];
        float scale[4];
        auto use_params = [&](uint2 sc, uint32_t zw) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t z = (zw >> (4 * j)) & 0xFu;
                zero2[j] = O::kMagic | z | (z << 16);  // (magic + z) in both halves
            }
            scale[0] = O::to_float(sc.x & 0xFFFFu);
            scale[1] = O::to_float(sc.x >> 16);
            scale[2] = O::to_float(sc.y & 0xFFFFu);
            scale[3] = O::to_float(sc.y >> 16);
        };
        auto fold = [&]() {  // acc += scale * part; part = 0
#pragma unroll
            for (int mt = 0; mt < kTokenTiles; ++mt)
#pragma unroll
                for (int cp = 0; cp < 2; ++cp)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        acc[mt][cp][i] = fmaf(scale[2 * cp + (i >> 1)], part[mt][cp][i], acc[mt][cp][i]);
                        part[mt][cp][i] = 0.f;
                    }
        };
        // The weights of kUnroll steps, and x of the same rows for this lane's tokens (B serves every column
        // of the tile, so x is loaded by row only). x is small and cached, but an L2 hit still takes
        // hundreds of cycles: it is fetched a batch ahead like the weights.
        auto load_batch = [&](int s_first, uint4 (&w)[kUnroll], uint4 (&xv)[kUnroll][kTokenTiles],
                              bool weights = true, bool xs = true) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int row = row_begin + (s_first + u) * kRowsPerStep + t;
                const bool row_ok = s_first + u < s_end && row < row_end;
                if (weights) {
                    w[u] = make_uint4(0u, 0u, 0u, 0u);
                    if (col_ok && row_ok) {
                        w[u] = load_streaming(qweight + weight_index(row));
                    }
                }
                if (!xs) continue;
#pragma unroll
                for (int mt = 0; mt < kTokenTiles; ++mt) {
                    const int token = mt * 8 + g;
                    xv[u][mt] = make_uint4(0u, 0u, 0u, 0u);
                    if (row_ok && token < M) {
                        xv[u][mt] = __ldcg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(token) * K + row * 8));
                    }
                }
            }
        };

        int group = (row_begin + s_begin * kRowsPerStep) / group_rows;  // one division per warp
        int group_end = (group + 1) * group_rows;                         // its first row past the group
        uint2 sc_raw, sc_next;
        uint32_t zw_raw, zw_next;
        load_params(group, sc_raw, zw_raw);
        load_params(group + 1, sc_next, zw_next);
        use_params(sc_raw, zw_raw);

        // One step: 4 packed rows (32 inputs) x this lane's 4 columns, from its weight vector w and x.
        auto compute_step = [&](int s, const uint4& wv, const uint4 (&xv)[kTokenTiles]) {
            const int row0 = row_begin + s * kRowsPerStep;
            if (row0 >= group_end) {  // a new group: scale the finished one's sum, take its parameters
                fold();
                ++group;
                group_end += group_rows;
                use_params(sc_next, zw_next);
                load_params(group + 1, sc_next, zw_next);
            }
            // B: x of token (mt·8 + g) at this lane's row, as the pairs (k, k+4), k = 0 … 3.
            uint32_t b[kTokenTiles][4];
#pragma unroll
            for (int mt = 0; mt < kTokenTiles; ++mt) {
                const uint4 v = xv[mt];
                b[mt][0] = __byte_perm(v.x, v.z, 0x5410);  // (x0, x4)
                b[mt][1] = __byte_perm(v.x, v.z, 0x7632);  // (x1, x5)
                b[mt][2] = __byte_perm(v.y, v.w, 0x5410);  // (x2, x6)
                b[mt][3] = __byte_perm(v.y, v.w, 0x7632);  // (x3, x7)
            }
            // A: the 4 columns' 8 weights each as exact small integers q − z, in pairs (k, k+4).
            const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
            uint32_t deq[4][4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    deq[j][p] = O::sub(and_or(words[j] >> (4 * p), 0x000F000Fu, O::kMagic), zero2[j]);
                }
#pragma unroll
            for (int cp = 0; cp < 2; ++cp)
#pragma unroll
                for (int kb = 0; kb < 2; ++kb) {
                    const uint32_t a[4] = {deq[2 * cp][2 * kb], deq[2 * cp + 1][2 * kb], deq[2 * cp][2 * kb + 1],
                                           deq[2 * cp + 1][2 * kb + 1]};
#pragma unroll
                    for (int mt = 0; mt < kTokenTiles; ++mt) {
                        O::mma(part[mt][cp], a, b[mt][2 * kb], b[mt][2 * kb + 1]);
                    }
                }
        };

        if constexpr (kStages < 0) {
            // A rolling register queue of kUnroll steps: as soon as a step's vectors are taken, the load of
            // the step kUnroll ahead goes out into the same registers, so kUnroll − 1 steps stay in flight
            // all the time (the double buffer below has between kUnroll and 0).
            uint4 wq[kUnroll], xq[kUnroll][kTokenTiles];
            auto load_one = [&](int s, uint4& w, uint4 (&xv)[kTokenTiles]) {
                const int row = row_begin + s * kRowsPerStep + t;
                const bool row_ok = s < s_end && row < row_end;
                w = make_uint4(0u, 0u, 0u, 0u);
                if (col_ok && row_ok) w = load_streaming(qweight + weight_index(row));
#pragma unroll
                for (int mt = 0; mt < kTokenTiles; ++mt) {
                    const int token = mt * 8 + g;
                    xv[mt] = make_uint4(0u, 0u, 0u, 0u);
                    if (row_ok && token < M) {
                        xv[mt] = __ldcg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(token) * K + row * 8));
                    }
                }
            };
            pdl_wait();
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) load_one(s_begin + u, wq[u], xq[u]);
            for (int s0 = s_begin; s0 < s_end; s0 += kUnroll) {
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    if (s0 + u >= s_end) break;
                    const uint4 wv = wq[u];
                    uint4 xv[kTokenTiles];
#pragma unroll
                    for (int mt = 0; mt < kTokenTiles; ++mt) xv[mt] = xq[u][mt];
                    load_one(s0 + u + kUnroll, wq[u], xq[u]);
                    compute_step(s0 + u, wv, xv);
                }
            }
        } else if constexpr (kStages == 0) {
            // Registers: the weights of the next kUnroll steps are in flight while these are used.
            uint4 w_next[kUnroll], x_next[kUnroll][kTokenTiles];
            load_batch(s_begin, w_next, x_next, true, false);  // the first weights: no kernel before us writes them
            pdl_wait();                                        // x may be the previous kernel's output
            load_batch(s_begin, w_next, x_next, false, true);
            for (int s0 = s_begin; s0 < s_end; s0 += kUnroll) {
                uint4 w[kUnroll], xb[kUnroll][kTokenTiles];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    w[u] = w_next[u];
#pragma unroll
                    for (int mt = 0; mt < kTokenTiles; ++mt) xb[u][mt] = x_next[u][mt];
                }
                load_batch(s0 + kUnroll, w_next, x_next);
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    if (s0 + u >= s_end) break;
                    compute_step(s0 + u, w[u], xb[u]);
                }
            }
        } else {
            // A ring of kStages steps in shared memory, filled by cp.async: kStages − 1 steps (their weights
            // and x) are in flight while one is used, without holding registers for them. Each lane reads
            // back only the 16-byte vectors it copied itself, so its own cp.async.wait_group is the only
            // synchronisation: no barrier, and warps run at their own pace.
            extern __shared__ uint4 ring[];  // [warp][stage][weights, x of token tile 0, 1][lane]
            constexpr int kSlots = 1 + kTokenTiles;
            uint4* mine = ring + warp * (kStages * kSlots * 32) + lane;
            bool token_ok[kTokenTiles];
#pragma unroll
            for (int mt = 0; mt < kTokenTiles; ++mt) token_ok[mt] = mt * 8 + g < M;
            auto issue = [&](int s, int stage) {  // start copying step s into the ring's `stage`
                if (s >= s_end) return;
                const int row = row_begin + s * kRowsPerStep + t;
                const bool row_ok = row < row_end;
                uint4* slot = mine + stage * (kSlots * 32);
                copy_async_16(slot, qweight + (row_ok && col_ok ? weight_index(row) : 0),
                              row_ok && col_ok ? 16 : 0);
#pragma unroll
                for (int mt = 0; mt < kTokenTiles; ++mt) {
                    if (token_ok[mt]) {
                        copy_async_16(slot + (1 + mt) * 32,
                                      x + (row_ok ? static_cast<int64_t>(mt * 8 + g) * K + row * 8 : 0),
                                      row_ok ? 16 : 0);
                    }
                }
            };
            pdl_wait();
#pragma unroll
            for (int i = 0; i < kStages - 1; ++i) {
                issue(s_begin + i, i);
                copy_async_commit();  // one group per step, empty past the end: the count stays uniform
            }
            int stage = 0;
#pragma unroll 2
            for (int s = s_begin; s < s_end; ++s) {
                copy_async_wait<kStages - 2>();  // step s (the oldest group) has landed
                const uint4* slot = mine + stage * (kSlots * 32);
                const uint4 wv = slot[0];
                uint4 xv[kTokenTiles];
#pragma unroll
                for (int mt = 0; mt < kTokenTiles; ++mt) {
                    xv[mt] = token_ok[mt] ? slot[(1 + mt) * 32] : make_uint4(0u, 0u, 0u, 0u);
                }
                // Refill the stage read in the previous iteration (its values are used up) with step s + kStages − 1.
                issue(s + kStages - 1, stage == 0 ? kStages - 1 : stage - 1);
                copy_async_commit();
                stage = stage + 1 == kStages ? 0 : stage + 1;
                compute_step(s, wv, xv);
            }
            copy_async_wait<0>();
        }
        fold();
    }
    pdl_wait();  // (a warp without steps has not waited yet) nothing is written before the predecessor is done

    // Add the kWarpsK K lanes' sums: red[warp][value][lane] (lane fastest: no bank conflicts).
    constexpr int kValues = kTokenTiles * 8;
    constexpr int kFlat = kWarpsN * kValues * 32;  // (column block, value, lane) after the sum over K lanes
    constexpr int kPerThread = (kFlat + kThreads - 1) / kThreads;
    __shared__ float red[kWarps][kValues][32];
    __shared__ bool last_split;
#pragma unroll
    for (int mt = 0; mt < kTokenTiles; ++mt)
#pragma unroll
        for (int cp = 0; cp < 2; ++cp)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][mt * 8 + cp * 4 + i][lane] = acc[mt][cp][i];
    __syncthreads();

    // Thread f sums flat value f = (column block, value, lane); where it goes: the C element's column, token.
    float total[kPerThread];
    int where[kPerThread];  // token * N + column, or -1
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const int f = threadIdx.x + i * kThreads;
        where[i] = -1;
        total[i] = 0.f;
        if (f < kFlat) {
            const int block = f / (kValues * 32), v = (f / 32) % kValues, ln = f % 32;
#pragma unroll
            for (int k_lane = 0; k_lane < kWarpsK; ++k_lane) total[i] += red[k_lane * kWarpsN + block][v][ln];
            const int mt = v / 8, cp = (v % 8) / 4, c = v % 4;
            const int column = tile * kTileN + block * 32 + 4 * (ln >> 2) + 2 * cp + (c >> 1);
            const int token = mt * 8 + 2 * (ln & 3) + (c & 1);
            if (column < N && token < M) where[i] = token * N + column;
        }
    }
    if (splits == 1) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            if (where[i] >= 0) out[where[i]] = O::from_float(total[i]);
        }
        return;
    }
    // Split K: publish this CTA's sums, take a ticket; the tile's last CTA adds all splits in order.
    const int64_t plane = static_cast<int64_t>(M) * N;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        if (where[i] >= 0) partial[split * plane + where[i]] = total[i];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last_split = atomicAdd(counters + tile, 1) == splits - 1;
    }
    __syncthreads();
    if (!last_split) {
        return;
    }
    __threadfence();
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        if (where[i] >= 0) {
            float sum = 0.f;
            for (int sp = 0; sp < splits; ++sp) sum += __ldcg(partial + sp * plane + where[i]);
            out[where[i]] = O::from_float(sum);
        }
    }
    if (threadIdx.x == 0) {
        counters[tile] = 0;  // ready for the next launch (and for CUDA graph replays)
    }
}

template <typename T>
const char* launch(const void* x, const void* qweight, const void* qzeros, const void* scales, void* out,
                   float* partial, int* counters, int M, int N, int K, int group_size, int rows_per_split,
                   int shape, int pdl, cudaStream_t stream) {
    const int rows = K / 8;
    const int splits = (rows + rows_per_split - 1) / rows_per_split;
    if (splits > 1 && (partial == nullptr || counters == nullptr)) {
        return "int4_gemv: a split K needs the partial and counters workspaces";
    }
    const T* xs = static_cast<const T*>(x);
    const uint4* qw = static_cast<const uint4*>(qweight);
    const uint32_t* qz = static_cast<const uint32_t*>(qzeros);
    const T* sc = static_cast<const T*>(scales);
    T* o = static_cast<T*>(out);
#define MINIINFER_INT4_LAUNCH(TILES, WN, WK, UNROLL, STAGES, TILED)                                                   \
    do {                                                                                                           \
        auto kernel = int4_matmul_kernel<T, TILES, WN, WK, UNROLL, STAGES, TILED>;                                      \
        constexpr int kRing = ring_bytes<TILES, WN * WK, STAGES>();                                                \
        if (kRing > 0 &&                                                                                           \
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRing) != cudaSuccess) {     \
            return "int4_gemv: cannot give the kernel its shared-memory ring (cudaFuncSetAttribute)";             \
        }                                                                                                          \
        cudaLaunchConfig_t config = {};                                                                            \
        config.gridDim = dim3((N + 32 * WN - 1) / (32 * WN), splits);                                             \
        config.blockDim = dim3(WN * WK * 32);                                                                      \
        config.dynamicSmemBytes = kRing;                                                                           \
        config.stream = stream;                                                                                    \
        cudaLaunchAttribute attribute[1];                                                                          \
        attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;                                     \
        attribute[0].val.programmaticStreamSerializationAllowed = 1;                                               \
        config.attrs = attribute;                                                                                  \
        config.numAttrs = pdl ? 1 : 0;                                                                             \
        const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, xs, qw, qz, sc, o, partial, counters, M, N, \
                                                        K, group_size, rows_per_split);                            \
        if (launched != cudaSuccess) return cudaGetErrorString(launched);                                         \
    } while (0)
#define MINIINFER_INT4_SHAPES(TILES)                                \
    switch (shape) {                                                \
        case 1: MINIINFER_INT4_LAUNCH(TILES, 2, 4, 4, 0, false); break;    \
        case 2: MINIINFER_INT4_LAUNCH(TILES, 4, 2, 4, 0, false); break;    \
        case 3: MINIINFER_INT4_LAUNCH(TILES, 8, 1, 4, 0, false); break;    \
        case 4: MINIINFER_INT4_LAUNCH(TILES, 4, 2, 8, 0, false); break;    \
        case 5: MINIINFER_INT4_LAUNCH(TILES, 8, 1, 8, 0, false); break;    \
        case 6: MINIINFER_INT4_LAUNCH(TILES, 4, 1, 8, 0, false); break;    \
        case 7: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 8, 0, false); break;    \
        case 8: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 1, 8, false); break;    \
        case 9: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 1, 12, false); break;   \
        case 10: MINIINFER_INT4_LAUNCH(TILES, 1, 4, 1, 16, false); break;  \
        case 11: MINIINFER_INT4_LAUNCH(TILES, 2, 4, 1, 8, false); break;   \
        case 12: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 1, 5, false); break;   \
        case 13: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 4, 0, true); break;    \
        case 14: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 8, 0, true); break;    \
        case 15: MINIINFER_INT4_LAUNCH(TILES, 1, 4, 4, 0, true); break;    \
        case 16: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 1, 5, true); break;    \
        case 17: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 1, 8, true); break;    \
        case 18: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 8, -1, false); break;  \
        case 19: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 8, -1, true); break;   \
        case 20: MINIINFER_INT4_LAUNCH(TILES, 1, 4, 8, -1, true); break;   \
        case 21: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 6, -1, true); break;   \
        case 22: MINIINFER_INT4_LAUNCH(TILES, 1, 4, 12, -1, true); break;  \
        default: MINIINFER_INT4_LAUNCH(TILES, 1, 8, 4, 0, false); break;   \
    }
    if (M <= 8) {
        MINIINFER_INT4_SHAPES(1)
    } else {
        MINIINFER_INT4_SHAPES(2)
    }
#undef MINIINFER_INT4_SHAPES
#undef MINIINFER_INT4_LAUNCH
    const cudaError_t error = cudaGetLastError();
    return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

// dtype_code: 1 = float16, 2 = bfloat16 (x, scales, out). rows_per_split: packed rows (8 inputs each) per
// K split, a multiple of 4 (K/8 or more: no split). partial [splits, M, N] float32 and counters [N/32]
// int32 (zeroed once; every launch leaves them zero) are needed only when K is split. Returns nullptr or
// an error message. shape: the CTA shape code (warps along N x warps along K x steps in flight), see `launch`.
// pdl: 1 = launch as a programmatic dependent of the previous kernel on the stream (see pdl_wait).
const char* miniinfer_launch_int4_gemv(const void* x, const void* qweight, const void* qzeros, const void* scales,
                                       void* out, float* partial, int* counters, int64_t M, int64_t N, int64_t K,
                                       int64_t group_size, int64_t rows_per_split, int dtype_code, int shape,
                                       int pdl, void* stream) {
    if (M < 1 || M > 16 || N % 8 != 0 || K % 8 != 0 || group_size % 32 != 0 || K % group_size != 0 ||
        rows_per_split < 1 || rows_per_split % kRowsPerStep != 0 || M * N >= (int64_t{1} << 31)) {
        return "int4_gemv: needs 1 <= M <= 16, N % 8 == 0, group_size % 32 == 0 dividing K, "
               "rows_per_split a positive multiple of 4";
    }
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
    const int g = static_cast<int>(group_size);
    const int rps = static_cast<int>(rows_per_split);
    if (dtype_code == 1) {
        return launch<__half>(x, qweight, qzeros, scales, out, partial, counters, m, n, k, g, rps, shape, pdl, s);
    }
    if (dtype_code == 2) {
        return launch<__nv_bfloat16>(x, qweight, qzeros, scales, out, partial, counters, m, n, k, g, rps, shape, pdl, s);
    }
    return "int4_gemv: x must be float16 or bfloat16";
}
