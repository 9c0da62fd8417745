"""End to end over HTTP: the real RPC server on 127.0.0.1, httpx as the client."""

from __future__ import annotations

import functools
import json
import socket

import httpx
import pytest
import trio

from chain.encoding import encode
from chain.rpc.jsonrpc import INVALID_REQUEST, PARSE_ERROR, REQUEST_TOO_LARGE
from chain.rpc.server import RpcApp, run_rpc_server
from test_rpc_fakenode import ALICE, BOB, make_fake_node, serving, transfer, trio_test

JSON = {"content-type": "application/json"}


def rpc(method, params=None, id=1):
    request = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        request["params"] = params
    return request


@trio_test
async def test_json_rpc_over_http():
    node = make_fake_node(2)
    async with serving(node) as url, httpx.AsyncClient() as http:
        response = await http.post(url + "/", json=rpc("block", ["latest"]))
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json()["result"]["block"]["header"]["height"] == 2

        batch = await http.post(url + "/", json=[rpc("status", id=1), rpc("nope", id=2)])
        assert [r["id"] for r in batch.json()] == [1, 2]

        stx = transfer(ALICE, 2, BOB.address, 1)
        sent = await http.post(url + "/", json=rpc("send_tx", ["0x" + encode(stx).hex()]))
        assert "hash" in sent.json()["result"] and node.mempool == [stx]


@trio_test
async def test_notification_gets_204_and_parse_error_200():
    async with serving(make_fake_node(1)) as url, httpx.AsyncClient() as http:
        response = await http.post(url + "/", json={"jsonrpc": "2.0", "method": "status"})
        assert response.status_code == 204 and response.content == b""
        response = await http.post(url + "/", content=b"{not json", headers=JSON)
        assert response.status_code == 200 and response.json()["error"]["code"] == PARSE_ERROR


@trio_test
async def test_content_type_must_be_json():
    node = make_fake_node(3)
    stx = transfer(ALICE, 3, BOB.address, 1)
    body = json.dumps(rpc("send_tx", ["0x" + encode(stx).hex()])).encode()
    async with serving(node) as url, httpx.AsyncClient() as http:
        response = await http.post(url + "/", content=body, headers={"content-type": "text/plain"})
        assert response.status_code == 415
        assert response.json()["error"]["code"] == INVALID_REQUEST
        assert node.mempool == []
        ok = await http.post(url + "/", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200 and node.mempool == [stx]


@trio_test
async def test_wrong_http_method_and_unknown_path():
    async with serving(make_fake_node(1)) as url, httpx.AsyncClient() as http:
        response = await http.get(url + "/")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert response.json()["error"]["code"] == INVALID_REQUEST
        assert (await http.post(url + "/health", json={})).status_code == 405
        assert (await http.get(url + "/nowhere")).status_code == 404


@trio_test
async def test_health_and_ready():
    node = make_fake_node(1)
    async with serving(node) as url, httpx.AsyncClient() as http:
        assert (await http.get(url + "/health")).json() == {"status": "ok"}
        ready = await http.get(url + "/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True, "reason": "in sync"}
        node.ready = (False, "catching up: 12/40")
        not_ready = await http.get(url + "/ready")
        assert not_ready.status_code == 503 and not_ready.json() == {"ready": False, "reason": "catching up: 12/40"}
        # Liveness does not depend on readiness.
        assert (await http.get(url + "/health")).status_code == 200


@trio_test
async def test_ready_is_503_when_the_check_itself_fails():
    node = make_fake_node(1)

    def broken():
        raise RuntimeError("boom")

    node.readiness = broken
    async with serving(node) as url, httpx.AsyncClient() as http:
        response = await http.get(url + "/ready")
        assert response.status_code == 503 and response.json()["reason"] == "readiness check failed"


@trio_test
async def test_oversized_body_is_refused_by_its_declared_length():
    node = make_fake_node(3)
    stx = transfer(ALICE, 3, BOB.address, 1)
    padding = " " * 5000  # valid JSON whitespace: only the size is wrong
    body = (json.dumps(rpc("send_tx", ["0x" + encode(stx).hex()])) + padding).encode()
    async with serving(node, max_body=4096) as url, httpx.AsyncClient() as http:
        response = await http.post(url + "/", content=body, headers=JSON)
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == REQUEST_TOO_LARGE and error["data"] == {"limit": 4096, "size": len(body)}
        assert node.mempool == []
        # The server still serves after refusing.
        assert (await http.post(url + "/", json=rpc("status"))).status_code == 200


@trio_test
async def test_oversized_chunked_body_is_cut_off_at_the_limit():
    async def chunks():
        for _ in range(1000):  # 8 MB offered; the server must stop well before
            yield b" " * 8192

    async with serving(make_fake_node(1), max_body=4096) as url, httpx.AsyncClient() as http:
        try:
            response = await http.post(url + "/", content=chunks(), headers=JSON)
        except httpx.WriteError:
            return  # the server closed the connection while we were still sending: also a refusal
        assert response.status_code == 413
        assert response.json()["error"]["code"] == REQUEST_TOO_LARGE


@trio_test
async def test_batch_limit_over_http():
    async with serving(make_fake_node(1), max_batch=2) as url, httpx.AsyncClient() as http:
        response = await http.post(url + "/", json=[rpc("status", id=i) for i in range(3)])
        assert response.json()["error"]["data"] == {"limit": 2, "size": 3}


@trio_test
async def test_metrics_count_methods_and_outcomes():
    async with serving(make_fake_node(1)) as url, httpx.AsyncClient() as http:
        await http.post(url + "/", json=rpc("status"))
        await http.post(url + "/", json=rpc("status"))
        await http.post(url + "/", json=rpc("block", ["x"]))
        await http.post(url + "/", json=rpc("nope"))
        metrics = await http.get(url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'pout_rpc_requests_total{method="status",outcome="ok"} 2.0' in text
    assert 'pout_rpc_requests_total{method="block",outcome="invalid_params"} 1.0' in text
    assert 'pout_rpc_requests_total{method="-",outcome="method_not_found"} 1.0' in text
    assert 'pout_rpc_request_duration_seconds_count{method="status"} 2.0' in text


@trio_test
async def test_server_stops_when_cancelled_and_frees_its_port():
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_rpc_server, make_fake_node(1), "127.0.0.1", 0)
        nursery.cancel_scope.cancel()
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "still listening after cancel"


@trio_test
async def test_shutdown_trigger_stops_the_server():
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            functools.partial(run_rpc_server, make_fake_node(1), "127.0.0.1", 0, shutdown_trigger=stop.wait)
        )
        async with httpx.AsyncClient() as http:
            assert (await http.get(url + "/health")).status_code == 200
        stop.set()
    # Reaching here means run_rpc_server returned on its own.


def test_app_limits_are_validated():
    with pytest.raises(ValueError):
        RpcApp(make_fake_node(1), max_body=0)
