"""Checks for chapter 06: packing a step's flat batch, and the token-budget plan of a step.

Oracles: the package's references (:func:`miniinfer.engine.model_runner.pack_batch`,
:func:`miniinfer.engine.scheduler.plan_step`), the definitions written out here (per-sequence
slices and sums, a second formulation of the plan), and the engine itself: with your function
plugged in through :class:`~miniinfer.engine.EngineHooks`, a tiny random model must generate
exactly what it generates with the package's function, in the same number of steps.
"""

from __future__ import annotations

import random

import torch

from miniinfer.course.checking import assert_equal, call_student, describe, exercise, fail

__all__ = ["pack_batch", "plan_step"]


def _run_engine(hooks, prompts, max_tokens, **config) -> tuple[list[list[int]], int]:
    """Greedy outputs of a tiny random model on the engine (with ``hooks``), and the number of steps."""
    from miniinfer.course.check.ch05_kv_cache import _tiny_model
    from miniinfer.engine import EngineConfig, LLMEngine
    from miniinfer.sampling import SamplingParams

    model = _run_engine.model = getattr(_run_engine, "model", None) or _tiny_model(max_positions=256)
    engine = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=256, **config), hooks=hooks)
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
           for p, m in zip(prompts, max_tokens)]
    results = {}
    for output in engine.stream():
        if output.finished:
            results[output.request_id] = output.outputs[0].token_ids
    return [results[i] for i in ids], engine.stats()["num_steps"]


def _engine_case(rng: random.Random):
    prompts = [[rng.randrange(61) for _ in range(rng.randint(1, 37))] for _ in range(rng.randint(4, 6))]
    max_tokens = [rng.randint(1, 9) for _ in prompts]
    config = dict(max_num_seqs=rng.randint(2, 3), max_num_batched_tokens=rng.choice([7, 11, 16]))
    return prompts, max_tokens, config


# ------------------------------------------------------------------------------------------------
# 6.1 packing the flat batch
# ------------------------------------------------------------------------------------------------

def _as_ints(value, what: str, case: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            fail(f"{what}: expected a 1-D list of ints, got {describe(value)}", case=case)
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        fail(f"{what}: expected a list of ints, got {describe(value)}", case=case)
    return list(value)


def _random_step(rng: random.Random):
    """A step mixing decodes, whole prompts, first chunks, middle chunks and last chunks."""
    token_ids, num_computed, num_new, kinds = [], [], [], []
    for _ in range(rng.randint(1, 7)):
        n = rng.randint(1, 30)
        tokens = [rng.randrange(1000) for _ in range(n)]
        kind = rng.choice(["decode", "prompt", "first chunk", "middle chunk", "last chunk"])
        if kind == "decode" or n == 1:
            kind, computed, new = ("decode", n - 1, 1) if n > 1 else ("prompt", 0, 1)
        elif kind == "prompt":
            computed, new = 0, n
        elif kind == "first chunk":
            computed, new = 0, rng.randint(1, n - 1)
        elif kind == "middle chunk" and n > 2:
            computed = rng.randint(1, n - 2)
            new = rng.randint(1, n - computed - 1)
        else:
            kind, computed = "last chunk", rng.randint(1, n - 1)
            new = n - computed
        token_ids.append(tokens)
        num_computed.append(computed)
        num_new.append(new)
        kinds.append(kind)
    return token_ids, num_computed, num_new, kinds


@exercise("6.1", "pack a step's flat batch")
def pack_batch(fn) -> int:
    """Random steps of 1–7 sequences (decodes, whole prompts, chunks): the five lists must equal the
    definition; then the engine, with your packing plugged in, must generate what it generates without."""
    from miniinfer.engine import EngineHooks
    from miniinfer.engine.model_runner import pack_batch as reference

    rng = random.Random()
    cases = 0
    names = ("input_ids", "positions", "cu_seqlens_q", "seq_lens", "logits_indices")
    for _ in range(14):
        token_ids, num_computed, num_new, kinds = _random_step(rng)
        case = "; ".join(f"seq {b}: {len(t)} tokens, {c} computed, {n} new ({k})"
                         for b, (t, c, n, k) in enumerate(zip(token_ids, num_computed, num_new, kinds)))
        # The definition, sequence by sequence.
        cu = [0]
        for n in num_new:
            cu.append(cu[-1] + n)
        expected = (
            [t for tokens, c, n in zip(token_ids, num_computed, num_new) for t in tokens[c:c + n]],
            [p for c, n in zip(num_computed, num_new) for p in range(c, c + n)],
            cu,
            [c + n for c, n in zip(num_computed, num_new)],
            [cu[b + 1] - 1 for b, (tokens, c, n) in enumerate(zip(token_ids, num_computed, num_new))
             if c + n == len(tokens)],
        )
        assert tuple(reference(token_ids, num_computed, num_new)) == expected, "reference (sanity)"
        copies = ([list(t) for t in token_ids], list(num_computed), list(num_new))
        got = call_student(fn, *copies, case=case)
        if copies != (token_ids, num_computed, num_new):
            fail("your function changed its inputs", case=case,
                 hint="token_ids are the sequences' own lists: read them, never modify them")
        if not isinstance(got, (tuple, list)) or len(got) != 5:
            fail(f"expected 5 lists ({', '.join(names)}), got {describe(got)}", case=case)
        got = [_as_ints(value, name, case) for value, name in zip(got, names)]
        c0 = num_computed
        hints = {
            "input_ids": "the new tokens of sequence b are token_ids[b][num_computed[b] : num_computed[b] + "
                         "num_new[b]] (the computed ones are already in the cache)",
            "positions": "a token's position is its index in its own sequence: num_computed[b] … "
                         "num_computed[b] + num_new[b] − 1, not 0 … num_new[b] − 1",
            "cu_seqlens_q": "cumulative new-token counts starting at 0: B + 1 entries, the last one T",
            "seq_lens": "the keys a sequence attends to after this step: its cached tokens plus its new ones",
            "logits_indices": "one row per sequence that has computed ALL its tokens after this step (a decode, a "
                              "whole prompt, a last chunk; not a first or middle chunk): the row of its LAST "
                              "new token, cu_seqlens_q[b + 1] − 1",
        }
        if got[1] == [p for n in num_new for p in range(n)] != expected[1]:
            hints["positions"] = ("positions restart at 0 for every sequence in your batch; they must continue "
                                  "from num_computed (RoPE rotates by the absolute position)")
        if got[3] == list(num_new) != expected[3]:
            hints["seq_lens"] = "seq_lens counts the cached keys too: num_computed + num_new"
        if got[2] == expected[2][1:]:
            hints["cu_seqlens_q"] = "cu_seqlens_q starts with a 0 (B + 1 entries)"
        if len(got[4]) == len(num_new) != len(expected[4]):
            hints["logits_indices"] = ("a prefill chunk that stops mid-prompt samples nothing: only sequences with "
                                       "num_computed + num_new == len(token_ids) get a logits row")
        if got[4] == [expected[2][b] for b in range(len(c0)) if c0[b] + num_new[b] == len(token_ids[b])]:
            hints["logits_indices"] = "the row of the LAST new token of the sequence, not its first"
        for value, want, name in zip(got, expected, names):
            assert_equal(value, want, what=name, case=case, hint=hints[name])
        cases += 1

    # Inside the engine: chunked prefill over a small budget, several requests at once.
    prompts, max_tokens, config = _engine_case(rng)
    case = f"the engine with EngineHooks(pack_batch=yours), {len(prompts)} requests, {config}"
    expected, _ = _run_engine(None, prompts, max_tokens, **config)
    got, _ = call_student(_run_engine, EngineHooks(pack_batch=fn), prompts, max_tokens, case=case, **config)
    assert_equal(got, expected, what="generated tokens", case=case)
    return cases + 1


# ------------------------------------------------------------------------------------------------
# 6.2 the token-budget plan of a step
# ------------------------------------------------------------------------------------------------

def _plan_by_definition(running, waiting, budget, max_num_seqs, chunked):
    """The plan written differently from the reference: remaining budget as a running sum, admission
    as 'the longest prefix of the queue that can be admitted'."""
    plan = []
    for n in running:
        plan.append(max(0, min(n, budget - sum(plan))))
    left = budget - sum(plan)
    admitted = []
    for j, n in enumerate(waiting):
        seats = max_num_seqs - len(running) - j
        if left <= 0 or seats <= 0 or (n > left and not chunked):
            break
        admitted.append(min(n, left))
        left -= admitted[-1]
    return plan + admitted + [0] * (len(waiting) - len(admitted))


def _random_plan_case(rng: random.Random):
    running = [1 if rng.random() < 0.75 else rng.randint(2, 40) for _ in range(rng.randint(0, 6))]
    waiting = [rng.randint(1, 60) for _ in range(rng.randint(0, 6))]
    budget = rng.randint(1, max(1, sum(running) + sum(waiting) + 5))
    max_num_seqs = len(running) + rng.randint(0, 5)
    if max_num_seqs == 0:
        max_num_seqs = 1
    return running, waiting, budget, max_num_seqs, rng.random() < 0.5


def _plan_hint(got, expected, running, waiting, budget, max_num_seqs, chunked) -> str:
    index = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    left = budget - sum(expected[:index])
    if index < len(running):
        return (f"running sequence {index}: running sequences come first, in order, each getting "
                f"min(its uncomputed tokens, remaining budget) = min({running[index]}, {left})")
    j = index - len(running)
    seats = max_num_seqs - len(running) - j
    blocked_before = any(expected[len(running) + i] == 0 for i in range(j))
    if expected[index] == 0:
        if left <= 0:
            return "the token budget is used up: nobody else this step"
        if seats <= 0:
            return (f"max_num_seqs={max_num_seqs} counts every running sequence ({len(running)}), scheduled or "
                    "not, plus those admitted before: no seat left")
        if blocked_before:
            return ("first come first served: once a waiting sequence cannot be admitted, nobody behind it "
                    "is admitted either (no overtaking)")
        return (f"without chunked prefill a prompt of {waiting[j]} tokens waits until the whole prompt fits "
                f"(remaining budget {left})")
    if chunked and waiting[j] > left:
        return (f"with chunked prefill, a prompt longer than the remaining budget gets the remainder ({left}) "
                "now and the rest in later steps")
    return f"waiting sequence {j} is admitted with all its {waiting[j]} uncomputed tokens"


@exercise("6.2", "plan a step under the token budget")
def plan_step(fn) -> int:
    """Random mixes of decodes, unfinished chunks and queued prompts, tight and loose budgets and seat
    limits, with and without chunked prefill: the plan must equal the definition; then the scheduler,
    with your plan plugged in, must produce the same outputs in the same number of steps."""
    from miniinfer.engine import EngineHooks
    from miniinfer.engine.scheduler import plan_step as reference

    rng = random.Random()
    cases = 0
    fixed = [([1, 1, 1], [50, 3], 20, 8, True), ([1, 1, 1], [50, 3], 20, 8, False), ([], [5, 5, 5], 12, 2, True),
             ([30, 1], [4], 16, 4, True), ([1], [], 5, 1, False), ([], [7], 7, 1, False)]
    for running, waiting, budget, max_num_seqs, chunked in fixed + [_random_plan_case(rng) for _ in range(30)]:
        case = (f"running={running}, waiting={waiting}, max_num_batched_tokens={budget}, "
                f"max_num_seqs={max_num_seqs}, chunked={chunked}")
        expected = _plan_by_definition(running, waiting, budget, max_num_seqs, chunked)
        assert reference(running, waiting, budget, max_num_seqs, chunked) == expected, "reference (sanity)"
        got = call_student(fn, list(running), list(waiting), budget, max_num_seqs, chunked, case=case)
        got = _as_ints(got, "plan", case)
        if len(got) != len(running) + len(waiting):
            fail(f"expected {len(running) + len(waiting)} counts (one per running, then per waiting sequence), "
                 f"got {len(got)}: {got}", case=case, hint="give 0 to a sequence that does not run this step")
        if got != expected:
            hint = _plan_hint(got, expected, running, waiting, budget, max_num_seqs, chunked)
            if sum(got) > budget:
                hint = f"your plan schedules {sum(got)} tokens, more than the budget {budget}"
            assert_equal(got, expected, what="tokens per sequence", case=case, hint=hint)
        cases += 1

    # Inside the scheduler, with and without chunked prefill.
    for chunked in (True, False):
        prompts, max_tokens, config = _engine_case(rng)
        config.update(enable_chunked_prefill=chunked, max_num_batched_tokens=config["max_num_batched_tokens"]
                      if chunked else 40)
        case = f"the engine with EngineHooks(plan_step=yours), {len(prompts)} requests, {config}"
        expected_out, expected_steps = _run_engine(None, prompts, max_tokens, **config)
        got_out, got_steps = call_student(_run_engine, EngineHooks(plan_step=fn), prompts, max_tokens, case=case,
                                          **config)
        assert_equal(got_out, expected_out, what="generated tokens", case=case)
        assert_equal(got_steps, expected_steps, what="number of steps", case=case)
        cases += 1
    return cases
