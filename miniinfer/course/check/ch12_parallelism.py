"""Checks for chapter 12: the column/row split of a linear layer, the all-reduce of a tensor-parallel MLP,
the 1F1B schedule, and the MoE dispatch permutation.

Oracles: for 12.1, the layer's output itself (the column shards' outputs concatenated, the row shards'
partial outputs summed, must give ``x W^T``); for 12.2, the dense MLP, with every rank run at once in
threads and a counting all-reduce; for 12.3, the package's schedule plus the schedule's invariants; for
12.4, a plain Python loop over the pairs.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from miniinfer.course.checking import assert_close, call_student, exercise, fail
from miniinfer.distributed.pp import one_f_one_b_schedule

__all__ = ["shard_linear", "tp_mlp", "one_f_one_b", "dispatch_permutation"]


@exercise("12.1", "column/row split of a linear layer")
def shard_linear(fn) -> int:
    """Random W [out, in] and x, N in 1..4 (out and in multiples of N): column shards' outputs concatenate
    to x W^T, row shards' partial outputs (each on its slice of x) sum to x W^T."""
    rng = random.Random()
    cases = 0
    for world in (1, 2, 3, 4):
        # With two ranks or more every shard holds at least two rows and two columns: with one-row shards an
        # interleaved split (rank r takes rows r, r+N, ...) is the same as the contiguous one and would pass.
        smallest = 1 if world == 1 else 2
        out_features, in_features = world * rng.randint(smallest, 5), world * rng.randint(smallest, 5)
        weight = torch.randn(out_features, in_features, dtype=torch.float64)
        x = torch.randn(3, in_features, dtype=torch.float64)
        expected = x @ weight.T
        for kind in ("column", "row"):
            shards = []
            for rank in range(world):
                case = f"weight [{out_features}, {in_features}], rank {rank} of {world}, kind {kind!r}"
                got = call_student(fn, weight, rank, world, kind, case=case)
                if not isinstance(got, torch.Tensor):
                    fail(f"expected a tensor, got {type(got).__name__}", case=case)
                want = (out_features // world, in_features) if kind == "column" else (out_features, in_features // world)
                if tuple(got.shape) != want:
                    fail(f"expected a shard of shape {list(want)}, got {list(got.shape)}", case=case,
                         hint="column: a block of rows (output features); row: a block of columns (input features)")
                shards.append(got)
            case = f"weight [{out_features}, {in_features}], {world} ranks, kind {kind!r}"
            if kind == "column":
                combined = torch.cat([x @ w.T for w in shards], dim=-1)
                hint = "rank r's rows are r·out/N … (r+1)·out/N − 1, so that concatenating in rank order gives y"
            else:
                size = in_features // world
                combined = sum(x[:, r * size:(r + 1) * size] @ w.T for r, w in enumerate(shards))
                hint = "rank r's columns are r·in/N … (r+1)·in/N − 1: the same slice of x it will read"
            assert_close(combined, expected, what=f"{kind} shards recombined", case=case, hint=hint)
            cases += 1
    return cases


def _run_ranks(fn, world: int, x, gate_up, down, I: int):
    """Run ``fn`` as each of ``world`` ranks with its shards and an ``all_reduce`` that sums over the ranks
    -> (results by rank, all_reduce calls by rank, the first exception or None).

    The ranks run one after another, twice. The first pass records what each rank hands to its k-th
    all_reduce (and gives it back unchanged); the second pass hands every rank's k-th all_reduce the sum
    of the first pass's k-th contributions. Rank code is deterministic, so the second pass replays the
    same calls and gets what a real all-reduce would return. One rank at a time, not threads: under the
    grader each call of ``fn`` crosses to the student's process, which serves one request at a time, so
    ranks waiting for each other inside concurrent calls could never meet.
    """
    size = I // world
    contributions: list[list] = [[] for _ in range(world)]  # by rank: what its k-th all_reduce was given
    calls = [0] * world  # pass 2's all_reduce calls so far, by rank
    results: list = [None] * world

    def shards(rank: int):
        rows = list(range(rank * size, (rank + 1) * size))
        return torch.cat([gate_up[rows], gate_up[[I + r for r in rows]]]), down[:, rank * size:(rank + 1) * size]

    try:
        for rank in range(world):                     # pass 1: what does each rank contribute?
            def record(t, rank=rank):
                contributions[rank].append(t.clone() if isinstance(t, torch.Tensor) else t)
                return t
            fn(x.clone(), *shards(rank), record)
        counts = [len(c) for c in contributions]
        for rank in range(world):                     # pass 2: the sums a real all-reduce would return
            def summed(t, rank=rank):
                k = calls[rank]
                calls[rank] += 1
                if k >= min(counts):
                    return t  # more calls than some rank made: reported as unequal counts below
                return sum(contributions[r][k] for r in range(world))
            results[rank] = fn(x.clone(), *shards(rank), summed)
    except BaseException as error:  # noqa: BLE001 - reported by the caller
        return results, calls, error
    return results, counts, None


@exercise("12.2", "the all-reduce of a tensor-parallel MLP")
def tp_mlp(fn) -> int:
    """N = 2 and 4 ranks, each with its shards; all_reduce sums over them (replayed: see ``_run_ranks``) and
    counts the calls. Every rank must return the dense SwiGLU MLP's output, with exactly one all-reduce."""
    rng = random.Random()
    cases = 0
    for world in (2, 4):
        T, E, I = rng.randint(1, 6), rng.randint(2, 9), world * rng.randint(1, 4)
        x = torch.randn(T, E, dtype=torch.float64)
        gate_up = torch.randn(2 * I, E, dtype=torch.float64) / E ** 0.5
        down = torch.randn(E, I, dtype=torch.float64) / I ** 0.5
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        expected = F.linear(F.silu(gate) * up, down)
        results, calls, error = _run_ranks(fn, world, x, gate_up, down, I)
        case = f"T={T}, E={E}, I={I}, {world} ranks"
        if error is not None:
            raise error
        if any(c != calls[0] for c in calls):
            fail(f"the ranks called all_reduce different numbers of times: {calls}", case=case,
                 hint="every rank must make the same collective calls, or they wait for each other forever")
        if calls[0] != 1:
            fail(f"all_reduce was called {calls[0]} times per rank; the MLP needs exactly one", case=case,
                 hint="gate/up are column-parallel (no communication); only down_proj's partial sums are added")
        for rank, got in enumerate(results):
            if not isinstance(got, torch.Tensor):
                fail(f"rank {rank} returned {type(got).__name__}, not a tensor", case=case,
                     hint="return what all_reduce returned")
            hint = ("all-reduce the output of down (a partial sum over this rank's I/N features), not the "
                    "gate/up activations: SwiGLU is not linear, so silu(a + b) != silu(a) + silu(b)")
            assert_close(got, expected, what=f"rank {rank}'s output", case=case, hint=hint)
        cases += 1
    return cases


@exercise("12.3", "the 1F1B schedule")
def one_f_one_b(fn) -> int:
    """p in 1..5, m in 1..9, every stage: the package's schedule, and its invariants (each micro-batch once
    forward then once backward; at most p − s micro-batches held)."""
    cases = 0
    for p in range(1, 6):
        for m in (1, 2, 3, p, p + 1, 9):
            for s in range(p):
                case = f"num_stages={p}, num_micro={m}, stage={s}"
                got = call_student(fn, p, m, s, case=case)
                try:
                    got = [(str(op), int(i)) for op, i in got]
                except (TypeError, ValueError):
                    fail(f"expected a list of (op, micro-batch) pairs such as ('F', 0), got {got!r}", case=case)
                expected = one_f_one_b_schedule(p, m, s)
                if sorted(got) != sorted(expected):
                    fail(f"expected each micro-batch 0..{m - 1} once as 'F' and once as 'B', got {got}", case=case)
                held = peak = 0
                for op, _ in got:
                    held += 1 if op == "F" else -1
                    peak = max(peak, held)
                if got != expected:
                    hint = (f"warm-up: min(p - s - 1, m) = {min(p - s - 1, m)} forwards; then F, B pairs; then the "
                            "remaining backwards, in micro-batch order")
                    if peak > p - s:
                        hint = f"this order holds {peak} micro-batches at once; 1F1B holds at most p - s = {p - s}. " + hint
                    fail(f"expected {expected}, got {got}", case=case, hint=hint)
                cases += 1
    return cases


def _loop_dispatch(experts: torch.Tensor, num_experts: int, capacity: int) -> list[int]:
    seen = [0] * num_experts
    out = []
    for e in experts.reshape(-1).tolist():
        out.append(e * capacity + seen[e] if seen[e] < capacity else -1)
        seen[e] += 1
    return out


@exercise("12.4", "the MoE dispatch permutation")
def dispatch_permutation(fn) -> int:
    """Random routings (T up to 40, k 1..3 distinct experts per token, X 2..8), capacities from 1 to T·k:
    compared with a loop over the pairs in token-then-choice order."""
    rng = random.Random()
    cases = 0
    for _ in range(12):
        X, k = rng.randint(2, 8), rng.randint(1, 3)
        k = min(k, X)
        T = rng.randint(1, 40)
        experts = torch.stack([torch.randperm(X)[:k] for _ in range(T)])
        for capacity in (1, max(1, T * k // X), T * k):
            case = f"experts (T={T}, k={k}) = {experts.tolist()[:6]}{' …' if T > 6 else ''}, X={X}, capacity={capacity}"
            got = call_student(fn, experts.clone(), X, capacity, case=case)
            got = torch.as_tensor(got).reshape(-1).tolist()
            expected = _loop_dispatch(experts, X, capacity)
            if got != expected:
                bad = next(j for j, (a, b) in enumerate(zip(got + [None] * len(expected), expected)) if a != b)
                fail(f"slot of pair {bad} (token {bad // k}, choice {bad % k}, expert "
                     f"{experts.reshape(-1)[bad].item()}): expected {expected[bad]}, got "
                     f"{got[bad] if bad < len(got) else 'nothing'}", case=case,
                     hint="position = how many earlier pairs (token-major) chose the same expert; "
                          "slot = expert * capacity + position, or -1 when position >= capacity")
            cases += 1
    return cases
