"""Decoding of the protobuf request bodies kubectl's typed clients send for a few kinds.

Imperative kubectl commands (``kubectl create configmap``, ``create secret``, ``create
namespace``) send ``application/vnd.kubernetes.protobuf``: the bytes ``k8s\\0`` and a
``runtime.Unknown`` message whose ``raw`` field contains the object. This module decodes the
protobuf wire format for the fields of ObjectMeta, ConfigMap and Secret (field numbers from
``k8s.io/api`` ``generated.proto``). Other kinds' fields beyond metadata are rejected rather
than silently dropped.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from dbsync.testing.kubeapi.errors import ApiError

MAGIC = b"k8s\x00"
PROTOBUF = "application/vnd.kubernetes.protobuf"
# Kinds that kubectl's create commands send with metadata only.
METADATA_ONLY_KINDS = frozenset({"Namespace", "ServiceAccount"})


def unsupported(detail: str) -> ApiError:
    return ApiError(
        code=415, reason="UnsupportedMediaType",
        message=f"the API emulator cannot decode this protobuf body: {detail}. Send JSON "
        "instead, for example with kubectl apply -f")


def read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if position >= len(data):
            raise unsupported("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) for each field: ints for varints, bytes otherwise."""
    position = 0
    while position < len(data):
        key, position = read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = read_varint(data, position)
            yield number, value
        elif wire_type == 2:
            length, position = read_varint(data, position)
            yield number, data[position:position + length]
            position += length
        elif wire_type == 1:
            yield number, data[position:position + 8]
            position += 8
        elif wire_type == 5:
            yield number, data[position:position + 4]
            position += 4
        else:
            raise unsupported(f"wire type {wire_type}")


def text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise unsupported("expected a string field")
    return value.decode()


def map_entry(value: int | bytes) -> tuple[str, bytes]:
    if not isinstance(value, bytes):
        raise unsupported("expected a map entry")
    key = ""
    item = b""
    for number, part in fields(value):
        if number == 1:
            key = text(part)
        elif number == 2 and isinstance(part, bytes):
            item = part
    return key, item


def decode_metadata(data: bytes) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    names = {1: "name", 2: "generateName", 3: "namespace", 6: "resourceVersion"}
    for number, value in fields(data):
        if number in names:
            metadata[names[number]] = text(value)
        elif number in (11, 12):
            key, item = map_entry(value)
            section = "labels" if number == 11 else "annotations"
            metadata.setdefault(section, {})[key] = item.decode()
        elif number == 14:
            metadata.setdefault("finalizers", []).append(text(value))
    return metadata


def decode_object(kind: str, data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, value in fields(data):
        if number == 1 and isinstance(value, bytes):
            obj["metadata"] = decode_metadata(value)
        elif kind == "ConfigMap" and number in (2, 3):
            key, item = map_entry(value)
            if number == 2:
                obj.setdefault("data", {})[key] = item.decode()
            else:
                obj.setdefault("binaryData", {})[key] = base64.b64encode(item).decode()
        elif kind == "ConfigMap" and number == 4:
            obj["immutable"] = bool(value)
        elif kind == "Secret" and number in (2, 4):
            key, item = map_entry(value)
            if number == 2:
                obj.setdefault("data", {})[key] = base64.b64encode(item).decode()
            else:
                obj.setdefault("stringData", {})[key] = item.decode()
        elif kind == "Secret" and number == 3:
            obj["type"] = text(value)
        elif kind == "Secret" and number == 5:
            obj["immutable"] = bool(value)
        elif kind not in METADATA_ONLY_KINDS and kind not in ("ConfigMap", "Secret"):
            raise unsupported(f"kind {kind} is decoded from JSON only")
    return obj


def decode(body: bytes) -> dict[str, Any]:
    """Decode a ``k8s\\0``-prefixed ``runtime.Unknown`` into a JSON-like object."""
    if not body.startswith(MAGIC):
        raise unsupported("missing the k8s protobuf prefix")
    api_version = kind = ""
    raw = b""
    for number, value in fields(body[len(MAGIC):]):
        if number == 1 and isinstance(value, bytes):
            for type_number, type_value in fields(value):
                if type_number == 1:
                    api_version = text(type_value)
                elif type_number == 2:
                    kind = text(type_value)
        elif number == 2 and isinstance(value, bytes):
            raw = value
    obj = decode_object(kind, raw)
    obj["apiVersion"] = api_version
    obj["kind"] = kind
    return obj
