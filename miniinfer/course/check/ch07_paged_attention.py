"""Checks for chapter 07: the slot mapping, paged decode attention, the copy-on-write decision.

Oracles: for the slot mapping, the meaning of a slot (writing position ``pos`` through the flat view
of a ``[num_blocks, P, …]`` pool must land in block ``block_table[pos // P]``, row ``pos % P``); for
attention, ``torch.nn.functional.scaled_dot_product_attention`` on each sequence's keys and values
laid out densely *before* they were scattered into the pool; for copy-on-write, the rule stated
case by case. Each also agrees with the package's reference (:mod:`miniinfer.engine.block_manager`,
:func:`miniinfer.kernels.paged_attention.paged_decode_attention_torch`). When an answer is wrong we
recompute the usual mistakes (swapped block/offset, end included, no ``1/sqrt(D)``, the wrong head
grouping, reading past ``seq_len``) and name the one that matches.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from miniinfer.course.checking import _is_stub_error, assert_close, assert_equal, call_student, exercise, fail
from miniinfer.engine import block_manager as reference
from miniinfer.kernels.paged_attention import paged_decode_attention_torch

__all__ = ["slot_mapping", "paged_decode_attention", "needs_copy_on_write"]


# ------------------------------------------------------------------------------------------------
# 7.1 slot mapping
# ------------------------------------------------------------------------------------------------

def _as_int_list(got, case: str) -> list[int]:
    if isinstance(got, torch.Tensor):
        if got.dim() != 1 or got.dtype.is_floating_point:
            fail(f"expected a list of ints, got a tensor of shape {tuple(got.shape)}, dtype {got.dtype}", case=case,
                 hint="return a flat list: one slot per position start … end-1")
        return [int(x) for x in got.tolist()]
    if not isinstance(got, (list, tuple)):
        fail(f"expected a list of ints, got {type(got).__name__}", case=case,
             hint="build the list with a comprehension over range(start, end)")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in got):
        bad = next(x for x in got if not isinstance(x, int) or isinstance(x, bool))
        fail(f"expected ints, got an element of type {type(bad).__name__} ({bad!r})", case=case,
             hint="use integer division // and %, not /, so that slots stay ints")
    return list(got)


def _slot_hint(got: list[int], table: list[int], start: int, end: int, P: int) -> str:
    def at(i: int):  # a block-table lookup that a wrong formula may take out of range
        return table[i] if 0 <= i < len(table) else None

    def slots(formula, positions):
        values = [formula(p) for p in positions]
        return None if any(v is None for v in values) else values

    positions = range(start, end)
    mistakes = [
        (slots(lambda p: at(p // P) * P + p % P if at(p // P) is not None else None, range(start, end + 1)),
         "`end` is exclusive: positions start … end-1, i.e. range(start, end)"),
        (list(positions), "you returned the positions themselves: look the block up in the block table "
                          "(slot = block_table[pos // P] * P + pos % P)"),
        (slots(lambda p: table[p // P] + p % P, positions),
         "a slot counts rows of the flat pool [num_blocks * P, …]: multiply the block id by P"),
        (slots(lambda p: table[p // P] * P + p, positions), "the offset inside the block is pos % P, not pos"),
        (slots(lambda p: p // P * P + p % P, positions), "the logical block pos // P must be translated to the "
                                                          "physical block block_table[pos // P]"),
        (slots(lambda p: at(p % P) * P + p // P if at(p % P) is not None else None, positions),
         "block and offset are swapped: block = block_table[pos // P], offset = pos % P"),
    ]
    for candidate, hint in mistakes:
        if candidate is not None and got == candidate:
            return hint
    return "slot = block_table[pos // P] * P + pos % P for pos in range(start, end)"


@exercise("7.1", "slot mapping")
def slot_mapping(fn) -> int:
    """Random block tables (distinct, shuffled physical ids), awkward P (1, 3, 5, …), ranges that
    start and end inside blocks, empty ranges; the slots must put every position in its block and
    row of a real pool, and equal the package's ``slot_mapping``."""
    rng = random.Random()
    cases = 0
    for P in (1, 2, 3, 5, 16, rng.randint(6, 40)):
        for trial in range(5):
            num_blocks = rng.randint(1, 6)
            table = rng.sample(range(3 * num_blocks + 50), num_blocks)  # physical blocks: scattered, any order
            length = num_blocks * P - rng.randint(0, P - 1)              # the last block is partly filled
            if trial == 0:
                start, end = 0, length                                   # a whole prompt (prefill)
            elif trial == 1:
                start = end = rng.randint(0, length)                     # nothing to compute
            elif trial == 2:
                start, end = length - 1, length                          # a decode step
            else:
                start = rng.randint(0, length)
                end = rng.randint(start, length)
            case = f"block_table={table}, start={start}, end={end}, block_size={P}"
            original = list(table)
            try:
                got = fn(table, start, end, P)
            except IndexError as error:
                fail(f"your function raised IndexError: {error}", case=case,
                     hint="the block table has one entry per block: index it with pos // P (never pos % P or pos), "
                          "and stop at end - 1 (range(start, end))")
            if table != original:
                fail("your function modified block_table", case=case, hint="only read the block table")
            got = _as_int_list(got, case)
            expected = reference.slot_mapping(original, start, end, P)
            if got != expected:
                fail(f"expected slots {expected}, got {got}", case=case, hint=_slot_hint(got, original, start, end, P))
            # The meaning of a slot: write each position's number through the flat view of a pool.
            pool = torch.full((max(original) + 1, P), -1, dtype=torch.long)
            pool.view(-1)[torch.tensor(got, dtype=torch.long)] = torch.arange(start, end)
            for pos in range(start, end):
                if pool[original[pos // P], pos % P].item() != pos:
                    fail(f"position {pos} did not land in block {original[pos // P]}, row {pos % P}", case=case)
            cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 7.2 paged decode attention
# ------------------------------------------------------------------------------------------------

# float32 answers against a float64 SDPA oracle: a softmax and two dot products over at most ~60 keys
# leave errors of a few 1e-7 on O(1) outputs; 2e-5 / 1e-4 is far above that and far below any real
# mistake. bfloat16 inputs: the reference computes in float32 and rounds once; an answer that keeps
# bf16 through the softmax is off by up to ~1e-2, so bf16 cases allow 3e-2.
ATOL, RTOL = 2e-5, 1e-4
GARBAGE = 30.0  # slots no sequence owns hold large values: reading one moves the output by O(1)


def _paged_case(rng: random.Random, B: int, H: int, H_kv: int, D: int, P: int, dtype: torch.dtype, fixed_len=None):
    """Dense per-sequence K/V (the oracle's view) scattered into a shuffled paged pool."""
    lengths = [fixed_len or rng.randint(1, 45) for _ in range(B)]
    lengths[rng.randrange(B)] = rng.choice([1, P, 2 * P, P + 1])      # block-boundary lengths
    blocks_per_seq = [math.ceil(n / P) for n in lengths]
    num_blocks = sum(blocks_per_seq) + rng.randint(1, 5)              # spare blocks nobody owns
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    width = max(blocks_per_seq) + rng.randint(0, 2)
    k_cache = GARBAGE * torch.randn(num_blocks, P, H_kv, D)           # garbage everywhere a sequence does not write
    v_cache = GARBAGE * torch.randn(num_blocks, P, H_kv, D)
    # Table entries past a sequence's blocks are garbage too: ids outside the pool.
    block_tables = torch.full((B, width), num_blocks + 1000, dtype=torch.int32)
    dense_k, dense_v = [], []
    for b in range(B):
        mine = [physical.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, :len(mine)] = torch.tensor(mine, dtype=torch.int32)
        k = torch.randn(lengths[b], H_kv, D)
        v = torch.randn(lengths[b], H_kv, D)
        for pos in range(lengths[b]):
            k_cache[mine[pos // P], pos % P] = k[pos]
            v_cache[mine[pos // P], pos % P] = v[pos]
        dense_k.append(k)
        dense_v.append(v)
    q = torch.randn(B, H, D)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    return (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables, seq_lens, dense_k, dense_v)


def _sdpa(q_b: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, grouping: str = "interleave"):
    """One sequence: q [H, D], k/v [S, H_kv, D] -> [H, D] in float64. interleave: head h uses KV head h // G."""
    H, H_kv = q_b.shape[0], k.shape[1]
    G = H // H_kv
    expand = (lambda t: t.repeat_interleave(G, dim=1)) if grouping == "interleave" else (lambda t: t.repeat(1, G, 1))
    k, v = expand(k.double()).transpose(0, 1), expand(v.double()).transpose(0, 1)  # [H, S, D]
    return F.scaled_dot_product_attention(q_b.double()[:, None], k, v, scale=scale)[:, 0]


def _oracle(q, dense_k, dense_v, scale, grouping="interleave", extra=0):
    return torch.stack([_sdpa(q[b], dense_k[b][:len(dense_k[b]) + extra] if extra < 0 else dense_k[b],
                              dense_v[b][:len(dense_v[b]) + extra] if extra < 0 else dense_v[b], scale, grouping)
                        for b in range(q.shape[0])])


def _read_past_end(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """The classic slip: attend to every slot of the last block (the garbage after seq_len included)."""
    P = k_cache.shape[1]
    rounded = [math.ceil(int(n) / P) * P for n in seq_lens]
    return paged_decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), block_tables,
                                        torch.tensor(rounded, dtype=torch.int32), scale)


def _close(got, candidate) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(candidate.shape):
        return False
    return torch.allclose(got.detach().double(), candidate.double(), atol=1e-3, rtol=1e-3, equal_nan=True)


@exercise("7.2", "paged decode attention")
def paged_decode_attention(fn) -> int:
    """Batches of awkward shapes (G = H / H_kv from 1 to 8, D odd-sized, P from 1 to 16, lengths on and off
    block boundaries), shuffled physical blocks, garbage in every slot and table entry a sequence does
    not own; against SDPA on the dense keys and values and the package's torch reference."""
    rng = random.Random()
    cases = 0
    configs = [  # (B, H, H_kv, D, P, dtype)
        (1, 4, 4, 8, 4, torch.float32),
        (3, 6, 2, 12, 3, torch.float32),
        (5, 9, 3, 16, 1, torch.float32),
        (2, 8, 1, 20, 16, torch.float32),
        (rng.randint(2, 6), 8, 2, 32, rng.choice([5, 7, 8]), torch.float32),
        (3, 4, 2, 16, 4, torch.bfloat16),
    ]
    for B, H, H_kv, D, P, dtype in configs:
        q, k_cache, v_cache, block_tables, seq_lens, dense_k, dense_v = _paged_case(rng, B, H, H_kv, D, P, dtype)
        scale = 1 / math.sqrt(D)
        case = (f"B={B}, H={H}, H_kv={H_kv}, D={D}, P={P}, {dtype}, seq_lens={seq_lens.tolist()}, "
                f"block_tables={block_tables.tolist()} (entries ≥ {k_cache.shape[0]} are unused garbage)")
        inputs = [q.clone(), k_cache.clone(), v_cache.clone(), block_tables.clone(), seq_lens.clone()]
        try:
            got = fn(*inputs, scale)
        except Exception as error:
            if _is_stub_error(error):
                raise
            message = str(error).lower()
            if isinstance(error, IndexError) or "out of bounds" in message or "out of range" in message:
                fail(f"your function raised {type(error).__name__}: {error}", case=case,
                     hint="only the first ceil(seq_lens[b] / P) entries of block_tables[b] belong to sequence b; "
                          "the rest may be anything (here: ids outside the pool). Slice the row before gathering.")
            raise RuntimeError(f"{type(error).__name__}: {error}  [case: {case}]") from error
        for name, before, after in zip(("q", "k_cache", "v_cache", "block_tables", "seq_lens"),
                                       (q, k_cache, v_cache, block_tables, seq_lens), inputs):
            if not torch.equal(before, after):
                fail(f"your function modified its input `{name}`", case=case, hint="attention only reads its inputs")
        expected = _oracle(q.float(), dense_k, dense_v, scale)
        mistakes = [
            (_oracle(q.float(), dense_k, dense_v, 1.0), "scale the scores by `scale` (1/sqrt(D)) before the softmax"),
            (_read_past_end(q, k_cache, v_cache, block_tables, seq_lens, scale),
             "you attended to every slot of the last block: only the first seq_lens[b] tokens are keys, the slots "
             "after them hold stale or garbage values"),
            (_oracle(q.float(), dense_k, dense_v, scale, extra=-1),
             "you left out the last key: seq_lens[b] counts the new token too (its k/v are already written)"),
        ]
        if 1 < H_kv < H:
            mistakes.append((_oracle(q.float(), dense_k, dense_v, scale, grouping="tile"),
                             "wrong GQA grouping: query head h uses KV head h // G (G = H / H_kv), "
                             "not h % H_kv (repeat_interleave, not repeat)"))
        hint = "gather the first seq_lens[b] keys/values through block_tables[b] (block pos // P, row pos % P), then "
        hint += "softmax(q · kᵀ · scale) · v per query head, with query head h reading KV head h // G"
        for candidate, why in mistakes:
            if _close(got, candidate) and not _close(candidate, expected):
                hint = why
                break
        if dtype == torch.float32:
            assert_close(got, expected.float(), what="output vs SDPA on the dense keys/values", case=case,
                         atol=ATOL, rtol=RTOL, hint=hint)
            assert_close(got, paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale),
                         what="output vs paged_decode_attention_torch", case=case, atol=ATOL, rtol=RTOL, hint=hint)
        else:
            assert_close(got, expected.to(dtype), what="output vs SDPA on the dense keys/values", case=case,
                         atol=3e-2, rtol=3e-2, hint=hint + "; return q's dtype (compute in float32, convert at the end)")
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 7.3 copy-on-write decision
# ------------------------------------------------------------------------------------------------

def _cow_hint(table, computed, P, ref_counts, expected) -> str:
    index, offset = computed // P, computed % P
    if offset == 0:
        return (f"position {computed} is the first row (offset 0) of a new block: the sequence writes into a fresh "
                "block, there is nothing to copy")
    if index >= len(table):
        return f"position {computed} falls in block {index}, which the sequence does not have yet: nothing to copy"
    block = table[index]
    if not expected:
        return (f"block {block} (logical block {index}) has reference count {ref_counts[block]}: this sequence alone "
                "holds it, so it writes in place")
    return (f"block {block} (logical block {index}, offset {offset}) is partly filled and shared (reference count "
            f"{ref_counts[block]}): writing in place would change the other holders' keys and values. Look at the "
            "block at num_computed_tokens // block_size, not necessarily the last one")


@exercise("7.3", "copy-on-write decision")
def needs_copy_on_write(fn) -> int:
    """Every kind of next write (offset 0, inside a private block, inside a shared block, past the table,
    tables longer than the computed tokens), P from 1 to 7, with the package's rule as the oracle."""
    rng = random.Random()
    cases = 0
    for P in (1, 2, 3, 4, 7):
        for _ in range(12):
            num_blocks = rng.randint(0, 4)
            table = rng.sample(range(20), num_blocks)
            ref_counts = [rng.choice([0, 1, 1, 2, 3]) for _ in range(20)]
            for block in table:
                ref_counts[block] = max(1, ref_counts[block])  # blocks in a table are held
            computed = rng.randint(0, num_blocks * P)
            if rng.random() < 0.5 and num_blocks:  # aim at the interesting case: inside a held block
                computed = rng.randrange(num_blocks) * P + rng.randint(1, P - 1) if P > 1 else computed
            case = f"block_table={table}, num_computed_tokens={computed}, block_size={P}, " \
                   f"ref_counts of its blocks={[ref_counts[b] for b in table]}"
            before = (list(table), list(ref_counts))
            got = call_student(fn, table, computed, P, ref_counts, case=case)
            if (table, ref_counts) != before:
                fail("your function modified block_table or ref_counts", case=case,
                     hint="this is only the decision; the block manager does the copy")
            if not isinstance(got, bool):
                fail(f"expected True or False, got {type(got).__name__} {got!r}", case=case,
                     hint="return a bool (e.g. the value of a comparison)")
            expected = reference.needs_copy_on_write(table, computed, P, ref_counts)
            assert_equal(got, expected, what="needs a copy", case=case, hint=_cow_hint(table, computed, P, ref_counts,
                                                                                       expected))
            cases += 1
    return cases
