"""The engine loop: admit requests, schedule a step, run the model, sample, stream results.

    engine = LLMEngine(model, tokenizer, EngineConfig(...))
    engine.add_request("ROMEO:", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for output in engine.step():      # RequestOutputs of requests that advanced in this step
            ...                           # .outputs[i].new_text / .new_token_ids stream, .finished ends

New requests may be added between steps: they join the running batch at the next step
(**continuous batching**), and finished ones leave it at once, freeing their slots and blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.config import EngineConfig
from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.model_runner import ModelRunner, kv_bytes_per_block
from miniinfer.engine.radix_cache import RadixCache
from miniinfer.engine.scheduler import Scheduler, SchedulerConfig
from miniinfer.engine.sequence import Sequence, SequenceStatus
from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.sampling import SamplingParams, sample


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False


def _child_seed(seed: int, index: int) -> int:
    """Completion ``index`` of a request seeded with ``seed`` draws from its own generator, seeded ``seed + index``."""
    return seed + index


def _has_custom_attention(model: torch.nn.Module) -> bool:
    from miniinfer.components import Components

    components = getattr(model, "components", None)
    return components is not None and components.attention is not Components().attention


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, config: EngineConfig | None = None,
                 hooks: EngineHooks | None = None):
        self.model = model
        self.hooks = hooks = hooks or EngineHooks()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        model_config = model.config
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        if config.max_num_batched_tokens is not None:
            max_batched = config.max_num_batched_tokens
        else:
            max_batched = 8192 if self.device.type == "cuda" else 2048
            if not config.enable_chunked_prefill:
                max_batched = max(max_batched, self.max_model_len)
        self.max_num_batched_tokens = max_batched
        self.num_kv_blocks = config.num_kv_blocks or self._default_num_kv_blocks()
        if self.num_kv_blocks * config.block_size < config.block_size + 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} is too small to hold any request")

        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, hooks=hooks)
        self.radix_cache = RadixCache(self.block_manager, hooks=hooks) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max_batched, config.enable_chunked_prefill),
            self.block_manager, self.radix_cache, hooks=hooks)
        backend = config.attention_backend
        if backend == "auto" and _has_custom_attention(model):
            backend = "components"  # the user's own attention function must be the one that runs
        self.attention_backend = backend
        self.runner = ModelRunner(model, self.num_kv_blocks, config.block_size, backend, hooks=hooks,
                                  cuda_graph_max_batch=config.max_num_seqs if config.enable_cuda_graphs else 0,
                                  max_model_len=self.max_model_len)
        self.requests: dict[str, _Request] = {}
        self._request_ids = itertools.count()
        self.counters = dict(prompt_tokens=0, generation_tokens=0, prefill_tokens_computed=0,
                             prefix_cache_hit_tokens=0, num_steps=0, num_requests_finished=0)

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end a sequence: the tokenizer's (which merges the checkpoint's configs), else config.json's."""
        if self.tokenizer is not None:
            return set(self.tokenizer.eos_token_ids)
        eos = getattr(self.model.config, "eos_token_id", None)
        return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])

    # -- sizing ----------------------------------------------------------------------------------

    def _default_num_kv_blocks(self) -> int:
        config = self.config
        per_block = kv_bytes_per_block(self.model.config, config.block_size, self.dtype)
        blocks_per_seq = math.ceil(self.max_model_len / config.block_size)
        enough_for_all = config.max_num_seqs * blocks_per_seq
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for activations and logits of the largest step, and the utilisation margin.
            reserve = (1 - config.gpu_memory_utilization) * total + 2 * 2**30
            budget = int(free - reserve)
        else:
            budget = int(config.cpu_kv_cache_gib * 2**30)
        num_blocks = min(enough_for_all, budget // per_block)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV pool would hold {max(num_blocks, 0)} blocks of {config.block_size} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len} needs ({blocks_per_seq}); lower max_model_len "
                "or give more memory (gpu_memory_utilization / cpu_kv_cache_gib / num_kv_blocks)")
        return num_blocks

    # -- requests --------------------------------------------------------------------------------

    def validate_prompt(self, prompt: str | list[int], params: SamplingParams | None = None) -> tuple[str | None, list[int]]:
        """Tokenize and check a prompt; raises ValueError before any work is done."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            if not prompt:
                raise ValueError("empty prompt: give at least one token")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            token_ids = [int(t) for t in prompt]
            text = None
            if isinstance(prompt, (list, tuple)) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("a token-id prompt must be a list of ints")
        else:
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens but the context holds {self.max_model_len} "
                             f"(max_model_len), including at least one generated token")
        if not self.config.enable_chunked_prefill and len(token_ids) > self.max_num_batched_tokens:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, more than max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}, and chunked prefill is off")
        needed = min(len(token_ids) + params.max_tokens, self.max_model_len)
        capacity = self.num_kv_blocks * self.config.block_size
        if needed > capacity:
            raise ValueError(f"the request needs up to {needed} tokens of KV cache but the pool holds {capacity} "
                             f"({self.num_kv_blocks} blocks of {self.config.block_size}); raise num_kv_blocks")
        return text, token_ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; it joins the running batch at the next step. Returns its id."""
        params = params or SamplingParams()
        text, token_ids = self.validate_prompt(prompt, params)
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = _Request(request_id, text, token_ids, params)
        first = self._new_sequence(request, 0)
        request.seqs.append(first)
        self.requests[request_id] = request
        self.scheduler.add(first)
        self.counters["prompt_tokens"] += len(token_ids)
        return request_id

    def _new_sequence(self, request: _Request, index: int) -> Sequence:
        generator = None
        if request.params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(_child_seed(request.params.seed, index))
        seq = Sequence(request.request_id, request.prompt_token_ids, request.params, generator, index=index,
                       arrival_step=self.counters["num_steps"])
        if self.tokenizer is not None:
            from miniinfer.tokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        return seq

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(str(request_id), None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return the state of every request that produced tokens in it."""
        if not self.scheduler.has_unfinished():
            return []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("the scheduler could not schedule anything although requests are waiting; "
                               f"free blocks {self.block_manager.num_free_blocks}/{self.num_kv_blocks}")
        # Sequences admitted in this step have computed nothing beyond their cached prefix yet.
        for seq in batch.seqs:
            if seq.num_computed_tokens == seq.num_cached_tokens:
                self.counters["prefix_cache_hit_tokens"] += seq.num_cached_tokens
        logits, sampling_seqs = self.runner.execute(batch, self.block_manager)
        self.counters["num_steps"] += 1
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.counters["prefill_tokens_computed"] += min(num_new, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                self.scheduler.on_prefill_complete(seq)
        if not sampling_seqs:
            return []

        # Parallel sampling: the first time a request's prompt is done, fork n−1 siblings that share
        # its KV blocks and draw their first token from the same logits row.
        rows = list(range(len(sampling_seqs)))
        for row, seq in enumerate(list(sampling_seqs)):
            request = self.requests.get(seq.request_id)
            if request is not None and request.params.n > 1 and not request.forked:
                request.forked = True
                for index in range(1, request.params.n):
                    child = self._new_sequence(request, index)
                    child.num_computed_tokens = seq.num_computed_tokens
                    child.prompt_inserted = True
                    child.status = SequenceStatus.RUNNING
                    self.block_manager.fork(seq, child)
                    self.scheduler.running.append(child)
                    request.seqs.append(child)
                    sampling_seqs.append(child)
                    rows.append(row)
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        components = getattr(self.model, "components", None)
        tokens = sample(logits, [s.params for s in sampling_seqs], [s.generator for s in sampling_seqs],
                        probabilities_fn=getattr(components, "probabilities", None)).tolist()

        touched: dict[str, _Request] = {}
        new_tokens: dict[int, int] = {}  # seq_id -> the token it got in this step
        for seq, token in zip(sampling_seqs, tokens):
            self._append_token(seq, token)
            new_tokens[seq.seq_id] = token
            if seq.request_id in self.requests:
                touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for request in touched.values():
            output = self._request_output(request, new_tokens)
            outputs.append(output)
            if output.finished:
                del self.requests[request.request_id]
                self.counters["num_requests_finished"] += 1
        return outputs

    def _append_token(self, seq: Sequence, token: int) -> None:
        """Add a sampled token, update the text, decide whether the sequence is done."""
        seq.token_ids.append(token)
        self.counters["generation_tokens"] += 1
        params = seq.params
        previous_len = len(seq.text)
        is_eos = not params.ignore_eos and token in self.eos_token_ids
        if seq.detokenizer is not None and not is_eos:
            seq.text += seq.detokenizer.add(token)
        reason = None
        if is_eos:
            reason = "stop"
        elif params.stop and seq.detokenizer is not None:
            stops = [params.stop] if isinstance(params.stop, str) else params.stop
            search_from = max(0, previous_len - max(len(s) for s in stops) + 1)
            hits = [(seq.text.find(s, search_from), s) for s in stops if seq.text.find(s, search_from) >= 0]
            if hits:
                seq.text = seq.text[:min(hits)[0]]
                reason = "stop"
        if reason is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if seq.detokenizer is not None and reason == "length":
                seq.text += seq.detokenizer.flush()
            self.scheduler.finish(seq, reason)
        # The streamed text is derived in _visible_text, which holds back a possible stop-string prefix.

    def _visible_text(self, seq: Sequence) -> str:
        """Text that can be streamed: all of it once finished, else all but a possible stop-string start."""
        if seq.is_finished or not seq.params.stop:
            return seq.text
        stops = [seq.params.stop] if isinstance(seq.params.stop, str) else seq.params.stop
        hold = max(len(s) for s in stops) - 1
        return seq.text[:max(0, len(seq.text) - hold)]

    def _request_output(self, request: _Request, new_tokens: dict[int, int]) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            visible = self._visible_text(seq)
            emitted, seq.num_emitted_chars = seq.num_emitted_chars, len(visible)
            token_delta = [new_tokens[seq.seq_id]] if seq.seq_id in new_tokens else []
            completions.append(CompletionOutput(seq.index, visible, list(seq.output_token_ids), seq.finish_reason,
                                                new_text=visible[emitted:], new_token_ids=token_delta))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             num_cached_tokens=request.seqs[0].num_cached_tokens)

    # -- conveniences ----------------------------------------------------------------------------

    def stream(self) -> Iterator[RequestOutput]:
        """Step until idle, yielding outputs as they come; callers may add requests in between."""
        while self.has_unfinished_requests():
            yield from self.step()

    def stats(self) -> dict:
        evictable = self.radix_cache.num_evictable_blocks() if self.radix_cache is not None else 0
        free = self.block_manager.num_free_blocks + evictable
        return {
            "kv_blocks_total": self.num_kv_blocks,
            "kv_blocks_free": free,
            "kv_blocks_used": self.num_kv_blocks - free,
            "kv_blocks_cached": self.radix_cache.num_nodes if self.radix_cache is not None else 0,
            "block_size": self.config.block_size,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            **self.counters,
        }
