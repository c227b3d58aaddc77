"""Every bad checkpoint gets an error that names the problem (file, tensor, shapes, field)."""

from __future__ import annotations

import json
import re
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
    (dict(architectures=["GemmaForCausalLM"], model_type="gemma"),
     "unsupported architecture.*GemmaForCausalLM.*runs.*LlamaForCausalLM.*Qwen3ForCausalLM"),
    (dict(architectures=["LlamaForCausalLM"], model_type="qwen2"), "unsupported architecture"),  # inconsistent
    # Qwen2-MoE is supported (chapter 12): a dense checkpoint relabelled as MoE names the missing field
    (dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe"), "num_experts must be a positive integer"),
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


def _sharded(tmp_path) -> tuple[Path, Path, dict]:
    """A two-shard copy of the small checkpoint; returns (folder, index path, parsed index)."""
    from conftest import make_hf_checkpoint

    folder = tmp_path / "sharded"
    make_hf_checkpoint(folder, max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    return folder, index, json.loads(index.read_text())


def test_weight_map_must_be_an_object(tmp_path):
    folder, index, data = _sharded(tmp_path)
    data["weight_map"] = sorted(set(data["weight_map"].values()))  # a list of shard names
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map must be an object .*got a list"):
        load_model(folder)
    index.write_text(json.dumps([data]))  # the whole index an array
    with pytest.raises(ValueError, match=r"index\.json is not a valid safetensors index"):
        load_model(folder)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": 7}}))
    with pytest.raises(ValueError, match="weight_map values must be shard file names, got 7"):
        load_model(folder)


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors",
                                   "..\\..\\outside.safetensors"])
def test_shard_index_cannot_point_outside_the_folder(tmp_path, entry):
    folder, index, data = _sharded(tmp_path)
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"weight_map entry {re.escape(repr(entry))} points outside the model folder"):
        load_model(folder)


def test_shard_symlink_out_of_the_folder_is_refused(tmp_path):
    folder, index, data = _sharded(tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(ValueError, match=f"weight_map entry '{shard.name}' is a link that resolves outside"):
        load_model(folder)
    # A link that stays inside the folder is fine, and so is the Hugging Face cache layout
    # (snapshots/<rev>/x.safetensors -> ../../blobs/<hash>).
    shard.unlink()
    (folder / "real").mkdir()
    outside.rename(folder / "real" / "shard.safetensors")
    shard.symlink_to(folder / "real" / "shard.safetensors")
    load_model(folder)
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    shutil.copytree(folder, snapshot, symlinks=False)
    for file in snapshot.glob("model-*.safetensors"):
        blob = repo / "blobs" / file.name
        file.rename(blob)
        file.symlink_to(Path("../../blobs") / file.name)
    load_model(snapshot)


def test_float8_tensor_is_named_with_its_dtype(checkpoint):
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(tensors):
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)

    _edit_tensors(checkpoint, edit)
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor {re.escape(name)} has dtype float8_e4m3fn.*"
                                         "unquantized"):
        load_model(checkpoint)


def test_device_errors_are_one_clear_value_error(checkpoint, monkeypatch):
    from miniinfer.loader import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load_model(checkpoint, device="gpu")
    with pytest.raises(ValueError, match="'meta' is not supported"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(ValueError, match="device 'cuda' requested, but .*use device 'cpu'"):
        load_model(checkpoint, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' requested, but this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:3")


def test_load_generation_config(tmp_path):
    from miniinfer.loader import load_generation_config
    from miniinfer.models.bundled import bundled_model_path

    assert load_generation_config(bundled_model_path()) == {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
    file = tmp_path / "generation_config.json"
    assert load_generation_config(tmp_path) == {}  # no file
    file.write_text(json.dumps({"do_sample": True, "temperature": 1, "top_k": 20, "top_p": 0.8, "min_p": 0.05,
                                "repetition_penalty": 1.05, "max_new_tokens": 512, "eos_token_id": [1, 2],
                                "typical_p": None, "transformers_version": "4.45.0"}))
    defaults = load_generation_config(tmp_path)
    assert defaults == {"temperature": 1.0, "top_k": 20, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.05,
                        "max_tokens": 512}
    assert isinstance(defaults["temperature"], float)
    file.write_text(json.dumps({"temperature": None, "max_length": 100}))  # null and max_length: no defaults
    assert load_generation_config(str(tmp_path)) == {}
    for text, match in [("{oops", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                        ('{"temperature": "0.7"}', "temperature must be a number, got '0.7'"),
                        ('{"top_k": 2.5}', "top_k must be an integer"),
                        ('{"max_new_tokens": true}', "max_new_tokens must be an integer")]:
        file.write_text(text)
        with pytest.raises(ValueError, match=f"^{re.escape(str(file))}.*{match}"):
            load_generation_config(tmp_path)
    # Hub ids, missing folders and files are not folders: no defaults, and nothing is downloaded.
    assert load_generation_config("Qwen/Qwen2.5-0.5B-Instruct") == {}
    assert load_generation_config(tmp_path / "missing") == {}
    assert load_generation_config(file) == {}
