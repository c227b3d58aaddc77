// The torch binding of csrc/int4_gemv.cu: checks the tensors, launches on the caller's stream.
#include <torch/extension.h>

const char* miniinfer_launch_int4_gemv(const void* x, const void* qweight, const void* qzeros, const void* scales,
                                       float* partial, int64_t N, int64_t K, int64_t group_size,
                                       int64_t groups_per_split, int dtype_code, void* stream);

namespace {

// x [1, K] or [K]; qweight int32 [K/8, N]; qzeros int32 [G, N/8]; scales [G, N] (x's dtype);
// partial float32 [splits, N], written in full. `stream` is torch.cuda.current_stream().cuda_stream.
void int4_gemv(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& qzeros,
               const torch::Tensor& scales, const torch::Tensor& partial, int64_t group_size, int64_t groups_per_split,
               int64_t stream) {
    for (const torch::Tensor* t : {&x, &qweight, &qzeros, &scales, &partial}) {
        TORCH_CHECK(t->is_cuda() && t->is_contiguous(), "int4_gemv: every tensor must be a contiguous CUDA tensor");
        TORCH_CHECK(t->device() == x.device(), "int4_gemv: tensors on different devices");
    }
    TORCH_CHECK(qweight.scalar_type() == torch::kInt32 && qzeros.scalar_type() == torch::kInt32,
                "int4_gemv: qweight and qzeros must be int32");
    TORCH_CHECK(partial.scalar_type() == torch::kFloat32, "int4_gemv: partial must be float32");
    TORCH_CHECK(scales.scalar_type() == x.scalar_type(), "int4_gemv: scales must have x's dtype");
    const int64_t K = x.numel();
    const int64_t N = qweight.size(1);
    TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) * 8 == K, "int4_gemv: qweight must be [K/8, N]");
    TORCH_CHECK(group_size > 0 && K % group_size == 0, "int4_gemv: group_size must divide K");
    const int64_t G = K / group_size;
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == G && scales.size(1) == N, "int4_gemv: scales must be [G, N]");
    TORCH_CHECK(qzeros.dim() == 2 && qzeros.size(0) == G && qzeros.size(1) * 8 == N, "int4_gemv: qzeros must be [G, N/8]");
    const int64_t splits = (G + groups_per_split - 1) / groups_per_split;
    TORCH_CHECK(partial.dim() == 2 && partial.size(0) == splits && partial.size(1) == N,
                "int4_gemv: partial must be [ceil(G / groups_per_split), N]");
    int dtype_code = 0;
    if (x.scalar_type() == torch::kFloat16) {
        dtype_code = 1;
    } else if (x.scalar_type() == torch::kBFloat16) {
        dtype_code = 2;
    } else {
        TORCH_CHECK(false, "int4_gemv: x must be float16 or bfloat16, got ", x.scalar_type());
    }
    const char* error = miniinfer_launch_int4_gemv(x.data_ptr(), qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(),
                                                   partial.data_ptr<float>(), N, K, group_size, groups_per_split,
                                                   dtype_code, reinterpret_cast<void*>(stream));
    TORCH_CHECK(error == nullptr, "int4_gemv launch failed: ", error ? error : "");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("int4_gemv", &int4_gemv, "int4 GEMV, GPTQ layout, float32 partial sums per K slice (CUDA)",
          py::arg("x"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("partial"),
          py::arg("group_size"), py::arg("groups_per_split"), py::arg("stream") = 0);
}
