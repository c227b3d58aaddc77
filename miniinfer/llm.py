"""The user-facing ``LLM`` class (vLLM-style), running on the continuous-batching engine.

    from miniinfer import LLM, SamplingParams
    llm = LLM()                                              # the bundled Shakespeare model
    outs = llm.generate(["ROMEO:", "JULIET:"], SamplingParams(temperature=0.0, max_tokens=64))
    print(outs[0].text)

``generate`` submits every prompt to :class:`~miniinfer.engine.LLMEngine` and steps it until all
are done: prompts of any lengths share each step's batch, finished ones leave at once, new ones
join (continuous batching), over a paged KV pool with a radix prefix cache. Outputs come back in
input order. ``stream`` yields results token by token as they are produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from miniinfer.components import Components
from miniinfer.engine import EngineConfig, EngineHooks, LLMEngine
from miniinfer.engine.engine import is_token_id as _is_token_id
from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "CompletionOutput"]


class LLM:
    """Load a model once, then ``generate``.

    ``model``: a checkpoint folder, a hub id, or None for the bundled ``shakespeare`` model.
    ``components`` swaps in your own building blocks (:class:`~miniinfer.components.Components`),
    ``hooks`` your own engine internals (:class:`~miniinfer.engine.EngineHooks`).
    ``device`` ("cpu", "cuda", "cuda:N"; default: CUDA when available), ``dtype`` (default: bfloat16
    on a GPU, float32 on a CPU), ``seed`` (seeds requests that have no seed of their own).
    Other keyword arguments are engine options (:class:`~miniinfer.engine.EngineConfig`):
    ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``block_size``,
    ``num_kv_blocks``, ``enable_prefix_caching``, ``enable_chunked_prefill``, ``attention_backend``,
    ``gpu_memory_utilization``, ``cpu_kv_cache_gib``, ``enable_cuda_graphs`` / ``enforce_eager``,
    ``enable_fused_kernels``, ``cpu_packed_weights`` (True, False or "auto", the default: on a CPU in
    float32, the faster of the oneDNN-prepacked forward and the model's own, measured once at start-up;
    ``llm.engine.runner.packed_weights_choice`` holds the decision and both timings).
    ``speculative_model`` (chapter 10: None, a draft checkpoint folder with the same tokenizer, "ngram"
    or "self"), ``num_speculative_tokens`` (an int or "auto") and ``speculative_tree`` (a tree width, with
    a draft model, on the CPU backends) turn on speculative decoding; ``stats()`` then adds
    ``spec_draft_tokens``, ``spec_accepted_tokens`` and ``spec_mean_accepted_length``.
    ``quantization`` ("int8", "w8a8", "int4", "gptq", "fp8"; chapter 11) quantizes the decoder's linear
    layers after loading (:func:`miniinfer.quant.quantize_model`; "gptq" calibrates on held-out
    Shakespeare text, for the bundled models); a GPTQ checkpoint folder loads quantized by itself.
    ``tensor_parallel_size`` / ``pipeline_parallel_size`` (chapter 12) start that many worker processes
    (:mod:`miniinfer.distributed.llm_workers`): this process drives the engine, the workers follow its steps.
    """

    def __init__(self, model: str | Path | None = None, *, components: Components | None = None,
                 hooks: EngineHooks | None = None, device=None, dtype=None, seed: int | None = None,
                 quantization: str | None = None, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 **engine_options):
        from miniinfer.loader import load_generation_config, load_model, resolve_device, resolve_model_path
        from miniinfer.models.bundled import bundled_model_path

        unknown = sorted(set(engine_options) - set(EngineConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown LLM option(s) {unknown}; engine options are "
                             f"{sorted(EngineConfig.__dataclass_fields__)}")
        engine_config = EngineConfig(seed=seed, **engine_options)  # validates before the (slower) model load
        resolve_device(device)  # a clear error for a device this machine lacks, before loading anything
        path = bundled_model_path("shakespeare") if model is None else model
        if tensor_parallel_size > 1 or pipeline_parallel_size > 1:  # chapter 12: worker processes follow rank 0
            from miniinfer.distributed.llm_workers import start_parallel_model

            if quantization is not None or engine_config.speculative_model is not None:
                raise ValueError("tensor/pipeline parallel LLM: quantization and speculative decoding are not "
                                 "supported together with it")
            engine_config.enable_cuda_graphs = False  # each step broadcasts Python objects: not capturable
            self.model, self.tokenizer = start_parallel_model(
                path, tensor_parallel_size, pipeline_parallel_size, dtype=dtype, device=device,
                components=components, max_model_len=engine_config.max_model_len)
        else:
            self.model, self.tokenizer = load_model(path, dtype=dtype, device=device, components=components,
                                                    max_model_len=engine_config.max_model_len)
        self.config = self.model.config
        if quantization is not None:
            from miniinfer.quant.model import quantize_for_llm

            quantize_for_llm(self.model, self.tokenizer, quantization, path)
        try:
            self.generation_defaults = load_generation_config(resolve_model_path(path))
        except Exception:  # noqa: BLE001 - a hub id offline, etc.: no defaults beyond SamplingParams'
            self.generation_defaults = {}
        self.engine = LLMEngine(self.model, self.tokenizer, engine_config, hooks=hooks)

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams`` with the checkpoint's ``generation_config.json`` defaults (vLLM's rule):
        what ``generate`` uses when no parameters are given."""
        return SamplingParams(**self.generation_defaults)

    # -- inputs ----------------------------------------------------------------------------------

    def _normalise(self, prompts, params) -> tuple[list, list[SamplingParams]]:
        if prompts is None:
            raise ValueError("prompts must be a string, a list of token ids, a prompt dict, or a list of those; "
                             "got None")
        if isinstance(prompts, torch.Tensor):  # [L] or [N, L] token ids
            prompts = prompts.tolist()
        elif _is_numpy_array(prompts):
            prompts = prompts.tolist()
        single = (isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                                       and all(_is_token_id(t) for t in prompts)))
        if not single and not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, a prompt dict, or a list of those; "
                             f"got {type(prompts).__name__}")
        prompts = [prompts] if single else list(prompts)
        params = params if params is not None else self.get_default_sampling_params()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        for index, p in enumerate(params_list):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params for prompt {index} must be SamplingParams, got {type(p).__name__}")
        return prompts, params_list

    def _submit(self, prompts, params, stream: bool) -> list[str]:
        prompts, params_list = self._normalise(prompts, params)
        # All or nothing: the engine validates every prompt before it queues any.
        return self.engine.add_requests(prompts, params_list, stream=stream)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, *, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, a ``{"prompt": …}`` / ``{"prompt_token_ids": …}`` dict, or
        a list of those; sampling_params: one for all, or one per prompt (default: the checkpoint's
        generation defaults, :meth:`get_default_sampling_params`). Returns one :class:`RequestOutput` per
        prompt, in order. Interrupted (Ctrl-C) or failing, it aborts its requests: nothing is left
        holding KV blocks. (``params=`` is the older name of ``sampling_params``.)"""
        if params is not None:
            if sampling_params is not None:
                raise ValueError("give sampling_params or params, not both")
            sampling_params = params
        request_ids = self._submit(prompts, sampling_params, stream=False)
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        from tqdm.auto import tqdm

        try:
            with tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm, unit="req") as progress:
                while len(finished) < len(request_ids):
                    if not self.engine.has_unfinished_requests():
                        raise RuntimeError("the engine went idle before every request finished")
                    for output in self.engine.step():
                        if output.finished and output.request_id in wanted:
                            finished[output.request_id] = output
                            progress.update(1)
        finally:
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            if len(finished) < len(request_ids):
                self._drain_aborted(wanted)
        return [finished[request_id] for request_id in request_ids]

    def _drain_aborted(self, request_ids: set[str]) -> None:
        """Drop the final outputs of our own aborted requests (nobody else wants them)."""
        self.engine._pending_outputs = [o for o in self.engine._pending_outputs if o.request_id not in request_ids]

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
               params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt index, RequestOutput)`` whenever a prompt gets new tokens; each completion's
        ``new_text`` / ``new_token_ids`` hold what this step added. More requests may be added through
        ``llm.engine.add_request`` while iterating. Closing the iterator early (``break``, Ctrl-C, or
        dropping it) aborts its unfinished requests and frees their KV blocks."""
        if params is not None:
            sampling_params = params
        request_ids = self._submit(prompts, sampling_params, stream=True)
        return self._stream(request_ids)

    def _stream(self, request_ids: list[str]) -> Iterator[tuple[int, RequestOutput]]:
        index_of = {request_id: index for index, request_id in enumerate(request_ids)}
        done: set[str] = set()
        try:
            while len(done) < len(request_ids) and self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.request_id in index_of:
                        if output.finished:
                            done.add(output.request_id)
                        yield index_of[output.request_id], output
        finally:
            mine = set(request_ids) - done
            for request_id in mine:
                self.engine.abort_request(request_id)
            self._drain_aborted(mine)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to conversations: ``messages`` is one conversation (a list of
        ``{"role": …, "content": …}`` dicts) or a list of them, rendered with the model's chat template
        (or ``chat_template``)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': …, 'content': …} dicts (or a list "
                             "of such conversations)")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tokenizer = self.tokenizer
        if chat_template is not None:
            import copy

            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = chat_template
        prompts = [tokenizer.apply_chat_template(list(conversation), add_generation_prompt=add_generation_prompt)
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def abort(self, request_id: str) -> bool:
        """Stop a request started with ``llm.engine.add_request`` (or a stream's): it finishes with reason
        ``abort`` and frees its KV blocks. False when the id is unknown or already finished."""
        return self.engine.abort_request(request_id)

    def stats(self) -> dict:
        """Engine counters: KV blocks (total, free, cached), preemptions, prompt and prefix-cache-hit tokens, …"""
        return self.engine.stats()


def _is_numpy_array(value) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.ndarray)
