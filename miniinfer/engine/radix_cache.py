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

The two searches are plain functions (chapter 08's exercises; :class:`~miniinfer.engine.EngineHooks`
swaps them): :func:`match_blocks` walks down the tree, :func:`lru_eviction_order` picks victims.
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

    def __repr__(self) -> str:
        return (f"RadixNode(block={self.block}, key={self.key[:8]}{'…' if len(self.key) > 8 else ''}, "
                f"children={len(self.children)}, last_access={self.last_access})")


def match_blocks(root: RadixNode, token_ids: list[int], block_size: int, max_tokens: int) -> list[RadixNode]:
    """The nodes of the longest cached, block-aligned prefix of ``token_ids``, root's child first.

    Walk down from ``root``: the child for block ``i`` is ``children[tuple(token_ids[i*P:(i+1)*P])]``.
    Stop at the first block with no child, and never match more than ``max_tokens`` tokens (so at
    most ``max_tokens // P`` blocks; a partial block of ``token_ids`` never matches). Pure: reads
    the tree, changes nothing.
    """
    limit = min(max(0, max_tokens), len(token_ids)) // block_size
    node, path = root, []
    for i in range(limit):
        child = node.children.get(tuple(token_ids[i * block_size:(i + 1) * block_size]))
        if child is None:
            break
        path.append(child)
        node = child
    return path


def lru_eviction_order(root: RadixNode, num_blocks: int, ref_counts: list[int]) -> list[RadixNode]:
    """Up to ``num_blocks`` nodes to evict, in the order to evict them.

    A node may go when it is a **leaf** and the tree holds the only reference to its block
    (``ref_counts[node.block] == 1``). Repeatedly take the evictable leaf with the smallest
    ``last_access`` (least recently used; ties: smaller block id); once all children of a node have
    been taken, that node is a leaf too and competes with the others (the root never goes). Pure:
    the caller removes the returned nodes, in order.
    """
    heap = []
    stack = list(root.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if not node.children and ref_counts[node.block] == 1:
            heap.append((node.last_access, node.block, node))
    heapq.heapify(heap)
    children_left: dict[int, int] = {}  # id(node) -> children not yet chosen
    order: list[RadixNode] = []
    while heap and len(order) < num_blocks:
        _, _, node = heapq.heappop(heap)
        order.append(node)
        parent = node.parent
        if parent is root or parent is None:
            continue
        left = children_left.get(id(parent), len(parent.children)) - 1
        children_left[id(parent)] = left
        if left == 0 and ref_counts[parent.block] == 1:
            heapq.heappush(heap, (parent.last_access, parent.block, parent))
    return order


class RadixCache:
    """Longest-prefix matching, insertion and LRU eviction over blocks of a :class:`BlockManager`."""

    def __init__(self, block_manager: BlockManager, hooks: EngineHooks | None = None):
        self.block_manager = block_manager
        hooks = hooks or EngineHooks()
        self._match_blocks = hooks.match_blocks or match_blocks            # resolved once
        self._eviction_order = hooks.lru_eviction_order or lru_eviction_order
        self.block_size = block_manager.block_size
        self.root = RadixNode((), -1, None)
        self.num_nodes = 0
        self._clock = itertools.count(1)

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
        nodes = self._match_blocks(self.root, token_ids, self.block_size, max(0, limit))
        self._check_path(nodes, token_ids)
        now = next(self._clock)
        for node in nodes:
            node.last_access = now
        blocks = [node.block for node in nodes]
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

    def _check_path(self, nodes: list[RadixNode], token_ids: list[int]) -> None:
        """A match must be a path from the root whose keys are the prompt's blocks (a replaced
        ``match_blocks`` that returns anything else would hand a sequence someone else's KV)."""
        parent, size = self.root, self.block_size
        for i, node in enumerate(nodes):
            if (not isinstance(node, RadixNode) or parent.children.get(node.key) is not node
                    or node.key != tuple(token_ids[i * size:(i + 1) * size])):
                raise RuntimeError(f"match_blocks returned {node!r} as block {i} of the match: not the child of "
                                   "the previous node whose key is that block of the prompt")
            parent = node

    def num_evictable_blocks(self) -> int:
        """Cached blocks held by the tree alone (all of them can be evicted, leaves first)."""
        counts = self.block_manager.ref_counts
        return sum(1 for node in self._nodes() if counts[node.block] == 1)

    def evict(self, num_blocks: int) -> int:
        """Free up to ``num_blocks`` blocks, least recently used leaves first; return how many."""
        if num_blocks <= 0:
            return 0
        freed = 0
        for node in list(self._eviction_order(self.root, num_blocks, self.block_manager.ref_counts))[:num_blocks]:
            parent = node.parent if isinstance(node, RadixNode) else None
            if (parent is None or parent.children.get(node.key) is not node or node.children
                    or self.block_manager.ref_counts[node.block] != 1):
                raise RuntimeError(f"lru_eviction_order chose {node!r}, which is not (or no longer) an unreferenced "
                                   "leaf of the tree: only leaves whose block the tree alone holds may be evicted, "
                                   "children before their parent")
            del parent.children[node.key]
            self.block_manager.release(node.block)
            self.num_nodes -= 1
            freed += 1
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
