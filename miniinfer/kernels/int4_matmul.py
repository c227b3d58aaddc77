"""int4 (GPTQ layout) matmul for decode: a torch reference, our Triton kernel, our CUDA GEMV.

    int4_matmul(x [M, K], qweight int32 [K/8, N], qzeros int32 [G, N/8], scales [G, N], group_size)
        -> [M, N] in x's dtype

Layout (what :class:`miniinfer.quant.GroupQuantLinear` and GPTQ checkpoints hold): input k's 4-bit
value for output n is ``(qweight[k // 8, n] >> 4 · (k % 8)) & 15``; group ``g = k // group_size``
has scale ``scales[g, n]`` and zero point ``(qzeros[g, n // 8] >> 4 · (n % 8)) & 15``;
``w[n, k] = scales[g, n] · (q − zero)``.

Backends: ``torch`` dequantizes the whole matrix and calls a dense matmul (any device, the reference);
``triton`` (M any, tuned for 1 … 16; CPU through the interpreter); ``cuda`` (M = 1 … 16, fp16/bf16,
``csrc/int4_gemv.cu``, dequantizing into tensor-core fragments); ``auto``: on a GPU, CUDA up to
M = 16 when it builds, else Triton up to M = 16,
the dequantize + cuBLAS path above; on a CPU, torch.
"""

from __future__ import annotations

import os

import torch

from miniinfer.kernels.build import CudaUnavailableError, cuda_kernels_available, load_cuda_extension

__all__ = ["int4_matmul", "int4_matmul_torch", "int4_matmul_triton", "int4_gemv_cuda", "dequantize_int4",
           "cuda_split", "tile_int4_weight", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton", "cuda")


def _check(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           group_size: int) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"int4_matmul: x must be [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    N = qweight.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[0] * 8 != K:
        raise ValueError(f"int4_matmul: qweight must be int32 [K/8, N] = [{K // 8}, N], got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    G = scales.shape[0]
    if K % group_size or G != K // group_size or scales.shape[1] != N:
        raise ValueError(f"int4_matmul: scales must be [K/group_size, N] = [{K // group_size}, {N}], got "
                         f"{tuple(scales.shape)}")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (G, N // 8) or N % 8:
        raise ValueError(f"int4_matmul: qzeros must be int32 [G, N/8] = [{G}, {N // 8}] (N a multiple of 8), "
                         f"got {qzeros.dtype} {tuple(qzeros.shape)}")
    return M, N, K


def dequantize_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """-> w [K, N] in ``dtype`` (computed in float32, rounded once)."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])  # [K, N]
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & 15).reshape(qzeros.shape[0], -1)    # [G, N]
    z = z.repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z).float() * s).to(dtype)


def int4_matmul_torch(x, qweight, qzeros, scales, group_size):
    _check(x, qweight, qzeros, scales, group_size)
    return x @ dequantize_int4(qweight, qzeros, scales, group_size, x.dtype)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def int4_matmul_triton(x, qweight, qzeros, scales, group_size, *, block_n: int | None = None,
                       block_k: int | None = None, split_k: int | None = None, num_warps: int = 4,
                       num_stages: int | None = None):
    """The Triton kernel (see :mod:`miniinfer.kernels.int4_matmul_triton`). Block sizes and the K split
    default to a rule of thumb: enough (column tile × K slice) programs to fill the GPU twice."""
    from miniinfer.kernels.int4_matmul_triton import int4_matmul_kernel

    M, N, K = _check(x, qweight, qzeros, scales, group_size)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"int4_matmul_triton: x must be float32/float16/bfloat16, got {x.dtype}")
    x = x.contiguous()
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    BLOCK_M = 16
    BLOCK_N = block_n or (128 if N >= 4096 else 64)
    BLOCK_K = block_k or (64 if group_size % 64 == 0 else 32 if group_size % 32 == 0 else 16)
    tiles_n = _cdiv(N, BLOCK_N)
    if split_k is None:
        split_k = max(1, min(_cdiv(2 * _num_sms(x.device), tiles_n), K // (4 * BLOCK_K) or 1))
    k_per_split = _cdiv(_cdiv(K, split_k), BLOCK_K) * BLOCK_K
    split_k = _cdiv(K, k_per_split)
    one_group = group_size % BLOCK_K == 0
    partial = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32)
    grid = (tiles_n, split_k, _cdiv(M, BLOCK_M))
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    int4_matmul_kernel[grid](
        x, qweight, qzeros, scales, partial, M, N, K, group_size,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), partial.stride(0), partial.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, K_TILES=k_per_split // BLOCK_K, ONE_GROUP_PER_TILE=one_group,
        IEEE=x.dtype == torch.float32, **options)
    out = partial[0] if split_k == 1 else partial.sum(dim=0)
    return out.to(x.dtype)


_CUDA_EXTENSION = None


def _cuda_extension():
    global _CUDA_EXTENSION
    if _CUDA_EXTENSION is None:
        _CUDA_EXTENSION = load_cuda_extension("miniinfer_int4_gemv", ("int4_gemv.cu", "int4_gemv_binding.cpp"))
    return _CUDA_EXTENSION


def cuda_supports(x: torch.Tensor, N: int, K: int, group_size: int) -> str | None:
    """Why the CUDA kernel cannot take this call, or None."""
    if not x.is_cuda:
        return "x is not on a CUDA device"
    if not 1 <= x.shape[0] <= CUDA_MAX_M:
        return f"the CUDA kernel takes 1 … {CUDA_MAX_M} rows (decode tokens), got M = {x.shape[0]}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16/bfloat16, got {x.dtype}"
    if N % 8 or group_size % 32 or K % group_size:
        return "the CUDA kernel needs N % 8 == 0 and group_size a multiple of 32 dividing K"
    return None


CUDA_MAX_M = 16       # two n8 token tiles of the tensor-core fragment
CUDA_ROWS_PER_STEP = 4  # packed rows per warp step: a K split is a multiple of it
# The launcher's CTA shapes (csrc/int4_gemv.cu, `launch`): code -> (warps along N, warps along K, steps
# in flight per thread in registers, steps in a shared-memory ring filled by cp.async (0 = no ring: a
# register double buffer; -1: a rolling register queue),
# weights in the tiled layout of :func:`tile_int4_weight`). A CTA covers 32 · warps-along-N columns.
CUDA_SHAPES = {0: (1, 8, 4, 0, False), 1: (2, 4, 4, 0, False), 2: (4, 2, 4, 0, False), 3: (8, 1, 4, 0, False),
               4: (4, 2, 8, 0, False), 5: (8, 1, 8, 0, False), 6: (4, 1, 8, 0, False), 7: (1, 8, 8, 0, False),
               8: (1, 8, 1, 8, False), 9: (1, 8, 1, 12, False), 10: (1, 4, 1, 16, False), 11: (2, 4, 1, 8, False),
               12: (1, 8, 1, 5, False), 13: (1, 8, 4, 0, True), 14: (1, 8, 8, 0, True), 15: (1, 4, 4, 0, True),
               16: (1, 8, 1, 5, True), 17: (1, 8, 1, 8, True), 18: (1, 8, 8, -1, False), 19: (1, 8, 8, -1, True),
               20: (1, 4, 8, -1, True), 21: (1, 8, 6, -1, True), 22: (1, 4, 12, -1, True)}


def tile_int4_weight(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ's qweight [K/8, N] -> the same words in the CUDA kernel's tiled order (same shape and dtype).

    The kernel's warp step reads packed rows 4s … 4s+3 of a 32-column block, lane (g, t) the 4 words of
    row 4s+t, columns 4g … 4g+3 (one 16-byte vector). In GPTQ's row-major layout those 4 rows lie N·4
    bytes apart; tiled, each block's steps follow each other, a step's 32 vectors in lane order, so a
    warp streams one contiguous run of memory. Needs K % 32 == 0 and N % 32 == 0."""
    rows, N = qweight.shape
    if rows % 4 or N % 32:
        raise ValueError(f"tile_int4_weight: needs K % 32 == 0 and N % 32 == 0, got qweight {tuple(qweight.shape)}")
    words = qweight.view(rows // 4, 4, N // 32, 8, 4)              # (step, t, column block, g, word)
    return words.permute(2, 0, 3, 1, 4).contiguous().view(rows, N)  # (column block, step, g, t, word)


# The shape calls use unless they name one. MINIINFER_INT4_CUDA_SHAPE overrides it for tuning runs (a code
# whose weights are in GPTQ's layout: callers pass that layout).
CUDA_DEFAULT_SHAPE = int(os.environ.get("MINIINFER_INT4_CUDA_SHAPE", "0"))
# Programmatic dependent launch (Hopper): each call may start streaming its weights while the previous
# kernel on the stream finishes (csrc/int4_gemv.cu, pdl_wait). MINIINFER_INT4_PDL=0 or 1 overrides the default.
CUDA_PDL = os.environ.get("MINIINFER_INT4_PDL", "0") == "1"
if CUDA_DEFAULT_SHAPE not in CUDA_SHAPES or CUDA_SHAPES[CUDA_DEFAULT_SHAPE][4]:
    raise ValueError(f"MINIINFER_INT4_CUDA_SHAPE={CUDA_DEFAULT_SHAPE}: not a shape code of GPTQ-layout weights")


def cuda_split(N: int, K: int, num_sms: int, split_k: int | None = None, shape: int = CUDA_DEFAULT_SHAPE
               ) -> tuple[int, int]:
    """-> (rows_per_split, split_k) for the CUDA kernel: how many packed rows (8 inputs each) of K one CTA
    reads. ``split_k`` None: no split while the column tiles alone give every SM work (a split costs a
    float32 round trip and the last CTA's sum), except one per ~1024 packed rows, so that a long K is not
    one warp's latency chain; with fewer tiles than half the SMs, enough splits to fill them. Measured on
    an H200 (scripts/gpu/int4_shapes.py): split 1 was fastest for 8192², 3584 × 4608, 3584², 3584 ×
    37888 and split 2 for 18944 × 3584 (K = 18944), at M = 1. Lowered so that no slice is empty."""
    rows = K // 8
    step = CUDA_ROWS_PER_STEP
    tiles = _cdiv(N, 32 * CUDA_SHAPES[shape][0])
    if split_k is None:
        split_k = max(1, rows // 1024)
        if 2 * tiles < num_sms:
            split_k = max(split_k, min(_cdiv(num_sms, tiles), rows // 64))
    split_k = max(1, min(split_k, _cdiv(rows, step)))
    rows_per_split = _cdiv(_cdiv(rows, split_k), step) * step
    return rows_per_split, _cdiv(rows, rows_per_split)


_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The per-tile tickets of a split-K launch: zeroed once, and every launch leaves them zero (the last
    CTA of a tile resets its ticket), so one buffer per device serves every layer and CUDA graph replays.
    Launches on two streams at once would share tickets: the engine runs one stream."""
    counters = _SPLIT_COUNTERS.get(device)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _SPLIT_COUNTERS[device] = counters
    return counters


def _aligned(t: torch.Tensor, bytes_: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % bytes_ == 0 else t.clone()


def int4_gemv_cuda(x, qweight, qzeros, scales, group_size, *, split_k: int | None = None,
                   shape: int = CUDA_DEFAULT_SHAPE, pdl: bool | None = None):
    """Our CUDA kernel (``csrc/int4_gemv.cu``, tensor cores): x [M ≤ 16, K] fp16/bf16 -> [M, N].
    ``shape``: the launcher's CTA shape code (:data:`CUDA_SHAPES`). ``pdl``: launch as a programmatic
    dependent of the stream's previous kernel (sm_90+; None: :data:`CUDA_PDL`; ignored below sm_90)."""
    M, N, K = _check(x, qweight, qzeros, scales, group_size)
    why = cuda_supports(x, N, K, group_size)
    if why:
        raise ValueError(f"int4_gemv_cuda: {why}")
    if scales.dtype != x.dtype:
        raise ValueError(f"int4_gemv_cuda: scales ({scales.dtype}) must have x's dtype ({x.dtype})")
    if shape not in CUDA_SHAPES:
        raise ValueError(f"int4_gemv_cuda: shape must be one of {sorted(CUDA_SHAPES)}, got {shape!r}")
    rows_per_split, split_k = cuda_split(N, K, _num_sms(x.device), split_k, shape)
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if split_k > 1:
        partial = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32)
        counters = _split_counters(x.device, _cdiv(N, 32))
    else:
        partial = counters = None
    # 16-byte vector loads of x and the weights, 8-byte loads of 4 scales: the pointers must allow them.
    _cuda_extension().int4_gemv(_aligned(x, 16), _aligned(qweight, 16), qzeros.contiguous(), _aligned(scales, 8),
                                out, partial, counters, group_size, rows_per_split,
                                torch.cuda.current_stream(x.device).cuda_stream, shape,
                                bool(CUDA_PDL if pdl is None else pdl) and _supports_pdl(x.device))
    return out


def _supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 (Hopper) or newer."""
    return torch.cuda.get_device_capability(device)[0] >= 9


_warned_cuda_failure = False


def _warn_cuda_failure(error: Exception) -> None:
    """The CUDA GEMV failed to build or launch: say so once, and let ``auto`` stop choosing it."""
    global _warned_cuda_failure
    import warnings

    _warned_cuda_failure = True
    warnings.warn(f"int4 CUDA GEMV unavailable ({type(error).__name__}: {error}); using the Triton kernel",
                  stacklevel=3)


def _pick(x: torch.Tensor, N: int, K: int, group_size: int) -> str:
    if not x.is_cuda:
        return "torch"
    if cuda_supports(x, N, K, group_size) is None and not _warned_cuda_failure and cuda_kernels_available():
        return "cuda"
    return "triton" if x.shape[0] <= 16 else "torch"


def int4_matmul(x, qweight, qzeros, scales, group_size, backend: str = "auto"):
    """x [M, K] @ the int4 weight -> [M, N] (see the module docstring for the layout and backends)."""
    if backend not in BACKENDS:
        raise ValueError(f"int4_matmul: backend must be one of {BACKENDS}, got {backend!r}")
    M, N, K = _check(x, qweight, qzeros, scales, group_size)
    automatic = backend == "auto"
    if automatic:
        backend = _pick(x, N, K, group_size)
    if backend == "cuda":
        if not automatic:  # asked for by name: its errors are the caller's to see
            return int4_gemv_cuda(x, qweight, qzeros, scales, group_size)
        try:
            return int4_gemv_cuda(x, qweight, qzeros, scales, group_size)
        except Exception as error:  # noqa: BLE001 - no toolchain, a failed JIT build: Triton takes over
            if not isinstance(error, CudaUnavailableError):
                _warn_cuda_failure(error)
            backend = "triton" if M <= 16 else "torch"
    if backend == "triton":
        return int4_matmul_triton(x, qweight, qzeros, scales, group_size)
    return int4_matmul_torch(x, qweight, qzeros, scales, group_size)
