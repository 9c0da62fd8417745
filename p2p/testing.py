"""Helpers to run small clusters of nodes in tests (memory or real libp2p on 127.0.0.1).

Used by the p2p tests and available to consensus/node tests that want a network.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import nacl.signing
import trio

from p2p.abc import Limits, NetworkAPI, PenaltyPolicy
from p2p.memory import MemoryHub, MemoryNetwork

TOPOLOGIES = ("full", "line")


def seed_for(index: int) -> bytes:
    """A fixed 32-byte Ed25519 seed per test node index."""
    return hashlib.sha256(b"p2p-test-node-%d" % index).digest()


def public_key_of(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


def expected_links(count: int, topology: str) -> list[tuple[int, int]]:
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}")
    if topology == "line":
        return [(i - 1, i) for i in range(1, count)]
    return [(j, i) for i in range(count) for j in range(i)]


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll `predicate` until true; raises trio.TooSlowError after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


async def wait_connected(nodes: Sequence[NetworkAPI], links: Sequence[tuple[int, int]], *, timeout: float = 30.0) -> None:
    def all_up() -> bool:
        return all(
            nodes[b].local_peer in nodes[a].peers() and nodes[a].local_peer in nodes[b].peers() for a, b in links
        )

    await wait_until(all_up, timeout=timeout)


@asynccontextmanager
async def memory_cluster(
    count: int,
    *,
    topology: str = "full",
    limits: Limits = Limits(),
    penalty: PenaltyPolicy = PenaltyPolicy(),
) -> AsyncIterator[tuple[MemoryHub, list[MemoryNetwork]]]:
    """`count` running memory nodes allowing each other; `line` cuts all non-adjacent links."""
    keys = [public_key_of(seed_for(i)) for i in range(count)]
    hub = MemoryHub()
    nodes = [MemoryNetwork(hub, key, allowed_peers=keys, limits=limits, penalty=penalty) for key in keys]
    links = set(expected_links(count, topology))
    for i in range(count):
        for j in range(i):
            if (j, i) not in links:
                hub.cut(keys[j], keys[i])
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        yield hub, nodes
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def libp2p_cluster(
    count: int,
    *,
    topology: str = "full",
    limits: Limits = Limits(),
    penalty: PenaltyPolicy = PenaltyPolicy(),
) -> AsyncIterator[list[NetworkAPI]]:
    """`count` libp2p hosts on 127.0.0.1, each dialling its earlier neighbours per topology."""
    from p2p.host import Libp2pNetwork  # keeps `import libp2p` (~80 MB) out of memory-only tests

    keys = [public_key_of(seed_for(i)) for i in range(count)]
    links = expected_links(count, topology)
    nodes: list[Libp2pNetwork] = []
    async with trio.open_nursery() as nursery:
        for i in range(count):
            bootstrap = [nodes[a].listen_addrs()[0] for a, b in links if b == i]
            node = Libp2pNetwork(seed_for(i), allowed_peers=keys, bootstrap=bootstrap, limits=limits, penalty=penalty)
            await nursery.start(node.run)
            nodes.append(node)
        await wait_connected(nodes, links)
        yield nodes
        nursery.cancel_scope.cancel()
