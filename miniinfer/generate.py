"""Generation loops without the engine: one request, or one *static* batch.

* :func:`generate` — one prompt: prefill it into a :class:`~miniinfer.kv_cache.KVCache`, then decode
  one token per step (``use_cache=False`` re-runs the whole sequence every step instead: the
  baseline chapter 05 measures against).
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
    output: list[int] = []

    ids = torch.tensor([tokens], device=device)
    positions = torch.arange(len(tokens), device=device)[None]
    if use_cache:
        cache = KVCache.for_model(model, batch_size=1, max_len=limit)
        logits = _last_logits(model, ids, positions, cache)                  # prefill: the whole prompt
    else:
        logits = model(ids)[:, -1].float()
    while True:
        token = int(sample(logits, [params], [generator], _probabilities_fn(model))[0])
        output.append(token)
        tokens.append(token)
        if token in eos_token_ids or len(tokens) >= limit:
            return output
        if use_cache:                                                        # decode: only the new token
            ids = torch.tensor([[token]], device=device)
            positions = torch.tensor([[len(tokens) - 1]], device=device)
            logits = _last_logits(model, ids, positions, cache)
        else:                                                                # recompute everything
            logits = model(torch.tensor([tokens], device=device))[:, -1].float()


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
