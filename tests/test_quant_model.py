"""quantize_model on the bundled Shakespeare model, GPTQ against RTN on held-out perplexity, GPTQ
checkpoints written and loaded back through load_model, and LLM(quantization=...)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import miniinfer
from miniinfer.quant import FP8Linear, GroupQuantLinear, Int8Linear, W8A8Linear
from miniinfer.quant.checkpoint import save_gptq_checkpoint
from miniinfer.quant.data import calibration_evaluation_split, perplexity
from miniinfer.quant.model import quantizable_linears, quantize_model

PATH = miniinfer.bundled_model_path("shakespeare")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def token_ids() -> tuple[list[int], list[int]]:
    _, tokenizer = miniinfer.load_model(PATH, device="cpu")
    calibration, evaluation = calibration_evaluation_split()
    return tokenizer.encode(calibration)[:2048], tokenizer.encode(evaluation)[:2057]


def fresh():
    return miniinfer.load_model(PATH, device="cpu")[0]


def test_split_is_disjoint():
    calibration, evaluation = calibration_evaluation_split()
    assert calibration + evaluation == miniinfer.quant.data.heldout_text()
    assert 0.3 < len(calibration) / (len(calibration) + len(evaluation)) < 0.4


@pytest.mark.parametrize("method,cls", [("int8", Int8Linear), ("w8a8", W8A8Linear), ("int4", GroupQuantLinear),
                                        ("fp8", FP8Linear)])
def test_quantize_model_methods(method, cls):
    model = fresh()
    ids = torch.tensor([token_ids()[1][:40]])
    reference = model(ids)
    quantize_model(model, method)
    for name in quantizable_linears(model):
        assert isinstance(model.get_submodule(name), cls)
    logits = model(ids)
    rel = float((logits - reference).norm() / reference.norm())
    assert rel < {"int8": 0.02, "w8a8": 0.05, "int4": 0.15, "fp8": 0.1}[method], rel
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding / tied head stays float


def test_gptq_beats_rtn_on_heldout_perplexity():
    calibration, evaluation = token_ids()
    # int3, where the gap is clear on this much text (int4: benchmarks/results/quant_quality_cpu.json).
    rtn = perplexity(quantize_model(fresh(), "int4", 3, 128), evaluation)
    gptq = perplexity(quantize_model(fresh(), "gptq", 3, 128, calibration=calibration), evaluation)
    assert gptq < rtn - 0.3, (gptq, rtn)


def test_gptq_checkpoint_round_trip(tmp_path):
    model = quantize_model(fresh(), "gptq", 4, 128, calibration=token_ids()[0][:512], act_order=True)
    folder = save_gptq_checkpoint(model, tmp_path / "gptq", PATH)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 128
    assert config["desc_act"] is True and config["checkpoint_format"] in ("gptq", "gptq_v2")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.qweight").shape == (256 // 8, 64)
        assert f.get_tensor("model.layers.0.mlp.down_proj.qzeros").shape == (4, 256 // 8)
        g_idx = f.get_tensor("model.layers.0.self_attn.q_proj.g_idx")
        assert g_idx.dtype == torch.int32 and not torch.equal(g_idx, g_idx.sort().values)  # act_order
        assert torch.equal(g_idx, f.get_tensor("model.layers.0.self_attn.v_proj.g_idx"))
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.mlp.gate_proj.scales" in names
    loaded, tokenizer = miniinfer.load_model(folder, device="cpu")
    assert tokenizer is not None
    layer, original = loaded.model.layers[2].mlp.gate_up_proj, model.model.layers[2].mlp.gate_up_proj
    assert isinstance(layer, GroupQuantLinear)
    # Same integers; scales went through float16.
    torch.testing.assert_close(layer.dequantized_weight(), original.dequantized_weight(), atol=2e-4, rtol=1e-3)
    ids = torch.tensor([token_ids()[1][:64]])
    torch.testing.assert_close(loaded(ids), model(ids), atol=0.05, rtol=0.01)
    llm = miniinfer.LLM(folder, device="cpu")
    out = llm.generate(["ROMEO:"], miniinfer.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert len(out[0].token_ids) == 8
    with pytest.raises(ValueError, match="already a GPTQ checkpoint"):
        miniinfer.LLM(folder, device="cpu", quantization="int8")


def test_llm_quantization_option():
    params = miniinfer.SamplingParams(temperature=0.0, max_tokens=12)
    llm = miniinfer.LLM(device="cpu", quantization="int4")
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, GroupQuantLinear)
    out = llm.generate(["KING:"], params, use_tqdm=False)[0]
    assert len(out.token_ids) == 12 and out.text.strip()
    with pytest.raises(ValueError, match="quantization must be one of"):
        miniinfer.LLM(device="cpu", quantization="int5")
