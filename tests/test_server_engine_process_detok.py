"""``--engine-process``: streamed text made in the server's process from the child's token ids.

For a plain streamed request (one completion, no stop strings, no logprobs) the engine's process sends
only new token ids; :class:`~miniinfer.server.engine_process.RemoteEngine` detokenizes them in the
parent. What a consumer sees must not change: the same outputs, step by step, as the engine streaming in
this process — checked on a byte-level BPE whose random model emits characters of 1 to 4 UTF-8 bytes
(tokens that end inside a character), with EOS stops, an abort, and requests that keep the engine's own
streaming (stop strings, n > 1, logprobs) in the same batch. Also: ``--engine-cpus``' CPU lists.
"""

from __future__ import annotations

import os

import pytest

from miniinfer.sampling import SamplingParams
from miniinfer.server.engine_process import RemoteEngine, format_cpu_list, parse_cpu_list

PROMPTS = ["Café crème", "中文字符", "Emoji: 😀", "ROMEO: But, soft!", "naïve", "日本語の"]


def _requests(tokenizer):
    requests = []
    for i, prompt in enumerate(PROMPTS * 2):
        params = dict(temperature=1.0, seed=100 + i, max_tokens=6 + 3 * i)
        if i == 7:
            params.update(stop=["e", "の"])          # the engine's own streaming: stop strings
        elif i == 8:
            params.update(n=2)                       # ... several completions
        elif i == 9:
            params.update(logprobs=2)                # ... logprobs
        elif i == 10:
            params.update(skip_special_tokens=False)
        elif i == 4:
            params.update(stop_token_ids=list(range(3, 120)))  # a token-level stop, soon
        elif i == 11:
            params.update(logit_bias={0: 3.0})       # EOS (id 0) likely: its token is not text
        requests.append((f"r{i}", tokenizer.encode(prompt), SamplingParams(**params)))
    return requests


def _rounded(logprobs):
    """Logprobs to 3 decimals: the child may run one more step with the aborted request in the batch,
    which can move a logprob of the others in its last digits (never which token is sampled here)."""
    if logprobs is None:
        return None
    return [{token: round(value, 3) for token, value in entry.items()} for entry in logprobs]


def _drive(engine, requests, abort_at: dict[str, int]) -> dict[str, list]:
    """Add the requests (half at once, half after two steps), step to the end, abort some after N outputs;
    every request's outputs as (text, token ids, new text, new token ids, finish reasons, finished)."""
    seen: dict[str, list] = {request_id: [] for request_id, _, _ in requests}
    for request_id, token_ids, params in requests[:6]:
        engine.add_request(token_ids, params, request_id=request_id, stream=True)
    steps = 0
    while engine.has_unfinished_requests() or steps < 3:
        if steps == 2:
            for request_id, token_ids, params in requests[6:]:
                engine.add_request(token_ids, params, request_id=request_id, stream=True)
        for output in engine.step():
            seen[output.request_id].append([(c.index, c.text, list(c.token_ids), c.new_text, list(c.new_token_ids),
                                             c.finish_reason, c.stop_reason, _rounded(c.logprobs))
                                            for c in output.outputs] + [output.finished, output.num_cached_tokens])
            if len(seen[output.request_id]) == abort_at.get(output.request_id):
                engine.abort_request(output.request_id)
        steps += 1
    return seen


@pytest.fixture(scope="module")
def remote(checkpoint_with_tokenizer):
    folder, _ = checkpoint_with_tokenizer
    remote = RemoteEngine(folder, dict(device="cpu", seed=0, max_num_seqs=16))
    yield remote
    remote.close()


def test_parent_detokenized_streams_match_the_engines_own(checkpoint_with_tokenizer, remote):
    from miniinfer import LLM

    folder, _ = checkpoint_with_tokenizer
    local = LLM(folder, device="cpu", seed=0, max_num_seqs=16).engine
    requests = _requests(local.tokenizer)
    assert remote.detokenize_in_parent and sum(remote._plain(p) for _, _, p in requests) >= 8
    abort_at = {"r2": 2}
    expected = _drive(local, requests, abort_at)
    got = _drive(remote, requests, abort_at)
    assert not remote._detokenized  # every parent-side state ended with its request
    for request_id, _, _ in requests:
        if request_id in abort_at:  # the child may have run one more step before the abort reached it
            outputs = got[request_id]
            assert outputs[:abort_at[request_id]] == expected[request_id][:abort_at[request_id]]
            final = outputs[-1][0]
            assert final[5] == "abort" and final[1] == "".join(step[0][3] for step in outputs)
            assert final[2] == [t for step in outputs for t in step[0][4]]
            continue
        assert got[request_id] == expected[request_id], request_id
    texts = "".join(step[0][3] for outputs in expected.values() for step in outputs)
    assert any(len(ch.encode()) > 1 for ch in texts)  # multi-byte characters were streamed
    assert expected["r2"][-1][0][5] == "abort"
    stops = {request_id: outputs[-1][0][6] for request_id, outputs in expected.items() if outputs[-1][0][5] == "stop"}
    assert stops.get("r11", "none") is None and isinstance(stops.get("r4"), int), stops  # EOS; a stop token


def test_cpu_lists():
    assert parse_cpu_list("0") == {0}
    allowed = os.sched_getaffinity(0)
    if {0, 1} <= allowed:
        assert parse_cpu_list("0-1") == {0, 1} == parse_cpu_list("1,0")
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    for bad in ["", "a", "1-0", "-1", "0,,1"]:
        with pytest.raises(ValueError, match="CPU numbers"):
            parse_cpu_list(bad)
    with pytest.raises(ValueError, match="not available"):
        parse_cpu_list(str(max(allowed) + 1000))


def test_engine_cpus_needs_the_engine_process(capsys):
    from miniinfer.cli import main

    assert main(["serve", "--engine-cpus", "0"]) == 2
    assert "--engine-cpus needs --engine-process" in capsys.readouterr().err


def test_engine_placement_defaults_to_a_process_on_a_gpu_only():
    """``miniinfer serve``: --engine-process / --no-engine-process as given; without either, a process when the
    engine runs on a GPU (the H200 measured 0.48x of offline throughput with a thread, 0.80x with a process)
    and a thread on a CPU. The device's default (no --device) follows torch.cuda.is_available()."""
    import argparse

    import torch

    from miniinfer.server.serve import add_serve_arguments, use_engine_process

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    decide = lambda *argv: use_engine_process(parser.parse_args(list(argv)))  # noqa: E731
    assert decide("--device", "cpu") is False
    assert decide("--device", "cuda") is True and decide("--device", "cuda:1") is True
    assert decide("--device", "cuda", "--no-engine-process") is False
    assert decide("--device", "cpu", "--engine-process") is True
    assert decide() is torch.cuda.is_available()
