"""Rolling the KV cache back after a verify step: rejected guesses leave no trace.

Before a verify step a sequence has ``num_computed`` tokens with K/V in the cache and one more token
(its newest) without. The step computes K/V for that token and its ``k`` guesses, so it needs slots
up to position ``num_computed + k`` and the scheduler gives the sequence blocks for all of them.
After ``a`` guesses are accepted, the K/V of the newest token and of the accepted guesses are valid:
``num_computed + 1 + a`` tokens. The K/V written for the ``k − a`` rejected guesses stay in their
slots — past the computed count, where no kernel reads, and the next step overwrites them — but
whole blocks that hold nothing valid go back to the pool at once.
"""

from __future__ import annotations

__all__ = ["rollback_blocks"]


def rollback_blocks(block_table: list[int], num_computed: int, num_guesses: int, num_accepted: int,
                    block_size: int) -> tuple[int, list[int], list[int]]:
    """-> (new computed count, blocks kept, blocks to release), for a sequence that verified
    ``num_guesses`` guesses and accepted ``num_accepted`` of them. The kept blocks are the first
    ``ceil(new computed / P)`` of ``block_table``; the rest are released."""
    if not 0 <= num_accepted <= num_guesses:
        raise ValueError(f"accepted {num_accepted} of {num_guesses} guesses")
    new_computed = num_computed + 1 + num_accepted
    keep = -(-new_computed // block_size)
    return new_computed, block_table[:keep], block_table[keep:]
