"""The acceptance rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batched.

A cheap proposer guesses ``k`` tokens ``x_1 … x_k`` after a sequence, drawn from its own
distributions ``q_1 … q_k``; one target forward over the last real token and the ``k`` guesses gives
the target's distributions ``p_1 … p_{k+1}`` at every one of those positions. Then, left to right:

* guess ``x_j`` is **accepted** with probability ``min(1, p_j(x_j) / q_j(x_j))``;
* at the first rejection the token is **resampled** from the residual ``norm(max(p_j − q_j, 0))``
  and the step ends;
* when all ``k`` are accepted, a **bonus** token comes from ``p_{k+1}`` (the target computed it anyway).

Each emitted token is distributed exactly as the target's own next token: the probability of
emitting ``x`` at position ``j`` is ``q(x)·min(1, p(x)/q(x)) + (1 − β)·norm(max(p − q, 0))(x) = p(x)``,
with ``β = Σ min(p, q)`` the acceptance probability. A greedy request has a one-hot ``p``: a guess is
accepted iff it is the target's argmax, and the "residual" is the argmax itself — so greedy
speculative decoding reproduces greedy decoding token for token.

Shapes: ``B`` rows (sequences), at most ``K`` guesses each (``num_draft[b] ≤ K``; entries past it are
ignored), ``V`` vocabulary. Random numbers come from the caller (the engine's counter-based streams),
so a run is reproducible and the function itself is a pure function of its inputs.
"""

from __future__ import annotations

import torch

__all__ = ["accept_draft", "residual_distribution", "expected_tokens_per_step", "draw_from"]


def draw_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, one token per row: the first token whose prefix sum (float64) exceeds
    ``u × mass``.  probs [N, V] (non-negative, need not sum to 1), u [N] in [0, 1) -> [N] int64."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p − q, 0))`` along the last dimension: what to draw from after a rejection.

    Where the residual has no mass (``p == q`` up to rounding, so a rejection had probability 0) it
    falls back to ``p``, which keeps the draw well defined.  p, q [..., V] -> [..., V]."""
    residual = (p - q).clamp_(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, num_draft: torch.Tensor,
                 u_accept: torch.Tensor, u_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a batch of guesses against the target.

    p [B, K+1, V]: the target's distribution after the last real token and after each guess;
    q [B, K, V]: the proposer's distributions the guesses were drawn from (one-hot for a
    deterministic proposer such as n-gram lookup); draft [B, K] int64: the guesses;
    num_draft [B]: how many guesses row b really has (0 … K); u_accept [B, K], u_sample [B]:
    uniforms in [0, 1).

    Returns ``(num_accepted [B], next_token [B])``: row b keeps ``draft[b, :num_accepted[b]]`` and then
    ``next_token[b]`` — the resampled token at the first rejection, or the bonus token when every
    guess was accepted. So every row gains ``num_accepted + 1`` tokens.
    """
    B, K1, V = p.shape
    K = K1 - 1
    rows = torch.arange(B, device=p.device)
    if K > 0:
        index = draft.clamp(0, V - 1).unsqueeze(-1)
        p_draft = p[:, :K].gather(-1, index).squeeze(-1)                      # [B, K]
        q_draft = q.gather(-1, index).squeeze(-1)                             # [B, K]
        # u < p/q, written without a division (q > 0 for a token that was drawn from q).
        accepted = u_accept.to(p.dtype) * q_draft < p_draft
        valid = torch.arange(K, device=p.device)[None, :] < num_draft[:, None]
        accepted &= valid
        # Length of the run of acceptances from the left: the cumulative product stops at the first 0.
        num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)             # [B]
    else:
        num_accepted = torch.zeros(B, dtype=torch.long, device=p.device)
    p_next = p[rows, num_accepted]                                            # [B, V]
    rejected = num_accepted < num_draft                                       # else: the bonus token
    if K > 0:
        q_next = q[rows, num_accepted.clamp(max=K - 1)]
        p_next = torch.where(rejected[:, None], residual_distribution(p_next, q_next), p_next)
    return num_accepted, draw_from(p_next, u_sample)


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """Expected tokens emitted per target step with ``gamma`` guesses, each accepted independently with
    probability ``alpha``: ``1 + α + α² + … + α^γ = (1 − α^{γ+1}) / (1 − α)`` (γ + 1 when α = 1)."""
    if gamma < 0:
        raise ValueError(f"gamma must be ≥ 0, got {gamma}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
