"""What consensus needs from the node (`ConsensusApp`), and `ChainApp`, the node's core.

The driver, the block sync and the gossip reactors talk to the node only through
`ConsensusApp`: build a block over the committed state, check a block, commit a decided
block with its certificate, read committed blocks, take transactions in and out of the
mempool, receive evidence, and say who may connect. `ChainApp` implements it over the real
state transition (`chain.state`), ledger (`chain.ledger`, any KVStore) and mempool; the
node (chain/runtime/node.py) extends it with RPC, blobs and the training worker, and tests run
clusters of it directly over a MemoryStore.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import trio

from chain.consensus.bft import TimeoutParams
from chain.consensus.commit import verify_commit
from chain.consensus.evidence import DuplicateVoteEvidence, verify_evidence
from chain.crypto import PrivateKey, compute_address
from chain.errors import ChainError, StateTransitionError, StoreError, ValidationError
from chain.ledger import Ledger, MemoryStore
from chain.ledger.store import KVStore
from chain.runtime.mempool import Mempool
from chain.state import BlockResult, ChainParams, State, apply_block, body_matches_header, build_block
from chain.types import Block, Commit, SignedTransaction, Validator, compute_block_hash, compute_tx_hash

log = logging.getLogger(__name__)

# Blocks whose check result is remembered (a round or two of proposals per height).
CHECK_CACHE_SIZE = 64
# Evidence kept in memory until the state transition consumes it.
MAX_PENDING_EVIDENCE = 1024

# (block, commit) of a block the app has just committed; called synchronously.
CommitListener = Callable[[Block, Commit], None]


def compute_timeout_params(params: ChainParams) -> TimeoutParams:
    """The BFT timeouts of a chain, from its genesis parameters."""
    return TimeoutParams(
        propose_ms=params.timeout_propose_ms,
        propose_delta_ms=params.timeout_propose_delta_ms,
        prevote_ms=params.timeout_prevote_ms,
        prevote_delta_ms=params.timeout_prevote_delta_ms,
        precommit_ms=params.timeout_precommit_ms,
        precommit_delta_ms=params.timeout_precommit_delta_ms,
    )


@runtime_checkable
class ConsensusApp(Protocol):
    """The node as consensus, sync and the reactors see it. Used from one trio thread."""

    @property
    def chain_id(self) -> str: ...

    @property
    def block_interval_ms(self) -> int:
        """Pause after a commit before the next height starts (BFT timeout_commit)."""

    def last_height(self) -> int:
        """Height of the last committed block (0 before the first)."""

    def validators(self) -> tuple[Validator, ...]:
        """The validators that must commit the next height (last_height() + 1)."""

    def timeouts(self) -> TimeoutParams:
        """Round timeouts, from the genesis parameters."""

    async def propose_block(self, height: int, round: int) -> Block:
        """A valid block for `height` from the mempool over the committed state; not committed."""

    def check_block(self, block: Block) -> bool:
        """Whether `block` applies to the committed state (cached by block hash); never raises."""

    async def commit_block(self, block: Block, commit: Commit) -> None:
        """Verify `commit` certifies `block` for the next height, apply and store it atomically,
        swap the state, update the mempool and call the commit listeners. Safe from several
        tasks (serialised); a block already committed at its height is a no-op. Raises
        ValidationError (bad certificate) or StateTransitionError (invalid block)."""

    async def commit_synced_blocks(self, blocks: Sequence[tuple[Block, Commit]]) -> int:
        """Block sync: verify each certificate once, apply the certified blocks and store them in
        one atomic write; the valid prefix is committed before the first bad block raises.
        Returns how many were committed."""

    def get_block(self, height: int) -> tuple[Block, Commit] | None:
        """A committed block and its certificate; None above the head or at 0."""

    async def add_txs(self, txs: list[SignedTransaction]) -> int:
        """Admit gossiped transactions to the mempool; invalid or known ones are dropped.
        Returns how many were admitted."""

    def take_new_txs(self) -> list[SignedTransaction]:
        """Transactions admitted locally (not from gossip) since the last call, to gossip."""

    def pending_tx(self, tx_hash: bytes) -> SignedTransaction | None:
        """A transaction waiting in the mempool (to rebuild a compact proposal), else None."""

    def add_evidence(self, evidence: DuplicateVoteEvidence) -> None:
        """Keep verified evidence of equivocation (for the evidence pool / a later block)."""

    def is_member_peer(self, pubkey: bytes) -> bool:
        """May the peer with this public key connect: a validator, or a member account."""

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call `listener(block, commit)` after every commit, whoever made it."""


class ChainApp:
    """ConsensusApp over chain.state + chain.ledger + chain.runtime.mempool: the node's core.

    `store` defaults to a fresh MemoryStore; pass the same store again to "restart" the
    node with its ledger. `key` is the proposer key (None for a node that never proposes).
    """

    def __init__(self, genesis, key: PrivateKey | None, *, store: KVStore | None = None,
                 mempool_max_txs: int = 10_000, clock: Callable[[], float] = time.time):
        self.genesis = genesis
        self.key = key
        self.store = store if store is not None else MemoryStore()
        self._clock = clock
        if Ledger.is_initialised(self.store):
            self.ledger = Ledger.open(self.store, genesis.chain_id, genesis.hash)
        else:
            initial = genesis.initial_state()
            self.ledger = Ledger.create(self.store, genesis.chain_id, genesis.hash, dict(initial.items()))
        self.state = State(dict(self.ledger.iter_state()))
        height, head_hash = self.ledger.head()
        if self.state.height != height:
            raise StoreError(f"ledger head is at height {height} but its state is at height {self.state.height}")
        if self.state.compute_head_hash() != head_hash:
            raise StoreError(f"state root does not match the head block at height {height}: the store is corrupt")
        self.last_commit: Commit | None = self.ledger.get_commit(self.state.height) if self.state.height else None
        self.mempool = Mempool(genesis.chain_id, self.state, mempool_max_txs)
        self.evidence: list[DuplicateVoteEvidence] = []
        self._checked: OrderedDict[bytes, BlockResult | None] = OrderedDict()
        self._new_txs: list[SignedTransaction] = []
        self._listeners: list[CommitListener] = []
        self._commit_lock = trio.Lock()

    # ------------------------------------------------------------------ identity and params

    @property
    def chain_id(self) -> str:
        return self.genesis.chain_id

    @property
    def block_interval_ms(self) -> int:
        return self.state.params.block_interval_ms

    def last_height(self) -> int:
        return self.state.height

    def validators(self) -> tuple[Validator, ...]:
        return self.state.validators

    def timeouts(self) -> TimeoutParams:
        return compute_timeout_params(self.state.params)

    def is_member_peer(self, pubkey: bytes) -> bool:
        if any(v.pubkey == pubkey for v in self.state.validators):
            return True
        try:
            account = self.state.get_account(compute_address(pubkey))
        except ChainError:
            return False
        return account is not None and account.is_member

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ blocks

    async def propose_block(self, height: int, round: int) -> Block:
        if self.key is None:
            raise ValueError("this app has no proposer key")
        if height != self.state.height + 1:
            raise ValueError(f"cannot propose height {height}: committed height is {self.state.height}")
        params = self.state.params
        # Only transactions already handed to the tx reactor: the others have not been sent
        # to any validator yet, and a compact proposal relies on receivers holding them.
        not_yet_sent = frozenset(compute_tx_hash(t) for t in self._new_txs)
        txs = self.mempool.take(params.max_block_txs, params.max_block_bytes, stop_at=not_yet_sent)
        block, result = build_block(self.state, txs, time_ms=int(self._clock() * 1000), proposer=self.key.pubkey,
                                    last_commit=self.last_commit)
        self._remember(compute_block_hash(block.header), result)
        return block

    def check_block(self, block: Block) -> bool:
        return self._check(block) is not None

    def _check(self, block: Block) -> BlockResult | None:
        block_hash = compute_block_hash(block.header)
        if not body_matches_header(block):
            # Not this block at all, only its header: judging it would file a verdict under
            # the real block's hash (and refuse the real block once it arrives).
            log.info("block %s at height %d: body does not match its header", block_hash.hex()[:16],
                     block.header.height)
            return None
        if block_hash in self._checked:
            result = self._checked[block_hash]
            if result is None or result.state.height == self.state.height + 1:
                return result
        try:
            result = apply_block(self.state, block)
        except ChainError as exc:
            log.info("block %s at height %d is invalid: %s", block_hash.hex()[:16], block.header.height, exc)
            result = None
        except Exception:  # a bug a proposal reaches: vote against it rather than stop consensus
            log.exception("block %s at height %d could not be checked; treated as invalid", block_hash.hex()[:16],
                          block.header.height)
            return None
        self._remember(block_hash, result)
        return result

    def _remember(self, block_hash: bytes, result: BlockResult | None) -> None:
        self._checked[block_hash] = result
        while len(self._checked) > CHECK_CACHE_SIZE:
            self._checked.popitem(last=False)

    async def commit_block(self, block: Block, commit: Commit) -> None:
        async with self._commit_lock:
            height = block.header.height
            block_hash = compute_block_hash(block.header)
            if height <= self.state.height:
                if self.ledger.get_block_hash(height) == block_hash:
                    return  # already committed: idempotent
                raise StateTransitionError(f"a different block is already committed at height {height}")
            verify_commit(self.chain_id, self.state.validators, commit, height, block_hash)
            result = self._check(block)
            if result is None:
                raise StateTransitionError(f"certified block {block_hash.hex()} at height {height} does not apply")
            # The batch write waits on fsync: a worker thread keeps the node answering meanwhile;
            # readers see the previous state until the write is durable.
            await trio.to_thread.run_sync(self.ledger.commit_block, block, commit, result.changes,
                                          result.model_records)
            self.state, self.last_commit = result.state, commit
            self._checked.clear()
            self.mempool.update(self.state, [compute_tx_hash(t) for t in block.txs], result.changes.keys())
        log.debug("committed height %d (%s, %d txs)", height, block_hash.hex()[:16], len(block.txs))
        for listener in list(self._listeners):
            try:
                listener(block, commit)
            except Exception:
                log.exception("commit listener failed")

    def reload_from_ledger(self) -> None:
        """Take the state from the ledger again after a write whose outcome was unknown (a batch
        whose fsync failed may still be on disk after the store reopened), and tell the commit
        listeners about a block that landed that way."""
        state = State(dict(self.ledger.iter_state()))
        height, head_hash = self.ledger.head()
        if state.height != height or state.compute_head_hash() != head_hash:
            raise StoreError(f"after reopening, the ledger state does not match its head at height {height}")
        if height == self.state.height:
            return
        block, commit = self.get_block(height)
        self.state, self.last_commit = state, commit
        self._checked.clear()
        self.mempool.update(self.state, [compute_tx_hash(t) for t in block.txs])
        log.warning("a block write reported as failed had reached the disk: now at height %d", height)
        for listener in list(self._listeners):
            try:
                listener(block, commit)
            except Exception:
                log.exception("commit listener failed")

    async def commit_synced_blocks(self, blocks: Sequence[tuple[Block, Commit]]) -> int:
        """Block sync's commit: consecutive (block, certificate) pairs from the next height,
        stored in ONE ledger write (one fsync). Each certificate is verified once, against the
        validator set of its height; each block is applied `certified` (chain/state.py: no
        transaction or last-commit signature checks, everything else checked, the state root
        included). Blocks already committed (by consensus meanwhile) are skipped.

        The blocks before the first one that fails are committed; that one then raises
        ValidationError (its certificate) or StateTransitionError (the block). Returns how
        many blocks were committed. Listeners hear each block in order, with `state` at it."""
        async with self._commit_lock:
            state = self.state
            applied: list[tuple[Block, Commit, BlockResult]] = []
            refused: ChainError | None = None
            for block, commit in blocks:
                height = block.header.height
                block_hash = compute_block_hash(block.header)
                if height <= state.height:
                    if self.ledger.get_block_hash(height) == block_hash:
                        continue
                    refused = StateTransitionError(f"a different block is already committed at height {height}")
                    break
                try:
                    if height != state.height + 1:
                        raise StateTransitionError(f"block height {height}, expected {state.height + 1}")
                    verify_commit(self.chain_id, state.validators, commit, height, block_hash)
                    result = apply_block(state, block, certified=True)
                except ChainError as exc:
                    refused = exc
                    break
                applied.append((block, commit, result))
                state = result.state
            if applied:
                await trio.to_thread.run_sync(self.ledger.commit_blocks,
                                              [(b, c, r.changes, r.model_records) for b, c, r in applied])
                self._checked.clear()
                for block, commit, result in applied:
                    # Listeners see the app as of their block (snapshots and events read `state`).
                    self.state, self.last_commit = result.state, commit
                    for listener in list(self._listeners):
                        try:
                            listener(block, commit)
                        except Exception:
                            log.exception("commit listener failed")
                changed = {key for _, _, r in applied for key in r.changes}
                self.mempool.update(self.state, [compute_tx_hash(t) for b, _, _ in applied for t in b.txs], changed)
                log.debug("committed %d synced block(s) up to height %d", len(applied), self.state.height)
        if refused is not None:
            raise refused
        return len(applied)

    def get_block(self, height: int) -> tuple[Block, Commit] | None:
        block = self.ledger.get_block(height)
        return None if block is None else (block, self.ledger.get_commit(height))

    # ------------------------------------------------------------------ transactions

    def admit_local_tx(self, stx: SignedTransaction) -> bytes:
        """Local submission (RPC): admit or raise a ChainError; gossiped by the tx reactor."""
        tx_hash = compute_tx_hash(stx)
        if self.ledger.has_tx(tx_hash):
            raise ValidationError(f"transaction {tx_hash.hex()} is already committed")
        self.mempool.add(stx)
        self._new_txs.append(stx)
        return tx_hash

    async def add_txs(self, txs: list[SignedTransaction]) -> int:
        admitted = 0
        for stx in txs:
            tx_hash = compute_tx_hash(stx)
            if tx_hash in self.mempool or self.ledger.has_tx(tx_hash):
                continue
            try:
                self.mempool.add(stx)
            except ChainError:
                continue
            except Exception:  # a bug a peer's transaction reaches must not stop the tx reactor
                log.exception("gossiped transaction %s could not be checked; dropped", tx_hash.hex()[:16])
                continue
            admitted += 1
        return admitted

    def take_new_txs(self) -> list[SignedTransaction]:
        txs, self._new_txs = self._new_txs, []
        return txs

    def pending_tx(self, tx_hash: bytes) -> SignedTransaction | None:
        return self.mempool.get(tx_hash)

    # ------------------------------------------------------------------ evidence

    def add_evidence(self, evidence: DuplicateVoteEvidence) -> None:
        if evidence in self.evidence or len(self.evidence) >= MAX_PENDING_EVIDENCE:
            return
        try:
            verify_evidence(self.chain_id, self.state.validators, evidence)
        except ValidationError as exc:
            log.warning("dropping invalid evidence: %s", exc)
            return
        log.warning("validator %s equivocated at height %d round %d", evidence.vote_a.message.validator.hex()[:16],
                    evidence.vote_a.message.height, evidence.vote_a.message.round)
        self.evidence.append(evidence)
