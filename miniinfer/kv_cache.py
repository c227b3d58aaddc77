"""The KV cache: keep every layer's keys and values so that each new token costs O(context), not O(context²).

Without a cache, generating token ``t`` re-runs the model over all ``t`` tokens. With one, the
prompt is run once (**prefill**: all its keys and values are stored) and each later step runs the
model on the single newest token (**decode**): its query attends to the stored keys, and its own key
and value are appended.

:class:`KVCache` is preallocated once — ``[num_layers, B, S_max, H_kv, D]`` for keys and for
values — and filled in place, so a step never copies or concatenates what is already there. Its
``B`` rows advance together (a *static* batch). Rows whose prompts are shorter are **left-padded**:
the padding slots are masked out of attention, and each row's positions start at its first real
token. That waste — padded slots, and rows that finished early but still occupy the batch — is
what continuous batching (chapter 06) and paged memory (chapter 07) remove.

The cache implements the model's attention hook (:class:`miniinfer.attention.AttentionContext`):
``model(ids, positions, attention=cache)`` stores and attends through it. The step itself — write
the new keys and values into their slots, attend to every filled slot — is the pure function
:func:`attend_with_cache` (chapter 05's exercise), which ``KVCache(..., attend_with_cache=fn)``
replaces with your own.

Memory: every token of context costs :func:`kv_bytes_per_token` = 2 · layers · H_kv · D · bytes per
number (keys *and* values, in every layer) — the budget that decides how many sequences fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KVCache", "attend_with_cache", "kv_bytes_per_token"]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the KV cache: its key and its value, ``H_kv · D`` numbers each, in
    every layer. ``config`` has ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def attend_with_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, scale: float, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's cache step: store the L new keys/values, then attend to every filled slot.

    k_cache, v_cache: [B, S_max, H_kv, D], this layer's cache, slots ``0 … start−1`` already filled;
    q: [B, L, H, D]; k, v: [B, L, H_kv, D] (RoPE applied); key_padding_mask: [B, S_max] bool, True
    where a slot holds a real token (None: no padding) -> [B, L, H, D].

    The new tokens go to slots ``start … start+L−1`` (written in place). Query i sits at slot
    ``start+i`` and sees slots ``0 … start+i`` (causal, offset by the cached prefix), minus padding.
    """
    end = start + q.shape[1]
    k_cache[:, start:end] = k
    v_cache[:, start:end] = v
    keys, values = k_cache[:, :end], v_cache[:, :end]                                  # [B, S, H_kv, D]
    query_slot = torch.arange(start, end, device=q.device)
    mask = torch.arange(end, device=q.device)[None, :] <= query_slot[:, None]         # [L, S] causal
    if key_padding_mask is not None:
        mask = mask[None] & key_padding_mask[:, None, :end]                            # [B, L, S]
        # A padding query would see no key at all (softmax of nothing is NaN, and NaN values leak
        # through zero weights later), so every query may always see its own slot.
        own_slot = torch.arange(end, device=q.device)[None, :] == query_slot[:, None]
        mask = (mask | own_slot[None])[:, None]                                         # [B, 1, L, S]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


class KVCache:
    """A contiguous, preallocated cache for ``B`` sequences that advance together."""

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", attention_fn=None,
                 attend_with_cache=None):
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0  # slots filled, the same for every row (padding included)
        # [B, S_max] True where a slot holds a real token; None while no row is padded.
        self.key_padding_mask: torch.Tensor | None = None
        self.attention_fn = attention_fn  # (q, k, v, *, causal, scale) for unpadded rows; None: torch SDPA
        # Your chapter-05 step (same signature as the module's attend_with_cache); None: the package's.
        self.attend_with_cache = attend_with_cache

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int = 1, max_len: int | None = None,
                  attend_with_cache=None) -> KVCache:
        """A cache shaped for ``model``'s layers and KV heads, using its attention component (or
        ``attend_with_cache``, your own cache step, for every step)."""
        config = model.config
        parameter = next(model.parameters())
        components = getattr(model, "components", None)
        return cls(config.num_hidden_layers, batch_size, max_len or config.max_position_embeddings,
                   config.num_key_value_heads, config.head_dim, parameter.dtype, parameter.device,
                   attention_fn=getattr(components, "attention", None), attend_with_cache=attend_with_cache)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def set_padding(self, prompt_lengths: list[int]) -> torch.Tensor:
        """Prepare for a left-padded prompt batch; return the positions ``[B, L]`` to feed the model.

        Row b's prompt occupies the last ``prompt_lengths[b]`` of ``L = max(prompt_lengths)`` slots;
        its positions count from 0 at its first real token (padding slots get position 0, unused).
        """
        if self.length != 0:
            raise ValueError("set_padding must be called on an empty cache, before the prefill")
        if len(prompt_lengths) != self.batch_size:
            raise ValueError(f"{len(prompt_lengths)} prompt lengths for a cache of batch size {self.batch_size}")
        longest = max(prompt_lengths)
        device = self.keys.device
        lengths = torch.tensor(prompt_lengths, device=device)
        slot = torch.arange(self.max_len, device=device)
        pad = (longest - lengths)[:, None]                      # [B, 1] padding slots before each prompt
        self.key_padding_mask = slot[None, :] >= pad            # [B, S_max]
        positions = (torch.arange(longest, device=device)[None, :] - pad).clamp(min=0)
        return positions

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Store this step's keys/values, then attend. q: [B, L, H, D]; k, v: [B, L, H_kv, D] → [B, L, H, D].

        The new tokens go to slots ``length … length+L−1``; after the last layer has stored them the
        cache's ``length`` advances by L.
        """
        batch, num_new = q.shape[0], q.shape[1]
        start, end = self.length, self.length + num_new
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; this step would fill {end}")
        if batch != self.batch_size:
            raise ValueError(f"a batch of {batch} rows for a cache of batch size {self.batch_size}")
        k_cache, v_cache = self.keys[layer_index], self.values[layer_index]    # [B, S_max, H_kv, D] views
        step = self.attend_with_cache
        if step is None and self.key_padding_mask is None and self.attention_fn is not None:
            # Plain rows: the model's own attention component (chapter 03, maybe yours) on the filled
            # slots; query i sits at slot start+i and sees slots 0 … start+i (causal, offset by S − L).
            k_cache[:, start:end] = k
            v_cache[:, start:end] = v
            out = self.attention_fn(q, k_cache[:, :end], v_cache[:, :end], causal=True, scale=scale)
        else:
            out = (step or attend_with_cache)(k_cache, v_cache, start, q, k, v, scale, self.key_padding_mask)
        if layer_index == self.num_layers - 1:
            self.length = end
        return out

    def reset(self) -> None:
        self.length = 0
        self.key_padding_mask = None
