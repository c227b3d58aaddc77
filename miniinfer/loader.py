"""Load a Hugging Face Qwen2 folder (config.json + safetensors, sharded or not) into our model.

    model, tokenizer = miniinfer.load_model("path/to/folder")   # or a hub id such as "Qwen/Qwen2.5-0.5B"

Weights are read with ``safetensors`` only: a safetensors file is a JSON header plus raw arrays, so
loading one cannot execute code, unlike a pickled ``pytorch_model.bin``. Every tensor is checked
against the shape the config implies *before* anything is loaded, and every error names the file or
tensor at fault. HF's separate q/k/v and gate/up projections are stacked into our fused
``qkv_proj`` and ``gate_up_proj`` here (see ``miniinfer.models.qwen2`` for why).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from miniinfer.components import Components
from miniinfer.models.config import Qwen2Config
from miniinfer.models.qwen2 import MODEL_CLASSES, Qwen2ForCausalLM

__all__ = ["load_model", "resolve_model_path", "hf_tensor_shapes", "fuse_hf_tensors", "default_device",
           "resolve_device", "resolve_dtype", "load_generation_config"]

# The dtypes we convert from: any of them casts exactly (or by rounding only) to the compute dtype. float8
# weights come with per-block scales (``weight_scale_inv``) that a plain cast would ignore: garbage logits.
LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Tensors that some checkpoints carry and that we recompute or never need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Our fused tensors and the HF tensors stacked (along dim 0, in this order) to build them.
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device) -> torch.device:
    """None -> :func:`default_device`; a name ("cpu", "cuda", "cuda:1") or ``torch.device`` is checked against
    this machine, so that a missing GPU is a one-line ``ValueError`` here instead of an assertion deep in torch."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} requested, but {why} (torch {torch.__version__}); "
                             "use device 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 ... "
                             f"cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' requested, but Apple's Metal backend is not available; use 'cpu'")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU (fast and exact there), bfloat16 on CUDA; strings like "bfloat16" accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                "float": "float32"}.get(dtype, dtype)
        dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (or its name), got {dtype!r}")
    return dtype


def hf_tensor_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2 (or Llama, Qwen3) checkpoint must hold (HF names) and its shape."""
    E, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, E)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (E,),
            p + "post_attention_layernorm.weight": (E,),
            p + "self_attn.q_proj.weight": (config.q_size, E),
            p + "self_attn.k_proj.weight": (config.kv_size, E),
            p + "self_attn.v_proj.weight": (config.kv_size, E),
            p + "self_attn.o_proj.weight": (E, config.q_size),
            p + "mlp.gate_proj.weight": (I, E),
            p + "mlp.up_proj.weight": (I, E),
            p + "mlp.down_proj.weight": (E, I),
        }
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (config.q_size,),
                       p + "self_attn.k_proj.bias": (config.kv_size,),
                       p + "self_attn.v_proj.bias": (config.kv_size,)}
        if config.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (E,)
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (config.head_dim,),
                       p + "self_attn.k_norm.weight": (config.head_dim,)}
    return shapes


def fuse_hf_tensors(hf: dict[str, torch.Tensor], config: Qwen2Config) -> dict[str, torch.Tensor]:
    """HF names -> our state dict: stack q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``."""
    ours = dict(hf)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            if p + parts[0] in ours:
                ours[p + fused] = torch.cat([ours.pop(p + part) for part in parts], dim=0)
    return ours


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and ".." not in name


def _download_from_hub(repo_id: str) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local folder, and downloading it from the Hugging Face Hub needs "
                          "the huggingface_hub package (not a runtime dependency of miniinfer; it comes with "
                          "miniinfer[dev]): pip install huggingface_hub") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor an accessible model on the Hugging Face "
                                f"Hub ({type(e).__name__})") from None
    except Exception as e:  # offline, DNS failure, timeout, HF_HUB_OFFLINE=1, ...
        raise OSError(f"{repo_id!r} is not a local folder, it is not in the Hugging Face cache, and the Hub cannot "
                      f"be reached (is this machine offline?). Download it on a connected machine or pass a "
                      f"local folder. ({type(e).__name__}: {e})") from None


def resolve_model_path(path: str | Path) -> Path:
    """A local folder as is; ``org/name`` that is not a local path -> a Hugging Face Hub snapshot."""
    local = Path(path).expanduser()
    if local.exists():
        if local.is_file() and local.suffix == ".gguf":  # a single-file GGUF model (miniinfer.formats.gguf)
            return local
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is a file; pass the model folder (with config.json and "
                                     "*.safetensors) or a .gguf file")
        return local
    if isinstance(path, str) and _looks_like_hub_id(path):
        return _download_from_hub(path)
    raise FileNotFoundError(f"no model folder at {local}")


def _inside(path: Path, folder: Path) -> bool:
    """Does ``path`` (resolved: symlinks followed, ``..`` applied) lie in ``folder``?"""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _shard_path(folder: Path, name, index: Path) -> Path:
    """The file a ``weight_map`` entry names, refused unless it stays inside the model folder.

    An index comes with a downloaded checkpoint, so its entries are untrusted: ``../../etc/passwd``, an
    absolute path or a symlink out of the folder would make us read (and report on) files elsewhere. The
    one exception is the Hugging Face cache layout, where ``snapshots/<rev>/x.safetensors`` is a symlink
    into the repository's own ``blobs/`` folder.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: weight_map values must be shard file names, got {name!r}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"{index}: weight_map entry {name!r} points outside the model folder; shard names "
                         "must be plain file names such as model-00001-of-00002.safetensors")
    path = folder / name
    allowed = [folder]
    if folder.parent.name == "snapshots":  # huggingface_hub's cache: .../models--org--name/snapshots/<rev>/
        allowed.append(folder.parent.parent / "blobs")
    if path.exists() and not any(_inside(path, root) for root in allowed):
        raise ValueError(f"{index}: weight_map entry {name!r} is a link that resolves outside the model folder "
                         f"(to {path.resolve()}); copy the shard into {folder} instead")
    return path


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): "
                             f"{type(e).__name__}: {e}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be an object mapping tensor names to shard files, "
                             f"got a {type(weight_map).__name__}")
        files = [_shard_path(folder, name, index) for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {index.name} is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise ValueError(f"{folder} holds only pickled weights ({', '.join(pickles)}); MiniInfer reads safetensors "
                         "only (pickle can run arbitrary code). Convert them, e.g. with transformers: "
                         "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out)")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of all files (CPU, stored dtype); a truncated or corrupt file is named in the error."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                file_tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # SafetensorError (bad header, data past the end of the file, ...)
            size = file.stat().st_size
            raise ValueError(f"{file} is not a valid safetensors file: it is truncated or corrupt ({size} bytes; "
                             f"{type(e).__name__}: {e})") from None
        for name, tensor in file_tensors.items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in more than one shard (again in {file.name})")
            if tensor.dtype not in LOADABLE_DTYPES and tensor.is_floating_point():
                raise ValueError(f"{file}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                 "which MiniInfer does not load (float32, bfloat16 and float16 only; quantized "
                                 "float8 checkpoints need their scales): use the unquantized model")
        tensors |= file_tensors
    return tensors


def _check_tensors(tensors: dict[str, torch.Tensor], config: Qwen2Config, folder: Path) -> None:
    expected = hf_tensor_shapes(config)
    for name in list(tensors):
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            del tensors[name]  # recomputed (inv_freq), or a duplicate of the tied embedding
    missing = [n for n in expected if n not in tensors]
    unexpected = sorted(n for n in tensors if n not in expected)
    if "lm_head.weight" in missing:
        raise ValueError(f"{folder}: lm_head.weight is missing and config.json says tie_word_embeddings: false "
                         "(an untied model needs its own LM head)")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"{folder}: the checkpoint does not match its config.json: {'; '.join(parts)}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ValueError(f"{folder}: tensor {name} has shape {got}, but config.json implies {shape}")
        if not tensors[name].is_floating_point():
            raise ValueError(f"{folder}: tensor {name} has dtype {tensors[name].dtype}; expected floating point")


def _model_type(folder: Path) -> str | None:
    """config.json's ``model_type`` (None when unreadable: Qwen2Config.from_folder then says why)."""
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return hf.get("model_type") if isinstance(hf, dict) else None


def load_model(path: str | Path, *, dtype=None, device=None, components: Components | None = None,
               max_model_len: int | None = None):
    """Load a Qwen2 checkpoint folder (or hub id) -> ``(model, tokenizer)``.

    ``model``: :class:`~miniinfer.models.qwen2.Qwen2ForCausalLM` in eval mode, no gradients, on ``device``
    (default CUDA if available, else CPU) in ``dtype`` (default float32 on CPU, bfloat16 on CUDA);
    ``model(ids [B, L]) -> logits [B, L, V]``. ``tokenizer``: a :class:`~miniinfer.tokenizer.Tokenizer`, or
    None when the folder has no ``tokenizer.json``. ``max_model_len`` builds the model for at most that many
    positions (``model.config.max_position_embeddings`` becomes the smaller of the two): the RoPE tables are
    sized by it, and a config declaring more than 2**22 positions is refused without it.
    """
    from miniinfer.tokenizer import Tokenizer

    device = resolve_device(device)  # before reading gigabytes: a missing GPU should fail at once
    dtype = resolve_dtype(dtype, device)
    folder = resolve_model_path(path)
    if folder.is_file():  # a .gguf file
        from miniinfer.formats.gguf import load_gguf

        return load_gguf(folder, dtype=dtype, device=device, components=components, max_model_len=max_model_len)
    if _model_type(folder) == "qwen2_moe":  # a mixture of experts (chapter 12): its own model file
        from miniinfer.models.qwen2_moe import load_qwen2_moe

        return load_qwen2_moe(folder, dtype=dtype, device=device, components=components, max_model_len=max_model_len)
    config = Qwen2Config.from_folder(folder, max_model_len=max_model_len)

    from miniinfer.quant.checkpoint import load_gptq_model, quantization_config

    if quantization_config(folder) is not None:  # a pre-quantized (GPTQ) checkpoint: chapter 11
        model = load_gptq_model(folder, config, dtype=dtype, device=device, components=components)
        tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
        return model, tokenizer

    tensors = _read_safetensors(_safetensors_files(folder))
    _check_tensors(tensors, config, folder)
    state = {name: t.to(device=device, dtype=dtype) for name, t in fuse_hf_tensors(tensors, config).items()}
    del tensors

    # Build on the meta device (no memory, no random init), then adopt the loaded tensors as parameters.
    with torch.device("meta"):
        model = MODEL_CLASSES.get(config.model_type, Qwen2ForCausalLM)(config, components)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype)  # the non-persistent RoPE tables
    model.requires_grad_(False).eval()

    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer


# generation_config.json (HF names) -> SamplingParams (vLLM names): the sampling defaults a model ships with,
# the same keys vLLM reads (``generation_config="auto"``). do_sample is ignored, as vLLM does.
GENERATION_DEFAULTS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_generation_config(path: str | Path) -> dict:
    """The sampling defaults in ``path/generation_config.json``, as :class:`~miniinfer.SamplingParams` keywords.

    Only the keys the file sets (temperature, top_k, top_p, min_p, repetition_penalty, and max_new_tokens as
    ``max_tokens``); ``{}`` when the file is absent or ``path`` is not a local folder (a hub id: nothing is
    downloaded here; pass the folder :func:`resolve_model_path` returned). A file that is not a JSON object,
    or a value of the wrong type, raises ``ValueError`` naming the file and the field.
    """
    try:
        folder = Path(path).expanduser()
    except TypeError:
        return {}
    file = folder / "generation_config.json"
    if not folder.is_dir() or not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(config).__name__}")
    defaults = {}
    for hf_name, name in GENERATION_DEFAULTS.items():
        value = config.get(hf_name)
        if value is None:  # absent, or written out as null by transformers: no default
            continue
        integer = hf_name in ("top_k", "max_new_tokens")
        ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not ok:
            raise ValueError(f"{file}: {hf_name} must be {'an integer' if integer else 'a number'}, got {value!r}")
        defaults[name] = value if integer else float(value)
    return defaults
