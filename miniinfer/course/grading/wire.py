"""What may cross between the grader and a student's kernel, and how it is encoded.

**By value** (a copy arrives): ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``,
tuples, lists, dicts, sets, slices, ranges, ``torch.dtype``/``torch.device``/``torch.Size``, tensors,
and instances of the package's dataclasses and enums (``Qwen2Config``, ``SamplingParams``, …).
A tensor travels with its *whole* storage, so a view still sees (and may scribble on) the bytes around
it, and tensors that share a storage in one message still share it on arrival.

**By reference** (everything else: functions, Triton kernels, models, caches, tree nodes): the other
side receives a numbered handle and a proxy that forwards calls to the owner.

Decoding uses a restricted unpickler on *both* sides: it rebuilds only the types above and the
handles; any other class named in a message is refused (:class:`WireError`) instead of being
imported or called. So a student's kernel can send the grader data, never code.

A message is ``pickle((payload, [storage bytes, …]))``; the payload refers to tensors and handles
through pickle's persistent ids::

    ("T", dtype name, shape, stride, storage offset, storage index, device)   a tensor
    ("G", n)   object n of the grader            ("S", n)   object n of the student
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import pickle
import sys

import torch

__all__ = ["WireError", "encode", "decode", "is_plain_data", "MAX_MESSAGE_BYTES"]

MAX_MESSAGE_BYTES = 1 << 30  # one message (arguments or a result) may not exceed 1 GiB

_EXACT_VALUE_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, tuple, list, dict, set,
                      frozenset, slice, range, torch.dtype, torch.device, torch.Size, collections.OrderedDict)
_CONTAINERS = {"tuple": tuple, "list": list, "dict": dict, "set": set, "frozenset": frozenset}
_CHEAP_BUILTINS = {"slice": slice, "range": range, "complex": complex}  # O(1) to build from any arguments
_DTYPES = {str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)}


class WireError(Exception):
    """A message could not be encoded or was refused on decoding (a forbidden type, a bad tensor)."""


def _package_data_class(cls) -> bool:
    """A dataclass or enum of the package outside ``miniinfer.course``: plain data, safe to rebuild."""
    module = getattr(cls, "__module__", "") or ""
    return (isinstance(cls, type) and module.startswith("miniinfer.") and not module.startswith("miniinfer.course")
            and (dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)))


def is_plain_data(obj) -> bool:
    """True when ``obj`` itself is copied across (its contents are looked at one by one)."""
    return (type(obj) in _EXACT_VALUE_TYPES or isinstance(obj, (torch.Tensor, tuple, list, dict, set, frozenset))
            or _package_data_class(type(obj)))


class _Encoder(pickle.Pickler):
    """Pickles plain data by value, tensors as (metadata, storage index), the rest as handles."""

    def __init__(self, file, handle_for):
        super().__init__(file, protocol=5)
        self.handle_for = handle_for  # obj -> ("G" | "S", n): the owner side's handle for a by-reference object
        self.storages: list[bytes] = []
        self._storage_index: dict[tuple, int] = {}

    def persistent_id(self, obj):
        if type(obj) in _EXACT_VALUE_TYPES or isinstance(obj, type):
            return None  # a class is written by name; the receiving side rebuilds only those it allows
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if is_plain_data(obj):
            return None
        return self.handle_for(obj)

    def reducer_override(self, obj):
        # Subclasses of the containers (namedtuples, defaultdicts, …) travel as the plain container.
        if type(obj) in _EXACT_VALUE_TYPES:
            return NotImplemented
        for base in (tuple, list, dict, set, frozenset):
            if isinstance(obj, base):
                return base, (base(obj),)
        return NotImplemented

    def _tensor(self, tensor: torch.Tensor) -> tuple:
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
            raise WireError(f"cannot send a {tensor.layout} tensor (only dense, strided tensors cross)")
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), str(storage.device), storage.nbytes())
        index = self._storage_index.get(key)
        if index is None:
            raw = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            self.storages.append(raw.cpu().numpy().tobytes())
            index = self._storage_index[key] = len(self.storages) - 1
        return ("T", str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), tuple(tensor.stride()),
                tensor.storage_offset(), index, str(tensor.device))


def encode(payload, handle_for) -> bytes:
    """``payload`` as one message; ``handle_for(obj)`` names each object that crosses by reference."""
    buffer = io.BytesIO()
    encoder = _Encoder(buffer, handle_for)
    try:
        encoder.dump(payload)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise WireError(f"cannot send this value: {error}") from None
    message = pickle.dumps((buffer.getvalue(), encoder.storages), protocol=5)
    if len(message) > MAX_MESSAGE_BYTES:
        raise WireError(f"a message of {len(message) / 2**20:.0f} MiB is larger than the limit")
    return message


class _Decoder(pickle.Unpickler):
    """Rebuilds only plain data, tensors and handles; names of any other class are refused."""

    def __init__(self, file, storages: list, resolve):
        super().__init__(file)
        self.storages = storages
        self.resolve = resolve  # ("G" | "S", n) -> the object or a proxy for it

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _CHEAP_BUILTINS:
            return _CHEAP_BUILTINS[name]
        if module == "builtins" and name in _CONTAINERS:
            return _copy_container(_CONTAINERS[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and (name in ("Size", "device") or name in _DTYPES):
            return getattr(torch, name)
        if module.startswith("miniinfer.") and "." not in name and module in sys.modules:
            # Only classes of modules already imported: a message never makes us import anything.
            cls = getattr(sys.modules[module], name, None)
            if _package_data_class(cls):
                return cls
        raise WireError(f"refused an object of type {module}.{name} (only data, tensors and handles cross)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise WireError(f"malformed reference {pid!r:.80}")
        if pid[0] == "T" and len(pid) == 7:
            return self._tensor(*pid[1:])
        if pid[0] in ("G", "S") and len(pid) == 2 and type(pid[1]) is int:
            return self.resolve(pid[0], pid[1])
        raise WireError(f"malformed reference {pid!r:.80}")

    def _tensor(self, dtype_name, shape, stride, offset, index, device) -> torch.Tensor:
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        ints = (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride)
                and all(type(v) is int and v >= 0 for v in (*shape, *stride, offset, index)))
        if dtype is None or not ints or index >= len(self.storages) or not isinstance(device, str):
            raise WireError("malformed tensor")
        raw = self.storages[index]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if all(shape) and offset + sum((n - 1) * s for n, s in zip(shape, stride)) >= len(raw) // itemsize:
            raise WireError("a tensor reaches past the end of its storage")
        storage = (torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8))
        tensor = torch.empty(0, dtype=dtype).set_(storage.untyped_storage(), offset, shape, stride)
        if device != "cpu" and device.startswith("cuda") and torch.cuda.is_available():
            tensor = tensor.to(device)
        return tensor


def _copy_container(kind: type):
    """``kind(x)`` only for an ``x`` the message already holds (never ``list(range(10**12))``)."""

    def rebuild(*args):
        if len(args) > 1 or (args and not isinstance(args[0], (tuple, list, dict, set, frozenset))):
            raise WireError(f"refused {kind.__name__}() of {type(args[0]).__name__}")
        return kind(*args)

    return rebuild


class _EnvelopeDecoder(pickle.Unpickler):
    def find_class(self, module, name):
        raise WireError(f"refused {module}.{name} in a message envelope")


def decode(message: bytes, resolve):
    """The payload of ``message``; ``resolve(kind, n)`` turns each handle into an object or a proxy."""
    try:
        envelope = _EnvelopeDecoder(io.BytesIO(message)).load()
        if (not isinstance(envelope, tuple) or len(envelope) != 2 or not isinstance(envelope[0], bytes)
                or not isinstance(envelope[1], list) or not all(isinstance(b, bytes) for b in envelope[1])):
            raise WireError("malformed message")
        storages = [bytearray(b) for b in envelope[1]]
        return _Decoder(io.BytesIO(envelope[0]), storages, resolve).load()
    except WireError:
        raise
    except Exception as error:  # truncated or hand-crafted pickles end here, never in the caller
        raise WireError(f"unreadable message: {type(error).__name__}: {error}") from None
