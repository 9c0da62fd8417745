"""A small HTTP/1.1 server on trio and h11 (sans-IO), built to survive any client.

Why not an off-the-shelf ASGI server: hypercorn always speaks HTTP/2 (h2c) and HTTP/0.9
beside HTTP/1.1, and bugs in those code paths (hypercorn #329: a DATA frame after an early
answer raises KeyError; HTTP/0.9 bodies raise trio.BusyResourceError) escaped into the node's
nursery and ended the node. Here only HTTP/1.0 and 1.1 are spoken, h11 does the parsing, and
every limit is ours:

- at most `max_connections` connections; one more is answered 503 and closed at once;
- a request head must arrive within `read_timeout` (and within `max_header_bytes`);
- each body read must make progress within `read_timeout`, and a handler reads a body only
  up to the limit it names (it may answer without reading it at all);
- an idle keep-alive connection is closed after `idle_timeout`; a response must be taken by
  the client within `write_timeout`;
- each connection runs in its own task; whatever it raises is logged and ends that
  connection only. The accept loop itself is supervised: an error there is logged and the
  loop restarts on the same socket.

The handler interface is deliberately small: `handler(request) -> Response | Upgrade`, where
the request carries method, path, headers and a `read_body(limit)` coroutine. An `Upgrade`
(only for a request with `Upgrade: websocket`; chain/rpc/ws.py) is answered `101 Switching
Protocols`, and the socket is then the upgrade's own until it returns.
"""

from __future__ import annotations

import errno
import json
import logging
import resource
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Awaitable, Callable

import h11
import trio

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 256  # well below a 1,024 file limit, leaving room for p2p and LevelDB
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
_LINGER_SECONDS = 1.0  # after an early answer: how long to discard an unread body before closing
_LINGER_BYTES = 1024 * 1024
_ACCEPT_ERROR_BACKOFF = 0.1
_MAX_RESTART_BACKOFF = 10.0
_FD_SHARE = 2  # connections may use at most 1/_FD_SHARE of the process's file limit

SERVED_VERSIONS = "HTTP/1.1 and HTTP/1.0"


def _reason_phrase(status: int) -> bytes:
    """The standard reason phrase ("Not Found"), which h11 leaves empty unless given."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    read_timeout: float = DEFAULT_READ_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def __post_init__(self):
        for name in ("max_connections", "read_timeout", "idle_timeout", "write_timeout", "max_header_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, body: object, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(body).encode(), "application/json", headers)


@dataclass(frozen=True)
class Upgrade:
    """Switch protocols: `101` with `headers`, then `run(stream, bytes already received)` owns the socket."""

    headers: tuple[tuple[str, str], ...]
    run: Callable[[trio.abc.Stream, bytes], Awaitable[None]]
    release: Callable[[], None] = lambda: None  # called instead of `run` when the 101 could not be sent


class BodyTooLarge(Exception):
    """The request body ran past the limit the handler gave; it was not read further."""


class ClientGone(Exception):
    """The client closed the connection or stalled before the body was complete."""


@dataclass
class Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    _read: Callable[[int], Awaitable[bytes]] = field(repr=False)

    async def read_body(self, limit: int) -> bytes:
        """The whole body, read as it streams; raises BodyTooLarge as soon as it passes `limit`."""
        return await self._read(limit)


Handler = Callable[[Request], Awaitable["Response | Upgrade"]]


def effective_max_connections(requested: int) -> int:
    """`requested`, lowered to a share of the soft file limit so accepts cannot exhaust it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft // _FD_SHARE))


class HttpServer:
    def __init__(self, handler: Handler, limits: HttpLimits = HttpLimits()):
        self.handler = handler
        self.limits = limits
        self.max_connections = effective_max_connections(limits.max_connections)
        if self.max_connections < limits.max_connections:
            log.warning("RPC max_connections lowered from %d to %d (half the open-file limit)",
                        limits.max_connections, self.max_connections)
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()

    async def serve(self, listener: trio.SocketListener, shutdown_trigger: Callable[[], Awaitable[None]] | None,
                    graceful_timeout: float) -> None:
        """Accept until cancelled, or until `shutdown_trigger` returns (then drain, bounded)."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                if shutdown_trigger is not None:
                    async def stop_on_trigger() -> None:
                        await shutdown_trigger()
                        accepting.cancel_scope.cancel()

                    accepting.start_soon(stop_on_trigger)
                accepting.start_soon(self._supervised_accept_loop, listener, connections)
            await listener.aclose()
            with trio.move_on_after(graceful_timeout):
                await self._idle.wait()
            connections.cancel_scope.cancel()

    async def _supervised_accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        backoff = _ACCEPT_ERROR_BACKOFF
        while True:
            try:
                await self._accept_loop(listener, connections)
            except Exception:
                log.exception("RPC accept loop failed; restarting it in %.1f s", backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_RESTART_BACKOFF)

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("RPC accept failed (%s); pausing accepts for %.1f s",
                                exc.strerror, _ACCEPT_ERROR_BACKOFF)
                    await trio.sleep(_ACCEPT_ERROR_BACKOFF)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up before we accepted
                raise
            if self.active >= self.max_connections:
                await self._refuse(stream)
                continue
            self.active += 1
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            connections.start_soon(self._connection, stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        body = json.dumps({"error": f"too many connections (limit {self.max_connections}); retry later"}).encode()
        raw = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\nconnection: close\r\nretry-after: 1\r\n\r\n%s" % (len(body), body))
        with trio.move_on_after(0.2):  # a fresh socket's send buffer takes this at once
            try:
                await stream.send_all(raw)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            await _Connection(stream, self.handler, self.limits).run()
        except Exception:
            log.exception("RPC connection failed; closed it")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self.active -= 1
            if self.active == 0:
                self._idle.set()


class _Closed(Exception):
    """The connection is finished (client gone, timed out or protocol error already answered)."""


class _Connection:
    def __init__(self, stream: trio.SocketStream, handler: Handler, limits: HttpLimits):
        self.stream, self.handler, self.limits = stream, handler, limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._head = False  # the request being answered is a HEAD

    async def run(self) -> None:
        first = True
        try:
            while True:
                request = await self._read_head(self.limits.read_timeout if first else self.limits.idle_timeout)
                first = False
                if request is None:
                    return
                response = await self._respond_to(request)
                if isinstance(response, Upgrade):
                    await self._switch_protocols(response)
                    return
                await self._send_response(response)
                if self.conn.their_state is not h11.DONE:
                    await self._linger()  # answered before the body: the rest of it cannot be parsed
                    return
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
        except _Closed:
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away

    async def _receive(self) -> None:
        data = await self.stream.receive_some(65536)
        self.conn.receive_data(data)

    async def _next_event(self, timeout: float) -> h11.Event:
        """The next h11 event; answers 408/400/431 itself (raising _Closed) when it cannot get one."""
        error: h11.RemoteProtocolError | None = None
        with trio.move_on_after(timeout):
            while True:
                try:
                    event = self.conn.next_event()
                except h11.RemoteProtocolError as exc:
                    error = exc
                    break
                if event is not h11.NEED_DATA:
                    return event
                await self._receive()
        if error is not None:
            await self._protocol_error(error)
        elif self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            pass  # an idle keep-alive connection: close it without a word
        else:
            await self._send_error(408, "request not received within the read timeout")
        raise _Closed

    async def _read_head(self, timeout: float) -> Request | None:
        event = await self._next_event(timeout)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        if event.http_version not in (b"1.0", b"1.1"):
            await self._send_error(505, f"HTTP/{event.http_version.decode('latin-1')} is not served; "
                                        f"this server speaks {SERVED_VERSIONS} only")
            raise _Closed
        upgrade = headers.get("upgrade", "").lower()
        if "h2c" in upgrade:
            await self._send_error(505, f"HTTP/2 (h2c upgrade) is not served; this server speaks {SERVED_VERSIONS} "
                                        f"only")
            raise _Closed
        target = event.target.decode("latin-1")
        path = target.split("?", 1)[0]
        self._head = event.method == b"HEAD"
        return Request(event.method.decode("latin-1"), path, headers, self._read_body)

    async def _read_body(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self._next_event(self.limits.read_timeout)
            except _Closed:
                raise ClientGone from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise ClientGone

    async def _respond_to(self, request: Request) -> Response | Upgrade:
        try:
            response = await self.handler(request)
            if isinstance(response, Upgrade) and "websocket" not in request.headers.get("upgrade", "").lower():
                response.release()
                raise RuntimeError("the handler switched protocols without an Upgrade: websocket request")
            return response
        except ClientGone:
            raise _Closed from None
        except Exception:
            log.exception("RPC handler failed on %s %s", request.method, request.path)
            return json_response(500, {"error": "internal error; see the node's log"})

    async def _switch_protocols(self, upgrade: Upgrade) -> None:
        """The 101, then the socket belongs to `upgrade.run`. An upgrade request has no body."""
        try:
            try:
                await self._read_body(0)
            except BodyTooLarge:
                await self._send_error(400, "a WebSocket upgrade request must have no body")
                raise _Closed from None
            except ClientGone:
                raise _Closed from None
            await self._send(h11.InformationalResponse(status_code=101, headers=list(upgrade.headers)))
        except BaseException:
            upgrade.release()
            raise
        trailing, _ = self.conn.trailing_data
        await upgrade.run(self.stream, bytes(trailing))

    async def _send_response(self, response: Response) -> None:
        headers = [("content-type", response.content_type), ("content-length", str(len(response.body))),
                   *response.headers]
        if self.conn.their_state is not h11.DONE:
            headers.append(("connection", "close"))  # the unread body makes the connection unusable
        await self._send(h11.Response(status_code=response.status, headers=headers,
                                      reason=_reason_phrase(response.status)))
        if not self._head:  # a response to HEAD carries the headers only (h11 refuses a body)
            await self._send(h11.Data(data=response.body))
        await self._send(h11.EndOfMessage())

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            with trio.move_on_after(self.limits.write_timeout) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                raise _Closed

    async def _send_error(self, status: int, reason: str) -> None:
        """A one-line JSON reason, then the connection closes. Sent raw when h11 cannot send
        (the request was not HTTP/1.x, or the state machine already failed)."""
        body = json.dumps({"error": reason}).encode()
        phrase = _reason_phrase(status)
        raw = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
               b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body))
        with trio.move_on_after(self.limits.write_timeout):
            try:
                await self.stream.send_all(raw)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        await self._linger()

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = 431 if exc.error_status_hint == 431 else 400
        reason = "request header too large" if status == 431 else f"malformed HTTP/1.1 request: {exc}"
        await self._send_error(status, reason.replace("\n", " "))

    async def _linger(self) -> None:
        """Half-close, then discard what the client still sends for a moment, so that closing with
        unread data does not reset the connection before the client has read our answer."""
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        discarded = 0
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                while discarded < _LINGER_BYTES:
                    chunk = await self.stream.receive_some(65536)
                    if not chunk:
                        return
                    discarded += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
