"""Checks for chapter 05: the KV cache's memory per token, its update-and-attend step, and the
prefill + decode loop.

Oracles: the package's references (:mod:`miniinfer.kv_cache`, :mod:`miniinfer.generate`), the
definitions written out here (a float64 attention over exactly the visible slots, the byte count
from the shapes), and, for the loop, generation *without* a cache (the plain forward over the whole
sequence at every step), which shares no code with the cache at all.
"""

from __future__ import annotations

import random

import torch

from miniinfer.course.checking import assert_close, assert_equal, call_student, describe, exercise, fail

__all__ = ["kv_bytes_per_token", "attend_with_cache", "prefill_and_decode"]


# ------------------------------------------------------------------------------------------------
# A tiny random model, shared with chapter 06's checks
# ------------------------------------------------------------------------------------------------

def _tiny_model(vocab_size: int = 61, max_positions: int = 160, std: float = 0.25):
    """A small random Qwen2 (2 layers, H=4, H_kv=2, D=8) with peaked logits, so that greedy decoding is
    not decided by rounding. Built without touching the global random state."""
    from miniinfer.models.config import Qwen2Config
    from miniinfer.models.qwen2 import Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=max_positions)
    with torch.random.fork_rng():
        torch.manual_seed(random.randrange(2**31))
        model = Qwen2ForCausalLM(config)
        model.init_weights(std=std)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# 5.1 bytes per token
# ------------------------------------------------------------------------------------------------

@exercise("5.1", "KV-cache bytes per token")
def kv_bytes_per_token(fn) -> int:
    """Random configs (H ≠ H_kv, E ≠ H·D, several dtypes): 2 · layers · H_kv · D · itemsize."""
    from miniinfer.kv_cache import kv_bytes_per_token as reference
    from miniinfer.models.config import Qwen2Config

    rng = random.Random()
    cases = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8):
        for _ in range(3):
            H_kv = rng.randint(1, 4)
            config = Qwen2Config(vocab_size=rng.randint(10, 99), hidden_size=rng.randint(17, 300),
                                 intermediate_size=rng.randint(10, 99), num_hidden_layers=rng.randint(2, 37),
                                 num_attention_heads=H_kv * rng.randint(2, 5), num_key_value_heads=H_kv,
                                 head_dim=2 * rng.randint(3, 70))
            L, H, D, E = config.num_hidden_layers, config.num_attention_heads, config.head_dim, config.hidden_size
            itemsize = torch.empty((), dtype=dtype).element_size()
            case = f"layers={L}, H={H}, H_kv={H_kv}, D={D}, E={E}, dtype={dtype}"
            expected = 2 * L * H_kv * D * itemsize
            assert expected == reference(config, dtype)
            got = call_student(fn, config, dtype, case=case)
            if not isinstance(got, int) or isinstance(got, bool):
                fail(f"expected a Python int (bytes), got {describe(got)}", case=case,
                     hint="torch.empty((), dtype=dtype).element_size() gives the bytes of one number; "
                          "multiply ints, return an int")
            if got != expected:
                hint = "a token stores one key and one value vector per KV head, in every layer"
                slips = [
                    (expected // 2, "count the values too: keys and values are two tensors (× 2)"),
                    (expected // 2 * H // H_kv, "keys and values have H_kv heads (grouped-query attention), "
                                                "not H, and there are two tensors"),
                    (expected * H // H_kv, "the cache holds H_kv key/value heads (grouped-query attention), "
                                           "not the H query heads"),
                    (expected // L, "every layer has its own keys and values: multiply by num_hidden_layers"),
                    (expected * 8, "bytes, not bits"),
                    (expected // itemsize, "multiply by the bytes of one number (element_size of the dtype)"),
                    (2 * L * E * itemsize, "a key is H_kv·D numbers (num_key_value_heads × head_dim), "
                                           "not hidden_size"),
                ]
                hint = next((why for wrong, why in slips if got == wrong), hint)
                fail(f"expected {expected} bytes, got {got}", case=case, hint=hint)
            cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 5.2 update and attend
# ------------------------------------------------------------------------------------------------

def _oracle_attention(q, keys, values, start, scale, padding, *, offset=True, causal=True, groups="interleave"):
    """Float64 attention of q [B, L, H, D] over keys/values [B, S, H_kv, D] written from the definition.

    Query i sits at slot ``start + i`` (``i`` if not ``offset``) and sees slots up to its own
    (everything if not ``causal``), minus padding slots (``padding``: [B, S] bool or None)."""
    B, L, H, D = q.shape
    S, H_kv = keys.shape[1], keys.shape[2]
    G = H // H_kv
    kv_head = torch.arange(H) // G if groups == "interleave" else torch.arange(H) % H_kv
    k = keys.double()[:, :, kv_head]                                      # [B, S, H, D]
    v = values.double()[:, :, kv_head]
    scores = torch.einsum("blhd,bshd->bhls", q.double(), k) * scale       # [B, H, L, S]
    query_slot = torch.arange(L) + (start if offset else 0)
    visible = torch.ones(B, L, S, dtype=torch.bool)
    if causal:
        visible &= (torch.arange(S)[None, :] <= query_slot[:, None])[None]
    if padding is not None:
        visible &= padding[:, None, :S]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhls,bshd->blhd", torch.softmax(scores, dim=-1), v)


def _attention_case(rng: random.Random, kind: str, padded: bool):
    B, H_kv, G = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3)
    H, D = H_kv * G, rng.choice([4, 6, 10, 16])
    if kind == "prefill":
        start, L = 0, rng.randint(2, 9)
    elif kind == "decode":
        start, L = rng.randint(1, 13), 1
    else:  # a chunk after a cached prefix
        start, L = rng.randint(1, 11), rng.randint(2, 6)
    end = start + L
    S_max = end + rng.randint(0, 7)
    padding = None
    if padded:
        # Left padding: row b's first pads[b] slots hold no token (at least one real slot remains).
        pads = [rng.randint(0, end - 1) if b else 0 for b in range(B)]
        rng.shuffle(pads)
        padding = torch.arange(S_max)[None, :] >= torch.tensor(pads)[:, None]   # [B, S_max]
    scale = D ** -0.5 if rng.random() < 0.5 else rng.uniform(0.1, 0.9)
    # Slots before `start` hold earlier tokens; slots at and after `end` hold garbage (never zero in a
    # real pool after reuse), so attending past the filled slots shows.
    k_cache = torch.randn(B, S_max, H_kv, D)
    v_cache = torch.randn(B, S_max, H_kv, D)
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, L, H_kv, D), torch.randn(B, L, H_kv, D)
    case = (f"{kind}: B={B}, L={L} new token(s) at slots {start}…{end - 1}, S_max={S_max}, H={H}, H_kv={H_kv}, "
            f"D={D}, scale={scale:.3g}, " + (f"left padding {padding.logical_not().sum(1).tolist()}" if padded
                                             else "no padding"))
    return case, (k_cache, v_cache, start, q, k, v, scale, padding)


def _check_cache_writes(k_cache, v_cache, before_k, before_v, start, k, v, case) -> None:
    end = start + k.shape[1]
    for name, cache, before, new in (("k_cache", k_cache, before_k, k), ("v_cache", v_cache, before_v, v)):
        if torch.equal(cache, before):
            fail(f"{name} is unchanged: the new keys/values were not stored", case=case,
                 hint=f"write them in place: {name}[:, start:start + L] = ...  (not a new tensor, not torch.cat: "
                      "the next step must find them in the cache)")
        if not torch.equal(cache[:, start:end], new):
            hint = "the new tokens go to slots start … start+L−1"
            L = new.shape[1]
            for offset, why in ((0, "you wrote at slot 0; the first `start` slots already hold earlier tokens"),
                                (start + 1, "off by one: the first new token goes to slot `start`, not start+1")):
                if offset != start and offset + L <= cache.shape[1] and torch.equal(cache[:, offset:offset + L], new):
                    hint = why
            assert_equal(cache[:, start:end], new, what=f"{name}[:, start:start+L]", case=case, hint=hint)
        outside = torch.ones(cache.shape[1], dtype=torch.bool)
        outside[start:end] = False
        if not torch.equal(cache[:, outside], before[:, outside]):
            fail(f"{name} changed outside slots {start}…{end - 1}", case=case,
                 hint="only the L new slots may be written; earlier slots hold the keys of earlier tokens")


@exercise("5.2", "update the cache and attend")
def attend_with_cache(fn) -> int:
    """Prefill, decode and chunk steps, GQA/MQA/MHA, left padding, arbitrary scale: the cache must hold
    the new keys/values at the right slots (and nothing else changed), and the output must equal a
    float64 attention over exactly the visible slots; then a model generates through it."""
    from miniinfer.kv_cache import attend_with_cache as reference

    rng = random.Random()
    cases = 0
    for kind in ("prefill", "decode", "chunk", "prefill", "decode", "chunk"):
        for padded in (False, True):
            case, (k_cache, v_cache, start, q, k, v, scale, padding) = _attention_case(rng, kind, padded)
            before_k, before_v = k_cache.clone(), v_cache.clone()
            got = call_student(fn, k_cache, v_cache, start, q, k, v, scale, padding, case=case)
            _check_cache_writes(k_cache, v_cache, before_k, before_v, start, k, v, case)
            end = start + q.shape[1]
            expected = _oracle_attention(q, k_cache[:, :end], v_cache[:, :end], start, scale, padding)
            ref_out = reference(before_k.clone(), before_v.clone(), start, q, k, v, scale, padding)
            # Padding queries have no real key to see: any finite value is fine, NaN is not.
            real = torch.ones(q.shape[0], q.shape[1], dtype=torch.bool)
            if padding is not None:
                real = padding[:, start:end]
            assert_close(ref_out[real], expected[real].float(), what="reference (sanity)", atol=1e-4, rtol=1e-4)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(q.shape):
                fail(f"expected the output [B, L, H, D] = {tuple(q.shape)}, got {describe(got)}", case=case,
                     hint="return one vector per query head and new token, like q")
            if got.dtype != q.dtype:
                fail(f"expected dtype {q.dtype}, got {got.dtype}", case=case)
            if not torch.isfinite(got).all():
                where = "a real query" if not torch.isfinite(got[real]).all() else "a padding query"
                fail(f"the output holds NaN/inf (at {where})", case=case,
                     hint="a padding query that sees no slot at all gets softmax of nothing = NaN, and NaN leaks "
                          "into later layers through its key and value: let every query see at least its own slot")
            hint = None
            variants = [
                (dict(offset=False), "the causal mask is aligned top-left: query i sits at slot start+i (after the "
                                     "cached prefix), not at slot i"),
                (dict(causal=False), "the new tokens must not see each other's future: a causal mask within the chunk"),
                (dict(groups="modulo"), "query head h uses KV head h // G (G = H / H_kv), the order of "
                                        "repeat_interleave"),
            ]
            if padding is not None:
                variants.append((dict(padding=None), "padding slots must be hidden from every query "
                                                     "(key_padding_mask is False there)"))
            for changes, why in variants:
                args = dict(offset=True, causal=True, groups="interleave", padding=padding)
                args.update(changes)
                pad = args.pop("padding")
                other = _oracle_attention(q, k_cache[:, :end], v_cache[:, :end], start, scale, pad, **args)
                if not torch.allclose(other[real], expected[real]) and torch.allclose(
                        got[real].double(), other[real], atol=1e-4, rtol=1e-4):
                    hint = why
            for wrong_scale, why in ((1.0, "multiply the scores by `scale`"),
                                     (q.shape[-1] ** -0.5, "use the `scale` argument, not 1/sqrt(D)")):
                if abs(wrong_scale - scale) > 1e-6:
                    other = _oracle_attention(q, k_cache[:, :end], v_cache[:, :end], start, wrong_scale, padding)
                    if torch.allclose(got[real].double(), other[real], atol=1e-4, rtol=1e-4):
                        hint = why
            S_max = k_cache.shape[1]
            if S_max > end:
                everything = _oracle_attention(q, k_cache, v_cache, start, scale, padding, causal=False)
                if torch.allclose(got[real].double(), everything[real], atol=1e-4, rtol=1e-4):
                    hint = (f"attend only to the filled slots 0 … start+L−1 = {end - 1}, not the whole cache "
                            f"({S_max} slots): the rest holds stale data")
            # float32 attention over a few dozen slots: errors ~1e-6; 1e-4 leaves room for any summation order.
            assert_close(got[real], expected[real].float(), what="attention output (real queries)", case=case,
                         atol=1e-4, rtol=1e-4, hint=hint)
            cases += 1

    # Inside a model: a left-padded batch prefilled and decoded through KVCache(attend_with_cache=fn).
    from miniinfer.kv_cache import KVCache

    model = _tiny_model()
    lengths = [rng.randint(1, 9), rng.randint(10, 17)]
    ids = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in lengths]
    padded_ids = torch.tensor([[0] * (max(lengths) - n) + row for n, row in zip(lengths, ids)])
    logits = []
    for step_fn in (fn, None):
        cache = KVCache.for_model(model, batch_size=2, max_len=max(lengths) + 4, attend_with_cache=step_fn)
        positions = cache.set_padding(lengths)
        with torch.inference_mode():
            out = [model(padded_ids, positions, attention=cache)[:, -1]]
            for i in range(3):
                token = torch.tensor([[5 + i], [7 + i]])
                out.append(model(token, torch.tensor(lengths)[:, None] + i, attention=cache)[:, -1])
        logits.append(torch.stack(out))
    # Two layers of float32 arithmetic in a different order: 1e-4 on logits of size ~1–10.
    assert_close(logits[0], logits[1], what="logits of a padded batch through KVCache(attend_with_cache=yours)",
                 case=f"prompts of {lengths[0]} and {lengths[1]} tokens, 3 decode steps", atol=1e-4, rtol=1e-4)
    return cases + 1


# ------------------------------------------------------------------------------------------------
# 5.3 prefill and decode
# ------------------------------------------------------------------------------------------------

class _Spy(torch.nn.Module):
    """Wraps the model and records every call: input shape, positions, the attention context."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.components = model.components
        self.calls: list[tuple] = []

    def forward(self, input_ids, positions=None, attention=None, logits_indices=None):
        flat = None if positions is None else [int(p) for p in torch.as_tensor(positions).flatten()]
        self.calls.append((tuple(input_ids.shape), flat, attention))
        if logits_indices is not None and not isinstance(logits_indices, torch.Tensor):
            logits_indices = torch.as_tensor(logits_indices, device=input_ids.device)
        with torch.inference_mode():
            return self.inner(input_ids, positions, attention=attention, logits_indices=logits_indices)


def _no_cache_generation(model, prompt, max_new_tokens, next_token, eos) -> list[int]:
    """The oracle: the whole sequence through the plain forward for every token."""
    tokens, output = list(prompt), []
    with torch.inference_mode():
        while True:
            token = int(next_token(model(torch.tensor([tokens]))[0, -1].float()))
            output.append(token)
            tokens.append(token)
            if token in eos or len(output) >= max_new_tokens:
                return output


@exercise("5.3", "prefill, then decode one token per step")
def prefill_and_decode(fn) -> int:
    """Prompts of 1 to ~40 tokens, 1 to 12 new tokens, greedy and a non-greedy choice rule, EOS stops:
    the tokens must equal generation without a cache, the first call must be the whole prompt at
    positions 0…n−1, every later call one token at the next position, through the cache, and no call
    for the last token (the cache is sized exactly)."""
    from miniinfer.generate import prefill_and_decode as reference
    from miniinfer.kv_cache import KVCache

    rng = random.Random()
    model = _tiny_model()
    spy = _Spy(model)

    def greedy(logits):
        return int(logits.argmax())

    def runner_up(logits):  # not the argmax: your loop must use next_token, not its own choice
        return int(logits.topk(2).indices[1])

    cases = 0
    plans = [(1, 5), (2, 1), (7, 12), (rng.randint(3, 40), rng.randint(2, 12)), (rng.randint(3, 40), 9),
             (rng.randint(1, 20), 10)]
    for index, (n, max_new) in enumerate(plans):
        for rule_name, rule in (("greedy", greedy), ("runner-up", runner_up)):
            prompt = [rng.randrange(model.config.vocab_size) for _ in range(n)]
            expected = _no_cache_generation(model, prompt, max_new, rule, set())
            eos: frozenset[int] = frozenset()
            if index >= 4 and len(expected) > 2:  # an EOS somewhere in the middle
                eos = frozenset({expected[rng.randint(1, len(expected) - 2)]})
                expected = _no_cache_generation(model, prompt, max_new, rule, eos)
            case = (f"prompt of {n} token(s), max_new_tokens={max_new}, next_token={rule_name}"
                    + (f", eos_token_ids={set(eos)}" if eos else ""))
            ref_cache = KVCache.for_model(model, 1, n + max_new - 1)
            assert reference(model, ref_cache, prompt, max_new, rule, eos) == expected, "reference (sanity)"
            cache = KVCache.for_model(model, 1, n + max_new - 1)    # exactly the room the loop needs
            spy.calls.clear()
            try:
                got = call_student(fn, spy, cache, list(prompt), max_new, rule, eos, case=case)
            except RuntimeError as error:
                if "KV cache holds" in str(error):
                    fail(f"the cache overflowed: {error}", case=case,
                         hint="stop as soon as you have the tokens: the last token is never run through the "
                              "model (nothing would use its keys and values)")
                raise
            if not isinstance(got, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in got):
                fail(f"expected a list of Python ints, got {describe(got)}", case=case,
                     hint="int(next_token(logits)) for each new token")
            calls = spy.calls
            if not calls:
                fail("the model was never called", case=case)
            shape, positions, attention = calls[0]
            if attention is not cache:
                fail("the prefill did not go through the cache (attention=cache)", case=case,
                     hint="model(ids, positions, attention=cache) stores the keys and values as it goes")
            if shape != (1, n) or positions != list(range(n)):
                fail(f"prefill: expected input [1, {n}] at positions 0…{n - 1}, got input {list(shape)} at "
                     f"positions {positions}", case=case, hint="the prefill runs the whole prompt once, as [1, n]")
            for step, (shape, positions, attention) in enumerate(calls[1:], start=1):
                where = f"decode step {step}"
                if attention is not cache:
                    fail(f"{where}: the model was called without the cache", case=case,
                         hint="pass attention=cache at every step; recomputing without it is what the cache avoids")
                if shape != (1, 1):
                    fail(f"{where}: expected one new token [1, 1], got input {list(shape)}", case=case,
                         hint="with the cache, a decode step feeds only the newest token: the others' keys and "
                              "values are already stored")
                if positions != [n + step - 1]:
                    fail(f"{where}: expected position {n + step - 1}, got {positions}", case=case,
                         hint="the new token's position is the number of tokens already cached (cache.length)")
            assert_equal(got, expected, what="generated tokens", case=case,
                         hint="stop after max_new_tokens tokens or right after an EOS token (keep the EOS); choose "
                              "each token with next_token(logits of the last position)")
            if len(calls) != len(got):
                fail(f"{len(calls)} model calls for {len(got)} tokens: expected one per token", case=case,
                     hint="the last token is never run through the model")
            cases += 1
    return cases
