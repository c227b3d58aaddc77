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

import operator
from collections.abc import Iterator
from pathlib import Path

import torch

from miniinfer.components import Components
from miniinfer.engine import EngineConfig, EngineHooks, LLMEngine
from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "CompletionOutput"]


def _is_token_id(x) -> bool:
    """An int-like that is not a bool (numpy integers count)."""
    try:
        operator.index(x)
    except TypeError:
        return False
    return not isinstance(x, bool)


class LLM:
    """Load a model once, then ``generate``.

    ``model``: a checkpoint folder, a hub id, or None for the bundled ``shakespeare`` model.
    ``components`` swaps in your own building blocks (:class:`~miniinfer.components.Components`),
    ``hooks`` your own engine internals (:class:`~miniinfer.engine.EngineHooks`).
    Other keyword arguments are engine options (:class:`~miniinfer.engine.EngineConfig`):
    ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``block_size``,
    ``num_kv_blocks``, ``enable_prefix_caching``, ``enable_chunked_prefill``, ``attention_backend``,
    ``gpu_memory_utilization``, ``cpu_kv_cache_gib``.
    """

    def __init__(self, model: str | Path | None = None, *, components: Components | None = None,
                 hooks: EngineHooks | None = None, device=None, dtype=None, **engine_options):
        from miniinfer.loader import load_model
        from miniinfer.models.bundled import bundled_model_path

        unknown = sorted(set(engine_options) - set(EngineConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown LLM option(s) {unknown}; engine options are "
                             f"{sorted(EngineConfig.__dataclass_fields__)}")
        engine_config = EngineConfig(**engine_options)  # validates before the (slower) model load
        path = bundled_model_path("shakespeare") if model is None else model
        self.model, self.tokenizer = load_model(path, dtype=dtype, device=device, components=components)
        self.config = self.model.config
        self.engine = LLMEngine(self.model, self.tokenizer, engine_config, hooks=hooks)

    # -- inputs ----------------------------------------------------------------------------------

    @staticmethod
    def _normalise(prompts, params) -> tuple[list, list[SamplingParams]]:
        if isinstance(prompts, torch.Tensor):  # [L] or [N, L] token ids
            prompts = prompts.tolist()
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                              and all(_is_token_id(t) for t in prompts))
        prompts = [prompts] if single else list(prompts)
        params = params if params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        normalised = []
        for index, (prompt, p) in enumerate(zip(prompts, params_list)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params for prompt {index} must be SamplingParams, got {type(p).__name__}")
            if isinstance(prompt, str):
                normalised.append(prompt)
                continue
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.tolist()
            try:
                normalised.append([operator.index(t) for t in prompt])  # ints (numpy ints too), not floats
            except TypeError:
                raise TypeError(f"prompt {index} must be a string or a list of token ids, got {prompt!r:.80}") from None
        return normalised, params_list

    def _submit(self, prompts, params) -> list[str]:
        prompts, params_list = self._normalise(prompts, params)
        # Validate every prompt before any is queued: a bad one must not leave others half-run.
        for index, (prompt, p) in enumerate(zip(prompts, params_list)):
            try:
                self.engine.validate_prompt(prompt, p)
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
        return [self.engine.add_request(prompt, p) for prompt, p in zip(prompts, params_list)]

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of those; params: one for all, or one per
        prompt (default ``SamplingParams()``). Returns one :class:`RequestOutput` per prompt, in order."""
        request_ids = self._submit(prompts, params)
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        from tqdm.auto import tqdm

        with tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm, unit="req") as progress:
            while len(finished) < len(request_ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine went idle before every request finished")
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        progress.update(1)
        return [finished[request_id] for request_id in request_ids]

    def stream(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt index, RequestOutput)`` whenever a prompt gets new tokens; each completion's
        ``new_text`` / ``new_token_ids`` hold what this step added. More requests may be added through
        ``llm.engine.add_request`` while iterating."""
        request_ids = self._submit(prompts, params)
        index_of = {request_id: index for index, request_id in enumerate(request_ids)}
        for output in self.engine.stream():
            if output.request_id in index_of:
                yield index_of[output.request_id], output

    def stats(self) -> dict:
        """Engine counters: KV blocks (total, free, cached), preemptions, prompt and prefix-cache-hit tokens, …"""
        return self.engine.stats()
