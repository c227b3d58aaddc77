"""The model runner: owns the KV pool and the input buffers, runs a step's forward and its sampler.

``ModelRunner.run(plan) -> SampledTokens`` does everything on the device for one
:class:`~miniinfer.engine.scheduler.StepPlan`:

1. **Pack** the step into a flat batch of ``T`` tokens with no padding (:func:`pack_batch`, chapter
   06's exercise): each token's id, position (for RoPE) and KV slot; each sequence's block table, key
   count and query range; the rows whose logits are sampled (a prefill chunk that stops mid-prompt
   has none).
2. **Copy** it to the device in one transfer: every integer of the step lives in one pinned host
   buffer with a device twin, both allocated once; the tensors the model sees are views of the twin.
   The eager path and the CUDA-graph path share the buffer, so a graph replays with the data the
   eager path would have used.
3. **Forward**: a decode-only step that fits a captured batch-size bucket replays its CUDA graph
   (captured at start-up, :mod:`miniinfer.engine.cuda_graphs`); anything else runs eagerly — on a CPU
   in float32 through the model's forward on prepacked oneDNN weights where it applies and, by default
   (``"auto"``), measures faster than the model's own forward on this CPU
   (:mod:`miniinfer.engine.packed_forward`, ``EngineConfig.cpu_packed_weights``).
4. **Sample** every row in one batched pass (:mod:`miniinfer.sampler`), and bring the tokens to the
   host with one copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from miniinfer.engine.attention_backends import AttentionBackend
from miniinfer.engine.attention_context import PagedAttentionMetadata, PagedKVContext
from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.scheduler import SampledTokens, StepPlan
from miniinfer.engine.sequence import Sequence
from miniinfer.kv_cache import kv_bytes_per_token


class StepEntry(NamedTuple):
    """One sequence of a step, as the model runner ran it (for inspection: chapter 06 draws from it)."""

    request_id: str
    index: int               # which of the request's n completions
    num_computed: int        # tokens with K/V in the cache before this step
    num_new: int             # tokens computed in this step
    num_prompt_tokens: int

    @property
    def num_prefill(self) -> int:
        """How many of this step's tokens are prompt tokens (the rest are decode tokens)."""
        return max(0, min(self.num_new, self.num_prompt_tokens - self.num_computed))


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers: keys and values, P tokens, H_kv heads of D numbers."""
    return block_size * kv_bytes_per_token(config, dtype)


def pack_batch(token_ids: list[list[int]], num_computed: list[int], num_new: list[int]
               ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Pack a step's sequences into one flat batch of T tokens, without padding.

    For each of the B sequences: all its token ids so far, how many already have K/V in the cache
    (``num_computed``) and how many this step computes (``num_new``: 1 when decoding, up to the whole
    rest of the prompt when prefilling). Returns, as lists of ints:

    * ``input_ids`` [T] — the new tokens, sequence after sequence;
    * ``positions`` [T] — each token's position in its own sequence;
    * ``cu_seqlens_q`` [B + 1] — sequence b's new tokens are rows ``cu[b] … cu[b+1]−1``;
    * ``seq_lens`` [B] — keys per sequence after this step (cached + new);
    * ``logits_indices`` [N] — the row of the last new token of each sequence that has then computed
      all its tokens (it samples the next one); a prefill chunk that stops mid-prompt has none.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    cu_seqlens_q = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    for tokens, start, count in zip(token_ids, num_computed, num_new):
        end = start + count
        input_ids.extend(tokens[start:end])
        positions.extend(range(start, end))
        cu_seqlens_q.append(cu_seqlens_q[-1] + count)
        seq_lens.append(end)
        if end == len(tokens):  # everything computed: this step's last logits give the next token
            logits_indices.append(cu_seqlens_q[-1] - 1)
    return input_ids, positions, cu_seqlens_q, seq_lens, logits_indices


@dataclass
class StepLayout:
    """Where each input of a step lives in the shared int32 buffer (offsets in elements).

    ``[input_ids T | positions T | slot_mapping T | seq_lens B | cu_seqlens_q B+1 | logits_indices N |
    block_tables B × width]``. A CUDA graph for batch bucket ``S`` is captured with the layout
    ``T = B = N = S``, ``width = M``, so filling that layout and replaying is all a decode step does.
    """

    num_tokens: int
    num_seqs: int
    num_logits: int
    width: int

    @property
    def offsets(self) -> tuple[int, ...]:
        T, B, N = self.num_tokens, self.num_seqs, self.num_logits
        starts = [0, T, 2 * T, 3 * T, 3 * T + B, 3 * T + 2 * B + 1, 3 * T + 2 * B + 1 + N]
        return tuple(starts)

    @property
    def size(self) -> int:
        return self.offsets[-1] + self.num_seqs * self.width


class StepInputs(NamedTuple):
    """Device views of one step's inputs (all int32; see :class:`StepLayout`)."""

    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    logits_indices: torch.Tensor  # [N]
    metadata: PagedAttentionMetadata


class InputBuffers:
    """One pinned host buffer and its device twin, holding every integer input of a step.

    On a CPU the two are the same tensor: the model reads what the host wrote, with no copy.
    """

    def __init__(self, capacity: int, device: torch.device):
        self.device = device
        pinned = device.type == "cuda"
        self.host = torch.zeros(capacity, dtype=torch.int32, pin_memory=pinned)
        self.host_np = self.host.numpy()
        self.device_buffer = self.host if device.type == "cpu" else torch.zeros(capacity, dtype=torch.int32,
                                                                                 device=device)

    def views(self, layout: StepLayout, max_seq_len: int, decode_only: bool, max_q_len: int,
              has_padding: bool = False) -> StepInputs:
        o = layout.offsets
        buf = self.device_buffer
        B = layout.num_seqs
        metadata = PagedAttentionMetadata(
            slot_mapping=buf[o[2]:o[3]], block_tables=buf[o[6]:o[6] + B * layout.width].view(B, layout.width),
            seq_lens=buf[o[3]:o[4]], cu_seqlens_q=buf[o[4]:o[5]], decode_only=decode_only,
            max_seq_len=max_seq_len, max_q_len=max_q_len, has_padding=has_padding)
        return StepInputs(buf[o[0]:o[1]], buf[o[1]:o[2]], buf[o[5]:o[6]], metadata)

    def upload(self, size: int) -> None:
        """The step's one host→device copy (asynchronous: the host buffer is pinned)."""
        if self.device_buffer is not self.host:
            self.device_buffer[:size].copy_(self.host[:size], non_blocking=True)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, backend: AttentionBackend,
                 hooks: EngineHooks | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int = 2048, cuda_graph_max_batch: int = 0, eos_token_ids: tuple[int, ...] = (),
                 cpu_packed_weights: bool | str = False):
        self.model = model
        hooks = hooks or EngineHooks()
        self._pack_batch = hooks.pack_batch or pack_batch            # resolved once
        self._default_pack = hooks.pack_batch is None
        self._decode_hook = hooks.paged_decode_attention
        self._default_slots = hooks.slot_mapping is None
        config = model.config
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.block_size = block_size
        self.backend = backend
        self.vocab_size = config.vocab_size
        self.eos_token_ids = tuple(eos_token_ids)  # banned while a request is below its min_tokens
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.max_model_len = max_model_len
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # Zero-filled: slots past a sequence's length are never read by the kernels, but zeros keep a
        # buggy read from turning into NaN that spreads silently.
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        eager_capacity = StepLayout(max_num_batched_tokens, max_num_seqs, max_num_seqs, self.max_blocks_per_seq).size
        graph_capacity = StepLayout(max_num_seqs, max_num_seqs, max_num_seqs, self.max_blocks_per_seq).size
        self.buffers = InputBuffers(max(eager_capacity, graph_capacity), self.device)
        self.last_step: list[StepEntry] = []  # what the latest step ran, one entry per sequence
        self.speculator = None  # a miniinfer.speculative.SpeculativeDecoder, set by the engine
        # CPU float32: eager steps run the model's forward on prepacked oneDNN weights (same math, faster
        # small-M matmuls on some CPUs), for the model it was built for; None: the model's own forward.
        # "auto": whichever of the two measures faster here (timed once per model shape in the process);
        # the decision and both timings stay in packed_weights_choice (None where nothing was measured).
        self.packed_forward = None
        self.packed_weights_choice: dict | None = None
        if cpu_packed_weights and self.device.type == "cpu":
            from miniinfer.engine.packed_forward import choose_packed_forward, packed_forward_for

            if cpu_packed_weights == "auto":
                self.packed_forward, self.packed_weights_choice = choose_packed_forward(model)
            else:
                self.packed_forward = packed_forward_for(model)
        self._packed_model = model
        # The course's sampler plug-in (Components.probabilities) runs per row, in Python.
        from miniinfer.components import Components

        components = getattr(model, "components", None)
        default_probabilities = Components().probabilities
        self.probabilities_fn = None
        if components is not None and components.probabilities is not default_probabilities:
            self.probabilities_fn = components.probabilities
        self.decode_graphs = None
        if cuda_graph_max_batch > 0 and self.device.type == "cuda" and self.graphs_allowed:
            from miniinfer.engine.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self, min(cuda_graph_max_batch, max_num_seqs))

    @property
    def graphs_allowed(self) -> bool:
        """CUDA graphs record the forward: fine unless user Python must run inside it (the decode hook, a
        backend that reads the host) — host-side hooks (packing, planning, slots) run outside graphs."""
        return self.backend.graph_safe and self._decode_hook is None

    def capture_graphs(self, progress: bool = False) -> None:
        """Record the decode graphs of every batch bucket now (the engine calls this at start-up)."""
        if self.decode_graphs is not None:
            self.decode_graphs.capture_all(progress=progress)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer) before a sequence writes into its copy."""
        if not copies:
            return
        mirror = getattr(self.model, "copy_blocks", None)  # a parallel LLM: its workers copy in their own pools
        if mirror is not None:
            mirror(copies)
        source = torch.tensor([s for s, _ in copies], device=self.device)
        destination = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache[destination] = cache[source]

    @property
    def forward(self):
        """What an eager step calls: the packed forward where it applies (and ``self.model`` was not
        replaced since, e.g. by a wrapper that times it), else ``self.model``."""
        if self.packed_forward is not None and self.model is self._packed_model:
            return self.packed_forward
        return self.model

    def context(self, metadata: PagedAttentionMetadata) -> PagedKVContext:
        return PagedKVContext(self.k_caches, self.v_caches, metadata, self.backend, decode_hook=self._decode_hook)

    # -- inputs ----------------------------------------------------------------------------------

    def prepare(self, plan: StepPlan, block_manager: BlockManager, graph_bucket: int | None = None) -> StepInputs:
        """Pack the plan into the host buffer (padded to ``graph_bucket`` rows for a graph), upload it."""
        seqs = plan.seqs
        if self._default_pack and plan.is_decode_only:
            # What pack_batch returns for a decode step, without its general loop: each sequence's newest
            # token at its position, one row each, every row sampled.
            positions = [seq.num_computed_tokens for seq in seqs]
            input_ids = [seq.token_ids[-1] for seq in seqs]
            seq_lens = [position + 1 for position in positions]
            cu_seqlens_q, logits_indices = list(range(len(seqs) + 1)), list(range(len(seqs)))
        else:
            token_ids = [seq.token_ids for seq in seqs]
            if plan.draft_tokens is not None:  # a speculative verify: each sequence's guesses follow its tokens
                token_ids = [tokens + guesses if guesses else tokens
                             for tokens, guesses in zip(token_ids, plan.draft_tokens)]
            packed = self._pack_batch(token_ids, [seq.num_computed_tokens for seq in seqs],
                                      list(plan.num_new_tokens))
            # Lists of ints (the reference); a hook may also return 1-D tensors.
            input_ids, positions, cu_seqlens_q, seq_lens, logits_indices = (
                values.tolist() if isinstance(values, torch.Tensor) else list(values) for values in packed)
        slots: list[int] = []
        P = self.block_size
        for seq, num_new in zip(seqs, plan.num_new_tokens):
            position = seq.num_computed_tokens
            if num_new == 1 and self._default_slots:  # a decode: its one slot, inline
                slots.append(seq.block_table[position // P] * P + position % P)
            else:
                slots.extend(block_manager.slots(seq, position, position + num_new))
        num_logits = len(plan.logits_seqs)
        if (len(input_ids) != len(slots) or len(positions) != len(slots) or len(cu_seqlens_q) != len(seqs) + 1
                or len(seq_lens) != len(seqs) or len(logits_indices) != num_logits):
            raise ValueError(f"pack_batch returned {len(input_ids)} tokens, {len(positions)} positions, "
                             f"{len(cu_seqlens_q)} cu_seqlens_q, {len(seq_lens)} seq_lens and {len(logits_indices)} "
                             f"logits_indices for {len(seqs)} sequences with {len(slots)} new tokens, "
                             f"{num_logits} of which sample")
        B, T = len(seqs), len(input_ids)
        if plan.draft_tokens is not None:  # logits at every verified position (see SpeculativeDecoder)
            logits_indices = self.speculator.logits_rows(plan, cu_seqlens_q)
            positions = self.speculator.positions(plan, positions, cu_seqlens_q)  # tree nodes: by depth
        if graph_bucket is not None:
            pad = graph_bucket - B
            # Padding rows: token 0 at position 0, no K/V stored (slot −1), nothing attended (length 0).
            input_ids += [0] * pad
            positions += [0] * pad
            slots += [-1] * pad
            seq_lens += [0] * pad
            cu_seqlens_q += range(T + 1, T + pad + 1)
            logits_indices += range(T, T + pad)
            layout = StepLayout(graph_bucket, graph_bucket, graph_bucket, self.max_blocks_per_seq)
        else:
            width = max(len(seq.block_table) for seq in seqs)
            layout = StepLayout(T, B, len(logits_indices), width)
        host, o = self.buffers.host_np, layout.offsets
        host[o[0]:o[1]] = input_ids
        host[o[1]:o[2]] = positions
        host[o[2]:o[3]] = slots
        host[o[3]:o[4]] = seq_lens
        host[o[4]:o[5]] = cu_seqlens_q
        host[o[5]:o[6]] = logits_indices
        tables = host[o[6]:o[6] + layout.num_seqs * layout.width].reshape(layout.num_seqs, layout.width)
        # Entries past a table's length must still be valid block ids: the gather of the "sdpa" path
        # reads them (and masks the result). The buffer held other inputs before: clear it (one memset).
        tables.fill(0)
        for row, seq in enumerate(seqs):
            tables[row, :len(seq.block_table)] = seq.block_table
        self.buffers.upload(layout.size)
        max_seq_len = layout.width * self.block_size if graph_bucket is not None else max(seq_lens)
        return self.buffers.views(layout, max_seq_len, decode_only=T == B, max_q_len=max(plan.num_new_tokens),
                                  has_padding=graph_bucket is not None and graph_bucket > B)

    # -- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, plan: StepPlan, block_manager: BlockManager) -> SampledTokens:
        """Run one step: the forward over the plan's tokens, then one token per ``plan.samples`` row."""
        self.copy_blocks(plan.copies)
        self.last_step = [StepEntry(seq.request_id, seq.index, seq.num_computed_tokens, num_new, seq.num_prompt_tokens)
                          for seq, num_new in zip(plan.seqs, plan.num_new_tokens)]
        bucket = None
        if self.decode_graphs is not None and plan.is_decode_only:
            bucket = self.decode_graphs.bucket_for(len(plan.seqs))
        inputs = self.prepare(plan, block_manager, graph_bucket=bucket)
        prompt_rows = self._prompt_logprob_rows(plan) if bucket is None else []
        if plan.draft_tokens is not None:  # speculative verify: eager, the acceptance rule instead of the sampler
            logits = self.forward(inputs.input_ids, inputs.positions,
                                  attention=self.speculator.attention_context(self, inputs.metadata),
                                  logits_indices=inputs.logits_indices)
            return self.speculator.verify(logits, plan, self.sample)
        if bucket is not None:
            logits = self.decode_graphs.replay(bucket)[:len(plan.seqs)]
        else:
            indices = inputs.logits_indices
            if prompt_rows:
                extra = torch.tensor([row for _, _, row in prompt_rows], dtype=indices.dtype, device=indices.device)
                indices = torch.cat([indices, extra])
            logits = self.forward(inputs.input_ids, inputs.positions, attention=self.context(inputs.metadata),
                                  logits_indices=indices)
        prompt_logprobs = None
        if prompt_rows:
            logits, prompt_logits = logits[:-len(prompt_rows)], logits[-len(prompt_rows):]
            prompt_logprobs = self._prompt_logprobs(prompt_logits, prompt_rows)
        if not plan.samples:
            return SampledTokens([], prompt_logprobs=prompt_logprobs)
        sampled = self.sample(logits, plan)
        sampled.prompt_logprobs = prompt_logprobs
        return sampled

    @staticmethod
    def _prompt_logprob_rows(plan: StepPlan) -> list[tuple[Sequence, int, int]]:
        """(sequence, prompt position predicted, packed row) for every new token of a sequence asking for
        prompt logprobs whose logits predict another prompt token (the last prompt token's predict the
        first output token: that is the sampling row)."""
        rows, start = [], 0
        for seq, num_new in zip(plan.seqs, plan.num_new_tokens):
            if seq.prompt_logprobs is not None:
                first = seq.num_computed_tokens
                for position in range(first, min(first + num_new, seq.num_prompt_tokens - 1)):
                    rows.append((seq, position + 1, start + position - first))
            start += num_new
        return rows

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, rows) -> dict[int, dict[int, dict[int, float]]]:
        """logits [R, V] of the ``rows`` of :meth:`_prompt_logprob_rows` -> {seq_id: {position: {token id:
        logprob}}}: the actual prompt token's log-probability, plus the sequence's top-N alternatives."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = [seq.prompt_token_ids[position] for seq, position, _ in rows]
        chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
        k = max(seq.params.prompt_logprobs for seq, _, _ in rows)
        top = [([], [])] * len(rows)
        if k > 0:
            values, ids = torch.topk(logprobs, k, dim=-1)
            top = list(zip(ids.tolist(), values.tolist()))
        result: dict[int, dict[int, dict[int, float]]] = {}
        for (seq, position, _), target, logprob, (top_ids, top_values) in zip(rows, targets, chosen, top):
            entry = {target: logprob}
            wanted = seq.params.prompt_logprobs
            for token_id, value in zip(top_ids[:wanted], top_values[:wanted]):
                entry.setdefault(token_id, value)
            result.setdefault(seq.seq_id, {})[position] = entry
        return result

    def sample(self, logits: torch.Tensor, plan: StepPlan) -> SampledTokens:
        """logits [N, V] (one row per sequence in ``plan.logits_seqs``) → one token per sample row."""
        logits_seqs = plan.logits_seqs
        if len(plan.samples) != len(logits_seqs):  # forks draw from their parent's row
            row_of = {seq.seq_id: row for row, seq in enumerate(logits_seqs)}
            rows = torch.tensor([row_of[sample.seq.seq_id] for sample in plan.samples], device=logits.device)
            logits = logits.index_select(0, rows)
        logits = logits.float()
        if self.probabilities_fn is not None:
            return self._sample_per_row(logits, plan)
        if all(_plain_greedy(sample.seq) for sample in plan.samples):
            # The common greedy batch: an argmax, and -1 for rows that are not finite (NaN, ±inf).
            values, tokens = logits.max(dim=-1)
            return SampledTokens(tokens.masked_fill_(~torch.isfinite(values), -1).tolist())
        from miniinfer.sampler import SamplingBatch, SamplingRow, sample_batch

        rows = []
        for sample in plan.samples:
            seq, params = sample.seq, sample.seq.params
            step = 0 if sample.is_fork else seq.num_output_tokens
            penalised = params.uses_penalties
            suppressed = ()
            if step < params.min_tokens:
                suppressed = tuple(params.stop_token_ids or ()) + (() if params.ignore_eos else self.eos_token_ids)
            rows.append(SamplingRow(params, sample.stream_seed, step,
                                    seq.prompt_token_ids if penalised else (),
                                    seq.token_ids[seq.num_prompt_tokens:] if penalised and not sample.is_fork else (),
                                    suppressed))
        output = sample_batch(logits, SamplingBatch.build(rows, logits.shape[-1], logits.device))
        token_ids = output.token_ids.tolist()  # the step's one device→host synchronisation
        logprobs = output.logprobs.tolist() if output.logprobs is not None else None
        top = None
        if output.top_logprobs is not None:
            top = [list(zip(ids, values)) for ids, values in zip(output.top_logprob_ids.tolist(),
                                                                 output.top_logprobs.tolist())]
        return SampledTokens(token_ids, logprobs, top)

    def _sample_per_row(self, logits: torch.Tensor, plan: StepPlan) -> SampledTokens:
        """The course plug-in path: the user's ``probabilities(logits [V], params) -> probs [V]`` one row at a
        time, then the batched sampler's draw (the same random stream per sequence and step), so a seeded
        request gives the same tokens with the plug-in as without it."""
        from miniinfer.sampler import _inverse_cdf, _signed64, uniform_from_seed

        rows, failed = [], []
        for row, sample_row in enumerate(plan.samples):
            params = sample_row.seq.params
            probs = torch.zeros_like(logits[row])
            if params.greedy:
                probs[logits[row].argmax()] = 1.0
            else:
                try:
                    probs = self.probabilities_fn(logits[row], params).float().reshape(probs.shape)
                    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                        raise ValueError("probabilities are not a distribution (NaN, negative or zero sum)")
                except Exception:  # noqa: BLE001 - this row fails (token -1), the others are drawn
                    failed.append(row)
                    probs = torch.ones_like(logits[row])
            rows.append(probs)
        probs = torch.stack(rows)
        seeds = torch.tensor([_signed64(s.stream_seed) for s in plan.samples], device=logits.device)
        steps = torch.tensor([0 if s.is_fork else s.seq.num_output_tokens for s in plan.samples], device=logits.device)
        tokens = _inverse_cdf(probs, uniform_from_seed(seeds, steps)).clamp_(max=logits.shape[-1] - 1).tolist()
        for row in failed:
            tokens[row] = -1
        return SampledTokens(tokens)


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing that changes the logits first (penalties, bias, suppressed stop tokens) and
    no logprobs: the argmax of the raw logits."""
    params = seq.params
    return (params.greedy and params.logprobs is None and not params.logit_bias and not params.uses_penalties
            and len(seq.token_ids) - len(seq.prompt_token_ids) >= params.min_tokens)
