// The torch binding of csrc/flash_attention.cu: checks the tensors (shapes, dtypes, devices, strides,
// 16-byte alignment for cp.async), allocates the output, launches. The CUDA stream comes from Python
// (torch.cuda.current_stream()), so this file needs no CUDA headers. No tensor VALUES are read here
// (that would synchronise with the GPU): max_seqlen_q, a bound of the query lengths, sizes the grid.
#include <torch/extension.h>

const char* miniinfer_launch_flash_attention(void* out, const void* q, const void* k, const void* v,
                                             const int* cu_seqlens_q, const int* cu_seqlens_k,
                                             const int* block_table, const int* seq_lens, const int64_t* strides,
                                             int B, int H, int H_kv, int D, int P, int max_blocks, int max_seqlen_q,
                                             bool causal, float scale, int dtype_code, void* stream);

namespace {

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Rows of 16-bit elements are copied in 16-byte pieces: every stride but the last must be a multiple of
// 8 elements, the last 1.
bool rows_aligned(const torch::Tensor& t) {
    if (t.stride(-1) != 1) return false;
    for (int64_t d = 0; d + 1 < t.dim(); ++d) {
        if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
    }
    return aligned16(t);
}

void check_int_vector(const char* fn, const char* name, const torch::Tensor& t, int64_t length,
                      const torch::Tensor& q) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == length, fn, ": ", name, " must be [", length, "], got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == torch::kInt32, fn, ": ", name, " must be int32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), fn, ": ", name, " is on ", t.device(), ", q on ", q.device());
    TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// q [T, H, D]; dense: k, v [S_total, H_kv, D] + cu_seqlens_k [B + 1]; paged: k, v [num_blocks, P, H_kv, D]
// + block_table [B, M] + seq_lens [B]. cu_seqlens_q [B + 1]. All integer tensors int32.
torch::Tensor flash_attention_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& cu_seqlens_q,
                                      const std::optional<torch::Tensor>& cu_seqlens_k,
                                      const std::optional<torch::Tensor>& block_table,
                                      const std::optional<torch::Tensor>& seq_lens, bool causal, double scale,
                                      int64_t max_seqlen_q, const std::optional<torch::Tensor>& out_opt,
                                      int64_t stream) {
    const char* fn = "flash_attention (cuda)";
    TORCH_CHECK(q.dim() == 3, fn, ": q must be [T, H, D], got shape ", q.sizes());
    TORCH_CHECK(k.sizes() == v.sizes(), fn, ": k ", k.sizes(), " and v ", v.sizes(), " differ in shape");
    for (const torch::Tensor* t : {&q, &k, &v}) {
        TORCH_CHECK(t->is_cuda(), fn, ": q, k, v must be CUDA tensors, got one on ", t->device());
        TORCH_CHECK(t->device() == q.device(), fn, ": tensors on different devices: ", t->device(), " and ",
                    q.device());
    }
    TORCH_CHECK(q.scalar_type() == torch::kFloat16 || q.scalar_type() == torch::kBFloat16, fn,
                ": q must be float16 or bfloat16, got ", q.scalar_type(), " (use backend='triton' or 'torch')");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
                ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
    const bool paged = block_table.has_value();
    TORCH_CHECK(paged == seq_lens.has_value(), fn, ": paged K/V needs both block_table and seq_lens");
    TORCH_CHECK(paged != cu_seqlens_k.has_value(), fn,
                ": give cu_seqlens_k (packed K/V) or block_table + seq_lens (paged), exactly one");
    TORCH_CHECK(k.dim() == (paged ? 4 : 3), fn, ": k, v must be ",
                paged ? "[num_blocks, P, H_kv, D] (paged)" : "[S_total, H_kv, D] (packed)", ", got shape ", k.sizes());

    const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
    const int64_t H_kv = k.size(-2);
    const int64_t B = cu_seqlens_q.numel() - 1;
    TORCH_CHECK(B >= 1, fn, ": cu_seqlens_q must hold B + 1 >= 2 offsets, got shape ", cu_seqlens_q.sizes());
    check_int_vector(fn, "cu_seqlens_q", cu_seqlens_q, B + 1, q);
    TORCH_CHECK(k.size(-1) == D, fn, ": head dim of q (", D, ") and of k, v (", k.size(-1), ") differ");
    TORCH_CHECK(D == 64 || D == 128, fn, ": head dim D must be 64 or 128, got ", D, " (use backend='triton')");
    TORCH_CHECK(H_kv > 0 && H % H_kv == 0, fn, ": query heads H=", H, " must be a multiple of KV heads H_kv=", H_kv);
    TORCH_CHECK(rows_aligned(q) && rows_aligned(k) && rows_aligned(v), fn,
                ": q, k, v need a contiguous last dim, other strides multiple of 8 elements and 16-byte aligned "
                "storage (the kernel copies 16-byte pieces); got strides ", q.strides(), ", ", k.strides(), ", ",
                v.strides());
    TORCH_CHECK(B <= 65535, fn, ": batch ", B, " exceeds the grid's y limit (65535)");
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= INT32_MAX, fn, ": max_seqlen_q out of range: ", max_seqlen_q);

    int64_t P = 1, max_blocks = 0;
    const int* table_ptr = nullptr;
    const int* lens_ptr = nullptr;
    const int* cu_k_ptr = nullptr;
    int64_t stride_bt = 0;
    if (paged) {
        const torch::Tensor& table = *block_table;
        P = k.size(1);
        TORCH_CHECK(P > 0 && (P & (P - 1)) == 0, fn, ": page size P must be a power of two, got ", P);
        TORCH_CHECK(table.dim() == 2 && table.size(0) == B, fn, ": block_table must be [B=", B, ", M], got shape ",
                    table.sizes());
        TORCH_CHECK(table.scalar_type() == torch::kInt32, fn, ": block_table must be int32, got ", table.scalar_type());
        TORCH_CHECK(table.device() == q.device(), fn, ": block_table is on ", table.device(), ", q on ", q.device());
        TORCH_CHECK(table.size(1) == 0 || table.stride(1) == 1, fn, ": block_table rows must be contiguous");
        TORCH_CHECK(table.size(1) * P <= INT32_MAX, fn, ": block_table too wide");
        check_int_vector(fn, "seq_lens", *seq_lens, B, q);
        max_blocks = table.size(1);
        stride_bt = table.stride(0);
        table_ptr = table.data_ptr<int>();
        lens_ptr = seq_lens->data_ptr<int>();
    } else {
        check_int_vector(fn, "cu_seqlens_k", *cu_seqlens_k, B + 1, q);
        cu_k_ptr = cu_seqlens_k->data_ptr<int>();
    }

    torch::Tensor out;
    if (out_opt.has_value()) {  // a caller-owned output (CUDA graphs, tests that poison it first)
        out = *out_opt;
        TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device() &&
                        rows_aligned(out),
                    fn, ": out must be a ", q.sizes(), " ", q.scalar_type(), " tensor on ", q.device(),
                    " with a contiguous last dim and 16-byte aligned rows, got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
    } else {
        out = torch::empty(q.sizes(), q.options().memory_format(torch::MemoryFormat::Contiguous));
    }
    if (T == 0 || H == 0 || max_seqlen_q == 0) {
        if (T > 0) out.zero_();  // no query is covered by the grid: define the output anyway
        return out;
    }
    const int64_t strides[11] = {
        q.stride(0),   q.stride(1),                                    // q (token, head)
        paged ? k.stride(0) : 0, k.stride(-3), k.stride(-2),           // k (block, token, head)
        paged ? v.stride(0) : 0, v.stride(-3), v.stride(-2),           // v (block, token, head)
        out.stride(0), out.stride(1),                                  // out (token, head)
        stride_bt,                                                     // block_table (row)
    };
    const int dtype_code = q.scalar_type() == torch::kFloat16 ? 1 : 2;
    const char* error = miniinfer_launch_flash_attention(
        out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cu_seqlens_q.data_ptr<int>(), cu_k_ptr, table_ptr,
        lens_ptr, strides, static_cast<int>(B), static_cast<int>(H), static_cast<int>(H_kv), static_cast<int>(D),
        static_cast<int>(P), static_cast<int>(max_blocks), static_cast<int>(max_seqlen_q), causal,
        static_cast<float>(scale), dtype_code, reinterpret_cast<void*>(stream));
    TORCH_CHECK(error == nullptr, fn, ": kernel launch failed: ", error ? error : "");
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("flash_attention_forward", &flash_attention_forward,
          "Flash attention forward (mma.sync, ldmatrix, cp.async): packed q [T, H, D] over packed or paged K/V "
          "-> out [T, H, D]",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k") = py::none(),
          py::arg("block_table") = py::none(), py::arg("seq_lens") = py::none(), py::arg("causal") = true,
          py::arg("scale") = 1.0, py::arg("max_seqlen_q") = 0, py::arg("out") = py::none(), py::arg("stream") = 0);
}
