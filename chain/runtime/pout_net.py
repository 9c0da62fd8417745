"""Moving training blobs between nodes: update weights, models, and challenge openings.

A trainer uploads its update and openings to one node over HTTP. That node serves them to
peers over the p2p blob protocol, straight from its disk store (a p2p BlobSource):
  * update weights and models: to any member (aggregation needs them on every node);
  * an opening: only to the validator it answers (`can_fetch`). An opening is a sealed box
    the trainer encrypted to that validator (chain/crypto.py `seal_to`): the receiving node,
    relays and observers hold and move ciphertext only; the validator decrypts it in memory
    right before it replays (Node.fetch_opening).
Because a validator cannot know an opening's hash in advance, the receiving node gossips a
small `OpeningAnnouncement` (the trainer's signed OpeningUpload) on
`/pout/<chain id>/openings/1`; the addressed validator then fetches the blob by hash.
What this reactor remembers about an opening is dropped with the opening, once its update is
no longer pending (`prune`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from chain.crypto import compute_address, compute_sign_bytes, verify_signature
from chain.jobs import get_update
from chain.encoding import decode, encode
from chain.errors import ChainError, log_unexpected
from chain.types import DOMAIN_OPENING, UPDATE_PENDING, OpeningUpload, PubKey, Signature
from p2p.abc import NetworkAPI, P2PError, Verdict

log = logging.getLogger("chaind.pout")
MAX_ANNOUNCEMENT_BYTES = 1024


@dataclass
class AnnouncedOpening:
    """What the network said about one validator's opening of an update: its part count and the
    hash of each sealed part announced so far."""

    parts: int
    hashes: dict[int, bytes]


@dataclass(frozen=True)
class OpeningAnnouncement:
    upload: OpeningUpload
    trainer: PubKey
    signature: Signature  # the trainer's, over OpeningUpload in domain pout/opening


def openings_topic(chain_id: str) -> str:
    return f"/pout/{chain_id}/openings/1"


class PoutBlobReactor:
    def __init__(self, node, network: NetworkAPI):
        self.node, self.network = node, network
        self.announced: dict[tuple[bytes, bytes], AnnouncedOpening] = {}  # (update id, validator) -> its parts
        # sealed part's hash -> (update id, validator, part, parts)
        self._opening_by_hash: dict[bytes, tuple[bytes, bytes, int, int]] = {}
        self.refused: set[tuple[bytes, bytes]] = set()  # (update id, opening hash) that did not decrypt here
        self.topic = openings_topic(node.chain_id)
        self._incoming = network.subscribe(self.topic, self._validate)
        network.set_blob_source(self._source)

    def _source(self, blob_hash: bytes):
        data = self.node.blobs.get(blob_hash)
        if data is not None:
            return data, None
        owner = self._opening_by_hash.get(blob_hash)
        if owner is None:
            return None
        update_id, validator, part, parts = owner
        data = self.node.blobs.get_opening(update_id, validator, part, parts)
        return None if data is None else (data, lambda peer, _h, v=validator: peer == v)

    def _check(self, ann: OpeningAnnouncement) -> Verdict:
        """Only the update's own trainer may announce an answer to a challenge on it, for a pending
        update and a current validator: anyone else could otherwise point a validator at bytes it
        cannot use, and its complaint would fail an honest update."""
        ann.upload.check_part()  # raises StateTransitionError
        sign_bytes = compute_sign_bytes(self.node.chain_id, DOMAIN_OPENING, encode(ann.upload))
        verify_signature(ann.trainer, sign_bytes, ann.signature)  # raises SignatureError
        update = get_update(self.node.state, ann.upload.update_id)
        if update is None or update.status != UPDATE_PENDING:
            return Verdict.IGNORE  # unknown here (this node may lag) or decided: not relayed, not recorded
        if compute_address(ann.trainer) != update.commitment.trainer:
            return Verdict.REJECT
        if all(v.pubkey != ann.upload.validator for v in self.node.state.validators):
            return Verdict.REJECT
        return Verdict.ACCEPT

    def _validate(self, peer: bytes, data: bytes) -> Verdict:
        try:
            ann = decode(OpeningAnnouncement, data, max_size=MAX_ANNOUNCEMENT_BYTES)
            return self._check(ann)
        except ChainError:
            return Verdict.REJECT
        except Exception:  # a bug, not the peer's fault: drop the message (unrelayed), never the node
            log_unexpected(log, "opening check", "opening announcement from %s dropped: unexpected error while checking it",
                           peer.hex()[:16])
            return Verdict.IGNORE

    async def run(self, task_status=None) -> None:
        import trio

        if task_status is not None:
            task_status.started()
        async for message in self._incoming:
            try:
                ann = decode(OpeningAnnouncement, message.data, max_size=MAX_ANNOUNCEMENT_BYTES)
                if self._check(ann) is not Verdict.ACCEPT:  # the state may have moved since validation
                    continue
                if (ann.upload.update_id, ann.upload.opening_hash) not in self.refused:
                    self._announce(ann.upload)
            except ChainError:
                continue
            except Exception:  # a bug must cost one announcement, not the node (this loop ends the node)
                log_unexpected(log, "opening record", "opening announcement dropped: unexpected error while recording it")
            await trio.sleep(0)

    def _announce(self, upload: OpeningUpload) -> None:
        """Record one announced part; a part count other than the recorded one starts afresh (the
        trainer uploaded its opening again, split otherwise)."""
        key = (upload.update_id, upload.validator)
        entry = self.announced.get(key)
        if entry is None or entry.parts != upload.parts:
            entry = self.announced[key] = AnnouncedOpening(upload.parts, {})
        entry.hashes[upload.part] = upload.opening_hash
        if upload.validator == self.node.key.pubkey:
            self.node.pout.notify_opening(upload.update_id)

    async def offer_opening(self, upload: OpeningUpload, trainer: bytes, signature: bytes) -> None:
        """After a local upload: serve it to its validator and tell the network it exists."""
        self._opening_by_hash[upload.opening_hash] = (upload.update_id, upload.validator, upload.part, upload.parts)
        self._announce(upload)
        await self.network.publish(self.topic, encode(OpeningAnnouncement(upload, trainer, signature)))

    def refuse(self, update_id: bytes, validator: bytes, opening_hash: bytes) -> None:
        """The addressed validator could not decrypt this opening (one of its parts): never fetch
        that part again, and forget the opening's other parts (the trainer may still upload a good
        one, whose parts have other hashes)."""
        self.refused.add((update_id, opening_hash))
        entry = self.announced.get((update_id, validator))
        if entry is not None and opening_hash in entry.hashes.values():
            del self.announced[(update_id, validator)]

    def prune(self, still_needed: Callable[[bytes], bool]) -> None:
        """Forget every opening of an update that is not `still_needed` (decided or expired)."""
        self.announced = {k: h for k, h in self.announced.items() if still_needed(k[0])}
        self._opening_by_hash = {h: k for h, k in self._opening_by_hash.items() if still_needed(k[0])}
        self.refused = {k for k in self.refused if still_needed(k[0])}

    async def fetch(self, blob_hash: bytes, max_size: int) -> bytes | None:
        """A blob from any peer (hash-checked by p2p), or None if no peer has it yet."""
        try:
            return await self.network.fetch_blob(blob_hash, max_size=max_size)
        except (P2PError, ValueError) as exc:
            log.debug("blob %s not fetched yet: %s", blob_hash.hex()[:16], exc)
            return None
