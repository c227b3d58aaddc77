"""Helpers shared by the engine tests: run an engine to the end, and check that no KV block leaked."""

from __future__ import annotations

from miniinfer.engine import LLMEngine
from miniinfer.outputs import RequestOutput


def finish_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until idle; the final output of every request that finished, by request id."""
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output
    return results


def all_blocks_free(engine: LLMEngine) -> bool:
    """Every KV block is free or held by the prefix cache alone, and nothing is running."""
    evictable = engine.radix_cache.num_evictable_blocks() if engine.radix_cache is not None else 0
    return engine.block_manager.num_free_blocks + evictable == engine.num_kv_blocks and not engine.scheduler.running
