"""GGUF files: load one into our decoder (``load_gguf``), write one from a model folder (``export_gguf``).

GGUF (llama.cpp's format) is a single file: a header of typed key/value metadata (architecture, sizes,
the tokenizer), a table of tensor infos (name, shape, ggml type, offset), then the raw tensor data. We read
and write it with llama.cpp's own ``gguf`` Python package, and follow llama.cpp's conventions:

* tensor names: ``token_embd``, ``output_norm``, ``output`` (absent when tied to the embedding), and per
  layer ``blk.N.attn_norm``, ``attn_q``/``attn_k``/``attn_v`` (+ ``.bias`` for Qwen2), ``attn_output``,
  ``attn_q_norm``/``attn_k_norm`` (Qwen3), ``ffn_norm``, ``ffn_gate``, ``ffn_up``, ``ffn_down``
  (the names come from ``gguf.TENSOR_NAMES``, not typed by hand);
* shapes are stored innermost first (``ne[0]`` is a row's length): a torch ``[N, K]`` weight is ``(K, N)``;
* **RoPE layout**: llama.cpp rotates Llama's q/k with adjacent pairs (``2i, 2i+1``) and Qwen2/Qwen3's with
  half-split pairs (``i, i + D/2``, "NEOX"). HF checkpoints are all half-split, so llama.cpp's converter
  permutes the rows of Llama's ``q_proj``/``k_proj`` (per head: even rows from the first half, odd rows
  from the second) and leaves Qwen's alone. We do the same on export and undo it on load;
* Llama 3.1's RoPE scaling is a ``rope_freqs`` tensor of per-frequency divisors (llama.cpp's way); we also
  write the exact ``llama3`` parameters under ``miniinfer.rope_scaling`` so that our own round trip is exact;
* 1-D tensors (norms, biases) stay F32 whatever the file type; a 2-D tensor whose rows are not a multiple
  of the block size falls back to F16, as llama.cpp does.

Loading is as safe as for safetensors: the ``gguf`` reader memory-maps the file and parses it with numpy
(no pickle); before any tensor is touched every tensor's extent is checked against the file size, and every
tensor against the shape the metadata implies, with errors that name the tensor. On a GPU, Q8_0 and Q4_0
decoder weights become :class:`~miniinfer.quant.linear.GroupQuantLinear` layers (8/4-bit, group 32: exactly
the same numbers, no rounding); everything else (F16, BF16, Q4_K, ... and the embedding), and everything on a
CPU, is dequantized to the compute dtype.
"""

from __future__ import annotations

import json
from math import prod
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_gguf", "export_gguf", "GGUFError", "EXPORT_TYPES", "gguf_tensor_name", "read_metadata"]

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# --type of `miniinfer convert` -> (ggml type name for 2-D tensors, llama.cpp file type name)
EXPORT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_k": ("Q4_K", "MOSTLY_Q4_K_M")}
# HF name (after model.layers.N.) -> gguf.MODEL_TENSOR member
_LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM", "post_attention_layernorm": "FFN_NORM",
    "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K", "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT", "self_attn.q_norm": "ATTN_Q_NORM", "self_attn.k_norm": "ATTN_K_NORM",
    "mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
# Decoder linears that may stay quantized (our fused module <- the HF projections stacked into it).
_QUANT_LINEARS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                  "mlp.down_proj": ("mlp.down_proj",)}


class GGUFError(ValueError):
    """A GGUF file that is truncated, inconsistent, or a model we do not run (the message names the tensor)."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading and writing GGUF files needs llama.cpp's gguf package: pip install gguf") from None
    return gguf


def gguf_tensor_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (llama.cpp's names)."""
    gguf = _gguf()
    stem, _, kind = hf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_GLOBAL_TENSORS[stem]]]}.{kind}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_TENSORS:
        member = gguf.MODEL_TENSOR[_LAYER_TENSORS[".".join(parts[3:])]]
        return f"{gguf.TENSOR_NAMES[member].format(bid=int(parts[2]))}.{kind}"
    raise KeyError(f"no GGUF name for tensor {hf_name}")


def _permute_for_ggml(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF half-split rows -> llama.cpp's Llama layout (adjacent RoPE pairs), per head; w: [heads·D, ...]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_from_ggml(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_permute_for_ggml`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -------------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------------


def _reader(path: Path):
    """A ``gguf.GGUFReader`` that checks every tensor's extent against the file before mapping it."""
    gguf = _gguf()

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise GGUFError(f"{path}: tensor {name} has an unknown ggml type {int(raw_dtype[0])}") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                shape = tuple(int(d) for d in dims)
                if not shape or shape[0] % block:
                    raise GGUFError(f"{path}: tensor {name} has shape {shape}, whose rows ({shape[0] if shape else 0}"
                                    f") are not a multiple of the {qtype.name} block size {block}")
                start = int(start_offs + offset[0])
                end = start + prod(shape) * type_size // block
                if end > size:
                    raise GGUFError(f"{path}: tensor {name} ({qtype.name}, shape {shape}) needs bytes {start}..{end}, "
                                    f"but the file has {size} bytes: the file is truncated, or the tensor's shape "
                                    "or offset is corrupt")
            return super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(str(path), "r")
    except GGUFError:
        raise
    except Exception as e:  # noqa: BLE001 - the header itself is cut short or not GGUF at all
        raise GGUFError(f"{path} is not a valid GGUF file: its header is truncated or corrupt ({type(e).__name__}: "
                        f"{e})") from None


def read_metadata(reader) -> dict:
    """All key/value fields as Python values (strings, numbers, lists), the ``GGUF.*`` bookkeeping excluded."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        meta[key] = value.item() if isinstance(value, np.generic) else value
    return meta


def _config_dict(meta: dict, tensors: dict, path: Path) -> dict:
    """GGUF metadata (and which tensors exist) -> an HF-style config.json dict for Qwen2Config.from_hf_dict."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        from miniinfer.models.config import UnsupportedModelError

        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported (MiniInfer runs "
                                    f"{', '.join(ARCHITECTURES)} GGUF files)")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    missing = [f"{arch}.{k}" for k in ("embedding_length", "feed_forward_length", "block_count",
                                        "attention.head_count") if get(k) is None]
    if missing:
        raise GGUFError(f"{path}: metadata lacks {', '.join(missing)}")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    hf = {"architectures": [ARCHITECTURES[arch]], "model_type": arch,
          "vocab_size": get("vocab_size") or int(embd.shape[1]),
          "hidden_size": get("embedding_length"), "intermediate_size": get("feed_forward_length"),
          "num_hidden_layers": get("block_count"), "num_attention_heads": get("attention.head_count"),
          "num_key_value_heads": get("attention.head_count_kv", get("attention.head_count")),
          "head_dim": get("attention.key_length"), "rope_theta": get("rope.freq_base", 10000.0),
          "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
          "max_position_embeddings": get("context_length", 4096),
          "tie_word_embeddings": "output.weight" not in tensors,
          "attention_bias": "blk.0.attn_q.bias" in tensors,
          "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"), "bos_token_id": meta.get("tokenizer.ggml.bos_token_id")}
    if arch == "qwen3" and hf["head_dim"] is None:
        hf["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    if isinstance(hf["num_key_value_heads"], list) or isinstance(hf["num_attention_heads"], list):
        raise GGUFError(f"{path}: per-layer head counts are not supported")
    if "miniinfer.rope_scaling" in meta:
        hf["rope_scaling"] = json.loads(meta["miniinfer.rope_scaling"])
    return hf


def _rope_freqs_tables(model, factors: torch.Tensor) -> None:
    """A foreign Llama 3.1 GGUF: llama.cpp's ``rope_freqs`` divisors applied to plain RoPE's frequencies."""
    from miniinfer.models.rope_scaling import rope_inv_freq

    config = model.config
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta) / factors.float()
    angles = torch.outer(torch.arange(config.max_position_embeddings).float(), inv_freq)
    rotary = model.model.rotary_emb
    rotary.register_buffer("cos", angles.cos().to(rotary.cos.device, rotary.cos.dtype), persistent=False)
    rotary.register_buffer("sin", angles.sin().to(rotary.sin.device, rotary.sin.dtype), persistent=False)


def _dequantize(tensor) -> torch.Tensor:
    """A reader tensor -> float32 torch tensor in torch's shape order ([N, K] for a weight)."""
    gguf = _gguf()
    kind = tensor.tensor_type
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    if kind == gguf.GGMLQuantizationType.F32:
        data = np.array(tensor.data, dtype=np.float32)
    elif kind == gguf.GGMLQuantizationType.F16:
        data = np.asarray(tensor.data).astype(np.float32)
    else:
        try:
            data = gguf.quants.dequantize(np.asarray(tensor.data), kind)
        except NotImplementedError:
            raise GGUFError(f"tensor {tensor.name}: ggml type {kind.name} is not supported") from None
    return torch.from_numpy(np.ascontiguousarray(data).reshape(shape))


def _group_quant_parts(tensor):
    """Q8_0/Q4_0 reader tensor -> (q int32 unsigned [N, K], scales float32 [N, K/32], zero, bits) or None."""
    from miniinfer.formats.ggml_quants import unpack_q4_0, unpack_q8_0

    gguf = _gguf()
    cols, rows = (int(d) for d in tensor.shape)
    raw = np.asarray(tensor.data)
    if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        q, d = unpack_q8_0(raw, rows, cols)
        return torch.from_numpy(q.astype(np.int32) + 128), torch.from_numpy(d), 128, 8
    if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0:
        q, d = unpack_q4_0(raw, rows, cols)
        return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d), 8, 4
    return None


def load_gguf(path: str | Path, *, dtype=None, device=None, components=None, max_model_len: int | None = None,
              quantized_kernels: bool | None = None):
    """Load a ``.gguf`` file -> ``(model, tokenizer)``, like :func:`miniinfer.load_model` does a folder.

    ``quantized_kernels``: Q8_0/Q4_0 decoder linears become :class:`GroupQuantLinear` (int8/int4 group-32
    weights, our dequant kernels); False dequantizes every tensor to ``dtype``. Default: True on a GPU, False on
    a CPU, where those layers only dequantize and multiply on every call (float weights are faster there).
    """
    from miniinfer.loader import hf_tensor_shapes, resolve_device, resolve_dtype
    from miniinfer.models.config import Qwen2Config
    from miniinfer.models.qwen2 import MODEL_CLASSES, Qwen2ForCausalLM

    from .gguf_tokenizer import tokenizer_from_metadata

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = Path(path)
    if quantized_kernels is None:
        quantized_kernels = device.type == "cuda"
    reader = _reader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = Qwen2Config.from_hf_dict(_config_dict(meta, tensors, path), source=str(path), max_model_len=max_model_len)

    # Which GGUF tensors the config implies, with torch shapes; then check names and shapes, naming the tensor.
    expected = {gguf_tensor_name(name): (name, shape) for name, shape in hf_tensor_shapes(config).items()}
    if config.tie_word_embeddings:
        expected.pop("output.weight", None)
    extra = {"rope_freqs.weight"}
    missing = [name for name in expected if name not in tensors]
    unexpected = sorted(name for name in tensors if name not in expected and name not in extra)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise GGUFError(f"{path}: the tensors do not match the metadata ({config.model_type}, "
                        f"{config.num_hidden_layers} layers): {'; '.join(parts)}")
    for name, (hf_name, shape) in expected.items():
        got = tuple(reversed([int(d) for d in tensors[name].shape]))
        if got != tuple(shape):
            raise GGUFError(f"{path}: tensor {name} ({hf_name}) has shape {got}, but the metadata implies {tuple(shape)}")

    permute = config.model_type == "llama"
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}

    def hf_tensor(name: str, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        proj = next((p for p in heads if f".{p}." in hf_name), None)
        return _unpermute_from_ggml(value, heads[proj]) if permute and proj else value

    # Decoder linears kept quantized: every part of a fused module in the same Q8_0/Q4_0 type.
    quantized: dict[str, tuple] = {}
    kept_quantized: set[str] = set()  # HF names of the weights inside `quantized`
    if quantized_kernels:
        for i in range(config.num_hidden_layers):
            for fused, parts in _QUANT_LINEARS.items():
                names = [gguf_tensor_name(f"model.layers.{i}.{part}.weight") for part in parts]
                kinds = {tensors[n].tensor_type for n in names}
                pieces = [_group_quant_parts(tensors[n]) for n in names] if len(kinds) == 1 else [None]
                if all(p is not None for p in pieces):
                    q = torch.cat([hf_tensor(n, expected[n][0], p[0]) for n, p in zip(names, pieces)])
                    scales = torch.cat([hf_tensor(n, expected[n][0], p[1]) for n, p in zip(names, pieces)])
                    quantized[f"model.layers.{i}.{fused}"] = (q, scales, pieces[0][2], pieces[0][3])
                    kept_quantized |= {expected[n][0] for n in names}

    from miniinfer.loader import fuse_hf_tensors

    state = {}
    for name, (hf_name, _) in expected.items():
        if hf_name in kept_quantized:
            continue
        state[hf_name] = hf_tensor(name, hf_name, _dequantize(tensors[name]))
    state = {k: v.to(device=device, dtype=dtype) for k, v in fuse_hf_tensors(state, config).items()}

    with torch.device("meta"):
        model = MODEL_CLASSES.get(config.model_type, Qwen2ForCausalLM)(config, components)
    for key in quantized:  # placeholders, so that strict loading of the float tensors still checks the rest
        _replace(model, key, torch.nn.Identity())
    model.load_state_dict({k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in quantized}, strict=False,
                          assign=True)
    model.to(device=device, dtype=dtype)
    if "rope_freqs.weight" in tensors and config.rope_scaling is None:
        _rope_freqs_tables(model, _dequantize(tensors["rope_freqs.weight"]))
    from miniinfer.quant.linear import GroupQuantLinear

    for key, (q, scales, zero, bits) in quantized.items():
        bias = state.get(f"{key}.bias")
        layer = GroupQuantLinear(q.t().contiguous(), scales.t().contiguous().to(dtype), torch.full_like(
            scales.t(), zero, dtype=torch.int32).contiguous(), bits, 32, bias)
        _replace(model, key, layer.to(device))
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise GGUFError(f"{path}: no data for {', '.join(leftover[:8])}")
    model.requires_grad_(False).eval()
    tok_meta = {k.removeprefix("tokenizer.ggml."): v for k, v in meta.items() if k.startswith("tokenizer.ggml.")}
    if "tokenizer.chat_template" in meta:
        tok_meta["chat_template"] = meta["tokenizer.chat_template"]
    return model, tokenizer_from_metadata(tok_meta, str(path))


def _replace(model, dotted: str, new) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# -------------------------------------------------------------------------------------------------
# Writing
# -------------------------------------------------------------------------------------------------


def _llama3_rope_freqs(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for a "llama3" scaling: per frequency, the divisor it applies."""
    from miniinfer.models.rope_scaling import rope_inv_freq

    plain = rope_inv_freq(config.head_dim, config.rope_theta)
    scaled = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    return (plain / scaled).numpy().astype(np.float32)


def _encode(gguf, array: np.ndarray, kind: str) -> tuple[np.ndarray, object]:
    """float32 [N, K] -> (data, raw ggml type or None) in ``kind`` (a 1-D tensor or an odd row length: F32/F16)."""
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or kind == "F32":
        return array.astype(np.float32), None
    block = gguf.GGML_QUANT_SIZES[types[kind]][0]
    if array.shape[-1] % block:
        kind = "F16"  # as llama.cpp does for rows that do not fill whole blocks
    if kind == "F16":
        return array.astype(np.float16), None
    if kind == "Q4_K":
        from miniinfer.formats.ggml_quants import quantize_q4_k

        return quantize_q4_k(array), types.Q4_K
    return gguf.quants.quantize(array, types[kind]), types[kind]


def export_gguf(path: str | Path, output: str | Path, out_type: str = "f16") -> Path:
    """Write the model folder ``path`` (config.json + safetensors + tokenizer.json) as a GGUF file. -> ``output``.

    ``out_type``: one of :data:`EXPORT_TYPES` (the type of the 2-D tensors; 1-D ones stay F32).
    """
    from miniinfer.loader import _check_tensors, _read_safetensors, _safetensors_files, resolve_model_path
    from miniinfer.models.config import Qwen2Config
    from miniinfer.tokenizer import Tokenizer

    from .gguf_tokenizer import tokenizer_metadata

    gguf = _gguf()
    if out_type not in EXPORT_TYPES:
        raise ValueError(f"GGUF type must be one of {', '.join(EXPORT_TYPES)}, got {out_type!r}")
    folder = resolve_model_path(path)
    config = Qwen2Config.from_folder(folder)
    if (folder / "config.json").is_file() and "quantization_config" in json.loads((folder / "config.json").read_text()):
        raise ValueError(f"{folder} is a pre-quantized checkpoint; export its float original instead")
    tensors = _read_safetensors(_safetensors_files(folder))
    _check_tensors(tensors, config, folder)
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    kind, file_type = EXPORT_TYPES[out_type]
    arch = config.model_type
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(output), arch)
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.rope_scaling is not None:
        writer.add_string("miniinfer.rope_scaling", json.dumps(config.rope_scaling))
    if tokenizer is not None:
        meta = tokenizer_metadata(tokenizer, config.vocab_size)
        writer.add_tokenizer_model(meta["model"])
        writer.add_tokenizer_pre(meta["pre"])
        writer.add_token_list(meta["tokens"])
        writer.add_token_types(meta["token_type"])
        writer.add_token_merges(meta["merges"])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("padding_token_id", writer.add_pad_token_id)):
            if key in meta:
                add(meta[key])
        writer.add_add_bos_token(meta["add_bos_token"])
        if "chat_template" in meta:
            writer.add_chat_template(meta["chat_template"])
    elif config.eos_token_id is not None:
        eos = config.eos_token_id
        writer.add_eos_token_id(eos if isinstance(eos, int) else eos[0])

    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    if config.rope_scaling is not None and arch == "llama":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(config))
    for hf_name in sorted(tensors, key=_tensor_order):
        value = tensors[hf_name].float()
        proj = next((p for p in heads if f".{p}." in hf_name), None)
        if arch == "llama" and proj:
            value = _permute_for_ggml(value, heads[proj])
        data, raw = _encode(gguf, value.numpy(), kind)
        writer.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output


def _tensor_order(name: str):
    """token_embd first, then the layers in order, then output_norm and output (llama.cpp's order)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)
