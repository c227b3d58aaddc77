// Vector addition: the "hello world" of GPU kernels, in two versions.
//
//   out[i] = x[i] + y[i]   for i in [0, n)
//
// Every element is independent, so the work splits into a 1-D grid of blocks of threads. The
// kernel does one addition per 3 memory accesses (2 reads, 1 write): it is memory-bound, and its
// speed is judged in bytes per second against the card's copy bandwidth, not in FLOP/s.
//
// Pure CUDA (no torch headers): the launcher below is what the binding calls, and CI compiles
// this file on its own with `nvcc -arch=sm_90 -c`.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// One addition per dtype. torch's extension build defines __CUDA_NO_HALF_OPERATORS__ (and the bf16
// equivalent), which removes `+` on __half/__nv_bfloat16, so we call the intrinsics explicitly.
__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ __half add(__half a, __half b) { return __hadd(a, b); }
__device__ __forceinline__ __nv_bfloat16 add(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }

// Version 1: one element per thread. The last block may run past the end, hence the bounds check.
template <typename scalar_t>
__global__ void vector_add_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  scalar_t* __restrict__ out, int64_t n) {
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = add(x[i], y[i]);
    }
}

// Version 2: 16-byte vector loads and a grid-stride loop. Each thread moves 16 bytes per access
// (4 floats, 8 halves), so a warp issues fewer, wider memory transactions; the grid is sized to
// the machine rather than to n, and each thread walks the vector with a stride of the whole grid.
template <typename scalar_t>
__global__ void vector_add_vec16_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                        scalar_t* __restrict__ out, int64_t n) {
    constexpr int kPerVector = 16 / sizeof(scalar_t);
    const int64_t num_vectors = n / kPerVector;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* y4 = reinterpret_cast<const uint4*>(y);
    uint4* out4 = reinterpret_cast<uint4*>(out);
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < num_vectors; v += stride) {
        uint4 a = x4[v];
        uint4 b = y4[v];
        const scalar_t* pa = reinterpret_cast<const scalar_t*>(&a);
        const scalar_t* pb = reinterpret_cast<const scalar_t*>(&b);
        uint4 c;
        scalar_t* pc = reinterpret_cast<scalar_t*>(&c);
#pragma unroll
        for (int k = 0; k < kPerVector; ++k) {
            pc[k] = add(pa[k], pb[k]);
        }
        out4[v] = c;
    }
    // The tail (fewer than kPerVector elements) is handled by the first threads of block 0.
    const int64_t tail_start = num_vectors * kPerVector;
    if (blockIdx.x == 0 && tail_start + threadIdx.x < n) {
        const int64_t i = tail_start + threadIdx.x;
        out[i] = add(x[i], y[i]);
    }
}

template <typename scalar_t>
cudaError_t launch(const void* x, const void* y, void* out, int64_t n, bool vectorized, int num_sms,
                   cudaStream_t stream) {
    const auto* xs = static_cast<const scalar_t*>(x);
    const auto* ys = static_cast<const scalar_t*>(y);
    auto* outs = static_cast<scalar_t*>(out);
    constexpr int kThreads = 256;
    if (n == 0) {
        return cudaSuccess;
    }
    const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (reinterpret_cast<uintptr_t>(y) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(out) % 16 == 0);
    if (vectorized && aligned) {
        constexpr int kPerVector = 16 / sizeof(scalar_t);
        const int64_t num_vectors = n / kPerVector;
        // Enough blocks to fill every SM several times over, never more than there is work for.
        int64_t blocks = (num_vectors + kThreads - 1) / kThreads;
        const int64_t max_blocks = static_cast<int64_t>(num_sms) * 8;
        if (blocks > max_blocks) blocks = max_blocks;
        if (blocks < 1) blocks = 1;
        vector_add_vec16_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xs, ys, outs, n);
    } else {
        const int64_t blocks = (n + kThreads - 1) / kThreads;
        vector_add_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xs, ys, outs, n);
    }
    return cudaGetLastError();
}

}  // namespace

// dtype_code: 0 = float32, 1 = float16, 2 = bfloat16. Returns nullptr on success, else the CUDA
// error string, so that the binding needs no CUDA headers of its own.
const char* miniinfer_launch_vector_add(const void* x, const void* y, void* out, int64_t n, int dtype_code,
                                        bool vectorized, int num_sms, void* stream) {
    auto s = static_cast<cudaStream_t>(stream);
    cudaError_t status;
    switch (dtype_code) {
        case 0: status = launch<float>(x, y, out, n, vectorized, num_sms, s); break;
        case 1: status = launch<__half>(x, y, out, n, vectorized, num_sms, s); break;
        case 2: status = launch<__nv_bfloat16>(x, y, out, n, vectorized, num_sms, s); break;
        default: return "unsupported dtype code";
    }
    return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}
