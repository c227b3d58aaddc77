"""Chapter 12's checks: the solution's answers pass, the chapter's stubs say "not implemented yet", and
wrong answers fail with a message that names the problem (a transposed split, the all-reduce in the
wrong place or twice, GPipe passed off as 1F1B, drops counted per rank instead of per expert)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miniinfer.course import CheckFailed, NotImplementedYet
from miniinfer.course import check as checks
from miniinfer.course.notebooks import chapters_dir, solutions_dir
from miniinfer.distributed.pp import gpipe_schedule
from tests.chapter_answers import exercise_answers

CHAPTER = "12_parallelism"
EXERCISES = ["shard_linear", "tp_mlp", "one_f_one_b", "dispatch_permutation"]


def _answers(path) -> dict:
    return exercise_answers(path, "import torch\n")


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_and_stub_is_not_implemented(name):
    getattr(checks, name)(_answers(solutions_dir() / f"{CHAPTER}.py")[name])
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        getattr(checks, name)(_answers(chapters_dir() / f"{CHAPTER}.py")[name])


def _swapped_split(weight, rank, world, kind):
    size = weight.shape[1 if kind == "column" else 0] // world
    return weight[:, rank * size:(rank + 1) * size] if kind == "column" else weight[rank * size:(rank + 1) * size]


def _interleaved_rows(weight, rank, world, kind):  # rank r takes rows r, r+N, ...: the right shape, wrong order
    return weight[rank::world] if kind == "column" else weight[:, rank * (weight.shape[1] // world):
                                                               (rank + 1) * (weight.shape[1] // world)]


def _reduce_gate_up(x, gate_up, down, all_reduce):
    gate, up = all_reduce(F.linear(x, gate_up)).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def _reduce_twice(x, gate_up, down, all_reduce):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    all_reduce(gate.clone())
    return all_reduce(F.linear(F.silu(gate) * up, down))


def _no_reduce(x, gate_up, down, all_reduce):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def _drop_none(experts, num_experts, capacity):
    flat = experts.reshape(-1)
    position = (F.one_hot(flat, num_experts).cumsum(0) - 1).gather(1, flat[:, None])[:, 0]
    return flat * capacity + position


def _expert_major(experts, num_experts, capacity):  # positions counted choice-major (all first choices first)
    flat = experts.t().reshape(-1)
    position = (F.one_hot(flat, num_experts).cumsum(0) - 1).gather(1, flat[:, None])[:, 0]
    slot = torch.where(position < capacity, flat * capacity + position, torch.full_like(flat, -1))
    return slot.reshape(experts.shape[1], -1).t().reshape(-1)


WRONG = [
    ("shard_linear", _swapped_split, "shape"),
    ("shard_linear", _interleaved_rows, "recombined"),
    ("tp_mlp", _reduce_gate_up, "output"),
    ("tp_mlp", _reduce_twice, "called 2 times"),
    ("tp_mlp", _no_reduce, "called 0 times"),
    ("one_f_one_b", gpipe_schedule, "at most p - s"),
    ("dispatch_permutation", _drop_none, "expected"),
    ("dispatch_permutation", _expert_major, "expected"),
]


@pytest.mark.parametrize("name, wrong, message", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_wrong_answers_fail_with_a_message(name, wrong, message):
    with pytest.raises(CheckFailed, match=message) as info:
        getattr(checks, name)(wrong)
    assert "hint" in str(info.value).lower() or "expected" in str(info.value)
