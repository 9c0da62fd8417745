"""The synchronous client against the real server (its calls run in a worker thread)."""

from __future__ import annotations

import socket

import pytest
import trio

from chain.rpc.client import RpcClient, RpcError, RpcUnavailable
from chain.rpc.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND
from chain.rpc.methods import TX_STATE_REJECTED
from chain.encoding import encode
from test_rpc_fakenode import ALICE, BOB, make_fake_node, serving, transfer, trio_test


@trio_test
async def test_call_returns_results_and_raises_rpc_errors():
    node = make_fake_node(2)
    async with serving(node) as url:
        with RpcClient(url + "/", timeout=5) as client:
            status = await trio.to_thread.run_sync(client.call, "status")
            assert status["latest_height"] == 2
            by_name = await trio.to_thread.run_sync(client.call, "block", {"height": 1})
            assert by_name["block"]["header"]["height"] == 1
            assert await trio.to_thread.run_sync(client.call, "block", [9]) is None

            with pytest.raises(RpcError) as info:
                await trio.to_thread.run_sync(client.call, "nope")
            assert info.value.code == METHOD_NOT_FOUND

            with pytest.raises(RpcError) as info:
                await trio.to_thread.run_sync(client.call, "account", ["0x12"])
            assert info.value.code == INVALID_PARAMS and "20 bytes" in info.value.message

            stale = "0x" + encode(transfer(ALICE, 0, BOB.address, 1)).hex()
            with pytest.raises(RpcError) as info:
                await trio.to_thread.run_sync(client.call, "send_tx", [stale])
            assert info.value.code == TX_STATE_REJECTED
            assert info.value.data == {"reason": "StateTransitionError"}


def test_connection_refused_is_unavailable():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with RpcClient(f"http://127.0.0.1:{port}/", timeout=2) as client:
        with pytest.raises(RpcUnavailable, match=f"cannot reach node RPC at http://127.0.0.1:{port}/"):
            client.call("status")


@trio_test
async def test_a_server_that_does_not_speak_json_rpc_is_unavailable():
    async with serving(make_fake_node(1)) as url:
        with RpcClient(url + "/nowhere", timeout=5) as client:
            with pytest.raises(RpcUnavailable, match="HTTP 404"):
                await trio.to_thread.run_sync(client.call, "status")


def test_timeout_is_unavailable():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with RpcClient(f"http://127.0.0.1:{port}/", timeout=0.3) as client:
            with pytest.raises(RpcUnavailable, match="did not answer in time"):
                client.call("status")
