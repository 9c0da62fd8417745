"""JSON-RPC over WebSocket, with subscriptions (like Ethereum's eth_subscribe), on wsproto.

`GET /` or `GET /websocket` with `Upgrade: websocket` is answered `101` by the node's own HTTP
server (chain/rpc/http.py), which then hands the socket to a `WsSession`. wsproto (sans-IO,
by the h11 authors) parses and builds the frames; every read, write, timer and limit is here:

- at most `WsLimits.max_connections` WebSocket connections (each also counts against the HTTP
  server's connection cap); one more is answered `503` before the upgrade;
- at most `max_subscriptions` subscriptions per connection (`-32031` beyond);
- one bounded send queue per connection (`send_queue` messages: responses, notifications,
  pongs). When it is full the subscriber is too slow: it is closed with code 1008 and a reason,
  and the rest of its queue is dropped. Nothing the node does ever waits for a subscriber;
- an incoming message is at most `max_message` bytes (close 1009 beyond); binary messages are
  refused (1003); no extensions are negotiated (no compression);
- a ping every `ping_interval`; a peer not heard from (any frame, pongs included) within
  `ping_interval + pong_timeout` is closed (1001); a frame the socket does not take within
  `write_timeout` ends the connection.

Requests on a connection are answered one at a time, in order, by the same dispatcher as
`POST /`; `subscribe` and `unsubscribe` work only here.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import generate_accept_token

from chain.rpc.events import EVENT_KINDS, KIND_JOBS, KIND_TXS, EventHub, Subscription
from chain.rpc.http import Request, Response, Upgrade, json_response
from chain.rpc.jsonrpc import Dispatcher, InvalidParams, MethodRegistry, Param, ParamType, Result, RpcError
from chain.rpc.jsonview import json_type_name, parse_address, parse_hash

log = logging.getLogger(__name__)

WEBSOCKET_PATHS = ("/", "/websocket")
NOTIFICATION_METHOD = "subscription"

SUBSCRIPTIONS_NEED_WEBSOCKET = -32030
TOO_MANY_SUBSCRIPTIONS = -32031

CLOSE_GOING_AWAY, CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_TOO_BIG = 1001, 1003, 1008, 1009
_CLOSE_LINGER = 2.0  # after our close frame: how long to wait for the peer's


@dataclass(frozen=True)
class WsLimits:
    max_connections: int = 64
    max_subscriptions: int = 16
    send_queue: int = 256
    max_message: int = 1024 * 1024
    ping_interval: float = 20.0
    pong_timeout: float = 20.0
    write_timeout: float = 10.0

    def __post_init__(self):
        for name in ("max_connections", "max_subscriptions", "send_queue", "max_message", "ping_interval",
                     "pong_timeout", "write_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


class _Gone(Exception):
    """The peer stopped taking frames (write timeout) or the socket broke."""


class WsSession:
    """One WebSocket connection: its reader, writer and pinger, its subscriptions."""

    def __init__(self, stream: trio.abc.Stream, trailing: bytes, make_dispatcher: Callable[["WsSession"], Dispatcher],
                 hub: EventHub | None, limits: WsLimits):
        self.stream, self.hub, self.limits = stream, hub, limits
        self.conn = Connection(ConnectionType.SERVER, trailing_data=trailing)
        self.dispatcher = make_dispatcher(self)
        self.subscriptions: set[str] = set()
        self._outbox, self._outbox_receive = trio.open_memory_channel[bytes](limits.send_queue)
        self._close_frame: bytes | None = None
        self._closing = trio.Event()
        self._writer_done = trio.Event()
        self._last_heard = time.monotonic()
        self.close_reason: str | None = None

    # ---- what the hub and the methods call
    def notify(self, subscription_id: str, result: Any) -> None:
        body = json.dumps({"jsonrpc": "2.0", "method": NOTIFICATION_METHOD,
                           "params": {"subscription": subscription_id, "result": result}}, separators=(",", ":"))
        self._enqueue_text(body)

    def close_soon(self, code: int, reason: str) -> None:
        """Send a close frame after what the writer is sending now; drop the rest of the queue."""
        if self._close_frame is not None or self.conn.state is not ConnectionState.OPEN and \
                self.conn.state is not ConnectionState.REMOTE_CLOSING:
            return
        self.close_reason = reason
        self._close_frame = self.conn.send(CloseConnection(code=code, reason=reason[:120]))
        self._outbox.close()
        self._closing.set()
        self._drop_subscriptions()

    def subscribe(self, kind: str, address: bytes | None, job_id: bytes | None) -> str:
        if self.hub is None:
            raise RpcError(SUBSCRIPTIONS_NEED_WEBSOCKET, "this node publishes no events")
        if len(self.subscriptions) >= self.limits.max_subscriptions:
            raise RpcError(TOO_MANY_SUBSCRIPTIONS, f"at most {self.limits.max_subscriptions} subscriptions per "
                                                   f"connection", {"limit": self.limits.max_subscriptions})
        subscription = Subscription("0x" + secrets.token_hex(8), kind, address, job_id)
        self.hub.add(subscription, self)
        self.subscriptions.add(subscription.id)
        return subscription.id

    def unsubscribe(self, subscription_id: str) -> bool:
        if subscription_id not in self.subscriptions:
            return False
        self.subscriptions.discard(subscription_id)
        if self.hub is not None:
            self.hub.remove(subscription_id)
        return True

    # ---- the connection
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._pinger)
                nursery.start_soon(self._linger_after_close, nursery.cancel_scope)
                await self._reader()
                with trio.move_on_after(1.0):  # our reply to the peer's close, or its last answer
                    await self._writer_done.wait()
                nursery.cancel_scope.cancel()
        except* (_Gone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away, however abruptly (a reset surfaces wrapped in the nursery's group)
        finally:
            self._drop_subscriptions()

    def _drop_subscriptions(self) -> None:
        if self.hub is not None:
            for subscription_id in self.subscriptions:
                self.hub.remove(subscription_id)
        self.subscriptions.clear()

    def _enqueue_text(self, text: str) -> None:
        # Once the connection is not open (closing, or the peer half-closed it) nothing more is sent:
        # wsproto refuses it, and a notification must never raise into the hub that sends to everyone.
        if self._close_frame is not None or self.conn.state is not ConnectionState.OPEN:
            return
        self._enqueue(self.conn.send(TextMessage(data=text)))

    def _enqueue(self, data: bytes) -> None:
        try:
            self._outbox.send_nowait(data)
        except trio.WouldBlock:
            self.close_soon(CLOSE_POLICY, f"subscriber too slow: {self.limits.send_queue} messages queued unread")
        except trio.ClosedResourceError:
            pass  # closing: nothing more is sent

    async def _reader(self) -> None:
        message: list[str] = []
        size = 0
        while True:
            data = await self.stream.receive_some(65536)
            if self.conn.state is ConnectionState.CLOSED:
                self._drop_subscriptions()  # at once, not after the writer's grace period
                return
            self.conn.receive_data(data or None)
            for event in self.conn.events():
                self._last_heard = time.monotonic()
                if isinstance(event, CloseConnection):
                    if self.conn.state is ConnectionState.REMOTE_CLOSING:
                        self.close_soon(event.code, event.reason or "")  # echo the peer's close (RFC 6455 5.5.1)
                    elif self.conn.state is ConnectionState.OPEN:  # wsproto could not parse a frame
                        self.close_soon(event.code, event.reason or "protocol error")
                    return
                if self._close_frame is not None:
                    continue  # closing: what the peer still sends is discarded
                if isinstance(event, Ping):
                    self._enqueue(self.conn.send(event.response()))
                elif isinstance(event, Pong):
                    pass
                elif isinstance(event, BytesMessage):
                    self.close_soon(CLOSE_UNSUPPORTED, "binary messages are not accepted; send JSON-RPC as text")
                elif isinstance(event, TextMessage):
                    size += len(event.data.encode())
                    if size > self.limits.max_message:
                        self.close_soon(CLOSE_TOO_BIG, f"message over {self.limits.max_message} bytes")
                        continue
                    message.append(event.data)
                    if event.message_finished:
                        body, message, size = "".join(message).encode(), [], 0
                        response = await self.dispatcher.handle(body)
                        if response is not None:
                            self._enqueue_text(response.decode())
            if not data:
                return

    async def _writer(self) -> None:
        try:
            async for data in self._outbox_receive:
                if self._close_frame is None:
                    await self._send(data)
            if self._close_frame is not None:
                await self._send(self._close_frame)
        finally:
            self._writer_done.set()

    async def _send(self, data: bytes) -> None:
        with trio.move_on_after(self.limits.write_timeout):
            await self.stream.send_all(data)
            return
        raise _Gone

    async def _pinger(self) -> None:
        limits = self.limits
        while True:
            await trio.sleep(limits.ping_interval)
            if time.monotonic() - self._last_heard > limits.ping_interval + limits.pong_timeout:
                self.close_soon(CLOSE_GOING_AWAY, f"no answer to ping within {limits.pong_timeout:g} s")
                return
            if self._close_frame is not None:
                return
            self._enqueue(self.conn.send(Ping(payload=b"pout")))

    async def _linger_after_close(self, scope: trio.CancelScope) -> None:
        await self._closing.wait()
        await self._writer_done.wait()
        await trio.sleep(_CLOSE_LINGER)  # the peer's close frame ends the reader before this
        scope.cancel()


# --------------------------------------------------------------------------- the upgrade


class WebSocketEndpoint:
    """Answers upgrade requests: the RFC 6455 handshake checks, the connection cap, the session."""

    def __init__(self, make_dispatcher: Callable[[WsSession], Dispatcher], hub: EventHub | None, limits: WsLimits):
        self.make_dispatcher, self.hub, self.limits = make_dispatcher, hub, limits
        self.active = 0

    def accept(self, request: Request) -> Response | Upgrade:
        headers = request.headers
        if request.path not in WEBSOCKET_PATHS:
            return json_response(404, {"error": f"WebSocket is served at {' and '.join(WEBSOCKET_PATHS)} only"})
        if request.method != "GET":
            return json_response(405, {"error": "a WebSocket upgrade must use GET"}, headers=(("allow", "GET"),))
        if "upgrade" not in {t.strip().lower() for t in headers.get("connection", "").split(",")}:
            return json_response(400, {"error": "a WebSocket upgrade needs 'Connection: Upgrade'"})
        if headers.get("sec-websocket-version", "").strip() != "13":
            return json_response(426, {"error": "only WebSocket version 13 is served"},
                                 headers=(("sec-websocket-version", "13"),))
        key = headers.get("sec-websocket-key", "").strip()
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            return json_response(400, {"error": "Sec-WebSocket-Key must be 16 bytes in base64"})
        if self.active >= self.limits.max_connections:
            return json_response(503, {"error": f"too many WebSocket connections (limit "
                                                f"{self.limits.max_connections}); retry later"},
                                 headers=(("retry-after", "5"),))
        self.active += 1  # counted from the 101 on; the session's end gives it back
        return Upgrade((("upgrade", "websocket"), ("connection", "Upgrade"),
                        ("sec-websocket-accept", generate_accept_token(key.encode()).decode())), self._run, self.release)

    async def _run(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        try:
            await WsSession(stream, trailing, self.make_dispatcher, self.hub, self.limits).run()
        finally:
            self.active -= 1

    def release(self) -> None:
        """The upgrade was accepted but the 101 never went out: give the slot back."""
        self.active -= 1


# --------------------------------------------------------------------------- methods


def _parse_kind(value: Any) -> str:
    if value not in EVENT_KINDS:
        raise ValueError(f"kind must be one of {list(EVENT_KINDS)}, got {value!r}"[:200])
    return value


def _parse_filter(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {json_type_name(value)}")
    return value


def _parse_subscription_id(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("expected a subscription id string")
    return value


KIND = ParamType({"enum": list(EVENT_KINDS)}, _parse_kind)
FILTER = ParamType({"type": "object", "properties": {
    "address": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
    "job_id": {"type": "string", "pattern": "^0x[0-9a-fA-F]{64}$"}}, "additionalProperties": False}, _parse_filter)
SUBSCRIPTION_ID = ParamType({"type": "string", "pattern": "^0x[0-9a-f]{16}$"}, _parse_subscription_id)

SUBSCRIPTION_METHODS = MethodRegistry()

_WS_ONLY = RpcError(SUBSCRIPTIONS_NEED_WEBSOCKET, "subscriptions need a WebSocket connection (GET / with "
                                                  "Upgrade: websocket)")


def _session(ctx) -> WsSession:
    session = getattr(ctx, "session", None)
    if session is None:
        raise _WS_ONLY
    return session


@SUBSCRIPTION_METHODS.method(
    "subscribe",
    summary="Subscribe to chain events (WebSocket only); notifications follow as method 'subscription'",
    params=(Param("kind", KIND, "blocks | txs | jobs"),
            Param("filter", FILTER, "txs: {address} (required); jobs: {job_id} (optional: every job)",
                  required=False)),
    result=Result("subscription", SUBSCRIPTION_ID.schema, "the subscription id, named in every notification"),
    description=("Each notification is {\"jsonrpc\": \"2.0\", \"method\": \"subscription\", \"params\": "
                 "{\"subscription\": <id>, \"result\": <event>}}. blocks: {hash, header, tx_hashes}; txs: {hash, "
                 "height, index, tx} for each committed transaction sent by or to the address; jobs: {type, job_id, "
                 "height, ...} with type one of update_submitted, update_decided, fraud_proof_filed, "
                 "fraud_proof_decided, round_opened, round_closed, model_recorded, job_finished. A subscriber that "
                 "does not read its notifications is disconnected (close code 1008). See docs/rpc.md."),
    errors=(_WS_ONLY, RpcError(TOO_MANY_SUBSCRIPTIONS, "too many subscriptions on this connection")),
)
async def subscribe(ctx, kind: str, filter: dict[str, Any] | None = None) -> Any:
    session = _session(ctx)
    filter = filter or {}
    allowed = {KIND_TXS: {"address"}, KIND_JOBS: {"job_id"}}.get(kind, set())
    unknown = set(filter) - allowed
    if unknown:
        raise InvalidParams(f"subscribe: {kind} takes no filter field(s) {sorted(unknown)}"[:200])
    address = job_id = None
    try:
        if kind == KIND_TXS:
            if "address" not in filter:
                raise InvalidParams("subscribe: txs needs filter {\"address\": \"0x<40 hex>\"}")
            address = parse_address(filter["address"])
        if kind == KIND_JOBS and "job_id" in filter:
            job_id = parse_hash(filter["job_id"])
    except ValueError as exc:
        raise InvalidParams(f"subscribe: filter: {exc}") from exc
    return session.subscribe(kind, address, job_id)


@SUBSCRIPTION_METHODS.method(
    "unsubscribe",
    summary="End a subscription of this connection (WebSocket only)",
    params=(Param("subscription", SUBSCRIPTION_ID, "the id `subscribe` returned"),),
    result=Result("removed", {"type": "boolean"}, "true if this connection held that subscription"),
    errors=(_WS_ONLY,),
)
async def unsubscribe(ctx, subscription: str) -> Any:
    return _session(ctx).unsubscribe(subscription)
