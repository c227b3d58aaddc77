"""The student's side of a check: runs inside the student's kernel, serving the grader's calls.

The grader executes one line in the kernel, ``serve(address, globals())``: it connects back to the
grader and answers requests until the grader says goodbye:

* ``lookup(names)``: handles for the notebook's objects of those names (absent names are left out);
* ``call(f, args, kwargs)``: run ``f(*args, **kwargs)``; reply with the result *and* the arguments
  as they are afterwards (so the grader sees in-place changes);
* ``getitem(obj, key)``: ``obj[key]`` (a Triton kernel's ``kernel[grid]``).

Nothing here is trusted: the student's code may replace this module, and the grader only ever
receives data through :mod:`~miniinfer.course.grading.wire`'s restricted decoder.
"""

from __future__ import annotations

from multiprocessing.connection import Client

from miniinfer.course.grading import rpc

__all__ = ["serve"]


class _WorkerPeer(rpc.Peer):
    def __init__(self, connection, namespace: dict):
        super().__init__(connection, own="S")
        self.namespace = namespace
        self.finished = False

    def perform(self, op, args):
        if op == "lookup":
            (names,) = args
            return {name: self.namespace[name] for name in names if name in self.namespace}, None
        if op == "call":
            target, call_args, call_kwargs = args
            result = target(*call_args, **call_kwargs)
            return result, (call_args, call_kwargs)
        if op == "getitem":
            target, key = args
            return target[key], None
        if op == "bye":
            self.finished = True
            return None, None
        raise ValueError(f"unknown request {op!r}")


def serve(address: str, namespace: dict) -> None:
    """Connect to the grader at ``address`` and serve its requests on ``namespace`` until it says bye."""
    connection = Client(address, family="AF_UNIX")
    peer = _WorkerPeer(connection, namespace)
    try:
        while not peer.finished:
            message = peer.receive()
            if isinstance(message, tuple) and len(message) == 3 and message[0] == "call":
                peer.serve_one(message[1], message[2])
    except rpc.StudentGone:
        pass  # the grader hung up (after a timeout): nothing more to do
    finally:
        connection.close()
