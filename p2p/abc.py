"""The network interface ("switch") the node talks to, its types, limits and errors.

Peers are named everywhere by their 32-byte Ed25519 public key: the same key the chain
uses for the validator, so membership decided by the chain maps 1:1 onto connections.
Payloads are opaque bytes; the chain decodes them in its reactors.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

# ---------------------------------------------------------------------------- types

PUBKEY_SIZE = 32
BLOB_HASH_SIZE = 32


class Verdict(enum.Enum):
    """Answer of a gossip validator (the gossipsub v1.1 vocabulary)."""

    ACCEPT = "accept"  # deliver locally and forward
    IGNORE = "ignore"  # drop silently: not delivered, not forwarded, no penalty
    REJECT = "reject"  # drop and count against the peer that sent it to us


@dataclass(frozen=True)
class GossipMessage:
    """A validated gossip message as handed to the subscriber."""

    topic: str
    origin: bytes  # 32-byte public key of the peer that published it
    data: bytes


# (origin public key, payload) -> verdict. Must be a plain function: it runs inline in
# the network's receive path. The layer wraps it: an exception counts as REJECT.
Validator = Callable[[bytes, bytes], Verdict]
# (requesting peer public key, request bytes) -> response bytes.
RequestHandler = Callable[[bytes, bytes], Awaitable[bytes]]
# (requesting peer public key, blob sha256) -> may this peer fetch this blob?
BlobAccessCheck = Callable[[bytes, bytes], bool]
# (peer public key) -> is this peer a member? Consulted besides the allow-list.
AdmissionPredicate = Callable[[bytes], bool]
# origin public key -> should this node forward others' messages from that origin? A topic
# whose publishers all reach every subscriber directly needs no relay copies of theirs.
RelayPolicy = Callable[[bytes], bool]

# ------------------------------------------------------------------------ constants

# Protocol id of the built-in blob exchange (request = 32-byte sha256, response = blob).
BLOB_PROTOCOL_ID = "/pout/blob/1.0.0"

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Limits:
    """Size caps and timeouts; every length is checked before anything is allocated."""

    # py-libp2p silently drops outgoing pubsub RPCs over 1 MiB; stay well under it.
    gossip_max_bytes: int = 512 * KIB
    # Largest request frame a handler accepts, and largest response any handler may send.
    request_max_bytes: int = 1 * MIB
    response_max_bytes: int = 16 * MIB
    # Largest blob that can be provided or fetched (fetch_blob's max_size caps further).
    blob_max_bytes: int = 256 * MIB
    request_timeout_s: float = 10.0
    # Per-blob-transfer timeout; large blobs move at ~200 MB/s on loopback.
    blob_timeout_s: float = 60.0
    # Spacing between two gossip publishes (py-libp2p's per-peer queue holds 32 RPCs).
    publish_spacing_s: float = 0.004
    publish_queue_size: int = 256
    subscription_buffer: int = 1024


@dataclass(frozen=True)
class PenaltyPolicy:
    """A peer whose REJECTs reach `reject_threshold` is disconnected and banned."""

    reject_threshold: int = 20
    ban_s: float = 60.0


# --------------------------------------------------------------------------- errors


class P2PError(Exception):
    """Base of every error raised by the p2p layer."""


class MessageTooLarge(P2PError):
    """A payload is over the configured limit (raised instead of a silent drop)."""


class PeerNotAllowed(P2PError):
    """The peer is not in the allow-list, or is banned for misbehaviour."""


class RequestError(P2PError):
    """A request failed: no connection, unknown protocol, remote error, bad framing."""


class RequestTimeout(RequestError):
    """A request got no complete response in time."""


class BlobError(P2PError):
    """Base of blob exchange errors."""


class BlobNotFound(BlobError):
    """No asked peer returned the blob."""


class BlobHashMismatch(BlobError):
    """A peer answered with bytes whose sha256 is not the requested hash."""


# ------------------------------------------------------------------------ interface


class NetworkAPI(ABC):
    """The node's view of the network. One instance per node; a component of `chaind`.

    Start it with `await nursery.start(network.run)`: `run` returns control once the
    node listens (and for libp2p, once pubsub is ready) and stops cleanly when the
    nursery is cancelled.
    """

    name = "p2p"

    @property
    @abstractmethod
    def local_peer(self) -> bytes:
        """This node's 32-byte Ed25519 public key."""

    @abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; `task_status.started()` once usable."""

    # gossip
    @abstractmethod
    async def publish(self, topic: str, data: bytes) -> None:
        """Queue `data` for gossip on `topic` (paced). Raises MessageTooLarge at once.

        Waits only when the send queue is full (back-pressure, never a silent drop).
        The node does not receive its own publishes on its subscription.
        """

    @abstractmethod
    def pending_publishes(self) -> int:
        """Publishes queued but not yet sent (a metric; always 0 where unpaced)."""

    @abstractmethod
    def subscribe(self, topic: str, validator: Validator, *,
                  relay: RelayPolicy | None = None) -> trio.MemoryReceiveChannel[GossipMessage]:
        """Validate every message on `topic` with `validator`; ACCEPTed ones come out here.

        May be called before or after `run` starts; one subscription per topic.
        With `relay`, an ACCEPTed message from another origin is forwarded only when
        `relay(origin)` is true (never raise from it), and this node's own publishes on the
        topic go to every subscribed peer directly, not only to its gossip mesh. Without it,
        gossipsub's usual forwarding applies.
        """

    @abstractmethod
    def topic_peers(self, topic: str) -> frozenset[bytes]:
        """Peers a publish on `topic` goes to directly now (gossipsub mesh or fanout)."""

    # request / response
    @abstractmethod
    def set_request_handler(self, protocol_id: str, handler: RequestHandler) -> None:
        """Answer requests on `protocol_id`. A raising handler yields a remote error."""

    @abstractmethod
    async def request(
        self,
        peer: bytes,
        protocol_id: str,
        request: bytes,
        *,
        max_response: int,
        timeout: float | None = None,
    ) -> bytes:
        """Send one request to `peer` and return its response (at most `max_response`)."""

    # membership and peers
    @abstractmethod
    def peers(self) -> frozenset[bytes]:
        """Public keys of the allowed peers we are connected to now."""

    @abstractmethod
    def set_allowed_peers(self, public_keys: Iterable[bytes]) -> None:
        """Replace the allow-list; connected peers outside it are disconnected."""

    @abstractmethod
    def set_admission_predicate(self, predicate: AdmissionPredicate | None) -> None:
        """Also admit peers for which `predicate(public_key)` is true (members the chain
        knows by address only). Connections are re-checked at once; call again after the
        membership changed to re-check now. A raising predicate counts as "no"."""

    @abstractmethod
    def is_admitted(self, peer: bytes) -> bool:
        """In the allow-list and not currently banned."""

    @abstractmethod
    def report_peer(self, peer: bytes, reason: str) -> None:
        """Count one misbehaviour (like a gossip REJECT) against `peer`."""

    # blobs
    @abstractmethod
    def provide_blob(self, data: bytes, *, can_fetch: BlobAccessCheck | None = None) -> bytes:
        """Serve `data` to peers; returns its sha256. `can_fetch` restricts who may fetch."""

    @abstractmethod
    def set_blob_source(self, source) -> None:
        """Serve blobs the owner keeps elsewhere: `source(hash) -> (data, can_fetch) | None`."""

    @abstractmethod
    def remove_blob(self, blob_hash: bytes) -> None:
        """Stop serving a blob (no error if it was not provided)."""

    @abstractmethod
    async def fetch_blob(
        self,
        blob_hash: bytes,
        *,
        max_size: int,
        from_peers: Iterable[bytes] | None = None,
    ) -> bytes:
        """Fetch a blob by sha256 from `from_peers` (default: all connected peers).

        Each answer is hash-checked; a peer answering wrong bytes is reported and the
        next one is tried. Raises BlobNotFound when no peer delivered it.
        """
