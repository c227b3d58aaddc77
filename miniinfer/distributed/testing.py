"""Functions that every rank of a :class:`~miniinfer.distributed.group.WorkerPool` runs in the tests, the
benchmark and chapter 12 (module-level, so that spawned workers can import them by name)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from miniinfer.distributed import comm

__all__ = ["build_model", "tp_forward", "pp_step", "ep_forward", "fail_on_rank", "pp_decode", "random_config"]


def random_config(num_heads: int = 8, num_kv_heads: int = 2, head_dim: int = 8, hidden_size: int = 32,
                  intermediate_size: int = 48, num_layers: int = 2, vocab_size: int = 97, tie: bool = True):
    from miniinfer.models.config import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       head_dim=head_dim, max_position_embeddings=256, tie_word_embeddings=tie)


_MODELS: dict = {}


def build_model(spec):
    """``spec``: a model, a bundled model name ("shakespeare", "shakespeare-moe"), or ``(config kwargs, seed)`` for a
    random Qwen2 (the same weights on every rank: the seed decides them). A fresh copy each call; loaded
    once per process (a worker pool runs many tasks)."""
    import copy

    if isinstance(spec, torch.nn.Module):  # sent by the parent (tensors travel through shared memory)
        return copy.deepcopy(spec)
    key = repr(spec)
    if key not in _MODELS:
        _MODELS[key] = _build(spec)
    return copy.deepcopy(_MODELS[key])


def _build(spec):
    if isinstance(spec, str):
        import miniinfer

        model, _ = miniinfer.load_model(miniinfer.bundled_model_path(spec), device="cpu")
        return model
    from miniinfer.models.qwen2 import Qwen2ForCausalLM

    kwargs, seed = spec
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(random_config(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model.requires_grad_(False).eval()


@torch.no_grad()
def tp_forward(spec, ids: list[list[int]], greedy_steps: int = 0, device: str = "cpu") -> dict:
    """Tensor-parallel logits [B, L, V] on this rank, greedy continuations (no KV cache: the full forward each
    step), and the collectives' bytes per forward. ``device="cuda"``: on this rank's GPU (NCCL)."""
    from miniinfer.distributed.tp import shard_qwen2

    model = build_model(spec)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
        model.to(device)
    shard = shard_qwen2(model, dist.get_rank(), dist.get_world_size())
    comm.reset_stats()
    tokens = torch.tensor(ids, device=device)
    start = time.perf_counter()
    logits = shard(tokens)
    seconds = time.perf_counter() - start
    stats = comm.snapshot()
    for _ in range(greedy_steps):
        tokens = torch.cat([tokens, shard(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return {"logits": logits.cpu(), "tokens": tokens[:, len(ids[0]):].tolist(), "comm": stats, "seconds": seconds}


def pp_step(spec, batch: int, length: int, num_micro: int, schedule: str, seed: int = 0,
            op_time_s: tuple[float, float] | None = None):
    """One pipeline training step of ``spec`` on a random batch (the seed decides it) -> StepResult."""
    from miniinfer.distributed.pp import run_pipeline_step

    model = build_model(spec)
    generator = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, length + 1), generator=generator)
    return run_pipeline_step(model, ids[:, :-1], ids[:, 1:], num_micro, schedule, op_time_s=op_time_s)


def ep_forward(spec, num_tokens_per_rank: list[int], capacity_factor: float | None, seed: int = 0,
               whole_model: bool = False) -> dict:
    """Expert-parallel MoE on the bundled shakespeare-moe. Rank r takes its own tokens (hidden states for one
    sparse block, or token ids through the whole model with ``whole_model``)."""
    from miniinfer.distributed.ep import EPMoeBlock, load_balance, make_expert_parallel, moe_reference

    model = build_model(spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(seed)
    if whole_model:
        ids = [torch.randint(0, model.config.vocab_size, (1, n), generator=generator) for n in num_tokens_per_rank]
        make_expert_parallel(model, rank, world, capacity_factor)
        with torch.no_grad():
            logits = model(ids[rank])
        return {"logits": logits}
    E = model.config.hidden_size
    xs = [torch.randn(n, E, generator=generator) for n in num_tokens_per_rank]
    block = model.model.layers[0].mlp
    ep = EPMoeBlock(block, rank, world, capacity_factor)
    with torch.no_grad():
        routed = ep(xs[rank]) - block.shared(xs[rank])
        reference = moe_reference(xs[rank], block, capacity_factor, max(num_tokens_per_rank))
    stats = ep.stats
    balance = load_balance(stats["counts"], stats["prob_sum"], stats["tokens"])
    return {"routed": routed, "reference": reference, "dropped": stats["dropped"], "pairs": stats["pairs"],
            "capacity": stats["capacity"], "all_to_all_bytes": stats["all_to_all_bytes"], "balance": balance}


def fail_on_rank(bad_rank: int, timeout_s: float = 3.0) -> str:
    """Rank ``bad_rank`` raises before a collective; the others wait in an all-reduce until the group times
    out (a group of its own, with a short timeout, so the test is quick and the pool's group stays usable)."""
    import datetime

    group = dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_rank() == bad_rank:
        raise ValueError(f"rank {bad_rank} failed on purpose")
    t = torch.ones(3)
    dist.all_reduce(t, group=group)
    return "finished"


def pp_decode(spec, prompts: list[list[int]], max_new_tokens: int, num_micro: int):
    from miniinfer.distributed.pp import decode_pipeline

    return decode_pipeline(build_model(spec), prompts, max_new_tokens, num_micro)
