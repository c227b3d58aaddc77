"""GPTQ checkpoints in GPTQModel's layout: write ours, read any (Qwen2, 2/4/8 bits).

A quantized layer ``model.layers.i.self_attn.q_proj`` (K inputs, N outputs, G = K / group_size) is stored as

* ``q_proj.qweight`` int32 [K · bits / 32, N]: values packed along K, first value in the lowest bits;
* ``q_proj.qzeros``  int32 [G, N · bits / 32]: zero points packed along N. Format "gptq" (v1, what
  AutoGPTQ/GPTQModel/transformers read by default) stores ``zero − 1``, a historical off-by-one;
  "gptq_v2" stores the zero itself. We write v1 unless some zero point is 0 (v1 cannot hold it);
* ``q_proj.scales``  float16 [G, N];
* ``q_proj.g_idx``   int32 [K]: the group of every input (not sorted when ``desc_act``/act_order);
* ``q_proj.bias``    float16, when the layer has one;

and ``config.json`` carries ``"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size":
128, "desc_act": …, "sym": …, "checkpoint_format": "gptq", …}``. Embeddings, norms and the LM head stay
float16. Our fused ``qkv_proj`` / ``gate_up_proj`` are split into HF's projections on the way out and
concatenated along N on the way in (the parts share their inputs, hence their ``g_idx``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from miniinfer.quant.linear import GroupQuantLinear
from miniinfer.quant.packing import pack_int32, unpack_int32

__all__ = ["save_gptq_checkpoint", "quantization_config", "load_gptq_model"]

# our fused layer -> (HF projections, in the order they are stacked)
SPLITS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "self_attn.o_proj": ("self_attn.o_proj",),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.down_proj": ("mlp.down_proj",)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def _part_sizes(config, fused: str) -> list[int]:
    if fused == "self_attn.qkv_proj":
        return [config.q_size, config.kv_size, config.kv_size]
    if fused == "mlp.gate_up_proj":
        return [config.intermediate_size] * 2
    return [config.hidden_size]


def _original_order(layer: GroupQuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [K, N], zeros [G, N], scales [G, N], g_idx [K]) with inputs in the layer's original order."""
    q, zeros = layer.unpacked()
    K = q.shape[0]
    g_sorted = torch.arange(K, device=q.device) // layer.group_size
    if layer.perm is None:
        return q, zeros, layer.scales, g_sorted.to(torch.int32)
    q_orig = torch.empty_like(q).index_copy_(0, layer.perm, q)
    g_idx = torch.empty_like(g_sorted).index_copy_(0, layer.perm, g_sorted)
    return q_orig, zeros, layer.scales, g_idx.to(torch.int32)


def save_gptq_checkpoint(model, folder: str | Path, source: str | Path | None = None, *, desc_act: bool | None = None,
                         sym: bool = False, damp_percent: float = 0.3) -> Path:
    """Write ``model`` (its decoder linears :class:`GroupQuantLinear` with 2/4/8 bits) as a GPTQ folder.
    ``source``: the float model's folder, for the tokenizer files. -> the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    bits = group_size = None
    write_v1 = True
    packed = {}
    for i in range(config.num_hidden_layers):
        for fused, parts in SPLITS.items():
            layer = model.get_submodule(f"model.layers.{i}.{fused}")
            if not isinstance(layer, GroupQuantLinear) or 32 % layer.bits:
                raise ValueError(f"model.layers.{i}.{fused} is {type(layer).__name__}"
                                 f"{'' if not isinstance(layer, GroupQuantLinear) else f' ({layer.bits} bits)'}; "
                                 "a GPTQ checkpoint needs every decoder linear quantized to 2, 4 or 8 bits")
            if bits is not None and (layer.bits, layer.group_size) != (bits, group_size):
                raise ValueError("every layer must have the same bits and group_size")
            bits, group_size = layer.bits, layer.group_size
            q, zeros, scales, g_idx = _original_order(layer)
            write_v1 &= bool((zeros > 0).all())
            start = 0
            for part, size in zip(parts, _part_sizes(config, fused)):
                name = f"model.layers.{i}.{part}"
                packed[name] = (q[:, start:start + size], zeros[:, start:start + size])
                tensors[f"{name}.scales"] = scales[:, start:start + size].to(torch.float16).contiguous()
                tensors[f"{name}.g_idx"] = g_idx.clone()
                if layer.bias is not None:
                    tensors[f"{name}.bias"] = layer.bias[start:start + size].to(torch.float16).contiguous()
                start += size
    for name, (q, zeros) in packed.items():
        tensors[f"{name}.qweight"] = pack_int32(q, bits, dim=0)
        tensors[f"{name}.qzeros"] = pack_int32((zeros - 1) & (2**bits - 1) if write_v1 else zeros, bits, dim=1)
    quantized = {f"model.layers.{i}.{fused}" for i in range(config.num_hidden_layers) for fused in SPLITS}
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module not in quantized and not name.endswith("rotary_emb.cos") and "rotary_emb" not in name:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            tensors[name] = tensor.detach().to("cpu", torch.float16).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((Path(source) / "config.json").read_text()) if source else _config_dict(config)
    hf["torch_dtype"] = "float16"
    hf.pop("dtype", None)
    if desc_act is None:  # act_order: some layer's g_idx is not sorted
        desc_act = any(getattr(m, "perm", None) is not None for m in model.modules())
    hf["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "checkpoint_format": "gptq" if write_v1 else "gptq_v2", "pack_dtype": "int32",
        "damp_percent": damp_percent, "static_groups": False, "true_sequential": False, "lm_head": False,
        "meta": {"quantizer": ["miniinfer"]},
    }
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if source:
        for file in TOKENIZER_FILES:
            if (Path(source) / file).is_file():
                shutil.copy(Path(source) / file, folder / file)
    return folder


def _config_dict(config) -> dict:
    d = config.to_dict()
    d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    return d


def quantization_config(folder: str | Path) -> dict | None:
    """``config.json``'s quantization_config, or None."""
    path = Path(folder) / "config.json"
    try:
        qc = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qc if isinstance(qc, dict) else None


def _check_quantization_config(qc: dict, folder: Path) -> tuple[int, int, bool]:
    method = qc.get("quant_method")
    if method != "gptq":
        raise ValueError(f"{folder}: quantization_config.quant_method is {method!r}; MiniInfer loads GPTQ "
                         "checkpoints only (quant_method 'gptq')")
    bits = qc.get("bits")
    if bits not in (2, 4, 8):
        raise ValueError(f"{folder}: GPTQ bits must be 2, 4 or 8, got {bits!r}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{folder}: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    if qc.get("lm_head"):
        raise ValueError(f"{folder}: a quantized lm_head is not supported")
    return bits, int(qc.get("group_size", 128)), fmt == "gptq"


def _build_layer(tensors: dict, names: tuple[str, ...], bits: int, group_size: int, v1: bool, K: int,
                 folder: Path) -> GroupQuantLinear:
    qs, zs, ss, bs, g_idx = [], [], [], [], None
    g = K if group_size in (-1, 0) else group_size
    for name in names:
        try:
            qweight, qzeros = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.qzeros")
            scales = tensors.pop(f"{name}.scales")
        except KeyError as e:
            raise ValueError(f"{folder}: missing tensor {e.args[0]} (a GPTQ layer needs qweight, qzeros, scales)") \
                from None
        gi = tensors.pop(f"{name}.g_idx", None)
        gi = (torch.arange(K) // g).to(torch.int32) if gi is None else gi.to(torch.int32)
        if g_idx is not None and not torch.equal(gi, g_idx):
            raise ValueError(f"{folder}: {names} have different g_idx; they cannot be fused into one layer")
        g_idx = gi
        q = unpack_int32(qweight, bits, dim=0)
        if q.shape[0] != K:
            raise ValueError(f"{folder}: {name}.qweight unpacks to {q.shape[0]} inputs, config implies {K}")
        z = unpack_int32(qzeros, bits, dim=1)[:, :q.shape[1]]
        if v1:
            z = (z + 1) & (2**bits - 1)
        qs.append(q)
        zs.append(z)
        ss.append(scales.float())
        bs.append(tensors.pop(f"{name}.bias", None))
    bias = None if bs[0] is None else torch.cat(bs).float()
    return GroupQuantLinear(torch.cat(qs, 1), torch.cat(ss, 1), torch.cat(zs, 1), bits, g, bias, g_idx=g_idx)


def load_gptq_model(folder: str | Path, config, *, dtype: torch.dtype, device: torch.device, components=None):
    """A :class:`~miniinfer.models.qwen2.Qwen2ForCausalLM` whose decoder linears are :class:`GroupQuantLinear`
    built from a GPTQ folder (called by :func:`miniinfer.load_model` when config.json says so)."""
    from miniinfer import loader
    from miniinfer.loader import _read_safetensors, _safetensors_files
    from miniinfer.models.qwen2 import Qwen2ForCausalLM

    folder = Path(folder)
    bits, group_size, v1 = _check_quantization_config(quantization_config(folder), folder)
    tensors = _read_safetensors(_safetensors_files(folder))
    with torch.device("meta"):
        # The loader's class for this model_type (Llama and Qwen3 share Qwen2's decoder, with switches).
        model = getattr(loader, "MODEL_CLASSES", {}).get(config.model_type, Qwen2ForCausalLM)(config, components)
    for i in range(config.num_hidden_layers):
        for fused, parts in SPLITS.items():
            K = config.intermediate_size if fused == "mlp.down_proj" else (
                config.q_size if fused == "self_attn.o_proj" else config.hidden_size)
            layer = _build_layer(tensors, tuple(f"model.layers.{i}.{p}" for p in parts), bits, group_size, v1, K,
                                 folder)
            parent, _, attr = f"model.layers.{i}.{fused}".rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    tensors.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{folder}: the GPTQ checkpoint does not match its config.json: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=False, assign=True)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False).eval()
    return model
