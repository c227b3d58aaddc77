"""Generation loops without the engine: one request, or one *static* batch.

* :func:`generate` — one prompt: prefill it into a :class:`~miniinfer.kv_cache.KVCache`, then decode
  one token per step (``use_cache=False`` re-runs the whole sequence every step instead: the
  baseline chapter 05 measures against). The loop itself is :func:`prefill_and_decode` (chapter
  05's exercise): it knows nothing about sampling, which it delegates to ``next_token``.
* :func:`generate_static_batch` — several prompts padded into one batch that advances in lockstep
  until the *last* of them finishes: the baseline chapter 06 improves on with continuous batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from miniinfer.kv_cache import KVCache
from miniinfer.sampling import SamplingParams, make_generator, sample


def _probabilities_fn(model):
    """The model's sampling distribution component (your chapter 04 function, if you plugged it in)."""
    return getattr(getattr(model, "components", None), "probabilities", None)


def _last_logits(model, input_ids, positions, cache) -> torch.Tensor:
    """Logits of each row's last token only: [B, V] (the LM head on every token would be wasted)."""
    batch, length = input_ids.shape
    last_rows = torch.arange(batch, device=input_ids.device) * length + (length - 1)
    return model(input_ids, positions, attention=cache, logits_indices=last_rows).float()


@torch.inference_mode()
def prefill_and_decode(model: torch.nn.Module, cache: KVCache, prompt_ids: list[int], max_new_tokens: int,
                       next_token, eos_token_ids=frozenset()) -> list[int]:
    """The cached generation loop for one sequence; returns the new token ids.

    cache: an empty :class:`KVCache` of batch 1 with room for ``len(prompt_ids) + max_new_tokens − 1``
    tokens; next_token: ``logits [V] (float32) -> int`` (greedy, sampling, …). Stops after
    ``max_new_tokens`` tokens, or right after a token in ``eos_token_ids`` (which is kept).

    **Prefill** runs the whole prompt ``[1, P]`` at positions ``0 … P−1`` once; each **decode** step
    runs only the newest token ``[1, 1]``, at position ``cache.length`` (the tokens already cached).
    The last token is never run through the model: nothing would use its keys and values.
    """
    device = cache.keys.device
    ids = torch.tensor([list(prompt_ids)], device=device)                    # [1, P]
    positions = torch.arange(len(prompt_ids), device=device)[None]          # [1, P]
    output: list[int] = []
    while True:
        logits = _last_logits(model, ids, positions, cache)                  # [1, V]
        token = int(next_token(logits[0]))
        output.append(token)
        if token in eos_token_ids or len(output) >= max_new_tokens:
            return output
        ids = torch.tensor([[token]], device=device)                         # [1, 1]: only the new token
        positions = torch.tensor([[cache.length]], device=device)            # it sits after the cached ones


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams | None = None,
             eos_token_ids: set[int] | None = None, use_cache: bool = True) -> list[int]:
    """Generate up to ``params.max_tokens`` tokens after ``prompt_ids``; returns the new token ids.

    With the cache each step costs O(context) (one token through the model, attending to the stored
    keys); without it, O(context²) overall, since every step recomputes the whole sequence.
    """
    params = params or SamplingParams(temperature=0.0)
    eos_token_ids = set() if params.ignore_eos else set(eos_token_ids or ())
    device = next(model.parameters()).device
    generator = make_generator(params.seed, device)
    tokens = list(prompt_ids)
    limit = min(len(tokens) + params.max_tokens, model.config.max_position_embeddings)

    probabilities_fn = _probabilities_fn(model)

    def next_token(logits: torch.Tensor) -> int:                             # logits: [V]
        return int(sample(logits[None], [params], [generator], probabilities_fn)[0])

    # At least one token, even when the prompt fills the context (as the engine does).
    max_new_tokens = max(1, limit - len(tokens))
    if use_cache:
        cache = KVCache.for_model(model, batch_size=1, max_len=limit)
        return prefill_and_decode(model, cache, tokens, max_new_tokens, next_token, eos_token_ids)
    output: list[int] = []
    while True:                                                              # recompute everything, every step
        token = next_token(model(torch.tensor([tokens], device=device))[0, -1].float())
        output.append(token)
        tokens.append(token)
        if token in eos_token_ids or len(output) >= max_new_tokens:
            return output


@dataclass
class StaticBatchResult:
    outputs: list[list[int]]                     # generated ids per prompt
    steps: int = 0                               # decode steps the batch ran
    busy_rows_per_step: list[int] = field(default_factory=list)  # rows still generating at each step
    padding_tokens: int = 0                      # prompt padding slots computed for nothing


@torch.inference_mode()
def generate_static_batch(model: torch.nn.Module, prompts: list[list[int]], params: list[SamplingParams],
                          eos_token_ids: set[int] | None = None) -> StaticBatchResult:
    """Generate for all prompts as one left-padded batch that runs until every row is done.

    Finished rows keep occupying the batch (their tokens are computed and thrown away): the cost
    continuous batching removes.
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    max_new = max(p.max_tokens for p in params)
    cache = KVCache.for_model(model, batch_size=len(prompts), max_len=longest + max_new)
    positions = cache.set_padding(lengths)
    padded = [[0] * (longest - len(p)) + list(p) for p in prompts]
    generators = [make_generator(p.seed, device) for p in params]
    eos = set(eos_token_ids or ())

    logits = _last_logits(model, torch.tensor(padded, device=device), positions, cache)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    result = StaticBatchResult(outputs, padding_tokens=sum(longest - n for n in lengths))
    next_position = torch.tensor(lengths, device=device)
    while True:
        tokens = sample(logits, params, generators, _probabilities_fn(model)).tolist()
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            outputs[row].append(token)
            if (token in eos and not params[row].ignore_eos) or len(outputs[row]) >= params[row].max_tokens:
                done[row] = True
        result.busy_rows_per_step.append(sum(not d for d in done))
        if all(done):
            return result
        result.steps += 1
        ids = torch.tensor(tokens, device=device)[:, None]
        logits = _last_logits(model, ids, next_position[:, None], cache)
        next_position += 1
