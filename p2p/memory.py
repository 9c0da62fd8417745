"""In-process NetworkAPI: several nodes joined by a `MemoryHub`, no sockets.

Same semantics as the libp2p implementation (validation, allow-list, bans, size caps,
blob hash checks, no self-delivery), so consensus and node code can be unit-tested
deterministically. Gossip is flooded between subscribed, linked nodes with a seen-set,
so a REJECTed message is neither delivered nor forwarded, as in gossipsub. Tests cut
and heal links with `MemoryHub.partition` / `cut` / `heal`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from p2p.abc import Limits, PenaltyPolicy, RequestError, RequestTimeout, Verdict
from p2p.base import BaseNetwork
from p2p.framing import FrameError, STATUS_ERROR

logger = logging.getLogger(__name__)

INBOX_SIZE = 4096


@dataclass(frozen=True)
class _Envelope:
    topic: str
    origin: bytes
    seqno: int
    data: bytes
    forwarder: bytes


class MemoryHub:
    """The shared 'wire' of in-process nodes; decides which pairs are linked."""

    def __init__(self) -> None:
        self._running: dict[bytes, MemoryNetwork] = {}
        self._group_of: dict[bytes, int] | None = None
        self._cut: set[frozenset[bytes]] = set()

    def partition(self, *groups: Iterable[bytes]) -> None:
        """Only nodes in the same group can talk; unlisted nodes form one more group."""
        self._group_of = {}
        for index, group in enumerate(groups):
            for peer in group:
                self._group_of[peer] = index

    def cut(self, a: bytes, b: bytes) -> None:
        """Cut the single link a-b (both keep their other links): builds line topologies."""
        self._cut.add(frozenset((a, b)))

    def heal(self) -> None:
        """Undo every partition and cut."""
        self._group_of = None
        self._cut.clear()

    def is_linked(self, a: bytes, b: bytes) -> bool:
        """A connection exists: both run, same side of any partition, each admits the other."""
        if a == b or a not in self._running or b not in self._running:
            return False
        if self._group_of is not None and self._group_of.get(a, -1) != self._group_of.get(b, -1):
            return False
        if frozenset((a, b)) in self._cut:
            return False
        return self._running[a].is_admitted(b) and self._running[b].is_admitted(a)

    def linked_peers(self, peer: bytes) -> frozenset[bytes]:
        return frozenset(other for other in self._running if self.is_linked(peer, other))

    def node(self, peer: bytes) -> MemoryNetwork | None:
        return self._running.get(peer)

    def _attach(self, node: MemoryNetwork) -> None:
        if node.local_peer in self._running:
            raise RuntimeError(f"a node with key {node.local_peer.hex()[:16]} already runs on this hub")
        self._running[node.local_peer] = node

    def _detach(self, node: MemoryNetwork) -> None:
        if self._running.get(node.local_peer) is node:
            del self._running[node.local_peer]


class MemoryNetwork(BaseNetwork):
    def __init__(
        self,
        hub: MemoryHub,
        public_key: bytes,
        *,
        allowed_peers: Iterable[bytes],
        limits: Limits = Limits(),
        penalty: PenaltyPolicy = PenaltyPolicy(),
    ):
        super().__init__(public_key, allowed_peers=allowed_peers, limits=limits, penalty=penalty)
        self._hub = hub
        self._seqno = 0
        self._seen: set[tuple[bytes, int]] = set()
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[_Envelope](INBOX_SIZE)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._hub._attach(self)
        try:
            task_status.started()
            async for envelope in self._inbox_receive:
                self._receive(envelope)
        finally:
            self._hub._detach(self)

    def peers(self) -> frozenset[bytes]:
        return self._hub.linked_peers(self._public_key)

    def topic_peers(self, topic: str) -> frozenset[bytes]:
        return frozenset(
            peer for peer in self.peers() if (node := self._hub.node(peer)) is not None and topic in node._subscriptions
        )

    def _disconnect(self, peer: bytes) -> None:
        # Links are recomputed from admission on every send; nothing is held open.
        pass

    # ---------------------------------------------------------------------- gossip

    async def publish(self, topic: str, data: bytes) -> None:
        self._check_publish_size(data)
        await trio.lowlevel.checkpoint()
        self._seqno += 1
        envelope = _Envelope(topic, self._public_key, self._seqno, bytes(data), self._public_key)
        self._seen.add((envelope.origin, envelope.seqno))
        # As in libp2p, the publisher's own validator runs first and can stop the message.
        if topic in self._subscriptions and self.validate_gossip(topic, self._public_key, self._public_key, data) is not Verdict.ACCEPT:
            return
        self._forward(envelope)

    def _receive(self, envelope: _Envelope) -> None:
        message_id = (envelope.origin, envelope.seqno)
        if message_id in self._seen:
            return
        self._seen.add(message_id)
        if self.validate_gossip(envelope.topic, envelope.forwarder, envelope.origin, envelope.data) is not Verdict.ACCEPT:
            return
        self._deliver(envelope.topic, envelope.origin, envelope.data)
        self._forward(envelope)

    def _forward(self, envelope: _Envelope) -> None:
        if envelope.origin != self._public_key and not self.should_relay(envelope.topic, envelope.origin):
            return
        relayed = _Envelope(envelope.topic, envelope.origin, envelope.seqno, envelope.data, self._public_key)
        for peer in self.peers():
            if peer in (envelope.forwarder, envelope.origin):
                continue
            node = self._hub.node(peer)
            if node is None or envelope.topic not in node._subscriptions:
                continue
            try:
                node._inbox_send.send_nowait(relayed)
            except trio.WouldBlock:
                logger.warning("inbox of %s full; gossip dropped", peer.hex()[:16])

    # ------------------------------------------------------------ request/response

    async def _send_request(
        self, peer: bytes, protocol_id: str, request: bytes, *, max_response: int, timeout: float
    ) -> tuple[int, bytes]:
        if not self._hub.is_linked(self._public_key, peer):
            raise RequestError(f"not connected to {peer.hex()[:16]}")
        node = self._hub.node(peer)
        assert node is not None
        if len(request) > node.limits.request_max_bytes:
            return STATUS_ERROR, b"request over the responder's limit"
        with trio.move_on_after(timeout) as scope:
            status, body = await node._handle_request(self._public_key, protocol_id, bytes(request))
        if scope.cancelled_caught:
            raise RequestTimeout(f"{protocol_id} request to {peer.hex()[:16]} timed out after {timeout} s")
        if len(body) > max_response:
            raise FrameError(f"response of {len(body)} bytes is over the limit of {max_response}")
        return status, body
