"""Pipeline parallelism: the layers cut into p stages, one per rank, and a batch cut into m micro-batches.

Stage s holds layers ``[s·L/p, (s+1)·L/p)`` (stage 0 also the embedding, the last stage the final norm,
the LM head and the loss). A micro-batch's activations flow 0 → 1 → … → p−1 (forward, ``F``), its
gradients flow back (backward, ``B``). Who does what when is a **schedule**, a list of ``("F", i)`` /
``("B", i)`` per stage:

* **GPipe**: all m forwards, then all m backwards. Every stage keeps the activations of all m
  micro-batches until its backwards start.
* **1F1B** (PipeDream-flush): ``p − s − 1`` warm-up forwards, then alternate one forward and one
  backward, then the remaining backwards. The same bubble as GPipe, but stage s holds at most ``p − s``
  micro-batches' activations instead of m.

With uniform stages the idle share of the time (the **bubble**) is ``(p − 1)/(m + p − 1)`` for both:
each stage waits ``p − 1`` slots for the first micro-batch to reach it and ``p − 1`` at the end.
:func:`run_pipeline_step` runs one training step (forward and backward) with either executor over real
processes and returns the loss, the gradients and a timeline of every op for the figures.

Point-to-point: sends are ``isend`` (non-blocking) and receives block; activations and gradients use
different tags, so the two directions never match each other's messages and the 1F1B steady state, where
neighbours send to each other at the same time, cannot deadlock.

Tied embeddings: stage 0 (embedding) and the last stage (LM head) each hold a copy of the table; after
the backward they exchange their gradients and both add the other's, as one process's autograd would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["gpipe_schedule", "one_f_one_b_schedule", "SCHEDULES", "stage_layers", "PipelineStage",
           "run_pipeline_step", "bubble_theory", "measured_bubble", "StepResult", "decode_pipeline"]

TAG_ACTIVATION, TAG_GRADIENT, TAG_TIED, TAG_TOKEN = 1, 2, 3, 4


def gpipe_schedule(num_stages: int, num_micro: int, stage: int) -> list[tuple[str, int]]:
    """GPipe: ``F0 … F(m−1)`` then the backwards, last micro-batch first (its activations are the newest)."""
    return [("F", i) for i in range(num_micro)] + [("B", i) for i in reversed(range(num_micro))]


def one_f_one_b_schedule(num_stages: int, num_micro: int, stage: int) -> list[tuple[str, int]]:
    """1F1B: ``p − s − 1`` warm-up forwards, then one forward + one backward at a time, then the rest."""
    warmup = min(num_stages - stage - 1, num_micro)
    ops = [("F", i) for i in range(warmup)]
    forward, backward = warmup, 0
    while forward < num_micro:
        ops += [("F", forward), ("B", backward)]
        forward += 1
        backward += 1
    ops += [("B", i) for i in range(backward, num_micro)]
    return ops


SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def bubble_theory(num_stages: int, num_micro: int) -> float:
    """(p − 1)/(m + p − 1): the idle share of a pipeline with uniform stages."""
    return (num_stages - 1) / (num_micro + num_stages - 1)


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The layers of ``stage``: as even as possible, the first stages taking one more when it does not divide."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class PipelineStage(nn.Module):
    """One stage of a :class:`~miniinfer.models.qwen2.Qwen2ForCausalLM` (shares its modules, no copies).

    ``forward(x)``: stage 0 takes ids [B, L], the others hidden states [B, L, E]; the last stage returns
    logits [B, L, V], the others hidden states.
    """

    def __init__(self, model, stage: int, num_stages: int):
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.layer_range = stage_layers(len(model.model.layers), num_stages, stage)
        self.layers = nn.ModuleList(model.model.layers[i] for i in self.layer_range)
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens if self.first else None
        self.norm = model.model.norm if self.last else None
        self.head_weight = model.lm_head_weight if self.last else None
        self.tied = model.lm_head is None
        self.components = model.components

    def forward(self, x: torch.Tensor, attention=None, positions=None) -> torch.Tensor:
        L = x.shape[1]
        if positions is None:
            cos, sin = self.rotary.cos[:L], self.rotary.sin[:L]
        else:
            cos, sin = self.rotary.cos_sin(positions)
        if self.first:
            x = F.embedding(x, self.embed.weight)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        if self.last:
            x = F.linear(self.norm(x), self.head_weight)
        return x

    def named_stage_parameters(self, model) -> dict[str, nn.Parameter]:
        """This stage's parameters under the full model's names."""
        mine = {id(p) for p in self.parameters()}
        if self.last:
            mine.add(id(self.head_weight))
        return {name: p for name, p in model.named_parameters() if id(p) in mine}


@dataclass
class StepResult:
    """What one rank saw in one pipeline training step."""

    stage: int
    loss: float | None                       # the batch's mean loss (last stage only)
    grads: dict[str, torch.Tensor]            # this stage's gradients, by the full model's names
    timeline: list[tuple[str, int, float, float]] = field(default_factory=list)  # (op, micro, start, end)
    peak_in_flight: int = 0                  # most micro-batches whose activations were held at once
    busy_s: float = 0.0


def _pad_to(seconds: float, start: float) -> None:
    """Sleep until ``seconds`` after ``start``: makes an op last a fixed time (see run_pipeline_step)."""
    remaining = seconds - (time.perf_counter() - start)
    if remaining > 0:
        time.sleep(remaining)


def run_pipeline_step(model, input_ids: torch.Tensor, labels: torch.Tensor, num_micro: int, schedule: str = "1f1b",
                      op_time_s: tuple[float, float] | None = None, group_ranks: list[int] | None = None
                      ) -> StepResult:
    """One training step (forward + backward, no optimizer update) of ``model`` over the ranks of the default
    group (or ``group_ranks``), one stage each. Every rank passes the same ``input_ids``/``labels`` [B, L]
    (only stage 0 reads the ids and only the last stage the labels); B must divide into ``num_micro``.

    The loss is the mean cross-entropy over all B·L tokens, computed as the sum over micro-batches of
    each one's mean / m, so the gradients equal one process's on the whole batch.

    ``op_time_s = (t_F, t_B)`` pads every forward / backward op to at least that long (sleeping, which uses
    no CPU): with more ranks than cores, the real ops would fight for the cores and the timeline would show
    the machine's contention instead of the schedule; padded, each rank behaves like its own device.
    """
    ranks = group_ranks or list(range(dist.get_world_size()))
    p = len(ranks)
    stage = ranks.index(dist.get_rank())
    if input_ids.shape[0] % num_micro:
        raise ValueError(f"batch size {input_ids.shape[0]} is not divisible by {num_micro} micro-batches")
    ops = SCHEDULES[schedule](p, num_micro, stage)
    module = PipelineStage(model, stage, p)
    params = module.named_stage_parameters(model)
    for param in params.values():
        param.requires_grad_(True)
        param.grad = None
    micro_ids, micro_labels = input_ids.chunk(num_micro), labels.chunk(num_micro)
    prev_rank = ranks[stage - 1] if stage > 0 else None
    next_rank = ranks[stage + 1] if stage < p - 1 else None
    B_micro, L = micro_ids[0].shape
    E = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    pending = []
    total_loss = torch.zeros((), dtype=torch.float32)
    result = StepResult(stage, None, {})
    dist.barrier()
    for kind, i in ops:
        if kind == "F":
            if module.first:
                x = micro_ids[i]
            else:
                x = torch.empty(B_micro, L, E, dtype=dtype)
                dist.recv(x, src=prev_rank, tag=TAG_ACTIVATION)
                x.requires_grad_(True)
            start = time.perf_counter()
            y = module(x)
            if module.last:
                y = F.cross_entropy(y.float().reshape(-1, y.shape[-1]), micro_labels[i].reshape(-1)) / num_micro
                total_loss += y.detach()
            if op_time_s:
                _pad_to(op_time_s[0], start)
            end = time.perf_counter()
            inputs[i], outputs[i] = x, y
            if not module.last:
                pending.append(dist.isend(y.detach().contiguous(), dst=next_rank, tag=TAG_ACTIVATION))
            result.peak_in_flight = max(result.peak_in_flight, len(outputs))
        else:
            if module.last:
                grad = None
            else:
                grad = torch.empty(B_micro, L, E, dtype=dtype)
                dist.recv(grad, src=next_rank, tag=TAG_GRADIENT)
            start = time.perf_counter()
            torch.autograd.backward(outputs.pop(i), grad_tensors=grad)
            x = inputs.pop(i)
            if op_time_s:
                _pad_to(op_time_s[1], start)
            end = time.perf_counter()
            if not module.first:
                pending.append(dist.isend(x.grad.contiguous(), dst=prev_rank, tag=TAG_GRADIENT))
        result.timeline.append((kind, i, start, end))
        result.busy_s += end - start
    for work in pending:
        work.wait()
    if module.tied and p > 1 and (module.first or module.last):
        # Stage 0 and the last stage hold the same table (embedding / LM head): each adds the other's gradient.
        weight = module.embed.weight if module.first else module.head_weight
        other = ranks[-1] if module.first else ranks[0]
        received = torch.empty_like(weight.grad)
        work = dist.isend(weight.grad.contiguous(), dst=other, tag=TAG_TIED)
        dist.recv(received, src=other, tag=TAG_TIED)
        work.wait()
        weight.grad += received
    result.grads = {name: param.grad.detach().clone() for name, param in params.items() if param.grad is not None}
    if module.last:
        result.loss = float(total_loss)
    return result


def measured_bubble(results: list[StepResult]) -> float:
    """1 − (time the stages computed) / (p × the step's span, first op start to last op end)."""
    start = min(r.timeline[0][2] for r in results)
    end = max(r.timeline[-1][3] for r in results)
    busy = sum(r.busy_s for r in results)
    return 1.0 - busy / (len(results) * (end - start))


# --------------------------------------------------------------------------------------------------
# Inference: a micro-batched decode pipeline
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def decode_pipeline(model, prompts: list[list[int]], max_new_tokens: int, num_micro: int) -> list[list[int]] | None:
    """Greedy decoding with the layers split over the ranks: the prompts form ``num_micro`` groups that
    chase each other round the pipeline, so that while stage 1 works on group 0's token, stage 0 already
    works on group 1's. The last stage picks each group's next tokens and sends them back to stage 0.

    Every rank calls it with the same arguments; rank 0 returns the generated ids, the others None.
    Prompts of one group must have the same length (each group is one [B, L] batch with its own KV cache).
    """
    from miniinfer.kv_cache import KVCache

    ranks = list(range(dist.get_world_size()))
    p, stage = len(ranks), dist.get_rank()
    module = PipelineStage(model, stage, p)
    groups = [list(range(g, len(prompts), num_micro)) for g in range(num_micro)]
    groups = [g for g in groups if g]
    caches = [KVCache.for_model(model, batch_size=len(g), max_len=len(prompts[g[0]]) + max_new_tokens)
              for g in groups]
    E = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    tokens = {g: torch.tensor([prompts[i] for i in group]) for g, group in enumerate(groups)}
    generated: dict[int, list[list[int]]] = {g: [] for g in range(len(groups))}
    advances_itself = model.config.num_hidden_layers - 1 in module.layer_range  # KVCache moves on at the last layer
    pending = []

    def receive_tokens(g: int) -> None:  # stage 0: group g's next tokens, back from the last stage
        next_ids = torch.empty(len(groups[g]), 1, dtype=torch.long)
        dist.recv(next_ids, src=p - 1, tag=TAG_TOKEN)
        tokens[g] = next_ids
        generated[g].append(next_ids[:, 0].tolist())

    for step in range(max_new_tokens):
        for g, group in enumerate(groups):
            if module.first and p > 1 and step > 0:
                receive_tokens(g)  # just in time: the other groups were in flight meanwhile
            B, L = len(group), (tokens[g].shape[1] if module.first else (len(prompts[group[0]]) if step == 0 else 1))
            start = caches[g].length
            positions = torch.arange(start, start + L).expand(B, L)
            if module.first:
                x = tokens[g]
            else:
                x = torch.empty(B, L, E, dtype=dtype)
                dist.recv(x, src=stage - 1, tag=TAG_ACTIVATION)
            y = module(x, attention=caches[g], positions=positions)
            if not advances_itself:
                caches[g].length += L
            if module.last:
                next_ids = y[:, -1].argmax(-1, keepdim=True)
                if p > 1:
                    pending.append(dist.isend(next_ids.contiguous(), dst=0, tag=TAG_TOKEN))
                else:
                    tokens[g] = next_ids
                    generated[g].append(next_ids[:, 0].tolist())
            else:
                pending.append(dist.isend(y.contiguous(), dst=stage + 1, tag=TAG_ACTIVATION))
    if module.first and p > 1:
        for g in range(len(groups)):
            receive_tokens(g)
    for work in pending:
        work.wait()
    if stage != 0:
        return None
    out: list[list[int]] = [[] for _ in prompts]
    for g, group in enumerate(groups):
        for step_tokens in generated[g]:
            for row, index in enumerate(group):
                out[index].append(step_tokens[row])
    return out
