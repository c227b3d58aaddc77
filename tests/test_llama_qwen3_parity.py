"""Llama (2/3, with and without Llama 3.1's RoPE scaling) and Qwen3 beside Qwen2: our decoder equals HF
transformers' LlamaForCausalLM / Qwen3ForCausalLM on random small configurations (fp32 logits within
1e-5 of the logit range, greedy tokens identical through the engine), and the loader refuses what it does
not run with a message that lists what it does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from miniinfer.loader import load_model
from miniinfer.models.qwen2 import LlamaForCausalLM, Qwen3ForCausalLM

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}

CASES = {  # name: (architecture, config kwargs)
    "llama-GQA-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-MHA-tied-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                          attention_bias=True)),
    "llama3-rope-scaling-GQA": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                              rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "qwen3-GQA-head_dim16": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           tie_word_embeddings=True)),
    "qwen3-MQA-bias-untied": ("qwen3", dict(num_attention_heads=6, num_key_value_heads=1, head_dim=8,
                                            attention_bias=True, tie_word_embeddings=False, rope_theta=1e6)),
}


def assert_logits_match(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (got.double() - expected.double()).abs().max().item()
    span = (expected.max() - expected.min()).item()
    assert error <= 1e-5 * span, f"{what}: max abs error {error} > 1e-5 x logit range {span}"


def make_checkpoint(folder: Path, kind: str, seed: int, **overrides):
    """A random HF Llama/Qwen3 model (every weight randomised, norms and biases too) saved to ``folder``."""
    import transformers

    kwargs = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    kwargs |= overrides
    if kind == "llama":
        rope_scaling = kwargs.pop("rope_scaling", None)
        config = transformers.LlamaConfig(**kwargs)
        if rope_scaling is not None:
            config.rope_parameters = rope_scaling | {"rope_theta": kwargs.get("rope_theta", 10000.0)}
        model = transformers.LlamaForCausalLM(config)
    else:
        kwargs.setdefault("head_dim", 16)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kwargs))
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise if name.endswith("bias") else 0.15 * noise)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_equal_hf(tmp_path, seed, name):
    kind, overrides = CASES[name]
    hf = make_checkpoint(tmp_path, kind, seed, **overrides)
    model, _ = load_model(tmp_path, device="cpu")
    assert isinstance(model, LlamaForCausalLM if kind == "llama" else Qwen3ForCausalLM)
    assert model.config.model_type == kind
    rng = random.Random(seed)
    B, L = rng.randint(1, 3), rng.randint(20, 90)
    ids = torch.randint(0, hf.config.vocab_size, (B, L))
    with torch.no_grad():
        expected = hf(ids).logits
        assert_logits_match(model(ids), expected, f"{name} B={B} L={L}")
        # Far positions: where Llama 3.1's rescaled low frequencies matter most.
        positions = torch.arange(300, 300 + L)[None].expand(B, L)
        assert_logits_match(model(ids, positions), hf(ids, position_ids=positions).logits, f"{name} positions 300+")
        # The fused path (torch references on CPU) computes the same thing, q/k norm included.
        model.enable_fused_kernels(backend="torch")
        assert_logits_match(model(ids), expected, f"{name} fused")
        model.enable_fused_kernels(False)

    # Greedy through the engine (paged KV cache, continuous batching) == HF's greedy generate (two cases: time).
    if name not in ("llama3-rope-scaling-GQA", "qwen3-MQA-bias-untied"):
        return
    from miniinfer import LLM, SamplingParams

    prompts = [ids[0, :7].tolist(), ids[-1, :12].tolist()]
    llm = LLM(str(tmp_path), device="cpu")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            reference = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out.outputs[0].token_ids == reference[0, len(prompt):].tolist(), name


def test_rope_scaling_changes_the_tables(tmp_path, seed):
    """Guard against a silently ignored rope_scaling: the llama3 tables differ from plain RoPE's at far positions,
    and equal HF's inv_freq."""
    hf = make_checkpoint(tmp_path, "llama", seed, head_dim=16, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    model, _ = load_model(tmp_path, device="cpu")
    from miniinfer.models.rope_scaling import rope_inv_freq
    from miniinfer.rope import rope_cos_sin

    inv_freq = rope_inv_freq(16, 500000.0, model.config.rope_scaling)
    torch.testing.assert_close(inv_freq, hf.model.rotary_emb.inv_freq, rtol=0, atol=0)
    plain_cos, _ = rope_cos_sin(512, 16, 500000.0)
    assert not torch.allclose(model.model.rotary_emb.cos[400], plain_cos[400])


def _write_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3.*needs.*low_freq_factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None), "rope scaling 'yarn'"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"),
     "unsupported architecture.*MistralForCausalLM.*Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM"),
])
def test_refusals_name_the_field(tmp_path, changes, match):
    make_checkpoint(tmp_path, "llama", 0)
    _write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path, device="cpu")


def test_qwen3_checkpoint_without_q_norm_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path, "qwen3", 0)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.self_attn\.q_norm\.weight"):
        load_model(tmp_path, device="cpu")
