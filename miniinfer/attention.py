"""Chapter 03 — attention: scaled dot-product, the causal mask, multi-head and grouped-query attention.

Layout: tokens first, heads second — ``q: [B, L, H, D]``, ``k, v: [B, S, H_kv, D]`` — because that is
what a linear projection produces (``[B, L, H·D]`` viewed as ``[B, L, H, D]``) and what a KV cache
stores, so no transposes are needed on the way in or out. ``L`` queries attend to ``S ≥ L`` keys: the
last ``L`` keys belong to the queries' own tokens, the first ``S − L`` are cached earlier tokens.

Also here: :class:`AttentionContext`, the hook through which a KV cache (chapter 05) and the engine
(chapters 06–08) take over the attention of every layer of the model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "softmax",
    "causal_mask",
    "scaled_dot_product_attention",
    "grouped_query_attention",
    "sdpa_attention",
    "AttentionContext",
]


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax: subtract the max first, so ``exp`` never overflows (and rows that are
    entirely ``-inf`` are the caller's problem: they have no valid entry to normalise)."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)


def causal_mask(L: int, S: int, device=None) -> torch.Tensor:
    """bool [L, S]: True where query i may attend key j, i.e. ``j <= i + (S - L)``.

    The queries are the *last* L of the S tokens (the first S − L are cached), so query i sits at
    position ``i + (S − L)`` and may see every key up to and including its own position. With
    ``S == L`` this is the usual lower triangle; with ``L == 1`` (decoding) every key is visible.
    """
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Plain multi-head attention ``softmax(q·kᵀ · scale + mask) · v``.

    q: [B, L, H, D], k, v: [B, S, H, D], mask: bool, broadcastable to [B, H, L, S] (True = may attend),
    scale defaults to ``1/sqrt(D)`` (keeps the scores' variance ~1 whatever D is) -> [B, L, H, D].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("blhd,bshd->bhls", q, k) * scale  # [B, H, L, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = softmax(scores, dim=-1)
    return torch.einsum("bhls,bshd->blhd", weights, v)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention (GQA): H query heads share H_kv key/value heads, G = H / H_kv per group.

    q: [B, L, H, D], k, v: [B, S, H_kv, D] -> [B, L, H, D]. ``causal`` uses :func:`causal_mask` (the
    queries are the last L of the S positions). H_kv == H is multi-head attention, H_kv == 1 is
    multi-query attention.

    Query head h uses KV head ``h // G`` (HF's ``repeat_kv`` order). Instead of copying k and v G
    times, we view q as [B, L, H_kv, G, D] and let the matmul broadcast: the G query heads of a group
    become extra rows against the same keys, so a KV cache is read once per group, not once per head.
    """
    B, L, H, D = q.shape
    S, H_kv = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = D ** -0.5 if scale is None else scale
    # [B, L, H_kv, G, D] -> [B, H_kv, G·L, D]: rows are (query head in group, query token).
    q = (q * scale).view(B, L, H_kv, G, D).permute(0, 2, 3, 1, 4).reshape(B, H_kv, G * L, D)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, S, D]
    scores = (q @ k.transpose(-1, -2)).view(B, H_kv, G, L, S)
    if causal and L > 1:  # one query (decoding) sees every key: no mask to build
        scores = scores.masked_fill(~causal_mask(L, S, q.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1).view(B, H_kv, G * L, S)
    out = (weights @ v).view(B, H_kv, G, L, D)
    return out.permute(0, 3, 1, 2, 4).reshape(B, L, H, D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Same contract as :func:`grouped_query_attention`, computed by ``torch.nn.functional.scaled_dot_product_attention``.

    q: [B, L, H, D], k, v: [B, S, H_kv, D] -> [B, L, H, D]. PyTorch's ``is_causal`` aligns the mask to
    the *top-left* (query i sees keys 0..i), which is wrong when S > L, so we pass our bottom-right
    :func:`causal_mask` explicitly in that case.
    """
    L, S = q.shape[1], k.shape[1]
    mask = causal_mask(L, S, q.device) if causal and L > 1 and S != L else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal and L > 1 and S == L,
                                         scale=scale, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


class AttentionContext(Protocol):
    """What the model calls instead of plain causal self-attention when one is passed to ``forward``.

    For each layer, the model computes q, k, v for the *new* tokens, rotates q and k at their
    positions, and calls ``attend``. The context stores k and v (its KV cache: contiguous, paged, …),
    attends each query to every key of its own sequence up to the query's position, and returns the
    result. The token layout is the caller's: ``*`` is ``[B, L]`` (a padded batch) or ``[T]`` (a packed
    batch of several sequences, which the context tells apart from its own metadata).

    q: [*, H, D], k, v: [*, H_kv, D], scale: the softmax scale (``1/sqrt(D)``) -> [*, H, D].
    """

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor: ...

