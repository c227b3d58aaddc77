"""Checks for chapter 10: the acceptance / resample rule, the expected number of tokens per target
step, the tree attention mask, and the KV rollback after a verify step.

The acceptance rule is checked twice: exactly, against the package's rule on the same uniforms (the
rule is deterministic once the random numbers are given: accept guess j iff ``u_accept[j]·q < p``,
draw with :func:`~miniinfer.speculative.acceptance.draw_from`), and statistically, against the exact
target distribution: over many uniforms the first emitted token must follow ``p`` (a chi-square
test) and the acceptance rate must be ``Σ min(p, q)``. The tree mask is compared with an oracle that
walks each node's ancestors; the rollback with the block arithmetic written out.
"""

from __future__ import annotations

import math
import random

import torch

from miniinfer.course.checking import assert_equal, call_student, exercise, fail
from miniinfer.speculative.acceptance import accept_draft as reference_accept
from miniinfer.speculative.acceptance import expected_tokens_per_step as reference_expected
from miniinfer.speculative.rollback import rollback_blocks as reference_rollback
from miniinfer.speculative.tree import tree_attention_mask as reference_mask

__all__ = ["accept_draft", "expected_tokens_per_step", "rollback_blocks", "tree_attention_mask"]


def _random_dist(V: int, gen: torch.Generator, sparsity: float = 0.3) -> torch.Tensor:
    p = torch.rand(V, generator=gen) ** 3
    p[torch.rand(V, generator=gen) < sparsity] = 0
    p[int(torch.randint(V, (1,), generator=gen))] += 0.05
    return p / p.sum()


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs * counts.sum() >= 5
    expected = probs[keep] * counts.sum()
    observed = counts[keep]
    rest_e, rest_o = counts.sum() - expected.sum(), counts.sum() - observed.sum()
    statistic = ((observed - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    if rest_e >= 5:
        statistic = statistic + (rest_o - rest_e) ** 2 / rest_e
        df += 1
    if df <= 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic.double() / 2).item()


def _as_pair(got, case: str):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        fail(f"expected a pair (num_accepted [B], next_token [B]), got {type(got).__name__}", case=case)
    return [torch.as_tensor(x).long().reshape(-1) for x in got]


@exercise("10.1", "the acceptance / resample rule")
def accept_draft(fn) -> int:
    """Random batches (V 2 … 40, K 0 … 5, rows with fewer guesses, one-hot and sparse q, p = q, greedy
    one-hot p) against the reference on the same uniforms; then 20 000 rows of one (p, q) pair: the first
    emitted token must follow p and the acceptance rate must be Σ min(p, q)."""
    rng = random.Random()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    cases = 0
    for trial in range(24):
        B, K, V = rng.randint(1, 6), rng.randint(0, 5), rng.choice([2, 3, 7, 40])
        p = torch.stack([torch.stack([_random_dist(V, gen) for _ in range(K + 1)]) for _ in range(B)])
        if trial % 6 == 1:  # greedy target: one-hot p
            p = torch.nn.functional.one_hot(p.argmax(-1), V).float()
        q = torch.stack([torch.stack([_random_dist(V, gen) for _ in range(K)]) for _ in range(B)]) if K else \
            torch.zeros(B, 0, V)
        if trial % 6 == 2 and K:  # a deterministic proposer: one-hot q
            q = torch.nn.functional.one_hot(torch.randint(V, (B, K), generator=gen), V).float()
        if trial % 6 == 3 and K:  # the draft is the target: everything is accepted
            q = p[:, :K].clone()
        draft = torch.stack([torch.multinomial(q[b, j], 1, generator=gen) for b in range(B) for j in range(K)]
                            ).view(B, K) if K else torch.zeros(B, 0, dtype=torch.long)
        num_draft = torch.tensor([rng.randint(0, K) if trial % 2 else K for _ in range(B)])
        u_accept, u_sample = torch.rand(B, K, generator=gen, dtype=torch.float64), torch.rand(B, generator=gen,
                                                                                                dtype=torch.float64)
        case = (f"B={B}, K={K}, V={V}, num_draft={num_draft.tolist()}, draft={draft.tolist()}"
                + (" (one-hot p: greedy)" if trial % 6 == 1 else "") + (" (one-hot q)" if trial % 6 == 2 else "")
                + (" (q = p)" if trial % 6 == 3 else ""))
        args = (p.clone(), q.clone(), draft.clone(), num_draft.clone(), u_accept.clone(), u_sample.clone())
        got = _as_pair(call_student(fn, *args, case=case), case)
        expected = reference_accept(p, q, draft, num_draft, u_accept, u_sample)
        assert_equal(got[0], expected[0], what="num_accepted", case=case,
                     hint="accept guess j while u_accept[b, j] * q(x_j) < p(x_j), left to right; stop at the first "
                          "rejection, and never count guesses past num_draft[b]")
        assert_equal(got[1], expected[1], what="next_token", case=case,
                     hint="after a rejection at j draw from norm(max(p_j − q_j, 0)); when all num_draft[b] guesses "
                          "are accepted, draw the bonus from p at index num_draft[b]; draw with draw_from(probs, "
                          "u_sample)")
        cases += 1
    # The distribution, with many uniforms: exact at the first position.
    V, N = 6, 20000
    p1, q1 = _random_dist(V, gen), _random_dist(V, gen)
    p = torch.stack([p1, _random_dist(V, gen)]).expand(N, 2, V).contiguous()
    q = q1.expand(N, 1, V).contiguous()
    draft = torch.multinomial(q1, N, replacement=True, generator=gen)[:, None]
    got = _as_pair(call_student(fn, p, q, draft, torch.ones(N, dtype=torch.long),
                                torch.rand(N, 1, generator=gen, dtype=torch.float64),
                                torch.rand(N, generator=gen, dtype=torch.float64), case="20 000 rows"), "20 000 rows")
    first = torch.where(got[0] > 0, draft[:, 0], got[1])
    counts = torch.bincount(first.clamp(0, V - 1), minlength=V).double()
    if _chi_square_p(counts, p1.double()) < 1e-5:
        fail(f"the first emitted token does not follow the target: frequencies {(counts / N).tolist()}, "
             f"target p {p1.tolist()}", case="one guess from q, 20 000 rows",
             hint="the emitted token must be distributed exactly as p: accept with min(1, p/q), resample from the "
                  "normalised residual max(p − q, 0)")
    rate, beta = got[0].double().mean().item(), torch.minimum(p1, q1).sum().item()
    if abs(rate - beta) > 5 * math.sqrt(beta * (1 - beta) / N) + 1e-3:
        fail(f"acceptance rate {rate:.4f}, expected Σ min(p, q) = {beta:.4f}", case="one guess from q, 20 000 rows")
    return cases + 1


@exercise("10.2", "expected tokens per target step")
def expected_tokens_per_step(fn) -> int:
    """α on a grid including 0 and 1, γ from 0 to 10, against the closed form and a direct sum."""
    cases = 0
    for alpha in (0.0, 0.1, 0.5, 0.73, 0.9, 0.999, 1.0):
        for gamma in range(0, 11):
            case = f"alpha={alpha}, gamma={gamma}"
            got = call_student(fn, alpha, gamma, case=case)
            direct = sum(alpha ** i for i in range(gamma + 1))
            expected = reference_expected(alpha, gamma)
            if not isinstance(got, (int, float)) or not math.isfinite(float(got)) or abs(float(got) - direct) > 1e-9 * max(1, direct):
                fail(f"expected {expected:.6f}, got {got!r}", case=case,
                     hint="the step emits 1 + (accepted guesses); guess i is reached and accepted with probability "
                          "α^i, so E = 1 + α + … + α^γ = (1 − α^{γ+1}) / (1 − α), and γ + 1 when α = 1")
            cases += 1
    return cases


def _random_parents(rng: random.Random, N: int) -> list[int]:
    return [-1] + [rng.randrange(i) if rng.random() < 0.7 else max(0, i - 1) for i in range(1, N)]


@exercise("10.4", "the tree attention mask")
def tree_attention_mask(fn) -> int:
    """Random trees of 1 … 24 nodes (chains, stars, bushy trees) against an ancestor walk."""
    rng = random.Random()
    cases = 0
    for trial in range(40):
        N = rng.randint(1, 24)
        if trial % 5 == 0:
            parents = [-1] + list(range(N - 1))           # a chain: the causal mask
        elif trial % 5 == 1:
            parents = [-1] + [0] * (N - 1)                 # a star: every guess a child of the root
        else:
            parents = _random_parents(rng, N)
        case = f"parents={parents}"
        got = call_student(fn, list(parents), case=case)
        expected = reference_mask(parents)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            fail(f"expected a bool tensor [N, N], got {got!r:.80}", case=case)
        hint = ("mask[i, j] is True iff j is i itself or one of its ancestors (follow parents[] from i up to the "
                "root); a node never sees its siblings' branches")
        if tuple(got.shape) == (N, N) and torch.equal(got, expected.T):
            hint = "rows are the queries (the node that attends), columns the keys: you built the transpose"
        assert_equal(got, expected, what="mask", case=case, hint=hint)
        cases += 1
    return cases


@exercise("10.3", "KV rollback of rejected guesses")
def rollback_blocks(fn) -> int:
    """Block sizes 1 … 16, computed counts on and off block boundaries, 0 … k accepted guesses."""
    rng = random.Random()
    cases = 0
    for _ in range(60):
        P = rng.choice([1, 2, 3, 4, 16])
        num_computed = rng.randint(1, 60)
        k = rng.randint(1, 8)
        a = rng.randint(0, k)
        blocks = rng.sample(range(1000), -(-(num_computed + 1 + k) // P))
        case = f"block_table={blocks}, num_computed={num_computed}, num_guesses={k}, num_accepted={a}, block_size={P}"
        got = call_student(fn, list(blocks), num_computed, k, a, P, case=case)
        expected = reference_rollback(blocks, num_computed, k, a, P)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            fail(f"expected (new computed count, kept blocks, released blocks), got {got!r}", case=case)
        got = (int(got[0]), list(got[1]), list(got[2]))
        assert_equal(got[0], expected[0], what="new computed count", case=case,
                     hint="the step computed K/V for the newest token and the guesses; only the newest token and "
                          "the accepted guesses are valid: num_computed + 1 + num_accepted")
        assert_equal(got[1:], tuple(expected[1:]), what="(kept, released) blocks", case=case,
                     hint="keep the first ceil(new computed / block_size) blocks, in order; release the rest")
        cases += 1
    return cases
