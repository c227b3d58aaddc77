// int4 GEMV in GPTQ's layout: out[n] = sum_k x[k] * scales[g, n] * (q[k, n] - zeros[g, n]),  g = k / group_size.
//
//   x        [K]           fp16 / bf16 (the one decode token)
//   qweight  [K/8, N]      int32: input k's 4-bit value for output n is (qweight[k/8, n] >> 4*(k%8)) & 15
//   qzeros   [G, N/8]      int32: zero point of group g, output n is (qzeros[g, n/8] >> 4*(n%8)) & 15
//   scales   [G, N]        fp16 / bf16
//   partial  [splits, N]   float32: one row per K slice, summed by the caller
//
// A GEMV reads every weight once and does two flops with it: its speed is the speed of reading the
// weights. int4 weights are a quarter of bf16's bytes; the work is to keep the dequantization off
// the critical path:
//
// * Each thread owns 4 neighbouring outputs and reads one 16-byte int4 vector per packed row (8
//   inputs x 4 outputs), so a warp reads 512 contiguous bytes per row: full memory transactions.
// * The x slice of the block is staged once in shared memory as float32 (all threads read the same
//   element at once: a broadcast, no bank conflicts).
// * A nibble becomes a float without an int-to-float conversion instruction: OR-ing it into the
//   mantissa of 2^23 (0x4B000000) gives the float 2^23 + q exactly; one subtraction leaves q.
// * The zero point and scale are applied once per group, not per weight:
//     sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z sum_k x_k).
// * The grid is (column tiles) x (K slices): a square 8192 matrix has only 16 tiles of 512 columns,
//   far too few for 132 SMs, so K is split too (whole groups per slice) and the slices' float32
//   partial sums are added afterwards (deterministic, no atomics).
//
// Pure CUDA (no torch headers): the binding calls the launcher; CI compiles this file with nvcc alone.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 128;        // threads per block
constexpr int kColsPerThread = 4;    // one int4 vector of packed words
constexpr int kColsPerBlock = kThreads * kColsPerThread;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The nibble at `shift` of `word` as a float, via the 2^23 mantissa trick.
__device__ __forceinline__ float nibble(uint32_t word, int shift) {
    return __uint_as_float(((word >> shift) & 0xFu) | 0x4B000000u) - 8388608.0f;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
int4_gemv_kernel(const scalar_t* __restrict__ x, const int4* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                 const scalar_t* __restrict__ scales, float* __restrict__ partial, int N, int K, int group_size,
                 int groups_per_split) {
    extern __shared__ float xs[];  // this slice of x, float32
    const int num_groups = K / group_size;
    const int g_begin = blockIdx.y * groups_per_split;
    const int g_end = min(g_begin + groups_per_split, num_groups);
    const int k_begin = g_begin * group_size;
    const int k_end = g_end * group_size;
    for (int k = k_begin + threadIdx.x; k < k_end; k += kThreads) {
        xs[k - k_begin] = to_float(x[k]);
    }
    __syncthreads();

    const int n = (blockIdx.x * kThreads + threadIdx.x) * kColsPerThread;
    if (n >= N) {
        return;
    }
    const int row_vectors = N / kColsPerThread;  // int4 vectors per packed row
    const int zero_shift = (n % 8) * 4;          // n is a multiple of 4: its 4 zeros share one word
    float acc[kColsPerThread] = {0.f, 0.f, 0.f, 0.f};
    for (int g = g_begin; g < g_end; ++g) {
        float dot[kColsPerThread] = {0.f, 0.f, 0.f, 0.f};
        float x_sum = 0.f;
        const int r_begin = g * group_size / 8;
        const int r_end = r_begin + group_size / 8;
#pragma unroll 4
        for (int r = r_begin; r < r_end; ++r) {
            const int4 packed = __ldg(qweight + static_cast<int64_t>(r) * row_vectors + n / kColsPerThread);
            const uint32_t words[kColsPerThread] = {static_cast<uint32_t>(packed.x), static_cast<uint32_t>(packed.y),
                                                    static_cast<uint32_t>(packed.z), static_cast<uint32_t>(packed.w)};
            const float* xr = xs + (r * 8 - k_begin);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float xv = xr[i];
                x_sum += xv;
#pragma unroll
                for (int j = 0; j < kColsPerThread; ++j) {
                    dot[j] = fmaf(xv, nibble(words[j], 4 * i), dot[j]);
                }
            }
        }
        const uint32_t zword = __ldg(qzeros + static_cast<int64_t>(g) * (N / 8) + n / 8);
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
            const float s = to_float(scales[static_cast<int64_t>(g) * N + n + j]);
            const float z = static_cast<float>((zword >> (zero_shift + 4 * j)) & 0xFu);
            acc[j] = fmaf(s, dot[j] - z * x_sum, acc[j]);
        }
    }
    float* out = partial + static_cast<int64_t>(blockIdx.y) * N + n;
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
        out[j] = acc[j];
    }
}

template <typename scalar_t>
const char* launch(const void* x, const void* qweight, const void* qzeros, const void* scales, float* partial,
                   int N, int K, int group_size, int groups_per_split, cudaStream_t stream) {
    const int num_groups = K / group_size;
    const int splits = (num_groups + groups_per_split - 1) / groups_per_split;
    const dim3 grid((N + kColsPerBlock - 1) / kColsPerBlock, splits);
    const size_t shared = static_cast<size_t>(groups_per_split) * group_size * sizeof(float);
    if (shared > 48 * 1024) {
        return "int4_gemv: the K slice (groups_per_split * group_size float32 values of x) does not fit in 48 KiB of shared memory (use more splits)";
    }
    int4_gemv_kernel<scalar_t><<<grid, kThreads, shared, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<const int4*>(qweight), static_cast<const uint32_t*>(qzeros),
        static_cast<const scalar_t*>(scales), partial, N, K, group_size, groups_per_split);
    const cudaError_t error = cudaGetLastError();
    return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

// dtype_code: 1 = float16, 2 = bfloat16 (x and scales). Returns nullptr or an error message.
const char* miniinfer_launch_int4_gemv(const void* x, const void* qweight, const void* qzeros, const void* scales,
                                       float* partial, int64_t N, int64_t K, int64_t group_size,
                                       int64_t groups_per_split, int dtype_code, void* stream) {
    if (N % kColsPerThread != 0 || N % 8 != 0 || group_size % 8 != 0 || K % group_size != 0 || groups_per_split < 1) {
        return "int4_gemv: needs N % 8 == 0, group_size % 8 == 0, K % group_size == 0, groups_per_split >= 1";
    }
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int n = static_cast<int>(N), k = static_cast<int>(K), g = static_cast<int>(group_size);
    const int gs = static_cast<int>(groups_per_split);
    if (dtype_code == 1) {
        return launch<__half>(x, qweight, qzeros, scales, partial, n, k, g, gs, s);
    }
    if (dtype_code == 2) {
        return launch<__nv_bfloat16>(x, qweight, qzeros, scales, partial, n, k, g, gs, s);
    }
    return "int4_gemv: x must be float16 or bfloat16";
}
