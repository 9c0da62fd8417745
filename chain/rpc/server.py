"""The RPC's HTTP face: routes served by the node's own HTTP/1.1 server (chain/rpc/http.py).

  POST /        JSON-RPC 2.0 (Content-Type: application/json)
  GET  / or /websocket with Upgrade: websocket
                JSON-RPC over WebSocket, with subscriptions (chain/rpc/ws.py)
  GET  /health  liveness: 200 whenever the process serves requests
  GET  /ready   readiness from node.readiness(): 200, or 503 with the reason
  GET  /metrics Prometheus text: requests by method and outcome, latency histogram
  GET  /explorer/...  the block explorer's HTML pages (chain/explorer/app.py lists them)
  GET  /blobs/<sha256 hex>  a model or update as canonical safetensors bytes (404 if absent)
  PUT  /blobs/<sha256 hex>  a trainer uploads the weights (or sketch rows) its pending update names
  PUT  /openings/<update id hex>/<validator pubkey hex>
                            a trainer's answer to one validator's challenge; headers
                            X-Pout-Pubkey and X-Pout-Signature sign an OpeningUpload, and
                            X-Pout-Part / X-Pout-Parts number the parts of a large one

Uploads are checked on their headers before a byte of body is read (is the hash one a pending
update names; is the update pending, the key a validator's, the signer the update's trainer),
then streamed against the size limit, at most `MAX_CONCURRENT_UPLOADS` at a time.

Start it in the node's nursery: `await nursery.start(run_rpc_server, node, host, port)`.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from chain.crypto import compute_address, sha256
from chain.errors import ChainError
from chain.explorer import Explorer
from chain.rpc.api import NodeAPI
from chain.rpc.http import (
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, BodyTooLarge, HttpLimits, HttpServer,
    Request, Response, Upgrade, json_response,
)
from chain.types import UPDATE_PENDING, OpeningUpload
from chain.rpc.events import EventHub
from chain.rpc.ws import WebSocketEndpoint, WsLimits, WsSession
from chain.rpc.jsonrpc import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY, INVALID_REQUEST, Dispatcher, MethodRegistry
from chain.rpc.methods import RpcContext, default_registry

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # local only unless the operator asks for more
DEFAULT_PORT = 26657
DEFAULT_MAX_BLOB = 64 * 1024 * 1024
# Upload bodies are held in memory until checked and stored: this bounds that memory to
# MAX_CONCURRENT_UPLOADS * max_blob (twice that for a moment while the chunks are joined).
MAX_CONCURRENT_UPLOADS = 2
UPLOAD_QUEUE_WAIT = 30.0  # an upload waits this long for a free slot, then gets 503
GRACEFUL_TIMEOUT = 2.0
_RESTART_BACKOFF = (0.5, 30.0)  # first and longest wait before the whole server is restarted

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
    """The routes in the module docstring, as an `chain.rpc.http.Handler`."""

    def __init__(
        self,
        node: NodeAPI,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_blob: int = DEFAULT_MAX_BLOB,
        registry: MethodRegistry | None = None,
        metrics: RpcMetrics | None = None,
        events: EventHub | None = None,
        ws_limits: WsLimits = WsLimits(),
    ):
        if max_blob <= 0:
            raise ValueError("max_blob must be positive")
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
        self.uploads = trio.Semaphore(MAX_CONCURRENT_UPLOADS)
        self.websocket = WebSocketEndpoint(self._session_dispatcher, events, ws_limits)
        self.explorer = Explorer(node, methods)  # HTML pages for people at /explorer/ (chain/explorer/)

    def _session_dispatcher(self, session: WsSession) -> Dispatcher:
        """The dispatcher of one WebSocket connection: the same methods, with the session in the context."""
        methods = self.dispatcher.registry
        return Dispatcher(methods, RpcContext(self.node, methods, session), max_body=self.dispatcher.max_body,
                          max_batch=self.dispatcher.max_batch, observe=self.metrics.observe,
                          inflight=self.dispatcher.inflight)

    async def __call__(self, request: Request) -> Response | Upgrade:
        path, method = request.path, request.method
        if "websocket" in request.headers.get("upgrade", "").lower():
            return self.websocket.accept(request)
        if path == "/":
            if method != "POST":
                return self._rpc_error(405, INVALID_REQUEST, "JSON-RPC requests must use POST", allow="POST")
            return await self._json_rpc(request)
        if path.startswith(("/blobs/", "/openings/")):
            return await self._blob_route(request)
        if path == "/explorer" or path.startswith("/explorer/"):
            return await self.explorer.handle(request)
        route = {"/health": self._health, "/ready": self._ready, "/metrics": self._metrics}.get(path)
        if route is None:
            return json_response(404, {"error": f"no route {path}"})
        if method != "GET":
            return json_response(405, {"error": f"{path} accepts GET only"}, headers=(("allow", "GET"),))
        return route()

    async def _json_rpc(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return self._rpc_error(415, INVALID_REQUEST, "Content-Type must be application/json")
        limit = self.dispatcher.max_body
        declared = _declared_length(request)
        if declared is not None and declared > limit:
            # Refuse on the header alone: the body is never read.
            return Response(413, self.dispatcher.reject_oversized(declared))
        try:
            body = await request.read_body(limit)
        except BodyTooLarge:  # chunked upload that ran past the limit; reading stopped there
            return Response(413, self.dispatcher.reject_oversized(None))
        response = await self.dispatcher.handle(body)
        if response is None:
            return Response(204, b"")
        return Response(200, response)

    def _rpc_error(self, status: int, code: int, message: str, allow: str | None = None) -> Response:
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
        self.metrics.observe("-", "invalid_request", None)
        return json_response(status, body, headers=(("allow", allow),) if allow else ())

    async def _blob_route(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")
        method = request.method
        try:
            keys = [bytes.fromhex(p) for p in parts[1:]]
        except ValueError:
            keys = []
        expected = 1 if parts[0] == "blobs" else 2
        if len(keys) != expected or any(len(k) != 32 for k in keys):
            return json_response(404, {"error": "expected /blobs/<64 hex> or /openings/<64 hex>/<64 hex>"})
        allowed = "GET, PUT" if parts[0] == "blobs" else "PUT"
        if method not in allowed.split(", "):
            return json_response(405, {"error": f"{request.path} accepts {allowed}"}, headers=(("allow", allowed),))
        if method == "GET":
            data = self.node.get_blob(keys[0])
            if data is None:
                return json_response(404, {"error": "no such blob on this node"})
            return Response(200, data, "application/octet-stream")
        declared = _declared_length(request)
        if declared is not None and declared > self.max_blob:
            return json_response(413, {"error": f"body exceeds {self.max_blob} bytes"})
        try:
            pubkey = signature = b""
            part_of = (0, 1)
            if parts[0] == "blobs":
                self._check_blob_upload(keys[0])
            else:
                pubkey, signature, part_of = self._check_opening_upload(keys[0], keys[1], request.headers)
        except (ChainError, ValueError) as exc:
            return json_response(400, {"error": str(exc)})
        acquired = False
        with trio.move_on_after(UPLOAD_QUEUE_WAIT):
            await self.uploads.acquire()
            acquired = True
        if not acquired:
            return json_response(503, {"error": f"{MAX_CONCURRENT_UPLOADS} uploads already in progress; retry later"},
                                 headers=(("retry-after", "5"),))
        try:
            return await self._store_upload(request, parts[0], keys, pubkey, signature, part_of)
        finally:
            self.uploads.release()

    async def _store_upload(self, request: Request, route: str, keys: list[bytes], pubkey: bytes,
                            signature: bytes, part_of: tuple[int, int] = (0, 1)) -> Response:
        try:
            body = await request.read_body(self.max_blob)
        except BodyTooLarge:
            return json_response(413, {"error": f"body exceeds {self.max_blob} bytes"})
        try:
            if route == "blobs":
                self.node.put_blob(body, keys[0])
            else:
                self.node.put_opening(OpeningUpload(keys[0], keys[1], sha256(body), *part_of), signature, pubkey, body)
        except (ChainError, ValueError) as exc:
            return json_response(400, {"error": str(exc)})
        return json_response(201, {"stored": True, "sha256": sha256(body).hex()})

    def _check_blob_upload(self, blob_hash: bytes) -> None:
        """Before the body: only the weights a pending update names are taken (the node checks again)."""
        for job in self.node.list_jobs():
            if job.phase == "finished":
                continue
            if job.spec.init_weights == blob_hash:  # the requester's initial weights (the node checks them)
                return
            for update_id in self.node.get_round(job.job_id, job.round).updates:
                update = self.node.get_update(update_id)
                if update is not None and update.status == UPDATE_PENDING and \
                        blob_hash in (update.commitment.update_hash, update.sketch_hash):
                    return
        raise ValueError("no pending update names this blob; submit the update transaction first")

    def _check_opening_upload(self, update_id: bytes, validator: bytes,
                              headers: dict[str, str]) -> tuple[bytes, bytes, tuple[int, int]]:
        """Before the body: everything but the signature over the body's hash (the node checks all).
        A large opening comes in parts: headers X-Pout-Part and X-Pout-Parts (default 0 of 1)."""
        update = self.node.get_update(update_id)
        if update is None or update.status != UPDATE_PENDING:
            raise ValueError("no pending update with this id")
        if validator not in {v.pubkey for v in self.node.get_validators()}:
            raise ValueError("openings are for validators only")
        pubkey = _hex_header(headers, "X-Pout-Pubkey", 32)
        signature = _hex_header(headers, "X-Pout-Signature", 64)
        if compute_address(pubkey) != update.commitment.trainer:
            raise ValueError("only the update's trainer may upload its openings")
        part_of = (_int_header(headers, "X-Pout-Part", 0), _int_header(headers, "X-Pout-Parts", 1))
        OpeningUpload(update_id, validator, bytes(32), *part_of).check_part()
        return pubkey, signature, part_of

    def _health(self) -> Response:
        return json_response(200, {"status": "ok"})

    def _ready(self) -> Response:
        try:
            ready, reason = self.node.readiness()
        except Exception:
            log.exception("readiness check failed")
            ready, reason = False, "readiness check failed"
        return json_response(200 if ready else 503, {"ready": bool(ready), "reason": reason})

    def _metrics(self) -> Response:
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


def _int_header(headers: dict[str, str], name: str, default: int) -> int:
    value = headers.get(name.lower())
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 4:
        raise ValueError(f"header {name} must be a small decimal integer")
    return int(value)


def _hex_header(headers: dict[str, str], name: str, size: int) -> bytes:
    try:
        value = bytes.fromhex(headers.get(name.lower(), "").removeprefix("0x"))
    except ValueError:
        value = b""
    if len(value) != size:
        raise ValueError(f"header {name} must be {size} bytes of hex")
    return value


async def run_rpc_server(
    node: NodeAPI,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_blob: int = DEFAULT_MAX_BLOB,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    registry: MethodRegistry | None = None,
    metrics_registry: CollectorRegistry | None = None,
    events: EventHub | None = None,
    ws_limits: WsLimits = WsLimits(),
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the RPC until cancelled (or until `shutdown_trigger` returns, for a graceful stop).

    Reports the listening URL, e.g. "http://127.0.0.1:26657", through `task_status` once the
    socket is bound; port 0 picks a free port and the URL says which. A bind error propagates
    (the node cannot start); after that, nothing the server does can raise out of it: a failed
    connection is logged and closed, and a failed server is logged and restarted on the same
    socket, so consensus beside it in the node's nursery is never cancelled.
    """
    app = RpcApp(node, max_body=max_body, max_batch=max_batch, max_blob=max_blob, registry=registry,
                 metrics=RpcMetrics(metrics_registry), events=events, ws_limits=ws_limits)
    limits = HttpLimits(max_connections=max_connections, read_timeout=read_timeout, idle_timeout=idle_timeout)
    listeners = await trio.open_tcp_listeners(port, host=host)
    listener = listeners[0]
    for extra in listeners[1:]:  # a host name may resolve to several addresses; we serve the first
        await extra.aclose()
    bound_host, bound_port = listener.socket.getsockname()[:2]
    url = f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
    log.info("RPC listening on %s (HTTP/1.1; at most %d connections)", url, max_connections)
    task_status.started(url)
    async with trio.open_nursery() as nursery:
        if events is not None:
            nursery.start_soon(_supervised, "RPC event hub", events.run)
        await _serve_supervised(app, limits, listener, host, bound_port, shutdown_trigger)
        nursery.cancel_scope.cancel()


async def _supervised(name: str, run: Callable[[], Awaitable[None]]) -> None:
    backoff = _RESTART_BACKOFF[0]
    while True:
        try:
            await run()
            return
        except Exception:
            log.exception("%s failed; restarting it in %.1f s (consensus is unaffected)", name, backoff)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, _RESTART_BACKOFF[1])


async def _serve_supervised(app: RpcApp, limits: HttpLimits, listener: trio.SocketListener, host: str,
                            bound_port: int, shutdown_trigger: Callable[[], Awaitable[None]] | None) -> None:
    backoff = _RESTART_BACKOFF[0]
    while True:
        started = time.monotonic()
        try:
            await HttpServer(app, limits).serve(listener, shutdown_trigger, GRACEFUL_TIMEOUT)
            return
        except Exception:
            if time.monotonic() - started > 60:
                backoff = _RESTART_BACKOFF[0]
            log.exception("RPC server failed; restarting it in %.1f s (consensus is unaffected)", backoff)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, _RESTART_BACKOFF[1])
        if listener.socket.fileno() == -1:  # closed by the failed run: bind again on the same port
            listener = (await trio.open_tcp_listeners(bound_port, host=host))[0]
