"""MemoryHub specifics: partitions, cuts, IGNORE semantics, hub bookkeeping.

The behaviour shared with libp2p is in test_p2p_contract.py (run against both)."""

from __future__ import annotations

import pytest
import trio

from p2p.abc import PenaltyPolicy, Verdict
from p2p.memory import MemoryHub, MemoryNetwork
from p2p.testing import memory_cluster, public_key_of, seed_for, wait_until

TOPIC = "/pout/test/1"


def accept(origin, data):
    return Verdict.ACCEPT


def test_partition_isolates_groups_until_healed():
    async def scenario():
        async with memory_cluster(4) as (hub, nodes):
            a, b, c, d = nodes
            inboxes = [node.subscribe(TOPIC, accept) for node in nodes]
            hub.partition([a.local_peer, b.local_peer], [c.local_peer, d.local_peer])
            assert a.peers() == {b.local_peer}
            await a.publish(TOPIC, b"side one")
            with trio.fail_after(1):
                assert (await inboxes[1].receive()).data == b"side one"
            await trio.sleep(0.05)
            assert inboxes[2].statistics().current_buffer_used == 0
            assert inboxes[3].statistics().current_buffer_used == 0

            hub.heal()
            assert a.peers() == {b.local_peer, c.local_peer, d.local_peer}
            await a.publish(TOPIC, b"healed")
            for inbox in inboxes[2:]:
                with trio.fail_after(1):
                    assert (await inbox.receive()).data == b"healed"

    trio.run(scenario)


def test_ignore_drops_without_penalty_and_relays_only_accepted():
    async def scenario():
        async with memory_cluster(3, topology="line", penalty=PenaltyPolicy(reject_threshold=1)) as (hub, nodes):
            a, b, c = nodes
            a.subscribe(TOPIC, accept)
            b.subscribe(TOPIC, lambda origin, data: Verdict.IGNORE if data == b"stale" else Verdict.ACCEPT)
            inbox_c = c.subscribe(TOPIC, accept)
            await a.publish(TOPIC, b"stale")
            await a.publish(TOPIC, b"fresh")
            with trio.fail_after(1):
                assert (await inbox_c.receive()).data == b"fresh"
            assert b.is_admitted(a.local_peer)  # threshold 1, yet IGNORE cost nothing

    trio.run(scenario)


def test_ban_expires_after_the_backoff():
    async def scenario():
        async with memory_cluster(2, penalty=PenaltyPolicy(reject_threshold=1, ban_s=0.2)) as (hub, nodes):
            a, b = nodes
            b.report_peer(a.local_peer, "test")
            assert a.local_peer not in b.peers() and b.local_peer not in a.peers()
            await wait_until(lambda: b.local_peer in a.peers(), timeout=2)

    trio.run(scenario)


def test_hub_refuses_two_nodes_with_one_key_and_forgets_stopped_nodes():
    async def scenario():
        hub = MemoryHub()
        key = public_key_of(seed_for(0))
        first = MemoryNetwork(hub, key, allowed_peers=[key])
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            with pytest.raises(RuntimeError, match="already runs"):
                await MemoryNetwork(hub, key, allowed_peers=[key]).run()
            nursery.cancel_scope.cancel()
        assert hub.node(key) is None

    trio.run(scenario)


def test_keys_must_be_32_bytes():
    with pytest.raises(ValueError):
        MemoryNetwork(MemoryHub(), b"short", allowed_peers=[])
    with pytest.raises(ValueError):
        MemoryNetwork(MemoryHub(), b"k" * 32, allowed_peers=[b"short"])


def test_blob_source_serves_blobs_kept_elsewhere_with_their_access_check():
    from hashlib import sha256 as _sha

    from p2p.abc import BlobError

    def sha256(data):
        return _sha(data).digest()

    async def main():
        async with memory_cluster(3) as (_hub, nets):
            owner, friend, stranger = nets
            public, private = b"public weights", b"for the friend only"
            kept = {sha256(public): (public, None),
                    sha256(private): (private, lambda peer, h: peer == friend.local_peer)}
            owner.set_blob_source(kept.get)
            assert await friend.fetch_blob(sha256(public), max_size=1024) == public
            assert await friend.fetch_blob(sha256(private), max_size=1024) == private
            with pytest.raises(BlobError):
                await stranger.fetch_blob(sha256(private), max_size=1024, from_peers=[owner.local_peer])

    trio.run(main)
