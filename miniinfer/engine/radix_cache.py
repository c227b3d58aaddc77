"""The radix prefix cache: KV blocks of earlier requests, found again by their token ids.

Many requests start the same way — a system prompt, the earlier turns of a conversation, a few-shot
preamble. Their keys and values for that prefix are identical, so the engine keeps the blocks of
finished (and freshly prefilled) sequences in a tree keyed by token ids and lets a new request
reuse the longest matching prefix instead of recomputing it.

The tree is a radix tree over **whole blocks**: each edge is labelled by the ``P`` token ids of one
KV block, and each node below the root owns that block. Matching walks down block by block, so a
hit is always block-aligned (a partly filled block is never shared through the tree, which keeps
copy-on-write out of the picture). Reference counts protect blocks in use: the tree holds one
reference on each of its blocks, every sequence using a block holds another, so a block whose count
is 1 is held by the tree alone and may be evicted — least recently used leaves first, because a
parent is part of every path below it.
"""

from __future__ import annotations

import heapq
import itertools

from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.hooks import EngineHooks


class RadixNode:
    __slots__ = ("key", "block", "parent", "children", "last_access")

    def __init__(self, key: tuple[int, ...], block: int, parent: RadixNode | None):
        self.key = key                       # the P token ids of this node's block
        self.block = block                   # KV block id (-1 for the root)
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.last_access = 0


class RadixCache:
    """Longest-prefix matching, insertion and LRU eviction over blocks of a :class:`BlockManager`."""

    def __init__(self, block_manager: BlockManager, hooks: EngineHooks | None = None):
        self.block_manager = block_manager
        self.hooks = hooks or EngineHooks()
        self.block_size = block_manager.block_size
        self.root = RadixNode((), -1, None)
        self.num_nodes = 0
        self._clock = itertools.count(1)
        self.hit_tokens = 0      # statistics: tokens served from the cache
        self.queried_tokens = 0  # tokens looked up

    def _chunks(self, token_ids: list[int], num_blocks: int):
        size = self.block_size
        for i in range(num_blocks):
            yield tuple(token_ids[i * size:(i + 1) * size])

    def match_prefix(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Blocks holding the longest cached prefix of ``token_ids`` (at most ``max_tokens`` tokens).

        The caller retains the returned blocks for its sequence. We limit matches to
        ``len(token_ids) - 1`` tokens by default: the last prompt token must be computed anyway,
        since its logits give the first new token.
        """
        limit = len(token_ids) - 1 if max_tokens is None else max_tokens
        node, blocks = self.root, []
        now = next(self._clock)
        for key in self._chunks(token_ids, max(0, limit) // self.block_size):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            blocks.append(child.block)
            node = child
        self.queried_tokens += len(token_ids)
        self.hit_tokens += len(blocks) * self.block_size
        return blocks

    def insert(self, token_ids: list[int], block_table: list[int]) -> int:
        """Cache the full blocks of a sequence whose KV for ``token_ids`` is computed; return new blocks.

        Where a node already exists for a chunk (another sequence computed the same prefix), the tree
        keeps its own block; the sequence's duplicate stays the sequence's and is freed with it.
        """
        num_full = min(len(token_ids) // self.block_size, len(block_table))
        node, added = self.root, 0
        now = next(self._clock)
        for index, key in enumerate(self._chunks(token_ids, num_full)):
            child = node.children.get(key)
            if child is None:
                child = RadixNode(key, block_table[index], node)
                node.children[key] = child
                self.block_manager.retain(child.block)  # the tree's own reference
                self.num_nodes += 1
                added += 1
            child.last_access = now
            node = child
        return added

    def _evictable(self, node: RadixNode) -> bool:
        return not node.children and self.block_manager.ref_counts[node.block] == 1

    def num_evictable_blocks(self) -> int:
        """Cached blocks held by the tree alone (all of them can be evicted, leaves first)."""
        counts = self.block_manager.ref_counts
        return sum(1 for node in self._nodes() if counts[node.block] == 1)

    def evict(self, num_blocks: int) -> int:
        """Free up to ``num_blocks`` blocks, least recently used leaves first; return how many."""
        heap = [(n.last_access, id(n), n) for n in self._nodes() if self._evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key]
            self.block_manager.release(node.block)
            self.num_nodes -= 1
            freed += 1
            if parent is not self.root and self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def clear(self) -> None:
        """Evict everything the tree holds alone (blocks in use stay until their sequences finish)."""
        self.evict(self.num_nodes)

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
