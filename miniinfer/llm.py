"""The user-facing ``LLM`` class (vLLM-style), in its first, simple form.

    from miniinfer import LLM, SamplingParams
    llm = LLM()                                              # the bundled Shakespeare model
    outs = llm.generate(["ROMEO:"], SamplingParams(temperature=0.0, max_tokens=64))
    print(outs[0].text)

This version generates one prompt at a time (its ``n`` completions as one batch) with a plain
contiguous KV cache. Chapters 05–08 replace the loop with the continuous-batching engine; the
API and the results (greedy outputs, seeded samples) stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from miniinfer.components import Components
from miniinfer.sampling import SamplingParams, make_generator, sample

__all__ = ["LLM", "RequestOutput", "CompletionOutput"]


@dataclass
class CompletionOutput:
    """One generated completion: its text (stop string excluded), token ids, and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)


@dataclass
class RequestOutput:
    """The result for one prompt; ``text``/``token_ids``/``finish_reason`` are those of ``outputs[0]``."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


class _ContiguousKVCache:
    """The simplest :class:`~miniinfer.attention.AttentionContext`: per layer, k and v buffers
    [B, S_max, H_kv, D] for B sequences that all hold the same number of tokens."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 attention_fn, dtype, device):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_cached_tokens = 0  # advanced by the caller after each forward
        self.attention_fn = attention_fn

    def attend(self, layer_index: int, q, k, v, scale: float):
        start, end = self.num_cached_tokens, self.num_cached_tokens + q.shape[1]
        self.k[layer_index][:, start:end] = k
        self.v[layer_index][:, start:end] = v
        return self.attention_fn(q, self.k[layer_index][:, :end], self.v[layer_index][:, :end],
                                 causal=True, scale=scale)


class LLM:
    """Load a model once, then ``generate``. ``model``: a checkpoint folder, a hub id, or None for the
    bundled ``shakespeare`` model. ``components`` swaps in your own building blocks (see
    :class:`~miniinfer.components.Components`)."""

    def __init__(self, model: str | Path | None = None, *, components: Components | None = None,
                 device=None, dtype=None):
        from miniinfer.loader import load_model
        from miniinfer.models.bundled import bundled_model_path

        path = bundled_model_path("shakespeare") if model is None else model
        self.model, self.tokenizer = load_model(path, dtype=dtype, device=device, components=components)
        self.config = self.model.config

    def _prompt_ids(self, index: int, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer.json: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise ValueError(f"prompt {index} is empty (no tokens)")
        V = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {V})")
        return text, ids

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of those; params: one for all, or one per
        prompt (default ``SamplingParams()``). Returns one :class:`RequestOutput` per prompt, in order."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                              and all(isinstance(t, int) for t in prompts))
        prompts = [prompts] if single else list(prompts)
        params = params if params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        # Validate everything before doing any work.
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params for prompt {i} must be SamplingParams, got {type(p).__name__}")
            text, ids = self._prompt_ids(i, prompt)
            limit = self.config.max_position_embeddings
            if len(ids) + p.max_tokens > limit:
                raise ValueError(f"prompt {i}: {len(ids)} prompt tokens + max_tokens {p.max_tokens} = "
                                 f"{len(ids) + p.max_tokens} exceeds max_position_embeddings {limit}")
            requests.append((text, ids, p))

        from tqdm.auto import tqdm

        return [self._generate_one(*r) for r in tqdm(requests, desc="generate", disable=not use_tqdm)]

    @torch.inference_mode()
    def _generate_one(self, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        model, config, n = self.model, self.config, params.n
        weight = model.model.embed_tokens.weight
        device, P = weight.device, len(prompt_ids)
        cache = _ContiguousKVCache(config.num_hidden_layers, n, P + params.max_tokens, config.num_key_value_heads,
                                   config.head_dim, model.components.attention, weight.dtype, device)
        generators = [make_generator(None if params.seed is None else params.seed + i, device) for i in range(n)]
        eos = set() if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
        completions = [_Completion(self.tokenizer, eos, params) for _ in range(n)]

        # Prefill: the whole prompt, logits only at the last position of each of the n identical rows.
        ids = torch.tensor([prompt_ids] * n, device=device)
        positions = torch.arange(P, device=device).expand(n, P)
        last = torch.arange(n, device=device) * P + (P - 1)
        logits = model(ids, positions, attention=cache, logits_indices=last)  # [n, V]
        cache.num_cached_tokens = P
        while True:
            tokens = sample(logits, [params] * n, generators).tolist()
            for completion, token in zip(completions, tokens):
                if completion.finish_reason is None:  # finished rows ride along; their tokens are ignored
                    completion.append(token)
            if all(c.finish_reason is not None for c in completions):
                break
            step_ids = torch.tensor(tokens, device=device)[:, None]  # [n, 1]
            step_positions = torch.full((n, 1), cache.num_cached_tokens, device=device)
            logits = model(step_ids, step_positions, attention=cache)[:, -1]
            cache.num_cached_tokens += 1
        outputs = [CompletionOutput(c.text, c.token_ids, c.finish_reason) for c in completions]
        return RequestOutput(prompt, list(prompt_ids), outputs)


class _Completion:
    """The growing state of one completion: token ids, streamed text, finish reason."""

    def __init__(self, tokenizer, eos: set[int], params: SamplingParams):
        from miniinfer.tokenizer import IncrementalDetokenizer

        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.eos, self.stops, self.max_tokens = eos, params.stop_strings, params.max_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        if self.detokenizer is not None:
            before = len(self.text)
            self.text += self.detokenizer.add(token)
            for stop in self.stops:  # search only where a stop string could newly end
                at = self.text.find(stop, max(0, before - len(stop) + 1))
                if at >= 0:
                    self.text, self.finish_reason = self.text[:at], "stop"
                    return
        if token in self.eos:
            self.finish_reason = "stop"
        elif len(self.token_ids) == self.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.detokenizer is not None:
            self.text += self.detokenizer.flush()  # text held back for an incomplete character
