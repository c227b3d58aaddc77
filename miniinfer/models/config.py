"""The model configuration, read from a Hugging Face ``config.json``, with clear refusals for what we don't run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["Qwen2Config", "UnsupportedModelError", "MAX_POSITION_EMBEDDINGS", "SUPPORTED_ARCHITECTURES",
           "MODEL_TYPES"]

# Architecture (config.json ``architectures``) -> its ``model_type``. One decoder runs them all (see
# miniinfer.models.qwen2): Llama and Qwen3 differ from Qwen2 by a few switches read from the config below.
MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)
# RoPE scaling types we implement, and the fields each needs besides rope_type.
ROPE_SCALING_FIELDS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                  "original_max_position_embeddings")}
# The longest context a config may declare without an explicit ``max_model_len``. The model builds its RoPE
# tables for every declared position ([positions, D/2] float32, twice: 2 GiB at 2**22 with D = 128), so a
# typo such as 10**9 must be refused, not allocated. Real Qwen2.5 configs say 32768 to 1010000.
MAX_POSITION_EMBEDDINGS = 2**22


class UnsupportedModelError(ValueError):
    """The checkpoint is a model (or uses a feature) that MiniInfer does not implement."""


@dataclass
class Qwen2Config:
    """Hyper-parameters of a Qwen2 / Qwen2.5 decoder (field names as in HF ``config.json``), or of a Llama or
    Qwen3 one: ``model_type`` says which, and the switches below say what differs."""

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
    model_type: str = "qwen2"  # "qwen2", "llama" or "qwen3"
    # Qwen3: an RMSNorm over each head's D coordinates of q and of k (weights [D]), before RoPE.
    qk_norm: bool = False
    # Llama and Qwen3 put attention_bias on o_proj too (Qwen2 never does).
    o_proj_bias: bool = False
    # None (plain RoPE) or {"rope_type": "llama3", "factor": ..., "low_freq_factor": ..., "high_freq_factor": ...,
    # "original_max_position_embeddings": ...}: Llama 3.1's rescaled frequencies (miniinfer.models.rope_scaling).
    rope_scaling: dict | None = None

    def __post_init__(self):
        # Direct construction (tests, the chapters) gets the same checks as a config.json.
        _check_config(self, "config")

    @property
    def q_size(self) -> int:
        """H·D: width of the query projection."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """H_kv·D: width of the key (and of the value) projection."""
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", *, max_model_len: int | None = None) -> Qwen2Config:
        """Build from a parsed HF ``config.json``; raise :class:`UnsupportedModelError` for what we can't honour
        and ``ValueError`` (naming ``source`` and the field) for values that would load but compute garbage.

        ``max_model_len`` caps the context the model is built for: ``max_position_embeddings`` becomes
        ``min(max_position_embeddings, max_model_len)``, so the RoPE tables (``[positions, D/2]``) hold only
        the positions that can be used. A config above :data:`MAX_POSITION_EMBEDDINGS` needs it.
        """
        if not isinstance(hf, dict):
            raise ValueError(f"{source} must hold a JSON object ({{\"model_type\": ...}}), got a JSON "
                             f"{_json_type(hf)}")
        architectures = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ValueError(f"{source}: architectures must be a list of class names, got {architectures!r}")
        if model_type not in MODEL_TYPES.values() or any(MODEL_TYPES.get(a) != model_type for a in architectures):
            found = ", ".join(architectures) or "none listed"
            raise UnsupportedModelError(
                f"{source}: unsupported architecture (architectures: {found}; model_type: {model_type!r}). "
                f"MiniInfer runs {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints (model_type "
                f"{', '.join(repr(t) for t in MODEL_TYPES.values())}: Qwen2, Qwen2.5, Llama 2/3, Qwen3)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if hf.get(k) is None]
        if missing:
            raise ValueError(f"{source} lacks required fields: {', '.join(missing)}")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias: true is not supported (MLP projections without bias)")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")

        # Types first, field by field, so that a string "896" or a "false" is named rather than
        # failing later as a TypeError deep in the model (or, worse, loading: bool("false") is True).
        def integer(field: str, default=None):
            value = hf.get(field)
            if value is None:
                return default
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: {field} must be a positive integer, got {_describe(value)}")
            return value

        def number(field: str, value, default: float):
            if value is None:  # absent, or null: transformers' default
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{source}: {field} must be a positive number, got {_describe(value)}")
            return float(value)

        for field in ("rope_parameters", "rope_scaling"):
            if hf.get(field) is not None and not isinstance(hf[field], dict):
                raise ValueError(f"{source}: {field} must be an object or null, got {_describe(hf[field])}")

        # Rope: old configs say rope_theta + rope_scaling, transformers>=5 writes rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling")
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if scaling:
            rope_type = scaling.get("rope_type") or scaling.get("type") or rope_type
        rope_scaling = None
        if rope_type in ROPE_SCALING_FIELDS:
            given = rope | (scaling or {})
            missing_rope = [k for k in ROPE_SCALING_FIELDS[rope_type] if given.get(k) is None]
            if missing_rope:
                raise ValueError(f"{source}: rope scaling {rope_type!r} needs {', '.join(missing_rope)}")
            rope_scaling = {"rope_type": rope_type}
            for key in ROPE_SCALING_FIELDS[rope_type]:
                rope_scaling[key] = number(f"rope_scaling.{key}", given[key], 1.0)
            if rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
                raise ValueError(f"{source}: rope scaling needs high_freq_factor > low_freq_factor, got "
                                 f"{rope_scaling['high_freq_factor']} and {rope_scaling['low_freq_factor']}")
        elif rope_type != "default":
            raise UnsupportedModelError(
                f"{source}: rope scaling {rope_type!r} is not supported (plain RoPE and "
                f"{', '.join(ROPE_SCALING_FIELDS)} only); remove rope_scaling to run the model at its original "
                "context length")
        theta_field = "rope_parameters.rope_theta" if "rope_theta" in rope else "rope_theta"
        rope_theta = number(theta_field, rope.get("rope_theta", hf.get("rope_theta")), 10000.0)
        rms_norm_eps = number("rms_norm_eps", hf.get("rms_norm_eps"), 1e-6)

        # Sliding-window attention: Qwen2.5 ships use_sliding_window: false (every layer full), fine.
        num_layers = integer("num_hidden_layers")
        layer_types = hf.get("layer_types")
        if layer_types is None:
            sliding = hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None
            first_sliding = hf.get("max_window_layers")
            first_sliding = num_layers if first_sliding is None else first_sliding
            if sliding and (not isinstance(first_sliding, int) or isinstance(first_sliding, bool)):
                raise ValueError(f"{source}: max_window_layers must be an integer, got {_describe(first_sliding)}")
            layer_types = ["sliding_attention" if sliding and i >= first_sliding else "full_attention"
                           for i in range(num_layers)]
        if not isinstance(layer_types, list):
            raise ValueError(f"{source}: layer_types must be a list, got {_describe(layer_types)}")
        if any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(
                f"{source}: sliding-window attention is not supported (layer_types: "
                f"{sorted(set(map(str, layer_types)))}; use_sliding_window: {hf.get('use_sliding_window')})")

        hidden_size = integer("hidden_size")
        num_heads = integer("num_attention_heads")
        num_kv_heads = integer("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads}): each key/value head serves a whole group "
                             "of query heads")
        head_dim = integer("head_dim", 128 if model_type == "qwen3" else None)  # HF's Qwen3Config default
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"{source}: hidden_size ({hidden_size}) is not divisible by num_attention_heads "
                                 f"({num_heads}), and there is no head_dim field to say the head size")
            head_dim = hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")

        max_positions = integer("max_position_embeddings", 32768)
        if max_model_len is not None:
            if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or max_model_len <= 0:
                raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
            max_positions = min(max_positions, max_model_len)
        elif max_positions > MAX_POSITION_EMBEDDINGS:
            # Every position costs a RoPE table row and, in use, KV cache: refuse rather than allocate
            # gigabytes for a context nobody asked for (a typo, or a config written as "unlimited").
            raise ValueError(f"{source}: max_position_embeddings is {max_positions:,}, more than MiniInfer "
                             f"builds a model for ({MAX_POSITION_EMBEDDINGS:,}); pass max_model_len (e.g. "
                             "LLM(path, max_model_len=32768)) to run it with a shorter context")

        def boolean(field: str, default: bool) -> bool:
            value = hf.get(field)
            if value is None:
                return default  # HF's default (False for all three architectures)
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {field} must be true or false (JSON booleans), got {_describe(value)}")
            return value

        tie = boolean("tie_word_embeddings", False)
        # Qwen2 puts a bias on q, k, v (never on o_proj) whatever config.json says; Llama and Qwen3 follow
        # attention_bias, on all four projections.
        bias = True if model_type == "qwen2" else boolean("attention_bias", False)

        for field in ("bos_token_id", "eos_token_id"):
            value = hf.get(field)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                             for i in ids):
                raise ValueError(f"{source}: {field} must be a token id (an integer >= 0), a list of them, or null, "
                                 f"got {_describe(value)}")
        torch_dtype = hf.get("torch_dtype") or hf.get("dtype")
        if torch_dtype is not None and not isinstance(torch_dtype, str):
            raise ValueError(f"{source}: torch_dtype must be a dtype name such as \"bfloat16\", got "
                             f"{_describe(torch_dtype)}")

        try:
            return cls(
                vocab_size=integer("vocab_size"),
                hidden_size=hidden_size,
                intermediate_size=integer("intermediate_size"),
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads,
                head_dim=head_dim,
                rope_theta=rope_theta,
                rms_norm_eps=rms_norm_eps,
                max_position_embeddings=max_positions,
                tie_word_embeddings=tie,
                attention_bias=bias,
                torch_dtype=torch_dtype,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                model_type=model_type,
                qk_norm=model_type == "qwen3",
                o_proj_bias=bias and model_type != "qwen2",
                rope_scaling=rope_scaling,
            )
        except ValueError as e:  # __post_init__'s checks: say which file
            raise ValueError(str(e).replace("config: ", f"{source}: ", 1)) from None

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_model_len: int | None = None) -> Qwen2Config:
        """Read ``folder/config.json`` (see :meth:`from_hf_dict` for ``max_model_len``)."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}: a model folder needs config.json next to "
                                    "its *.safetensors files")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(hf, source=str(path), max_model_len=max_model_len)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _describe(value) -> str:
    """``'896' (a string)``: the repr alone would not show a JSON reader why "896" is wrong."""
    return f"{value!r} (a JSON {_json_type(value)})"


def _check_config(config: Qwen2Config, source: str) -> None:
    """The invariants the model relies on (``source`` names the config in the message)."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: {name} must be a positive integer, got {value!r}")
    for name in ("rope_theta", "rms_norm_eps"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{source}: {name} must be a positive number, got {value!r}")
    if not isinstance(config.tie_word_embeddings, bool):
        raise ValueError(f"{source}: tie_word_embeddings must be True or False, got {config.tie_word_embeddings!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"{source}: num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads})")
    if config.head_dim % 2:
        raise ValueError(f"{source}: head_dim must be even for rotary embeddings, got {config.head_dim}")
    if config.model_type not in MODEL_TYPES.values():
        raise ValueError(f"{source}: model_type must be one of {sorted(set(MODEL_TYPES.values()))}, got "
                         f"{config.model_type!r}")
    if config.rope_scaling is not None and config.rope_scaling.get("rope_type") not in ROPE_SCALING_FIELDS:
        raise ValueError(f"{source}: rope_scaling must be None or a {'/'.join(ROPE_SCALING_FIELDS)} scaling dict, "
                         f"got {config.rope_scaling!r}")
