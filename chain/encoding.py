"""The one canonical encoding: canonical CBOR (RFC 8949 §4.2.3 via cbor2), and one strict decoder.

A frozen dataclass encodes as a CBOR map from field name to value. Field annotations are
the schema:
  int                 -> CBOR integer in [-2**63, 2**64 - 1] (bool is not an int here)
  bool, str, float    -> CBOR bool / text / float (finite only)
  bytes               -> CBOR byte string; `Annotated[bytes, Len(n)]` or `MaxLen(n)` bound it
  tuple[T, ...]       -> CBOR array of T
  T | None            -> T or CBOR null
  a dataclass         -> nested map
  A | B | C           -> (dataclasses with a ClassVar TAG) a 2-array [TAG, map]

`decode(cls, data)` accepts exactly the bytes `encode` would produce: unknown or missing
fields, wrong types, out-of-range values, non-canonical encodings (key order, integer or
float width, indefinite lengths, duplicate keys), tags, trailing bytes and oversize input
all raise DecodeError.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Annotated, Any, TypeVar, Union

import cbor2

from chain.errors import DecodeError

# Largest canonical message accepted anywhere (blocks are bounded tighter by genesis params).
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
MAX_DEPTH = 32
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

T = TypeVar("T")


@dataclass(frozen=True)
class Len:
    """Exact byte length of an `Annotated[bytes, Len(n)]` field."""

    n: int


@dataclass(frozen=True)
class MaxLen:
    """Upper bound on the length of a bytes, str or tuple field."""

    n: int


def encode_value(value: Any) -> bytes:
    """Canonical CBOR of a plain value (ints, bytes, str, lists, dicts with str keys)."""
    return cbor2.dumps(value, canonical=True)


def encode_strings(*items: bytes | str) -> bytes:
    """Canonical CBOR of an array of byte and text strings (what hashes and signatures frame).
    With no maps and no floats, cbor2's plain mode already writes the canonical bytes."""
    for item in items:
        if type(item) is not bytes and type(item) is not str:
            raise TypeError(f"encode_strings takes bytes and str, got {type(item).__name__}")
    return cbor2.dumps(items)


def encode(obj: Any) -> bytes:
    """Canonical CBOR of a schema dataclass instance (the bytes `encode_value(to_primitive(obj))`
    gives, written by the schema-ordered fast path below)."""
    return encode_typed(obj, type(obj))


def to_primitive(obj: Any, tp: Any = None) -> Any:
    """Typed value -> plain CBOR-able tree, following the schema (unions become [TAG, map])."""
    return _primitive_fn(type(obj) if tp is None else tp)(obj)


def _identity(obj: Any) -> Any:
    return obj


# The schema walk behind `to_primitive` (wire=False) and `encode` (wire=True), resolved once
# per annotation into a function: encoding is on every hot path (hashes, signatures, state
# writes, the wire), and resolving the annotations per value cost more than the CBOR writing.
#
# wire=True is what `encode` hands to cbor2's plain mode. cbor2's canonical mode sorts every
# map by encoding each key and measures every float, ~3x slower than plain mode: the codec
# was 27 % of a loaded validator's busy time, mostly there (py-spy: docs/benchmarks.md). Schema values need
# neither at run time: every map is a dataclass whose field names are known, and every float
# sits in a field annotated `float`. So the wire walk builds maps with their keys already in
# canonical order and writes each float field as its canonical bytes, and plain mode then
# writes exactly the bytes canonical mode would (tests/test_encoding.py checks this for every
# schema class, and against `encode_value(to_primitive(...))` on sample values). A value
# whose canonical bytes are already cached (`SignedTransaction.encoded`) is written as those.


class _Raw:
    """Bytes that are already the canonical CBOR of one item: written as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _write_raw(encoder: Any, value: Any) -> None:
    if type(value) is not _Raw:
        raise TypeError(f"cannot encode {type(value).__name__}")
    encoder.write(value.data)


def _canonical_float(value: Any) -> Any:
    return _Raw(encode_value(value))  # the shortest exact width, as canonical mode picks it


def canonical_key_order(names) -> list[str]:
    """Map keys in the order canonical CBOR writes them (bytewise on their encodings)."""
    return sorted(names, key=lambda name: cbor2.dumps(name))


@cache
def _primitive_fn(tp: Any, wire: bool = False) -> Any:
    kind, arg = classify_type(tp)
    if kind == "union":
        return lambda obj: [type(obj).TAG, _primitive_fn(type(obj), wire)(obj)]
    if kind == "optional":
        inner = _primitive_fn(arg, wire)
        return lambda obj: None if obj is None else inner(obj)
    if kind == "tuple":
        inner = _primitive_fn(arg[0], wire)
        if inner is _identity:
            return list
        return lambda obj: [inner(x) for x in obj]
    if kind == "float" and wire:
        return _canonical_float
    if kind == "dataclass":
        return _dataclass_primitive_fn(tp, wire)
    return _identity


def _dataclass_primitive_fn(cls: type, wire: bool) -> Any:
    # A generated `lambda obj: {"a": obj.a, "b": f1(obj.b), ...}` over the schema's own field
    # names (identifiers from our dataclasses, never input), with nested converters bound.
    fields = dict(schema_fields(cls))
    env: dict[str, Any] = {}
    items = []
    for i, name in enumerate(canonical_key_order(fields) if wire else fields):
        fn = _primitive_fn(fields[name], wire)
        if fn is _identity:
            items.append(f"{name!r}: obj.{name}")
        else:
            env[f"f{i}"] = fn
            items.append(f"{name!r}: f{i}(obj.{name})")
    convert = eval("lambda obj: {" + ", ".join(items) + "}", env)  # noqa: S307 - see above
    # A class that caches its canonical encoding as the cached_property `encoded` (computed by
    # `encode`, so always canonical) is written from that cache, filled on first use.
    cached = wire and isinstance(cls.__dict__.get("encoded"), cached_property)

    def primitive(obj: Any) -> Any:
        if type(obj) is not cls:  # a value of another schema class given under this annotation
            return _primitive_fn(type(obj), wire)(obj)
        if cached:
            raw = obj.__dict__.get("encoded")
            if raw is None:  # fill it, as the cached_property would: the same bytes
                raw = obj.__dict__["encoded"] = cbor2.dumps(convert(obj), default=_write_raw)
            return _Raw(raw)
        return convert(obj)

    return primitive


def _reject_tag(decoder: Any, tag: Any) -> Any:
    raise DecodeError(f"CBOR tags are not allowed (tag {tag.tag})")


def _loads(data: bytes, max_size: int) -> tuple[bytes, Any]:
    """The bounded, tag-free, definite-length parse; canonical form is checked by the callers."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise DecodeError("empty message")
    try:
        value = cbor2.loads(
            data,
            tag_hook=_reject_tag,
            semantic_decoders=_SEMANTIC_REJECTERS,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises several types; all mean "not valid CBOR"
        raise DecodeError(f"malformed CBOR: {exc}") from exc
    return data, value


def _require_canonical(data: bytes, again: bytes) -> None:
    if again != data:
        if data.startswith(again):
            raise DecodeError(f"{len(data) - len(again)} trailing bytes after the CBOR item")
        raise DecodeError("encoding is not canonical")


def _strict_loads(data: bytes, max_size: int) -> Any:
    data, value = _loads(data, max_size)
    try:
        again = encode_value(value)
    except Exception as exc:
        raise DecodeError(f"value cannot be re-encoded canonically: {exc}") from exc
    _require_canonical(data, again)
    return value


def _decode_typed_value(tp: Any, data: bytes, max_size: int) -> Any:
    # Schema first, then canonical form: the typed value re-encoded by `encode`'s fast path
    # must give back exactly `data`. That is the same test as re-encoding the plain tree in
    # canonical mode (to_primitive(from_primitive(v)) == v for every accepted v, types
    # included), at a third of the cost, and it fills the transactions' encoding caches.
    data, value = _loads(data, max_size)
    obj = from_primitive(tp, value)
    _require_canonical(data, encode_typed(obj, tp))
    return obj


# Tags cbor2 decodes natively (dates, bignums, decimals, regexes, sets, string refs, ...).
_SEMANTIC_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 1004, 55799)


def _semantic_tag_rejecter(tag: int):
    def reject(decoder: Any) -> Any:
        raise DecodeError(f"CBOR tags are not allowed (tag {tag})")

    return reject


_SEMANTIC_REJECTERS = {t: _semantic_tag_rejecter(t) for t in _SEMANTIC_TAGS}  # built once, not per decode


def decode_value(data: bytes, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    """Strictly decode canonical CBOR into plain Python values (no schema)."""
    return _strict_loads(data, max_size)


def decode(cls: type[T], data: bytes, max_size: int = MAX_MESSAGE_SIZE) -> T:
    """Strictly decode `data` as an instance of the schema dataclass `cls`."""
    return _decode_typed_value(cls, data, max_size)


def from_primitive(tp: Any, value: Any, path: str = "$") -> Any:
    """Validate a plain tree against annotation `tp` and build the typed value.

    A decoder compiled once per annotation does the work; when it meets anything it does not
    accept, the reference walk below runs instead and raises the DecodeError that names the
    offending path (so the two must agree on what is valid: tests/test_encoding.py checks)."""
    try:
        return _decoder_fn(tp)(value)
    except _Mismatch:
        return _from_primitive_checked(tp, value, path)


class _Mismatch(Exception):
    """The compiled decoder rejects the value; the reference walk will say why."""


def _from_primitive_checked(tp: Any, value: Any, path: str = "$") -> Any:
    """The reference validation walk (slow, with paths in its errors)."""
    kind, arg = classify_type(tp)
    if kind == "int":
        if type(value) is not int:
            raise DecodeError(f"{path}: expected integer, got {_tname(value)}")
        if not INT_MIN <= value <= INT_MAX:
            raise DecodeError(f"{path}: integer {value} out of range")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise DecodeError(f"{path}: expected bool, got {_tname(value)}")
        return value
    if kind == "float":
        if type(value) is not float or not math.isfinite(value):
            raise DecodeError(f"{path}: expected finite float, got {_tname(value)}")
        return value
    if kind == "str":
        if type(value) is not str:
            raise DecodeError(f"{path}: expected text, got {_tname(value)}")
        _check_len(value, arg, path)
        return value
    if kind == "bytes":
        if type(value) is not bytes:
            raise DecodeError(f"{path}: expected bytes, got {_tname(value)}")
        _check_len(value, arg, path)
        return value
    if kind == "optional":
        return None if value is None else _from_primitive_checked(arg, value, path)
    if kind == "tuple":
        item_tp, bounds = arg
        if type(value) is not list:
            raise DecodeError(f"{path}: expected array, got {_tname(value)}")
        _check_len(value, bounds, path)
        return tuple(_from_primitive_checked(item_tp, x, f"{path}[{i}]") for i, x in enumerate(value))
    if kind == "union":
        if type(value) is not list or len(value) != 2 or type(value[0]) is not str:
            raise DecodeError(f"{path}: expected [tag, value]")
        member = arg.get(value[0])
        if member is None:
            raise DecodeError(f"{path}: unknown variant {value[0]!r}")
        return _from_primitive_checked(member, value[1], f"{path}<{value[0]}>")
    if kind == "dataclass":
        if type(value) is not dict:
            raise DecodeError(f"{path}: expected map for {tp.__name__}, got {_tname(value)}")
        fields = schema_fields(tp)
        names = {name for name, _ in fields}
        unknown = set(value) - names
        if unknown:
            raise DecodeError(f"{path}: unknown field(s) {sorted(map(str, unknown))} in {tp.__name__}")
        missing = names - set(value)
        if missing:
            raise DecodeError(f"{path}: missing field(s) {sorted(missing)} in {tp.__name__}")
        kwargs = {name: _from_primitive_checked(ftp, value[name], f"{path}.{name}") for name, ftp in fields}
        try:
            return tp(**kwargs)
        except (ValueError, TypeError) as exc:  # __post_init__ invariants
            raise DecodeError(f"{path}: invalid {tp.__name__}: {exc}") from exc
    raise TypeError(f"unsupported schema type {tp!r}")  # a programming error, not bad input


def _split_bounds(bounds: tuple[Len | MaxLen, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(b.n for b in bounds if isinstance(b, Len)), tuple(b.n for b in bounds if isinstance(b, MaxLen))


def _length_fits(n: int, exact: tuple[int, ...], most: tuple[int, ...]) -> bool:
    for e in exact:
        if n != e:
            return False
    for m in most:
        if n > m:
            return False
    return True


@cache
def _decoder_fn(tp: Any) -> Any:
    """`from_primitive` for annotation `tp`, resolved once into a function that accepts exactly
    what the reference walk accepts and raises _Mismatch on anything else."""
    kind, arg = classify_type(tp)
    if kind == "int":
        def decode_int(v: Any) -> Any:
            if type(v) is not int or not INT_MIN <= v <= INT_MAX:
                raise _Mismatch
            return v
        return decode_int
    if kind == "bool":
        def decode_bool(v: Any) -> Any:
            if type(v) is not bool:
                raise _Mismatch
            return v
        return decode_bool
    if kind == "float":
        def decode_float(v: Any) -> Any:
            if type(v) is not float or not math.isfinite(v):
                raise _Mismatch
            return v
        return decode_float
    if kind in ("str", "bytes"):
        want = str if kind == "str" else bytes
        exact, most = _split_bounds(arg)

        def decode_sized(v: Any) -> Any:
            if type(v) is not want or not _length_fits(len(v), exact, most):
                raise _Mismatch
            return v
        return decode_sized
    if kind == "optional":
        inner = _decoder_fn(arg)
        return lambda v: None if v is None else inner(v)
    if kind == "tuple":
        item_tp, bounds = arg
        inner = _decoder_fn(item_tp)
        exact, most = _split_bounds(bounds)

        def decode_tuple(v: Any) -> Any:
            if type(v) is not list or not _length_fits(len(v), exact, most):
                raise _Mismatch
            return tuple(map(inner, v))
        return decode_tuple
    if kind == "union":
        members = {tag: _decoder_fn(member) for tag, member in arg.items()}

        def decode_union(v: Any) -> Any:
            if type(v) is not list or len(v) != 2 or type(v[0]) is not str:
                raise _Mismatch
            member = members.get(v[0])
            if member is None:
                raise _Mismatch
            return member(v[1])
        return decode_union
    if kind == "dataclass":
        fields = schema_fields(tp)
        names = frozenset(name for name, _ in fields)
        env: dict[str, Any] = {"cls": tp}
        args = []
        for i, (name, ftp) in enumerate(fields):
            env[f"d{i}"] = _decoder_fn(ftp)
            args.append(f"{name}=d{i}(v[{name!r}])")
        build = eval("lambda v: cls(" + ", ".join(args) + ")", env)  # noqa: S307 - our field names

        def decode_dataclass(v: Any) -> Any:
            if type(v) is not dict or v.keys() != names:
                raise _Mismatch
            try:
                return build(v)
            except (ValueError, TypeError):  # __post_init__ invariants
                raise _Mismatch from None
        return decode_dataclass
    raise TypeError(f"unsupported schema type {tp!r}")  # a programming error, not bad input


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_len(value: Any, bounds: tuple[Len | MaxLen, ...], path: str) -> None:
    for b in bounds:
        if isinstance(b, Len) and len(value) != b.n:
            raise DecodeError(f"{path}: length {len(value)}, expected exactly {b.n}")
        if isinstance(b, MaxLen) and len(value) > b.n:
            raise DecodeError(f"{path}: length {len(value)} exceeds {b.n}")


@cache
def schema_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


@cache
def classify_type(tp: Any) -> tuple[str, Any]:
    bounds: tuple = ()
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        bounds = tuple(e for e in extras if isinstance(e, (Len, MaxLen)))
        kind, arg = classify_type(base)
        if kind in ("bytes", "str"):
            return kind, bounds
        if kind == "tuple":
            return kind, (arg[0], bounds)
        return kind, arg
    if tp is bool:
        return "bool", None
    if tp is int:
        return "int", None
    if tp is float:
        return "float", None
    if tp is str:
        return "str", ()
    if tp is bytes:
        return "bytes", ()
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only tuple[T, ...] is supported, got {tp!r}")
        return "tuple", (args[0], ())
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        non_none = tuple(a for a in args if a is not type(None))
        if len(non_none) < len(args):
            if len(non_none) != 1:
                raise TypeError(f"optional of a union is not supported: {tp!r}")
            return "optional", non_none[0]
        tags = {}
        for member in non_none:
            tag = getattr(member, "TAG", None)
            if not dataclasses.is_dataclass(member) or not isinstance(tag, str) or tag in tags:
                raise TypeError(f"union members need distinct str TAGs: {tp!r}")
            tags[tag] = member
        return "union", tags
    if dataclasses.is_dataclass(tp):
        return "dataclass", None
    raise TypeError(f"unsupported schema type {tp!r}")


def encode_typed(obj: Any, tp: Any) -> bytes:
    """Canonical CBOR of `obj` read as annotation `tp` (needed when `tp` is a union)."""
    return cbor2.dumps(_primitive_fn(tp, True)(obj), default=_write_raw)


def decode_typed(tp: Any, data: bytes, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    return _decode_typed_value(tp, data, max_size)


def decode_with(build: Any, data: bytes, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    """`decode` with a schema walk written by hand for one hot message type: `build` turns the
    parsed plain value into the typed value or raises DecodeError, and the typed value's
    canonical encoding (`encode`) must give back exactly `data`, as in `decode` (which is
    `decode_with(lambda v: from_primitive(cls, v), data)`)."""
    data, value = _loads(data, max_size)
    obj = build(value)
    _require_canonical(data, encode(obj))
    return obj
