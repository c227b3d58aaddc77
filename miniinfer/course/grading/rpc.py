"""Calls across the wire: each side exports its objects by handle and holds proxies for the other's.

The grader calls a student's function through a :class:`StudentProxy`; the call runs in the student's
kernel, and the result comes back as data (:mod:`~miniinfer.course.grading.wire`). While the student's
function runs it may call back objects the check handed it (a model, a cache, a choice rule): those
reach the grader as requests, served in the grader's process on the grader's objects, and their
results go back as data. Calls nest freely; each side serves the other's requests while it waits for
its own reply.

After a call the student's kernel also sends back its copies of the arguments, and the grader writes
them into its own (:func:`merge_back`): a function that changes its input in place is seen doing so,
exactly as if it had run in the grader's process.

Only a few operations cross: call, item access, and (for the grader's objects) reading public
attributes, ``len``, iteration, ``repr``, ``bool`` and ``in``. Nothing can set an attribute of a grader
object, read a private one (``_x``, ``__globals__``, …) or send code.
"""

from __future__ import annotations

import builtins
import dataclasses
import threading
import time
import traceback

import torch

from miniinfer.course.grading import wire

__all__ = ["Peer", "StudentProxy", "GraderProxy", "StudentTimeout", "StudentGone", "RemoteError", "merge_back"]


class StudentTimeout(BaseException):
    """The student's side did not answer before the deadline (a BaseException: checks cannot catch it)."""


class StudentGone(BaseException):
    """The student's kernel closed the connection or died."""


class RemoteError(Exception):
    """An exception raised on the other side; its class is named like the original (``CompilationError``)."""


_NOT_REBUILT = (StopIteration, StopAsyncIteration, GeneratorExit)


def rebuild_exception(name: str, message: str) -> Exception:
    """A local exception standing for the other side's ``name: message`` (builtin types are kept)."""
    cls = getattr(builtins, name, None) if isinstance(name, str) and name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, _NOT_REBUILT):
        try:
            return cls(message)
        except Exception:  # exceptions whose constructor wants more arguments (UnicodeDecodeError, …)
            pass
    safe_name = name if isinstance(name, str) and name.isidentifier() else "RemoteError"
    return type(safe_name, (RemoteError,), {})(message)


def _is_stub_error(error: BaseException) -> bool:
    from miniinfer.course.checking import _is_stub_error as is_stub

    return is_stub(error)


def _student_line(error: BaseException) -> str:
    """Where in the student's own code ``error`` was raised: the innermost frame outside the libraries."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not any(part in frame.filename for part in ("miniinfer", "torch", "triton", "site-packages")):
            return f"\n  at line {frame.lineno}: {frame.line}" if frame.line else ""
    return ""


class Peer:
    """One end of a connection: exports local objects by handle, proxies remote ones, serves requests.

    ``own`` is this side's handle letter (``"G"`` for the grader, ``"S"`` for the student's kernel).
    """

    def __init__(self, connection, own: str, max_message_bytes: int = wire.MAX_MESSAGE_BYTES):
        self.connection = connection
        self.own, self.other = own, ("S" if own == "G" else "G")
        self.max_message_bytes = max_message_bytes
        self.deadline: float | None = None  # time.monotonic() value after which waiting raises StudentTimeout
        self._exported: dict[int, object] = {}
        self._number_of: dict[int, int] = {}  # id(obj) -> handle number (exported objects stay alive)
        self._proxies: dict[int, object] = {}
        # One conversation at a time: the pipe carries a single exchange, so a second thread's request
        # would interleave its messages with the first one's. Nested requests on the same thread (a call
        # served while waiting for a reply) are fine; another thread gets a clear error, not a garbled wire.
        self._guard = threading.Lock()
        self._owner: int | None = None  # the thread inside request(), if any
        self._depth = 0

    # -- handles ----------------------------------------------------------------------------------------
    def handle_for(self, obj) -> tuple[str, int]:
        if isinstance(obj, (StudentProxy, GraderProxy)) and obj._peer is self:
            return (self.other, obj._number)
        if isinstance(obj, type) or type(obj).__name__ == "module":
            raise wire.WireError(f"cannot send {obj!r:.60} (modules and classes never cross)")
        number = self._number_of.get(id(obj))
        if number is None:
            number = self._number_of[id(obj)] = len(self._exported) + 1
            self._exported[number] = obj
        return (self.own, number)

    def resolve(self, kind: str, number: int):
        if kind == self.own:
            if number not in self._exported:
                raise wire.WireError(f"unknown handle {kind}{number}")
            return self._exported[number]
        proxy = self._proxies.get(number)
        if proxy is None:
            proxy_class = StudentProxy if self.own == "G" else GraderProxy
            proxy = self._proxies[number] = proxy_class(self, number)
        return proxy

    # -- messages ---------------------------------------------------------------------------------------
    def send(self, payload) -> None:
        try:
            self.connection.send_bytes(wire.encode(payload, self.handle_for))
        except (OSError, EOFError) as error:
            raise StudentGone(f"the connection closed: {error}") from None

    def receive(self):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            try:
                ready = remaining > 0 and self.connection.poll(remaining)
            except (OSError, EOFError) as error:
                raise StudentGone(f"the connection closed: {error}") from None
            if not ready:
                raise StudentTimeout("no answer before the deadline")
        try:
            raw = self.connection.recv_bytes(self.max_message_bytes)
        except (OSError, EOFError) as error:
            raise StudentGone(f"the connection closed: {error}") from None
        return wire.decode(raw, self.resolve)

    def request(self, op: str, *args):
        """Ask the other side to perform ``op``; serve its requests meanwhile; return (value, echo)."""
        me = threading.get_ident()
        with self._guard:
            if self._owner not in (None, me):
                raise RuntimeError("the other side was called from two threads at once; calls across the "
                                   "grader's connection must come from one thread (run the ranks or workers "
                                   "one after another)")
            self._owner, self._depth = me, self._depth + 1
        try:
            return self._exchange(op, args)
        finally:
            with self._guard:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None

    def _exchange(self, op: str, args):
        self.send(("call", op, args))
        while True:
            message = self.receive()
            if not isinstance(message, tuple) or not message:
                raise wire.WireError("malformed message")
            if message[0] == "call" and len(message) == 3:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    raise StudentTimeout("still asking for work after the deadline")
                self.serve_one(message[1], message[2])
            elif message[0] == "return" and len(message) == 3:
                return message[1], message[2]
            elif message[0] == "raise" and len(message) == 4:
                _, name, text, stub = message
                if stub is True:
                    raise NotImplementedError(str(text))
                raise rebuild_exception(str(name), str(text))
            else:
                raise wire.WireError(f"unexpected message {message[0]!r:.40}")

    def serve_one(self, op, args) -> None:
        """Perform one request from the other side and send back its result or its exception."""
        try:
            value, echo = self.perform(op, args)
        except Exception as error:  # BaseExceptions (interrupts, the grader's timeouts) end the serving
            self.send(("raise", type(error).__name__, f"{error}{_student_line(error)}", _is_stub_error(error)))
            return
        try:
            reply = wire.encode(("return", value, echo), self.handle_for)
        except wire.WireError as error:
            self.send(("raise", "WireError", f"the result cannot be sent to the grader: {error}", False))
            return
        try:
            self.connection.send_bytes(reply)
        except (OSError, EOFError) as error:
            raise StudentGone(f"the connection closed: {error}") from None

    def perform(self, op, args):  # pragma: no cover - each side defines its operations
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# Proxies
# ------------------------------------------------------------------------------------------------

class StudentProxy:
    """The grader's stand-in for an object in the student's kernel (a function, a Triton kernel, …).

    Calling it runs the call in the kernel; item access does too (``kernel[grid](…)``). It compares,
    hashes and tests true like a plain object, never by asking the student.
    """

    __slots__ = ("_peer", "_number")

    def __init__(self, peer: Peer, number: int):
        self._peer, self._number = peer, number

    def __call__(self, *args, **kwargs):
        value, echo = self._peer.request("call", self, args, kwargs)
        if isinstance(echo, tuple) and len(echo) == 2:
            merge_back(args, echo[0])
            merge_back(kwargs, echo[1])
        return value

    def __getitem__(self, key):
        return self._peer.request("getitem", self, key)[0]

    def __repr__(self) -> str:
        return f"<the student's object #{self._number}>"


class GraderProxy:
    """The student's stand-in for an object of the grader (a model, a cache, a rule, a tree node).

    Public attributes, calls, items, ``len``, iteration, ``repr``, ``bool`` and ``in`` are forwarded;
    setting attributes is refused: the grader's objects are read-only from the student's side.
    """

    __slots__ = ("_peer", "_number")

    def __init__(self, peer: Peer, number: int):
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_number", number)

    def _ask(self, op, *args):
        return self._peer.request(op, self, *args)[0]

    def __call__(self, *args, **kwargs):
        return self._ask("call", args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._ask("getattr", name)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot set {name!r}: the grader's objects are read-only here")

    def __getitem__(self, key):
        return self._ask("getitem", key)

    def __len__(self) -> int:
        return self._ask("len")

    def __iter__(self):
        return iter(self._ask("iter"))

    def __contains__(self, item) -> bool:
        return self._ask("contains", item)

    def __bool__(self) -> bool:
        return self._ask("bool")

    def __repr__(self) -> str:
        return self._ask("repr")


# ------------------------------------------------------------------------------------------------
# Writing the student's changes to the arguments back into the grader's objects
# ------------------------------------------------------------------------------------------------

def _copy_storage(original: torch.Tensor, returned: torch.Tensor) -> None:
    """Overwrite ``original``'s whole storage with ``returned``'s (same size), as an in-place write would."""
    source, target = returned.untyped_storage(), original.untyped_storage()
    if source.nbytes() != target.nbytes() or returned.dtype != original.dtype:
        return  # the student's copy cannot have come from this tensor: nothing sensible to write back
    raw_target = torch.empty(0, dtype=torch.uint8, device=original.device).set_(target)
    raw_source = torch.empty(0, dtype=torch.uint8, device=returned.device).set_(source)
    if not torch.equal(raw_target.cpu(), raw_source.cpu()):
        raw_target.copy_(raw_source)


def _same(value, original) -> bool:
    """``value`` is ``original``, or an equal immutable value (an int, a string, …)."""
    if value is original:
        return True
    if isinstance(original, torch.Tensor) or type(value) is not type(original):
        return False
    try:
        return bool(value == original)
    except Exception:
        return False


def merge_back(original, returned):
    """Make ``original`` (the grader's argument) hold what the student's copy holds after the call.

    Tensors, lists, dicts, sets and (non-frozen) dataclasses are updated in place, recursively; the
    value to keep for an immutable one is returned.
    """
    if original is returned:
        return original
    if isinstance(original, torch.Tensor) and isinstance(returned, torch.Tensor):
        _copy_storage(original, returned)
        return original
    if type(original) is list and isinstance(returned, list):
        original[:] = [merge_back(o, r) for o, r in zip(original, returned)] + returned[len(original):]
        return original
    if type(original) is dict and isinstance(returned, dict):
        merged = {key: merge_back(original[key], value) if key in original else value
                  for key, value in returned.items()}
        original.clear()
        original.update(merged)
        return original
    if type(original) is set and isinstance(returned, set):
        original.clear()
        original.update(returned)
        return original
    if isinstance(original, tuple) and isinstance(returned, tuple):
        merged = [merge_back(o, r) for o, r in zip(original, returned)]
        unchanged = len(original) == len(returned) and all(_same(m, o) for m, o in zip(merged, original))
        return original if unchanged else tuple(merged) + returned[len(original):]
    if (dataclasses.is_dataclass(original) and type(returned) is type(original)
            and not type(original).__dataclass_params__.frozen):
        for field in dataclasses.fields(original):
            setattr(original, field.name, merge_back(getattr(original, field.name), getattr(returned, field.name)))
        return original
    return returned
