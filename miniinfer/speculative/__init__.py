"""Speculative decoding (chapter 10): guess a few tokens cheaply, verify them all in one target forward.

| module | one idea |
|---|---|
| :mod:`~miniinfer.speculative.acceptance` | the acceptance / resample rule, E(α, γ) |
| :mod:`~miniinfer.speculative.proposers` | draft model, n-gram prompt lookup, layer-skipping self-draft |
| :mod:`~miniinfer.speculative.adaptive` | choosing γ and the proposer from measured acceptance × cost |
| :mod:`~miniinfer.speculative.tree` | token trees: the tree attention mask, longest accepted path, SpecInfer's rule |
| :mod:`~miniinfer.speculative.decoder` | speculation as an engine step: propose → verify → commit with rollback |

``LLM(path, speculative_model="ngram" | "self" | draft_path, num_speculative_tokens=4 | "auto")``.
"""

from __future__ import annotations

from miniinfer.speculative.acceptance import accept_draft, expected_tokens_per_step, residual_distribution
from miniinfer.speculative.adaptive import (
    AdaptiveGamma,
    SpeculationGate,
    best_gamma,
    select_proposer,
    speedup,
)
from miniinfer.speculative.decoder import SpeculativeDecoder
from miniinfer.speculative.proposers import (
    DraftModelProposer,
    LayerSkipModel,
    NgramProposer,
    Proposal,
    Proposer,
    self_draft_model,
)

__all__ = ["accept_draft", "expected_tokens_per_step", "residual_distribution", "AdaptiveGamma", "SpeculationGate",
           "best_gamma",
           "select_proposer", "speedup", "SpeculativeDecoder", "DraftModelProposer", "LayerSkipModel",
           "NgramProposer", "Proposal", "Proposer", "self_draft_model", "build_proposer", "build_speculative_decoder"]


def build_proposer(engine, speculative_model) -> Proposer:
    """The proposer for ``speculative_model`` ("ngram", "self", or a draft checkpoint folder); a draft's
    KV cache rows hold ``max_model_len`` tokens, like the engine's sequences."""
    if speculative_model == "ngram":
        return NgramProposer()
    if speculative_model == "self":
        return DraftModelProposer(self_draft_model(engine.model), max_model_len=engine.max_model_len, name="self")
    from miniinfer.loader import load_model

    draft, _ = load_model(speculative_model, dtype=engine.dtype, device=engine.device,
                          max_model_len=engine.max_model_len)
    if draft.config.vocab_size != engine.model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                         f"target's ({engine.model.config.vocab_size}): they must share a tokenizer")
    return DraftModelProposer(draft, max_model_len=engine.max_model_len, name="draft")


def build_speculative_decoder(engine, speculative_model, num_speculative_tokens=4, accept_fn=None,
                              speculative_tree: int | None = None) -> SpeculativeDecoder:
    if speculative_tree is None:
        proposer = build_proposer(engine, speculative_model)
    else:
        # Trees: verified with the batched verify attention's tree mask, which the torch and sdpa backends use.
        if engine.backend.name not in ("torch", "sdpa"):
            raise ValueError(f"speculative_tree needs the 'torch' or 'sdpa' attention backend (the tree mask is not "
                             f"in the {engine.backend.name!r} kernels yet); use chain speculation there")
        if speculative_model in ("ngram", "self") or num_speculative_tokens == "auto":
            raise ValueError("speculative_tree needs a draft model checkpoint and a fixed num_speculative_tokens")
        from miniinfer.loader import load_model
        from miniinfer.speculative.proposers import TreeDraftProposer

        draft, _ = load_model(speculative_model, dtype=engine.dtype, device=engine.device,
                              max_model_len=engine.max_model_len)
        if draft.config.vocab_size != engine.model.config.vocab_size:
            raise ValueError("the draft model's vocabulary differs from the target's")
        proposer = TreeDraftProposer(draft, speculative_tree)
    import time

    decoder = SpeculativeDecoder(proposer, num_speculative_tokens, accept_fn=accept_fn,
                                 max_model_len=engine.max_model_len, tree_width=speculative_tree,
                                 clock=time.process_time if engine.device.type == "cpu" else time.perf_counter)
    return decoder
