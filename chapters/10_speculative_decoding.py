# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 10 — Speculative decoding: guess cheaply, verify in one pass
#
# **What you will build.** Decoding produces one token per forward of the model, and each forward
# reads every weight. *Speculative decoding* (Leviathan et al. 2023; Chen et al. 2023) lets a cheap
# **proposer** guess the next γ tokens, then runs the **target** model once over all of them and
# keeps the longest prefix of guesses the target agrees with — plus one more token from the target
# itself. With the right acceptance rule the output is **exactly** what the target alone would have
# produced: token for token when greedy, in distribution when sampling. You will write that rule,
# the expected number of tokens per target step, the KV-cache rollback of rejected guesses and the
# attention mask of **tree** speculation, plug your rule into the engine, and compare theory with
# measurement.
#
# **What you need.** Chapter 04's sampling, chapter 06's engine step (plan → run → commit) and
# chapter 07's paged KV blocks: a verify step is nothing but a prefill chunk of γ + 1 tokens over a
# cached prefix. The package code is `miniinfer/speculative/`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from miniinfer import LLM, SamplingParams, bundled_model_path
from miniinfer.engine import EngineHooks
from miniinfer.speculative.acceptance import draw_from

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: one thread is as fast, and steady when the cores are shared
MODEL = bundled_model_path("shakespeare")              # the target: 6 layers, 4.4 M parameters
DRAFT = str(bundled_model_path("shakespeare-draft"))   # the draft: 2 layers, 0.6 M parameters, same tokenizer
llm = LLM(MODEL, num_kv_blocks=256)
model, tokenizer = llm.model, llm.tokenizer


# %% [markdown]
# ## 1. Why verifying γ tokens costs about as much as decoding one
#
# A decode step multiplies every weight matrix by *one* activation vector: the time goes into
# reading the weights (on a GPU, from HBM), not into arithmetic. Feeding the model L tokens at once
# reads the same weights once and does L times the arithmetic, which is nearly free until the
# matmuls become compute-bound. So the target can score L = γ + 1 positions — the last real token
# and γ guesses — for little more than the price of one. Here is the time of one forward over L
# tokens of our target on this CPU (on a GPU the curve is flatter still).

# %% tags=["nbval-ignore-output"]
def forward_seconds(L: int, repeat: int = 20) -> float:
    ids = torch.tensor([tokenizer.encode("ROMEO: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father")[:L]])
    times = []
    with torch.inference_mode():
        for _ in range(repeat):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


lengths = [1, 2, 3, 5, 8, 12]
seconds = [forward_seconds(L) for L in lengths]
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.plot(lengths, [s / seconds[0] for s in seconds], "o-", label="measured")
ax.plot(lengths, lengths, "--", color="grey", label="L × one token")
ax.set_xlabel("tokens in one forward (L)")
ax.set_ylabel("time / time of L = 1")
ax.legend()
fig.tight_layout()
print("L=5 costs", round(seconds[3] / seconds[0], 2), "× L=1")


# %% [markdown]
# ## 2. The acceptance rule
#
# The proposer drew guesses $x_1, \dots, x_\gamma$, guess $j$ from its distribution $q_j$. The target's
# forward gives $p_1, \dots, p_{\gamma+1}$: $p_j$ is the target's distribution for position $j$ (after
# the real tokens and guesses $x_{<j}$). Going left to right:
#
# * accept $x_j$ with probability $\min\bigl(1, \; p_j(x_j) / q_j(x_j)\bigr)$;
# * at the first rejection, emit a token drawn from the **residual**
#   $r_j = \dfrac{\max(p_j - q_j, 0)}{\sum \max(p_j - q_j, 0)}$ and stop;
# * if all γ are accepted, emit a **bonus** token from $p_{\gamma+1}$ (the forward computed it anyway).
#
# **Why the output follows $p$ exactly.** Write $\beta = \sum_x \min(p(x), q(x))$, the probability of
# accepting. Token $x$ comes out either as an accepted guess — probability $q(x)\min(1, p(x)/q(x)) =
# \min(p(x), q(x))$ — or as a resample after a rejection — probability $(1-\beta)\,r(x)$. Since
# $\sum_x \max(p - q, 0) = \sum_x (p - \min(p, q)) = 1 - \beta$, the second term is $\max(p(x) - q(x), 0)$,
# and $\min(p, q) + \max(p - q, 0) = p$. Every position after an accepted one is the same argument
# with the longer prefix. For a **greedy** request $p$ is one-hot on the argmax: a guess survives iff
# it *is* the argmax, and the residual is the argmax itself — greedy output is unchanged.
#
# **Exercise 10.1.** Write the rule for a batch of $B$ sequences with at most $K$ guesses each
# (`num_draft[b]` of them are real). The random numbers are given, so the result is reproducible:
# accept guess $j$ of row $b$ iff `u_accept[b, j] * q(x_j) < p(x_j)` (no division: $q(x_j) > 0$ for a
# drawn guess), and draw the emitted token with `draw_from(probs[B, V], u_sample[B])` (an inverse-CDF
# draw that accepts unnormalised rows). Return `(num_accepted [B], next_token [B])`.

# %% tags=["exercise"] exercise="10.1"
def accept_draft(p, q, draft, num_draft, u_accept, u_sample):
    """p [B, K+1, V], q [B, K, V], draft [B, K], num_draft [B], u_accept [B, K], u_sample [B]
    -> (num_accepted [B], next_token [B])."""
    # YOUR CODE HERE (Exercise 10.1)
    raise NotImplementedError("Exercise 10.1: implement `accept_draft`")


# %% tags=["check"] exercise="10.1"
from miniinfer.course import check

check.accept_draft(accept_draft)


# %% [markdown]
# ## 3. How many tokens per target step?
#
# Suppose each guess is accepted independently with probability α (the **acceptance rate**). The
# step emits 1 + (number of accepted guesses); guess $i$ counts only if guesses $1 \dots i$ were all
# accepted, probability $\alpha^i$. So
#
# $$ E(\alpha, \gamma) \;=\; 1 + \alpha + \alpha^2 + \dots + \alpha^\gamma \;=\; \frac{1 - \alpha^{\gamma+1}}{1 - \alpha}. $$
#
# It saturates at $1/(1-\alpha)$: with α = 0.6, no γ gives more than 2.5 tokens per step, and each
# extra guess costs a draft forward. If one guessed token costs $c$ target steps, a step costs
# $1 + c\gamma$ and the speed-up is $E(\alpha, \gamma) / (1 + c\gamma)$ — the quantity adaptive γ
# maximises below.
#
# **Exercise 10.2.** Return $E(\alpha, \gamma)$ (γ + 1 when α = 1).

# %% tags=["exercise"] exercise="10.2"
def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    # YOUR CODE HERE (Exercise 10.2)
    raise NotImplementedError("Exercise 10.2: implement `expected_tokens_per_step`")


# %% tags=["check"] exercise="10.2"
check.expected_tokens_per_step(expected_tokens_per_step)

# %%
fig, ax = plt.subplots(figsize=(5, 2.8))
gammas = np.arange(0, 11)
for alpha in (0.4, 0.6, 0.8, 0.9):
    ax.plot(gammas, [expected_tokens_per_step(alpha, int(g)) for g in gammas], "o-", ms=3, label=f"α = {alpha}")
ax.set_xlabel("guesses per step (γ)")
ax.set_ylabel("tokens per target step")
ax.legend(fontsize=8)
fig.tight_layout()


# %% [markdown]
# ## 4. Speculation inside the engine
#
# Speculation is a kind of step, not a loop beside the engine (`miniinfer/speculative/decoder.py`):
#
# 1. **plan** — the scheduler plans as usual; then every *decoding* sequence whose sampling depends on
#    its logits alone gets up to γ guesses from the proposer, and KV slots for them. Its
#    `num_new_tokens` becomes 1 + k: its newest token and the k guesses.
# 2. **run** — one forward over the whole batch. For the attention kernels a verify is an ordinary
#    prefill chunk: 1 + k queries over a cached paged prefix, causal at the bottom right. The runner
#    takes logits at every verified position and applies the acceptance rule.
# 3. **commit** — append the accepted guesses and the extra token (stopping at EOS or `max_tokens`),
#    and **roll back** the KV cache: only the newest token and the accepted guesses have valid K/V.
#
# The rejected guesses' K/V stay in their slots — past the computed count, where no kernel reads and
# the next step overwrites — but whole blocks that hold nothing valid must go back to the pool, or a
# batch that guesses badly would fill it with garbage.
#
# **Exercise 10.3.** Before the step the sequence had `num_computed` tokens with K/V (its newest
# token had none); the step computed K/V for the newest token and `num_guesses` guesses, into
# `block_table` (already long enough for all of them). Return `(new computed count, kept blocks,
# released blocks)`: keep the blocks needed for the valid tokens, release the rest.

# %% tags=["exercise"] exercise="10.3"
def rollback_blocks(block_table: list[int], num_computed: int, num_guesses: int, num_accepted: int,
                    block_size: int) -> tuple[int, list[int], list[int]]:
    # YOUR CODE HERE (Exercise 10.3)
    raise NotImplementedError("Exercise 10.3: implement `rollback_blocks`")


# %% tags=["check"] exercise="10.3"
check.rollback_blocks(rollback_blocks)

# %% [markdown]
# ## 5. Plug it in: your rule drives the engine
#
# `EngineHooks(accept_draft=...)` replaces the package's rule with yours: every verify step of the
# engine calls it on the batch's $p$, $q$, guesses and uniforms. With the bundled draft as proposer
# and greedy requests, the output must equal plain greedy decoding token for token.

# %%
prompts = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n", "HAMLET:\nTo be, or not to be"]
greedy = SamplingParams(temperature=0.0, max_tokens=48)
plain = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
spec = LLM(MODEL, num_kv_blocks=256, speculative_model=DRAFT, num_speculative_tokens=4,
           hooks=EngineHooks(accept_draft=accept_draft))
outputs = spec.generate(prompts, greedy, use_tqdm=False)
assert [o.token_ids for o in outputs] == plain, "speculative greedy output differs from plain greedy"
stats = spec.stats()
print(f"identical to plain greedy; {stats['spec_draft_tokens']} guesses, {stats['spec_accepted_tokens']} accepted, "
      f"{stats['spec_tokens_per_verify']:.2f} tokens per verified sequence per target step")
print(outputs[1].text[:120])

# %% [markdown]
# Sampling works the same way (each request's random stream decides the acceptance tests, so a seeded
# request is reproducible); the test suite checks with a chi-square test that the sampled tokens
# follow the target's distribution exactly.

# %%
sampled = spec.generate(prompts[:1], SamplingParams(temperature=0.8, max_tokens=40, seed=1), use_tqdm=False)
print(sampled[0].text)


# %% [markdown]
# ## 6. Theory against measurement
#
# Measure α with one guess per step (γ = 1: the fraction of single guesses the target accepts),
# then run γ = 1 … 6 and compare the measured tokens per target step with $E(\hat\alpha, \gamma)$.

# %%
def measure(gamma, proposer=DRAFT):
    engine_llm = LLM(MODEL, num_kv_blocks=256, speculative_model=proposer, num_speculative_tokens=gamma)
    engine_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
    return engine_llm.stats()


measured = {g: measure(g) for g in range(1, 7)}
alpha_hat = measured[1]["spec_acceptance_rate"]
fig, ax = plt.subplots(figsize=(5, 2.8))
gs = list(measured)
ax.plot(gs, [measured[g]["spec_tokens_per_verify"] for g in gs], "o-", label="measured (draft model)")
ax.plot(gs, [expected_tokens_per_step(alpha_hat, g) for g in gs], "--", label=f"E(α̂ = {alpha_hat:.2f}, γ)")
ax.set_xlabel("γ")
ax.set_ylabel("tokens per target step")
ax.legend(fontsize=8)
fig.tight_layout()
print("α̂ =", round(alpha_hat, 3), "| measured:", [round(measured[g]["spec_tokens_per_verify"], 2) for g in gs])

# %% [markdown]
# The measurement falls below the curve as γ grows: acceptances are not independent. Easy stretches
# (a name, the end of a word) are accepted in runs and hard ones rejected in runs, so the chance of
# accepting guess 3 given guesses 1 and 2 were accepted is not the average α. The formula is a good
# guide for choosing γ, not an identity.
#
# ## 7. Choosing γ and the proposer
#
# The speed-up $E(\alpha, \gamma)/(1 + c\gamma)$ needs two numbers the engine can measure while it
# runs: α (accepted / proposed guesses) and the cost ratio $c$ (seconds of proposing per guess over
# seconds of a verify step). `num_speculative_tokens="auto"` keeps running averages of both
# (`miniinfer.speculative.AdaptiveGamma`) and re-chooses γ every step; `select_proposer` ranks
# proposers by the same number. The formula assumes a verify of γ + 1 tokens costs about one decode
# step, true where decoding is bound by reading the weights (a GPU at small batch) but not on this CPU,
# where the matmuls are bound by arithmetic: a verify of 5 tokens costs 1.3–1.5 decode steps here, and
# a batch of 16 verifying 5 tokens each is an 80-row forward. So "auto" also measures seconds per
# emitted token of speculative and plain steps at each batch size and speculates only while that is
# cheaper (`SpeculationGate`). Three proposers come with the package:
#
# * the **draft model** (a separate small model with its own contiguous KV cache, one row per
#   sequence, so rolling back is lowering a counter; its guesses skip the engine's step machinery);
# * **n-gram prompt lookup** — find the last few tokens earlier in the sequence and guess what
#   followed them then: free, and strong when the output quotes the prompt;
# * a **layer-skipping self-draft** — the target's first layers with its final norm and head: no
#   second model, but our target was never trained to exit early.

# %% tags=["nbval-ignore-output"]
from miniinfer.speculative import select_proposer

measurements = {}
for name, proposer in (("draft", DRAFT), ("ngram", "ngram"), ("self", "self")):
    auto = LLM(MODEL, num_kv_blocks=256, speculative_model=proposer, num_speculative_tokens="auto")
    auto.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
    adaptive = auto.engine.speculator.adaptive
    measurements[name] = (adaptive.alpha, adaptive.cost_ratio)
    print(f"{name:6s} α ≈ {adaptive.alpha:.2f}, cost ratio c ≈ {adaptive.cost_ratio:.2f}, γ now {adaptive.gamma}")
print("choose:", select_proposer(measurements))


# %% [markdown]
# ## 8. Trees: several guesses per position
#
# A chain dies at its first wrong guess. Where the draft is unsure, a **tree** spends the same number
# of guessed tokens on alternatives: the draft's top $w$ first tokens, each continued greedily. All
# nodes go through the target in *one* forward; node $i$ sits at position $n - 1 + \text{depth}(i)$
# and may attend to the whole prefix and to its own ancestors only — never to a sibling's branch. The
# acceptance walks from the root: greedy follows the child that is the target's argmax; sampling uses
# SpecInfer's multi-candidate rule (try the children in turn, replacing $p$ by the residual after each
# rejection), which again emits exactly $p$.
#
# **Exercise 10.4.** Build the tree attention mask: `parents[i]` is node $i$'s parent (`-1` for the
# root, node 0, the sequence's newest real token; parents come before children). Return a bool
# tensor `[N, N]` with `mask[i, j]` True iff node $j$ is node $i$ or one of its ancestors.

# %% tags=["exercise"] exercise="10.4"
def tree_attention_mask(parents: list[int]) -> torch.Tensor:
    # YOUR CODE HERE (Exercise 10.4)
    raise NotImplementedError("Exercise 10.4: implement `tree_attention_mask`")


# %% tags=["check"] exercise="10.4"
check.tree_attention_mask(tree_attention_mask)

# %% [markdown]
# Tree against chain at the same number of guessed tokens, greedy, verified with the torch reference
# (`miniinfer.speculative.tree`: one masked forward over prefix + tree). The output is plain greedy
# decoding either way; what changes is the number of tokens each target forward yields.

# %%
from miniinfer.loader import load_model
from miniinfer.speculative.tree import draft_tree, draft_tree_best_first, tree_logits, verify_tree_greedy

draft_model, _ = load_model(DRAFT, device="cpu")


def tokens_per_forward(make_tree, num_tokens=32, observe=None):
    """Greedy decoding of every prompt with trees from make_tree(tokens): target tokens per forward.
    observe(tree, path), if given, sees each verified tree and the path the target accepted."""
    emitted = forwards = 0
    for prompt in prompts:
        tokens = tokenizer.encode(prompt)
        start = len(tokens)
        while len(tokens) - start < num_tokens:
            tree = make_tree(tokens)
            path, token = verify_tree_greedy(tree, tree_logits(model, tokens, tree))
            if observe is not None:
                observe(tree, path)
            tokens += [tree.tokens[node] for node in path] + [token]
            emitted, forwards = emitted + len(path) + 1, forwards + 1
    return emitted / forwards


for guesses, shapes in ((4, [(1, 4), (2, 2)]), (6, [(1, 6), (2, 3), (3, 2)]), (12, [(1, 12), (3, 4)])):
    results = [f"{'chain' if w == 1 else 'tree'} {w}×{d}: "
               f"{tokens_per_forward(lambda t, w=w, d=d: draft_tree(draft_model, t, w, d)):.2f}" for w, d in shapes]
    best_first = tokens_per_forward(lambda t, g=guesses: draft_tree_best_first(draft_model, t, g, width=2))
    print(f"{guesses:2d} guesses, tokens/forward: " + ", ".join(results) + f", best-first: {best_first:.2f}")

# %% [markdown]
# Trees do not win everywhere. They pay off where the draft's first choice is often wrong but its
# second is right; at a small budget, splitting 4 guesses into two branches of depth 2 caps a step at
# 3 tokens, while a lucky chain can reach 5. The tree's shape should follow where the draft is unsure.
# **Best-first** trees do that (`draft_tree_best_first`, EAGLE-2's dynamic tree): a node's path
# probability — the product of its guesses' chances of acceptance from the root — is its chance of
# being reached, and the expected number of accepted guesses is the sum over the nodes, so grow the
# tree one node at a time, always adding the likeliest candidate; where the draft is sure that is a
# chain, where it hesitates, a branch, and no shape has to be chosen in advance.
#
# Above, "chance of acceptance" was the draft's own probability, and best-first did no better than the
# chain at small budgets (at 12 guesses it lost to the fixed 3×4 tree). The draft's probabilities are **not** acceptance rates. Measure them: over the greedy text of
# the prompts, bin the draft's first and second guesses by the probability it gave them and count how
# often each was the target's argmax (a reliability diagram).

# %%
import collections

hits = collections.defaultdict(lambda: [0, 0])  # (rank, bin) -> [target's argmax, all]
with torch.inference_mode():
    for prompt in prompts:
        tokens = tokenizer.encode(prompt)
        for _ in range(48):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
        draft_probs = draft_model(torch.tensor([tokens]))[0].float().softmax(-1)
        target_best = model(torch.tensor([tokens]))[0].argmax(-1)
        for i in range(len(tokenizer.encode(prompt)) - 1, len(tokens) - 1):
            top = draft_probs[i].topk(2)
            for rank in range(2):
                entry = hits[(rank, min(int(float(top.values[rank]) * 5), 4))]
                entry[0] += int(top.indices[rank]) == int(target_best[i])
                entry[1] += 1

fig, ax = plt.subplots(figsize=(5, 2.8))
for rank, marker in ((0, "o-"), (1, "s-")):
    bins = sorted(b for r, b in hits if r == rank)
    ax.plot([(b + 0.5) / 5 for b in bins], [hits[(rank, b)][0] / hits[(rank, b)][1] for b in bins], marker,
            label=f"draft's {'first' if rank == 0 else 'second'} guess")
ax.plot([0, 1], [0, 1], "k:", label="calibrated")
ax.set_xlabel("draft's probability (bin centre)")
ax.set_ylabel("accepted (target's argmax)")
ax.legend(fontsize=8)
fig.tight_layout()
print({f"rank {r + 1}, p in [{b / 5:.1f}, {(b + 1) / 5:.1f})": f"{a}/{n}" for (r, b), (a, n) in sorted(hits.items())})

# %% [markdown]
# Our draft is **underconfident** about its first guess (when it gives it 10 %, the target agrees
# about half the time) and its second guess is rarely right. A tree built on the raw probabilities
# therefore spends nodes on second guesses where extending the first guess would pay more.
# `AcceptanceCalibration` replaces the draft's word by measured rates: per (rank, probability bin),
# how often verification accepted such a guess, starting from the draft's probability and learning
# from every verified tree (only *tested* nodes count: the children of the root and of accepted
# nodes). Sequoia (Chen et al. 2024) builds its trees from measured acceptance per rank for the same
# reason. Let it learn on one pass over the prompts, then compare at equal budgets:

# %%
from miniinfer.speculative.tree import AcceptanceCalibration


def tokens_per_forward_learning(calibration, guesses):
    """tokens_per_forward with calibrated best-first trees that learn from each verification."""
    return tokens_per_forward(lambda t: draft_tree_best_first(draft_model, t, guesses, 2, calibration),
                              observe=calibration.observe_tree)


calibration = AcceptanceCalibration()
tokens_per_forward_learning(calibration, 8)  # the learning pass
for guesses in (4, 6, 12):
    chain = tokens_per_forward(lambda t, g=guesses: draft_tree(draft_model, t, 1, g))
    raw = tokens_per_forward(lambda t, g=guesses: draft_tree_best_first(draft_model, t, g, width=2))
    calibrated = tokens_per_forward_learning(calibration, guesses)
    print(f"{guesses:2d} guesses, tokens/forward: chain {chain:.2f}, best-first raw {raw:.2f}, "
          f"calibrated {calibrated:.2f}")

# %% [markdown]
# With measured acceptance rates the best-first tree is a chain where the draft's first guess is
# usually right and branches only where a second guess is worth more than one more level: here it
# beats the chain at every budget (by about 0.2 tokens per forward at 4 and 6 guesses) and the raw
# best-first tree too. `benchmarks/speculative.py` measures the same on longer outputs in the engine,
# whose tree proposer keeps one `AcceptanceCalibration` for its whole life.
#
# The engine verifies trees too, grown best-first: `LLM(MODEL, speculative_model=DRAFT,
# num_speculative_tokens=4, speculative_tree=2)` (the width is the most children a node may get). The nodes go through the forward as one verify chunk whose RoPE positions
# follow their depths, the verify attention applies your mask, and before the commit the accepted
# path's K/V are copied to consecutive slots (node $i$ was written at position $n - 1 + i$, but the
# accepted node at depth $d$ belongs at $n - 1 + d$). That runs on the CPU backends (`torch`, `sdpa`);
# the Triton and CUDA kernels take no mask yet. `benchmarks/speculative.py` records wall-clock
# speed-ups of every proposer and γ on this CPU in `benchmarks/results/speculative_cpu.json`.
#
# ## Summary
#
# * A proposer guesses γ tokens; one target forward scores all of them; the rule
#   $\min(1, p/q)$ + residual resampling makes the output **exactly** the target's.
# * Tokens per target step: $E(\alpha,\gamma) = (1-\alpha^{\gamma+1})/(1-\alpha)$; the speed-up is
#   $E/(1 + c\gamma)$, so γ and the proposer are chosen from measured α and cost.
# * In the engine, speculation is a step: guesses get slots, the verify is a prefill chunk, and the
#   commit rolls the KV back past the rejected guesses, releasing whole blocks.
# * Trees spend the same guesses on alternatives and verify them in one pass with a tree mask.
#
# **Going further** (no checks):
#
# 1. Give the Triton paged prefill kernel a tree-mask argument (a bitmask per node: N ≤ 16 fits in
#    one int32), so that tree speculation runs on a GPU too.
# 2. Retrain or distill the draft on the target's own greedy outputs. How far does α move, and what
#    does that do to the best γ?
# 3. Batch size matters: at batch 16 the verify step is no longer nearly free on a CPU. Measure the
#    speed-up against the batch size and explain the crossover.
# 4. Make n-gram lookup O(1) per step with a suffix index that is updated as tokens arrive.
