"""``miniinfer bench serve``: a tiny sweep against a real server, the overhead measurement, bad arguments.

One server subprocess for the module (the bundled model on CPU); the sweep is 6 requests of 4 tokens at
one finite rate and at ``inf``, so the file runs in well under a minute.
"""

from __future__ import annotations

import json
import math

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from miniinfer.cli import main  # noqa: E402
from miniinfer.server import bench  # noqa: E402
from miniinfer.server.testing import ServerProcess  # noqa: E402

ROW_KEYS = set(bench.COLUMNS)


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--max-num-seqs", "8", "--max-waiting", "1000", "--log-level", "warning")
    yield server
    server.stop()


def test_cli_sweep_writes_the_report(server, tmp_path, capsys):
    out = tmp_path / "serving.json"
    code = main(["bench", "serve", "--url", server.url, "--rates", "20", "inf", "--num-requests", "6",
                 "--max-tokens", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "offered_rps" in printed and f"wrote {out}" in printed
    record = json.loads(out.read_text())
    for key in ("benchmark", "title", "device", "card", "date", "command", "environment", "columns", "rows",
                "summary", "notes"):
        assert key in record, key
    assert record["benchmark"] == "serving" and record["columns"] == bench.COLUMNS
    assert record["environment"]["git_commit"] is None or len(record["environment"]["git_commit"]) >= 7
    rates = [row["offered_rps"] for row in record["rows"]]
    assert rates == [20.0, "inf"]
    for row in record["rows"]:
        assert set(row) == ROW_KEYS  # no private keys leak into the file
        assert row["requests"] == row["ok"] == 6 and row["rejected_503"] == row["errors"] == 0
        assert row["output_tok_s"] > 0 and row["achieved_rps"] > 0 and row["wall_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] <= row["e2e_p99_s"]
        assert 0 < row["itl_p50_s"] <= row["itl_p99_s"]
        assert row["client_cpu_s"] >= 0
        assert row["server_cpu_s"] is None  # a server it did not start: its CPU time is not ours to read
    summary = record["summary"]
    assert summary["num_requests"] == 6 and summary["max_tokens"] == 4 and summary["server"] == server.url
    assert "overhead_at_saturation" not in summary  # only with a server the benchmark starts itself
    assert summary["unloaded_ttft_p50_s"] == record["rows"][0]["ttft_p50_s"]


def test_run_rate_counts_tokens_and_server_cpu(server):
    row = bench.run_rate(server.url, "shakespeare", math.inf, 4, 3, server_pid=server.process.pid)
    assert row["ok"] == 4 and row["_tokens"] == 12
    assert row["server_cpu_s"] is not None and row["server_cpu_s"] > 0
    assert row["_engine_steps"] >= 3 and row["_engine_busy_s"] > 0  # from /debug/engine


def test_overhead_pairs_server_and_offline_runs(server):
    import asyncio

    from miniinfer.server.async_engine import AsyncEngine

    llm = bench.load_offline_llm(None, "cpu", 8)
    bridge = AsyncEngine(bench.load_offline_llm(None, "cpu", 8).engine)
    bridge.start()
    try:
        overhead = bench.measure_overhead(server.url, "shakespeare", server.process.pid, llm, num_requests=4,
                                          max_tokens=3, seed=0, repeats=1, bridge=bridge)
    finally:
        asyncio.run(bridge.shutdown())
    assert overhead["bridge_tok_s"] > 0 and overhead["bridge_vs_offline_tok_per_cpu_s"] > 0
    assert overhead["repeats"] == 1 and len(overhead["runs"]) == 1
    assert overhead["server_tok_s"] > 0 and overhead["offline_tok_s"] > 0
    assert overhead["server_vs_offline_tok_s"] == pytest.approx(overhead["server_tok_s"] / overhead["offline_tok_s"],
                                                                rel=0.01)
    assert overhead["server_tok_per_cpu_s"] > 0 and overhead["offline_tok_per_cpu_s"] > 0
    assert overhead["server_vs_offline_tok_per_cpu_s"] > 0
    assert overhead["offline_steps"] >= 3 and overhead["server_steps"] >= 3
    assert any("per CPU-second" in line for line in bench.overhead_lines(overhead))


def test_overhead_measures_more_servers_in_the_same_pairs(server):
    """``others``: a second server (here the same one, the load generator pinned to one CPU while it loads
    it, as for a server whose engine process has the other CPUs) gets its own summary, against the same
    offline runs; the load generator's CPUs are restored afterwards."""
    import os

    llm = bench.load_offline_llm(None, "cpu", 8)
    before = os.sched_getaffinity(0)
    cpu = {min(before)}
    overhead = bench.measure_overhead(server.url, "shakespeare", server.process.pid, llm, num_requests=4,
                                      max_tokens=3, seed=0, repeats=2,
                                      others={"engine_process": {"url": server.url, "model": "shakespeare",
                                                                 "pid": server.process.pid, "client_cpus": cpu}})
    assert os.sched_getaffinity(0) == before
    other = overhead["engine_process"]
    assert other["repeats"] == 2 and len(other["runs"]) == 2 and other["server_tok_s"] > 0
    assert other["offline_tok_s"] == overhead["offline_tok_s"]  # the same offline runs
    low, high = other["server_vs_offline_tok_s_range"]
    assert low <= other["server_vs_offline_tok_s"] <= high
    assert any("range" in line for line in bench.overhead_lines(other))


@pytest.mark.parametrize("argv, message", [
    (["--rates", "4", "0"], "a rate must be > 0"),
    (["--rates", "fast"], "a rate is a number of requests per second or 'inf'"),
    (["--num-requests", "0"], "must be >= 1"),
    (["--url", "localhost:8000"], "--url must start with http:// or https://"),
    (["--overhead-repeats", "-1"], "--overhead-repeats must be >= 0"),
    (["--engine-cpus", "0"], "--engine-cpus needs --engine-process or --compare-engine-process"),
    (["--engine-process", "--engine-cpus", "x"], "expected CPU numbers"),
])
def test_bad_arguments_give_one_line_and_status_2(argv, message, capsys):
    code = main(["bench", "serve", *argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_percentile_interpolates():
    assert bench.percentile([], 0.5) is None
    assert bench.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert bench.percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)


# -- the hand-over's coalescing (miniinfer/server/async_engine.py), which the overhead measurement motivates --


def _output(new_text: str, new_ids: list[int], finished: bool = False):
    from miniinfer.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(0, "all text so far", [1, 2, 3], "length" if finished else None,
                                  new_text=new_text, new_token_ids=new_ids)
    return RequestOutput("r", "p", [0], [completion], finished=finished)


def test_output_queue_merges_only_unread_outputs():
    import asyncio

    from miniinfer.server.async_engine import OutputQueue

    async def scenario():
        queue = OutputQueue()
        queue.put_nowait(_output(" a", [1]))
        first = await queue.get()  # read: the next one is not merged into it
        queue.put_nowait(_output(" b", [2]))
        queue.put_nowait(_output(" c", [3]))  # unread " b": merged
        queue.put_nowait(_output("", [], finished=True))
        queue.put_nowait(ValueError("not an output"))  # never merged
        return first, [queue.get_nowait() for _ in range(queue.qsize())], queue.num_merged

    first, rest, merged = asyncio.run(scenario())
    assert first.outputs[0].new_text == " a" and merged == 2 and len(rest) == 2
    assert rest[0].outputs[0].new_text == " b c" and rest[0].outputs[0].new_token_ids == [2, 3]
    assert rest[0].finished and rest[0].outputs[0].finish_reason == "length"
    assert isinstance(rest[1], ValueError)


@pytest.mark.parametrize("interval", [1, 3])
def test_stream_interval_sends_the_same_tokens_in_fewer_chunks(interval):
    import asyncio

    from miniinfer import LLM, SamplingParams
    from miniinfer.server.async_engine import AsyncEngine

    llm = LLM(device="cpu", max_num_seqs=4)
    engine = AsyncEngine(llm.engine, stream_interval=interval)
    engine.start()

    async def stream():
        chunks = []
        async for output in await engine.submit("ROMEO.\n", SamplingParams(temperature=0, max_tokens=10)):
            chunks.append(output)
        await engine.shutdown()
        return chunks

    chunks = asyncio.run(stream())
    expected = llm.generate("ROMEO.\n", SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    with_tokens = [c for c in chunks if c.outputs[0].new_token_ids]
    assert "".join(c.outputs[0].new_text for c in chunks) == expected.outputs[0].text
    assert [t for c in chunks for t in c.outputs[0].new_token_ids] == expected.outputs[0].token_ids
    if engine.num_merged_outputs == 0:  # (a reader that falls behind may get the first two merged)
        assert len(with_tokens[0].outputs[0].new_token_ids) == 1  # the first token is never held back
    assert chunks[-1].finished
    if interval == 1:
        assert len(with_tokens) <= 10  # one per token, unless a reader that falls behind gets them merged
    else:  # 1 + 3 + 3 + 3
        assert len(with_tokens) == 4
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncEngine(llm.engine, stream_interval=0)


def test_long_prompts_reach_the_server_and_are_counted(server, tmp_path):
    """--prompt-words: each request's line plus so many words of its own (seeded by its index: the offline
    comparison sends the same prompts), and the summary reports the prompt tokens the server counted."""
    assert bench.prompt_text(3) == bench.PROMPT_LINES[3]
    long = bench.prompt_text(3, 50)
    assert long.startswith(bench.PROMPT_LINES[3]) and len(long.split()) == len(bench.PROMPT_LINES[3].split()) + 50
    assert long == bench.prompt_text(3, 50) and long != bench.prompt_text(13, 50)  # same line, other words
    out = tmp_path / "long.json"
    assert main(["bench", "serve", "--url", server.url, "--rates", "inf", "--num-requests", "4", "--max-tokens", "2",
                 "--prompt-words", "50", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["prompt_words"] == 50 and summary["prompt_tokens_mean"] > 50
    short = tmp_path / "short.json"
    assert main(["bench", "serve", "--url", server.url, "--rates", "inf", "--num-requests", "4", "--max-tokens", "2",
                 "--out", str(short)]) == 0
    assert 0 < json.loads(short.read_text())["summary"]["prompt_tokens_mean"] < 20
    with pytest.raises(ValueError, match="prompt-words"):
        args = bench.argparse.Namespace(overhead_repeats=0, max_waiting=0, url=None, overhead_requests=1,
                                        engine_cpus=None, prompt_words=-1)
        bench.check_arguments(args)
