"""Configs that would load and then compute garbage are refused, naming the file and the field.

Each case here used to pass silently (``bool("false")`` is True, a zero ``rope_theta`` gives NaN
rotations) or fail far away with a TypeError that named neither.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from miniinfer.loader import load_model
from miniinfer.models.config import MAX_POSITION_EMBEDDINGS, Qwen2Config

# A small but complete Qwen2.5-style config.json.
VALID = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "vocab_size": 101,
         "hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2,
         "rope_scaling": None, "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": 0}


def _config_file(tmp_path, hf) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    return str(path)


def test_valid_config_still_loads(tmp_path):
    _config_file(tmp_path, VALID)
    config = Qwen2Config.from_folder(tmp_path)
    assert (config.head_dim, config.tie_word_embeddings, config.max_position_embeddings) == (12, False, 256)
    # Fields written out as null mean "the default", as in transformers.
    nulls = {**VALID, "num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": None,
             "max_window_layers": None}
    config = Qwen2Config.from_hf_dict(nulls)
    assert (config.num_key_value_heads, config.head_dim, config.tie_word_embeddings) == (4, 12, False)


@pytest.mark.parametrize("changes, field, why", [
    ({"rope_theta": 0}, "rope_theta", "positive number"),
    ({"rope_theta": -10000.0}, "rope_theta", "positive number"),
    ({"rope_theta": "1e6"}, "rope_theta", r"positive number, got '1e6' \(a JSON string\)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, "rope_parameters.rope_theta", "positive"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps", "positive number"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps", "positive number"),
    ({"rms_norm_eps": None}, None, None),  # null: the default, fine
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings", r"true or false .*'false' \(a JSON string\)"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings", "true or false"),
    ({"hidden_size": "48"}, "hidden_size", r"positive integer, got '48' \(a JSON string\)"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers", "positive integer"),
    ({"vocab_size": 101.0}, "vocab_size", "positive integer"),
    ({"intermediate_size": True}, "intermediate_size", "positive integer"),
    ({"num_key_value_heads": "2"}, "num_key_value_heads", "positive integer"),
    ({"head_dim": "12"}, "head_dim", "positive integer"),
    ({"max_position_embeddings": "256"}, "max_position_embeddings", "positive integer"),
    ({"hidden_size": 0}, "hidden_size", "positive integer"),
    ({"intermediate_size": -72}, "intermediate_size", "positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads", "positive integer"),
    ({"num_key_value_heads": 0}, "num_key_value_heads", "positive integer"),
    ({"head_dim": -12}, "head_dim", "positive integer"),
    ({"max_position_embeddings": 0}, "max_position_embeddings", "positive integer"),
    ({"num_key_value_heads": 3}, "num_attention_heads", r"\(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"hidden_size": 50}, "hidden_size", r"\(50\) is not divisible by num_attention_heads \(4\).*head_dim"),
    ({"head_dim": 7}, "head_dim", "even"),
    ({"max_position_embeddings": 10**9}, "max_position_embeddings", "1,000,000,000.*max_model_len"),
    ({"eos_token_id": "0"}, "eos_token_id", "token id"),
    ({"eos_token_id": [0, -1]}, "eos_token_id", "token id"),
    ({"rope_scaling": "none"}, "rope_scaling", "object or null"),
    ({"architectures": "Qwen2ForCausalLM"}, "architectures", "list of class names"),
    ({"layer_types": "full_attention"}, "layer_types", "must be a list"),
    ({"use_sliding_window": True, "max_window_layers": "1"}, "max_window_layers", "integer"),
    ({"torch_dtype": 16}, "torch_dtype", "dtype name"),
])
def test_bad_field_is_named_with_its_file(tmp_path, changes, field, why):
    source = _config_file(tmp_path, {**VALID, **changes})
    if field is None:
        Qwen2Config.from_folder(tmp_path)
        return
    with pytest.raises(ValueError, match=why) as info:
        Qwen2Config.from_folder(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{source}: {field} "), message


def test_head_dim_field_allows_hidden_size_not_divisible_by_heads():
    """Qwen2 allows q_size = H·D != E when config.json states head_dim."""
    config = Qwen2Config.from_hf_dict({**VALID, "hidden_size": 50, "head_dim": 16})
    assert (config.head_dim, config.q_size) == (16, 64)


@pytest.mark.parametrize("document, kind", [([VALID], "array"), ("config", "string"), (None, "null"), (3, "number")])
def test_config_json_must_be_an_object(tmp_path, document, kind):
    source = _config_file(tmp_path, document)
    with pytest.raises(ValueError, match=f"^{source} must hold a JSON object .*got a JSON {kind}$"):
        Qwen2Config.from_folder(tmp_path)


def test_direct_construction_is_checked_too():
    fields = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=4)
    Qwen2Config(**fields)
    for bad in (dict(rope_theta=0.0), dict(rms_norm_eps=-1.0), dict(tie_word_embeddings="false"),
                dict(rope_theta=float("nan")), dict(hidden_size="8")):
        with pytest.raises(ValueError, match=f"^config: {next(iter(bad))} must be"):
            Qwen2Config(**{**fields, **bad})


def test_max_model_len_caps_the_positions_the_model_is_built_for(tmp_path, small_checkpoint):
    """Above MAX_POSITION_EMBEDDINGS a config needs max_model_len, which also sizes the RoPE tables: nothing
    is allocated in proportion to the declared 10**9 positions."""
    folder = tmp_path / "model"
    shutil.copytree(small_checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config\.json: max_position_embeddings is 1,000,000,000, more than .*"
                                         rf"{MAX_POSITION_EMBEDDINGS:,}.*pass max_model_len"):
        load_model(folder, device="cpu")
    model, _ = load_model(folder, device="cpu", max_model_len=64)
    assert model.config.max_position_embeddings == 64
    tables = [b for name, b in model.named_buffers() if "rotary" in name]
    assert tables and all(b.shape[0] == 64 for b in tables)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 101)
    # A max_model_len above what the config declares changes nothing; a bad one is refused.
    assert Qwen2Config.from_hf_dict(VALID, max_model_len=4096).max_position_embeddings == 256
    with pytest.raises(ValueError, match="max_model_len must be a positive integer"):
        Qwen2Config.from_hf_dict(VALID, max_model_len=0)
