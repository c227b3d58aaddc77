"""Tree speculation (SpecInfer, Miao et al. 2024; Medusa): guess a *tree* of continuations, verify
every branch in one target forward, keep the longest accepted path.

A chain of γ guesses dies at its first wrong token. A tree spends the same number of guessed tokens
on several alternatives where the draft is unsure — typically its top ``w`` first tokens, each
continued greedily — so a miss on the first token no longer ends the step.

**Layout.** Node 0 is the *root*: the sequence's last real token (its K/V are not computed yet, as
in a chain verify). Every other node is a guess whose parent is ``parents[i] < i``. Node ``i`` sits at
position ``n − 1 + depth[i]`` (``n`` real tokens), so siblings share a position.

**Tree attention.** All ``N`` nodes go through the target in one forward, after the cached prefix.
Node ``i`` may attend to the whole prefix and to its own ancestors (and itself) — never to a
sibling's branch. That is the ``[N, N]`` boolean mask of :func:`tree_attention_mask`; a chain is
the special case where it is lower-triangular (ordinary causal attention).

**Acceptance.** Walk from the root. Greedy: move to the child whose token is the target's argmax;
stop when none is; the argmax there is the extra token. Sampling (SpecInfer's multi-candidate rule):
try the children in order, each with ``min(1, p(x)/q(x))``; after a rejection replace ``p`` by the
residual ``norm(max(p − q, 0))`` and try the next child; if all fail, draw from what is left. With
deterministic children (one-hot ``q``) this keeps ``x`` with probability ``p(x)`` and otherwise
removes it from ``p`` — exactly the target's distribution either way.

This module is the torch reference: trees are verified with a plain (non-paged) forward over the
prefix and the tree (:func:`tree_logits`). In the engine (``LLM(..., speculative_tree=width)``) the
tree's nodes are a verify chunk whose RoPE positions follow the depths, the batched verify attention
(:mod:`miniinfer.speculative.verify_attention`) applies this mask, and the commit first moves the
accepted path's K/V to consecutive slots (the ``torch`` / ``sdpa`` backends; the Triton and CUDA
kernels take no mask yet).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from miniinfer.speculative.acceptance import draw_from, residual_distribution

__all__ = ["TokenTree", "tree_attention_mask", "build_tree", "draft_tree", "draft_tree_best_first",
           "AcceptanceCalibration", "tested_nodes", "tree_logits", "verify_tree_greedy", "multi_candidate_accept",
           "verify_tree_sampled"]


@dataclass
class TokenTree:
    """tokens [N] and parents [N] (``parents[0] == -1``: the root, the sequence's last real token)."""

    tokens: list[int]
    parents: list[int]
    #: how each node was chosen, where a draft grew the tree: (rank among its parent's candidates, the draft's
    #: probability of it); node 0's entry is (0, 1.0). What :class:`AcceptanceCalibration` learns from.
    confidence: list[tuple[int, float]] | None = None

    def __post_init__(self) -> None:
        if not self.tokens or self.parents[0] != -1 or len(self.tokens) != len(self.parents):
            raise ValueError("a token tree needs a root (node 0, parent -1) and one parent per node")
        if any(not 0 <= p < i for i, p in enumerate(self.parents) if i > 0):
            raise ValueError("every node's parent must come before it")

    @property
    def depths(self) -> list[int]:
        depths = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            depths[i] = depths[self.parents[i]] + 1
        return depths

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    @property
    def num_guesses(self) -> int:
        return len(self.tokens) - 1


def tree_attention_mask(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: ``mask[i, j]`` is True iff node j is node i or one of its ancestors."""
    N = len(parents)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def build_tree(root_token: int, branches: list[list[int]]) -> TokenTree:
    """A tree (a trie: shared prefixes merged) from chains of guesses that all start after the root."""
    tokens, parents = [root_token], [-1]
    child_of: dict[tuple[int, int], int] = {}
    for branch in branches:
        node = 0
        for token in branch:
            key = (node, token)
            if key not in child_of:
                child_of[key] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = child_of[key]
    return TokenTree(tokens, parents)


@torch.inference_mode()
def draft_tree(draft_model, token_ids: list[int], width: int, depth: int) -> TokenTree:
    """The draft's top-``width`` next tokens, each continued greedily to ``depth`` guesses: ``width ×
    depth`` guessed tokens (fewer where branches merge). A plain forward per level (a tiny draft)."""
    device = next(draft_model.parameters()).device
    logits = draft_model(torch.tensor([token_ids], device=device))[0, -1]
    first = logits.topk(width).indices.tolist()
    branches = [[t] for t in first]
    rows = torch.tensor([token_ids + b for b in branches], device=device)
    for _ in range(depth - 1):
        nxt = draft_model(rows)[:, -1].argmax(dim=-1)
        rows = torch.cat([rows, nxt[:, None]], dim=1)
    branches = rows[:, len(token_ids):].tolist()
    return build_tree(token_ids[-1], branches)


class AcceptanceCalibration:
    """How often the target accepts a draft's guess, as a function of how the draft ranked it and how sure
    it was: counts per (rank, confidence bin), learnt from the verify steps.

    A draft's probability is not the chance that its guess survives verification. The bundled draft is
    *underconfident*: over the target's own greedy text, its top guesses with probability below 0.2 are the
    target's argmax 57 % of the time, its second guesses only 14 %. Growing a tree by the raw
    probabilities then spends nodes on second guesses where extending the first guess pays far more, and
    the tree accepts *fewer* tokens than a chain of the same size (measured: 2.45 against 2.60 tokens per
    target step at 4 guesses). Estimating acceptance per (rank, confidence) from what verification actually
    did fixes that (2.68 at 4 guesses, 3.14 against 2.96 at 8). This is EAGLE-2's best-first tree with
    Sequoia's lesson: use measured acceptance rates, not the draft's word.

    Each bin starts from a prior of ``prior_weight`` pseudo-observations at the bin's mean raw probability,
    so an empty bin answers the draft's own probability and the counts take over as they come in.
    """

    def __init__(self, num_bins: int = 5, prior_weight: float = 2.0):
        if num_bins < 1 or prior_weight <= 0:
            raise ValueError(f"AcceptanceCalibration needs num_bins >= 1 and prior_weight > 0, got "
                             f"{num_bins}, {prior_weight}")
        self.num_bins, self.prior_weight = num_bins, prior_weight
        self.counts: dict[tuple[int, int], list[float]] = {}  # (rank, bin) -> [accepted, tested]

    def _bin(self, probability: float) -> int:
        return min(int(probability * self.num_bins), self.num_bins - 1)

    def _entry(self, rank: int, probability: float) -> list[float]:
        key = (rank, self._bin(probability))
        if key not in self.counts:
            centre = (key[1] + 0.5) / self.num_bins
            self.counts[key] = [self.prior_weight * centre, self.prior_weight]
        return self.counts[key]

    def estimate(self, rank: int, probability: float) -> float:
        """The estimated chance that a guess of this rank and draft probability is accepted, if tested."""
        accepted, tested = self._entry(rank, probability)
        return accepted / tested

    def observe(self, rank: int, probability: float, accepted: bool) -> None:
        entry = self._entry(rank, probability)
        entry[0] += float(accepted)
        entry[1] += 1.0

    def observe_tree(self, tree: TokenTree, path: list[int]) -> None:
        """Learn from one verified tree: every tested node (:func:`tested_nodes`) was accepted iff it is
        on the accepted ``path`` (node ids below the root)."""
        if tree.confidence is None:
            return
        on_path = set(path)
        for node in tested_nodes(tree, path):
            rank, probability = tree.confidence[node]
            self.observe(rank, probability, node in on_path)


def tested_nodes(tree: TokenTree, path: list[int]) -> list[int]:
    """The guesses verification actually judged: the children of the root and of every accepted node.
    (Nodes below a rejected guess were never compared with anything: they say nothing about acceptance.)"""
    tested = []
    for node in [0, *path]:
        tested.extend(tree.children(node))
    return tested


@torch.inference_mode()
def draft_tree_best_first(draft_model, token_ids: list[int], num_guesses: int, width: int = 2,
                          calibration: AcceptanceCalibration | None = None) -> TokenTree:
    """The ``num_guesses`` continuations most likely to be accepted: a tree grown best-first.

    A node's *path probability* is the product, along the path from the root, of each guess's chance of
    acceptance; the expected number of accepted guesses is the sum over the tree's nodes. So grow the tree
    greedily by that sum: keep a frontier of candidates (each added node offers its draft's top ``width``
    next tokens), and add the most probable candidate until ``num_guesses`` nodes are in (EAGLE-2's dynamic
    tree, Li et al. 2024). Where the draft is sure, this is a chain; where it hesitates, it branches —
    the fixed ``width × depth`` shape of :func:`draft_tree` chooses before it knows. A guess's chance of
    acceptance is the draft's probability of it, or with ``calibration`` the acceptance rate measured for
    guesses of that rank and draft probability (:class:`AcceptanceCalibration`: an uncalibrated draft
    builds bad trees). Nodes come in the order they were added, so parents come first and every prefix of
    the nodes is a tree; ``confidence`` records each node's (rank, draft probability).
    One plain forward per added node (a tiny draft, no KV cache), one row each.
    """
    if num_guesses < 1 or width < 1:
        raise ValueError(f"draft_tree_best_first needs num_guesses >= 1 and width >= 1, got {num_guesses}, {width}")
    device = next(draft_model.parameters()).device
    tokens, parents, paths = [token_ids[-1]], [-1], [[]]  # paths[i]: the guesses from the root to node i
    confidence = [(0, 1.0)]
    frontier: list[tuple[float, int, int, int, int, float]] = []  # (-path score, tie-break, parent, token, rank, p)
    order = itertools.count()

    def offer_children(node: int, path_score: float) -> None:
        logits = draft_model(torch.tensor([token_ids + paths[node]], device=device))[0, -1]
        top = logits.float().softmax(dim=-1).topk(width)
        for rank, (probability, token) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            chance = probability if calibration is None else calibration.estimate(rank, probability)
            heapq.heappush(frontier, (-path_score * chance, next(order), node, token, rank, probability))

    offer_children(0, 1.0)
    while len(tokens) - 1 < num_guesses:
        negative, _, parent, token, rank, probability = heapq.heappop(frontier)
        tokens.append(token)
        parents.append(parent)
        paths.append(paths[parent] + [token])
        confidence.append((rank, probability))
        if len(tokens) - 1 < num_guesses:
            offer_children(len(tokens) - 1, -negative)
    return TokenTree(tokens, parents, confidence)


class _TreeMaskAttention:
    """The model's attention hook for one sequence: prefix causal, tree nodes see the prefix and their
    ancestors. q, k, v: [T, H(_kv), D] with T = prefix + N."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # [T, T] bool

    def attend(self, layer_index, q, k, v, scale):
        H, H_kv = q.shape[1], k.shape[1]
        k = k.repeat_interleave(H // H_kv, dim=1)
        v = v.repeat_interleave(H // H_kv, dim=1)
        scores = torch.einsum("thd,shd->hts", q.float(), k.float()) * scale
        probs = scores.masked_fill(~self.mask.to(q.device), float("-inf")).softmax(dim=-1)
        return torch.einsum("hts,shd->thd", probs, v.float()).to(q.dtype)


@torch.inference_mode()
def tree_logits(model, token_ids: list[int], tree: TokenTree) -> torch.Tensor:
    """The target's logits at every node, from one forward over the prefix and the tree: [N, V].
    token_ids: the sequence's real tokens (the last one is the tree's root)."""
    device = next(model.parameters()).device
    prefix = token_ids[:-1]
    P, N = len(prefix), len(tree.tokens)
    mask = torch.zeros(P + N, P + N, dtype=torch.bool)
    mask[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    mask[P:, :P] = True
    mask[P:, P:] = tree_attention_mask(tree.parents)
    ids = torch.tensor(prefix + tree.tokens, device=device)
    positions = torch.tensor(list(range(P)) + [P + d for d in tree.depths], device=device)
    return model(ids, positions, attention=_TreeMaskAttention(mask), logits_indices=torch.arange(P, P + N,
                                                                                                 device=device))


def verify_tree_greedy(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """(accepted path: node ids below the root, in order; the next token after it). logits [N, V]."""
    best = logits.argmax(dim=-1).tolist()
    node, path = 0, []
    while True:
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        path.append(nxt)
        node = nxt


def multi_candidate_accept(p: torch.Tensor, candidates: list[int], q: list[torch.Tensor | None],
                           u_accept: list[float], u_sample: float) -> tuple[int | None, int]:
    """SpecInfer's rule at one node. p [V]: the target's distribution; candidates: the children's
    tokens, in order; q[i]: the distribution candidate i was drawn from (None: deterministic, one-hot).
    Returns (index of the accepted candidate or None, the token emitted): the emitted token is
    distributed as p."""
    p = p.clone().double()
    for i, (x, qi) in enumerate(zip(candidates, q)):
        if qi is None:
            qi = torch.zeros_like(p)
            qi[x] = 1.0
        qi = qi.double()
        if u_accept[i] * float(qi[x]) < float(p[x]):
            return i, x
        p = residual_distribution(p, qi)
    return None, int(draw_from(p[None], torch.tensor([u_sample], dtype=torch.float64))[0])


def verify_tree_sampled(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator | None = None
                        ) -> tuple[list[int], int]:
    """Sampling verification with deterministic children: (accepted path, next token). probs [N, V]."""
    node, path = 0, []
    while True:
        children = tree.children(node)
        u = torch.rand(len(children) + 1, generator=generator, dtype=torch.float64).tolist()
        index, token = multi_candidate_accept(probs[node], [tree.tokens[c] for c in children],
                                              [None] * len(children), u[:-1], u[-1])
        if index is None:
            return path, token
        node = children[index]
        path.append(node)
