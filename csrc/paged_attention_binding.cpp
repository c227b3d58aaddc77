// The torch binding of csrc/paged_attention.cu: checks the tensors, allocates the output and the
// split-KV scratch, launches. The CUDA stream comes from Python (torch.cuda.current_stream()), so this
// file needs no CUDA headers.
#include <torch/extension.h>

const char* miniinfer_launch_paged_decode_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                                                    const int* block_tables, const int* seq_lens, float* tmp_out,
                                                    float* tmp_ml, int* counters, int B, int H, int H_kv, int D,
                                                    int P, int max_blocks, int partition_size, int max_seq_len,
                                                    float scale, int dtype_code, void* stream);

namespace {

constexpr int kRows = 16;  // query heads per block in the kernel (the MMA's M)

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// q [B, H, D]; k_cache, v_cache [num_blocks, P, H_kv, D]; block_tables [B, max_blocks] int32;
// seq_lens [B] int32; counters: int32 scratch of >= B * H_kv * ceil(G / 16) zeros, owned by the
// caller and left zero by the kernel. max_seq_len bounds seq_lens (it sizes the grid: no device sync
// here); the kernel clamps larger lengths to it (a caller bug, then, but a memory-safe one).
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                     const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                                     int64_t max_seq_len, int64_t partition_size, const torch::Tensor& counters,
                                     const std::optional<torch::Tensor>& out_opt, int64_t stream) {
    const char* fn = "paged_decode_attention (cuda)";
    TORCH_CHECK(q.dim() == 3, fn, ": q must be [B, H, D], got shape ", q.sizes());
    TORCH_CHECK(k_cache.dim() == 4, fn, ": k_cache must be [num_blocks, P, H_kv, D], got shape ", k_cache.sizes());
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), fn, ": k_cache ", k_cache.sizes(), " and v_cache ",
                v_cache.sizes(), " differ in shape");
    TORCH_CHECK(block_tables.dim() == 2, fn, ": block_tables must be [B, max_blocks], got shape ",
                block_tables.sizes());
    TORCH_CHECK(seq_lens.dim() == 1, fn, ": seq_lens must be [B], got shape ", seq_lens.sizes());
    for (const torch::Tensor* t : {&q, &k_cache, &v_cache, &block_tables, &seq_lens, &counters}) {
        TORCH_CHECK(t->is_cuda(), fn, ": every tensor must be on a CUDA device, got one on ", t->device());
        TORCH_CHECK(t->device() == q.device(), fn, ": tensors on different devices: ", t->device(), " and ",
                    q.device());
        TORCH_CHECK(t->is_contiguous(), fn, ": tensors must be contiguous (got strides ", t->strides(), ")");
    }
    TORCH_CHECK(q.scalar_type() == torch::kFloat16 || q.scalar_type() == torch::kBFloat16, fn,
                ": q must be float16 or bfloat16, got ", q.scalar_type(),
                " (use backend='triton' or 'torch' for float32)");
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), fn,
                ": q, k_cache and v_cache must share one dtype, got ", q.scalar_type(), ", ", k_cache.scalar_type(),
                ", ", v_cache.scalar_type());
    TORCH_CHECK(block_tables.scalar_type() == torch::kInt32, fn, ": block_tables must be int32, got ",
                block_tables.scalar_type());
    TORCH_CHECK(seq_lens.scalar_type() == torch::kInt32, fn, ": seq_lens must be int32, got ", seq_lens.scalar_type());
    TORCH_CHECK(counters.scalar_type() == torch::kInt32, fn, ": counters must be int32, got ", counters.scalar_type());

    const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
    const int64_t P = k_cache.size(1), H_kv = k_cache.size(2);
    TORCH_CHECK(k_cache.size(3) == D, fn, ": head dim of q (", D, ") and of the cache (", k_cache.size(3), ") differ");
    TORCH_CHECK(D == 64 || D == 128, fn, ": head dim D must be 64 or 128, got ", D,
                " (use backend='triton' for other head dims)");
    TORCH_CHECK(H_kv > 0 && H % H_kv == 0, fn, ": query heads H=", H, " must be a multiple of KV heads H_kv=", H_kv);
    TORCH_CHECK(P > 0 && (P & (P - 1)) == 0, fn, ": block size P must be a power of two, got ", P,
                " (use backend='triton')");
    TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, fn, ": batch sizes differ: q ", B,
                ", block_tables ", block_tables.size(0), ", seq_lens ", seq_lens.size(0));
    TORCH_CHECK(partition_size >= 16 && partition_size <= 1024 && (partition_size & (partition_size - 1)) == 0, fn,
                ": partition_size must be a power of two in [16, 1024], got ", partition_size);
    const int64_t max_blocks = block_tables.size(1);
    TORCH_CHECK(max_seq_len >= 1 && max_seq_len <= max_blocks * P && max_seq_len <= INT32_MAX / 2, fn,
                ": max_seq_len=", max_seq_len, " must be in [1, max_blocks * P = ", max_blocks * P, "]");
    TORCH_CHECK(B <= 65535, fn, ": batch ", B, " exceeds the grid's z limit (65535)");
    const int64_t G = H / H_kv;
    const int64_t num_chunks = (G + kRows - 1) / kRows;
    TORCH_CHECK(counters.numel() >= B * H_kv * num_chunks, fn, ": counters holds ", counters.numel(),
                " ints, needs ", B * H_kv * num_chunks);
    TORCH_CHECK(aligned16(q) && aligned16(k_cache) && aligned16(v_cache), fn,
                ": q, k_cache and v_cache must be 16-byte aligned (the kernel reads 16-byte vectors)");
    TORCH_CHECK(k_cache.numel() < (int64_t{1} << 62), fn, ": cache too large");

    torch::Tensor out;
    if (out_opt.has_value()) {  // a caller-owned output (CUDA graphs, tests that poison it first)
        out = *out_opt;
        TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device() &&
                        out.is_contiguous() && aligned16(out),
                    fn, ": out must be a contiguous, 16-byte aligned ", q.sizes(), " ", q.scalar_type(), " tensor on ",
                    q.device(), ", got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
    } else {
        out = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
    }
    if (B == 0 || H == 0) return out;
    const int64_t max_parts = (max_seq_len + partition_size - 1) / partition_size;
    // Partials only exist when a sequence spans several partitions; a 1-element placeholder otherwise.
    const auto f32 = q.options().dtype(torch::kFloat32);
    torch::Tensor tmp_out = torch::empty({max_parts > 1 ? B * H * max_parts * D : 1}, f32);
    torch::Tensor tmp_ml = torch::empty({max_parts > 1 ? B * H * max_parts * 2 : 1}, f32);
    const int dtype_code = q.scalar_type() == torch::kFloat16 ? 1 : 2;
    const char* error = miniinfer_launch_paged_decode_attention(
        out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr<int>(),
        seq_lens.data_ptr<int>(), tmp_out.data_ptr<float>(), tmp_ml.data_ptr<float>(), counters.data_ptr<int>(),
        static_cast<int>(B), static_cast<int>(H), static_cast<int>(H_kv), static_cast<int>(D), static_cast<int>(P),
        static_cast<int>(max_blocks), static_cast<int>(partition_size), static_cast<int>(max_seq_len),
        static_cast<float>(scale), dtype_code, reinterpret_cast<void*>(stream));
    TORCH_CHECK(error == nullptr, fn, ": kernel launch failed: ", error ? error : "");
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("paged_decode_attention", &paged_decode_attention,
          "Paged decode attention (split-KV, tensor cores): q [B, H, D] -> out [B, H, D]", py::arg("q"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"),
          py::arg("max_seq_len"), py::arg("partition_size"), py::arg("counters"), py::arg("out") = py::none(),
          py::arg("stream") = 0);
}
