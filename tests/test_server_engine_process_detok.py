"""``--engine-process``: streamed text made in the server's process from the child's token ids.

For a plain streamed request (one completion, no stop strings, no logprobs) the engine's process sends
only new token ids; :class:`~miniinfer.server.engine_process.RemoteEngine` detokenizes them in the
parent. What a consumer sees must not change: the same outputs, step by step, as the engine streaming in
this process — checked on a byte-level BPE whose random model emits characters of 1 to 4 UTF-8 bytes
(tokens that end inside a character), with EOS stops, an abort, and requests that keep the engine's own
streaming (stop strings, n > 1, logprobs) in the same batch. Also: ``--engine-cpus``' CPU lists.
"""

from __future__ import annotations

import asyncio
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


def _drive_deferred(remote, requests, merge_every: int) -> dict[str, list]:
    """As :func:`_drive` without aborts, with ``deferred_outputs``: each request's PendingTokens are held and
    merged ``merge_every`` at a time (a lagging reader's queue, :class:`OutputQueue`), then made into outputs;
    returns what the reader saw: (text, token ids, new text, new token ids, finish reason) per event."""
    from miniinfer.server.async_engine import DeferredOutput, merge_outputs

    seen: dict[str, list] = {request_id: [] for request_id, _, _ in requests}
    held: dict[str, tuple] = {}
    for request_id, token_ids, params in requests:
        remote.add_request(token_ids, params, request_id=request_id, stream=True)

    def read(output):
        c = output.outputs[0]
        seen[output.request_id].append((c.text, list(c.token_ids), c.new_text, list(c.new_token_ids), c.finish_reason))

    while remote.has_unfinished_requests():
        for output in remote.step():
            if not isinstance(output, DeferredOutput):
                read(output)
                continue
            pending, count = held.pop(output.request_id, (None, 0))
            merged = output if pending is None else merge_outputs(pending, output)
            if output.finished or count + 1 >= merge_every:
                read(merged.materialize())
            else:
                held[output.request_id] = (merged, count + 1)
    return seen


def test_deferred_outputs_read_merged_or_not_give_the_same_stream(checkpoint_with_tokenizer, remote):
    """``deferred_outputs`` (what ``miniinfer serve`` uses): the text is made by the reader, once per event.
    Read one by one, the events equal the undeferred ones; merged three at a time (a reader that lags), each
    event's new text and tokens are the concatenation of the ones it replaces, and the final text is the same."""
    requests = [(f"d{i}", token_ids, params) for i, (_, token_ids, params) in enumerate(_requests(remote.tokenizer))
                if remote._plain(params)]
    assert len(requests) >= 8
    remote.deferred_outputs = False
    expected = _drive_deferred(remote, [(f"{r}a", t, p) for r, t, p in requests], merge_every=1)
    remote.deferred_outputs = True
    try:
        one_by_one = _drive_deferred(remote, [(f"{r}b", t, p) for r, t, p in requests], merge_every=1)
        merged = _drive_deferred(remote, [(f"{r}c", t, p) for r, t, p in requests], merge_every=3)
    finally:
        remote.deferred_outputs = False
    assert not remote._detokenized
    for request_id, _, _ in requests:
        want = expected[f"{request_id}a"]
        assert one_by_one[f"{request_id}b"] == want, request_id
        got = merged[f"{request_id}c"]
        assert len(got) <= len(want)
        assert got[-1][:2] == want[-1][:2] and got[-1][4] == want[-1][4]  # final text, tokens, finish reason
        assert "".join(event[2] for event in got) == "".join(event[2] for event in want) == want[-1][0]
        assert [t for event in got for t in event[3]] == want[-1][1]
        for event in got:  # cumulative text and tokens: consistent with the deltas so far
            assert event[0].endswith(event[2])
    assert sum(len(v) for v in merged.values()) < sum(len(v) for v in expected.values()) / 2  # merging happened


def test_the_event_loop_pump_keeps_the_pipe_blocking_and_carries_large_steps(remote):
    """With AsyncEngine started in a running loop, the event loop reads the engine's pipe (no bridge thread).
    uvloop makes a watched descriptor non-blocking, which made a step's message that arrived in pieces read
    as a dead engine on an H200: the pump sets it back. A step carrying ~0.5 MB (top-20 logprobs of a few
    hundred tokens, more than a socket buffer) must arrive whole, under uvloop where it is installed."""
    from miniinfer.server.async_engine import AsyncEngine

    async def main():
        engine = AsyncEngine(remote)
        engine.start()
        try:
            assert engine._pump_loop is not None and engine._thread is None
            assert os.get_blocking(remote.fileno())
            params = SamplingParams(temperature=1.0, seed=3, max_tokens=200, ignore_eos=True, logprobs=20)
            streams = [await engine.submit(remote.tokenizer.encode(prompt), params) for prompt in PROMPTS[:4]]
            finals = []
            for stream in streams:
                outputs = [output async for output in stream]
                finals.append(outputs[-1])
            assert [len(f.outputs[0].token_ids) for f in finals] == [200] * 4
            assert all(len(entry) >= 20 for f in finals for entry in f.outputs[0].logprobs)
        finally:
            await engine.shutdown()
        assert not engine.is_running and not remote.has_unfinished_requests()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def test_auto_engine_cpus_takes_whole_physical_cores(tmp_path):
    """``--engine-cpus auto``: the last physical core with all its hyperthreads (two cores without SMT),
    and only when at least four CPUs remain for the server."""
    from miniinfer.server.engine_process import auto_engine_cpus, physical_cores

    def topology(siblings: dict[int, str]):
        for cpu, text in siblings.items():
            folder = tmp_path / f"cpu{cpu}" / "topology"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "core_cpus_list").write_text(text + "\n")

    topology({cpu: f"{cpu % 8},{cpu % 8 + 8}" for cpu in range(16)})  # 8 cores x 2 hyperthreads
    assert physical_cores(range(16), str(tmp_path))[0] == [0, 8]
    assert auto_engine_cpus(range(16), str(tmp_path)) == {7, 15}
    assert auto_engine_cpus({0, 8, 1, 9, 2, 10}, str(tmp_path)) == {2, 10}
    assert auto_engine_cpus({0, 8, 1, 9}, str(tmp_path)) is None  # two CPUs left: not enough
    no_smt = tmp_path / "flat"
    for cpu in range(16):
        folder = no_smt / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "core_cpus_list").write_text(f"{cpu}\n")
    assert auto_engine_cpus(range(16), str(no_smt)) == {14, 15}
    assert auto_engine_cpus(range(16), str(tmp_path / "missing")) == {14, 15}  # no sysfs: a CPU per core


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
