"""Checks for chapter 03: softmax, the causal mask, multi-head and grouped-query attention.

Oracles: ``torch.softmax`` and ``torch.nn.functional.scaled_dot_product_attention`` computed in
float64 (so the only error left is the student's float32 rounding), plus the package's reference
(:mod:`miniinfer.attention`). When an answer is wrong, we recompute the usual mistakes (no
``1/sqrt(D)``, softmax over the wrong axis, mask polarity, the wrong head grouping, a top-left
causal mask) and name the one that matches.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from miniinfer import attention as reference
from miniinfer.course.checking import assert_close, assert_equal, call_student, exercise, fail

__all__ = ["softmax", "causal_mask", "scaled_dot_product_attention", "grouped_query_attention"]

# float32 answers against float64 oracles: a softmax and two matmuls over at most ~40 terms leave
# relative errors of a few 1e-7; 2e-5 absolute (outputs are O(1)) is far above that and far below
# any real mistake (a wrong scale or mask moves outputs by 1e-2 or more).
ATOL, RTOL = 2e-5, 1e-4


def _matches(got, candidate: torch.Tensor) -> bool:
    """True when ``got`` equals ``candidate`` to the check's tolerance (NaNs in the same places count)."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(candidate.shape):
        return False
    return torch.allclose(got.detach().double().cpu(), candidate.double(), atol=1e-4, rtol=1e-3, equal_nan=True)


def _diagnose(got, mistakes: list[tuple[torch.Tensor, str]], default: str) -> str:
    """The hint of the first recomputed mistake that ``got`` matches, else ``default``."""
    for candidate, hint in mistakes:
        if _matches(got, candidate):
            return hint
    return default


def _check_dtype(got, dtype: torch.dtype, case: str) -> None:
    if isinstance(got, torch.Tensor) and got.dtype != dtype:
        fail(f"expected dtype {dtype} (the input's), got {got.dtype}", case=case,
             hint="compute in the input's dtype: no .float() / .double() on the way out")


def _check_unchanged(original: torch.Tensor, after: torch.Tensor, name: str, case: str) -> None:
    if not torch.equal(original, after):
        fail(f"your function modified its input `{name}` in place", case=case,
             hint="use out-of-place operations (x - m, not x.sub_(m) or x -= m): the caller still needs its tensor")


# ------------------------------------------------------------------------------------------------
# 3.1 softmax
# ------------------------------------------------------------------------------------------------

@exercise("3.1", "numerically stable softmax")
def softmax(fn) -> int:
    """Random shapes, every axis, float32/float64; then logits far from 0 (overflow/underflow of a
    softmax without the max subtraction), rows at very different scales (a global instead of a per-row
    max), and -inf entries (masked positions must get exactly 0)."""
    rng = random.Random()
    cases = 0
    shapes = [(1,), (7,), (3, 5), (2, 1, 9), (rng.randint(2, 6), rng.randint(11, 41)), (2, 3, rng.randint(2, 9), 5)]
    for shape in shapes:
        for dim in (-1, 0, rng.randrange(-len(shape), len(shape))):  # three axes per shape (some may coincide)
            for dtype in (torch.float32, torch.float64):
                case = f"x of shape {shape}, dim={dim}, {dtype}"
                x = torch.randn(shape, dtype=dtype) * 3
                original = x.clone()
                got = call_student(fn, x, dim=dim, case=case)
                _check_unchanged(original, x, "x", case)
                _check_dtype(got, dtype, case)
                expected = torch.softmax(x, dim=dim)
                wrong_dims = [(torch.softmax(x, dim=d), f"you normalised over dim {d}; normalise over `dim` "
                               "(the sum over that axis must be 1)")
                              for d in range(x.dim()) if d != dim % x.dim() and x.shape[d] > 1]
                hint = _diagnose(got, wrong_dims, "softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m) with "
                                 "m = x.amax(dim, keepdim=True)")
                assert_close(got, expected, what="softmax", case=case, atol=1e-6 if dtype == torch.float32 else 1e-12,
                             rtol=1e-5 if dtype == torch.float32 else 1e-10, hint=hint)
                assert_close(got, reference.softmax(x, dim), what="softmax vs miniinfer.attention.softmax", case=case,
                             atol=1e-6, rtol=1e-5, hint=hint)
                cases += 1
    # The default axis is the last one.
    x = torch.randn(4, rng.randint(3, 17))
    assert_close(call_student(fn, x, case="default dim"), torch.softmax(x, dim=-1), what="softmax(x) without dim",
                 case="x of shape (4, V), dim not given", hint="the default is dim=-1 (the last axis)")
    cases += 1

    # Large logits: exp(x) overflows float32 above ~88.7 and underflows to 0 below ~-103.
    overflow_hint = ("exp overflows (exp(89) is inf in float32) or underflows to 0 (so 0/0): subtract the "
                     "maximum of the row, m = x.amax(dim, keepdim=True), before exp — softmax(x - m) = softmax(x)")
    for offset in (1000.0, -1000.0, 1e4):
        case = f"logits around {offset:g} (float32)"
        x = torch.randn(3, rng.randint(5, 30)) + offset
        got = call_student(fn, x, dim=-1, case=case)
        assert_close(got, torch.softmax(x, dim=-1), what="softmax", case=case, atol=1e-6, rtol=1e-5, hint=overflow_hint)
        cases += 1
    # Rows at very different scales: a single max over the whole tensor is not enough.
    case = "rows around +1000, -1000 and 0 (float32)"
    x = torch.randn(3, rng.randint(5, 30)) + torch.tensor([[1000.0], [-1000.0], [0.0]])
    got = call_student(fn, x, dim=-1, case=case)
    assert_close(got, torch.softmax(x, dim=-1), what="softmax", case=case, atol=1e-6, rtol=1e-5,
                 hint="take the maximum per row (x.amax(dim, keepdim=True)), not over the whole tensor: a row "
                      "1000 below the global max underflows to 0/0")
    cases += 1
    # Masked entries (-inf) get probability exactly 0; every row keeps at least one finite entry.
    case = "rows with -inf entries (masked positions)"
    x = torch.randn(5, rng.randint(6, 20))
    x[torch.rand_like(x) < 0.4] = float("-inf")
    x[:, rng.randrange(x.shape[1])] = 0.5
    got = call_student(fn, x, dim=-1, case=case)
    assert_close(got, torch.softmax(x, dim=-1), what="softmax", case=case, atol=1e-6, rtol=1e-5,
                 hint="exp(-inf - m) = 0: -inf entries must come out as exactly 0, the rest sums to 1")
    cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 3.2 causal mask
# ------------------------------------------------------------------------------------------------

def _mask_from_definition(L: int, S: int) -> torch.Tensor:
    """Query i sits at position i + (S − L) and sees keys j <= its position."""
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    return j <= i + (S - L)


@exercise("3.2", "causal mask for queries after cached keys")
def causal_mask(fn) -> int:
    """Square masks, queries after a cached prefix (S > L), decoding (L = 1); bool dtype, shape [L, S],
    the device argument. Recognises a top-left mask, an excluded diagonal, inverted polarity, a transpose."""
    rng = random.Random()
    sizes = [(1, 1), (1, rng.randint(2, 20)), (4, 4), (rng.randint(5, 17),) * 2, (3, 11), (5, 6),
             (L := rng.randint(2, 12), L + rng.randint(1, 15))]
    cases = 0
    for L, S in sizes:
        case = f"L={L} queries, S={S} keys ({S - L} cached)"
        got = call_student(fn, L, S, device="cpu", case=case)
        expected = _mask_from_definition(L, S)
        assert_equal(expected, reference.causal_mask(L, S), what="reference vs definition", case=case)
        if not isinstance(got, torch.Tensor):
            fail(f"expected a tensor, got {type(got).__name__}", case=case)
        if got.dtype != torch.bool:
            fail(f"expected dtype torch.bool (True = may attend), got {got.dtype}", case=case,
                 hint="e.g. torch.ones(L, S, dtype=torch.bool, device=device).tril(...)")
        if tuple(got.shape) != (L, S):
            fail(f"expected shape ({L}, {S}) = [L, S], got {tuple(got.shape)}", case=case,
                 hint="one row per query, one column per key")
        if got.device.type != "cpu":
            fail(f"asked for device='cpu', got a tensor on {got.device}", case=case)
        hint = "query i sits at position i + (S - L): it may see every key j <= i + (S - L)"
        if torch.equal(got, ~expected):
            hint = "polarity: True must mean 'may attend' (the lower triangle), False 'masked'"
        elif S > L and torch.equal(got, torch.ones(L, S, dtype=torch.bool).tril(0)):
            hint = (f"your mask is aligned top-left (query i sees keys 0..i). The queries are the LAST L of "
                    f"the S tokens, so query i must see keys up to i + (S - L) = i + {S - L}: use .tril(S - L)")
        elif torch.equal(got, torch.ones(L, S, dtype=torch.bool).tril(S - L - 1)):
            hint = "a query must see its own key too: the diagonal (j = i + S - L) is allowed"
        elif L == S and torch.equal(got, expected.T):
            hint = "rows are queries, columns are keys: you built the transpose"
        assert_equal(got, expected, what="mask", case=case, hint=hint)
        cases += 1
    # The device defaults to None (the CPU) and the function must not need it.
    got = call_student(fn, 3, 5, case="causal_mask(3, 5) without device")
    assert_equal(got, _mask_from_definition(3, 5), what="mask", case="causal_mask(3, 5) without device")
    return cases + 1


# ------------------------------------------------------------------------------------------------
# 3.3 scaled dot-product attention (multi-head)
# ------------------------------------------------------------------------------------------------

def _attention64(q, k, v, mask=None, scale=None, softmax_dim=-1):
    """Plain attention in float64, [B, L, H, D] layout, with knobs to recompute common mistakes."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("blhd,bshd->bhls", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=softmax_dim)
    return torch.einsum("bhls,bshd->blhd", weights, v)


def _sdpa64(q, k, v, mask=None, scale=None):
    """The oracle: PyTorch's SDPA in float64 (it wants [B, H, L, D]; we keep [B, L, H, D])."""
    out = F.scaled_dot_product_attention(q.double().transpose(1, 2), k.double().transpose(1, 2),
                                         v.double().transpose(1, 2), attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def _attention_mistakes(q, k, v, mask, scale) -> list[tuple[torch.Tensor, str]]:
    D = q.shape[-1]
    used = D ** -0.5 if scale is None else scale
    mistakes = []
    if scale is None:
        mistakes += [
            (_attention64(q, k, v, mask, scale=1.0), "you forgot the scale: multiply q·kᵀ by 1/sqrt(D) (scale=None "
                                                    "means D ** -0.5), which keeps the scores' variance ~1"),
            (_attention64(q, k, v, mask, scale=1.0 / D), "the default scale is 1/sqrt(D), not 1/D"),
        ]
    else:
        mistakes += [(_attention64(q, k, v, mask, scale=D ** -0.5), "use the `scale` argument when it is given "
                                                                    "(only scale=None means 1/sqrt(D))"),
                     (_attention64(q, k, v, mask, scale=1.0), "multiply the scores by `scale`")]
    if q.shape[1] > 1:
        mistakes.append((_attention64(q, k, v, mask, scale, softmax_dim=-2),
                         "softmax over the wrong axis: normalise over the keys (the last axis of [B, H, L, S]), "
                         "so each query's weights sum to 1"))
    if mask is not None:
        mistakes += [
            (_attention64(q, k, v, None, scale), "you ignored the mask: set scores to -inf where mask is False"),
            (_attention64(q, k, v, ~mask, scale), "mask polarity: True means 'may attend'; fill -inf where the mask "
                                                 "is False (scores.masked_fill(~mask, -inf))"),
        ]
    mistakes.append((_attention64(q, k, v, mask, used * used), "apply the scale once (to the scores), not twice"))
    return mistakes


@exercise("3.3", "scaled dot-product attention")
def scaled_dot_product_attention(fn) -> int:
    """Multi-head attention on [B, L, H, D] against float64 SDPA: no mask, causal masks (square and
    after a cached prefix), a random mask broadcast over heads, explicit scales, a single query."""
    rng = random.Random()
    cases = 0
    setups = [  # B, L, S, H, D, mask kind, scale
        (1, 1, 1, 1, 8, None, None),
        (2, 5, 5, 3, 16, None, None),
        (1, 7, 7, 4, 32, "causal", None),
        (2, 3, 11, 2, 8, "causal", None),
        (rng.randint(1, 3), L := rng.randint(2, 9), L + rng.randint(0, 9), rng.randint(1, 5), 12, "causal", None),
        (3, 6, 9, 5, 12, "random", None),
        (2, 4, 4, 2, 20, "causal", 0.3),
        (1, 1, 13, 3, 16, None, 0.125),
        (2, 5, 8, 3, 24, "random", 1.7),
    ]
    for B, L, S, H, D, kind, scale in setups:
        mask_text = {None: "None", "causal": "causal [L, S]", "random": "random [B, 1, L, S]"}[kind]
        case = f"q [B={B}, L={L}, H={H}, D={D}], k/v [B, S={S}, H, D], mask={mask_text}, scale={scale}"
        q, k, v = torch.randn(B, L, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
        if kind == "causal":
            mask = _mask_from_definition(L, S)
        elif kind == "random":
            mask = torch.rand(B, 1, L, S) < 0.6
            mask[..., torch.randint(0, S, (1,)).item()] = True  # every query keeps at least one key
        else:
            mask = None
        kwargs = {"mask": mask} if scale is None else {"mask": mask, "scale": scale}
        originals = (q.clone(), k.clone(), v.clone())
        got = call_student(fn, q, k, v, **kwargs, case=case)
        for name, before, after in zip("qkv", originals, (q, k, v)):
            _check_unchanged(before, after, name, case)
        _check_dtype(got, q.dtype, case)
        expected = _sdpa64(q, k, v, mask, scale)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (B, H, L, D) != (B, L, H, D):
            fail(f"expected shape [B, L, H, D] = {(B, L, H, D)}, got {tuple(got.shape)} = [B, H, L, D]", case=case,
                 hint="the layout is tokens first, heads second: transpose back before returning "
                      "(or use einsum 'bhls,bshd->blhd')")
        hint = _diagnose(got, _attention_mistakes(q, k, v, mask, scale),
                         "out = softmax(q·kᵀ · scale, masked to -inf where mask is False) · v, per batch and head")
        assert_close(got, expected.float(), what="attention output", case=case, atol=ATOL, rtol=RTOL, hint=hint)
        assert_close(got, reference.scaled_dot_product_attention(q, k, v, mask, scale), case=case,
                     what="attention output vs miniinfer.attention.scaled_dot_product_attention", atol=ATOL, rtol=RTOL,
                     hint=hint)
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 3.4 grouped-query attention
# ------------------------------------------------------------------------------------------------

@exercise("3.4", "grouped-query attention")
def grouped_query_attention(fn) -> int:
    """MHA (H_kv = H), GQA, MQA (H_kv = 1); causal with S = L, after a cached prefix (S > L) and while
    decoding (L = 1); causal=False; explicit scales. Against float64 SDPA with ``enable_gqa``."""
    rng = random.Random()
    cases = 0
    setups = [  # B, L, S, H, H_kv, D, causal, scale
        (2, 5, 5, 4, 4, 16, True, None),      # multi-head
        (1, 7, 7, 6, 2, 8, True, None),       # grouped, G = 3
        (2, 3, 10, 8, 2, 32, True, None),     # a cached prefix of 7 keys
        (1, 1, 9, 6, 3, 16, True, None),      # decoding one token
        (2, 4, 4, 6, 2, 8, False, None),      # no mask
        (1, 5, 12, 12, 3, 24, True, 0.2),     # explicit scale
        (1, 6, 6, 5, 1, 8, True, None),       # multi-query
        (rng.randint(1, 2), L := rng.randint(2, 9), L + rng.randint(0, 9), (Hkv := rng.randint(2, 3)) * rng.randint(2, 4),
         Hkv, 2 * rng.randint(3, 10), rng.random() < 0.7, None),
    ]
    for B, L, S, H, H_kv, D, causal, scale in setups:
        G = H // H_kv
        case = (f"q [B={B}, L={L}, H={H}, D={D}], k/v [B, S={S}, H_kv={H_kv}, D] (G={G} query heads per KV head), "
                f"causal={causal}, scale={scale}")
        q, k, v = torch.randn(B, L, H, D), torch.randn(B, S, H_kv, D), torch.randn(B, S, H_kv, D)
        originals = (q.clone(), k.clone(), v.clone())
        got = call_student(fn, q, k, v, causal=causal, scale=scale, case=case)
        for name, before, after in zip("qkv", originals, (q, k, v)):
            _check_unchanged(before, after, name, case)
        _check_dtype(got, q.dtype, case)
        mask = _mask_from_definition(L, S) if causal else None
        expected = _sdpa64(q, k, v, mask, scale)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (B, H, L, D) != (B, L, H, D):
            fail(f"expected shape [B, L, H, D] = {(B, L, H, D)}, got {tuple(got.shape)} = [B, H, L, D]", case=case,
                 hint="return the tokens-first layout [B, L, H, D], like q")

        # The usual mistakes, recomputed on full-size (repeated) k and v.
        k_rep, v_rep = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)  # head h -> KV head h // G
        mistakes = []
        if G > 1 and H_kv > 1:
            mistakes.append((_attention64(q, k.repeat(1, 1, G, 1), v.repeat(1, 1, G, 1), mask, scale),
                             f"wrong grouping: query head h must use KV head h // G (G = H / H_kv = {G}), i.e. "
                             f"consecutive query heads share a KV head (repeat_interleave, HF's repeat_kv); you "
                             f"used h % H_kv (k.repeat / tiling)"))
        if causal and S > L:
            mistakes.append((_attention64(q, k_rep, v_rep, torch.ones(L, S, dtype=torch.bool).tril(0), scale),
                             f"your causal mask is aligned top-left. The L queries are the LAST L of the S "
                             f"positions, so query i sees keys up to i + (S - L) = i + {S - L} "
                             f"(use causal_mask(L, S), not is_causal=True when S > L)"))
        if causal:
            mistakes.append((_attention64(q, k_rep, v_rep, None, scale), "causal=True: mask the future keys "
                                                                         "(query i sees keys j <= i + S - L)"))
        elif L > 1:
            mistakes.append((_attention64(q, k_rep, v_rep, _mask_from_definition(L, S), scale),
                             "causal=False: every query sees every key, apply no mask"))
        mistakes += _attention_mistakes(q, k_rep, v_rep, mask, scale)
        hint = _diagnose(got, mistakes, "each query head h attends with KV head h // G; scores scaled by "
                                        "1/sqrt(D) (or `scale`), softmax over the keys")
        assert_close(got, expected.float(), what="attention output", case=case, atol=ATOL, rtol=RTOL, hint=hint)
        assert_close(got, reference.grouped_query_attention(q, k, v, causal=causal, scale=scale), case=case,
                     what="attention output vs miniinfer.attention.grouped_query_attention", atol=ATOL, rtol=RTOL,
                     hint=hint)
        cases += 1
    return cases
