"""Message classes for small protos, built at run time from a field table (no protoc, no generated code).

Istio's own protos (the CA service's messages, the DNS name table) are on no PyPI package; they are a handful of
fields each, so each is written here as a table mirroring its `.proto` and added to protobuf's default descriptor
pool (so `Any.Unpack` and `json_format` resolve them like any generated message). Field numbers are the wire
contract: each table's test compares it with Istio's `.proto` text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto

# Scalar type names as they are written in a .proto file.
SCALARS = {
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "bool": _F.TYPE_BOOL,
    "double": _F.TYPE_DOUBLE,
}


@dataclass(frozen=True)
class Field:
    """One field: `type` is a scalar name ("string") or a message's full name (".google.protobuf.Struct", or
    ".pkg.Message" for one of the file's own). `map_key` makes it `map<map_key, type>`."""

    name: str
    number: int
    type: str
    repeated: bool = False
    map_key: str | None = None


@dataclass(frozen=True)
class Message:
    name: str
    fields: Sequence[Field]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _add_field(message: descriptor_pb2.DescriptorProto, field: Field, full_name: str) -> None:
    proto = message.field.add(name=field.name, number=field.number, json_name=_json_name(field.name))
    if field.map_key is not None:
        # A map is a repeated nested "<Name>Entry" message with key = 1, value = 2 and the map_entry option.
        entry = message.nested_type.add(name=f"{_camel(field.name)}Entry")
        entry.options.map_entry = True
        _add_field(entry, Field("key", 1, field.map_key), f"{full_name}.{entry.name}")
        _add_field(entry, Field("value", 2, field.type), f"{full_name}.{entry.name}")
        proto.label = _F.LABEL_REPEATED
        proto.type = _F.TYPE_MESSAGE
        proto.type_name = f"{full_name}.{entry.name}"
        return
    proto.label = _F.LABEL_REPEATED if field.repeated else _F.LABEL_OPTIONAL
    if field.type in SCALARS:
        proto.type = SCALARS[field.type]
    else:
        proto.type = _F.TYPE_MESSAGE
        proto.type_name = field.type


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def build(
    file_name: str, package: str, messages: Sequence[Message], dependencies: Sequence[str] = ()
) -> dict[str, Any]:
    """Add the file to the default descriptor pool; return {message name: class}. Dependencies (e.g.
    "google/protobuf/struct.proto") must already be in the pool: import their generated module first. Building
    the same file twice returns the classes of the first build."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(file_name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(name=file_name, package=package, syntax="proto3")
        proto.dependency.extend(dependencies)
        for message in messages:
            described = proto.message_type.add(name=message.name)
            for field in message.fields:
                _add_field(described, field, f".{package}.{message.name}")
        pool.AddSerializedFile(proto.SerializeToString())
    return {
        message.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{message.name}"))
        for message in messages
    }
