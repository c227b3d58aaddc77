"""Every bad checkpoint gets an error that names the problem (file, tensor, shapes, field)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from miniinfer.loader import load_model
from miniinfer.models.config import Qwen2Config, UnsupportedModelError


@pytest.fixture
def checkpoint(tmp_path, small_checkpoint) -> Path:
    """A fresh, writable copy of the small checkpoint."""
    folder = tmp_path / "model"
    shutil.copytree(small_checkpoint[0], folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_folder_and_file_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="pass the model folder"):
        load_model(tmp_path / "file.txt")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(checkpoint)


def test_config_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(checkpoint)


@pytest.mark.parametrize("changes, match", [
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), "unsupported architecture.*LlamaForCausalLM"),
    (dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe"), "unsupported architecture"),
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None), "sliding-window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding-window"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "rope scaling 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=None), "lacks required fields: hidden_size"),
])
def test_unsupported_or_invalid_configs(checkpoint, changes, match):
    _edit_config(checkpoint, **changes)
    with pytest.raises(ValueError, match=match):
        load_model(checkpoint)


def test_qwen25_style_config_is_accepted():
    """Qwen2.5's real config.json (transformers 4.x keys): sliding window off, rope_scaling null."""
    hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896,
          "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
          "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
          "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
          "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936, "bos_token_id": 151643,
          "eos_token_id": 151643}
    config = Qwen2Config.from_hf_dict(hf)
    assert (config.head_dim, config.rope_theta, config.num_key_value_heads) == (64, 1e6, 2)
    assert config.tie_word_embeddings and config.torch_dtype == "bfloat16"
    with pytest.raises(UnsupportedModelError):
        Qwen2Config.from_hf_dict({**hf, "use_sliding_window": True, "max_window_layers": 4})


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(checkpoint)


def test_corrupt_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage!!garbage" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(checkpoint)
    path.write_bytes(b"abc")  # shorter than the 8-byte header length
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(checkpoint)


def test_no_weights_or_only_pickles(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(checkpoint)
    (checkpoint / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_model(checkpoint)


def test_missing_tensor(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(checkpoint)


def test_unexpected_tensor(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.0\.mlp\.extra\.weight"):
        load_model(checkpoint)


def test_harmless_extras_are_ignored(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6)}))
    load_model(checkpoint)


def test_shape_mismatch_names_tensor_and_shapes(checkpoint):
    def edit(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(71, 48)

    _edit_tensors(checkpoint, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(71, 48\).*\(72, 48\)"):
        load_model(checkpoint)


def test_untied_model_without_head(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight is missing.*tie_word_embeddings"):
        load_model(checkpoint)
    _edit_config(checkpoint, tie_word_embeddings=True)  # declared tied: loads, using the embedding
    model, _ = load_model(checkpoint)
    assert model.lm_head is None


def test_tied_model_with_duplicate_head_loads(checkpoint):
    _edit_config(checkpoint, tie_word_embeddings=True)
    model, _ = load_model(checkpoint)  # the file still holds lm_head.weight: ignored, the head is tied
    assert model.lm_head_weight is model.model.embed_tokens.weight


def test_missing_shard(tmp_path):
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name}.*missing"):
        load_model(tmp_path)


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not in the Hugging Face cache.*offline"):
        load_model("miniinfer-tests/no-such-model")


def test_hub_id_without_huggingface_hub(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(ImportError, match="needs the huggingface_hub package"):
        load_model("miniinfer-tests/no-such-model")
