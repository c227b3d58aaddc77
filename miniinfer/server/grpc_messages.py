"""The gRPC message classes, built at import time from the serialized descriptor of miniinfer.proto.

``GenerateRequest``, ``GenerateResponse``, ``Sampling``, ``TokenIds``, ``Completion``, ``TokenLogprob``
are ordinary protobuf message classes (``SerializeToString``, ``FromString``, field access), the same
as protoc's ``miniinfer_pb2`` would give (see :mod:`miniinfer.server.grpc_codegen` for why we do not
commit that module).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from miniinfer.server.proto.descriptor import FILE_DESCRIPTOR

__all__ = ["GenerateRequest", "GenerateResponse", "Sampling", "TokenIds", "Completion", "TokenLogprob",
           "SERVICE", "GENERATE", "GENERATE_STREAM"]

_pool = descriptor_pool.DescriptorPool()  # our own pool: no clash with any other copy of these messages
_file = _pool.Add(descriptor_pb2.FileDescriptorProto.FromString(FILE_DESCRIPTOR))


def _message(name: str):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"miniinfer.v1.{name}"))


TokenIds = _message("TokenIds")
Sampling = _message("Sampling")
GenerateRequest = _message("GenerateRequest")
TokenLogprob = _message("TokenLogprob")
Completion = _message("Completion")
GenerateResponse = _message("GenerateResponse")

SERVICE = "miniinfer.v1.Generator"
GENERATE = f"/{SERVICE}/Generate"
GENERATE_STREAM = f"/{SERVICE}/GenerateStream"
