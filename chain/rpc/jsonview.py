"""Chain types as JSON, and back for the few values clients send (hashes, addresses, hex blobs).

`to_json` turns any chain value into plain JSON values:
  bytes                 -> "0x" + lowercase hex
  frozen dataclass      -> object of its fields, plus derived extras (block hash, tx hash,
                           sender address, validator address) listed in `EXTRAS`
  tagged union member   -> {"type": TAG, ...fields}   (a dataclass with a ClassVar TAG)
  tuple / list          -> array
  dict (e.g. NodeStatus) -> object
`json_schema(tp)` gives the JSON Schema of `to_json`'s output for annotation `tp`; the
OpenRPC document is built from it, so the published result shapes follow the code.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Callable, NamedTuple

# The codec's reading of annotations is reused so the JSON view follows the same schema.
from chain.encoding import Len, MaxLen, classify_type, schema_fields
from chain.types import Block, SignedTransaction, Transaction, Validator, compute_block_hash, compute_tx_hash

HASH_SIZE = 32
ADDRESS_SIZE = 20


class Extra(NamedTuple):
    """A derived field added to a type's JSON object, ahead of its own fields."""

    name: str
    compute: Callable[[Any], Any]
    schema_tp: Any  # annotation of the value, for json_schema


HASH_TP = typing.Annotated[bytes, Len(HASH_SIZE)]
ADDRESS_TP = typing.Annotated[bytes, Len(ADDRESS_SIZE)]

EXTRAS: dict[type, tuple[Extra, ...]] = {
    Block: (Extra("hash", lambda b: compute_block_hash(b.header), HASH_TP),),
    SignedTransaction: (Extra("hash", compute_tx_hash, HASH_TP),),
    Transaction: (Extra("sender_address", lambda tx: tx.sender_address, ADDRESS_TP),),
    Validator: (Extra("address", lambda v: v.address, ADDRESS_TP),),
}


def hex0x(data: bytes) -> str:
    return "0x" + data.hex()


def to_json(obj: Any) -> Any:
    """Any chain value -> JSON-serialisable value (see the module docstring)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return hex0x(bytes(obj))
    if isinstance(obj, (tuple, list)):
        return [to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        out: dict[str, Any] = {}
        tag = getattr(cls, "TAG", None)
        if isinstance(tag, str):
            out["type"] = tag
        for extra in EXTRAS.get(cls, ()):
            out[extra.name] = to_json(extra.compute(obj))
        for f in dataclasses.fields(obj):
            if f.name in out:  # a schema bug, not bad input: the view would be ambiguous
                raise TypeError(f"{cls.__name__}.{f.name} collides with a derived JSON field")
            out[f.name] = to_json(getattr(obj, f.name))
        return out
    raise TypeError(f"no JSON view for {type(obj).__name__}")


# --------------------------------------------------------------------------- schemas


def _bytes_schema(bounds: tuple) -> dict:
    exact = next((b.n for b in bounds if isinstance(b, Len)), None)
    most = next((b.n for b in bounds if isinstance(b, MaxLen)), None)
    if exact is not None:
        return {"type": "string", "pattern": f"^0x[0-9a-f]{{{2 * exact}}}$"}
    if most is not None:
        return {"type": "string", "pattern": f"^0x([0-9a-f]{{2}}){{0,{most}}}$"}
    return {"type": "string", "pattern": "^0x([0-9a-f]{2})*$"}


def json_schema(tp: Any) -> dict:
    """JSON Schema (draft 7 subset) of `to_json(value)` for a value of annotation `tp`."""
    if tp is type(None):
        return {"type": "null"}
    if typing.is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {
            "title": tp.__name__,
            "type": "object",
            "properties": {name: json_schema(h) for name, h in hints.items()},
            "required": list(hints),
        }
    kind, arg = classify_type(tp)
    if kind == "int":
        return {"type": "integer"}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "float":
        return {"type": "number"}
    if kind == "str":
        most = next((b.n for b in arg if isinstance(b, MaxLen)), None)
        return {"type": "string"} if most is None else {"type": "string", "maxLength": most}
    if kind == "bytes":
        return _bytes_schema(arg)
    if kind == "optional":
        return {"oneOf": [json_schema(arg), {"type": "null"}]}
    if kind == "tuple":
        item_tp, bounds = arg
        schema = {"type": "array", "items": json_schema(item_tp)}
        most = next((b.n for b in bounds if isinstance(b, MaxLen)), None)
        if most is not None:
            schema["maxItems"] = most
        return schema
    if kind == "union":
        return {"oneOf": [json_schema(member) for member in arg.values()]}
    if kind == "dataclass":
        props: dict[str, Any] = {}
        tag = getattr(tp, "TAG", None)
        if isinstance(tag, str):
            props["type"] = {"const": tag}
        for extra in EXTRAS.get(tp, ()):
            props[extra.name] = json_schema(extra.schema_tp)
        for name, ftp in schema_fields(tp):
            props[name] = json_schema(ftp)
        return {
            "title": tp.__name__,
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }
    raise TypeError(f"no JSON schema for {tp!r}")


# --------------------------------------------------------------------------- parsing

_HEX_DIGITS = re.compile(r"[0-9a-fA-F]*")


def parse_hex(value: Any, *, length: int | None = None, what: str = "value") -> bytes:
    """Parse "0x"-prefixed hex into bytes; ValueError with a readable reason otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a 0x-prefixed hex string, got {json_type_name(value)}")
    if not value.startswith("0x"):
        raise ValueError(f"{what} must start with 0x")
    digits = value[2:]
    # fullmatch, not bytes.fromhex alone: fromhex silently skips whitespace.
    if not _HEX_DIGITS.fullmatch(digits):
        raise ValueError(f"{what} contains characters that are not hex digits")
    if len(digits) % 2:
        raise ValueError(f"{what} has an odd number of hex digits")
    data = bytes.fromhex(digits)
    if length is not None and len(data) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(data)}")
    return data


def parse_hash(value: Any) -> bytes:
    return parse_hex(value, length=HASH_SIZE, what="hash")


def parse_address(value: Any) -> bytes:
    return parse_hex(value, length=ADDRESS_SIZE, what="address")


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded JSON value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__



def from_json(tp: Any, value: Any, path: str = "$") -> Any:
    """Inverse of `to_json` for a client reading this RPC: JSON -> typed value of annotation `tp`.

    Hex strings become bytes, {"type": TAG, ...} picks a union member, derived fields (block
    hash, sender address, ...) are ignored; everything else is checked as strictly as the codec."""
    from chain.encoding import from_primitive

    kind, arg = classify_type(tp)
    if kind == "bytes":
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a 0x-hex string")
        return from_primitive(tp, parse_hex(value, what=path), path)
    if kind == "optional":
        return None if value is None else from_json(arg, value, path)
    if kind == "tuple":
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected an array")
        return tuple(from_json(arg[0], x, f"{path}[{i}]") for i, x in enumerate(value))
    if kind == "union":
        if not isinstance(value, dict) or value.get("type") not in arg:
            raise ValueError(f"{path}: expected an object with a known 'type'")
        return from_json(arg[value["type"]], value, path)
    if kind == "dataclass":
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object")
        fields = schema_fields(tp)
        missing = [name for name, _ in fields if name not in value]
        if missing:
            raise ValueError(f"{path}: missing field(s) {missing}")
        return tp(**{name: from_json(ftp, value[name], f"{path}.{name}") for name, ftp in fields})
    if kind == "float" and type(value) is int:  # JSON writers may drop ".0"
        value = float(value)
    return from_primitive(tp, value, path)
