"""The paged KV pool: fixed-size blocks, a free list, reference counts, block tables, copy-on-write.

The KV cache of every layer is one big tensor ``[num_blocks, P, H_kv, D]`` (P = ``block_size``
tokens per block). A sequence owns a **block table**: the ids of its blocks in position order, so
the token at position ``pos`` lives in block ``block_table[pos // P]`` at offset ``pos % P``, and
its flat **slot** is ``block_table[pos // P] * P + pos % P``. Memory is reserved block by block as
a sequence grows, so at most ``P − 1`` slots per sequence are wasted, instead of everything between
its length and the maximum context (chapter 07 measures the difference).

Blocks are **reference counted**: a block may be shared by several sequences (``n > 1`` parallel
sampling forks after the prompt) and by the radix prefix cache. A sequence that is about to write
into a shared, partly filled block gets a private copy first (**copy-on-write**); the copy itself
is done by the model runner, which owns the KV tensors, from :attr:`BlockManager.pending_copies`.

Two decisions are plain functions (chapter 07's exercises; :class:`~miniinfer.engine.EngineHooks`
swaps them): :func:`slot_mapping` (position → slot through a block table) and
:func:`needs_copy_on_write` (must the next write go to a private copy?).
"""

from __future__ import annotations

from collections import deque

from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.sequence import Sequence


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat slot ids of positions ``start … end-1`` of a sequence whose KV blocks are ``block_table``.

    Position ``pos`` lives in block ``block_table[pos // P]`` at offset ``pos % P``; its slot (its row
    in the pool viewed as ``[num_blocks * P, H_kv, D]``) is ``block * P + offset``. ``P = block_size``.
    """
    return [block_table[pos // block_size] * block_size + pos % block_size for pos in range(start, end)]


def needs_copy_on_write(block_table: list[int], num_computed_tokens: int, block_size: int,
                        ref_counts: list[int]) -> bool:
    """Must the sequence copy a block before writing its next token (position ``num_computed_tokens``)?

    Only when that position falls *inside* a block the sequence already has (offset ≠ 0: a block
    that is partly filled) and that block is shared (reference count > 1). A write at offset 0 goes
    to a fresh block; a block held by this sequence alone is written in place.
    """
    index = num_computed_tokens // block_size
    return (num_computed_tokens % block_size != 0 and index < len(block_table)
            and ref_counts[block_table[index]] > 1)


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than requested (the scheduler evicts or preempts instead)."""


class BlockManager:
    """Owns the block ids of the KV pool; the tensors themselves live in the model runner."""

    def __init__(self, num_blocks: int, block_size: int, hooks: EngineHooks | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be ≥ 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        hooks = hooks or EngineHooks()
        # Resolved once: each call below is a plain function call, hook or not.
        self._slot_mapping = hooks.slot_mapping or slot_mapping
        self._needs_copy_on_write = hooks.needs_copy_on_write or needs_copy_on_write
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        # (source block, destination block) copies the model runner must do before the next forward.
        self.pending_copies: list[tuple[int, int]] = []

    # -- single blocks ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def allocate_block(self) -> int:
        if not self.free_blocks:
            raise NoFreeBlocksError("the KV pool is full")
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0, f"block {block} on the free list has references"
        self.ref_counts[block] = 1
        return block

    def retain(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"retain of free block {block}"
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"release of free block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    # -- sequences -------------------------------------------------------------------------------

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to allocate so that ``num_new_tokens`` more tokens of ``seq`` have slots.

        Counts a copy-on-write block too: writing into a shared, partly filled last block needs one.
        """
        return self._blocks_needed(seq, num_new_tokens, num_new_tokens > 0 and self._needs_cow(seq))

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, copy_on_write: bool) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table)) + int(copy_on_write)

    def _needs_cow(self, seq: Sequence) -> bool:
        return bool(self._needs_copy_on_write(seq.block_table, seq.num_computed_tokens, self.block_size,
                                              self.ref_counts))

    def has_room(self, seq: Sequence, num_new_tokens: int) -> bool:
        """The common decode case, decided in O(1): the next tokens fit in the sequence's last block,
        which it holds alone, so nothing needs allocating or copying. (With a replaced copy-on-write
        rule we always ask it instead.)"""
        if self._needs_copy_on_write is not needs_copy_on_write or not seq.block_table:
            return False
        computed, size = seq.num_computed_tokens, self.block_size
        return (computed % size != 0 and computed + num_new_tokens <= len(seq.block_table) * size
                and self.ref_counts[seq.block_table[-1]] == 1
                and computed // size == len(seq.block_table) - 1)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` slots for its next ``num_new_tokens`` tokens (after a copy-on-write if needed)."""
        copy_on_write = num_new_tokens > 0 and self._needs_cow(seq)  # decided once per allocation
        needed = self._blocks_needed(seq, num_new_tokens, copy_on_write)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(f"{seq} needs {needed} blocks, {self.num_free_blocks} free")
        if copy_on_write:
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_table[index]
            private = self.allocate_block()
            self.pending_copies.append((shared, private))
            seq.block_table[index] = private
            self.release(shared)
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self.allocate_block())

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody else holds go back to the free list."""
        for block in reversed(seq.block_table):  # tail first: the free list then reuses the prefix last
            self.release(block)
        seq.block_table = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share every block of ``parent`` (parallel sampling after the prompt)."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.retain(block)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat slot ids of positions ``start … end-1`` of ``seq``."""
        return list(self._slot_mapping(seq.block_table, start, end, self.block_size))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
