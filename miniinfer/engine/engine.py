"""The engine loop: admit requests, then step — plan, run, commit — and stream results.

    engine = LLMEngine(model, tokenizer, EngineConfig(...))
    engine.add_request("ROMEO:", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for output in engine.step():      # RequestOutputs of requests that advanced in this step
            ...                           # .outputs[i].new_text / .new_token_ids stream, .finished ends

One step is three calls, each owned by one part::

    plan = scheduler.schedule()                   # who runs, how many tokens each, what to sample
    sampled = runner.run(plan, block_manager)     # on the device: inputs, forward, batched sampler
    updates = scheduler.commit(plan, sampled)     # counts, prefix cache, forks, token stops, frees

and then the engine turns updates into text (incremental detokenization, stop strings) and outputs.
New requests may be added between steps: they join the running batch at the next step
(**continuous batching**), and finished ones leave it at once, freeing their slots and blocks.

A failure fails its own request only: a row the sampler cannot draw (NaN logits) or an exception in
one request's bookkeeping ends that request with finish reason ``error`` and frees its blocks; an
exception in the forward itself ends the requests of that step the same way. Either way the engine
goes on serving the others and is never left with blocks nobody owns.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from miniinfer.engine.attention_backends import select_attention_backend
from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.config import EngineConfig
from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.model_runner import ModelRunner, kv_bytes_per_block
from miniinfer.engine.radix_cache import RadixCache
from miniinfer.engine.scheduler import Scheduler, SchedulerConfig, TokenUpdate
from miniinfer.engine.sequence import Sequence
from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.sampler import check_token_ids, derive_seed
from miniinfer.sampling import SamplingParams
from miniinfer.tokenizer import check_text


@dataclass
class Request:
    """What a user submitted, and the sequences that run it (``n`` of them once the prompt is done)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = True               # build an output every step (False: only when it finishes)
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(seq.is_finished for seq in self.seqs)


def _has_custom_attention(model: torch.nn.Module) -> bool:
    from miniinfer.components import Components

    components = getattr(model, "components", None)
    return components is not None and components.attention is not Components().attention


def _uses_default_components(model: torch.nn.Module) -> bool:
    from miniinfer.components import Components

    return getattr(model, "components", None) == Components()


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

        limit = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} is longer than the model's context "
                             f"(max_position_embeddings={limit})")
        self.max_model_len = config.max_model_len or limit
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
        self.eos_token_ids = frozenset(self._eos_token_ids())
        # Unseeded requests draw their random streams from this generator: LLM(seed=...) makes them
        # reproducible too (a seeded request never depends on it).
        self._seed_rng = random.Random(config.seed)

        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, hooks=hooks)
        self.radix_cache = RadixCache(self.block_manager, hooks=hooks) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max_batched, config.enable_chunked_prefill, self.max_model_len),
            self.block_manager, self.radix_cache, hooks=hooks, eos_token_ids=self.eos_token_ids)
        backend_name = config.attention_backend
        if backend_name == "auto" and _has_custom_attention(model):
            backend_name = "components"  # the user's own attention function must be the one that runs
        self.backend = select_attention_backend(backend_name, self.device, self.dtype, model_config,
                                                config.block_size, attention_fn=model.components.attention,
                                                max_model_len=self.max_model_len,
                                                prefill_kernel=config.prefill_kernel)
        self.attention_backend = self.backend.name
        self.prefill_kernel = getattr(self.backend, "prefill_kernel", self.backend.name)
        # Fused Triton kernels (norm + residual, RoPE, SiLU-and-multiply) on a GPU, unless the model's
        # components were replaced: then the user's functions must be the ones that run.
        if hasattr(model, "enable_fused_kernels"):
            model.enable_fused_kernels(self.device.type == "cuda" and config.enable_fused_kernels
                                       and _uses_default_components(model))
        use_graphs = config.enable_cuda_graphs and not config.enforce_eager
        self.runner = ModelRunner(model, self.num_kv_blocks, config.block_size, self.backend, hooks=hooks,
                                  max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_batched,
                                  max_model_len=self.max_model_len,
                                  cuda_graph_max_batch=config.max_num_seqs if use_graphs else 0,
                                  eos_token_ids=tuple(sorted(self.eos_token_ids)),
                                  cpu_packed_weights=config.cpu_packed_weights)
        self.runner.capture_graphs(progress=config.max_num_seqs > 64)
        self.speculator = self._build_speculator() if config.speculative_model is not None else None
        self.runner.speculator = self.speculator
        self.requests: dict[str, Request] = {}
        self._request_ids = itertools.count()
        self._pending_outputs: list[RequestOutput] = []  # final outputs of aborted requests
        # The last step's committed tokens, one TokenUpdate per sequence that got one (the server's engine
        # process reads it to send only the requests that moved, not to scan every request each step).
        self.last_updates: list[TokenUpdate] = []
        self.counters = dict(prompt_tokens=0, num_steps=0, num_decode_only_steps=0, num_requests_finished=0,
                             num_requests_failed=0, num_requests_aborted=0)

    def _build_speculator(self):
        """Speculative decoding (chapter 10): the proposer named by ``speculative_model``, a decoder around it."""
        from miniinfer.speculative import build_speculative_decoder

        return build_speculative_decoder(self, self.config.speculative_model, self.config.num_speculative_tokens,
                                         accept_fn=self.hooks.accept_draft,
                                         speculative_tree=self.config.speculative_tree)

    def _eos_token_ids(self) -> set[int]:
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

    def validate_prompt(self, prompt, params: SamplingParams | None = None) -> tuple[str | None, list[int]]:
        """Tokenize and check a prompt; raises ValueError (naming the problem) before any work is done."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, dict):
            prompt = _prompt_from_dict(prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            if not prompt:
                raise ValueError("empty prompt: give at least one token")
            check_text(prompt)
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and not prompt.dtype.is_floating_point:
            text, token_ids = None, [int(t) for t in prompt.tolist()]
        elif isinstance(prompt, (list, tuple)) or _is_numpy_int_vector(prompt):
            if not all(is_token_id(t) for t in prompt):
                raise ValueError("a token-id prompt must be a list of ints")
            text, token_ids = None, [int(t) for t in prompt]
        else:
            raise ValueError(f"a prompt is a string, a list of token ids, or a {{'prompt': …}} / "
                             f"{{'prompt_token_ids': …}} dict, got {type(prompt).__name__}")
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
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} completions need {params.n} sequences at once, more than "
                             f"max_num_seqs={self.config.max_num_seqs}")
        needed = min(len(token_ids) + params.max_tokens, self.max_model_len)
        capacity = self.num_kv_blocks * self.config.block_size
        if needed > capacity:
            raise ValueError(f"the request needs up to {needed} tokens of KV cache but the pool holds {capacity} "
                             f"({self.num_kv_blocks} blocks of {self.config.block_size}); raise num_kv_blocks")
        check_token_ids(params, vocab)  # logit_bias and stop_token_ids inside the vocabulary
        return text, token_ids

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None, *,
                    stream: bool = True) -> str:
        """Queue a request; it joins the running batch at the next step. Returns its id.

        ``stream=False``: :meth:`step` returns this request's output once, when it finishes (what
        ``LLM.generate`` uses: no per-token output objects, no per-token text unless stop strings
        need it)."""
        params = SamplingParams() if params is None else params
        text, token_ids = self.validate_prompt(prompt, params)
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._enqueue(Request(request_id, text, token_ids, params, stream=stream))
        return request_id

    def _enqueue(self, request: Request) -> None:
        base_seed = request.params.seed if request.params.seed is not None else self._seed_rng.getrandbits(64)
        first = self._new_sequence(request, base_seed, 0)
        request.seqs.append(first)
        self.requests[request.request_id] = request
        self.scheduler.add(first)
        self.counters["prompt_tokens"] += len(request.prompt_token_ids)

    def add_requests(self, prompts: list, params: list[SamplingParams], request_ids: list[str] | None = None, *,
                     stream: bool = True) -> list[str]:
        """Queue several requests, all or nothing: every prompt is validated and every id checked before
        any is queued, so a bad one in the middle leaves nothing half-submitted."""
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if request_ids is None:
            request_ids = [str(next(self._request_ids)) for _ in prompts]
        request_ids = [str(r) for r in request_ids]
        if len(request_ids) != len(prompts):
            raise ValueError(f"got {len(request_ids)} request ids for {len(prompts)} prompts")
        if len(set(request_ids)) != len(request_ids):
            raise ValueError("request ids must be distinct")
        requests = []
        for index, (prompt, p, request_id) in enumerate(zip(prompts, params, request_ids)):
            if request_id in self.requests:
                raise ValueError(f"prompt {index}: request id {request_id!r} is already in use")
            try:
                text, token_ids = self.validate_prompt(prompt, p)
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
            requests.append(Request(request_id, text, token_ids, p, stream=stream))
        for request in requests:
            self._enqueue(request)
        return request_ids

    def _new_sequence(self, request: Request, base_seed: int, index: int) -> Sequence:
        seq = Sequence(request.request_id, request.prompt_token_ids, request.params,
                       stream_seed=derive_seed(base_seed, index), base_seed=base_seed, index=index)
        self._attach_detokenizer(request, seq)
        return seq

    def _attach_detokenizer(self, request: Request, seq: Sequence) -> None:
        # Text while generating is needed for streaming and for stop strings; otherwise it is decoded
        # once, at the end.
        if self.tokenizer is not None and (request.stream or request.params.stop_strings):
            from miniinfer.tokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.params.skip_special_tokens)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now: its sequences end with finish reason ``abort`` and free their blocks; its
        final output comes out of the next :meth:`step`. Returns False for an unknown or finished id."""
        request = self.requests.pop(str(request_id), None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        self.counters["num_requests_aborted"] += 1
        self._pending_outputs.append(self._request_output(request, final=True))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_outputs)

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of requests that streamed tokens in it or finished."""
        outputs, self._pending_outputs = self._pending_outputs, []
        self.last_updates = []
        if not self.scheduler.has_unfinished():
            return outputs
        plan = self.scheduler.schedule()
        if not plan.seqs:
            raise RuntimeError("the scheduler could not schedule anything although requests are waiting; "
                               f"free blocks {self.block_manager.num_free_blocks}/{self.num_kv_blocks}")
        self.counters["num_steps"] += 1
        if plan.is_decode_only:  # the steps a captured CUDA graph can run; prefills and mixed steps run eagerly
            self.counters["num_decode_only_steps"] += 1
        try:
            if self.speculator is not None:  # guesses for decoding sequences, verified by this step's forward
                self.speculator.extend(plan, self.scheduler)
            sampled = self.runner.run(plan, self.block_manager)
        except Exception as error:  # noqa: BLE001 - fail this step's requests, keep the engine alive
            failed = self.scheduler.fail(plan, error)
            return outputs + self._finish_requests({seq.request_id for seq in failed})
        updates = self.scheduler.commit(plan, sampled)
        self.last_updates = updates
        if self.speculator is not None:
            self.speculator.after_commit(plan, sampled)
        return outputs + self._process(updates)

    def _process(self, updates: list[TokenUpdate]) -> list[RequestOutput]:
        """Text for the new tokens (stop strings), then one output per touched request that streams or
        finished."""
        touched: dict[str, Request] = {}
        requests = self.requests
        for update in updates:
            seq = update.seq
            request = requests.get(seq.request_id)
            if request is None:
                continue
            if update.new_seq:
                request.seqs.append(seq)
                # The sibling's first token was appended before it had a detokenizer: _update_text catches up.
                self._attach_detokenizer(request, seq)
            if seq.detokenizer is not None:
                try:
                    self._update_text(seq, request)
                except Exception as error:  # noqa: BLE001 - e.g. a decoding failure: this request only
                    self.scheduler.finish(seq, "error", error=f"{type(error).__name__}: {error}")
            if request.stream or seq.is_finished:  # others have nothing to report this step
                touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            finished = request.finished
            if finished or request.stream:
                outputs.append(self._request_output(request, final=finished))
            if finished:
                del self.requests[request.request_id]
                self.counters["num_requests_finished"] += 1
                if any(seq.finish_reason == "error" for seq in request.seqs):
                    self.counters["num_requests_failed"] += 1
        return outputs

    def _finish_requests(self, request_ids: set[str]) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "error", error="a sibling completion failed")
            outputs.append(self._request_output(request, final=True))
            del self.requests[request_id]
            self.counters["num_requests_finished"] += 1
            self.counters["num_requests_failed"] += 1
        return outputs

    def _update_text(self, seq: Sequence, request: Request) -> None:
        """Feed the new tokens to the detokenizer; end the sequence at a stop string."""
        detokenizer = seq.detokenizer
        if detokenizer is None:
            return
        params = seq.params
        previous_len = len(seq.text)
        new_tokens = seq.output_token_ids[len(detokenizer.token_ids):]
        if self._ended_by_eos(seq):
            new_tokens = new_tokens[:-1]  # the EOS token that ended the sequence is not part of the text
        for token in new_tokens:
            seq.text += detokenizer.add(token)
        stops = params.stop_strings
        if stops and seq.finish_reason not in ("abort", "error"):
            search_from = max(0, previous_len - max(len(s) for s in stops) + 1)
            hits = [(seq.text.find(s, search_from), s) for s in stops]
            hits = [(position, s) for position, s in hits if position >= 0]
            if hits:
                # Whatever the detokenizer still holds back comes after the stop string: dropped with it.
                position, stop = min(hits)
                seq.text = seq.text[:position + (len(stop) if params.include_stop_str_in_output else 0)]
                if seq.is_finished:  # a token-level stop in the same step: the stop string came first
                    seq.finish_reason, seq.stop_reason = "stop", stop
                else:
                    self.scheduler.finish(seq, "stop", stop_reason=stop)
                return
        if seq.is_finished:
            # Bytes of an incomplete character held back so far belong to the text (EOS, length, …).
            seq.text += detokenizer.flush()

    def _ended_by_eos(self, seq: Sequence) -> bool:
        tokens = seq.token_ids
        return (seq.finish_reason == "stop" and seq.stop_reason is None and seq.num_output_tokens > 0
                and tokens[-1] in self.eos_token_ids)

    def _visible_text(self, seq: Sequence) -> str:
        """Text that can be streamed: all of it once finished, else all but a possible stop-string start."""
        if seq.is_finished or not seq.params.stop_strings:
            return seq.text
        hold = max(len(s) for s in seq.params.stop_strings) - 1
        return seq.text[:max(0, len(seq.text) - hold)]

    def _final_text(self, seq: Sequence) -> str:
        if seq.detokenizer is not None or self.tokenizer is None:
            return seq.text
        tokens = seq.output_token_ids
        if self._ended_by_eos(seq):
            tokens = tokens[:-1]  # the EOS token is not text
        return self.tokenizer.decode(tokens, skip_special_tokens=seq.params.skip_special_tokens)

    def _request_output(self, request: Request, final: bool) -> RequestOutput:
        completions = []
        for seq in sorted(request.seqs, key=lambda s: s.index):
            text = self._final_text(seq) if seq.is_finished else self._visible_text(seq)
            new_text = new_tokens = None
            if request.stream:
                new_text = text[seq.num_emitted_chars:]
                new_tokens = seq.output_token_ids[seq.num_emitted_tokens:]
                seq.num_emitted_chars, seq.num_emitted_tokens = len(text), seq.num_output_tokens
            completions.append(CompletionOutput(
                seq.index, text, seq.output_token_ids, seq.finish_reason, new_text=new_text or "",
                new_token_ids=new_tokens or [], stop_reason=seq.stop_reason, error=seq.error,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None))
        first = request.seqs[0]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             num_cached_tokens=first.num_cached_tokens, finished=final,
                             prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None)

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
            "attention_backend": self.attention_backend,
            "cuda_graphs": self.runner.decode_graphs is not None,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            **self.counters,
            **self.scheduler.counters,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }


def _prompt_from_dict(prompt: dict):
    """vLLM's prompt dicts: ``{"prompt": text}`` or ``{"prompt_token_ids": [...]}``, nothing else."""
    keys = set(prompt)
    if keys == {"prompt"}:
        if not isinstance(prompt["prompt"], str):
            raise ValueError(f"{{'prompt': …}} must hold a string, got {type(prompt['prompt']).__name__}")
        return prompt["prompt"]
    if keys == {"prompt_token_ids"}:
        ids = prompt["prompt_token_ids"]
        if isinstance(ids, str) or not isinstance(ids, (list, tuple)):
            raise ValueError("{'prompt_token_ids': …} must hold a list of token ids")
        return list(ids)
    raise ValueError(f"a prompt dict has exactly one key, 'prompt' (text) or 'prompt_token_ids' (ids); "
                     f"got keys {sorted(keys)}")


def is_token_id(value) -> bool:
    """An int-like that is not a bool (NumPy integers count)."""
    import operator

    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _is_numpy_int_vector(value) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer)

