// The torch binding of csrc/int4_gemv.cu: checks the tensors, launches on the caller's stream.
#include <torch/extension.h>

#include <optional>

const char* miniinfer_launch_int4_gemv(const void* x, const void* qweight, const void* qzeros, const void* scales,
                                       void* out, float* partial, int* counters, int64_t M, int64_t N, int64_t K,
                                       int64_t group_size, int64_t rows_per_split, int dtype_code, int shape,
                                       int pdl, void* stream);

namespace {

// x [M, K] (M <= 16); qweight int32 [K/8, N]; qzeros int32 [G, N/8]; scales [G, N] (x's dtype); out [M, N]
// (x's dtype), written in full. partial float32 [splits, M, N] and counters int32 [>= N/32] (all zero) only
// when rows_per_split < K/8. `stream` is torch.cuda.current_stream().cuda_stream. `shape`: the CTA shape
// code of the launcher (0: the default). `pdl`: launch as a programmatic dependent launch (sm_90+): the kernel
// starts streaming its weights while the previous kernel on the stream finishes.
void int4_gemv(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& qzeros,
               const torch::Tensor& scales, const torch::Tensor& out, const std::optional<torch::Tensor>& partial,
               const std::optional<torch::Tensor>& counters, int64_t group_size, int64_t rows_per_split,
               int64_t stream, int64_t shape, bool pdl) {
    for (const torch::Tensor* t : {&x, &qweight, &qzeros, &scales, &out}) {
        TORCH_CHECK(t->is_cuda() && t->is_contiguous(), "int4_gemv: every tensor must be a contiguous CUDA tensor");
        TORCH_CHECK(t->device() == x.device(), "int4_gemv: tensors on different devices");
    }
    TORCH_CHECK(qweight.scalar_type() == torch::kInt32 && qzeros.scalar_type() == torch::kInt32,
                "int4_gemv: qweight and qzeros must be int32");
    TORCH_CHECK(scales.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
                "int4_gemv: scales and out must have x's dtype");
    TORCH_CHECK(x.dim() == 2, "int4_gemv: x must be [M, K]");
    const int64_t M = x.size(0), K = x.size(1);
    const int64_t N = qweight.size(1);
    TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) * 8 == K, "int4_gemv: qweight must be [K/8, N]");
    TORCH_CHECK(group_size > 0 && K % group_size == 0, "int4_gemv: group_size must divide K");
    const int64_t G = K / group_size;
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == G && scales.size(1) == N, "int4_gemv: scales must be [G, N]");
    TORCH_CHECK(qzeros.dim() == 2 && qzeros.size(0) == G && qzeros.size(1) * 8 == N, "int4_gemv: qzeros must be [G, N/8]");
    TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N, "int4_gemv: out must be [M, N]");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(scales.data_ptr()) % 8 == 0,
                "int4_gemv: x and qweight must be 16-byte aligned, scales 8-byte aligned");
    TORCH_CHECK(rows_per_split > 0, "int4_gemv: rows_per_split must be positive");
    const int64_t splits = (K / 8 + rows_per_split - 1) / rows_per_split;
    float* partial_ptr = nullptr;
    int* counters_ptr = nullptr;
    if (splits > 1) {
        TORCH_CHECK(partial.has_value() && counters.has_value(), "int4_gemv: a split K needs partial and counters");
        TORCH_CHECK(partial->is_cuda() && partial->is_contiguous() && partial->scalar_type() == torch::kFloat32 &&
                        partial->device() == x.device() && partial->dim() == 3 && partial->size(0) == splits &&
                        partial->size(1) == M && partial->size(2) == N,
                    "int4_gemv: partial must be a contiguous float32 CUDA tensor [splits, M, N]");
        TORCH_CHECK(counters->is_cuda() && counters->is_contiguous() && counters->scalar_type() == torch::kInt32 &&
                        counters->device() == x.device() && counters->numel() >= (N + 31) / 32,
                    "int4_gemv: counters must be a contiguous int32 CUDA tensor of at least N/32 zeros");
        partial_ptr = partial->data_ptr<float>();
        counters_ptr = counters->data_ptr<int>();
    }
    int dtype_code = 0;
    if (x.scalar_type() == torch::kFloat16) {
        dtype_code = 1;
    } else if (x.scalar_type() == torch::kBFloat16) {
        dtype_code = 2;
    } else {
        TORCH_CHECK(false, "int4_gemv: x must be float16 or bfloat16, got ", x.scalar_type());
    }
    const char* error = miniinfer_launch_int4_gemv(x.data_ptr(), qweight.data_ptr(), qzeros.data_ptr(),
                                                   scales.data_ptr(), out.data_ptr(), partial_ptr, counters_ptr, M, N,
                                                   K, group_size, rows_per_split, dtype_code,
                                                   static_cast<int>(shape), pdl ? 1 : 0,
                                                   reinterpret_cast<void*>(stream));
    TORCH_CHECK(error == nullptr, "int4_gemv launch failed: ", error ? error : "");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("int4_gemv", &int4_gemv, "int4 x fp16/bf16 matmul for M <= 16 tokens, GPTQ layout, tensor cores (CUDA)",
          py::arg("x"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("out"), py::arg("partial"),
          py::arg("counters"), py::arg("group_size"), py::arg("rows_per_split"), py::arg("stream") = 0, py::arg("shape") = 0,
          py::arg("pdl") = false);
}
