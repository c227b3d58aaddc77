"""Checks for chapter 09: the merge of two partial softmax results, a blocked attention that never holds
more than one score tile, the causal tile bounds, and the key loop of a Triton flash-attention kernel.

Oracles are written out here in float64, independently of the package: the softmax of a row of scores
split into two random sets of keys (9.1); ``softmax(q·kᵀ·scale [+ mask])·v`` with the KV heads
repeated and query i at position ``S - L + i`` (9.2, 9.4); a brute force over every (query, key) pair
of a tile (9.3). Each also agrees with the package's reference
(:mod:`miniinfer.kernels.online_softmax`), as a sanity check of the check itself.

Exercise 9.2 must be *tiled*, not merely right. Two independent guards:

* the student's function reports each score tile it computes through ``on_score_tile(qt, kt, s)``; the
  check compares every reported tile with the true scores and requires the tiles to cover every
  visible (query, key) pair (this works in the grader too, where the callback crosses processes);
* when the function runs in this process (a notebook, the tests), every tensor torch allocates during
  the call is watched (a ``TorchDispatchMode``): a score-like tensor (no head-dim axis) larger than one
  ``[H, block_m, block_n]`` tile, a tensor spanning a whole row of keys, anything larger than q or
  k, or torch's fused attention (``scaled_dot_product_attention``) fails the check and names the shape.
"""

from __future__ import annotations

import operator
import random

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from miniinfer.course.checking import assert_close, call_student, exercise, fail
from miniinfer.kernels.online_softmax import causal_tile_range, tile_needs_mask
from miniinfer.kernels.online_softmax import merge_partials as reference_merge

__all__ = ["merge_partials", "blocked_attention", "causal_key_tiles", "attention_kernel"]

LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attention_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """q [L, H, D], k, v [S, H_kv, D] -> [L, H, D] float64: the definition, KV heads repeated, bottom-right
    causal alignment (query i at position S - L + i); a query that sees no key gets zeros."""
    L, H, _ = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    k = k.double().repeat_interleave(H // H_kv, dim=1)
    v = v.double().repeat_interleave(H // H_kv, dim=1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    if causal:
        visible = torch.arange(S)[None, :] <= (torch.arange(L) + S - L)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).clamp(min=-1e300))
    total = weights.sum(-1, keepdim=True)
    return torch.einsum("hls,shd->lhd", weights / torch.where(total > 0, total, torch.ones_like(total)), v)


# ------------------------------------------------------------------------------------------------
# 9.1 merging two partial results
# ------------------------------------------------------------------------------------------------

def _partial(scores: torch.Tensor, values: torch.Tensor, member: torch.Tensor):
    """(o, m, l) of the keys where ``member`` is true, float64. scores [R, N], values [N, D], member [R, N].
    An empty part: m = -inf, l = 0 and o = NaN (never written: a merge must not read it)."""
    masked = scores.masked_fill(~member, float("-inf"))
    m = masked.amax(-1)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(masked - safe[:, None])
    l = p.sum(-1)
    o = (p @ values) / torch.where(l > 0, l, torch.ones_like(l))[:, None]
    o[l == 0] = float("nan")
    return o, m, l


def _merge_hint(got_o, got_m, got_l, o1, m1, l1, o2, m2, l2, exp_o) -> str:
    if not torch.equal(got_m, torch.maximum(m1, m2)):
        return "the merged maximum is m = max(m1, m2)"
    if torch.isnan(got_o).any() or torch.isnan(got_l).any():
        return ("an empty part has m = -inf and l = 0, and its o holds garbage (NaN here): exp(m_part - m) with "
                "m_part = m = -inf is exp(NaN); use torch.where so an empty part contributes exactly nothing")
    if torch.isinf(got_l).any() or torch.isinf(got_o).any():
        return "overflow: re-express each part relative to the new maximum, l_i · exp(m_i - m), never exp(m_i) alone"
    both = (l1 > 0) & (l2 > 0)
    if both.any():
        naive = (o1 + o2) / 2
        if torch.allclose(got_o[both], naive[both], atol=1e-9):
            return "not a plain average: weigh each part by its share of the sum, l_i · exp(m_i - m) / l"
        unscaled = (l1[:, None] * o1 + l2[:, None] * o2) / (l1 + l2)[:, None]
        if torch.allclose(got_o[both], unscaled[both], atol=1e-9):
            return ("the parts' sums l1, l2 are relative to different maxima: rescale them by exp(m1 - m) and "
                    "exp(m2 - m) before adding or weighing")
    return ("m = max(m1, m2); w_i = l_i · exp(m_i - m); l = w1 + w2; o = (w1 · o1 + w2 · o2) / l "
            "(and an empty part, l_i = 0, contributes nothing)")


@exercise("9.1", "merging two partial softmax results")
def merge_partials(fn) -> int:
    """Random rows of scores (some of magnitude ~1000, which overflow exp without the maximum), values of
    awkward head dims, keys split at random into two parts, some parts empty, some rows with both parts
    empty. o, m and l of the union are compared with the softmax over the union, in float64."""
    rng = random.Random()
    cases = 0
    for trial in range(12):
        R, N, D = rng.randint(1, 9), rng.randint(1, 40), rng.choice([1, 3, 7, 16])
        spread = rng.choice([1.0, 5.0, 30.0])
        scores = torch.randn(R, N, dtype=torch.float64) * spread
        if trial % 3 == 1:
            scores += rng.choice([800.0, -800.0])  # exp(±800) overflows: only differences may reach exp
        values = torch.randn(N, D, dtype=torch.float64)
        member = torch.rand(R, N) < rng.random()
        if trial % 4 == 2:
            member[0] = False  # row 0: part 1 is empty
        union = torch.ones(R, N, dtype=torch.bool)
        if trial % 6 == 5:
            union[-1] = False  # last row: both parts empty
        part1, part2 = member & union, ~member & union
        o1, m1, l1 = _partial(scores, values, part1)
        o2, m2, l2 = _partial(scores, values, part2)
        exp_o, exp_m, exp_l = _partial(scores, values, union)
        exp_o = torch.nan_to_num(exp_o, nan=0.0)  # both parts empty: the merge gives zeros
        ref = reference_merge(o1, m1, l1, o2, m2, l2)
        assert torch.allclose(ref[0], exp_o, atol=1e-9) and torch.equal(ref[1], exp_m), "reference vs oracle"
        case = (f"{R} rows, {N} keys, D={D}, scores of spread {spread:g}"
                + (f" shifted by {scores.mean().item():+.0f}" if trial % 3 == 1 else "")
                + f"; keys per part: part 1 {part1.sum(-1).tolist()}, part 2 {part2.sum(-1).tolist()}")
        args = [t.clone() for t in (o1, m1, l1, o2, m2, l2)]
        got = call_student(fn, *args, case=case)
        if any(not torch.equal(a, b) and not (torch.isnan(a) & torch.isnan(b)).any() for a, b in
               zip(args, (o1, m1, l1, o2, m2, l2))):
            fail("your function changed its inputs in place", case=case, hint="build new tensors for o, m, l")
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            fail(f"expected a tuple (o, m, l), got {type(got).__name__}", case=case,
                 hint="return o, m, l — the merged output [R, D], maximum [R] and sum [R]")
        got_o, got_m, got_l = got
        hint = None
        if all(isinstance(t, torch.Tensor) for t in got) and got_o.shape == exp_o.shape and \
                got_m.shape == exp_m.shape and got_l.shape == exp_l.shape:
            hint = _merge_hint(got_o.double(), got_m.double(), got_l.double(), o1, m1, l1, o2, m2, l2, exp_o)
        assert_close(got_m, exp_m, what="m (the merged maximum)", case=case, atol=0, rtol=0, hint=hint)
        assert_close(got_l, exp_l, what="l (the merged sum of exp(s - m))", case=case, atol=1e-12, rtol=1e-10,
                     hint=hint)
        assert_close(got_o, exp_o, what="o (the merged output)", case=case, atol=1e-10, rtol=1e-9, hint=hint)
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 9.2 blocked attention, one score tile at a time
# ------------------------------------------------------------------------------------------------

FUSED_ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


class TileGuard(TorchDispatchMode):
    """Watches every tensor torch allocates while active (views and in-place results are not allocations).

    An axis whose size is a multiple of ``D`` counts as a head-dim axis (the check picks D so that no other
    length is one). Fails on: torch's fused attention ops; a tensor without a head-dim axis (scores, weights, masks)
    holding more than ``max_scores`` numbers; such a tensor with an axis of ``row_keys`` (a whole row of
    keys, when that size is unambiguous); a tensor with a head-dim axis larger than ``max_with_d``.
    ``largest_scores`` records the largest score-like allocation (for the chapter's memory figure).
    """

    def __init__(self, D: int, max_scores: int | None = None, max_with_d: int | None = None,
                 row_keys: int | None = None, describe: str = ""):
        super().__init__()
        self.D, self.max_scores, self.max_with_d, self.row_keys = D, max_scores, max_with_d, row_keys
        self.describe = describe
        self.largest_scores = 0
        self.score_elements = 0  # numbers allocated in tensors without a head-dim axis, in total
        self.violation: str | None = None
        self.paused = False

    def _flag(self, message: str) -> None:
        if self.violation is None:
            self.violation = message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = str(func)
        if any(op in name for op in FUSED_ATTENTION_OPS):
            self._flag(f"your function called torch's fused attention ({name}): write the loop over tiles yourself")
            return out
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue
            shape = tuple(t.shape)
            has_d = any(n % self.D == 0 for n in shape)  # a head-dim axis, alone or merged with heads or rows
            if not has_d:
                self.score_elements += t.numel()
            if t.dim() < 2:
                continue
            if has_d:
                if self.max_with_d is not None and t.numel() > self.max_with_d:
                    self._flag(f"your function built a tensor of shape {shape} ({t.numel()} numbers), larger than "
                               f"q, k, v or the output ({self.max_with_d} numbers at most){self.describe}")
                continue
            self.largest_scores = max(self.largest_scores, t.numel())
            if self.max_scores is not None and t.numel() > self.max_scores:
                self._flag(f"your function built a tensor of shape {shape} ({t.numel()} numbers): more than one "
                           f"score tile for all heads, H·block_m·block_n = {self.max_scores}{self.describe}")
            elif self.row_keys is not None and self.row_keys in shape:
                self._flag(f"your function built a tensor of shape {shape}: an axis of {self.row_keys} keys is a "
                           f"whole row of scores, wider than a tile of block_n keys{self.describe}")
        return out


class _TileRecorder:
    """The ``on_score_tile`` the check hands to the student's function: keeps a copy of every tile."""

    def __init__(self):
        self.tiles: list = []
        self.guard: TileGuard | None = None

    def __call__(self, qt, kt, s) -> None:
        if self.guard is not None:
            self.guard.paused = True  # the check's own copy is not the student's allocation
        self.tiles.append((qt, kt, s.detach().clone() if isinstance(s, torch.Tensor) else s))
        if self.guard is not None:
            self.guard.paused = False


def _is_local_function(fn) -> bool:
    """False for the grader's proxy of a function running in another process (nothing to watch here)."""
    return type(fn).__name__ not in ("StudentProxy",)


def _lengths(L: int, S: int, block_m: int, block_n: int, S_itself: bool = True) -> set[int]:
    """Every row or column count a legitimate tensor may have: whole lengths, tiles, last (shorter) tiles
    (without S itself unless ``S_itself``)."""
    last_rows = L - block_m * (_cdiv(L, block_m) - 1)
    last_cols = S - block_n * (_cdiv(S, block_n) - 1)
    sizes = {1, L, block_m, block_n, last_rows, min(L, block_m)} | ({last_cols} if last_cols != S else set())
    return sizes | {S} if S_itself else sizes


def _blocked_cases(rng: random.Random) -> list[dict]:
    """Sizes chosen so that a tensor's axes say what it holds: D is a prime that divides no length (so an
    axis that is a multiple of D is a head-dim axis, however heads are merged), and S differs from every
    other length times every head count (so an axis of S is a whole row of keys)."""
    cases = []
    for index in range(10):
        H_kv = rng.choice([1, 2, 3])
        G = rng.choice([1, 2, 3]) if index % 3 else 1
        heads = {1, H_kv, G, H_kv * G}
        block_m, block_n = rng.choice([8, 13, 16]), rng.choice([8, 13, 16])
        causal = index % 4 != 3
        if index == 0:
            L = 1  # a decode step
        elif index == 1:
            L = rng.randint(2, 5)
        else:
            L = rng.randint(block_m + 3, 60)
        prefix = 0 if index % 2 == 0 else rng.randint(1, 40)  # causal with S > L: a cached prefix
        S = L + prefix if causal else rng.randint(1, 70)
        while S > block_n and S != L and S in {h * n for h in heads for n in _lengths(L, S, block_m, block_n, S_itself=False)}:
            S += 1
        candidates = [D for D in (11, 17, 19, 23) if all(n % D for n in _lengths(L, S, block_m, block_n))]
        D = rng.choice(candidates or [29])
        dtype = torch.float64 if index == 5 else torch.float32
        cases.append(dict(L=L, S=S, H=H_kv * G, H_kv=H_kv, D=D, causal=causal, block_m=block_m, block_n=block_n,
                          dtype=dtype))
    return cases


def _check_tiles(tiles: list, q, k, c: dict, scale: float, case: str) -> None:
    """Every reported tile is at most block_m × block_n, holds the true scores of its (query, key) block,
    and the tiles cover every visible pair."""
    L, S, H, H_kv, block_m, block_n = c["L"], c["S"], c["H"], c["H_kv"], c["block_m"], c["block_n"]
    if not tiles:
        fail("on_score_tile was never called", case=case,
             hint="call on_score_tile(query_tile, key_tile, s) with every score tile s you compute (if it is not None)")
    G = H // H_kv
    full = torch.einsum("lhd,shd->hls", q.double(), k.double().repeat_interleave(G, dim=1)) * scale
    visible = torch.ones(L, S, dtype=torch.bool)
    if c["causal"]:
        visible = torch.arange(S)[None, :] <= (torch.arange(L) + S - L)[:, None]
    seen = set()
    for qt, kt, s in tiles:
        try:
            qt, kt = operator.index(qt), operator.index(kt)
        except TypeError:
            fail(f"on_score_tile got tile numbers {qt!r}, {kt!r}", case=case,
                 hint="call on_score_tile(qt, kt, s) with the integer numbers of the query tile and key tile")
        if not (0 <= qt < _cdiv(L, block_m) and 0 <= kt < _cdiv(S, block_n)):
            fail(f"on_score_tile got the tile ({qt}, {kt}), outside the {_cdiv(L, block_m)} × {_cdiv(S, block_n)} "
                 "grid of tiles", case=case,
                 hint="query tile qt holds queries qt·block_m …, key tile kt holds keys kt·block_n …")
        if (qt, kt) in seen:
            fail(f"the score tile ({qt}, {kt}) was reported twice", case=case,
                 hint="visit each key tile once per query tile")
        seen.add((qt, kt))
        rows = min(block_m, L - qt * block_m)
        cols = min(block_n, S - kt * block_n)
        if not isinstance(s, torch.Tensor) or s.dim() < 2 or tuple(s.shape[-2:]) != (rows, cols) \
                or s.numel() != H * rows * cols:
            fail(f"the score tile ({qt}, {kt}) has shape {tuple(getattr(s, 'shape', ()))}; expected "
                 f"[H_kv={H_kv}, G={G}, {rows}, {cols}] or [H={H}, {rows}, {cols}]", case=case,
                 hint=f"a tile holds at most block_m={block_m} queries × block_n={block_n} keys, for every head")
        got = s.detach().double().reshape(H, rows, cols)
        q0, k0 = qt * block_m, kt * block_n
        want = full[:, q0:q0 + rows, k0:k0 + cols]
        where = visible[q0:q0 + rows, k0:k0 + cols].expand(H, rows, cols)
        error = (got - want).abs()[where]
        if error.numel() and not (error <= 1e-4 + 1e-4 * want.abs()[where]).all():
            fail(f"the score tile ({qt}, {kt}) does not hold the scores q·kᵀ·scale of queries {q0}…{q0 + rows - 1} "
                 f"and keys {k0}…{k0 + cols - 1} (max error {error.max().item():.3g})", case=case,
                 hint="report the scaled scores of the tile (before the mask and the exponential), heads first: "
                      "s[h, r, c] = scale · q[q0 + r, h] · k[k0 + c, h // G]")
    for qt in range(_cdiv(L, block_m)):
        for kt in range(_cdiv(S, block_n)):
            if (qt, kt) not in seen and visible[qt * block_m:(qt + 1) * block_m, kt * block_n:(kt + 1) * block_n].any():
                fail(f"the score tile ({qt}, {kt}) holds visible (query, key) pairs but was never reported",
                     case=case, hint="every key tile that a query of the tile may see must be visited and reported")


@exercise("9.2", "blocked attention, one score tile at a time")
def blocked_attention(fn) -> int:
    """Ten random cases: a decode step (L = 1), short and longer query blocks, causal with and without a
    cached prefix (S > L), non-causal with S above or below L, GQA ratios 1 to 3, awkward head dims and
    tile sizes, float32 and float64. The output is compared with a float64 oracle; the reported score
    tiles with the true scores; and, in this process, no tensor larger than one tile may be built."""
    rng = random.Random()
    cases = 0
    for c in _blocked_cases(rng):
        L, S, H, H_kv, D = c["L"], c["S"], c["H"], c["H_kv"], c["D"]
        q = torch.randn(L, H, D, dtype=c["dtype"])
        k = torch.randn(S, H_kv, D, dtype=c["dtype"])
        v = torch.randn(S, H_kv, D, dtype=c["dtype"])
        scale = rng.uniform(0.3, 1.0) * D ** -0.5
        case = (f"q [L={L}, H={H}, D={D}], k, v [S={S}, H_kv={H_kv}, D={D}], causal={c['causal']}, "
                f"scale={scale:.4f}, block_m={c['block_m']}, block_n={c['block_n']}, {c['dtype']}")
        inputs = (q.clone(), k.clone(), v.clone())
        recorder = _TileRecorder()
        args = (q, k, v, c["causal"], scale, c["block_m"], c["block_n"])
        if _is_local_function(fn):
            guard = TileGuard(D, max_scores=H * c["block_m"] * c["block_n"], max_with_d=max(L, S) * H * D,
                              row_keys=S if S > c["block_n"] and S != L else None,  # S == L: [H, L] state
                              describe=f". The full score matrix would be [H, L, S] = [{H}, {L}, {S}]: keep only one "
                                       f"[block_m, block_n] tile of scores (per head) alive at a time")
            recorder.guard = guard
            with guard:
                got = call_student(fn, *args, on_score_tile=recorder, case=case)
            if guard.violation:
                fail(guard.violation, case=case,
                     hint="loop over query tiles, and inside over key tiles: s = q_tile · k_tileᵀ · scale, then the "
                          "online-softmax update of m, l and the accumulator (exercise 9.1's rule)")
            visible_pairs = L * S if not c["causal"] else sum(min(S, S - L + i + 1) for i in range(L))
            if guard.score_elements < H * visible_pairs:
                fail(f"your function allocated only {guard.score_elements} numbers of scores with torch, fewer than "
                     f"the H · (visible query-key pairs) = {H * visible_pairs} scores attention needs",
                     case=case, hint="compute the score tiles with torch tensors (not NumPy or Python floats)")
        else:
            got = call_student(fn, *args, on_score_tile=recorder, case=case)
        for name, before, after in zip("qkv", inputs, (q, k, v)):
            if not torch.equal(before, after):
                fail(f"your function changed {name} in place", case=case, hint="work on copies or new tensors")
        expected = attention_oracle(q, k, v, c["causal"], scale)
        tol = 1e-9 if c["dtype"] == torch.float64 else 2e-5
        assert_close(got, expected.to(c["dtype"]), what="attention output", case=case, atol=tol, rtol=tol,
                     hint="per query tile keep m (running max), l (running sum) and acc (unnormalised Σ p·v); for "
                          "each key tile: m_new = max(m, rowmax(s)), alpha = exp(m - m_new), p = exp(s - m_new), "
                          "l = alpha·l + rowsum(p), acc = alpha·acc + p·v; at the end divide acc by l. Causal: "
                          "query i sits at position S - L + i")
        _check_tiles(recorder.tiles, q, k, c, scale, case)
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 9.3 causal tile bounds
# ------------------------------------------------------------------------------------------------

def _brute_force_tiles(q_start: int, q_end: int, q_offset: int, S: int, block_n: int) -> tuple[int, int]:
    """(tiles every query of [q_start, q_end) sees in full, tiles some query sees at all), pair by pair."""
    full = visited = 0
    positions = range(q_offset + q_start, q_offset + q_end)
    for t in range(_cdiv(S, block_n)):
        keys = range(t * block_n, (t + 1) * block_n)  # keys >= S do not exist: never visible
        seen = [[key < S and key <= pos for key in keys] for pos in positions]
        if any(any(row) for row in seen):
            visited = t + 1
        if positions and all(all(row) for row in seen) and full == t:
            full = t + 1
    return full, visited


def _package_tiles(q_start: int, q_end: int, q_offset: int, S: int, block_n: int) -> tuple[int, int]:
    _, last = causal_tile_range(q_start, q_end, q_offset, block_n)
    visited = max(0, min(last + 1, _cdiv(S, block_n)))
    full = 0
    while full < visited and (full + 1) * block_n <= S and not tile_needs_mask(full, q_start, q_offset, block_n):
        full += 1
    return full, visited


def _tiles_hint(got, expected, q_start, q_end, q_offset, S, block_n) -> str:
    if got[1] != expected[1]:
        if got[1] == _cdiv(S, block_n):
            return (f"you visit every key tile: the last query (position q_offset + q_end - 1 = "
                    f"{q_offset + q_end - 1}) sees no key after its own position, so later tiles are skipped")
        return ("visited tiles: from tile 0 up to the tile holding the last key the *last* query sees, "
                "key q_offset + q_end - 1 (and never past the sequence's last tile, (S - 1) // block_n)")
    if got[0] > expected[0] and got[0] * block_n > S:
        return "a tile that sticks out past the sequence's end (keys >= S) needs the mask: it is not full"
    return ("a tile needs no mask when even the *first* query of the tile (position q_offset + q_start) sees "
            "its last key, (t + 1)·block_n - 1, and the tile lies inside the sequence")


@exercise("9.3", "causal tile bounds")
def causal_key_tiles(fn) -> int:
    """Query tiles at the start, middle and end of sequences with and without a cached prefix, tile sizes
    1, 4, 7, 16 and 32, sequences shorter than one tile, empty query ranges. Compared with a pair-by-pair
    brute force."""
    rng = random.Random()
    cases = 0
    for block_n in (1, 4, 7, 16, 32):
        for trial in range(8):
            S = rng.randint(1, 5 * block_n + 9) if trial < 6 else rng.randint(1, block_n)
            L = rng.randint(1, S) if trial % 2 else S  # odd trials: a cached prefix of S - L keys
            q_offset = S - L
            block_m = rng.choice([1, 4, 16, 5])
            q_start = rng.randrange(0, L, block_m) if trial != 3 else L
            q_end = min(q_start + block_m, L)
            case = f"q_start={q_start}, q_end={q_end}, q_offset={q_offset}, S={S}, block_n={block_n}"
            expected = _brute_force_tiles(q_start, q_end, q_offset, S, block_n)
            assert expected == _package_tiles(q_start, q_end, q_offset, S, block_n), "package vs brute force"
            got = call_student(fn, q_start, q_end, q_offset, S, block_n, case=case)
            try:
                got = tuple(operator.index(x) for x in got)
                assert len(got) == 2
            except (TypeError, AssertionError):
                fail(f"expected a pair of ints (full_tiles, visited_tiles), got {got!r}", case=case,
                     hint="return full, visited — two ints")
            if got != expected:
                fail(f"expected (full_tiles, visited_tiles) = {expected}, got {got}", case=case,
                     hint=_tiles_hint(got, expected, q_start, q_end, q_offset, S, block_n))
            cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 9.4 the key loop of a Triton kernel
# ------------------------------------------------------------------------------------------------

def launch_attention_kernel(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                            block_m: int = 16, block_n: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the chapter's kernel: q [L, H, D], k, v [S, H_kv, D] (one sequence), grid (query tiles, H)."""
    import miniinfer.kernels  # noqa: F401  (TRITON_INTERPRET=1 on a machine without a GPU)

    L, H, D = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q) if out is None else out
    grid = (_cdiv(L, block_m), H)
    kernel[grid](q, k, v, out, L, S, H // H_kv, scale * LOG2E,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
                 CAUSAL=causal, D=D, BLOCK_M=block_m, BLOCK_N=block_n, NUM_KV_TILES=_cdiv(S, block_n))
    return out


@exercise("9.4", "the key loop of a Triton flash-attention kernel")
def attention_kernel(kernel) -> int:
    """Launches the student's kernel on one sequence: odd lengths, a decode step, a cached prefix, fewer keys
    than one tile, GQA ratios 1 to 4, head dims 16 and 32, tile sizes 16 and 32, causal and not; float32.
    Compared with a float64 oracle; rows past L of the output buffer must stay untouched."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random()
    cases = 0
    shapes = [(rng.randint(17, 40), 0), (1, rng.randint(5, 60)), (rng.randint(2, 9), rng.randint(10, 30)),
              (rng.randint(3, 12), 0), (rng.randint(20, 37), rng.randint(1, 20))]
    for L, prefix in shapes:
        for causal in (True, False):
            H_kv = rng.choice([1, 2])
            G = rng.choice([1, 2, 4])
            H, D = H_kv * G, rng.choice([16, 32])
            block_m, block_n = rng.choice([16, 32]), rng.choice([16, 32])
            S = L + prefix
            q = torch.randn(L, H, D, device=device)
            k = torch.randn(S, H_kv, D, device=device)
            v = torch.randn(S, H_kv, D, device=device)
            scale = D ** -0.5
            case = (f"q [L={L}, H={H}, D={D}], k, v [S={S}, H_kv={H_kv}, D={D}], causal={causal}, "
                    f"BLOCK_M={block_m}, BLOCK_N={block_n}, float32")
            buffer = torch.full((L + block_m, H, D), -12345.0, device=device)
            launch_attention_kernel(kernel, q, k, v, causal, scale, block_m, block_n, out=buffer[:L])
            expected = attention_oracle(q.cpu(), k.cpu(), v.cpu(), causal, scale)
            assert_close(buffer[:L].cpu(), expected.float(), what="out", case=case, atol=5e-5, rtol=5e-5,
                         hint="for each key tile: keys = t·BLOCK_N + arange; load K and V rows with the mask "
                              "keys < S; s = dot(q, trans(k)) · scale_log2; hide keys >= S (and, if CAUSAL, keys "
                              "after each row's position pos) with -inf; then m_new, alpha = exp2(m - m_new), "
                              "p = exp2(s - m_new), l and acc as in exercise 9.2")
            if not torch.all(buffer[L:] == -12345.0):
                fail("your kernel wrote rows past the end of the output", case=case,
                     hint="the store at the end is given; do not store inside the loop")
            cases += 1
    return cases
