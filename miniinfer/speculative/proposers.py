"""Proposers: cheap ways to guess the next few tokens of many sequences at once.

Every proposer answers ``propose(seqs, num_tokens) -> list[Proposal]``: up to ``num_tokens[b]``
guesses for sequence ``b`` (fewer, even none, is always allowed), and the distribution each guess
was drawn from (None = deterministic: the guess had probability 1, as for a greedy request or a
lookup). The target then verifies them all in one forward (:mod:`miniinfer.speculative.acceptance`).

* :class:`NgramProposer` — prompt lookup: find the sequence's latest ``n`` tokens earlier in itself
  and guess what followed them then. Free, and very good when the output quotes the prompt.
* :class:`DraftModelProposer` — a small model of the same vocabulary (the bundled
  ``shakespeare-draft``), batched over the sequences, with its own contiguous KV cache
  (:class:`DraftKVCache`: a row per sequence) and no engine machinery between its forwards. It keeps
  each sequence's KV between steps and rolls it back to the target's tokens when guesses were
  rejected.
* :func:`self_draft_model` — the target itself with only some of its layers (early exit): no second
  model to train or load; a :class:`DraftModelProposer` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miniinfer.engine.sequence import Sequence
from miniinfer.sampler import (
    SamplingBatch,
    SamplingRow,
    _signed64,
    batch_probabilities,
    derive_seed,
    uniform_from_seed,
)

__all__ = ["Proposal", "Proposer", "NgramProposer", "DraftModelProposer", "LayerSkipModel", "self_draft_model",
           "TreeDraftProposer", "DraftForward", "DRAFT_STREAM"]

DRAFT_STREAM = 0x5EC1  # derive_seed(stream_seed, DRAFT_STREAM): the random stream a draft model samples from


@dataclass
class Proposal:
    """Guesses for one sequence: ``tokens`` [k], and ``probs`` [k, V] they were drawn from (None: one-hot)."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    #: a token tree instead of a chain: parents[i] of node i (node 0 = the sequence's newest token, parent
    #: -1; node i ≥ 1 is tokens[i − 1]); every guess deterministic (one-hot q)
    parents: list[int] | None = None
    #: with ``parents``: each node's (rank among its parent's candidates, draft probability), node 0 first
    confidence: list[tuple[int, float]] | None = None


class Proposer:
    """The interface; :meth:`release` lets a stateful proposer forget a finished sequence."""

    name = "proposer"

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        raise NotImplementedError

    def release(self, seq: Sequence) -> None:
        pass

    def observe_tree(self, tree, path: list[int]) -> None:
        """A tree this proposer guessed was verified: ``path`` is the accepted nodes (tree proposers learn)."""


def ngram_lookup(token_ids: list[int], num_tokens: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
    ``n`` tokens (longest n first, ``max_n`` … ``min_n``), at most ``num_tokens`` of them; [] if none."""
    L = len(token_ids)
    if num_tokens <= 0:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = token_ids[L - n:]
        first = suffix[0]
        # Latest match first: recent context predicts best. A match must end before the suffix starts.
        for start in range(L - n - 1, -1, -1):
            if token_ids[start] == first and token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + num_tokens]
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        return [Proposal(ngram_lookup(seq.token_ids, k, self.max_n, self.min_n)) for seq, k in zip(seqs, num_tokens)]


class LayerSkipModel(nn.Module):
    """The target with only ``layers`` of its decoder layers (the others skipped), then its own final
    norm and LM head: a self-draft that shares every weight. Same forward contract as the model."""

    def __init__(self, target: nn.Module, layers: list[int]):
        super().__init__()
        self.target = target
        self.config = target.config
        self.components = target.components
        self.layer_indices = list(layers)

    def forward(self, input_ids, positions=None, attention=None, logits_indices=None):
        from miniinfer.layers import embedding, lm_head

        inner = self.target.model
        cos, sin = inner.rotary_emb.cos_sin(positions)
        x = embedding(input_ids, inner.embed_tokens.weight)
        for index in self.layer_indices:  # each layer keeps its own index: its own KV pool slot
            x = inner.layers[index](x, cos, sin, attention)
        if logits_indices is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_indices)
        return lm_head(inner.norm(x), self.target.lm_head_weight)


def self_draft_model(target: nn.Module, num_layers: int | None = None) -> LayerSkipModel:
    """Early exit: the first ``num_layers`` layers of the target (default: a third, at least one)."""
    total = target.config.num_hidden_layers
    num_layers = max(1, total // 3) if num_layers is None else num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"a self-draft keeps 1 … {total} layers, got {num_layers}")
    return LayerSkipModel(target, list(range(num_layers)))


class LeanForward:
    """A Qwen2 / Llama model's forward (the readable one: :meth:`Qwen2ForCausalLM.forward
    <miniinfer.models.qwen2.Qwen2ForCausalLM.forward>`, same contract and math) as one flat function
    over weights fetched once.

    Why: a draft is so small that a forward of one token is mostly Python — every ``nn.Module`` call and
    attribute lookup costs about as much as the tiny matmul it wraps. This runs the same operations
    (:func:`~miniinfer.layers.rms_norm`, the fused q/k/v projection, :func:`~miniinfer.rope.apply_rope`,
    the attention context, SwiGLU) without the module tree. Only for models on the default components
    without per-head q/k norms (:meth:`supports`); anything else keeps the model's own forward. Works for a
    :class:`LayerSkipModel` too (its kept layers, their own indices).
    """

    def __init__(self, model: nn.Module):
        from miniinfer.layers import rms_norm
        from miniinfer.rope import apply_rope

        self.rms_norm, self.apply_rope = rms_norm, apply_rope
        base = model.target if isinstance(model, LayerSkipModel) else model
        indices = model.layer_indices if isinstance(model, LayerSkipModel) else range(base.config.num_hidden_layers)
        inner, config = base.model, base.config
        self.eps = config.rms_norm_eps
        self.H, self.H_kv, self.D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.embed, self.norm, self.head = inner.embed_tokens.weight, inner.norm.weight, base.lm_head_weight
        self.cos, self.sin = inner.rotary_emb.cos, inner.rotary_emb.sin
        self.linear = torch.nn.functional.linear  # F.linear(x, weight, bias); a subclass may pack the weights
        self.layers = []
        for index in indices:
            layer = inner.layers[index]
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((attn.layer_index, attn.scale, layer.input_layernorm.weight, attn.qkv_proj.weight,
                                attn.qkv_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
                                layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight))

    @staticmethod
    def supports(model: nn.Module) -> bool:
        from miniinfer.components import Components
        from miniinfer.models.qwen2 import MODEL_CLASSES

        base = model.target if isinstance(model, LayerSkipModel) else model
        return (type(base) in MODEL_CLASSES.values() and base.components == Components()
                and not base.config.qk_norm and not base.fused_kernels)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attention,
                 logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        F, linear = torch.nn.functional, self.linear
        rms_norm, apply_rope, eps = self.rms_norm, self.apply_rope, self.eps
        H, H_kv, D = self.H, self.H_kv, self.D
        shape = input_ids.shape
        cos, sin = self.cos[positions], self.sin[positions]
        x = F.embedding(input_ids, self.embed)
        for index, scale, norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gate_up, w_down in self.layers:
            qkv = linear(rms_norm(x, norm1, eps), w_qkv, b_qkv).view(*shape, H + 2 * H_kv, D)
            qk = apply_rope(qkv[..., :H + H_kv, :], cos, sin)
            out = attention.attend(index, qk[..., :H, :], qk[..., H:, :], qkv[..., H + H_kv:, :], scale)
            x = x + linear(out.reshape(*shape, H * D), w_o, b_o)
            gate, up = linear(rms_norm(x, norm2, eps), w_gate_up, None).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, w_down, None)
        if logits_indices is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_indices)
        return linear(rms_norm(x, self.norm, eps), self.head, None)


class DraftForward(LeanForward):
    """:class:`LeanForward` tuned for a draft, whose guesses only need to be good, not bit-exact: the
    target verifies every one of them, so a different rounding changes at most which guesses are made.

    A draft's matmuls are so small that how they are called decides their cost: on 2-D activations
    against weights stored transposed (``[in, out]``, ``torch.mm`` / ``addmm``) they take about half
    the time of ``F.linear`` on the checkpoint's ``[out, in]`` layout (MKL at one row: 2.4 against
    4.6 µs per projection, 16 against 32 µs for the LM head). Each RMSNorm's weight (and its √E) is
    folded into the projection after it, leaving ``x / ‖x‖`` — one norm and one division instead of
    the ~8 µs composite ``F.rms_norm``. RoPE rotates the halves with one ``flip`` and two products
    against precomputed ``[cos, cos]`` / ``[−sin, sin]`` rows (the same values as
    :func:`~miniinfer.rope.apply_rope`: ``a − b·s`` = ``a + b·(−s)`` exactly).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        E = self.embed.shape[1]
        root = E ** 0.5

        def folded(weight, norm=None):  # [out, in] (· norm over in) -> [in, out], contiguous
            weight = weight.detach().float()
            if norm is not None:
                weight = weight * (norm.detach().float() * root)[None, :]
            return weight.t().contiguous()

        layers = []
        for index, scale, norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gate_up, w_down in self.layers:
            layers.append((index, scale, folded(w_qkv, norm1), None if b_qkv is None else b_qkv.detach(),
                           folded(w_o), None if b_o is None else b_o.detach(), folded(w_gate_up, norm2),
                           folded(w_down)))
        self.layers = layers
        self.head_t = folded(self.head, self.norm)
        # [P, 2, D]: [cos, cos] and [−sin, sin] of each position, fetched with one index_select per forward
        self.rope_table = torch.stack([torch.cat([self.cos, self.cos], dim=-1), torch.cat([-self.sin, self.sin], dim=-1)],
                                      dim=1)

    @staticmethod
    def _project(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attention,
                 logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        F, project, vector_norm = torch.nn.functional, self._project, torch.linalg.vector_norm
        H, H_kv, D = self.H, self.H_kv, self.D
        B, L = input_ids.shape
        N, R = B * L, H + H_kv
        rope = self.rope_table.index_select(0, positions.reshape(-1))                 # [N, 2, D]
        cos, sin = rope[:, :1], rope[:, 1:]                                           # [N, 1, D] each
        x = F.embedding(input_ids.reshape(-1), self.embed)                            # [N, E]
        for index, scale, w_qkv, b_qkv, w_o, b_o, w_gate_up, w_down in self.layers:
            h = x / vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
            qkv = project(h, w_qkv, b_qkv).view(N, H + 2 * H_kv, D)
            qk = qkv[:, :R]
            qk = qk * cos + qk.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2) * sin
            out = attention.attend(index, qk[:, :H].view(B, L, H, D), qk[:, H:].view(B, L, H_kv, D),
                                   qkv[:, R:].view(B, L, H_kv, D), scale)
            x = x + project(out.reshape(N, H * D), w_o, b_o)
            h = x / vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
            gate, up = torch.mm(h, w_gate_up).chunk(2, dim=-1)
            x = x + torch.mm(F.silu(gate) * up, w_down)
        if logits_indices is not None:
            x = x.index_select(0, logits_indices)
        x = x / vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
        return torch.mm(x, self.head_t)


class DraftKVCache:
    """The draft model's own KV cache: one contiguous row of ``max_len`` positions per sequence.

    A draft is tiny, so the engine's paging machinery (block tables, slot mappings, a scheduler round
    trip per guessed token) costs far more than its forward; here a sequence owns a row, position p
    of its keys sits at ``[row, :, p]``, and rolling back is lowering its computed count. Per layer:
    ``k[layer], v[layer]: [rows, H_kv, length + 1, D]`` (the last position, :attr:`spare`, takes the padding
    rows' writes). Rows are allocated on first use and grow by doubling; so do the positions (``length``,
    up to ``max_len``: a new engine's first step does not zero-fill rows of ``max_len`` positions that
    its sequences never reach).
    """

    def __init__(self, config, max_len: int, device, dtype, initial_length: int = 256):
        self.max_len = max_len
        self.length = min(max_len, initial_length)
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.device, self.dtype = device, dtype
        self.k: dict[int, torch.Tensor] = {}   # layer index -> keys (a self-draft uses some of the target's indices)
        self.v: dict[int, torch.Tensor] = {}
        self.capacity = 0
        self.free_rows: list[int] = []
        self._positions: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        """0, 1, …, ``length`` (int64; sliced for position and key indices, not rebuilt every forward)."""
        if self._positions is None or self._positions.numel() < self.length + 1:
            self._positions = torch.arange(self.length + 1, device=self.device)
        return self._positions

    @property
    def spare(self) -> int:
        """The position padding rows write to (past every real one)."""
        return self.length

    def _empty(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.num_kv_heads, self.length + 1, self.head_dim, dtype=self.dtype,
                           device=self.device)

    def reserve(self, num_positions: int) -> None:
        """Make room for positions 0 … ``num_positions`` − 1 in every row (doubling, up to ``max_len``)."""
        if num_positions <= self.length:
            return
        old = self.length
        self.length = min(self.max_len, max(2 * old, num_positions))
        for pool in (self.k, self.v):
            for layer, cache in pool.items():
                grown = self._empty(cache.shape[0])
                grown[:, :, :old] = cache[:, :, :old]
                pool[layer] = grown

    def allocate_row(self) -> int:
        if not self.free_rows:
            grown = max(4, 2 * self.capacity)
            for pool in (self.k, self.v):
                for layer, cache in pool.items():
                    pool[layer] = torch.cat([cache, self._empty(grown - self.capacity)])
            self.free_rows = list(range(grown - 1, self.capacity - 1, -1))
            self.capacity = grown
        return self.free_rows.pop()

    def free_row(self, row: int) -> None:
        self.free_rows.append(row)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.k:
            self.k[index], self.v[index] = self._empty(self.capacity), self._empty(self.capacity)
        return self.k[index], self.v[index]


class ContiguousKVContext:
    """The attention context of one draft forward over a padded batch ``[B, L]``: sequence b's new
    tokens sit at positions ``starts[b] …`` (``lengths[b]`` of them; the rest of its L are padding).
    ``attend`` stores the new K/V in the sequences' rows, then attends each query to its row's keys up
    to its own position (:class:`miniinfer.attention.AttentionContext`'s contract)."""

    def __init__(self, cache: DraftKVCache, rows: list[int], starts: list[int], lengths: list[int]):
        self.cache = cache
        B, L = len(rows), max(lengths)
        self.single = B == 1  # one sequence: slices of its row, no index tensors
        self.row, self.start, self.L = rows[0], starts[0], L
        self.S = max(s + n for s, n in zip(starts, lengths))   # keys the longest sequence attends to
        cache.reserve(self.S)
        self.mask = None
        if self.single:
            if L > 1:  # query i (position start + i) sees keys 0 … start + i
                self.mask = torch.ones(L, self.S, dtype=torch.bool, device=cache.device).tril_(self.S - L)
        else:
            device = cache.device
            # Rows r0, r0 + 1, … in batch order (the usual case: rows are handed out in order): the cached
            # keys of the batch are a slice of the pool, no gather.
            self.first_row = rows[0] if rows == list(range(rows[0], rows[0] + B)) else None
            index = torch.tensor([rows, starts, lengths], device=device)                          # one copy in
            self.rows = index[0]
            key_positions = cache.positions[:self.S]
            if L == 1:  # one new token each (a guess): written at its position, seeing keys 0 … start
                starts_t = index[1]
                self.write_rows, self.write_positions = self.rows[:, None], starts_t[:, None]
                hidden = key_positions[None, None, :] > starts_t[:, None, None]                    # [B, 1, S]
            else:
                offsets = cache.positions[:L]
                positions = index[1][:, None] + offsets                                            # [B, L]
                padding = offsets[None, :] >= index[2][:, None]
                self.write_rows = self.rows[:, None].expand(B, L)
                self.write_positions = positions.masked_fill(padding, cache.spare)  # padding: the spare slot
                hidden = key_positions[None, None, :] > positions[:, :, None]                      # [B, L, S]
            # additive (0 / −inf), [B, 1, L, S]; repeated for the G query heads of a KV head at the first layer
            self.mask = torch.where(hidden, float("-inf"), 0.0).to(cache.dtype).unsqueeze(1)
            self.grouped_mask = None

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, L, H, D]; k, v [B, L, H_kv, D] -> [B, L, H, D]."""
        k_cache, v_cache = self.cache.layer(layer_index)
        gqa = q.shape[-2] != k.shape[-2]
        if self.single:
            r, s, e = self.row, self.start, self.start + self.L
            k_cache[r, :, s:e] = k[0].transpose(0, 1)
            v_cache[r, :, s:e] = v[0].transpose(0, 1)
            # 4-D inputs: torch's CPU flash kernel (3-D ones fall back to the unfused "math" path).
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k_cache[r:r + 1, :, :self.S], v_cache[r:r + 1, :, :self.S], attn_mask=self.mask,
                scale=scale, enable_gqa=gqa)                                           # [1, H, L, D]
            return out.transpose(1, 2)
        k_cache[self.write_rows, :, self.write_positions] = k
        v_cache[self.write_rows, :, self.write_positions] = v
        if self.first_row is not None:
            keys = k_cache[self.first_row:self.first_row + len(self.rows), :, :self.S]          # [B, H_kv, S, D]
            values = v_cache[self.first_row:self.first_row + len(self.rows), :, :self.S]
        else:  # index_select: the same rows as k_cache[self.rows, :, :S], several times faster on a CPU
            keys = k_cache[:, :, :self.S].index_select(0, self.rows)
            values = v_cache[:, :, :self.S].index_select(0, self.rows)
        # The G query heads of a KV head folded into the queries (row g·L + l: query l of head g): one small
        # batched matmul per product, an additive mask built once for all layers — at these sizes several
        # times cheaper than SDPA with a boolean mask and enable_gqa.
        B, L, H, D = q.shape
        H_kv = k.shape[-2]
        G = H // H_kv
        if self.grouped_mask is None:
            self.grouped_mask = self.mask.repeat(1, 1, G, 1) if L > 1 else self.mask                 # [B, 1, G·L, S]
        qg = q.reshape(B, H_kv, G, D) if L == 1 else q.permute(0, 2, 1, 3).reshape(B, H_kv, G * L, D)
        probs = torch.matmul(qg, keys.transpose(-1, -2)).mul_(scale).add_(self.grouped_mask).softmax(dim=-1)
        out = torch.matmul(probs, values)                                                        # [B, H_kv, G·L, D]
        if L == 1:
            return out.view(B, 1, H, D)
        return out.view(B, H, L, D).transpose(1, 2)


@dataclass
class _DraftState:
    """What the draft knows of one target sequence: its tokens, how many have K/V in its cache row."""

    target: Sequence
    row: int
    token_ids: list[int]
    num_computed: int = 0
    synced: int = 0   # how many of token_ids were the target's at the latest sync (the rest: guesses)


class DraftModelProposer(Proposer):
    """A small model guessing autoregressively, batched over sequences, with its own KV cache.

    For each target sequence it keeps a :class:`_DraftState` and a row of a :class:`DraftKVCache`. At
    every call the state is synchronised with the target's tokens — its computed count cut back to
    the common prefix (the K/V of rejected guesses are simply overwritten later) — then each sequence
    catches up on its new tokens (usually one or two: the target's token after the accepted guesses)
    and guesses one token at a time. A guess is one forward of the draft over the batch: no scheduler,
    no block tables — on a CPU the engine's per-step machinery costs more than a tiny draft's forward.
    """

    name = "draft"


    def __init__(self, model: nn.Module, max_model_len: int = 1024, name: str = "draft"):
        self.name = name
        self.model = model
        parameter = next(model.parameters())
        self.device = parameter.device
        self.cache = DraftKVCache(model.config, max_model_len, parameter.device, parameter.dtype)
        # The same forward without the module tree, where the model allows it (see LeanForward); on a CPU
        # in float32 with transposed weights and folded norms (DraftForward).
        self.forward = model
        if LeanForward.supports(model):
            fast = parameter.device.type == "cpu" and parameter.dtype == torch.float32
            self.forward = DraftForward(model) if fast else LeanForward(model)
        self.states: dict[int, _DraftState] = {}  # target seq_id -> state
        self.num_new_sequences = 0  # sequences the latest propose() met for the first time (prompt catch-up)
        self.max_catch_up = 0

    @property
    def num_tracked(self) -> int:
        """Sequences the draft holds a cache row for (0 once every request finished)."""
        return len(self.states)

    def release(self, seq: Sequence) -> None:
        state = self.states.pop(seq.seq_id, None)
        if state is not None:
            self.cache.free_row(state.row)

    def _sync(self, seq: Sequence) -> _DraftState:
        state = self.states.get(seq.seq_id)
        if state is None:
            self.num_new_sequences += 1
            state = _DraftState(seq, self.cache.allocate_row(), list(seq.token_ids), synced=len(seq.token_ids))
            self.states[seq.seq_id] = state
            return state
        old, new = state.token_ids, seq.token_ids
        common = min(len(old), len(new), state.num_computed)
        synced = min(state.synced, common)   # old[:synced] were the target's own tokens at the last sync
        while common > synced and old[common - 1] != new[common - 1]:
            common -= 1
        # A target's tokens only ever grow: old[:synced] still match unless the sequence was replaced (a
        # preempted, recomputed one is the same list) — then start over.
        if old[synced:common] != new[synced:common] or (synced and old[synced - 1] != new[synced - 1]):
            common = 0
        # At least the newest token is computed again: its logits give the first guess.
        state.num_computed = min(common, len(new) - 1)
        del old[common:]
        old.extend(new[common:])
        state.synced = len(new)
        return state

    def _collect_finished(self) -> None:
        for state in list(self.states.values()):
            if state.target.is_finished:
                self.release(state.target)

    def _forward(self, states: list[_DraftState]) -> torch.Tensor:
        """One draft forward computing every uncomputed token of ``states`` (a padded batch) -> logits
        [B, V] at each sequence's last token."""
        lengths = [len(s.token_ids) - s.num_computed for s in states]
        L = max(lengths)
        ids, positions = [], []
        for state, n in zip(states, lengths):
            start = state.num_computed
            ids.extend(state.token_ids[start:] + [0] * (L - n))
            positions.extend(range(start, start + L))
        B = len(states)
        shape = (B, L)
        context = ContiguousKVContext(self.cache, [s.row for s in states], [s.num_computed for s in states], lengths)
        input_ids = torch.tensor(ids, device=self.device).view(shape)
        positions_t = torch.tensor(positions, device=self.device).clamp_(max=self.cache.max_len - 1).view(shape)
        logits_indices = None
        if L > 1:
            logits_indices = torch.tensor([b * L + n - 1 for b, n in enumerate(lengths)], device=self.device)
        logits = self.forward(input_ids, positions_t, attention=context, logits_indices=logits_indices)
        for state in states:
            state.num_computed = len(state.token_ids)
        return logits.reshape(B, -1).float()

    @staticmethod
    def _padded_groups(active: list[int], states: dict[int, _DraftState]) -> list[list[int]]:
        """Split one round's sequences into padded batches: all together, unless padding every row to
        the longest catch-up (a whole prompt the draft has not seen, beside one-token rows) would more
        than double the work — then the longest runs on its own, and so on."""
        def uncomputed(b):
            return len(states[b].token_ids) - states[b].num_computed

        pending = sorted(active, key=uncomputed)
        groups = []
        while len(pending) > 1 and len(pending) * uncomputed(pending[-1]) > 2 * sum(map(uncomputed, pending)) + 8:
            groups.append([pending.pop()])
        return groups + [pending]

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        self._collect_finished()
        self.num_new_sequences = 0
        proposals = [Proposal([]) for _ in seqs]
        want = {b: k for b, k in enumerate(num_tokens) if k > 0}
        states = {b: self._sync(seqs[b]) for b in want}
        start = {b: len(states[b].token_ids) for b in want}
        # Tokens the draft had not seen yet, at most over the sequences: 1–3 between speculative steps,
        # more after plain steps (the engine did not speculate) — a one-off cost of switching back.
        self.max_catch_up = max((len(state.token_ids) - state.num_computed for state in states.values()), default=0)
        probs: dict[int, list[torch.Tensor]] = {b: [] for b in want}
        while want:
            for group in self._padded_groups(list(want), states):
                logits = self._forward([states[b] for b in group])
                tokens, row_probs = self._choose(logits, [seqs[b] for b in group],
                                                 [len(states[b].token_ids) - start[b] for b in group])
                for i, b in enumerate(group):
                    states[b].token_ids.append(tokens[i])
                    proposals[b].tokens.append(tokens[i])
                    if row_probs is not None:
                        probs[b].append(row_probs[i])
                    if len(proposals[b].tokens) >= want[b]:
                        del want[b]
        for b, rows_of_b in probs.items():
            if rows_of_b and not seqs[b].params.greedy:
                proposals[b].probs = torch.stack(rows_of_b)
        return proposals

    def _choose(self, logits: torch.Tensor, targets: list[Sequence], offsets: list[int]):
        """Greedy rows take the argmax (their proposal is one-hot); sampled rows draw from the draft's
        distribution under the request's temperature / top-k / top-p / min-p, from their own stream."""
        if all(t.params.greedy for t in targets):
            return logits.max(dim=-1).indices.tolist(), None  # max: ~3x faster than argmax on a CPU
        steps = [t.num_output_tokens + o for t, o in zip(targets, offsets)]
        batch = SamplingBatch.build([SamplingRow(t.params, t.stream_seed, s, (), ()) for t, s in zip(targets, steps)],
                                    logits.shape[-1], logits.device)
        p = batch_probabilities(logits, batch)
        seeds = torch.tensor([_signed64(derive_seed(t.stream_seed, DRAFT_STREAM)) for t in targets],
                             device=logits.device)
        u = uniform_from_seed(seeds, torch.tensor(steps, device=logits.device))
        from miniinfer.speculative.acceptance import draw_from

        return draw_from(torch.nan_to_num(p, nan=1.0), u).tolist(), p


class TreeDraftProposer(Proposer):
    """Token trees from a draft model, ``num_tokens`` guesses per sequence, grown best-first by the
    draft's path probabilities with up to ``width`` children per node
    (:func:`~miniinfer.speculative.tree.draft_tree_best_first`): a chain where the draft is sure,
    branches where it hesitates. Each tree comes from plain forwards of the draft over the whole
    sequence (no KV cache: simple, and fine for a tiny draft over short contexts; it makes trees slower
    in wall time than they need to be)."""

    name = "draft-tree"

    def __init__(self, model: nn.Module, width: int):
        if width < 2:
            raise ValueError(f"a token tree needs a width of at least 2, got {width}")
        from miniinfer.speculative.tree import AcceptanceCalibration

        self.model, self.width = model, width
        # What verification accepted, per (rank, draft probability): the trees are grown by these estimates.
        self.calibration = AcceptanceCalibration()

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        from miniinfer.speculative.tree import draft_tree_best_first

        proposals = []
        for seq, k in zip(seqs, num_tokens):
            tree = draft_tree_best_first(self.model, seq.token_ids, max(1, k), self.width, self.calibration)
            proposals.append(Proposal(tree.tokens[1:], parents=tree.parents, confidence=tree.confidence))
        return proposals

    def observe_tree(self, tree, path: list[int]) -> None:
        self.calibration.observe_tree(tree, path)
