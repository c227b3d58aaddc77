"""The grader's connection carries one exchange at a time: a second thread calling the student's side
while a first call is in flight gets a clear error, instead of interleaving messages on the pipe (which
once failed a correct solution with a WireError). Nested calls on one thread still work."""

from __future__ import annotations

import threading
from multiprocessing import Pipe

import pytest

from miniinfer.course.grading.grader import _GraderPeer
from miniinfer.course.grading.worker import _WorkerPeer


@pytest.fixture
def peers():
    grader_end, student_end = Pipe()
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(10)
        return 1

    def calls_back(callback):  # the student's code calling an object the grader handed it: nesting
        return callback(20) + 1

    student = _WorkerPeer(student_end, {"slow": slow, "calls_back": calls_back})

    def serve():
        while not student.finished:
            message = student.receive()
            student.serve_one(message[1], message[2])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    grader = _GraderPeer(grader_end)
    functions = grader.request("lookup", ["slow", "calls_back"])[0]
    yield grader, functions, started, release
    release.set()
    grader.request("bye")
    server.join(5)


def test_a_second_thread_gets_a_clear_error_and_the_first_call_completes(peers):
    grader, functions, started, release = peers
    results = []
    first = threading.Thread(target=lambda: results.append(functions["slow"]()))
    first.start()
    assert started.wait(10)
    with pytest.raises(RuntimeError, match="two threads at once"):
        functions["slow"]()
    release.set()
    first.join(10)
    assert results == [1]
    assert functions["slow"]() == 1  # the connection is still in step


def test_nested_calls_on_one_thread_still_work(peers):
    grader, functions, started, release = peers
    assert functions["calls_back"](lambda x: x * 2) == 41
