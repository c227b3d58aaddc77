"""Checks for chapter 04: fusing HF weights into our layout, and the sampling distribution.

Oracles: the package's reference (:mod:`miniinfer.loader`, :mod:`miniinfer.sampling`), a real
:class:`~miniinfer.models.qwen2.Qwen2ForCausalLM` that must accept the fused weights (strict names and
shapes) and give the same logits, and exact float64 distributions computed here from the
definitions (temperature, then top-k with ties kept, then the nucleus), on inputs drawn so that no
probability sum lies within 1e-4 of a threshold (where float32 rounding could legitimately decide).
"""

from __future__ import annotations

import random

import torch

from miniinfer import sampling as reference
from miniinfer.course.checking import assert_close, assert_equal, call_student, describe, exercise, fail

__all__ = ["fuse_hf_tensors", "top_k_filter", "top_p_filter", "probabilities"]

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# 4.1 fusing HF tensors
# ------------------------------------------------------------------------------------------------

def _random_config(rng: random.Random, tie: bool):
    from miniinfer.models.config import Qwen2Config

    H_kv = rng.randint(1, 3)
    return Qwen2Config(vocab_size=rng.randint(5, 41), hidden_size=rng.randint(3, 21), intermediate_size=rng.randint(3, 29),
                       num_hidden_layers=rng.randint(1, 3), num_attention_heads=H_kv * rng.randint(1, 3),
                       num_key_value_heads=H_kv, head_dim=2 * rng.randint(1, 5), tie_word_embeddings=tie,
                       max_position_embeddings=64)


@exercise("4.1", "fuse HF q/k/v and gate/up weights")
def fuse_hf_tensors(fn) -> int:
    """Random small configs (tied and untied, 1–3 layers, MHA/GQA/MQA): same names, shapes and values
    as the reference, the input dict left intact, and a real model must load the result (strict) and
    produce the same logits as with the reference's tensors."""
    from miniinfer.loader import FUSED, hf_tensor_shapes
    from miniinfer.loader import fuse_hf_tensors as reference_fuse
    from miniinfer.models.qwen2 import Qwen2ForCausalLM

    rng = random.Random()
    cases = 0
    for tie in (True, False, rng.random() < 0.5, False):
        config = _random_config(rng, tie)
        case = (f"{config.num_hidden_layers} layer(s), E={config.hidden_size}, I={config.intermediate_size}, "
                f"H={config.num_attention_heads}, H_kv={config.num_key_value_heads}, D={config.head_dim}, "
                f"tie_word_embeddings={tie}")
        hf = {name: torch.randn(shape) for name, shape in hf_tensor_shapes(config).items()}
        before = {name: t.clone() for name, t in hf.items()}
        got = call_student(fn, hf, config, case=case)
        if set(hf) != set(before) or any(not torch.equal(hf[n], before[n]) for n in before):
            fail("your function changed the dict it was given (removed, added or modified entries)", case=case,
                 hint="work on a copy: ours = dict(hf), then pop/insert in `ours`")
        expected = reference_fuse(before, config)
        if not isinstance(got, dict):
            fail(f"expected a dict of tensors, got {describe(got)}", case=case)
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            leftovers = [n for n in extra if any(n.endswith(part) for parts in FUSED.values() for part in parts)]
            hint = ("every layer needs self_attn.qkv_proj.weight, self_attn.qkv_proj.bias and mlp.gate_up_proj.weight; "
                    "every other tensor passes through under its HF name")
            if leftovers:
                hint = "the separate q/k/v and gate/up tensors must be replaced by the fused ones, not kept beside them"
            fail(f"names differ from the reference: missing {missing[:4]}{' …' if len(missing) > 4 else ''}, "
                 f"unexpected {extra[:4]}{' …' if len(extra) > 4 else ''}", case=case, hint=hint)
        for name, want in expected.items():
            have = got[name]
            hint = None
            for fused, parts in FUSED.items():
                if name.endswith(fused) and isinstance(have, torch.Tensor):
                    prefix = name[: -len(fused)]
                    pieces = [before[prefix + part] for part in parts]
                    if have.dim() == 2 and have.shape[1] != want.shape[1]:
                        hint = "stack along dim 0: a Linear weight is [out, in], and fusing adds output rows"
                    elif tuple(have.shape) == tuple(want.shape) and not torch.equal(have, want):
                        order = ", ".join(part.split(".")[-2] for part in parts)
                        hint = f"stack in the order {order}: the model splits the fused output in that order"
                        if torch.equal(have, torch.cat(pieces[::-1], 0)):
                            hint = "reversed order; " + hint
            assert_equal(have, want, what=name, case=case, hint=hint)
        # The fused dict is what the model's modules expect, and gives the reference model's logits.
        ours, theirs = Qwen2ForCausalLM(config), Qwen2ForCausalLM(config)
        try:
            ours.load_state_dict(got, strict=True)
        except RuntimeError as error:
            fail(f"Qwen2ForCausalLM refused the fused tensors: {str(error)[:300]}", case=case)
        theirs.load_state_dict(expected, strict=True)
        ids = torch.randint(0, config.vocab_size, (2, rng.randint(1, 9)))
        with torch.no_grad():
            assert_close(ours(ids), theirs(ids), what="logits of a model loaded with your tensors", case=case,
                         atol=0, rtol=0)
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# Shared helpers for the filters
# ------------------------------------------------------------------------------------------------

def _check_filter_output(got, logits: torch.Tensor, expected_keep: torch.Tensor, what: str, case: str,
                         hint_for_count) -> None:
    """got must equal logits where expected_keep, -inf elsewhere. ``hint_for_count(row, got_kept,
    want_kept)`` explains a row that keeps the wrong number of tokens."""
    if not isinstance(got, torch.Tensor):
        fail(f"{what}: expected a tensor, got {describe(got)}", case=case)
    if tuple(got.shape) != tuple(logits.shape):
        fail(f"{what}: expected shape {tuple(logits.shape)} (same as the logits), got {tuple(got.shape)}", case=case)
    if got.dtype != logits.dtype:
        fail(f"{what}: expected dtype {logits.dtype} (same as the logits), got {got.dtype}", case=case)
    want = torch.where(expected_keep, logits, torch.full_like(logits, NEG_INF))
    if not torch.equal(got, want) and torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values):
        fail(f"{what}: the right values in the wrong places", case=case,
             hint="return the logits in vocabulary order: after working on sorted logits, scatter the result back "
                  "with the sort's indices")
    dropped = ~expected_keep
    finite_drops = dropped & torch.isfinite(got) & (got != logits)
    if finite_drops.any() and not (got[dropped] == NEG_INF).all():
        index = tuple(finite_drops.nonzero()[0].tolist())
        fail(f"{what}: a dropped logit at index {index} is {got[index].item():.4g}, expected -inf", case=case,
             hint="set the dropped logits to float('-inf') (exp(-inf) = 0), not 0 or a large negative number")
    got_keep = got != NEG_INF
    rows_got = got_keep.reshape(-1, logits.shape[-1])
    rows_want = expected_keep.reshape(-1, logits.shape[-1])
    for row in range(rows_want.shape[0]):
        g, w = int(rows_got[row].sum()), int(rows_want[row].sum())
        if g != w:
            fail(f"{what}: row {row} keeps {g} token(s), expected {w}", case=case, hint=hint_for_count(row, g, w))
    if not torch.equal(got_keep, expected_keep):
        index = tuple((got_keep != expected_keep).nonzero()[0].tolist())
        hint = "keep the highest logits of each row, in their original (vocabulary) positions"
        fail(f"{what}: kept the wrong tokens; first difference at index {index}: expected "
             f"{'kept' if expected_keep[index] else 'dropped'}, got {'kept' if got_keep[index] else 'dropped'}",
             case=case, hint=hint)
    assert_equal(got[expected_keep], logits[expected_keep], what=f"{what} (kept logits)", case=case,
                 hint="return the kept logits unchanged (a filter does not rescale or renormalise)")


def _check_input_unchanged(before: torch.Tensor, after: torch.Tensor, case: str) -> None:
    if not torch.equal(before, after):
        fail("your function modified the logits it was given", case=case,
             hint="use out-of-place operations (logits.masked_fill(...), not masked_fill_ or item assignment on logits)")


# ------------------------------------------------------------------------------------------------
# 4.2 top-k
# ------------------------------------------------------------------------------------------------

def _top_k_keep(logits: torch.Tensor, k: int) -> torch.Tensor:
    """From the definition: keep every logit >= the k-th largest of its row (ties kept); k = 0 or >= V: all."""
    V = logits.shape[-1]
    if k == 0 or k >= V:
        return torch.ones_like(logits, dtype=torch.bool)
    kth = logits.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return logits >= kth


@exercise("4.2", "top-k filter")
def top_k_filter(fn) -> int:
    """Rows of [V], [B, V] and [2, 3, V] logits; k = 0 (off), 1, random, V − 1, V and > V; rows with many
    ties at the k-th value (all kept). Dropped logits must be -inf, kept ones unchanged, per row."""
    rng = random.Random()
    cases = 0
    setups = [((1,), 1), ((7,), 0), ((7,), 3), ((rng.randint(20, 300),), rng.randint(2, 19)), ((9,), 8), ((9,), 9),
              ((6,), 11), ((3, rng.randint(5, 50)), rng.randint(1, 4)), ((2, 3, 17), 5), ((4, 30), "ties"),
              ((25,), "ties")]
    for shape, k in setups:
        ties = k == "ties"
        if ties:
            logits = torch.randint(-3, 4, shape).float()  # only 7 distinct values: ties everywhere
            k = rng.randint(2, 6)
        else:
            logits = torch.randn(shape) * 2
        V = shape[-1]
        case = f"logits of shape {tuple(shape)}, k={k}" + (" (integer logits: many ties)" if ties else "")
        before = logits.clone()
        got = call_student(fn, logits, k, case=case)
        _check_input_unchanged(before, logits, case)
        keep = _top_k_keep(logits, k)
        assert_equal(reference.top_k_filter(logits, k) != NEG_INF, keep, what="reference vs definition", case=case)

        def hint_for_count(row, got_kept, want_kept, k=k, V=V, ties=ties, shape=shape):
            if k == 0:
                return "k = 0 means 'off': return the logits unchanged"
            if k >= V:
                return "k >= V keeps every token (torch.topk would fail: return the logits unchanged)"
            if got_kept == 0:
                return "the k largest logits must be kept (compare logits < kth, not <=)"
            if ties and got_kept == k:
                return ("logits tied with the k-th largest are all kept: drop only logits strictly below the "
                        "k-th largest value (logits < kth)")
            if len(shape) > 1 and got_kept != k:
                return "top-k is per row: take the k-th largest along the last dim, keepdim=True"
            if got_kept in (k - 1, k + 1):
                return f"off by one: keep {k} tokens; the threshold is the k-th largest value (index k - 1 in a descending sort)"
            return "keep the logits >= the k-th largest of the row, set the others to -inf"

        _check_filter_output(got, logits, keep, "top_k_filter", case, hint_for_count)
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 4.3 top-p
# ------------------------------------------------------------------------------------------------

def _top_p_keep(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """From the definition, in float64: keep a token when the probability of the tokens ranked above it
    is < p. Returns the mask and the smallest distance between p and any such partial sum."""
    if p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool), 1.0
    probs = torch.softmax(logits.double(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = before < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep, float((before - p).abs().min())


def _distinct_logits(shape, spread: float = 2.0) -> torch.Tensor:
    """Random logits, pairwise at least 0.02·spread apart along the last dim, in random order: no two
    tokens are (nearly) tied, so 'the most likely tokens' is never ambiguous."""
    V = shape[-1]
    rows = []
    for _ in range(int(torch.tensor(shape[:-1]).prod())):
        gaps = (torch.rand(V) * 0.3 + 0.02) * spread / max(1.0, V ** 0.5 / 3)
        values = torch.randn(()) * 2 - gaps.cumsum(0)
        rows.append(values[torch.randperm(V)])
    return torch.stack(rows).reshape(shape)


@exercise("4.3", "top-p (nucleus) filter")
def top_p_filter(fn) -> int:
    """Designed distributions with p just below and just above a cumulative sum (the token that crosses
    p is kept), tiny p (the top token only), p = 1 with a long tail of tiny probabilities (nothing
    dropped), random rows of [V] and [B, V]. Kept logits unchanged, in vocabulary order."""
    rng = random.Random()
    cases = 0
    setups = []
    # Designed: 5 distinct probabilities, shuffled; p 1e-3 below / above the partial sums 0.4, 0.7, 0.85.
    design = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    for p in (0.4 - 1e-3, 0.4 + 1e-3, 0.7 - 1e-3, 0.7 + 1e-3, 0.85 + 1e-3):
        logits = design[torch.randperm(5)].log().float() + rng.uniform(-3, 3)  # a shift changes nothing
        setups.append((logits, p, "designed probabilities [0.4, 0.3, 0.15, 0.1, 0.05] (shuffled)"))
    setups.append((_distinct_logits((rng.randint(3, 40),)), 1e-9, "tiny p"))
    # One dominant token and a tail of ~1e-18 probabilities: in float32 the running sum is exactly 1.0 after
    # the first token, so a filter without the p >= 1 shortcut drops the whole tail.
    peaked = torch.randn(rng.randint(100, 600)) - 42
    peaked[rng.randrange(len(peaked))] = 0.0
    setups.append((peaked, 1.0, "p = 1.0, one dominant token and a long tail of tiny probabilities"))
    for shape in ((1,), (rng.randint(2, 9),), (rng.randint(50, 300),), (3, rng.randint(5, 40)), (2, 2, 11)):
        while True:
            logits, p = _distinct_logits(shape), rng.uniform(0.05, 0.98)
            if _top_p_keep(logits, p)[1] > 1e-4:  # no partial sum within 1e-4 of p: the answer is unambiguous
                break
        setups.append((logits, p, "random logits"))
    for logits, p, what in setups:
        case = f"{what}, logits of shape {tuple(logits.shape)}, p={p:.6g}"
        before = logits.clone()
        got = call_student(fn, logits, p, case=case)
        _check_input_unchanged(before, logits, case)
        keep = _top_p_keep(logits, p)[0]
        assert_equal(reference.top_p_filter(logits, p) != NEG_INF, keep, what="reference vs definition", case=case)

        def hint_for_count(row, got_kept, want_kept, p=p):
            if p >= 1.0:
                return ("p = 1 keeps every token. In float32 the running sum can reach 1.0 before the tail, so "
                        "return the logits unchanged when p >= 1")
            if got_kept == 0:
                return "the most likely token is always kept (the mass ranked above it is 0 < p)"
            if got_kept == want_kept - 1:
                return ("keep the smallest set whose probability sum is >= p: the token that crosses p is kept too. "
                        "Keep a token when the mass ranked strictly ABOVE it is < p (cumsum - probs < p), "
                        "not when cumsum <= p")
            if got_kept == want_kept + 1:
                return "one token too many: stop at the first token whose cumulative sum reaches p"
            return ("sort the probabilities (softmax of the logits) in descending order, take the cumulative sum, "
                    "keep a token while the mass ranked above it is < p")

        _check_filter_output(got, logits, keep, "top_p_filter", case, hint_for_count)
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 4.4 the sampling distribution
# ------------------------------------------------------------------------------------------------

def _exact_distribution(logits: torch.Tensor, temperature: float, k: int, p: float) -> tuple[torch.Tensor, float]:
    """float64 oracle: temperature, then top-k (ties kept), then the nucleus of the renormalised top-k
    distribution. Returns probs [V] and the margin between p and the nearest partial sum."""
    z = logits.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(z.argmax(), z.shape[-1]).double(), 1.0
    z = z / temperature
    z = z.masked_fill(~_top_k_keep(z, k), NEG_INF)
    keep, margin = _top_p_keep(z, p)
    return torch.softmax(z.masked_fill(~keep, NEG_INF), dim=-1), margin


def _params_text(params) -> str:
    return f"temperature={params.temperature}, top_k={params.top_k}, top_p={params.top_p}"


@exercise("4.4", "the sampling distribution (temperature → top-k → top-p)")
def probabilities(fn) -> int:
    """Greedy (one-hot at the first argmax, ties included), temperatures below and above 1, top-k, top-p
    and their combinations, against exact float64 distributions; float32 probabilities over [V] that sum
    to 1. Recognises a wrong order of the steps, a missing renormalisation and a multiplied temperature."""
    from miniinfer.sampling import SamplingParams

    rng = random.Random()
    combos = [(0.0, 0, 1.0), (0.0, 5, 0.5), (1.0, 0, 1.0), (0.5, 0, 1.0), (1.7, 0, 1.0), (1.0, 3, 1.0),
              (0.7, 10, 1.0), (1.0, 0, 0.8), (2.0, 0, 0.6), (0.6, 0, 0.9), (1.0, 6, 0.7), (1.5, 20, 0.9),
              (0.8, 2, 0.95), (rng.uniform(0.3, 2.5), rng.randint(0, 30), rng.uniform(0.2, 1.0))]
    cases = 0
    for temperature, k, p in combos:
        params = SamplingParams(temperature=round(temperature, 3), top_k=k, top_p=round(p, 3))
        V = rng.randint(k + 5, k + 200)
        while True:
            logits = _distinct_logits((V,), spread=2.5)
            expected, margin = _exact_distribution(logits, params.temperature, params.top_k, params.top_p)
            if margin > 1e-4:
                break
        case = f"{_params_text(params)}, logits [V={V}]"
        before = logits.clone()
        got = call_student(fn, logits, params, case=case)
        _check_input_unchanged(before, logits, case)
        if not isinstance(got, torch.Tensor):
            fail(f"expected a tensor of probabilities, got {describe(got)}", case=case)
        if got.dtype != torch.float32:
            fail(f"expected float32 probabilities, got {got.dtype}", case=case, hint="return logits.float() math")
        ref = reference.probabilities(logits, params)
        assert_close(ref, expected.float(), what="reference vs exact", case=case, atol=1e-6, rtol=1e-5)

        # Recompute the usual mistakes and name the one that matches.
        z = logits.double()
        mistakes = []
        if params.temperature == 0:
            mistakes.append((torch.softmax(z, -1), "temperature = 0 is greedy: a one-hot at the argmax, no softmax"))
        else:
            T = params.temperature
            filtered_then_scaled = z.masked_fill(~_top_k_keep(z, k), NEG_INF)
            filtered_then_scaled = filtered_then_scaled.masked_fill(~_top_p_keep(filtered_then_scaled, p)[0], NEG_INF) / T
            mistakes.append((torch.softmax(filtered_then_scaled, -1),
                             "order: divide by the temperature FIRST, then top-k and top-p (the nucleus depends on "
                             "the temperature)"))
            scaled = z / T
            nucleus_first = scaled.masked_fill(~_top_p_keep(scaled, p)[0], NEG_INF)
            nucleus_first = nucleus_first.masked_fill(~_top_k_keep(scaled, k), NEG_INF)
            mistakes.append((torch.softmax(nucleus_first, -1),
                             "order: top-k BEFORE top-p (the nucleus is taken of the renormalised top-k distribution)"))
            mistakes.append((_exact_distribution(logits * T * T, T, k, p)[0],
                             "divide the logits by the temperature (you multiplied)"))
            keep = expected > 0
            mistakes.append((torch.softmax(scaled, -1) * keep, "renormalise: take the softmax of the filtered logits "
                                                                "(dropped ones at -inf), so the kept tokens sum to 1"))
        hint = "temperature 0: one-hot argmax; else softmax(top_p(top_k(logits / T, k), p))"
        for candidate, why in mistakes:
            if tuple(got.shape) == tuple(candidate.shape) and torch.allclose(got.double(), candidate, atol=1e-5):
                hint = why
                break
        if params.temperature > 0 and torch.isfinite(got).all() and abs(float(got.double().sum()) - 1) > 1e-4:
            hint = f"the probabilities sum to {float(got.double().sum()):.4f}, not 1: " + hint
        assert_close(got, expected.float(), what="probabilities", case=case, atol=1e-6, rtol=1e-4, hint=hint)
        cases += 1

    # Greedy with a tie at the maximum: the first index wins (like torch.argmax), as in the engine.
    V = rng.randint(5, 60)
    logits = torch.randn(V)
    first, second = sorted(rng.sample(range(V), 2))
    logits[first] = logits[second] = logits.max() + 1
    case = f"temperature=0 with the maximum tied at indices {first} and {second}"
    got = call_student(fn, logits, SamplingParams(temperature=0.0), case=case)
    assert_close(got, torch.nn.functional.one_hot(torch.tensor(first), V).float(), what="probabilities", case=case,
                 atol=0, rtol=0, hint="greedy: a one-hot at the FIRST maximum (torch.argmax), not split between ties")
    return cases + 1
