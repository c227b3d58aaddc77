"""Engine options, validated up front (a bad value raises ValueError naming the option)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from miniinfer.engine.attention_backends import ATTENTION_BACKENDS, PREFILL_KERNELS


@dataclass
class EngineConfig:
    max_num_seqs: int = 256                 # sequences in one step, at most
    max_num_batched_tokens: int | None = None  # tokens in one step (default: 2048 on CPU, 8192 on GPU, ≥ max_model_len without chunking)
    max_model_len: int | None = None        # context limit (default: the model's max_position_embeddings)
    block_size: int = 16                    # tokens per KV block (P)
    num_kv_blocks: int | None = None        # size of the KV pool (default: from memory)
    enable_prefix_caching: bool = True      # radix cache of earlier prompts' KV blocks
    enable_chunked_prefill: bool = True     # split long prompts over several steps
    attention_backend: str = "auto"         # paged attention: auto | torch (reference) | sdpa (gather + torch SDPA;
                                            # auto's choice on a CPU) | triton | cuda | components (auto picks
                                            # "components" when the model has a custom attention; on a GPU,
                                            # the faster of triton and cuda, measured at start-up)
    prefill_kernel: str = "auto"            # the triton/cuda backends' prefill: auto (checked, then measured at
                                            # start-up) | paged_triton | flash_triton | flash_cuda | flash_attn
    gpu_memory_utilization: float = 0.9     # fraction of the GPU's memory the engine may fill
    cpu_kv_cache_gib: float = 0.5           # KV pool budget on the CPU when num_kv_blocks is not given
    enable_cuda_graphs: bool = True         # replay decode steps as CUDA graphs (GPU only), captured at start-up
    enforce_eager: bool = False             # vLLM's name for the opposite: never use CUDA graphs
    enable_fused_kernels: bool = True       # fused Triton norm/RoPE/SwiGLU kernels on a GPU (default components only)
    cpu_packed_weights: bool | str = "auto"  # CPU float32: steps run the model's forward on oneDNN-prepacked
                                            # weights (miniinfer.engine.packed_forward; default components only);
                                            # False: the model's own forward (F.linear/MKL); "auto": the faster of
                                            # the two for this model on this CPU, measured once at start-up
    seed: int | None = None                 # seeds the random streams of requests that have no seed of their own
    # Speculative decoding (miniinfer.speculative): None (off) | a draft checkpoint folder (same vocabulary) |
    # "ngram" (prompt lookup) | "self" (the target's first layers); guesses per step: an int or "auto"
    # (adaptive, from the running acceptance rate and the measured draft/target cost)
    speculative_model: str | None = None
    num_speculative_tokens: int | str = 4
    speculative_tree: int | None = None     # token trees of this width (draft model; CPU backends torch/sdpa)

    def __post_init__(self) -> None:
        def positive_int(name: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        positive_int("max_num_seqs", self.max_num_seqs)
        positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        positive_int("max_model_len", self.max_model_len, allow_none=True)
        positive_int("block_size", self.block_size)
        positive_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enable_cuda_graphs", "enforce_eager",
                     "enable_fused_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.cpu_packed_weights, bool) or (isinstance(self.cpu_packed_weights, str)
                                                              and self.cpu_packed_weights == "auto")):
            raise ValueError(f"cpu_packed_weights must be True, False or 'auto', got {self.cpu_packed_weights!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.prefill_kernel not in PREFILL_KERNELS:
            raise ValueError(f"prefill_kernel must be one of {PREFILL_KERNELS}, got {self.prefill_kernel!r}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.speculative_model is not None and not isinstance(self.speculative_model, (str, Path)):
            raise ValueError(f"speculative_model must be None, a checkpoint path, 'ngram' or 'self', "
                             f"got {self.speculative_model!r}")
        if self.num_speculative_tokens != "auto" and (isinstance(self.num_speculative_tokens, bool)
                                                      or not isinstance(self.num_speculative_tokens, int)
                                                      or not 1 <= self.num_speculative_tokens <= 64):
            raise ValueError(f"num_speculative_tokens must be an integer in 1 … 64 or 'auto', "
                             f"got {self.num_speculative_tokens!r}")
        if self.speculative_tree is not None and (isinstance(self.speculative_tree, bool)
                                                  or not isinstance(self.speculative_tree, int)
                                                  or not 2 <= self.speculative_tree <= 8):
            raise ValueError(f"speculative_tree must be None or a tree width in 2 … 8, got {self.speculative_tree!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if not (self.cpu_kv_cache_gib > 0):
            raise ValueError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib!r}")
