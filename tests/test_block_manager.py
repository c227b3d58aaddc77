"""Block manager and radix cache on their own: reference counts, copy-on-write, matching, LRU eviction."""

from __future__ import annotations

import random

import pytest

from miniinfer.engine.block_manager import BlockManager, NoFreeBlocksError
from miniinfer.engine.radix_cache import RadixCache
from miniinfer.engine.sequence import Sequence
from miniinfer.sampling import SamplingParams


def make_seq(tokens):
    return Sequence("r", list(tokens), SamplingParams())


def test_allocation_grows_block_by_block_and_frees_everything():
    manager = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(6))
    assert manager.num_blocks_needed(seq, 6) == 2
    manager.allocate(seq, 6)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 8
    seq.num_computed_tokens = 6
    seq.token_ids.append(7)
    assert manager.num_blocks_needed(seq, 1) == 0  # slot 6 is in block 1 (offset 2)
    manager.allocate(seq, 1)
    seq.num_computed_tokens = 7
    assert manager.slots(seq, 4, 7) == [seq.block_table[1] * 4 + i for i in range(3)]
    manager.allocate(seq, 2)  # positions 7 and 8: crosses into a third block
    assert len(seq.block_table) == 3
    manager.free(seq)
    assert manager.num_free_blocks == 10 and all(c == 0 for c in manager.ref_counts)


def test_full_pool_raises_and_changes_nothing():
    manager = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(12))
    with pytest.raises(NoFreeBlocksError):
        manager.allocate(seq, 12)
    assert seq.block_table == [] and manager.num_free_blocks == 2


def test_fork_shares_blocks_and_copy_on_write_gives_private_copies():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(range(6))
    manager.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = make_seq(range(6))
    child.num_computed_tokens = 6
    manager.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [manager.ref_counts[b] for b in parent.block_table] == [2, 2]
    shared_last = parent.block_table[1]
    # The parent writes position 6 into the shared, partly filled block 1: it must copy first.
    assert manager.num_blocks_needed(parent, 1) == 1
    manager.allocate(parent, 1)
    assert parent.block_table[1] != shared_last and parent.block_table[0] == child.block_table[0]
    assert manager.take_pending_copies() == [(shared_last, parent.block_table[1])]
    # Now the child is the block's only holder: it writes in place.
    assert manager.num_blocks_needed(child, 1) == 0
    manager.allocate(child, 1)
    assert child.block_table[1] == shared_last and manager.take_pending_copies() == []
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 8


def test_radix_cache_matches_longest_block_aligned_prefix():
    manager = BlockManager(num_blocks=16, block_size=4)
    cache = RadixCache(manager)
    seq = make_seq(range(11))
    manager.allocate(seq, 11)
    assert cache.insert(seq.token_ids, seq.block_table) == 2  # two full blocks; the partial third is not cached
    table = list(seq.block_table)
    manager.free(seq)
    assert cache.num_evictable_blocks() == 2 and manager.num_free_blocks == 14
    assert cache.match_prefix(list(range(11))) == table[:2]
    other = list(range(8)) + [99, 100]
    blocks = cache.match_prefix(other)
    assert len(blocks) == 2
    assert cache.match_prefix(list(range(4)) + [7, 7, 7, 7, 1]) == blocks[:1]
    assert cache.match_prefix([5, 5, 5, 5, 5]) == []
    # A prompt of exactly 8 tokens may reuse only 1 block: its last token must be computed.
    assert len(cache.match_prefix(list(range(8)))) == 1


def test_eviction_is_lru_over_unreferenced_leaves():
    manager = BlockManager(num_blocks=8, block_size=2)
    cache = RadixCache(manager)
    seqs = []
    for prefix in ([1, 2, 3, 4], [1, 2, 5, 6], [7, 8, 9, 9]):
        seq = make_seq(prefix + [0])
        manager.allocate(seq, 5)
        cache.insert(seq.token_ids, seq.block_table)
        manager.free(seq)
        seqs.append(seq)
    # Tree: [1,2] -> {[3,4], [5,6]};  [7,8] -> [9,9]. Five cached blocks, all evictable.
    assert cache.num_nodes == 5 and manager.num_free_blocks == 3
    cache.match_prefix([1, 2, 3, 4, 0])  # touch the first path: it becomes most recently used
    in_use = cache.match_prefix([7, 8, 9, 9, 0])
    for block in in_use:
        manager.retain(block)            # a running sequence holds [7,8],[9,9]
    assert cache.evict(10) == 3          # [5,6] first (oldest), then [3,4], then [1,2]; the held path stays
    assert cache.num_nodes == 2 and manager.num_free_blocks == 6
    for block in in_use:
        manager.release(block)
    assert cache.evict(10) == 2 and manager.num_free_blocks == 8


def test_random_workload_keeps_reference_counts_consistent():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=64, block_size=4)
    cache = RadixCache(manager)
    for _ in range(200):
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 30))]
        seq = make_seq(tokens)
        for block in cache.match_prefix(tokens):
            manager.retain(block)
            seq.block_table.append(block)
        seq.num_computed_tokens = len(seq.block_table) * 4
        need = len(tokens) - seq.num_computed_tokens
        if not manager.can_allocate(seq, need):
            cache.evict(manager.num_blocks_needed(seq, need) - manager.num_free_blocks)
        if manager.can_allocate(seq, need):
            manager.allocate(seq, need)
            seq.num_computed_tokens = len(tokens)
            cache.insert(tokens, seq.block_table)
        manager.free(seq)
        holders = {}
        for node in cache._nodes():
            holders[node.block] = holders.get(node.block, 0) + 1
        assert all(manager.ref_counts[b] == n for b, n in holders.items())
        assert manager.num_free_blocks + len(holders) == 64
    cache.clear()
    assert manager.num_free_blocks == 64
