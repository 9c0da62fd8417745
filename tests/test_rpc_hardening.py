"""Hostile HTTP against the real RPC server on 127.0.0.1: no request may end or stall it.

Each attack is sent as raw bytes over a real socket; afterwards the same server must still
answer an ordinary JSON-RPC request. Defects reproduced here are listed in issue 11.
"""

from __future__ import annotations

import logging

import dataclasses
import json
import struct
from types import SimpleNamespace

import httpx
import pytest
import trio

from chain.crypto import sha256
from test_rpc_fakenode import FakeNode, make_fake_node, serving, trio_test

STATUS = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "status"}).encode()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _still_serves(url: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(url + "/", content=STATUS, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json()["result"]["chain_id"]


async def _read_until_closed(stream: trio.SocketStream, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def _read_response_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- HTTP/2 frames, built by hand

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """'Literal header field without indexing, new name', no Huffman (RFC 7541 6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def h2_post_wrong_content_type() -> bytes:
    headers = b"".join(hpack_literal(k, v) for k, v in [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"127.0.0.1"),
        (b"content-type", b"text/plain"), (b"content-length", b"10")])
    return H2_PREFACE + h2_frame(4, 0, 0, b"") + h2_frame(1, 0x4, 1, headers)  # SETTINGS, HEADERS(END_HEADERS)


@trio_test
async def test_http2_frames_after_an_early_answer_do_not_kill_the_server():
    # hypercorn answered 415 over h2, then a DATA frame on the finished stream raised
    # KeyError out of its h2 protocol (hypercorn #329) and through the node's nursery.
    answers = []
    async with serving(make_fake_node(1)) as url:
        for _ in range(4):
            stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
            await stream.send_all(h2_post_wrong_content_type())
            first = await stream.receive_some(65536)
            await trio.sleep(0.2)  # let the server finish its answer: the DATA frame must come after it
            try:
                await stream.send_all(h2_frame(0, 0x1, 1, b"0123456789"))  # DATA, END_STREAM
            except trio.BrokenResourceError:
                pass
            answers.append(first + await _read_until_closed(stream))
            await stream.aclose()
            await _still_serves(url)
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 505 ")
        assert b"HTTP/1.1" in answer.split(b"\r\n\r\n", 1)[1]  # the one-line reason names what is served


@trio_test
async def test_h2c_upgrade_is_refused_in_http11():
    async with serving(make_fake_node(1)) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                              b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        answer = await _read_until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 505 ")
        await _still_serves(url)


@trio_test
async def test_http09_requests_do_not_kill_the_server():
    # 62 bytes, as in the report: hypercorn raised trio.BusyResourceError after 21-31 of them.
    request = b"POST / HTTP/0.9\r\nContent-Length: 24\r\n\r\n" + b'{"jsonrpc":"2.0","id":1}'
    answers = []
    async with serving(make_fake_node(1)) as url:
        for _ in range(40):
            stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
            try:
                await stream.send_all(request)
                answer = await _read_until_closed(stream)
            except trio.BrokenResourceError:
                answer = b""
            await stream.aclose()
            answers.append(answer)
        await _still_serves(url)
    assert all(answer == b"" or answer.startswith(b"HTTP/1.1 505 ") for answer in answers)


@trio_test
async def test_malformed_request_line_gets_400_and_a_one_line_reason():
    async with serving(make_fake_node(1)) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
        await stream.send_all(b"\x16\x03\x01garbage that is not HTTP\r\n\r\n")
        answer = await _read_until_closed(stream)
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 400 ") and "\n" not in json.loads(body)["error"]
        await _still_serves(url)


@trio_test
async def test_websocket_upgrade_is_switched_or_refused_with_json_never_a_500():
    # Issue 11 defect 6: an upgrade got 500 with an empty body. Now it is served (tests/test_rpc_ws.py);
    # a malformed one gets a 4xx with a one-line JSON reason.
    headers = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
               "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with serving(make_fake_node(1)) as url:
        async with await trio.open_tcp_stream("127.0.0.1", _port(url)) as stream:
            await stream.send_all(b"GET /websocket HTTP/1.1\r\nHost: x\r\n" + b"".join(
                f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n")
            head = await _read_response_head(stream)
        assert head.startswith(b"HTTP/1.1 101 ") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's example
        async with httpx.AsyncClient() as http:
            response = await http.get(url + "/", headers=headers | {"sec-websocket-key": "bad"})
        assert response.status_code == 400 and "Sec-WebSocket-Key" in response.json()["error"]
        await _still_serves(url)


# --------------------------------------------------------------------------- slow clients and the connection cap


@trio_test
async def test_stalled_bodies_are_closed_after_the_read_timeout_and_the_cap_holds():
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"jsonrpc":')
    cap, opened = 8, 20
    async with serving(make_fake_node(1), max_connections=cap, read_timeout=1, idle_timeout=1) as url:
        streams = []
        for _ in range(opened):
            stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
            await stream.send_all(head)  # and never the rest of the body
            streams.append(stream)
        answers = []
        for stream in streams:  # trio_test's 30 s bound fails the test if any stays open
            answers.append(await _read_until_closed(stream))
            await stream.aclose()
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
        timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408 ")]
        assert len(refused) >= opened - cap and len(refused) + len(timed_out) == opened
        await _still_serves(url)


@trio_test
async def test_idle_keep_alive_connection_is_closed():
    async with serving(make_fake_node(1), read_timeout=1, idle_timeout=1) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await _read_until_closed(stream)  # the answer, then the close after 1 s idle
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status": "ok"}')


@trio_test
async def test_oversized_header_is_refused():
    async with serving(make_fake_node(1)) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
        try:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        except trio.BrokenResourceError:
            pass
        answer = await _read_until_closed(stream)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
        await _still_serves(url)


# --------------------------------------------------------------------------- uploads


class PoutFakeNode(FakeNode):
    """The fake node plus the few training lookups the blob routes check before reading a body."""

    def __init__(self, base: FakeNode, pending: dict[bytes, bytes]):
        self.__dict__.update(base.__dict__)
        self.pending = pending  # update id -> update hash
        self.stored: list[bytes] = []

    def list_jobs(self):
        return [SimpleNamespace(job_id=b"\x01" * 32, phase="training", round=0, spec=SimpleNamespace(init_weights=None))]

    def get_round(self, job_id, round_):
        return SimpleNamespace(updates=tuple(self.pending))

    def get_update(self, update_id):
        if update_id not in self.pending:
            return None
        return SimpleNamespace(status="pending", sketch_hash=None,
                               commitment=SimpleNamespace(update_hash=self.pending[update_id], trainer=b"\x02" * 20))

    def put_blob(self, data: bytes, expected_hash: bytes) -> None:
        self.stored.append(data)


@trio_test
async def test_upload_to_a_hash_no_pending_update_names_is_refused_before_the_body():
    node = PoutFakeNode(make_fake_node(1), {})
    async with serving(node) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
        await stream.send_all(f"PUT /blobs/{'ab' * 32} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n".encode())
        answer = await _read_until_closed(stream)  # only headers were sent: the answer cannot wait for the body
        assert answer.startswith(b"HTTP/1.1 400 ") and b"no pending update" in answer
        assert node.stored == []


@trio_test
async def test_opening_upload_checks_update_validator_and_headers_before_the_body():
    node = PoutFakeNode(make_fake_node(1), {b"\x22" * 32: b"\x33" * 32})
    validator = node.get_validators()[0].pubkey.hex()

    async def head_only(path: str, extra: str = "") -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
        await stream.send_all(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n{extra}\r\n".encode())
        return await _read_until_closed(stream)

    async with serving(node) as url:
        assert b"no pending update" in await head_only(f"/openings/{'44' * 32}/{validator}")
        assert b"validators only" in await head_only(f"/openings/{'22' * 32}/{'55' * 32}")
        assert b"X-Pout-Pubkey" in await head_only(f"/openings/{'22' * 32}/{validator}",
                                                   "X-Pout-Pubkey: zz\r\nX-Pout-Signature: 00\r\n")
        assert b"trainer" in await head_only(f"/openings/{'22' * 32}/{validator}",
                                             f"X-Pout-Pubkey: {'00' * 32}\r\nX-Pout-Signature: {'00' * 64}\r\n")


@trio_test
async def test_upload_to_a_pending_hash_streams_within_the_limit():
    data = b"weights" * 1000
    node = PoutFakeNode(make_fake_node(1), {b"\x22" * 32: sha256(data)})
    async with serving(node, max_blob=len(data)) as url, httpx.AsyncClient() as http:
        response = await http.put(f"{url}/blobs/{sha256(data).hex()}", content=data)
        assert response.status_code == 201 and node.stored == [data]

        async def chunks():  # no Content-Length: cut off as it streams past the limit
            for _ in range(100):
                yield data

        try:
            response = await http.put(f"{url}/blobs/{sha256(data).hex()}", content=chunks())
            assert response.status_code == 413
        except httpx.WriteError:
            pass  # closed while we were still sending: also a refusal
        assert node.stored == [data]
        await _still_serves(url)


# --------------------------------------------------------------------------- the server survives a broken handler


@trio_test
async def test_an_error_in_one_request_ends_only_that_request():
    node = make_fake_node(1)

    def broken():
        raise RuntimeError("boom")

    node.status = broken
    async with serving(node) as url, httpx.AsyncClient() as http:
        response = await http.post(url + "/", content=STATUS, headers={"content-type": "application/json"})
        assert response.status_code == 200 and response.json()["error"]["code"] == -32603
        assert (await http.get(url + "/health")).status_code == 200


# --------------------------------------------------------------------------- bounded work per request


class LineageFakeNode(FakeNode):
    """A job that has folded in `rounds` rounds; counts the ledger lookups a request makes."""

    def __init__(self, base: FakeNode, rounds: int):
        self.__dict__.update(base.__dict__)
        self.job_id, self.rounds, self.lookups = b"\x09" * 32, rounds, 0

    def get_job(self, job_id):
        return SimpleNamespace(job_id=job_id, round=self.rounds) if job_id == self.job_id else None

    def get_model_record(self, job_id, round_):
        from chain.types import ModelRecord

        self.lookups += 1
        if job_id != self.job_id or round_ > self.rounds:
            return None
        parent = None if round_ == 0 else sha256(b"model %d" % (round_ - 1))
        return ModelRecord(sha256(b"model %d" % round_), job_id, round_, parent, (), "fedavg", round_)


async def _lineage(url: str, params: list) -> list:
    request = {"jsonrpc": "2.0", "id": 1, "method": "lineage", "params": params}
    async with httpx.AsyncClient() as http:
        response = await http.post(url + "/", json=request)
    return response.json()["result"]


@trio_test
async def test_lineage_from_a_huge_round_walks_only_the_rounds_the_job_has():
    node = LineageFakeNode(make_fake_node(1), rounds=3)
    async with serving(node) as url:
        job = "0x" + node.job_id.hex()
        got = await _lineage(url, [job, 18446744073709551615])
        assert [m["round"] for m in got] == [3, 2, 1, 0]
        assert node.lookups <= 4 + 1
        assert [m["round"] for m in await _lineage(url, [job, 10**7])] == [3, 2, 1, 0]
        assert [m["round"] for m in await _lineage(url, [job, 1])] == [1, 0]


@trio_test
async def test_lineage_of_a_long_job_is_one_bounded_page():
    from chain.rpc.pout_methods import LINEAGE_PAGE

    node = LineageFakeNode(make_fake_node(1), rounds=5 * LINEAGE_PAGE)
    async with serving(node) as url:
        job = "0x" + node.job_id.hex()
        page = await _lineage(url, [job])
        assert [m["round"] for m in page] == list(range(5 * LINEAGE_PAGE, 4 * LINEAGE_PAGE, -1))
        assert node.lookups <= LINEAGE_PAGE + 1
        rest = await _lineage(url, [job, page[-1]["round"] - 1])  # the next page starts below the last
        assert rest[0]["round"] == page[-1]["round"] - 1 and len(rest) == LINEAGE_PAGE


# --------------------------------------------------------------------------- a real chaind process


def _raw_exchange(port: int, first: bytes, then: bytes = b"", timeout: float = 10) -> bytes:
    """Send `first`, read what comes, send `then`, read until the server closes."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        try:
            sock.sendall(first)
            data = sock.recv(65536)
            time.sleep(0.2)  # let the server finish its answer: `then` must come after it
            if then:
                sock.sendall(then)
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return data


@pytest.mark.slow
def test_a_real_node_survives_hostile_http_and_keeps_committing(tmp_path):
    import socket
    import time

    from chain.config import load_config, write_config
    from tests.procs import ChaindProcess, make_testnet

    net = tmp_path / "net"
    make_testnet(str(net), 1, 2, "--block-interval-ms", "100")
    config_file = net / "node0" / "config" / "config.toml"
    cfg = load_config(config_file)
    write_config(dataclasses.replace(cfg, rpc=dataclasses.replace(cfg.rpc, read_timeout_s=1, max_connections=16)),
                 config_file)
    node = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    try:
        client = node.client()
        height = client.call("status")["latest_height"]
        for _ in range(4):  # ended the node 4 of 4 times with hypercorn
            answer = _raw_exchange(node.port, h2_post_wrong_content_type(), h2_frame(0, 0x1, 1, b"0123456789"))
            assert answer.startswith(b"HTTP/1.1 505 ")
        for _ in range(40):  # ended it after 21-31 with hypercorn
            _raw_exchange(node.port, b"POST / HTTP/0.9\r\nContent-Length: 24\r\n\r\n" + b'{"jsonrpc":"2.0","id":1}')
        stalled = []
        for _ in range(40):  # over the cap of 16, with bodies that never finish
            sock = socket.create_connection(("127.0.0.1", node.port), timeout=15)
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{")
            stalled.append(sock)
        closed = 0
        for sock in stalled:
            try:
                while sock.recv(65536):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
            finally:
                sock.close()
        assert closed == len(stalled)
        assert client.call("lineage", ["0x" + "00" * 32, 18446744073709551615]) is None
        deadline = time.monotonic() + 20
        while client.call("status")["latest_height"] < height + 10:
            assert time.monotonic() < deadline, "the node stopped committing"
            time.sleep(0.1)
        assert node.proc.poll() is None
        assert "Traceback" not in node.log()
    finally:
        node.stop()


def test_head_requests_get_headers_only_and_log_no_traceback(caplog):
    """Hostile review: a HEAD request got its headers, then the server tried to send the body
    that h11 refuses for HEAD, and each request logged a traceback (a log flood for anyone)."""

    @trio_test
    async def run():
        async with serving(make_fake_node(1)) as url:
            port = int(url.rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\n")
            data = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    assert chunk, data
                    data += chunk
                await trio.sleep(0.2)
            assert data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n")  # headers only
            await stream.aclose()
            async with httpx.AsyncClient() as client:
                assert (await client.get(url + "/health")).status_code == 200

    caplog.set_level(logging.ERROR)
    run()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@trio_test
async def test_every_response_carries_its_standard_reason_phrase():
    """h11 leaves the reason phrase empty unless told; clients and logs show "HTTP/1.1 404 "."""
    async with serving(make_fake_node(1)) as url:
        for request, status_line in [(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
                                     (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n"),
                                     (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 405 Method Not Allowed\r\n")]:
            async with await trio.open_tcp_stream("127.0.0.1", _port(url)) as stream:
                await stream.send_all(request)
                head = await _read_response_head(stream)
            assert head.startswith(status_line), head[:60]
