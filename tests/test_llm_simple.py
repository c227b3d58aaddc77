"""The simple LLM.generate: greedy equals HF generate; stop strings, EOS, n, seeds, validation, CLI."""

from __future__ import annotations

import pytest
import torch

import miniinfer
from miniinfer import LLM, SamplingParams
from miniinfer.attention import sdpa_attention
from miniinfer.cli import main
from miniinfer.components import Components

GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


@pytest.fixture(scope="module")
def llm_no_tokenizer(small_checkpoint) -> LLM:
    return LLM(small_checkpoint[0], device="cpu")


@pytest.fixture(scope="module")
def llm(checkpoint_with_tokenizer) -> LLM:
    return LLM(checkpoint_with_tokenizer[0], device="cpu")


def _hf_greedy(hf, prompt_ids, max_new_tokens, eos=None):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():  # an explicit mask: else HF masks out prompt tokens equal to pad_token_id
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_equals_hf_generate(llm_no_tokenizer, small_checkpoint, seed):
    hf = small_checkpoint[1]
    prompts = [torch.randint(0, hf.config.vocab_size, (n,)).tolist() for n in (1, 6, 23)]
    outs = llm_no_tokenizer.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(hf, prompt, 20), prompt
        assert out.prompt_token_ids == prompt and out.prompt is None
        assert out.finish_reason == "length" and out.text == ""  # no tokenizer: no text


def test_greedy_with_text_prompts_equals_hf(llm, checkpoint_with_tokenizer):
    hf = checkpoint_with_tokenizer[1]
    eos = sorted(llm.tokenizer.eos_token_ids)
    for prompt in ("ROMEO:", "Café 😀"):
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=25), use_tqdm=False)[0]
        ids = llm.tokenizer.encode(prompt)
        expected = _hf_greedy(hf, ids, 25, eos=eos)
        assert out.token_ids == expected
        assert out.prompt == prompt and out.prompt_token_ids == ids
        assert out.text == llm.tokenizer.decode(out.token_ids)
        assert out.finish_reason == ("stop" if expected[-1] in eos else "length")


def test_prompt_forms_and_per_prompt_params(llm):
    ids = llm.tokenizer.encode("JULIET:")
    one = llm.generate("JULIET:", GREEDY, use_tqdm=False)
    assert len(one) == 1
    assert llm.generate(ids, GREEDY, use_tqdm=False)[0].token_ids == one[0].token_ids
    assert llm.generate(torch.tensor(ids), GREEDY, use_tqdm=False)[0].token_ids == one[0].token_ids
    outs = llm.generate(["JULIET:", ids, "ROMEO:"], [GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=3)],
                        use_tqdm=False)
    assert [o.token_ids for o in outs[:2]] == [one[0].token_ids] * 2
    assert len(outs[2].token_ids) <= 3
    assert llm.generate([], GREEDY, use_tqdm=False) == []
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])


def test_stop_strings(llm):
    full = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    assert len(full.text) >= 6, full.text
    stop = full.text[4:6]
    at = full.text.find(stop)
    out = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                stop=["never-appears", stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:at]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


def test_eos_ends_generation_unless_ignored(llm):
    free = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    target = free.token_ids[7]
    first = free.token_ids.index(target)
    # The engine reads the EOS ids once, at start-up: give it this test's id directly.
    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = llm.engine.scheduler.eos_token_ids = frozenset({target})
    try:
        out = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
        ignored = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                               use_tqdm=False)[0]
    finally:
        llm.engine.eos_token_ids = llm.engine.scheduler.eos_token_ids = saved
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]  # EOS id included
    assert ignored.finish_reason == "length" and ignored.token_ids == free.token_ids


def test_n_completions_and_seeds(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=123, n=3, ignore_eos=True)
    a = llm.generate("ROMEO:", params, use_tqdm=False)[0]
    b = llm.generate("ROMEO:", params, use_tqdm=False)[0]
    assert len(a.outputs) == 3 and [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert (a.text, a.token_ids) == (a.outputs[0].text, a.outputs[0].token_ids)
    single = llm.generate("ROMEO:", SamplingParams(temperature=1.0, max_tokens=12, seed=123, ignore_eos=True),
                          use_tqdm=False)[0]
    assert single.token_ids == a.outputs[0].token_ids  # completion i uses seed + i, whatever n is
    greedy = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=12, n=2), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_validation_happens_before_any_work(small_checkpoint):
    calls = []

    def counting_attention(*args, **kwargs):
        calls.append(1)
        return sdpa_attention(*args, **kwargs)

    llm = LLM(small_checkpoint[0], components=Components(attention=counting_attention), device="cpu")
    V, limit = llm.config.vocab_size, llm.config.max_position_embeddings
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        llm.generate([[1, 2], []], GREEDY)
    with pytest.raises(ValueError, match=f"prompt 1: token id {V} is outside the vocabulary \\[0, {V}\\)"):
        llm.generate([[1, 2], [3, V]], GREEDY)
    with pytest.raises(ValueError, match=f"prompt 1: the prompt has {limit} tokens but the context holds {limit}"):
        llm.generate([[1, 2], [1] * limit], GREEDY)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text")
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([[1]], [{"temperature": 0}])
    assert calls == []
    out = llm.generate([[1, 2]], GREEDY, use_tqdm=False)[0]
    assert len(calls) > 0 and len(out.token_ids) == 20


def test_components_give_same_greedy_output(small_checkpoint, llm_no_tokenizer):
    other = LLM(small_checkpoint[0], components=Components(attention=sdpa_attention), device="cpu")
    prompt = [5, 9, 2, 33]
    assert other.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids == \
        llm_no_tokenizer.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids


def test_cli_generate(checkpoint_with_tokenizer, llm, capsys):
    folder = str(checkpoint_with_tokenizer[0])
    assert main(["generate", "--model", folder, "--prompt", "ROMEO:", "--max-tokens", "8", "--temperature", "0",
                 "--device", "cpu"]) == 0
    expected = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].text
    assert capsys.readouterr().out == "ROMEO:" + expected + "\n"
    assert main(["generate", "--model", folder, "--prompt", "x", "--top-p", "0"]) == 2
    assert "SamplingParams.top_p" in capsys.readouterr().err
    assert main(["generate", "--model", folder + "-missing", "--prompt", "x"]) == 2
    assert "no model folder" in capsys.readouterr().err


def test_default_model_is_the_bundled_one():
    try:
        miniinfer.bundled_model_path("shakespeare")
    except FileNotFoundError:
        with pytest.raises(FileNotFoundError, match="bundled model 'shakespeare'"):
            LLM()
        return
    out = LLM(device="cpu").generate("ROMEO:", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert len(out.token_ids) >= 1
