"""Chapter 12: our Qwen2-MoE equals HF transformers' Qwen2MoeForCausalLM (fp32 logits within 1e-5 of the
logit range, greedy tokens identical) on the bundled ``shakespeare-moe`` and on random small configs;
``load_model`` and ``LLM`` accept it."""

from __future__ import annotations

import pytest
import torch

import miniinfer
from miniinfer.models.qwen2_moe import Qwen2MoeForCausalLM, load_qwen2_moe, route


def assert_close(got, expected, what):
    error = (got.double() - expected.double()).abs().max().item()
    span = (expected.max() - expected.min()).item()
    print(f"{what}: max abs error {error:.3g}, logit range {span:.3g}")
    assert error <= 1e-5 * span, f"{what}: max abs error {error} > 1e-5 x logit range {span}"


@pytest.fixture(scope="module")
def bundled():
    import transformers

    path = miniinfer.bundled_model_path("shakespeare-moe")
    ours, tokenizer = load_qwen2_moe(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tokenizer.encode("JULIET.\n")
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    return ours, hf, tokenizer, prompt, greedy


def test_bundled_logits_and_greedy_equal_hf(bundled):
    ours, hf, tokenizer, prompt, greedy = bundled
    assert isinstance(ours, Qwen2MoeForCausalLM)
    ids = torch.tensor([tokenizer.encode("ROMEO.\nBut soft, what light")])
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, "shakespeare-moe")
        # Greedy: the next token after prompt + HF's greedy tokens is HF's at every step (one forward).
        tokens = torch.tensor([prompt + greedy])
        assert ours(tokens)[0, len(prompt) - 1:-1].argmax(-1).tolist() == greedy


@pytest.mark.parametrize("norm_topk_prob,shared,sparse_step", [(False, 24, 1), (True, 0, 2)])
def test_random_config_equals_hf(tmp_path, norm_topk_prob, shared, sparse_step):
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
        shared_expert_intermediate_size=shared, norm_topk_prob=norm_topk_prob, decoder_sparse_step=sparse_step,
        tie_word_embeddings=False, max_position_embeddings=128, pad_token_id=None, bos_token_id=None,
        eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours, _ = miniinfer.load_model(tmp_path)
    assert isinstance(ours, Qwen2MoeForCausalLM)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, f"random norm_topk_prob={norm_topk_prob} shared={shared}")


def test_route_softmax_then_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, experts = route(logits, 2)
    probs = torch.softmax(logits, -1)[0]
    assert experts.tolist() == [[0, 1]] and torch.allclose(weights[0], probs[:2])
    weights, _ = route(logits, 2, norm_topk_prob=True)
    assert torch.allclose(weights.sum(-1), torch.ones(1))


def test_load_model_and_llm_accept_moe(bundled):
    ours, hf, tokenizer, prompt, greedy = bundled
    llm = miniinfer.LLM(miniinfer.bundled_model_path("shakespeare-moe"), num_kv_blocks=64)  # through load_model
    assert isinstance(llm.model, Qwen2MoeForCausalLM)
    out = llm.generate([prompt], miniinfer.SamplingParams(temperature=0.0, max_tokens=len(greedy)), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == greedy
