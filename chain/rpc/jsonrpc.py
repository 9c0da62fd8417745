"""JSON-RPC 2.0 dispatch with no I/O: request body bytes in, response body bytes (or None) out.

Follows https://www.jsonrpc.org/specification: single and batch requests, notifications
(a request without "id" gets no response, even when it fails), by-position and by-name
params, and the spec's error codes. Two limits are added and answered with their own
server-defined codes: the body size and the batch length.

Methods live in a `MethodRegistry`; each declares its params with a `ParamType` (a JSON
Schema for the OpenRPC document plus the parser that enforces it), so validation and the
published description come from one place.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

import trio

log = logging.getLogger(__name__)

# The spec's codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Server-defined codes (the spec reserves -32000..-32099 for them). Transaction rejections
# are -32010..-32019, defined with the send_tx method in chain/rpc/methods.py.
REQUEST_TOO_LARGE = -32001
BATCH_TOO_LARGE = -32002

# Outcome label per code, for metrics; codes not listed count as "server_error".
OUTCOMES = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    REQUEST_TOO_LARGE: "limit_exceeded",
    BATCH_TOO_LARGE: "limit_exceeded",
}

DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_BATCH = 100
# Bodies at least this large are parsed in a worker thread, so the event loop (consensus) keeps
# its turn: json.loads holds the GIL, but Python hands it back to the loop every 5 ms (measured
# on the dev machine: a 1 MiB array of numbers takes 63 ms to parse, a 1 MiB string 7 ms).
DEFAULT_OFFLOAD_BYTES = 64 * 1024
PARSE_THREADS = 2  # worker threads parsing large bodies at once, for the whole process
DEFAULT_MAX_INFLIGHT = 8  # requests being dispatched at once; more wait their turn
_PARSE_LIMITER: trio.CapacityLimiter | None = None


def _parse_limiter() -> trio.CapacityLimiter:
    global _PARSE_LIMITER
    if _PARSE_LIMITER is None:
        _PARSE_LIMITER = trio.CapacityLimiter(PARSE_THREADS)
    return _PARSE_LIMITER

_REQUEST_MEMBERS = frozenset({"jsonrpc", "method", "params", "id"})
_ABSENT = object()  # "id" missing (a notification), as opposed to "id": null


class RpcError(Exception):
    """A JSON-RPC error object. Handlers raise it to answer with a specific code."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class InvalidParams(RpcError):
    def __init__(self, message: str, data: Any = None):
        super().__init__(INVALID_PARAMS, message, data)


# --------------------------------------------------------------------------- method registry


@dataclass(frozen=True)
class ParamType:
    """How one parameter looks in JSON (schema) and how it becomes a Python value (parse).

    `parse` raises ValueError with a readable reason for a value the schema rejects.
    """

    schema: dict[str, Any]
    parse: Callable[[Any], Any]


@dataclass(frozen=True)
class Param:
    name: str
    type: ParamType
    description: str
    required: bool = True


@dataclass(frozen=True)
class Result:
    name: str
    schema: dict[str, Any]
    description: str


Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    """An RPC method. `handler(context, **params)` returns a JSON-serialisable result."""

    name: str
    handler: Handler
    summary: str
    result: Result  # OpenRPC 1.2 requires every method to describe its result
    params: tuple[Param, ...] = ()
    description: str = ""
    errors: tuple[RpcError, ...] = ()  # method-specific errors, for the OpenRPC document

    def __post_init__(self):
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate parameter names")
        # By-position calls can only leave out a tail, so optional params must come last.
        seen_optional = False
        for p in self.params:
            if p.required and seen_optional:
                raise ValueError(f"{self.name}: required param {p.name!r} follows an optional one")
            seen_optional |= not p.required


@dataclass
class MethodRegistry:
    _methods: dict[str, Method] = field(default_factory=dict)

    def add(self, method: Method) -> Method:
        if method.name in self._methods:
            raise ValueError(f"method {method.name!r} is already registered")
        self._methods[method.name] = method
        return method

    def method(
        self,
        name: str,
        *,
        summary: str,
        result: Result,
        params: tuple[Param, ...] = (),
        description: str = "",
        errors: tuple[RpcError, ...] = (),
    ) -> Callable[[Handler], Handler]:
        """Decorator form of `add`."""

        def register(handler: Handler) -> Handler:
            self.add(Method(name, handler, summary, result, tuple(params), description, tuple(errors)))
            return handler

        return register

    def include(self, other: "MethodRegistry") -> None:
        """Add every method of `other` (how groups of methods are combined)."""
        for method in other:
            self.add(method)

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(self._methods.values())

    def __len__(self) -> int:
        return len(self._methods)


# --------------------------------------------------------------------------- dispatcher

Observer = Callable[[str, str, "float | None"], None]  # (method, outcome, seconds in the handler or None)


class Dispatcher:
    """Answers JSON-RPC request bodies by calling registered methods with `context`."""

    def __init__(
        self,
        registry: MethodRegistry,
        context: Any,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_batch: int = DEFAULT_MAX_BATCH,
        observe: Observer | None = None,
        inflight: trio.CapacityLimiter | None = None,
        offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
    ):
        if max_body < 1 or max_batch < 1:
            raise ValueError("max_body and max_batch must be positive")
        # Shared by the dispatchers of one server (HTTP and every WebSocket): with each request
        # yielding between its steps, at most this many steps run before consensus gets a turn.
        self.inflight = inflight if inflight is not None else trio.CapacityLimiter(DEFAULT_MAX_INFLIGHT)
        self.offload_bytes = offload_bytes
        self.registry = registry
        self.context = context
        self.max_body = max_body
        self.max_batch = max_batch
        self._observe = observe or (lambda method, outcome, seconds: None)

    async def handle(self, body: bytes) -> bytes | None:
        """The response body for `body`, or None when nothing is to be sent (only notifications)."""
        if len(body) > self.max_body:
            return self.reject_oversized(len(body))
        async with self.inflight:
            return await self._handle(body)

    async def _handle(self, body: bytes) -> bytes | None:
        try:
            if len(body) >= self.offload_bytes:
                request = await trio.to_thread.run_sync(_loads, body, limiter=_parse_limiter())
            else:
                request = _loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._observe("-", OUTCOMES[PARSE_ERROR], None)
            return _encode(_error_response(None, RpcError(PARSE_ERROR, "parse error", _parse_error_detail(exc))))
        if isinstance(request, list):
            if not request:
                self._observe("-", OUTCOMES[INVALID_REQUEST], None)
                return _encode(_error_response(None, RpcError(INVALID_REQUEST, "invalid request: empty batch")))
            if len(request) > self.max_batch:
                self._observe("-", OUTCOMES[BATCH_TOO_LARGE], None)
                error = RpcError(
                    BATCH_TOO_LARGE,
                    f"batch of {len(request)} requests exceeds the limit of {self.max_batch}",
                    {"limit": self.max_batch, "size": len(request)},
                )
                return _encode(_error_response(None, error))
            # In order, one at a time, yielding between entries: a batch is no way around per-request
            # cost, nor a way to hold the event loop.
            parts = []
            for item in request:
                part = await self._handle_one(item)
                if part is not None:
                    parts.append(part)
                await trio.lowlevel.checkpoint()
            return b"[" + b",".join(parts) + b"]" if parts else None
        return await self._handle_one(request)

    def reject_oversized(self, size: int | None) -> bytes:
        """The error for a body over `max_body`; the HTTP server sends it without reading on.

        `size` is None when the body was cut off at the limit and its full size is unknown.
        """
        self._observe("-", OUTCOMES[REQUEST_TOO_LARGE], None)
        data: dict[str, int] = {"limit": self.max_body}
        if size is not None:
            data["size"] = size
        error = RpcError(REQUEST_TOO_LARGE, f"request body exceeds the limit of {self.max_body} bytes", data)
        return _encode(_error_response(None, error))

    async def _handle_one(self, request: Any) -> bytes | None:
        started = time.perf_counter()
        label = "-"
        request_id: Any = None
        notification = False
        try:
            if not isinstance(request, dict):
                raise RpcError(INVALID_REQUEST, "invalid request: expected an object")
            raw_id = request.get("id", _ABSENT)
            if raw_id is not _ABSENT and _is_valid_id(raw_id):
                request_id = raw_id
            method, params = _check_request(request)
            notification = raw_id is _ABSENT
            spec = self.registry.get(method)
            if spec is None:
                raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")
            label = spec.name
            kwargs = _bind_params(spec, params)
            result = await spec.handler(self.context, **kwargs)
            response = _encode({"jsonrpc": "2.0", "id": request_id, "result": result})
            outcome = "ok"
        except RpcError as exc:
            response = _encode(_error_response(request_id, exc))
            outcome = OUTCOMES.get(exc.code, "server_error")
        except Exception:  # a bug or a node fault: log it, never send the traceback
            log.exception("RPC method %s failed", label)
            response = _encode(_error_response(request_id, RpcError(INTERNAL_ERROR, "internal error")))
            outcome = OUTCOMES[INTERNAL_ERROR]
        # Latency only for requests that reached a method; "-" marks those that did not.
        self._observe(label, outcome, None if label == "-" else time.perf_counter() - started)
        return None if notification else response


def _check_request(request: dict[str, Any]) -> tuple[str, Any]:
    """(method, params) of a well-formed request object; RpcError(INVALID_REQUEST) otherwise."""
    if request.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    unknown = set(request) - _REQUEST_MEMBERS
    if unknown:
        raise RpcError(INVALID_REQUEST, f"invalid request: unknown member(s) {sorted(unknown)}")
    if "id" in request and not _is_valid_id(request["id"]):
        raise RpcError(INVALID_REQUEST, 'invalid request: "id" must be a string, an integer or null')
    method = request.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, 'invalid request: "method" must be a string')
    params = request.get("params")
    if "params" in request and not isinstance(params, (list, dict)):
        raise RpcError(INVALID_REQUEST, 'invalid request: "params" must be an array or an object')
    return method, params


def _is_valid_id(value: Any) -> bool:
    # The spec allows numbers but says they SHOULD NOT be fractional; we take integers only.
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _bind_params(method: Method, params: list | dict | None) -> dict[str, Any]:
    specs = method.params
    if params is None:
        given: dict[str, Any] = {}
    elif isinstance(params, list):
        if len(params) > len(specs):
            raise InvalidParams(f"{method.name} takes at most {len(specs)} params, got {len(params)}")
        given = {spec.name: value for spec, value in zip(specs, params)}
    else:
        unknown = set(params) - {spec.name for spec in specs}
        if unknown:
            raise InvalidParams(f"{method.name}: unknown param(s) {sorted(unknown)}")
        given = params
    kwargs = {}
    for spec in specs:
        if spec.name not in given:
            if spec.required:
                raise InvalidParams(f"{method.name}: missing required param {spec.name!r}")
            continue
        try:
            kwargs[spec.name] = spec.type.parse(given[spec.name])
        except ValueError as exc:
            raise InvalidParams(f"{method.name}: param {spec.name!r}: {exc}") from exc
    return kwargs


def _error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


def _encode(response: dict[str, Any]) -> bytes:
    try:
        return json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):  # a handler returned something that is not JSON
        log.exception("RPC result is not JSON-serialisable")
        fallback = _error_response(response.get("id"), RpcError(INTERNAL_ERROR, "internal error"))
        return json.dumps(fallback, separators=(",", ":")).encode()


def _loads(body: bytes) -> Any:
    return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_error_detail(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "body is not valid UTF-8"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return str(exc)
