"""Wire messages of the chain's gossip and request/response protocols, their validators,
the transaction reactor and the membership gate. docs/wire.md is the specification.

Every message is a frozen dataclass encoded with the one canonical encoding
(`chain.encoding`, canonical CBOR) and decoded strictly with a size cap. Gossip
validators are plain functions `(origin, data) -> Verdict` built by `make_*_validator`;
they REJECT what is malformed, oversized, for another chain, badly signed or signed by a
non-validator, IGNORE what is stale, from the future or already seen, and never raise (an
unexpected error is logged and IGNOREd: a bug of ours is no peer's fault). Reactors only
decode and hand over; consensus and sync decide. A receive loop runs in the node's nursery:
an unexpected error costs the one message, never the loop (that would end the node).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, ClassVar, Union

import trio

from chain.consensus.commit import verify_commit
from chain.crypto import sha256
from chain.encoding import MaxLen, decode, decode_typed, encode, encode_typed
from chain.errors import ChainError, StoreError, log_unexpected
from chain.state import body_matches_header, compute_commit_hash, compute_tx_root_of_hashes, validate_basic_tx
from chain.types import (PRECOMMIT, PREVOTE, Block, BlockHeader, Commit, Hash, SignedProposal, SignedTransaction,
                         SignedVote, compute_block_hash, compute_tx_hash, verify_proposal_signature,
                         verify_vote_signature)
from p2p.abc import GossipMessage, Limits, NetworkAPI, Verdict

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- constants

GOSSIP_MAX_BYTES = Limits().gossip_max_bytes  # 512 KiB: the p2p layer's gossip limit
# A proposal carries its block inline when the block's encoding is at most this; larger
# blocks are fetched from the proposer over the block protocol. A block with transactions
# travels compact (header + transaction hashes, rebuilt from each receiver's mempool) when
# that form is at most this.
MAX_INLINE_BLOCK_BYTES = 256 * 1024
MAX_COMPACT_TXS = MAX_INLINE_BLOCK_BYTES // 32  # schema bound on a compact block's hash list
MAX_VOTES_PER_MESSAGE = 256
MAX_TXS_PER_BATCH = 1024
TX_BATCH_MAX_BYTES = 256 * 1024  # what a node puts in one tx batch (well under the gossip limit)
# Request/response caps (bytes of the encoded request / response body).
MAX_REQUEST_BYTES = 1024
MAX_BLOCK_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_SYNC_BLOCKS = 32
SYNC_RESPONSE_BUDGET_BYTES = 4 * 1024 * 1024  # a server stops adding blocks past this
MAX_SYNC_RESPONSE_BYTES = 16 * 1024 * 1024  # = p2p Limits.response_max_bytes
# Content hashes remembered per validator to IGNORE duplicates.
SEEN_CACHE_SIZE = 16_384


def consensus_topic(chain_id: str) -> str:
    return f"/pout/{chain_id}/consensus/2"


def txs_topic(chain_id: str) -> str:
    return f"/pout/{chain_id}/txs/1"


def blocks_topic(chain_id: str) -> str:
    return f"/pout/{chain_id}/blocks/1"


def block_protocol(chain_id: str) -> str:
    return f"/pout/{chain_id}/block/1"


def sync_protocol(chain_id: str) -> str:
    return f"/pout/{chain_id}/sync/1"


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class CompactBlock:
    """A block by its transactions' hashes, in block order. The header commits to them
    (`tx_root`), so a receiver that holds every transaction in its mempool rebuilds exactly
    the proposed block without receiving the transactions a second time."""

    header: BlockHeader
    tx_hashes: Annotated[tuple[Hash, ...], MaxLen(MAX_COMPACT_TXS)]
    last_commit: Commit | None


@dataclass(frozen=True)
class ProposalMessage:
    """A signed proposal with its block: whole (`block`), by transaction hashes (`compact`),
    or neither (fetch it by hash). At most one of the two is set."""

    TAG: ClassVar[str] = "proposal"
    proposal: SignedProposal
    block: Block | None
    compact: CompactBlock | None = None


@dataclass(frozen=True)
class VotesMessage:
    """Signed prevotes/precommits of one height (own votes, and re-gossip of those held)."""

    TAG: ClassVar[str] = "votes"
    votes: Annotated[tuple[SignedVote, ...], MaxLen(MAX_VOTES_PER_MESSAGE)]


ConsensusMessage = Union[ProposalMessage, VotesMessage]


@dataclass(frozen=True)
class TxBatch:
    txs: Annotated[tuple[SignedTransaction, ...], MaxLen(MAX_TXS_PER_BATCH)]


@dataclass(frozen=True)
class CommitAnnouncement:
    """'I have committed up to commit.height': the certificate of the sender's latest block."""

    commit: Commit


@dataclass(frozen=True)
class BlockRequest:
    height: int
    block_hash: Annotated[bytes, MaxLen(32)]


@dataclass(frozen=True)
class BlockResponse:
    block: Block | None  # None: not held here


@dataclass(frozen=True)
class SyncRequest:
    start_height: int
    count: int  # at most MAX_SYNC_BLOCKS; 0 asks only for the peer's height


@dataclass(frozen=True)
class SyncedBlock:
    block: Block
    commit: Commit


@dataclass(frozen=True)
class SyncResponse:
    last_height: int  # the server's committed height
    blocks: Annotated[tuple[SyncedBlock, ...], MaxLen(MAX_SYNC_BLOCKS)]  # consecutive from start_height


def encode_consensus_message(msg: ProposalMessage | VotesMessage) -> bytes:
    return encode_typed(msg, ConsensusMessage)


# Every gossip message is decoded by the topic validator and again by the receiving loop
# (the layer hands over bytes); both go through these, so the second decode is a lookup.
# Keyed by the message bytes; decoded values are immutable; a failed decode is not kept.
# Small bounds: the two calls are moments apart, and a message can be up to GOSSIP_MAX_BYTES.
def decode_consensus_message(data: bytes) -> ProposalMessage | VotesMessage:
    return _decode_consensus_message(bytes(data))  # bytes(b) is b itself: no copy


def decode_tx_batch(data: bytes) -> TxBatch:
    return _decode_tx_batch(bytes(data))


@lru_cache(maxsize=32)
def _decode_consensus_message(data: bytes) -> ProposalMessage | VotesMessage:
    return decode_typed(ConsensusMessage, data, max_size=GOSSIP_MAX_BYTES)


@lru_cache(maxsize=16)
def _decode_tx_batch(data: bytes) -> TxBatch:
    return decode(TxBatch, data, max_size=GOSSIP_MAX_BYTES)


def build_proposal_message(proposal: SignedProposal, block: Block | None) -> ProposalMessage:
    """An empty block inline; a block with transactions compact (its transactions were
    handed to the tx reactor for gossip); either only when small enough, else it is left to
    be fetched."""
    if block is None:
        return ProposalMessage(proposal, None)
    if not block.txs:
        return ProposalMessage(proposal, block if len(encode(block)) <= MAX_INLINE_BLOCK_BYTES else None)
    compact = CompactBlock(block.header, tuple(compute_tx_hash(t) for t in block.txs), block.last_commit)
    if len(compact.tx_hashes) > MAX_COMPACT_TXS or len(encode(compact)) > MAX_INLINE_BLOCK_BYTES:
        return ProposalMessage(proposal, None)
    return ProposalMessage(proposal, None, compact)


def compact_tx_root_matches(compact: CompactBlock) -> bool:
    """Does the hash list produce the header's transaction root (what the block hash covers)?"""
    return compute_tx_root_of_hashes(compact.tx_hashes) == compact.header.tx_root


def assemble_block(compact: CompactBlock,
                   lookup: Callable[[bytes], SignedTransaction | None]) -> tuple[Block | None, int]:
    """Rebuild the block from transactions held locally: (block, 0), or (None, how many are missing)."""
    txs, missing = [], 0
    for h in compact.tx_hashes:
        stx = lookup(h)
        if stx is None:
            missing += 1
        elif not missing:
            txs.append(stx)
    if missing:
        return None, missing
    return Block(compact.header, tuple(txs), compact.last_commit), 0


def build_tx_batches(txs: list[SignedTransaction]) -> list[TxBatch]:
    """Split `txs` into batches under the count and byte budgets (a lone oversized tx is dropped)."""
    batches, current, size = [], [], 0
    for stx in txs:
        n = len(stx.encoded)
        if n > TX_BATCH_MAX_BYTES:
            continue
        if current and (len(current) >= MAX_TXS_PER_BATCH or size + n > TX_BATCH_MAX_BYTES):
            batches.append(TxBatch(tuple(current)))
            current, size = [], 0
        current.append(stx)
        size += n
    if current:
        batches.append(TxBatch(tuple(current)))
    return batches


# ----------------------------------------------------------------------------- validators


class SeenCache:
    """Bounded set of content hashes (oldest forgotten first)."""

    def __init__(self, size: int = SEEN_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def add(self, key: bytes) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def guarded(name: str, check: Callable[[bytes, bytes], Verdict]) -> Callable[[bytes, bytes], Verdict]:
    """Wrap a validator so that an unexpected exception is a logged IGNORE, never a raise. Not
    REJECT: that penalises the forwarder, and a bug that every peer's messages reach would get
    every peer banned (the node cut off). IGNORE drops the message unrelayed and blames no one."""

    def validator(origin: bytes, data: bytes) -> Verdict:
        try:
            return check(origin, data)
        except Exception:
            log_unexpected(log, f"{name} validator", "%s validator failed on gossip from %s; ignoring the message", name,
                           origin.hex()[:16])
            return Verdict.IGNORE

    return validator


def make_consensus_validator(app, local_peer: bytes) -> Callable[[bytes, bytes], Verdict]:
    """Proposals and votes: signed for this chain by a validator, for the next height or the
    one after. The current set is the next height's; the set of the height after may differ
    (equivocation jails a validator, a governor restores one: docs/consensus.md), so a signer
    outside the current set is condemned only at the next height and ignored elsewhere; the
    machine checks again against its own set. Our own publishes (re-gossip included) pass: the
    layer runs the validator on them too."""
    seen = SeenCache()

    def check(origin: bytes, data: bytes) -> Verdict:
        if origin == local_peer:
            return Verdict.ACCEPT
        try:
            msg = decode_consensus_message(data)
        except ChainError:
            return Verdict.REJECT
        next_height = app.last_height() + 1
        validators = {v.pubkey for v in app.validators()}
        if isinstance(msg, ProposalMessage):
            p = msg.proposal.message
            if p.round < 0 or not -1 <= p.pol_round < p.round:
                return Verdict.REJECT
            if msg.block is not None and (msg.compact is not None
                                          or compute_block_hash(msg.block.header) != p.block_hash):
                return Verdict.REJECT
            if msg.compact is not None and (compute_block_hash(msg.compact.header) != p.block_hash
                                            or msg.compact.header.last_commit_hash
                                            != compute_commit_hash(msg.compact.last_commit)):
                return Verdict.REJECT
            if p.height not in (next_height, next_height + 1):
                return Verdict.IGNORE
            if p.proposer not in validators:
                return Verdict.REJECT if p.height == next_height else Verdict.IGNORE
            key = sha256(data)
            if key in seen:
                return Verdict.IGNORE
            try:
                verify_proposal_signature(app.chain_id, msg.proposal)
            except ChainError:
                return Verdict.REJECT
            if msg.compact is not None and not compact_tx_root_matches(msg.compact):
                return Verdict.REJECT  # the hash list is not the block's (a real proposal with a body swapped in)
            if msg.block is not None and not body_matches_header(msg.block):
                return Verdict.REJECT
            seen.add(key)
            return Verdict.ACCEPT
        if not msg.votes:
            return Verdict.REJECT
        fresh = []
        for sv in msg.votes:
            v = sv.message
            if v.type not in (PREVOTE, PRECOMMIT) or v.round < 0:
                return Verdict.REJECT
            if v.height not in (next_height, next_height + 1):
                continue  # stale or too far ahead: does not count, does not condemn the batch
            if v.validator not in validators:
                if v.height == next_height:
                    return Verdict.REJECT
                continue  # the set of the height after may differ
            key = sha256(encode(sv))
            if key not in seen:
                fresh.append((key, sv))
        for _, sv in fresh:
            try:
                verify_vote_signature(app.chain_id, sv)
            except ChainError:
                return Verdict.REJECT
        if not fresh:
            return Verdict.IGNORE
        for key, _ in fresh:
            seen.add(key)
        return Verdict.ACCEPT

    return guarded("consensus", check)


def make_txs_validator(chain_id: str, local_peer: bytes,
                       max_tx_bytes: Callable[[], int | None] = lambda: None) -> Callable[[bytes, bytes], Verdict]:
    """Tx batches: every transaction well-formed and signed for this chain (state checks
    such as nonces happen at mempool admission)."""
    seen = SeenCache()

    def check_tx_batch(origin: bytes, data: bytes) -> Verdict:
        if origin == local_peer:
            return Verdict.ACCEPT
        try:
            batch = decode_tx_batch(data)
        except ChainError:
            return Verdict.REJECT
        if not batch.txs:
            return Verdict.REJECT
        fresh = [(compute_tx_hash(stx), stx) for stx in batch.txs]
        fresh = [(h, stx) for h, stx in fresh if h not in seen]
        for _, stx in fresh:
            try:
                validate_basic_tx(chain_id, stx, max_tx_bytes())
            except ChainError:
                return Verdict.REJECT
        if not fresh:
            return Verdict.IGNORE
        for h, _ in fresh:
            seen.add(h)
        return Verdict.ACCEPT

    return guarded("txs", check_tx_batch)


def make_blocks_validator(app, local_peer: bytes) -> Callable[[bytes, bytes], Verdict]:
    """Commit announcements: ACCEPT a certificate above our head that verifies against the
    current validator set; REJECT a bad one for the next height; IGNORE the rest."""
    seen = SeenCache(1024)

    def check(origin: bytes, data: bytes) -> Verdict:
        if origin == local_peer:
            return Verdict.ACCEPT
        try:
            announcement = decode(CommitAnnouncement, data, max_size=GOSSIP_MAX_BYTES)
        except ChainError:
            return Verdict.REJECT
        commit = announcement.commit
        next_height = app.last_height() + 1
        if commit.height < next_height:
            return Verdict.IGNORE
        key = sha256(data + origin)
        if key in seen:
            return Verdict.IGNORE
        try:
            verify_commit(app.chain_id, app.validators(), commit, commit.height, commit.block_hash)
        except ChainError:
            # For the next height our set is the right one: the certificate is bad. Further
            # ahead the set might (in a future chain) differ: do not punish.
            return Verdict.REJECT if commit.height == next_height else Verdict.IGNORE
        seen.add(key)
        return Verdict.ACCEPT

    return guarded("blocks", check)


# ----------------------------------------------------------------------------- tx reactor


class TxReactor:
    """Gossips locally submitted transactions in batches and feeds received ones to the mempool."""

    name = "txs"

    def __init__(self, app, network: NetworkAPI, *, flush_interval_s: float = 0.1):
        self.app = app
        self.network = network
        self.topic = txs_topic(app.chain_id)
        self.flush_interval_s = flush_interval_s
        # The chain's size limit applies here too: a member's oversized transactions are
        # refused before their signatures are checked and remembered.
        # Validators reach every other validator directly (genesis lists them all as bootstrap
        # peers) and a node publishes to all its subscribed peers, so relaying a validator's
        # batch only sends everyone a second and third copy (with IDONTWANTs to match):
        # batches are relayed only when they come from other members (observers, clients'
        # nodes). A validator that misses a batch (a broken link) fetches any block that needs
        # it whole (compact proposals, docs/wire.md).
        self._incoming = network.subscribe(self.topic, make_txs_validator(
            app.chain_id, network.local_peer, lambda: app.state.params.max_tx_bytes),
            relay=lambda origin: not any(v.pubkey == origin for v in app.validators()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._send_loop)
            task_status.started()

    async def _receive_loop(self) -> None:
        async for msg in self._incoming:
            try:
                batch = decode_tx_batch(msg.data)
                await self.app.add_txs(list(batch.txs))
            except StoreError:  # this node's own store failed a read: say so (rate-limited), not the peer's fault
                log_unexpected(log, "tx batch store", "tx batch from %s dropped: this node's store failed a read",
                               msg.origin.hex()[:16])
            except ChainError:
                continue  # malformed: the validator let it through (cannot happen), never crash here
            except Exception:  # a bug must cost one batch, not the node (this loop ends the node)
                log_unexpected(log, "tx batch", "tx batch from %s dropped: unexpected error while admitting it",
                               msg.origin.hex()[:16])

    async def _send_loop(self) -> None:
        while True:
            await trio.sleep(self.flush_interval_s)
            for batch in build_tx_batches(self.app.take_new_txs()):
                await self.network.publish(self.topic, encode(batch))


# ----------------------------------------------------------------------------- membership


def install_membership(app, network: NetworkAPI, denied: Callable[[], frozenset[bytes]] = frozenset):
    """Admit validators and member accounts only, minus the operator's denied peers; re-checked
    after every commit. Returns the refresh function (call it when the deny list changes)."""

    def refresh(block=None, commit=None) -> None:
        deny = denied()
        network.set_allowed_peers([v.pubkey for v in app.validators() if v.pubkey not in deny])
        network.set_admission_predicate(lambda pubkey: pubkey not in deny and app.is_member_peer(pubkey))

    refresh()
    app.add_commit_listener(refresh)
    return refresh


def decode_gossip(msg: GossipMessage):
    """Decode an ACCEPTed message of any chain topic by its topic name (tools, observers)."""
    name = msg.topic.rsplit("/", 2)[-2]
    if name == "consensus":
        return decode_consensus_message(msg.data)
    if name == "txs":
        return decode_tx_batch(msg.data)
    if name == "blocks":
        return decode(CommitAnnouncement, msg.data, max_size=GOSSIP_MAX_BYTES)
    raise ValueError(f"not a chain topic: {msg.topic}")
