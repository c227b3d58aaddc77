"""``miniinfer serve --engine-process``: where the engine-process (pump) mode and the thread mode part ways.

Each test here failed when it was written, because of a bug of the engine-process mode only (the thread
mode gets the same scenario right):

* the waiting-queue bound (``--max-waiting``) leaks: adds already sent to the child but not yet counted
  in its last report are forgotten, so every request that arrives during one engine step is admitted;
* after a step that fails in the child, the aborts of its requests stay in ``RemoteEngine``'s outbox:
  the child keeps the failed requests (and, for a failure that repeats, spins sending ``step_failed``
  thousands of times a second), and the stale failures fail the next, innocent request.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from miniinfer.server.testing import ServerProcess  # noqa: E402

MODEL = "shakespeare"
MAX_NUM_SEQS, MAX_WAITING = 4, 8


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--engine-process", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting",
                           str(MAX_WAITING), "--num-kv-blocks", "256", "--seed", "0")
    yield server
    server.stop()


def test_max_waiting_bounds_admission_while_the_engine_steps(server):
    """Thread mode: at most max_num_seqs running + max_waiting queued requests are admitted (the rest: 503).
    Engine-process mode: a long prefill keeps the child in one step; every request that arrives meanwhile
    in its own event-loop turn is admitted, because the parent's count is "the child's last report + adds
    not yet sent", and the adds sent since that report are in neither."""
    long_prompt = "KING.\nWhat news, my lord?\n" * 38  # ~1000 tokens: one prefill step of a few hundred ms

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            async def post(body, delay):
                await asyncio.sleep(delay)
                return (await client.post(server.url + "/v1/completions", json=body)).status_code

            longs = [post({"model": MODEL, "prompt": f"{i} {long_prompt}", "max_tokens": 1}, 0) for i in range(2)]
            short = {"model": MODEL, "prompt": "ROMEO.\n", "max_tokens": 48, "ignore_eos": True}
            shorts = [post(short, 0.05 + 0.003 * i) for i in range(50)]  # while the prefill step runs
            codes = await asyncio.gather(*longs, *shorts)
            return codes[2:]

    codes = asyncio.run(burst())
    assert set(codes) <= {200, 503}, codes
    admitted = codes.count(200)
    # None of the short requests can finish during the burst (48 tokens each, 4 at a time): the bound holds.
    assert admitted <= MAX_NUM_SEQS + MAX_WAITING, f"{admitted} requests admitted with max_num_seqs={MAX_NUM_SEQS}, " \
                                                   f"max_waiting={MAX_WAITING}"
    server.wait_idle(30)


# -- a step that fails in the engine's process -------------------------------------------------------------

FAILING_PROMPT_LEN = 37


def failing_plan_step(running, waiting, budget, max_num_seqs, chunked):
    """An EngineHooks.plan_step (run in the child, imported from this module) that fails every step in which
    a prompt of FAILING_PROMPT_LEN uncomputed tokens waits: a step-level failure the engine does not contain,
    as a scheduler bug would be."""
    from miniinfer.engine.scheduler import plan_step

    if FAILING_PROMPT_LEN in waiting:
        raise RuntimeError(f"plan_step refuses a waiting prompt of {FAILING_PROMPT_LEN} tokens")
    return plan_step(running, waiting, budget, max_num_seqs, chunked)


def test_a_failed_step_in_the_engine_process_fails_its_requests_only(capfd):
    """Thread mode (AsyncEngine._fail_all on the engine itself): the failed step's request gets the error
    and is aborted at once; one failure is logged; the next request runs normally.
    Engine-process mode: _fail_all's aborts wait in RemoteEngine's outbox (the pump flushes only when
    AsyncEngine has commands), so the child keeps failing the same step as fast as it can (thousands of
    step_failed messages a second, each logged), and the next request is failed by those stale messages."""
    from miniinfer.engine.hooks import EngineHooks
    from miniinfer.models.bundled import bundled_model_path
    from miniinfer.sampling import SamplingParams
    from miniinfer.server.async_engine import AsyncEngine
    from miniinfer.server.engine_process import RemoteEngine

    remote = RemoteEngine(bundled_model_path(), dict(device="cpu", seed=0, max_num_seqs=4, num_kv_blocks=64,
                                                     hooks=EngineHooks(plan_step=failing_plan_step)),
                          deferred_outputs=True)
    failed_steps = []  # the pump's log of each failed step (not propagated: with the bug, thousands)

    class Count(logging.Handler):
        def emit(self, record):
            if "step failed" in record.getMessage():
                failed_steps.append(record)

    logger, counter = logging.getLogger("miniinfer.server.engine"), Count(logging.ERROR)
    logger.addHandler(counter)
    logger.propagate = False
    params = SamplingParams(max_tokens=5, temperature=0)

    async def main():
        engine = AsyncEngine(remote, max_waiting=8)
        engine.start()
        assert engine._pump_loop is not None  # the engine-process mode's pump, as under `miniinfer serve`
        try:
            doomed = await engine.submit([5] * FAILING_PROMPT_LEN, params)
            with pytest.raises(RuntimeError, match="plan_step refuses"):
                async for _ in doomed:
                    pass
            await asyncio.sleep(1.0)
            failures = len(failed_steps)
            innocent = await engine.submit([6] * 10, params)
            try:
                outputs = [output async for output in innocent]
                reason = outputs[-1].outputs[0].finish_reason
            except RuntimeError as error:
                reason = f"failed: {error}"
            return failures, reason
        finally:
            remote.flush()
            await engine.shutdown()

    try:
        failures, reason = asyncio.run(main())
    finally:
        remote.close(timeout=5)
        logger.removeHandler(counter)
        logger.propagate = True
        capfd.readouterr()  # the child's tracebacks (with the bug: one per failed step)
    assert (failures <= 3, reason) == (True, "length"), \
        f"one failed step: {failures} step failures logged within 1 s; the next request: {reason}"


def test_a_burst_reaches_the_engine_without_waiting_for_the_loops_next_turn():
    """A burst of requests: every request handler of one event-loop turn runs before the callback that
    sends queued adds to the child, so with the adds batched per turn the engine waited until the loop
    had parsed and validated the whole burst, then filled its batch over partly empty steps (on an H200,
    768 requests at once: 845 steps where offline ran 768). An add that finds a free seat in the engine's
    batch now goes at once; past a full batch, adds wait for the turn, batched, as before (they would
    only wait in the engine's queue)."""
    from miniinfer.models.bundled import bundled_model_path
    from miniinfer.sampling import SamplingParams
    from miniinfer.server.async_engine import AsyncEngine
    from miniinfer.server.engine_process import RemoteEngine

    seats = 3
    remote = RemoteEngine(bundled_model_path(), dict(device="cpu", seed=0, max_num_seqs=seats, num_kv_blocks=64),
                          deferred_outputs=True)
    params = SamplingParams(max_tokens=2, temperature=0)

    async def main():
        engine = AsyncEngine(remote, max_waiting=16)
        engine.start()
        assert engine._pump_loop is not None
        try:
            streams, sent = [], []
            for i in range(seats + 3):  # no await that yields in between: one loop turn, as in a burst
                streams.append(await engine.submit([5 + i] * 4, params))
                sent.append(remote._num_sent)
            finishes = []
            for stream in streams:
                outputs = [output async for output in stream]
                finishes.append(outputs[-1].outputs[0].finish_reason)
            return sent, finishes
        finally:
            await engine.shutdown()

    try:
        sent, finishes = asyncio.run(main())
    finally:
        remote.close(timeout=5)
    # one message per add while seats are free, then nothing more until the loop turns
    assert sent == [1, 2, 3, 3, 3, 3], f"command messages sent after each submit: {sent}"
    assert finishes == ["length"] * (seats + 3)
