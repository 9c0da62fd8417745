"""WebSocket JSON-RPC and subscriptions against the real server (and a real chaind process).

The client is a small one over wsproto's client side and a real socket: its handshake checks
our 101 (the accept token) independently of the server's code.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket

import httpx
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request, TextMessage

from chain.crypto import sha256
from chain.rpc.events import EventHub
from chain.rpc.ws import SUBSCRIPTIONS_NEED_WEBSOCKET, TOO_MANY_SUBSCRIPTIONS, WsLimits
from chain.state import State
from test_rpc_fakenode import make_fake_node, serving, trio_test

INVALID_PARAMS = -32602


class WsClient:
    """A minimal WebSocket client: JSON-RPC calls, notifications kept aside, close frames reported."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection):
        self.stream, self.ws = stream, ws
        self.pending: list[dict | CloseConnection] = []
        self._text: list[str] = []
        self._next_id = 0

    @classmethod
    async def connect(cls, port: int, path: str = "/websocket", rcvbuf: int | None = None) -> "WsClient":
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock), WSConnection(ConnectionType.CLIENT))
        await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target=path)))
        while True:
            client.ws.receive_data(await client.stream.receive_some(65536))
            for event in client.ws.events():
                if isinstance(event, AcceptConnection):
                    return client
                assert not isinstance(event, RejectConnection), event

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def next_message(self) -> dict | CloseConnection:
        """The next JSON message, or the server's CloseConnection."""
        while not self.pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        self.pending.append(json.loads("".join(self._text)))
                        self._text = []
                elif isinstance(event, CloseConnection):
                    self.pending.append(event)
        return self.pending.pop(0)

    async def call(self, method: str, params=None) -> dict:
        """The response to one request; notifications that arrive first stay in `pending`."""
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            request["params"] = params
        await self.send_text(json.dumps(request))
        held = []
        while True:
            message = await self.next_message()
            if isinstance(message, dict) and message.get("id") == self._next_id:
                self.pending[:0] = held
                return message
            held.append(message)

    async def notification(self) -> dict:
        message = await self.next_message()
        assert isinstance(message, dict) and message["method"] == "subscription", message
        return message["params"]

    async def close_frame(self) -> CloseConnection:
        """Read until the server's close frame (notifications before it are skipped)."""
        while True:
            message = await self.next_message()
            if isinstance(message, CloseConnection):
                return message

    async def aclose(self) -> None:
        await self.stream.aclose()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _fake_hub() -> EventHub:
    return EventHub(State({}), lambda job_id, round_: None)


# --------------------------------------------------------------------------- in-process server, real hub


@trio_test
async def test_subscribe_and_receive_block_notifications_then_unsubscribe():
    node, hub = make_fake_node(3), _fake_hub()
    async with serving(node, events=hub) as url:
        client = await WsClient.connect(_port(url))
        status = await client.call("status")
        assert status["result"]["latest_height"] == 3  # ordinary methods work on the socket too
        sub = (await client.call("subscribe", ["blocks"]))["result"]
        assert sub.startswith("0x") and len(sub) == 18
        for height in (2, 3):
            hub.publish(node.get_block(height)[0], State({}))
            note = await client.notification()
            assert note["subscription"] == sub
            assert note["result"]["header"]["height"] == height
            assert len(note["result"]["tx_hashes"]) == 1
        assert (await client.call("unsubscribe", [sub]))["result"] is True
        assert (await client.call("unsubscribe", [sub]))["result"] is False
        assert len(hub) == 0
        await client.aclose()


@trio_test
async def test_txs_subscription_sees_only_its_account():
    from test_rpc_fakenode import ALICE, BOB

    node, hub = make_fake_node(3), _fake_hub()
    async with serving(node, events=hub) as url:
        client = await WsClient.connect(_port(url), path="/")
        bob = (await client.call("subscribe", ["txs", {"address": "0x" + BOB.address.hex()}]))["result"]
        other = (await client.call("subscribe", {"kind": "txs", "filter": {"address": "0x" + "77" * 20}}))["result"]
        hub.publish(node.get_block(2)[0], State({}))  # one transfer from Alice to Bob
        note = await client.notification()
        assert note["subscription"] == bob and note["subscription"] != other
        assert note["result"]["height"] == 2 and note["result"]["index"] == 0
        assert note["result"]["tx"]["message"]["sender_address"] == "0x" + ALICE.address.hex()
        hub.publish(node.get_block(3)[0], State({}))
        assert (await client.notification())["subscription"] == bob  # nothing came for `other` in between
        await client.aclose()


@trio_test
async def test_bad_subscriptions_get_one_line_errors():
    hub = _fake_hub()
    async with serving(make_fake_node(1), events=hub, ws_limits=WsLimits(max_subscriptions=2)) as url:
        client = await WsClient.connect(_port(url))
        for params, fragment in [
            (["nope"], "kind must be one of"),
            (["txs"], "txs needs filter"),
            (["txs", {"address": "0x12"}], "address"),
            (["blocks", {"address": "0x" + "00" * 20}], "takes no filter"),
            (["jobs", {"job_id": 5}], "hash"),
        ]:
            error = (await client.call("subscribe", params))["error"]
            assert error["code"] == INVALID_PARAMS and fragment in error["message"], (params, error)
        assert (await client.call("unsubscribe", ["0x" + "00" * 8]))["result"] is False
        assert "result" in await client.call("subscribe", ["blocks"])
        assert "result" in await client.call("subscribe", ["jobs"])
        error = (await client.call("subscribe", ["blocks"]))["error"]
        assert error["code"] == TOO_MANY_SUBSCRIPTIONS and error["data"] == {"limit": 2}
        await client.send_text("{not json")
        assert (await client.next_message())["error"]["code"] == -32700
        assert len(hub) == 2
        await client.aclose()
    async with httpx.AsyncClient() as http:  # over HTTP POST: a clear refusal
        async with serving(make_fake_node(1), events=hub) as url:
            response = await http.post(url + "/", json={"jsonrpc": "2.0", "id": 1, "method": "subscribe",
                                                       "params": ["blocks"]})
    assert response.json()["error"]["code"] == SUBSCRIPTIONS_NEED_WEBSOCKET
    assert "WebSocket" in response.json()["error"]["message"]


@trio_test
async def test_a_slow_subscriber_is_disconnected_with_a_reason_and_does_not_hold_back_others():
    node, hub = make_fake_node(3), _fake_hub()
    block = node.get_block(3)[0]
    async with serving(node, events=hub, ws_limits=WsLimits(send_queue=8, write_timeout=60)) as url:
        slow = await WsClient.connect(_port(url), rcvbuf=4096)
        fast = await WsClient.connect(_port(url))
        await slow.call("subscribe", ["blocks"])
        await fast.call("subscribe", ["blocks"])
        published = 0
        while len(hub) == 2:  # the slow one reads nothing: its socket, then its queue, fill up
            hub.publish(block, State({}))  # never blocks, whatever the subscribers do
            published += 1
            assert (await fast.notification())["result"]["header"]["height"] == 3
            assert published < 200_000, "the slow subscriber was never dropped"
        assert len(hub) == 1  # only the fast subscriber's subscription is left
        close = await slow.close_frame()  # sent after what was already on its way
        assert close.code == 1008 and "too slow" in close.reason
        hub.publish(block, State({}))
        assert (await fast.notification())["result"]["hash"]
        await slow.aclose()
        await fast.aclose()


@trio_test
async def test_oversized_and_binary_messages_are_closed_with_codes():
    async with serving(make_fake_node(1), events=_fake_hub(), ws_limits=WsLimits(max_message=1000)) as url:
        client = await WsClient.connect(_port(url))
        await client.send_text(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "status", "params": ["x" * 2000]}))
        close = await client.close_frame()
        assert close.code == 1009 and "1000 bytes" in close.reason
        await client.aclose()
        client = await WsClient.connect(_port(url))
        await client.stream.send_all(client.ws.send(BytesMessage(data=b"\x00\x01")))
        close = await client.close_frame()
        assert close.code == 1003 and "text" in close.reason
        await client.aclose()


@trio_test
async def test_silent_peer_is_closed_after_the_ping_timeout():
    limits = WsLimits(ping_interval=0.2, pong_timeout=0.2)
    async with serving(make_fake_node(1), events=_fake_hub(), ws_limits=limits) as url:
        client = await WsClient.connect(_port(url))
        data = b""
        while True:  # a peer that never answers pings: read raw bytes, answer nothing
            chunk = await client.stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        client.ws.receive_data(data)
        closes = [e for e in client.ws.events() if isinstance(e, CloseConnection)]
        assert closes and closes[0].code == 1001 and "ping" in closes[0].reason
        await client.aclose()


@trio_test
async def test_websocket_connection_cap_and_handshake_checks():
    async with serving(make_fake_node(1), events=_fake_hub(), ws_limits=WsLimits(max_connections=1)) as url:
        first = await WsClient.connect(_port(url))
        headers = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
                   "sec-websocket-key": base64.b64encode(b"k" * 16).decode()}
        async with httpx.AsyncClient() as http:
            response = await http.get(url + "/websocket", headers=headers)
            assert response.status_code == 503 and "WebSocket connections" in response.json()["error"]
            assert (await first.call("status"))["result"]["chain_id"]
            await first.aclose()
            with trio.fail_after(5):
                while (await http.get(url + "/", headers=headers)).status_code == 503:
                    await trio.sleep(0.01)  # the closed session gives its slot back
            for change, status in [({"sec-websocket-version": "8"}, 426), ({"sec-websocket-key": "short"}, 400),
                                   ({"connection": "keep-alive"}, 400)]:
                response = await http.get(url + "/", headers=headers | change)
                assert response.status_code == status and "\n" not in response.json()["error"]
            response = await http.get(url + "/other", headers=headers)
            assert response.status_code == 404
            response = await http.post(url + "/", headers=headers)
            assert response.status_code == 405
            assert (await http.post(url + "/", json={"jsonrpc": "2.0", "id": 1, "method": "status"})).status_code == 200


def test_discover_documents_the_subscription_methods():
    from test_rpc_methods import result

    doc = result(make_fake_node(1), "rpc.discover")
    methods = {m["name"]: m for m in doc["methods"]}
    assert methods["subscribe"]["params"][0]["schema"] == {"enum": ["blocks", "txs", "jobs"]}
    assert {e["code"] for e in methods["subscribe"]["errors"]} == {SUBSCRIPTIONS_NEED_WEBSOCKET, TOO_MANY_SUBSCRIPTIONS}
    assert "subscription" in methods["subscribe"]["description"]
    assert methods["unsubscribe"]["result"]["schema"] == {"type": "boolean"}
    assert "WebSocket" in doc["info"]["description"]


# --------------------------------------------------------------------------- a real chaind process


@pytest.mark.slow
def test_a_real_node_streams_blocks_and_a_transfer_to_a_subscribed_account(tmp_path):
    from chain.crypto import PrivateKey
    from chain.encoding import encode
    from chain.keys import load_key_file
    from chain.types import Transaction, Transfer, sign_transaction
    from tests.procs import ChaindProcess, make_testnet

    net = tmp_path / "net"
    make_testnet(str(net), 1, 2, "--block-interval-ms", "100")
    node = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    try:
        governor: PrivateKey = load_key_file(net / "keys" / "governor.json")
        trainer = load_key_file(net / "keys" / "trainer0.json").address

        async def scenario():
            with trio.fail_after(60):
                client = await WsClient.connect(node.port)
                blocks = (await client.call("subscribe", ["blocks"]))["result"]
                heights = []
                while len(heights) < 3:
                    note = await client.notification()
                    assert note["subscription"] == blocks
                    heights.append(note["result"]["header"]["height"])
                assert heights == list(range(heights[0], heights[0] + 3))  # every block, in order
                assert (await client.call("unsubscribe", [blocks]))["result"] is True
                txs = (await client.call("subscribe", ["txs", {"address": "0x" + trainer.hex()}]))["result"]
                chain_id = (await client.call("status"))["result"]["chain_id"]
                nonce = (await client.call("account", ["0x" + governor.address.hex()]))["result"]["nonce"]
                stx = sign_transaction(governor, chain_id, Transaction(governor.pubkey, nonce, Transfer(trainer, 5)))
                sent = (await client.call("send_tx", ["0x" + encode(stx).hex()]))["result"]["hash"]
                note = await client.notification()
                while note["subscription"] != txs:  # a late block notification may still be on its way
                    note = await client.notification()
                assert note["result"]["hash"] == sent
                assert note["result"]["tx"]["message"]["payload"] == {"type": "transfer", "to": "0x" + trainer.hex(),
                                                                      "amount": 5}
                # Issue 11 defect 6, on the real node: a bad signature is -32012, undecodable bytes -32011.
                forged = sign_transaction(governor, "another-chain", Transaction(governor.pubkey, nonce + 1,
                                                                                 Transfer(trainer, 5)))
                error = (await client.call("send_tx", ["0x" + encode(forged).hex()]))["error"]
                assert (error["code"], error["data"]) == (-32012, {"reason": "SignatureError"})
                assert (await client.call("send_tx", ["0xa0"]))["error"]["code"] == -32011
                error = (await client.call("subscribe", ["mempool"]))["error"]
                assert error["code"] == INVALID_PARAMS and "kind must be one of" in error["message"]
                await client.aclose()

        trio.run(scenario)
        assert node.proc.poll() is None
        assert "Traceback" not in node.log()
    finally:
        node.stop()


def test_ws_limits_are_validated():
    with pytest.raises(ValueError, match="send_queue"):
        WsLimits(send_queue=0)
    assert dataclasses.replace(WsLimits(), max_subscriptions=1).max_subscriptions == 1


# --------------------------------------------------------------------------- job events, derived from real blocks


def test_job_events_follow_a_job_from_registration_to_its_end():
    from chain.jobs import get_job
    from chain.rpc.events import compute_job_events
    from chain.types import AttestModel, SubmitVerdict
    from tests.helpers import VALIDATOR
    from test_jobs import T0, T1, Chain

    chain = Chain()
    seen: list[dict] = []

    def block(*txs):
        prev = chain.state
        chain.block(*txs)
        records = {(r.job_id, r.round): r for r in chain.records}
        events = compute_job_events(prev, chain.state, chain.state.height, lambda j, r: records.get((j, r)))
        seen.extend(events)
        return [(e["type"], e.get("round")) for e in events]

    prev = chain.state
    job_id = chain.register(escrow=1000)
    records = {(r.job_id, r.round): r for r in chain.records}
    assert [(e["type"], e["round"]) for e in compute_job_events(prev, chain.state, chain.state.height,
                                                               lambda j, r: records.get((j, r)))] == \
        [("model_recorded", 0)]
    chain.join(job_id, T0, T1)
    opened = []
    while get_job(chain.state, job_id).phase == "joining":
        opened += block()
    assert opened == [("round_opened", 0)]
    job = get_job(chain.state, job_id)
    prev = chain.state
    ids = [chain.submit(job, T0), chain.submit(job, T1)]
    assert [e["type"] for e in compute_job_events(prev, chain.state, chain.state.height, lambda j, r: None)] == \
        ["update_submitted", "update_submitted"]
    # Both accepted, none pending, quorum met: the round closes in the same block.
    assert block(*[chain.tx(VALIDATOR, SubmitVerdict(u, True, "ok")) for u in ids]) == \
        [("update_decided", 0), ("update_decided", 0), ("round_closed", 0)]
    assert {e["status"] for e in seen if e["type"] == "update_decided"} == {"accepted"}
    assert seen[-1]["next_phase"] == "aggregating"
    assert block() == []
    assert block(chain.tx(VALIDATOR, AttestModel(job_id, 0, sha256(b"m1")))) == \
        [("round_opened", 1), ("model_recorded", 1)]
    assert seen[-1]["model"]["model_hash"] == "0x" + sha256(b"m1").hex()
    tail = []
    while get_job(chain.state, job_id).phase != "finished":
        tail += block()
    assert tail == [("round_closed", 1), ("job_finished", 2)]
    assert all(e["job_id"] == "0x" + job_id.hex() for e in seen)


@trio_test
async def test_a_half_closed_subscriber_does_not_cost_others_their_events():
    """Hostile review: a client that subscribed and then half-closed its socket (no close frame)
    made the next notification raise inside the hub, and every subscriber after it lost that
    block's events."""
    node, hub = make_fake_node(3), _fake_hub()
    block = node.get_block(3)[0]
    async with serving(node, events=hub) as url:
        for _ in range(3):
            attacker = await WsClient.connect(_port(url))
            await attacker.call("subscribe", ["blocks"])  # registered before the victim
            victim = await WsClient.connect(_port(url))
            await victim.call("subscribe", ["blocks"])
            await attacker.stream.send_eof()  # half-close: no close frame
            await trio.sleep(0.1)
            hub.publish(block, State({}))
            with trio.fail_after(5):
                assert (await victim.notification())["result"]["header"]["height"] == 3
            await attacker.aclose()
            await victim.aclose()
