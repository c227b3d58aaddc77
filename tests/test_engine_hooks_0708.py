"""Chapters 07–08 hooks: the reference functions, and the engine calling whatever EngineHooks hands it.

Each hook is wrapped around the package's own function with a call counter: the engine must call it,
the outputs must equal a run without hooks, and the block pool must end consistent (every block
free or held by the prefix cache alone). Bad hook results must be refused before they corrupt state.
"""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer.engine import EngineConfig, EngineHooks, LLMEngine
from miniinfer.engine.block_manager import BlockManager, needs_copy_on_write, slot_mapping
from miniinfer.engine.radix_cache import RadixCache, lru_eviction_order, match_blocks
from miniinfer.engine.sequence import Sequence
from miniinfer.kernels.paged_attention import paged_decode_attention_torch
from miniinfer.loader import load_model
from miniinfer.sampling import SamplingParams


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    folder, _ = small_checkpoint
    return load_model(folder)[0]


def counted(fn, calls: dict, name: str):
    def wrapper(*args):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args)
    return wrapper


def run(engine: LLMEngine, prompts, params) -> list[list[list[int]]]:
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = [c.token_ids for c in output.outputs]
    return [done[i] for i in ids]


def assert_pool_consistent(engine: LLMEngine) -> None:
    manager, cache = engine.block_manager, engine.radix_cache
    holders: dict[int, int] = {}
    if cache is not None:
        for node in cache._nodes():
            holders[node.block] = holders.get(node.block, 0) + 1
    assert all(manager.ref_counts[b] == n for b, n in holders.items()), "tree blocks: one reference each"
    assert manager.num_free_blocks + len(holders) == engine.num_kv_blocks
    assert sorted(manager.free_blocks) == [b for b in range(engine.num_kv_blocks) if manager.ref_counts[b] == 0]


# -- the reference functions -------------------------------------------------------------------------

def test_slot_mapping_and_copy_on_write_rules():
    assert slot_mapping([7, 2, 9], 0, 9, 3) == [21, 22, 23, 6, 7, 8, 27, 28, 29]
    assert slot_mapping([7, 2, 9], 4, 5, 3) == [7]
    assert slot_mapping([5], 2, 2, 4) == []
    refs = [0, 2, 1, 3]
    assert needs_copy_on_write([1, 2], 5, 4, refs) is False      # block 2 is private
    assert needs_copy_on_write([2, 1], 5, 4, refs) is True       # block 1 is shared, offset 1
    assert needs_copy_on_write([2, 1], 4, 4, refs) is False      # offset 0: a fresh block
    assert needs_copy_on_write([2, 1], 8, 4, refs) is False      # past the table
    assert needs_copy_on_write([3, 2], 1, 4, refs) is True       # not the last block: the one being written


def grow(rng, P, count, vocab=3):
    manager = BlockManager(num_blocks=500, block_size=P)
    cache = RadixCache(manager)
    inserted = []
    for _ in range(count):
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 6 * P))]
        seq = Sequence("t", tokens, SamplingParams())
        manager.allocate(seq, len(tokens))
        cache.insert(tokens, seq.block_table)
        manager.free(seq)
        inserted.append(tokens)
        if rng.random() < 0.5:
            cache.match_prefix(rng.choice(inserted))
    return cache, manager, inserted


@pytest.mark.parametrize("P", [1, 3, 4])
def test_match_blocks_is_the_longest_inserted_prefix(P, seed):
    rng = random.Random(seed)
    cache, _, inserted = grow(rng, P, 12)
    for _ in range(50):
        query = list(rng.choice(inserted)) + [rng.randrange(3) for _ in range(rng.randint(0, 5))]
        if rng.random() < 0.3:
            query = [rng.randrange(3) for _ in range(rng.randint(1, 20))]
        max_tokens = rng.randint(0, len(query) + 3)
        limit = min(max_tokens, len(query)) // P
        brute = max((next((k for k in range(min(limit, len(s) // P) + 1)
                           if k == min(limit, len(s) // P) or s[k * P:(k + 1) * P] != query[k * P:(k + 1) * P]))
                     for s in inserted), default=0)
        stamps = [n.last_access for n in cache._nodes()]
        nodes = match_blocks(cache.root, query, P, max_tokens)
        assert len(nodes) == brute
        assert [n.last_access for n in cache._nodes()] == stamps, "pure: no timestamps touched"
        for i, node in enumerate(nodes):
            assert node.key == tuple(query[i * P:(i + 1) * P])


def test_lru_eviction_order_matches_a_naive_rescan_and_evict_uses_it(seed):
    rng = random.Random(seed)
    for P in (1, 2, 4):
        cache, manager, inserted = grow(rng, P, 10)
        held = cache.match_prefix(rng.choice(inserted))
        for block in held:
            manager.retain(block)
        order = [n.block for n in lru_eviction_order(cache.root, 10**6, manager.ref_counts)]
        removed, naive = set(), []
        while True:
            candidates = [n for n in cache._nodes() if id(n) not in removed and manager.ref_counts[n.block] == 1
                          and all(id(c) in removed for c in n.children.values())]
            if not candidates:
                break
            victim = min(candidates, key=lambda n: (n.last_access, n.block))
            removed.add(id(victim))
            naive.append(victim.block)
        assert order == naive
        assert not set(order) & set(held), "blocks in use are never chosen"
        k = rng.randint(0, len(order))
        assert cache.evict(k) == k
        assert all(manager.ref_counts[b] == 0 for b in order[:k])
        for block in held:
            manager.release(block)
        cache.clear()
        assert manager.num_free_blocks == 500


def test_bad_hook_results_are_refused():
    manager = BlockManager(num_blocks=20, block_size=2)
    seq = Sequence("t", [1, 2, 3, 4, 5], SamplingParams())
    manager.allocate(seq, 5)
    cache = RadixCache(manager)
    cache.insert(seq.token_ids, seq.block_table)   # seq still holds its blocks: nothing is evictable
    internal = cache.root.children[(1, 2)]
    evict_held = RadixCache(manager, hooks=EngineHooks(lru_eviction_order=lambda root, n, refs: [internal]))
    evict_held.root = cache.root
    with pytest.raises(RuntimeError, match="unreferenced leaf"):
        evict_held.evict(1)
    wrong_path = RadixCache(manager, hooks=EngineHooks(match_blocks=lambda root, t, p, m: [internal.children[(3, 4)]]))
    wrong_path.root = cache.root
    with pytest.raises(RuntimeError, match="match_blocks"):
        wrong_path.match_prefix([1, 2, 3, 4, 9])
    with pytest.raises(ValueError, match="slot_mapping"):
        EngineHooks(slot_mapping=42)


# -- the engine calls the hooks, and nothing changes ---------------------------------------------------

def test_block_manager_and_attention_hooks_change_no_output(small_model, seed):
    rng = random.Random(seed)
    vocab = small_model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(3, 30))] for _ in range(4)]
    params = SamplingParams(temperature=1.0, max_tokens=7, n=3, seed=11, ignore_eos=True)  # forks -> copy-on-write
    config = dict(block_size=4, num_kv_blocks=120)
    expected = run(LLMEngine(small_model, None, EngineConfig(**config)), prompts, params)
    calls: dict[str, int] = {}
    hooks = EngineHooks(slot_mapping=counted(slot_mapping, calls, "slot_mapping"),
                        needs_copy_on_write=counted(needs_copy_on_write, calls, "needs_copy_on_write"),
                        paged_decode_attention=counted(paged_decode_attention_torch, calls, "paged_decode_attention"))
    engine = LLMEngine(small_model, None, EngineConfig(**config), hooks=hooks)
    assert run(engine, prompts, params) == expected
    assert set(calls) == {"slot_mapping", "needs_copy_on_write", "paged_decode_attention"}, calls
    assert_pool_consistent(engine)


def test_a_decode_hook_really_computes_the_decode_steps(small_model):
    """A decode hook that returns zeros changes the continuation; the prompt's prefill does not use it."""
    prompt = list(range(1, 12))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    normal = run(LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=40)), [prompt], params)
    zeros = EngineHooks(paged_decode_attention=lambda q, *rest: torch.zeros_like(q))
    broken = run(LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=40), hooks=zeros),
                 [prompt], params)
    assert broken[0][0][0] == normal[0][0][0], "the first token comes from the prefill"
    assert broken != normal


def test_radix_hooks_change_no_output_under_eviction(small_model, seed):
    rng = random.Random(seed)
    vocab = small_model.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(24)]
    prompts = [system + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = run(LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=200,
                                                             enable_prefix_caching=False)), prompts, params)
    calls: dict[str, int] = {}
    hooks = EngineHooks(match_blocks=counted(match_blocks, calls, "match_blocks"),
                        lru_eviction_order=counted(lru_eviction_order, calls, "lru_eviction_order"))
    # A pool of 20 blocks of 4 (two requests of up to 42 tokens at a time): the cache must evict to make room.
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=20, max_num_seqs=2), hooks=hooks)
    assert run(engine, prompts, params) == expected
    assert calls.get("match_blocks", 0) >= len(prompts) and calls.get("lru_eviction_order", 0) > 0, calls
    assert engine.stats()["prefix_cache_hit_tokens"] > 0
    assert_pool_consistent(engine)
    engine.radix_cache.clear()
    assert engine.block_manager.num_free_blocks == 20


@pytest.mark.parametrize("batched", [True, False])
def test_a_full_cache_is_walked_once_per_eviction_batch_not_once_per_block(small_model, batched, monkeypatch):
    """Once the pool is full of cached prefixes, every block a decoding sequence grows into needs an
    eviction, and choosing victims walks the whole tree. The scheduler evicts a batch (1/64 of the pool)
    per walk; evicting exactly the shortfall (the unbatched case, kept as the measurement's control) walks
    the tree for every block. Outputs are the same either way, and equal those without a cache."""
    from miniinfer.engine import scheduler as scheduler_module

    if not batched:
        monkeypatch.setattr(scheduler_module, "EVICTION_BATCH_FRACTION", 0.0)
    rng = random.Random(0)
    vocab = small_model.config.vocab_size
    fillers = [[rng.randrange(vocab) for _ in range(60)] for _ in range(60)]   # 15 blocks of 4 each, cached
    growers = [[rng.randrange(vocab) for _ in range(5)] for _ in range(2)]
    fill, grow = (SamplingParams(temperature=0.0, max_tokens=1), SamplingParams(temperature=0.0, max_tokens=120,
                                                                                ignore_eos=True))
    calls: dict[str, int] = {}
    hooks = EngineHooks(lru_eviction_order=counted(lru_eviction_order, calls, "walks"))
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=640, max_num_seqs=4), hooks=hooks)
    run(engine, fillers, fill)  # 60 x 15 blocks > 640: the pool ends full of cached prefixes
    calls.clear()
    grown = run(engine, growers, grow)  # 2 x ~31 more blocks, each taken from the cache
    walks = calls.get("walks", 0)
    plain = run(LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=640,
                                                          enable_prefix_caching=False)), growers, grow)
    assert grown == plain
    assert_pool_consistent(engine)
    if batched:
        assert walks <= 8, f"{walks} walks of the tree for ~60 blocks (batch of 10; measured: 7)"
    else:
        assert walks >= 50, f"control: one walk per block expected (measured: 60), got {walks}"
