"""Speculative decoding: the acceptance rule is exact, the engine's speculative steps change nothing
greedy decoding produces (every proposer, batched, prefix-cached, preempted), sampled speculation
draws from the target's distribution, rejected guesses' blocks go back, adaptive γ moves."""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_helpers import all_blocks_free, finish_all
from stats import chi_square_p_value

from miniinfer.engine import EngineConfig, EngineHooks, LLMEngine
from miniinfer.loader import load_model
from miniinfer.models.bundled import bundled_model_path
from miniinfer.sampling import SamplingParams, probabilities
from miniinfer.speculative import (
    AdaptiveGamma,
    accept_draft,
    best_gamma,
    expected_tokens_per_step,
    residual_distribution,
    select_proposer,
)
from miniinfer.speculative.proposers import ngram_lookup

DRAFT = str(bundled_model_path("shakespeare-draft"))
PROPOSERS = ["ngram", "self", DRAFT]


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return load_model(bundled_model_path("shakespeare"), device="cpu")


def make_engine(target, **options) -> LLMEngine:
    model, tokenizer = target
    options.setdefault("num_kv_blocks", 128)
    return LLMEngine(model, tokenizer, EngineConfig(**options))


def generate(engine, prompts, params) -> list[list[int]]:
    ids = [engine.add_request(p, params, stream=False) for p in prompts]
    results = finish_all(engine)
    return [results[i].outputs[0].token_ids for i in ids]


# -- the rule --------------------------------------------------------------------------------------

def _random_dist(V, generator, sparsity=0.3):
    p = torch.rand(V, generator=generator) ** 3
    p[torch.rand(V, generator=generator) < sparsity] = 0
    p[int(torch.randint(V, (1,), generator=generator))] += 0.1
    return p / p.sum()


def test_acceptance_rule_output_is_the_target_distribution(seed):
    """Every draw of the first emitted token, over many uniforms, is distributed as p (chi-square), and
    the closed form q·min(1, p/q) + (1 − β)·residual equals p exactly."""
    g = torch.Generator().manual_seed(seed)
    V, N, K = 7, 40000, 2
    p1, q1 = _random_dist(V, g), _random_dist(V, g)
    beta = torch.minimum(p1, q1).sum()
    exact = q1 * torch.minimum(torch.ones(V), p1 / q1.clamp(min=1e-30)) * (q1 > 0) + (1 - beta) * residual_distribution(p1, q1)
    torch.testing.assert_close(exact, p1, atol=1e-6, rtol=0)
    p = torch.stack([p1, _random_dist(V, g), _random_dist(V, g)]).expand(N, K + 1, V)
    q = torch.stack([q1, _random_dist(V, g)]).expand(N, K, V)
    draft = torch.stack([torch.multinomial(q[0, j], N, replacement=True, generator=g) for j in range(K)], dim=1)
    num_accepted, token = accept_draft(p, q, draft, torch.full((N,), K), torch.rand(N, K, generator=g),
                                       torch.rand(N, generator=g))
    first = torch.where(num_accepted > 0, draft[:, 0], token)
    assert chi_square_p_value(torch.bincount(first, minlength=V).float(), p1) > 1e-4
    # The second emitted token, among rows that accepted the first guess, follows p_2 as well.
    rows = num_accepted >= 1
    second = torch.where(num_accepted[rows] > 1, draft[rows, 1], token[rows])
    assert chi_square_p_value(torch.bincount(second, minlength=V).float(), p[0, 1]) > 1e-4
    # A deterministic proposer (one-hot q, as n-gram lookup): the guess is kept with probability p(x).
    guess = int(torch.multinomial(p1, 1, generator=g))
    one_hot = torch.nn.functional.one_hot(torch.tensor(guess), V).float()
    num_accepted, token = accept_draft(p[:, :2], one_hot.expand(N, 1, V), torch.full((N, 1), guess),
                                       torch.ones(N, dtype=torch.long), torch.rand(N, 1, generator=g),
                                       torch.rand(N, generator=g))
    first = torch.where(num_accepted > 0, torch.full((N,), guess), token)
    assert chi_square_p_value(torch.bincount(first, minlength=V).float(), p1) > 1e-4


def test_acceptance_rule_greedy_and_edge_cases():
    V = 5
    p = torch.nn.functional.one_hot(torch.tensor([[2, 4, 1]]), V).float()    # argmaxes 2, 4, 1
    q = torch.nn.functional.one_hot(torch.tensor([[2, 3]]), V).float()
    n, t = accept_draft(p, q, torch.tensor([[2, 3]]), torch.tensor([2]), torch.rand(1, 2), torch.rand(1))
    assert (n.item(), t.item()) == (1, 4)   # the first guess is the argmax; the second is not: argmax instead
    n, t = accept_draft(p, q, torch.tensor([[2, 4]]), torch.tensor([2]), torch.rand(1, 2), torch.rand(1))
    assert (n.item(), t.item()) == (2, 1)   # all accepted: the bonus token
    n, t = accept_draft(p, q, torch.tensor([[2, 4]]), torch.tensor([0]), torch.rand(1, 2), torch.rand(1))
    assert (n.item(), t.item()) == (0, 2)   # no guesses: a plain draw from p_1


def test_expected_tokens_formula_and_gamma_choice():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)
    g = torch.Generator().manual_seed(0)
    alpha, gamma = 0.7, 5
    accepted = (torch.rand(200000, gamma, generator=g) < alpha).long().cumprod(1).sum(1)
    assert (accepted + 1).float().mean().item() == pytest.approx(expected_tokens_per_step(alpha, gamma), rel=0.01)
    assert best_gamma(0.95, 0.01) == 8 and best_gamma(0.1, 0.5) == 0
    assert select_proposer({"ngram": (0.3, 0.0), "draft": (0.8, 0.05), "slow": (0.9, 2.0)})[0] == "draft"


def test_adaptive_gamma_follows_the_acceptance_rate():
    adaptive = AdaptiveGamma(max_gamma=8, cost_ratio=0.05)
    for _ in range(40):
        adaptive.observe(8, 8)
    high = adaptive.gamma
    for _ in range(40):
        adaptive.observe(8, 1)
    low = adaptive.gamma
    assert high >= 6 and low <= 2, (high, low)


def test_ngram_lookup():
    assert ngram_lookup([1, 2, 3, 4, 9, 1, 2, 3], 2) == [4, 9]
    assert ngram_lookup([5, 6, 7], 3) == []
    assert ngram_lookup([1, 2, 1, 3, 1], 2) == [3, 1]   # the latest earlier occurrence of [1]


# -- in the engine ---------------------------------------------------------------------------------

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
           "KING HENRY:\nOnce more unto the breach, dear friends, once more;", "ROMEO:", "To be, or not to be"]


@pytest.fixture(scope="module")
def greedy_reference(target):
    engine = make_engine(target, speculative_model=None)
    return generate(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))


@pytest.mark.parametrize("proposer", PROPOSERS, ids=["ngram", "self", "draft"])
def test_greedy_speculation_is_token_for_token_greedy(target, greedy_reference, proposer):
    engine = make_engine(target, speculative_model=proposer, num_speculative_tokens=3)
    assert generate(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24)) == greedy_reference
    # Again: now the prompts (and the earlier outputs' blocks) come from the prefix cache.
    assert generate(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24)) == greedy_reference
    stats = engine.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert all_blocks_free(engine)
    if proposer != "ngram":  # the draft has forgotten every finished sequence (its cache rows are free)
        assert engine.speculator.proposer.num_tracked == 0


def test_greedy_speculation_with_preemption_and_auto_gamma(target, greedy_reference):
    """A pool too small for every sequence at once: preemption, recomputation, guesses cut to what fits."""
    # (Prefix caching off: with it on, pools this small can wedge the plain engine too — the admission
    # window pins every candidate's cached prefix, so nothing is evictable; reported to the lead.)
    engine = make_engine(target, speculative_model=DRAFT, num_speculative_tokens="auto", num_kv_blocks=12,
                         block_size=4, enable_prefix_caching=False)
    assert generate(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24)) == greedy_reference
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    assert all_blocks_free(engine)


@pytest.mark.parametrize("cache", [True, False], ids=["prefix-cache", "preemption"])
def test_tree_speculation_in_the_engine_is_greedy(target, greedy_reference, cache):
    """Token trees (the draft's top 2 first tokens, each continued), verified in the engine with the tree
    mask and the accepted path's K/V moved to consecutive slots: greedy output unchanged, with the prefix
    cache (second round) or with preemption in a tiny pool; more tokens per step than a chain."""
    options = dict(num_kv_blocks=128) if cache else dict(num_kv_blocks=12, block_size=4, enable_prefix_caching=False)
    engine = make_engine(target, speculative_model=DRAFT, num_speculative_tokens=4, speculative_tree=2, **options)
    rounds = 2 if cache else 1
    for _ in range(rounds):
        assert generate(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24)) == greedy_reference
    stats = engine.stats()
    assert (stats["prefix_cache_hit_tokens"] > 0) if cache else (stats["num_preemptions"] > 0)
    assert all_blocks_free(engine)
    if cache:
        chain = make_engine(target, speculative_model=DRAFT, num_speculative_tokens=4)
        for _ in range(rounds):
            generate(chain, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
        assert stats["spec_tokens_per_verify"] > chain.stats()["spec_tokens_per_verify"]


def test_mixed_batch_speculates_only_where_it_may(target):
    """Penalties, logprobs and stop strings decode plainly beside speculating requests; outputs match."""
    params = [SamplingParams(temperature=0.0, max_tokens=12), SamplingParams(temperature=0.0, max_tokens=12,
                                                                              repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=12, logprobs=2), SamplingParams(temperature=0.0,
                                                                                         max_tokens=12, stop=["e"])]
    outputs = {}
    for spec in (None, "ngram"):
        engine = make_engine(target, speculative_model=spec)
        ids = [engine.add_request(PROMPTS[1], p, stream=False) for p in params]
        results = finish_all(engine)
        outputs[spec] = [(results[i].outputs[0].token_ids, results[i].outputs[0].text) for i in ids]
        assert all_blocks_free(engine)
    assert outputs[None] == outputs["ngram"]


def test_student_acceptance_rule_drives_the_engine(target, greedy_reference):
    calls = []

    def rule(*args):
        calls.append(args[0].shape)
        return accept_draft(*args)

    model, tokenizer = target
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=128, speculative_model="ngram"),
                       hooks=EngineHooks(accept_draft=rule))
    assert generate(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24)) == greedy_reference
    assert calls


@pytest.mark.parametrize("tree", [None, 2], ids=["chain", "tree"])
def test_sampled_speculation_matches_the_target_distribution(target, tree):
    """Joint distribution of the first three generated tokens (the 2nd and 3rd come from verify steps:
    a guess or a resample, then a guess, resample or bonus) under top_k=2, over 800 seeds, against the
    target's exact probabilities (8 categories). The draft model's q differs from p, so rejections happen;
    the tree variant exercises SpecInfer's multi-candidate rule inside the engine."""
    model, _ = target
    prompt = "ROMEO: O Romeo, Romeo, Romeo, Romeo, Romeo"
    k, n = 2, 800 if tree is None else 500   # (trees: the draft runs without a KV cache, slower)
    engine = make_engine(target, speculative_model=DRAFT, num_speculative_tokens=2, num_kv_blocks=512,
                         speculative_tree=tree)
    ids = [engine.add_request(prompt, SamplingParams(temperature=1.0, top_k=k, max_tokens=4, seed=s), stream=False)
           for s in range(n)]
    results = finish_all(engine)
    stats = engine.stats()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"] and all_blocks_free(engine)
    triples = [tuple(results[i].outputs[0].token_ids[:3]) for i in ids]
    base = engine.tokenizer.encode(prompt)
    params = SamplingParams(temperature=1.0, top_k=k)
    with torch.inference_mode():
        def dist(prefix):
            return probabilities(model(torch.tensor([base + list(prefix)]))[0, -1].float(), params)
        p0 = dist(())
        support = [int(t) for t in torch.nonzero(p0).flatten()]
        exact, keys = [], []
        for t0 in support:
            p1 = dist((t0,))
            for t1 in [int(t) for t in torch.nonzero(p1).flatten()]:
                p2 = dist((t0, t1))
                for t2 in [int(t) for t in torch.nonzero(p2).flatten()]:
                    keys.append((t0, t1, t2))
                    exact.append(float(p0[t0] * p1[t1] * p2[t2]))
    index = {key: i for i, key in enumerate(keys)}
    assert all(t in index for t in triples), "a triple outside the target's support"
    counts = torch.bincount(torch.tensor([index[t] for t in triples]), minlength=len(keys)).float()
    assert chi_square_p_value(counts, torch.tensor(exact)) > 1e-4


def test_rejected_guesses_release_their_blocks(target):
    """After every step, a speculating sequence holds just the blocks of its computed tokens."""
    engine = make_engine(target, speculative_model="self", num_speculative_tokens=6, block_size=2)
    engine.add_request(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=30))
    rejected_some = False
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // 2)
        stats = engine.stats()
        rejected_some |= stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert rejected_some and all_blocks_free(engine)


def test_options_are_validated(target, small_checkpoint):
    for bad in (dict(num_speculative_tokens=0), dict(num_speculative_tokens="many"), dict(speculative_model=3),
                dict(speculative_tree=1), dict(speculative_tree=True)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="vocabulary"):
        make_engine(target, speculative_model=str(small_checkpoint[0]))



# -- trees (torch reference) -----------------------------------------------------------------------

def test_tree_mask_and_trie():
    from miniinfer.speculative.tree import build_tree, tree_attention_mask

    tree = build_tree(7, [[1, 2], [1, 3], [4]])          # 7 → 1 → {2, 3}; 7 → 4
    assert tree.tokens == [7, 1, 2, 3, 4] and tree.parents == [-1, 0, 1, 1, 0] and tree.depths == [0, 1, 2, 2, 1]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 0, 0, 1]],
                            dtype=torch.bool)
    assert torch.equal(tree_attention_mask(tree.parents), expected)
    chain = build_tree(7, [[1, 2, 3]])
    assert torch.equal(tree_attention_mask(chain.parents), torch.ones(4, 4, dtype=torch.bool).tril())


def test_tree_verification_is_greedy_decoding(target):
    """Tree steps (the draft's top 3 first tokens, each continued to depth 2; one masked target forward per
    step) reproduce greedy decoding, with more tokens per step than a chain of as many guesses."""
    from miniinfer.speculative.tree import draft_tree, tree_logits, verify_tree_greedy

    model, tokenizer = target
    draft, _ = load_model(DRAFT, device="cpu")
    ids = tokenizer.encode("ROMEO: O Romeo")
    with torch.inference_mode():
        reference = list(ids)
        for _ in range(16):
            reference.append(int(model(torch.tensor([reference]))[0, -1].argmax()))
    per_step = {}
    for width, depth in ((3, 2), (1, 6)):
        tokens, steps = list(ids), 0
        while len(tokens) < len(reference):
            tree = draft_tree(draft, tokens, width, depth)
            path, token = verify_tree_greedy(tree, tree_logits(model, tokens, tree))
            tokens += [tree.tokens[node] for node in path] + [token]
            steps += 1
        assert tokens[:len(reference)] == reference
        per_step[width] = (len(tokens) - len(ids)) / steps
    assert per_step[3] > per_step[1]


def test_best_first_tree_spends_its_budget_on_the_likeliest_paths(target):
    """draft_tree_best_first: exactly num_guesses nodes, parents first (so every prefix is a tree), a
    chain when width is 1 (the draft's greedy continuation), and each added node the most probable
    candidate left: path probabilities never increase in the order nodes were added."""
    from miniinfer.speculative.tree import TokenTree, draft_tree, draft_tree_best_first

    model, tokenizer = target
    draft, _ = load_model(DRAFT, device="cpu")
    ids = tokenizer.encode("JULIET.\nO Romeo, Romeo")
    assert draft_tree_best_first(draft, ids, 5, 1).tokens == draft_tree(draft, ids, 1, 5).tokens
    for guesses, width in ((1, 2), (6, 2), (9, 3)):
        tree = draft_tree_best_first(draft, ids, guesses, width)
        assert tree.num_guesses == guesses and tree.tokens[0] == ids[-1]
        for k in range(1, len(tree.tokens) + 1):
            TokenTree(tree.tokens[:k], tree.parents[:k])  # a prefix of the nodes is a tree
        path_probability = [1.0]
        with torch.inference_mode():
            for node in range(1, len(tree.tokens)):
                path, parent = [], tree.parents[node]
                while parent > 0:
                    path.insert(0, tree.tokens[parent])
                    parent = tree.parents[parent]
                probs = draft(torch.tensor([ids + path]))[0, -1].float().softmax(-1)
                assert tree.tokens[node] in probs.topk(width).indices.tolist()
                path_probability.append(path_probability[tree.parents[node]] * float(probs[tree.tokens[node]]))
        assert all(a >= b * (1 - 1e-5) for a, b in zip(path_probability[1:], path_probability[2:])), path_probability
    with pytest.raises(ValueError, match="num_guesses"):
        draft_tree_best_first(draft, ids, 0, 2)


def test_acceptance_calibration_learns_what_verification_accepts(target):
    """AcceptanceCalibration: an unseen bin answers the draft's probability (the bin's centre); counts take
    over as they come; only tested nodes (children of the root and of accepted nodes) teach it. A
    calibration that has seen first guesses always accepted and second guesses never makes the best-first
    tree the draft's greedy chain, whatever the draft's own probabilities say."""
    from miniinfer.speculative.tree import (
        AcceptanceCalibration,
        TokenTree,
        draft_tree,
        draft_tree_best_first,
        tested_nodes,
    )

    calibration = AcceptanceCalibration(num_bins=5, prior_weight=2.0)
    assert calibration.estimate(0, 0.13) == pytest.approx(0.1)
    for _ in range(98):
        calibration.observe(0, 0.13, True)
    assert calibration.estimate(0, 0.19) == pytest.approx((0.2 + 98) / 100)
    assert calibration.estimate(1, 0.13) == pytest.approx(0.1)  # another rank: another bin
    #        0
    #      1   2        node 1 accepted, node 2 rejected; 3 and 4 under node 1: 3 accepted, 4 tested
    #     3 4   5       and rejected; 5 under the rejected node 2: never tested
    tree = TokenTree([9, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 2],
                     [(0, 1.0), (0, 0.5), (1, 0.3), (0, 0.5), (1, 0.3), (0, 0.9)])
    assert sorted(tested_nodes(tree, [1, 3])) == [1, 2, 3, 4]
    fresh = AcceptanceCalibration()
    fresh.observe_tree(tree, [1, 3])
    assert fresh.counts[(0, 2)][1] == fresh.prior_weight + 2 and fresh.counts[(1, 1)][1] == fresh.prior_weight + 2
    assert (0, 4) not in fresh.counts  # node 5 was never judged
    with pytest.raises(ValueError):
        AcceptanceCalibration(prior_weight=0)

    model, tokenizer = target
    draft, _ = load_model(DRAFT, device="cpu")
    ids = tokenizer.encode("JULIET.\nO Romeo, Romeo")
    sure = AcceptanceCalibration(prior_weight=1e-6)
    for bin_probability in (0.1, 0.3, 0.5, 0.7, 0.9):
        for _ in range(100):
            sure.observe(0, bin_probability, True)
            sure.observe(1, bin_probability, False)
    chain = draft_tree_best_first(draft, ids, 6, 2, sure)
    assert chain.tokens == draft_tree(draft, ids, 1, 6).tokens and chain.parents == list(range(-1, 6))
    assert [rank for rank, _ in chain.confidence] == [0] * 7


def test_multi_candidate_rule_is_exact(seed):
    """SpecInfer's rule with deterministic candidates and with candidates drawn from q: the emitted token
    follows p (chi-square over 6000 draws each)."""
    from miniinfer.speculative.tree import multi_candidate_accept

    g = torch.Generator().manual_seed(seed)
    V, N = 6, 6000
    p, q = _random_dist(V, g), _random_dist(V, g)
    for mode in ("deterministic", "sampled"):
        counts = torch.zeros(V)
        for _ in range(N):
            if mode == "deterministic":
                candidates, qs = [0, 3], [None, None]
            else:
                candidates = torch.multinomial(q, 2, replacement=True, generator=g).tolist()
                qs = [q, q]
            u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
            _, token = multi_candidate_accept(p, candidates, qs, u[:2], u[2])
            counts[token] += 1
        assert chi_square_p_value(counts, p) > 1e-4, mode


@pytest.mark.parametrize("seq_lens, q_lens", [([9, 3, 17, 1], [5, 1, 4, 1]), ([9, 3, 17, 6], [3, 3, 3, 3]), ([9], [5]),
                                              ([17], [1]), ([4], [4])],
                         ids=["batch", "batch-uniform", "one-sequence", "one-decode", "one-prompt"])
def test_batched_verify_attention_matches_the_paged_reference(seed, seq_lens, q_lens):
    """Short chunks over cached prefixes (and a decode row), GQA, against the reference prefill; one
    sequence alone takes the single-sequence path."""
    from miniinfer.engine.attention_context import PagedAttentionMetadata
    from miniinfer.kernels.paged_attention import paged_prefill_attention_torch
    from miniinfer.speculative.verify_attention import batched_verify_attention

    g = torch.Generator().manual_seed(seed)
    P, H, H_kv, D, num_blocks = 4, 6, 2, 8, 40
    k_cache, v_cache = torch.randn(num_blocks, P, H_kv, D, generator=g), torch.randn(num_blocks, P, H_kv, D, generator=g)
    width = max(-(-s // P) for s in seq_lens) + 1  # a spare column: tables wider than the longest sequence
    tables = torch.randperm(num_blocks, generator=g)[:len(seq_lens) * width].view(len(seq_lens), width).int()
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), H, D, generator=g)
    meta = PagedAttentionMetadata(slot_mapping=torch.zeros(len(q), dtype=torch.int32), block_tables=tables,
                                  seq_lens=torch.tensor(seq_lens, dtype=torch.int32), cu_seqlens_q=cu,
                                  decode_only=False, max_seq_len=max(seq_lens) + 2, max_q_len=max(q_lens))
    expected = paged_prefill_attention_torch(q, k_cache, v_cache, tables, cu, meta.seq_lens, 0.3)
    torch.testing.assert_close(batched_verify_attention(q, k_cache, v_cache, meta, 0.3), expected,
                               atol=1e-5, rtol=1e-5)


def test_adaptive_gamma_in_the_engine_follows_a_shifting_acceptance_rate(target, greedy_reference):
    """A proposer that knows the greedy continuation for its first calls, then guesses wrong: with
    num_speculative_tokens="auto" the engine's γ climbs, then falls — and the output never changes."""
    from miniinfer.speculative import Proposal, Proposer, SpeculativeDecoder

    class ShiftingOracle(Proposer):
        name = "oracle"

        def __init__(self):
            self.calls = 0

        def propose(self, seqs, num_tokens):
            self.calls += 1
            proposals = []
            for seq, k in zip(seqs, num_tokens):
                truth = greedy_reference[0][seq.num_output_tokens:seq.num_output_tokens + k]
                if self.calls > 2:
                    truth = [(t + 1) % 4096 for t in truth]   # now every guess is wrong
                proposals.append(Proposal(truth))
            return proposals

    engine = make_engine(target)
    engine.speculator = engine.runner.speculator = SpeculativeDecoder(ShiftingOracle(), "auto", max_gamma=6)
    # A known cost (a guess costs 0.1 of a target step) instead of timings, so that the test is deterministic.
    engine.speculator.adaptive = AdaptiveGamma(max_gamma=6, cost_ratio=0.1, decay=0.7, measure_cost=False)
    out = generate(engine, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert out == greedy_reference[:1]
    history = engine.speculator.gamma_history
    assert history[0] == 6 and history[-1] <= 2, history
    assert all_blocks_free(engine)


def test_batch_of_16_greedy_speculation(target):
    """Sixteen mixed prompts at once (short, long, repeated): draft-model speculation changes nothing."""
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    reference = generate(make_engine(target), prompts, params)
    engine = make_engine(target, speculative_model=DRAFT, num_speculative_tokens=3)
    assert generate(engine, prompts, params) == reference
    assert engine.stats()["spec_verified_seqs"] >= 16 and all_blocks_free(engine)


@pytest.mark.parametrize("kind", ["draft", "self"])
def test_draft_proposer_fast_paths_match_plain_forwards(target, kind):
    """The lean draft (contiguous KV rows, LeanForward, padded batches) against the readable model: the
    flat forward gives the module forward's logits, and the guesses over several calls — with
    rejections rolled back, batched rows of different lengths, a long catch-up run on its own — are
    the greedy continuations of plain, cache-free forwards of the draft."""
    from miniinfer.engine.sequence import Sequence
    from miniinfer.speculative.proposers import (
        ContiguousKVContext,
        DraftKVCache,
        DraftModelProposer,
        LeanForward,
        self_draft_model,
    )

    model, tokenizer = target
    draft = load_model(DRAFT, device="cpu")[0] if kind == "draft" else self_draft_model(model, 2)
    assert LeanForward.supports(draft)
    ids, positions = torch.randint(0, 4096, (2, 5)), torch.arange(3, 8).expand(2, 5)
    with torch.inference_mode():
        logits = []
        for forward in (draft, LeanForward(draft)):
            cache = DraftKVCache(draft.config, 32, torch.device("cpu"), torch.float32)
            rows = [cache.allocate_row(), cache.allocate_row()]
            for row in rows:  # the same cached prefix of 3 tokens in both rows
                for layer in range(model.config.num_hidden_layers):
                    cache.layer(layer)[0][row, :, :3] = cache.layer(layer)[1][row, :, :3] = 0.5
            logits.append(forward(ids, positions, attention=ContiguousKVContext(cache, rows, [3, 3], [5, 4])))
        torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)

    def greedy_chain(tokens, k):
        with torch.inference_mode():
            tokens = list(tokens)
            for _ in range(k):
                logits = draft(torch.tensor([tokens]), torch.arange(len(tokens))[None])  # no KV cache
                tokens.append(int(logits[0, -1].argmax()))
        return tokens[-k:]

    proposer = DraftModelProposer(draft, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=64)
    seqs = [Sequence(str(i), tokenizer.encode(p), params, stream_seed=i) for i, p in enumerate(PROMPTS[:3])]
    for step in range(5):
        wanted = [3, 2 + step % 2, 4, 3][:len(seqs)]
        proposals = proposer.propose(seqs, wanted)
        for seq, k, proposal in zip(seqs, wanted, proposals):
            assert proposal.tokens == greedy_chain(seq.token_ids, k) and proposal.probs is None
            # Accept a prefix of the guesses, then a token of "the target's" (different from the next guess).
            accepted = proposal.tokens[:step % (k + 1)]
            seq.token_ids += accepted + [(proposal.tokens[len(accepted)] + 1) % 4096 if len(accepted) < k else 7]
        if step == 2:  # a sequence the draft has not seen joins: its prompt is a long catch-up
            seqs.append(Sequence("new", tokenizer.encode(PROMPTS[0] * 3), params, stream_seed=9))
    assert proposer.num_tracked == 4
    for seq in seqs:
        proposer.release(seq)
    assert proposer.num_tracked == 0 and len(proposer.cache.free_rows) == proposer.cache.capacity


@pytest.mark.parametrize("kind", ["draft", "self"])
def test_draft_forward_matches_the_model_and_kv_rows_grow(target, kind):
    """DraftForward (transposed weights, folded norms, flip RoPE, matmul attention) gives the model's logits
    up to rounding over a padded batch whose cached prefix is longer than the cache's first allocation
    (the rows' positions grow, keeping what they held); a single row agrees too."""
    from miniinfer.speculative.proposers import (
        ContiguousKVContext,
        DraftForward,
        DraftKVCache,
        self_draft_model,
    )

    model, _ = target
    draft = load_model(DRAFT, device="cpu")[0] if kind == "draft" else self_draft_model(model, 2)
    layers = [layer.self_attn.layer_index for layer in (draft.model.layers if kind == "draft" else
                                                          [model.model.layers[i] for i in draft.layer_indices])]
    g = torch.Generator().manual_seed(0)
    prefix = 40
    for rows_lengths in ([5, 3], [4]):
        B, L = len(rows_lengths), max(rows_lengths)
        ids = torch.randint(0, 4096, (B, L), generator=g)
        positions = (prefix + torch.arange(L)).expand(B, L)
        logits = []
        for forward in (draft, DraftForward(draft)):
            cache = DraftKVCache(draft.config, 128, torch.device("cpu"), torch.float32, initial_length=16)
            rows = [cache.allocate_row() for _ in range(B)]
            for layer in layers:  # the same cached prefix in every row, written before the rows grow
                k, v = cache.layer(layer)
                k[:, :, :16] = v[:, :, :16] = 0.25
            cache.reserve(prefix)
            for layer in layers:
                k, v = cache.layer(layer)
                assert bool((k[:, :, :16] == 0.25).all()) and k.shape[2] == cache.length + 1 >= prefix
                k[:, :, 16:prefix] = v[:, :, 16:prefix] = 0.25
            with torch.inference_mode():
                out = forward(ids, positions, attention=ContiguousKVContext(cache, rows, [prefix] * B, rows_lengths))
            logits.append(out.reshape(B, L, -1))
        for b, n in enumerate(rows_lengths):  # padding rows' logits are not compared
            torch.testing.assert_close(logits[1][b, :n], logits[0][b, :n], atol=1e-3, rtol=1e-3)


def test_speculation_gate_follows_measured_cost():
    """"auto" speculates only while it measures cheaper per token than plain decoding (over its recent
    steps), per batch size, probing the other kind now and then; a new batch size follows its nearest
    measured neighbour and measures the kind it lacks now and then."""
    from miniinfer.speculative import SpeculationGate

    gate = SpeculationGate(probe_every=4, warmup=2, window=3)
    decisions = []
    for step in range(4):  # warm-up: the kinds alternate
        decisions.append(gate.speculate(16))
        # 0.3 s per token speculating (a compute-bound batch), 0.1 plain — one plain step hit by a spike
        gate.observe(16, decisions[-1], 3.0 if decisions[-1] else (4.0 if step == 1 else 1.0), 10)
    assert decisions == [True, False, True, False]
    assert [gate.speculate(16) for _ in range(8)] == [False, False, False, True, False, False, False, True]
    decisions = []
    for _ in range(4):  # a new size follows its nearest measured neighbour (plain), its 4th step measures speculation
        decisions.append(gate.speculate(1))
        gate.observe(1, decisions[-1], 0.5 if decisions[-1] else 0.3, 3 if decisions[-1] else 1)
    assert decisions == [False, False, False, True]
    gate.observe(1, True, 0.4, 3)    # a second speculative measurement (one alone does not decide)
    assert [gate.speculate(1) for _ in range(4)] == [True, True, True, False]   # speculation (it pays at
    # batch 1) with a probe every 4th step


def test_speculation_gate_probes_less_while_probes_lose_and_holds_near_ties():
    """Probes that lose clearly double the interval (up to a cap); a choice flips only for a difference
    beyond the hysteresis; a speculative step that could not be measured (a draft's catch-up, no guesses)
    is retried at once."""
    from miniinfer.speculative import SpeculationGate

    gate = SpeculationGate(probe_every=4, warmup=1, window=2, max_probe_every=16)
    for speculative in (True, False):           # warm-up: speculation 2.0 s per token, plain 1.0
        assert gate.speculate(8) is speculative
        gate.observe(8, speculative, 2.0 if speculative else 1.0, 1)
    gate.observe(8, True, 2.0, 1)
    probes = []
    for step in range(50):
        speculative = gate.speculate(8)
        gate.observe(8, speculative, 2.0 if speculative else 1.0, 1)
        if speculative:
            probes.append(step)
    assert [b - a for a, b in zip(probes, probes[1:])] == [8, 16, 16], probes   # 4, then 8, 16, 16 (capped)
    gate.observe(8, False, 1.95, 1)
    gate.observe(8, False, 1.95, 1)             # plain now within 3 % of speculation: still plain
    assert gate.speculate(8) is False
    gate.measure_again(8)
    assert gate.speculate(8) is True and gate.speculate(8) is False
