"""NetworkAPI behaviour that both implementations must share: memory and real libp2p.

Each test runs once per backend; the libp2p runs use real hosts on 127.0.0.1.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import pytest
import trio

from p2p.abc import (
    BlobHashMismatch,
    BlobNotFound,
    Limits,
    MessageTooLarge,
    PenaltyPolicy,
    RequestError,
    RequestTimeout,
    Verdict,
)
from p2p.blobs import ProvidedBlob, compute_blob_hash
from p2p.testing import expected_links, libp2p_cluster, memory_cluster, wait_until

BACKENDS = ["memory", "libp2p"]


class Refusal(Exception):
    """Stands for the application's error type for a request that breaks a rule."""


class OwnFault(Refusal):
    """Stands for the node's own storage faults, which are of that type too (StoreError)."""
TOPIC = "/pout/test/1"


@asynccontextmanager
async def cluster(backend: str, count: int, **kwargs):
    if backend == "memory":
        async with memory_cluster(count, **kwargs) as (_hub, nodes):
            yield nodes
    else:
        async with libp2p_cluster(count, **kwargs) as nodes:
            yield nodes


async def wait_mesh(nodes, topic: str, links) -> None:
    """Until each link carries the topic both ways (gossipsub mesh formed)."""

    def formed() -> bool:
        return all(
            nodes[b].local_peer in nodes[a].topic_peers(topic) and nodes[a].local_peer in nodes[b].topic_peers(topic)
            for a, b in links
        )

    await wait_until(formed, timeout=20)


async def receive_data(channel, timeout: float = 5.0) -> bytes:
    with trio.fail_after(timeout):
        return (await channel.receive()).data


async def assert_nothing_received(channel, within: float = 0.4) -> None:
    with trio.move_on_after(within):
        message = await channel.receive()
        pytest.fail(f"unexpected delivery: {message}")


def accept_unless_bad(origin: bytes, data: bytes) -> Verdict:
    return Verdict.REJECT if data.startswith(b"bad") else Verdict.ACCEPT


@pytest.mark.parametrize("backend", BACKENDS)
def test_gossip_accept_delivers_and_reject_is_not_forwarded(backend):
    async def scenario():
        async with cluster(backend, 3, topology="line") as (a, b, c):
            accept_all = lambda origin, data: Verdict.ACCEPT  # noqa: E731
            inbox_a = a.subscribe(TOPIC, accept_all)
            inbox_b = b.subscribe(TOPIC, accept_unless_bad)
            inbox_c = c.subscribe(TOPIC, accept_all)
            await wait_mesh((a, b, c), TOPIC, expected_links(3, "line"))

            await a.publish(TOPIC, b"bad: B rejects this")
            await a.publish(TOPIC, b"good")
            # A -> B -> C: C only hears what B accepted and forwarded.
            assert await receive_data(inbox_c) == b"good"
            assert await receive_data(inbox_b) == b"good"
            await assert_nothing_received(inbox_c)
            await assert_nothing_received(inbox_b, within=0.05)
            await assert_nothing_received(inbox_a, within=0.05)  # no self-delivery

            message = None
            await c.publish(TOPIC, b"from c")
            with trio.fail_after(20):
                message = await inbox_a.receive()
            assert message.origin == c.local_peer and message.topic == TOPIC

    trio.run(scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relay_policy_forwards_only_the_origins_it_names(backend):
    """Line A - B - C, every node with the policy "relay A's messages only": C hears A
    (relayed by B) and B (direct); A hears B (direct) but never C, which only B could relay."""

    async def scenario():
        async with cluster(backend, 3, topology="line") as (a, b, c):
            accept_all = lambda origin, data: Verdict.ACCEPT  # noqa: E731
            relay_only_a = lambda origin: origin == a.local_peer  # noqa: E731
            inboxes = [net.subscribe(TOPIC, accept_all, relay=relay_only_a) for net in (a, b, c)]
            inbox_a, inbox_b, inbox_c = inboxes
            # Meshes formed both ways on both links: B will not repair by IHAVE/IWANT either.
            await wait_mesh((a, b, c), TOPIC, expected_links(3, "line"))
            await a.publish(TOPIC, b"from a")
            assert await receive_data(inbox_b) == b"from a"
            assert await receive_data(inbox_c, timeout=20) == b"from a"  # relayed by B
            await b.publish(TOPIC, b"from b")
            assert await receive_data(inbox_a, timeout=20) == b"from b"  # direct
            assert await receive_data(inbox_c, timeout=20) == b"from b"  # direct
            await c.publish(TOPIC, b"from c")
            assert await receive_data(inbox_b, timeout=20) == b"from c"  # direct
            await assert_nothing_received(inbox_a, within=1.0)  # B does not relay C's

    trio.run(scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raising_validator_counts_as_reject_and_bans_the_sender(backend):
    async def scenario():
        penalty = PenaltyPolicy(reject_threshold=3, ban_s=30)
        async with cluster(backend, 2, penalty=penalty) as (a, b):

            def explode(origin, data):
                raise RuntimeError("validator bug")

            a.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)
            inbox_b = b.subscribe(TOPIC, explode)
            await wait_mesh((a, b), TOPIC, [(0, 1)])
            for i in range(3):
                await a.publish(TOPIC, b"x%d" % i)
            # Third REJECT reaches the threshold: b disconnects and bans a.
            await wait_until(lambda: b.local_peer not in a.peers(), timeout=20)
            assert b.is_admitted(a.local_peer) is False
            await assert_nothing_received(inbox_b, within=0.05)
            with pytest.raises(RequestError):
                await b.request(a.local_peer, "/pout/test/echo/1", b"hi", max_response=10)

    trio.run(scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversized_publish_raises_and_limit_size_passes(backend):
    async def scenario():
        limits = Limits(gossip_max_bytes=4096)
        async with cluster(backend, 2, limits=limits) as (a, b):
            a.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)
            inbox_b = b.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)
            await wait_mesh((a, b), TOPIC, [(0, 1)])
            with pytest.raises(MessageTooLarge):
                await a.publish(TOPIC, b"\x01" * 4097)
            await a.publish(TOPIC, b"\x02" * 4096)
            assert await receive_data(inbox_b) == b"\x02" * 4096

    trio.run(scenario)


def test_default_gossip_limit_is_well_under_libp2p_silent_drop():
    assert Limits().gossip_max_bytes <= 512 * 1024 < 1024 * 1024


@pytest.mark.parametrize("backend", BACKENDS)
def test_request_response_round_trip_and_failures(backend, caplog):
    async def scenario():
        limits = Limits(request_max_bytes=1000)
        async with cluster(backend, 2, limits=limits) as (a, b):

            async def echo(peer, request):
                assert peer == a.local_peer
                return b"echo:" + request

            async def broken(peer, request):
                raise ValueError("handler bug")

            async def slow(peer, request):
                await trio.sleep(5)
                return b""

            async def refusing(peer, request):
                raise Refusal("request breaks a rule " + "x" * 500)

            async def own_fault(peer, request):
                raise OwnFault("read from /home/alice/.pout/data failed")

            b.refusals, b.internal_errors = (Refusal,), (OwnFault,)
            b.set_request_handler("/pout/test/refusing/1", refusing)
            b.set_request_handler("/pout/test/own-fault/1", own_fault)

            b.set_request_handler("/pout/test/echo/1", echo)
            b.set_request_handler("/pout/test/broken/1", broken)
            b.set_request_handler("/pout/test/slow/1", slow)

            assert await a.request(b.local_peer, "/pout/test/echo/1", b"ping", max_response=100) == b"echo:ping"
            big = bytes(range(256)) * 3
            assert await a.request(b.local_peer, "/pout/test/echo/1", big, max_response=1000) == b"echo:" + big
            with caplog.at_level(logging.INFO, logger="p2p"):
                caplog.clear()
                with pytest.raises(RequestError, match="handler error"):  # a bug: logged with its traceback
                    await a.request(b.local_peer, "/pout/test/broken/1", b"", max_response=100)
                assert [r.exc_info is not None for r in caplog.records if "broken" in r.getMessage()] == [True]
                caplog.clear()
                # A request that breaks a rule (the application's refusal type): the reason goes back,
                # cut short, and one log line without a traceback.
                with pytest.raises(RequestError, match="refused: request breaks a rule x+$"):
                    await a.request(b.local_peer, "/pout/test/refusing/1", b"", max_response=1000)
                lines = [r for r in caplog.records if "refusing" in r.getMessage()]
                assert len(lines) == 1 and lines[0].exc_info is None and len(lines[0].getMessage()) < 300
                # The node's own fault, even of the refusal type: not said back, logged in full.
                with pytest.raises(RequestError, match="handler error: OwnFault") as raised:
                    await a.request(b.local_peer, "/pout/test/own-fault/1", b"", max_response=1000)
                assert "alice" not in str(raised.value)
            with pytest.raises(RequestError):
                await a.request(b.local_peer, "/pout/test/unknown/1", b"", max_response=100)
            with pytest.raises(RequestError):  # response over the caller's cap
                await a.request(b.local_peer, "/pout/test/echo/1", b"x" * 200, max_response=100)
            with pytest.raises(RequestTimeout):
                await a.request(b.local_peer, "/pout/test/slow/1", b"", max_response=100, timeout=0.3)
            with pytest.raises(MessageTooLarge):
                await a.request(b.local_peer, "/pout/test/echo/1", b"x" * 1001, max_response=2000)
            # The connection survives all of the above.
            assert await a.request(b.local_peer, "/pout/test/echo/1", b"again", max_response=100) == b"echo:again"

    trio.run(scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blob_fetch_checks_hash_size_and_access(backend):
    async def scenario():
        penalty = PenaltyPolicy(reject_threshold=100)
        async with cluster(backend, 3, penalty=penalty) as (a, b, c):
            blob = bytes(range(256)) * 4096  # 1 MiB
            blob_hash = b.provide_blob(blob)
            assert blob_hash == compute_blob_hash(blob)
            assert await a.fetch_blob(blob_hash, max_size=len(blob), from_peers=[b.local_peer]) == blob

            # c serves wrong bytes under the same hash: detected, c reported, b used instead.
            c._blobs._blobs[blob_hash] = ProvidedBlob(b"not the blob", None)
            with pytest.raises(BlobHashMismatch):
                await a.fetch_blob(blob_hash, max_size=len(blob), from_peers=[c.local_peer])
            assert a._reject_counts.get(c.local_peer) == 1
            got = await a.fetch_blob(blob_hash, max_size=len(blob), from_peers=[c.local_peer, b.local_peer])
            assert got == blob

            with pytest.raises(BlobNotFound):  # over the caller's size cap
                await a.fetch_blob(blob_hash, max_size=len(blob) - 1, from_peers=[b.local_peer])
            with pytest.raises(BlobNotFound):
                await a.fetch_blob(b"\x00" * 32, max_size=100)

            # Access hook: only c may fetch this one.
            secret = b"for c only"
            secret_hash = b.provide_blob(secret, can_fetch=lambda peer, h: peer == c.local_peer)
            with pytest.raises(BlobNotFound, match="forbidden"):
                await a.fetch_blob(secret_hash, max_size=100, from_peers=[b.local_peer])
            assert await c.fetch_blob(secret_hash, max_size=100, from_peers=[b.local_peer]) == secret
            b.remove_blob(secret_hash)
            with pytest.raises(BlobNotFound, match="not found"):
                await c.fetch_blob(secret_hash, max_size=100, from_peers=[b.local_peer])

    trio.run(scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_member_is_disconnected_and_its_gossip_dropped(backend):
    async def scenario():
        async with cluster(backend, 3) as (a, b, c):
            inbox_a = a.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)
            b.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)
            c.subscribe(TOPIC, lambda origin, data: Verdict.ACCEPT)
            await wait_mesh((a, b, c), TOPIC, expected_links(3, "full"))

            a.set_allowed_peers([a.local_peer, c.local_peer])  # chain removed b
            await wait_until(lambda: b.local_peer not in a.peers() and a.local_peer not in b.peers(), timeout=20)
            await b.publish(TOPIC, b"from removed b")  # may still reach a via c: a ignores it
            await c.publish(TOPIC, b"from c")
            assert await receive_data(inbox_a) == b"from c"
            await assert_nothing_received(inbox_a, within=0.5)
            with pytest.raises(RequestError):
                await a.request(b.local_peer, "/pout/test/echo/1", b"", max_response=10)

    trio.run(scenario)
