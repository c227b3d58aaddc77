"""The model configuration, read from a Hugging Face ``config.json``, with clear refusals for what we don't run."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["Qwen2Config", "UnsupportedModelError"]

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


class UnsupportedModelError(ValueError):
    """The checkpoint is a model (or uses a feature) that MiniInfer does not implement."""


@dataclass
class Qwen2Config:
    """Hyper-parameters of a Qwen2 / Qwen2.5 decoder (field names as in HF ``config.json``)."""

    vocab_size: int
    hidden_size: int  # E
    intermediate_size: int  # I
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # H_kv (H_kv == H: multi-head, 1: multi-query, between: grouped-query)
    head_dim: int  # D (HF default E // H)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Qwen2 puts a bias on the q, k and v projections (not on o_proj): HF's Qwen2 code hard-codes it,
    # whatever config.json says, so we do too.
    attention_bias: bool = True
    torch_dtype: str | None = None  # the dtype the weights were saved in ("bfloat16", "float32", ...)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        """H·D: width of the query projection."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """H_kv·D: width of the key (and of the value) projection."""
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> Qwen2Config:
        """Build from a parsed HF ``config.json``; raise :class:`UnsupportedModelError` for what we can't honour."""
        architectures = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type != "qwen2" or any(a not in SUPPORTED_ARCHITECTURES for a in architectures):
            found = ", ".join(architectures) or "none listed"
            raise UnsupportedModelError(
                f"{source}: unsupported architecture (architectures: {found}; model_type: {model_type!r}). "
                f"MiniInfer runs {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints (Qwen2, Qwen2.5)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"{source} lacks required fields: {', '.join(missing)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")

        # Rope: old configs say rope_theta + rope_scaling, transformers>=5 writes rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling")
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if scaling:
            rope_type = scaling.get("rope_type") or scaling.get("type") or rope_type
        if rope_type != "default":
            raise UnsupportedModelError(
                f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE); remove rope_scaling "
                "to run the model at its original context length")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

        # Sliding-window attention: Qwen2.5 ships use_sliding_window: false (every layer full), fine.
        num_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types")
        if layer_types is None:
            sliding = hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None
            first_sliding = hf.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if sliding and i >= first_sliding else "full_attention"
                           for i in range(num_layers)]
        if any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(
                f"{source}: sliding-window attention is not supported (layer_types: {sorted(set(layer_types))}; "
                f"use_sliding_window: {hf.get('use_sliding_window')})")

        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True,
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> Qwen2Config:
        """Read ``folder/config.json``."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}: a model folder needs config.json next to "
                                    "its *.safetensors files")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(hf, source=str(path))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
