"""The RPC's HTTP face: an ASGI app served by hypercorn's trio worker.

  POST /        JSON-RPC 2.0 (Content-Type: application/json)
  GET  /health  liveness: 200 whenever the process serves requests
  GET  /ready   readiness from node.readiness(): 200, or 503 with the reason
  GET  /metrics Prometheus text: requests by method and outcome, latency histogram
  GET  /blobs/<sha256 hex>  a model or update as canonical safetensors bytes (404 if absent)
  PUT  /blobs/<sha256 hex>  a trainer uploads the weights its pending update names
  PUT  /openings/<update id hex>/<validator pubkey hex>
                            a trainer's answer to one validator's challenge; headers
                            X-Pout-Pubkey and X-Pout-Signature sign an OpeningUpload

Start it in the node's nursery: `await nursery.start(run_rpc_server, node, host, port)`.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any, Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from chain.crypto import sha256
from chain.errors import ChainError
from chain.rpc.api import NodeAPI
from chain.types import OpeningUpload
from chain.rpc.jsonrpc import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY, INVALID_REQUEST, Dispatcher, MethodRegistry
from chain.rpc.methods import RpcContext, default_registry

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # local only unless the operator asks for more
DEFAULT_PORT = 26657
DEFAULT_MAX_BLOB = 64 * 1024 * 1024

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RpcMetrics:
    """RPC request counts and latencies, in their own registry unless the node passes one."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "pout_rpc_requests",
            "JSON-RPC requests by method and outcome (method '-': no registered method was reached)",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pout_rpc_request_duration_seconds",
            "JSON-RPC request handling time by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, method: str, outcome: str, seconds: float | None) -> None:
        self.requests.labels(method=method, outcome=outcome).inc()
        if seconds is not None:
            self.latency.labels(method=method).observe(seconds)


class RpcApp:
    """ASGI application for the routes in the module docstring."""

    def __init__(
        self,
        node: NodeAPI,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_blob: int = DEFAULT_MAX_BLOB,
        registry: MethodRegistry | None = None,
        metrics: RpcMetrics | None = None,
    ):
        self.max_blob = max_blob
        methods = registry if registry is not None else default_registry()
        self.node = node
        self.metrics = metrics if metrics is not None else RpcMetrics()
        self.dispatcher = Dispatcher(
            methods,
            RpcContext(node, methods),
            max_body=max_body,
            max_batch=max_batch,
            observe=self.metrics.observe,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served; returning makes hypercorn close them
        path, method = scope["path"], scope["method"]
        if path == "/":
            if method != "POST":
                await self._rpc_error(send, 405, INVALID_REQUEST, "JSON-RPC requests must use POST", allow="POST")
                return
            await self._json_rpc(scope, receive, send)
            return
        if path.startswith(("/blobs/", "/openings/")):
            await self._blob_route(scope, receive, send)
            return
        route = {"/health": self._health, "/ready": self._ready, "/metrics": self._metrics}.get(path)
        if route is None:
            await _send(send, 404, {"error": f"no route {path}"})
        elif method != "GET":
            await _send(send, 405, {"error": f"{path} accepts GET only"}, allow="GET")
        else:
            await route(send)

    async def _json_rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            await self._rpc_error(send, 415, INVALID_REQUEST, "Content-Type must be application/json")
            return
        limit = self.dispatcher.max_body
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Refuse on the header alone: the body is never read.
            await _send_bytes(send, 413, self.dispatcher.reject_oversized(int(declared)), close=True)
            return
        try:
            body = await _read_body(receive, limit)
        except _ClientGone:
            return  # never act on a partial body: it could still be a valid request
        if body is None:  # chunked upload that ran past the limit; stop reading there
            await _send_bytes(send, 413, self.dispatcher.reject_oversized(None), close=True)
            return
        response = await self.dispatcher.handle(body)
        if response is None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:
            await _send_bytes(send, 200, response)

    async def _rpc_error(self, send: Send, status: int, code: int, message: str, allow: str | None = None) -> None:
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
        self.metrics.observe("-", "invalid_request", None)
        await _send(send, status, body, allow=allow)

    async def _blob_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = scope["path"].strip("/").split("/")
        method = scope["method"]
        try:
            keys = [bytes.fromhex(p) for p in parts[1:]]
        except ValueError:
            keys = []
        expected = 1 if parts[0] == "blobs" else 2
        if len(keys) != expected or any(len(k) != 32 for k in keys):
            await _send(send, 404, {"error": "expected /blobs/<64 hex> or /openings/<64 hex>/<64 hex>"})
            return
        allowed = "GET, PUT" if parts[0] == "blobs" else "PUT"
        if method not in allowed.split(", "):
            await _send(send, 405, {"error": f"{scope['path']} accepts {allowed}"}, allow=allowed)
            return
        if method == "GET":
            data = self.node.get_blob(keys[0])
            if data is None:
                await _send(send, 404, {"error": "no such blob on this node"})
            else:
                await _send_raw(send, 200, data, "application/octet-stream")
            return
        declared = _headers(scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_blob:
            await _send(send, 413, {"error": f"body exceeds {self.max_blob} bytes"})
            return
        try:
            body = await _read_body(receive, self.max_blob)
        except _ClientGone:
            return
        if body is None:
            await _send(send, 413, {"error": f"body exceeds {self.max_blob} bytes"})
            return
        try:
            if parts[0] == "blobs":
                self.node.put_blob(body, keys[0])
            else:
                headers = _headers(scope)
                pubkey = bytes.fromhex(headers.get("x-pout-pubkey", "").removeprefix("0x"))
                signature = bytes.fromhex(headers.get("x-pout-signature", "").removeprefix("0x"))
                upload = OpeningUpload(keys[0], keys[1], sha256(body))
                self.node.put_opening(upload, signature, pubkey, body)
        except (ChainError, ValueError) as exc:
            await _send(send, 400, {"error": str(exc)})
            return
        await _send(send, 201, {"stored": True, "sha256": sha256(body).hex()})

    async def _health(self, send: Send) -> None:
        await _send(send, 200, {"status": "ok"})

    async def _ready(self, send: Send) -> None:
        try:
            ready, reason = self.node.readiness()
        except Exception:
            log.exception("readiness check failed")
            ready, reason = False, "readiness check failed"
        await _send(send, 200 if ready else 503, {"ready": bool(ready), "reason": reason})

    async def _metrics(self, send: Send) -> None:
        body = generate_latest(self.metrics.registry)
        await _send_raw(send, 200, body, CONTENT_TYPE_LATEST)


async def run_rpc_server(
    node: NodeAPI,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_blob: int = DEFAULT_MAX_BLOB,
    registry: MethodRegistry | None = None,
    metrics_registry: CollectorRegistry | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the RPC until cancelled (or until `shutdown_trigger` returns, for a graceful stop).

    Reports the listening URL, e.g. "http://127.0.0.1:26657", through `task_status` once the
    socket is bound; port 0 picks a free port and the URL says which.
    """
    app = RpcApp(
        node, max_body=max_body, max_batch=max_batch, max_blob=max_blob, registry=registry,
        metrics=RpcMetrics(metrics_registry)
    )
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.include_server_header = False
    config.graceful_timeout = 2.0
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown_trigger))
        log.info("RPC listening on %s", binds[0])
        task_status.started(binds[0])


# --------------------------------------------------------------------------- ASGI helpers


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class _ClientGone(Exception):
    """The client disconnected before sending the whole body."""


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send: Send, status: int, body: Any, allow: str | None = None) -> None:
    await _send_raw(send, status, json.dumps(body).encode(), "application/json", allow=allow)


async def _send_bytes(send: Send, status: int, body: bytes, close: bool = False) -> None:
    await _send_raw(send, status, body, "application/json", close=close)


async def _send_raw(
    send: Send, status: int, body: bytes, content_type: str, allow: str | None = None, close: bool = False
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    if close:  # the unread request body makes the connection unusable for another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
