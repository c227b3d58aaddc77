"""Chapter 13's checks: the solution's answers pass, the chapter's stubs say "not implemented yet", and
wrong answers fail with a message that names the problem (no line splitting in SSE, a missing blank
line, a queue touched from the wrong thread, a lost item, a Retry-After rounded down or unclamped)."""

from __future__ import annotations

import math

import pytest

from miniinfer.course import CheckFailed, NotImplementedYet
from miniinfer.course import check as checks
from miniinfer.course.notebooks import chapters_dir, solutions_dir
from tests.chapter_answers import exercise_answers

CHAPTER = "13_serving"
EXERCISES = ["format_sse", "deliver", "admission"]


def _answers(path) -> dict:
    return exercise_answers(path, "", namespace={"math": math})


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_and_stub_is_not_implemented(name):
    getattr(checks, name)(_answers(solutions_dir() / f"{CHAPTER}.py")[name])
    if not (chapters_dir() / f"{CHAPTER}.py").exists():
        pytest.skip("the student chapter is not generated yet")
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        getattr(checks, name)(_answers(chapters_dir() / f"{CHAPTER}.py")[name])


def _one_data_line(data, event=None):
    return f"data: {data}\n\n"


def _no_blank_line(data, event=None):
    return "".join(f"data: {line}\n" for line in data.split("\n"))


def _unsafe_put(loop, queue, item):
    queue.put_nowait(item)


_dropped = {"n": 0}


def _drops_every_fifth(loop, queue, item):
    _dropped["n"] += 1
    if _dropped["n"] % 5:
        loop.call_soon_threadsafe(queue.put_nowait, item)


def _rounds_down(num_waiting, max_waiting, rate):
    if num_waiting < max_waiting:
        return None
    return 1 if rate <= 0 else max(1, min(60, int((num_waiting - max_waiting + 1) / rate)))


def _unclamped(num_waiting, max_waiting, rate):
    if num_waiting < max_waiting:
        return None
    return 1 if rate <= 0 else max(1, math.ceil((num_waiting - max_waiting + 1) / rate))


def _off_by_one(num_waiting, max_waiting, rate):
    if num_waiting <= max_waiting:
        return None
    return 1 if rate <= 0 else max(1, min(60, math.ceil((num_waiting - max_waiting + 1) / rate)))


WRONG = [
    ("format_sse", _one_data_line, "one 'data: ' line per line"),
    ("format_sse", _no_blank_line, "blank line"),
    ("deliver", _unsafe_put, "call_soon_threadsafe"),
    ("deliver", _drops_every_fifth, "did not reach"),
    ("admission", _rounds_down, "math.ceil"),
    ("admission", _unclamped, "clamp"),
    ("admission", _off_by_one, "num_waiting >= max_waiting"),
]


@pytest.mark.parametrize("name,wrong,message", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answers_fail_with_a_useful_message(name, wrong, message):
    with pytest.raises(CheckFailed, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        getattr(checks, name)(wrong)
    assert not isinstance(info.value, NotImplementedYet)
