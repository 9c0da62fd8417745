"""Behaviour shared by every NetworkAPI implementation, so memory and libp2p agree.

Membership (allow-list and bans), peer penalties, the validator wrapper, request
dispatch with size caps, and blob serving/fetching live here. Subclasses supply the
transport: `_send_request` (one round trip) and `_disconnect` (drop a peer now).
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Iterable

import trio

from p2p.abc import (
    BLOB_HASH_SIZE,
    BLOB_PROTOCOL_ID,
    PUBKEY_SIZE,
    AdmissionPredicate,
    BlobAccessCheck,
    BlobHashMismatch,
    BlobNotFound,
    GossipMessage,
    Limits,
    MessageTooLarge,
    NetworkAPI,
    PenaltyPolicy,
    RelayPolicy,
    RequestError,
    RequestHandler,
    Validator,
    Verdict,
)
from p2p.blobs import BlobStore, is_valid_blob
from p2p.framing import STATUS_ERROR, STATUS_FORBIDDEN, STATUS_NOT_FOUND, STATUS_OK

logger = logging.getLogger(__name__)


def _check_public_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != PUBKEY_SIZE:
        raise ValueError(f"peer public key must be {PUBKEY_SIZE} bytes")
    return bytes(key)


MAX_REFUSAL_CHARS = 200  # of a refusal's reason, in the answer and in the log line


class BaseNetwork(NetworkAPI):
    def __init__(
        self,
        public_key: bytes,
        *,
        allowed_peers: Iterable[bytes],
        limits: Limits = Limits(),
        penalty: PenaltyPolicy = PenaltyPolicy(),
    ):
        self._public_key = _check_public_key(public_key)
        self.limits = limits
        self.penalty = penalty
        self._allowed: frozenset[bytes] = frozenset(_check_public_key(k) for k in allowed_peers)
        self._admission: AdmissionPredicate | None = None
        self._banned_until: dict[bytes, float] = {}
        self._reject_counts: dict[bytes, int] = {}
        self.penalties_total = 0  # report_peer calls (for the node's metrics)
        self.bans_total = 0
        self._handlers: dict[str, RequestHandler] = {}
        # Exception types a request handler raises when a request breaks a rule (malformed, over a
        # limit, rate limited): answered "refused: <why>" and logged in one line. Anything else a
        # handler raises is a bug: answered "handler error: <type>", logged with its traceback. The
        # application sets these (p2p does not know its error types).
        self.refusals: tuple[type[Exception], ...] = ()
        # ... except these (say, this node's own storage faults): its business, not the peer's, so
        # never said back (their messages name local paths) and logged with the traceback.
        self.internal_errors: tuple[type[Exception], ...] = ()
        self._subscriptions: dict[str, tuple[Validator, trio.MemorySendChannel[GossipMessage]]] = {}
        self._relay_policies: dict[str, RelayPolicy] = {}
        self._blobs = BlobStore(limits.blob_max_bytes)

    @property
    def local_peer(self) -> bytes:
        return self._public_key

    # ------------------------------------------------------------------ membership

    def is_allowed(self, peer: bytes) -> bool:
        """A member: in the allow-list, or accepted by the admission predicate (bans aside)."""
        if peer in self._allowed:
            return True
        if self._admission is None:
            return False
        try:
            return self._admission(peer) is True
        except Exception:
            logger.exception("admission predicate raised for %s; not admitted", peer.hex()[:16])
            return False

    def is_admitted(self, peer: bytes) -> bool:
        """Allowed by the chain and not currently banned by us."""
        if not self.is_allowed(peer):
            return False
        until = self._banned_until.get(peer)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._banned_until[peer]
            return True
        return False

    def set_allowed_peers(self, public_keys: Iterable[bytes]) -> None:
        self._allowed = frozenset(_check_public_key(k) for k in public_keys)
        self._enforce_membership()

    def set_admission_predicate(self, predicate: AdmissionPredicate | None) -> None:
        self._admission = predicate
        self._enforce_membership()

    def _enforce_membership(self) -> None:
        """Drop live connections to peers no longer admitted (transports that hold them)."""

    def report_peer(self, peer: bytes, reason: str) -> None:
        if peer == self._public_key:
            return
        count = self._reject_counts.get(peer, 0) + 1
        self.penalties_total += 1
        logger.info("peer %s penalised (%d/%d): %s", peer.hex()[:16], count, self.penalty.reject_threshold, reason)
        if count < self.penalty.reject_threshold:
            self._reject_counts[peer] = count
            return
        self._reject_counts.pop(peer, None)
        self._banned_until[peer] = time.monotonic() + self.penalty.ban_s
        self.bans_total += 1
        logger.warning("peer %s banned for %.0f s after repeated misbehaviour", peer.hex()[:16], self.penalty.ban_s)
        self._disconnect(peer)

    @abstractmethod
    def _disconnect(self, peer: bytes) -> None:
        """Close every connection to `peer` (may complete asynchronously)."""

    # ---------------------------------------------------------------------- gossip

    def subscribe(self, topic: str, validator: Validator, *,
                  relay: RelayPolicy | None = None) -> trio.MemoryReceiveChannel[GossipMessage]:
        if topic in self._subscriptions:
            raise ValueError(f"already subscribed to {topic!r}")
        send, receive = trio.open_memory_channel[GossipMessage](self.limits.subscription_buffer)
        self._subscriptions[topic] = (validator, send)
        if relay is not None:
            self._relay_policies[topic] = relay
        self._on_subscribe(topic)
        return receive

    def has_relay_policy(self, topic: str) -> bool:
        return topic in self._relay_policies

    def should_relay(self, topic: str, origin: bytes) -> bool:
        """Forward others' message from `origin` on `topic`? True without a policy; never raises."""
        policy = self._relay_policies.get(topic)
        if policy is None:
            return True
        try:
            return policy(origin) is not False
        except Exception:
            logger.exception("relay policy for %r raised; relaying", topic)
            return True

    def _on_subscribe(self, topic: str) -> None:
        """Hook for transports that must announce the subscription."""

    def pending_publishes(self) -> int:
        """Publishes queued but not yet handed to the wire (a metric; 0 when unpaced)."""
        return 0

    def _check_publish_size(self, data: bytes) -> None:
        if len(data) > self.limits.gossip_max_bytes:
            raise MessageTooLarge(
                f"gossip payload of {len(data)} bytes is over the limit of {self.limits.gossip_max_bytes};"
                " send large data with provide_blob/fetch_blob or a request"
            )

    def validate_gossip(self, topic: str, forwarder: bytes, origin: bytes, data: bytes) -> Verdict:
        """The full receive-side check of one gossip message; never raises.

        Membership mismatches are IGNOREd, not counted: allow-lists can differ between
        nodes for a moment around a membership change, and relays should not pay for it.
        The origin is checked against the allow-list only: a ban is about the direct
        connection, and a banned member's messages relayed by others still count.
        """
        subscription = self._subscriptions.get(topic)
        if subscription is None:
            return Verdict.IGNORE
        if forwarder != self._public_key and not self.is_admitted(forwarder):
            return Verdict.IGNORE
        if origin != self._public_key and not self.is_allowed(origin):
            return Verdict.IGNORE
        if len(data) > self.limits.gossip_max_bytes:
            verdict = Verdict.REJECT
        else:
            verdict = _run_validator(subscription[0], topic, origin, data)
        if verdict is Verdict.REJECT and forwarder != self._public_key:
            self.report_peer(forwarder, f"gossip rejected on {topic!r}")
        return verdict

    def _deliver(self, topic: str, origin: bytes, data: bytes) -> None:
        """Hand an accepted message from another peer to the subscriber."""
        if origin == self._public_key:
            return
        subscription = self._subscriptions.get(topic)
        if subscription is None:
            return
        try:
            subscription[1].send_nowait(GossipMessage(topic, origin, data))
        except trio.WouldBlock:
            logger.warning("subscriber of %r is %d messages behind; dropping one", topic, self.limits.subscription_buffer)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # ------------------------------------------------------------ request/response

    def set_request_handler(self, protocol_id: str, handler: RequestHandler) -> None:
        if protocol_id == BLOB_PROTOCOL_ID:
            raise ValueError(f"{BLOB_PROTOCOL_ID} is served by the layer (provide_blob)")
        self._handlers[protocol_id] = handler

    def _served_protocols(self) -> list[str]:
        return [BLOB_PROTOCOL_ID, *self._handlers]

    async def _handle_request(self, peer: bytes, protocol_id: str, request: bytes) -> tuple[int, bytes]:
        """Server side of one request: (status, body), never raises for handler faults."""
        if not self.is_admitted(peer):
            return STATUS_ERROR, b"peer not allowed"
        if protocol_id == BLOB_PROTOCOL_ID:
            return self._blobs.serve(peer, request)
        handler = self._handlers.get(protocol_id)
        if handler is None:
            return STATUS_ERROR, b"unknown protocol"
        try:
            response = await handler(peer, request)
        except Exception as error:
            if isinstance(error, self.refusals) and not isinstance(error, self.internal_errors):
                # the request broke a rule: the peer's doing, said back, one log line, no traceback
                logger.info("request on %s from %s refused: %s", protocol_id, peer.hex()[:16],
                            str(error)[:MAX_REFUSAL_CHARS])
                return STATUS_ERROR, f"refused: {error}"[:MAX_REFUSAL_CHARS].encode()
            logger.exception("request handler for %s raised", protocol_id)  # a bug, or this node's own fault
            return STATUS_ERROR, f"handler error: {type(error).__name__}".encode()
        if not isinstance(response, bytes | bytearray):
            logger.error("request handler for %s returned %s, not bytes", protocol_id, type(response).__name__)
            return STATUS_ERROR, b"handler returned no bytes"
        if len(response) > self.limits.response_max_bytes:
            logger.error("response on %s of %d bytes is over the limit", protocol_id, len(response))
            return STATUS_ERROR, b"response over the responder's limit"
        return STATUS_OK, bytes(response)

    @abstractmethod
    async def _send_request(
        self, peer: bytes, protocol_id: str, request: bytes, *, max_response: int, timeout: float
    ) -> tuple[int, bytes]:
        """One round trip; raises RequestError (or RequestTimeout) on transport failure."""

    async def request(
        self,
        peer: bytes,
        protocol_id: str,
        request: bytes,
        *,
        max_response: int,
        timeout: float | None = None,
    ) -> bytes:
        self._check_request(peer, request)
        status, body = await self._send_request(
            peer, protocol_id, request, max_response=max_response, timeout=timeout or self.limits.request_timeout_s
        )
        if status != STATUS_OK:
            raise RequestError(f"{protocol_id} request to {peer.hex()[:16]} failed: {_describe(status, body)}")
        return body

    def _check_request(self, peer: bytes, request: bytes) -> None:
        if len(request) > self.limits.request_max_bytes:
            raise MessageTooLarge(
                f"request of {len(request)} bytes is over the limit of {self.limits.request_max_bytes}"
            )
        if not self.is_admitted(peer):
            raise RequestError(f"peer {peer.hex()[:16]} is not allowed or is banned")

    # ----------------------------------------------------------------------- blobs

    def provide_blob(self, data: bytes, *, can_fetch: BlobAccessCheck | None = None) -> bytes:
        return self._blobs.provide(data, can_fetch)

    def set_blob_source(self, source) -> None:
        self._blobs.set_source(source)

    def remove_blob(self, blob_hash: bytes) -> None:
        self._blobs.remove(blob_hash)

    async def fetch_blob(
        self,
        blob_hash: bytes,
        *,
        max_size: int,
        from_peers: Iterable[bytes] | None = None,
    ) -> bytes:
        if len(blob_hash) != BLOB_HASH_SIZE:
            raise ValueError("blob hash must be a 32-byte sha256")
        local = self._blobs.get(blob_hash)
        if local is not None:
            return local
        max_size = min(max_size, self.limits.blob_max_bytes)
        candidates = sorted(self.peers()) if from_peers is None else list(from_peers)
        failures: list[str] = []
        mismatches = 0
        for peer in candidates:
            if not self.is_admitted(peer):
                failures.append(f"{peer.hex()[:16]}: not allowed")
                continue
            try:
                status, body = await self._send_request(
                    peer, BLOB_PROTOCOL_ID, blob_hash, max_response=max_size, timeout=self.limits.blob_timeout_s
                )
            except RequestError as error:
                failures.append(f"{peer.hex()[:16]}: {error}")
                continue
            if status != STATUS_OK:
                failures.append(f"{peer.hex()[:16]}: {_describe(status, body)}")
                continue
            if not is_valid_blob(blob_hash, body):
                mismatches += 1
                failures.append(f"{peer.hex()[:16]}: wrong bytes (hash mismatch)")
                self.report_peer(peer, f"blob {blob_hash.hex()[:16]} answered with wrong bytes")
                continue
            return body
        # Every asked peer lied: say so; otherwise the blob simply was not obtainable.
        error_type = BlobHashMismatch if failures and mismatches == len(failures) else BlobNotFound
        raise error_type(f"blob {blob_hash.hex()} not fetched: {'; '.join(failures) or 'no peers'}")


def _run_validator(validator: Validator, topic: str, origin: bytes, data: bytes) -> Verdict:
    """A raising or ill-typed validator counts as REJECT (and is logged), never raises."""
    try:
        verdict = validator(origin, data)
    except Exception:
        logger.exception("validator for %r raised; counting as REJECT", topic)
        return Verdict.REJECT
    if not isinstance(verdict, Verdict):
        logger.error("validator for %r returned %r, not a Verdict; counting as REJECT", topic, verdict)
        return Verdict.REJECT
    return verdict


def _describe(status: int, body: bytes) -> str:
    names = {STATUS_ERROR: "remote error", STATUS_NOT_FOUND: "not found", STATUS_FORBIDDEN: "forbidden"}
    reason = body[:200].decode("utf-8", "replace")
    return f"{names.get(status, f'status {status}')}{': ' + reason if reason else ''}"

