"""Checks for chapter 08: longest-prefix matching over the radix tree, and the LRU eviction order.

Every case is a fresh random tree grown by the package's own :class:`~miniinfer.engine.RadixCache`
(inserts of random token sequences over a tiny vocabulary, so that prefixes are shared; lookups that
refresh ``last_access``; some paths held by "running sequences"). Oracles: for matching, a brute
force over the inserted sequences themselves (no tree); for eviction, a naive simulation that
re-scans the whole tree after every removal. Both agree with the package's reference
(:func:`miniinfer.engine.radix_cache.match_blocks`, :func:`~miniinfer.engine.radix_cache.lru_eviction_order`).
The functions must be pure: we compare the tree before and after.
"""

from __future__ import annotations

import random

from miniinfer.course.checking import call_student, exercise, fail
from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.radix_cache import RadixCache, RadixNode
from miniinfer.engine.radix_cache import lru_eviction_order as reference_eviction_order
from miniinfer.engine.radix_cache import match_blocks as reference_match
from miniinfer.engine.sequence import Sequence
from miniinfer.sampling import SamplingParams

__all__ = ["match_blocks", "lru_eviction_order"]


def _grow_tree(rng: random.Random, P: int, num_sequences: int, vocab: int = 3):
    """A RadixCache holding the full blocks of ``num_sequences`` random sequences; returns it and them."""
    manager = BlockManager(num_blocks=2000, block_size=P)
    cache = RadixCache(manager)
    inserted: list[list[int]] = []
    stem = [rng.randrange(vocab) for _ in range(rng.randint(P, 4 * P))]  # a shared "system prompt"
    for _ in range(num_sequences):
        tokens = (stem[:rng.randint(0, len(stem))] if rng.random() < 0.7 else []) \
            + [rng.randrange(vocab) for _ in range(rng.randint(0, 5 * P))]
        if not tokens:
            tokens = [rng.randrange(vocab)]
        seq = Sequence("check", tokens, SamplingParams())
        manager.allocate(seq, len(tokens))
        cache.insert(tokens, seq.block_table)
        manager.free(seq)
        inserted.append(tokens)
        if rng.random() < 0.5:  # a lookup refreshes last_access along a path
            cache.match_prefix(rng.choice(inserted))
    return cache, manager, inserted


def _snapshot(root: RadixNode) -> list:
    """Everything a pure function must leave alone: structure, keys, blocks, timestamps."""
    out, stack = [], [(root, ())]
    while stack:
        node, path = stack.pop()
        out.append((path, node.key, node.block, node.last_access, node.parent is not None,
                    tuple(sorted(node.children))))
        for key, child in node.children.items():
            stack.append((child, path + (key,)))
    return sorted(out)


def _as_nodes(got, case: str, function: str) -> list[RadixNode]:
    if not isinstance(got, (list, tuple)):
        fail(f"expected a list of RadixNode, got {type(got).__name__}", case=case,
             hint=f"{function} returns the nodes themselves (the caller reads .block and updates .last_access)")
    for item in got:
        if not isinstance(item, RadixNode):
            fail(f"expected a list of RadixNode, got an element of type {type(item).__name__} ({item!r})", case=case,
                 hint="return the nodes, not their block ids or keys")
    return list(got)


def _describe(inserted: list[list[int]]) -> str:
    text = f"the tree was built from the sequences {inserted}"
    return text if len(text) <= 400 else text[:400] + " …]"


def _blocks(nodes) -> list[int]:
    return [node.block for node in nodes]


# ------------------------------------------------------------------------------------------------
# 8.1 longest block-aligned prefix match
# ------------------------------------------------------------------------------------------------

def _brute_force_match(inserted: list[list[int]], token_ids: list[int], P: int, max_tokens: int) -> int:
    """Blocks matched, from the sequences alone: the longest k·P-token prefix some inserted sequence
    had in full blocks, with k·P ≤ min(max_tokens, len(token_ids))."""
    limit = min(max(0, max_tokens), len(token_ids)) // P
    best = 0
    for seq in inserted:
        k = 0
        while k < min(limit, len(seq) // P) and seq[k * P:(k + 1) * P] == token_ids[k * P:(k + 1) * P]:
            k += 1
        best = max(best, k)
    return best


def _match_hint(got: list[RadixNode], expected: list[RadixNode], token_ids, P, max_tokens) -> str:
    limit_blocks = min(max(0, max_tokens), len(token_ids)) // P
    if len(got) > limit_blocks:
        return (f"at most max_tokens // P = {max(0, max_tokens) // P} blocks may match, and only whole blocks of "
                f"token_ids ({len(token_ids)} tokens = {len(token_ids) // P} whole blocks of {P})")
    if _blocks(got) == _blocks(expected[:len(got)]) and len(got) < len(expected):
        return "you stopped too early: keep walking down while the child for the next block exists"
    return ("walk down from the root: child = node.children.get(tuple(token_ids[i*P:(i+1)*P])); "
            "stop at the first missing child; the result is the list of nodes on that path")


@exercise("8.1", "longest block-aligned prefix match")
def match_blocks(fn) -> int:
    """Random trees (P from 1 to 7, shared stems), queries that are inserted sequences, their prefixes and
    extensions, and variants that diverge mid-block; max_tokens below, at and above the query length,
    not a multiple of P, and 0. Compared with a brute force over the inserted sequences."""
    rng = random.Random()
    cases = 0
    for P in (1, 2, 3, 4, 7):
        cache, _, inserted = _grow_tree(rng, P, rng.randint(4, 9))
        for trial in range(8):
            base = rng.choice(inserted)
            if trial % 4 == 0:
                token_ids = list(base)
            elif trial % 4 == 1:
                token_ids = base + [rng.randrange(3) for _ in range(rng.randint(1, 2 * P))]
            elif trial % 4 == 2 and len(base) > 1:
                token_ids = list(base)
                token_ids[rng.randrange(len(token_ids))] = 3  # a token no tree key holds: diverges there
            else:
                token_ids = [rng.randrange(3) for _ in range(rng.randint(1, 4 * P))]
            max_tokens = rng.choice([len(token_ids) - 1, len(token_ids), len(token_ids) + P,
                                     rng.randint(0, len(token_ids)), 0, P - 1 if P > 1 else 0])
            case = f"block_size={P}, token_ids={token_ids}, max_tokens={max_tokens}; {_describe(inserted)}"
            before = _snapshot(cache.root)
            got = call_student(fn, cache.root, list(token_ids), P, max_tokens, case=case)
            if _snapshot(cache.root) != before:
                fail("your function changed the tree (children, keys or last_access)", case=case,
                     hint="match_blocks only reads the tree; RadixCache.match_prefix updates last_access itself")
            got = _as_nodes(got, case, "match_blocks")
            expected = reference_match(cache.root, token_ids, P, max_tokens)
            oracle = _brute_force_match(inserted, token_ids, P, max_tokens)
            assert len(expected) == oracle, "reference and brute force disagree"  # the check's own sanity
            if _blocks(got) != _blocks(expected):
                fail(f"expected the blocks {_blocks(expected)} ({len(expected)} blocks = {len(expected) * P} tokens), "
                     f"got {_blocks(got)}", case=case, hint=_match_hint(got, expected, token_ids, P, max_tokens))
            if any(a is not b for a, b in zip(got, expected)):
                fail("the right block ids, but not the tree's own nodes", case=case,
                     hint="return the RadixNode objects of the tree, not copies")
            cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 8.2 LRU eviction order
# ------------------------------------------------------------------------------------------------

def _naive_eviction(root: RadixNode, num_blocks: int, ref_counts: list[int]) -> list[int]:
    """Block ids in eviction order, by re-scanning all remaining nodes after every removal."""
    removed: set[int] = set()
    order: list[int] = []

    def nodes():
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    while len(order) < num_blocks:
        candidates = [n for n in nodes() if id(n) not in removed and ref_counts[n.block] == 1
                      and all(id(c) in removed for c in n.children.values())]
        if not candidates:
            break
        victim = min(candidates, key=lambda n: (n.last_access, n.block))
        removed.add(id(victim))
        order.append(victim.block)
    return order


def _eviction_hint(got: list[RadixNode], expected_blocks: list[int], num_blocks: int, ref_counts) -> str:
    chosen: set[int] = set()
    for node in got:
        if ref_counts[node.block] != 1:
            return (f"block {node.block} has reference count {ref_counts[node.block]}: a running sequence uses it. "
                    "Only blocks the tree alone holds (count 1) may be evicted")
        if any(id(child) not in chosen for child in node.children.values()):
            return (f"block {node.block} still has children when you evict it: only leaves go (a parent is part "
                    "of every path below it); it becomes a leaf once all its children are chosen")
        chosen.add(id(node))
    if len(got) > num_blocks:
        return f"return at most num_blocks = {num_blocks} nodes"
    got_blocks = _blocks(got)
    if sorted(got_blocks) == sorted(expected_blocks):
        return ("the right victims in the wrong order: always take the evictable leaf with the smallest "
                "last_access next (ties: smaller block id) — a heap keyed by (last_access, block) does it")
    if len(got) < len(expected_blocks):
        return ("too few victims: once all children of a node have been chosen, the node is a leaf and can go "
                "too (if the tree alone holds it) — push it into the candidates")
    return ("least recently used first: the smallest last_access among unreferenced leaves, then repeat "
            "(a parent joins the candidates once all its children are chosen)")


@exercise("8.2", "LRU eviction order")
def lru_eviction_order(fn) -> int:
    """Random trees with refreshed paths and paths held by running sequences (P from 1 to 5); asks for
    0, a few, and more blocks than can be freed. The exact order must equal a naive re-scanning
    simulation and the package's reference; the tree and the reference counts must not change."""
    rng = random.Random()
    cases = 0
    for P in (1, 2, 3, 5):
        for _ in range(4):
            cache, manager, inserted = _grow_tree(rng, P, rng.randint(3, 10))
            # Some "running sequences" hold the blocks of a cached prefix (as the scheduler does on admission).
            held = []
            for _ in range(rng.randint(0, 2)):
                for block in cache.match_prefix(rng.choice(inserted)):
                    manager.retain(block)
                    held.append(block)
            total = cache.num_nodes
            for num_blocks in (0, 1, rng.randint(1, max(1, total)), total + 3):  # always 4: a fixed case count
                ref_counts = manager.ref_counts
                case = (f"block_size={P}, num_blocks={num_blocks}, tree of {total} nodes, {_describe(inserted)}, "
                        f"blocks held by running sequences: {sorted(set(held))}")
                before = (_snapshot(cache.root), list(ref_counts))
                got = call_student(fn, cache.root, num_blocks, ref_counts, case=case)
                if (_snapshot(cache.root), list(ref_counts)) != before:
                    fail("your function changed the tree or ref_counts", case=case,
                         hint="only choose the victims; RadixCache.evict removes them and releases their blocks")
                got = _as_nodes(got, case, "lru_eviction_order")
                expected = _blocks(reference_eviction_order(cache.root, num_blocks, ref_counts))
                assert expected == _naive_eviction(cache.root, num_blocks, ref_counts), "reference vs naive"
                if _blocks(got) != expected:
                    fail(f"expected to evict blocks {expected} in that order, got {_blocks(got)}", case=case,
                         hint=_eviction_hint(got, expected, num_blocks, ref_counts))
                cases += 1
    return cases
