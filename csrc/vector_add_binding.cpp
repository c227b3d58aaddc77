// The torch binding of csrc/vector_add.cu: checks the tensors, allocates the output, launches.
#include <torch/extension.h>

const char* miniinfer_launch_vector_add(const void* x, const void* y, void* out, int64_t n, int dtype_code,
                                        bool vectorized, int num_sms, void* stream);

namespace {

int dtype_code(const torch::Tensor& t) {
    switch (t.scalar_type()) {
        case torch::kFloat32: return 0;
        case torch::kFloat16: return 1;
        case torch::kBFloat16: return 2;
        default: TORCH_CHECK(false, "vector_add supports float32, float16 and bfloat16, got ", t.scalar_type());
    }
    return -1;
}

// `stream` is torch.cuda.current_stream().cuda_stream, passed from Python so that this file needs no
// CUDA headers; `num_sms` sizes the grid of the vectorized kernel.
torch::Tensor vector_add(const torch::Tensor& x, const torch::Tensor& y, bool vectorized, int64_t num_sms,
                         int64_t stream) {
    TORCH_CHECK(x.is_cuda() && y.is_cuda(), "vector_add: both inputs must be CUDA tensors");
    TORCH_CHECK(x.device() == y.device(), "vector_add: inputs are on different devices: ", x.device(), " and ", y.device());
    TORCH_CHECK(x.sizes() == y.sizes(), "vector_add: shapes differ: ", x.sizes(), " and ", y.sizes());
    TORCH_CHECK(x.scalar_type() == y.scalar_type(), "vector_add: dtypes differ: ", x.scalar_type(), " and ", y.scalar_type());
    const torch::Tensor xc = x.contiguous();
    const torch::Tensor yc = y.contiguous();
    torch::Tensor out = torch::empty_like(xc);
    const char* error = miniinfer_launch_vector_add(xc.data_ptr(), yc.data_ptr(), out.data_ptr(), xc.numel(),
                                                    dtype_code(xc), vectorized, static_cast<int>(num_sms),
                                                    reinterpret_cast<void*>(stream));
    TORCH_CHECK(error == nullptr, "vector_add kernel launch failed: ", error ? error : "");
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("vector_add", &vector_add, "out = x + y (CUDA)", py::arg("x"), py::arg("y"), py::arg("vectorized") = true,
          py::arg("num_sms") = 132, py::arg("stream") = 0);
}
