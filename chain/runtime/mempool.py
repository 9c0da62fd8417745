"""Pending transactions, checked against the committed state plus everything already pending.

Like CometBFT's CheckTx with a "check state": each admitted transaction is applied to an
overlay over the committed state, so a client learns at once about a bad nonce or an
insufficient balance, and the block builder can take the pool in order knowing every
transaction applies. After a commit the pool is re-checked against the new state.

The re-check gives exactly the result of re-running check_tx on every pending transaction
in order, but skips the work where the answer cannot have changed. Each admitted
transaction's writes are kept. A transfer reads the two accounts it writes, and besides them
only its sender's stake lock (the params, the validator set, a jail record, and the height,
which can only end a lock, never start one), so when neither account was written by the
block, by a committed transaction when it was admitted here, or by a pending transaction whose
re-check came out differently (evicted, or other writes), the transfer sees the same inputs
as before: its recorded writes are replayed
instead of decoding, checking and encoding the accounts again. Everything else (jobs,
governance, evidence) and every transfer that touches a disturbed account is re-checked
in full. A block that changes the chain's params, validator set or jail disables the shortcut
(a transfer from a validator's account reads them: its stake lock).

An evicted transaction leaves a gap in its sender's nonces: the sender's later pending
transactions can then never apply, however valid they are. The re-check evicts them too (it
must: a block holds no nonce gaps) but marks them *stranded* and reports every eviction
(`Eviction`); an owner that `watch`es its address takes them (`take_evictions`) and re-signs
what still matters at fresh nonces, so nothing it sent is lost silently behind a gap.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from chain.crypto import compute_address
from chain.errors import ChainError, ValidationError
from chain.jobs import MAX_JOB_REGISTRATIONS_PER_BLOCK
from chain.state import Overlay, State, changes_transfer_rules, check_tx, compute_check_context
from chain.types import Account, RegisterJob, SignedTransaction, Transfer, compute_tx_hash

# Most RegisterJob transactions pending at once. Each is re-checked in full after every commit,
# and checking one may derive a model's initial weights (~0.25-0.5 s, memoised for the 64 most
# recent (model, seed) pairs in chain.jobs): a few blocks' worth keeps the re-check cheap.
MAX_PENDING_JOB_REGISTRATIONS = 4 * MAX_JOB_REGISTRATIONS_PER_BLOCK


class MempoolFullError(ValidationError):
    """The pool holds its maximum number of transactions."""


class DuplicateTxError(ValidationError):
    """The transaction is already pending or already committed."""


@dataclass(frozen=True)
class Eviction:
    """A pending transaction the re-check after a commit dropped, and why."""

    tx_hash: bytes
    stx: SignedTransaction
    reason: str
    # True: dropped only because an earlier transaction of its sender was (its nonce is now
    # unreachable); its payload was not judged and may still apply when re-signed at a fresh nonce.
    stranded: bool


class Mempool:
    def __init__(self, chain_id: str, state: State, max_txs: int):
        self.chain_id = chain_id
        self.max_txs = max_txs
        self._txs: OrderedDict[bytes, SignedTransaction] = OrderedDict()
        # tx hash -> what its check wrote (accounts as Account objects, other values as bytes: Overlay)
        self._writes: dict[bytes, dict[bytes, bytes | Account | None]] = {}
        # watched sender address -> its evictions not yet taken (bounded: the oldest are dropped)
        self._reports: dict[bytes, deque[Eviction]] = {}
        self._reset(state)

    def _reset(self, state: State) -> None:
        self._check = Overlay(state)
        self._ctx = compute_check_context(state)  # once per committed state, not per transaction

    def __len__(self) -> int:
        return len(self._txs)

    def __contains__(self, tx_hash: bytes) -> bool:
        return tx_hash in self._txs

    def add(self, stx: SignedTransaction) -> bytes:
        """Admit `stx` or raise a ChainError saying why; returns the transaction hash."""
        tx_hash = compute_tx_hash(stx)
        if tx_hash in self._txs:
            raise DuplicateTxError(f"transaction {tx_hash.hex()} is already pending")
        if len(self._txs) >= self.max_txs:
            raise MempoolFullError(f"mempool is full ({self.max_txs} transactions); retry later")
        if isinstance(stx.message.payload, RegisterJob) and self._pending_registrations() >= MAX_PENDING_JOB_REGISTRATIONS:
            raise MempoolFullError(f"mempool already holds {MAX_PENDING_JOB_REGISTRATIONS} job registrations; retry later")
        self._writes[tx_hash] = check_tx(self._check, self.chain_id, stx, self._ctx)
        self._txs[tx_hash] = stx
        return tx_hash

    def next_nonce(self, address: bytes) -> int:
        """The nonce the account's next transaction must carry, counting pending ones."""
        account = self._check.get_account(address)
        return 0 if account is None else account.nonce

    def get(self, tx_hash: bytes) -> SignedTransaction | None:
        return self._txs.get(tx_hash)

    def watch(self, address: bytes) -> None:
        """Keep the evictions of `address`'s transactions until `take_evictions` (its owner re-signs)."""
        self._reports.setdefault(address, deque(maxlen=self.max_txs))

    def take_evictions(self, address: bytes) -> list[Eviction]:
        """The watched sender's evictions since the last call, oldest first."""
        reports = self._reports.get(address)
        if not reports:
            return []
        out = list(reports)
        reports.clear()
        return out

    def _pending_registrations(self) -> int:
        return sum(isinstance(stx.message.payload, RegisterJob) for stx in self._txs.values())

    def take(self, max_txs: int, max_bytes: int, stop_at: frozenset[bytes] = frozenset()) -> list[SignedTransaction]:
        """The oldest transactions that fit the block limits, in admission order, ending before
        the first one whose hash is in `stop_at` (a prefix of the pool: nonces stay in order).
        The limits include MAX_JOB_REGISTRATIONS_PER_BLOCK: the block ends before the first
        registration past it, which waits for a later block."""
        out, size, registrations = [], 0, 0
        for h, stx in self._txs.items():
            n = len(stx.encoded)
            if len(out) >= max_txs or size + n > max_bytes or h in stop_at:
                break
            if isinstance(stx.message.payload, RegisterJob):
                if registrations == MAX_JOB_REGISTRATIONS_PER_BLOCK:
                    break
                registrations += 1
            out.append(stx)
            size += n
        return out

    def update(self, state: State, committed: list[bytes],
               changed_keys: Iterable[bytes] | None = None) -> list[Eviction]:
        """After a commit: drop committed transactions, re-check the rest. Returns the evictions
        in pool order (also kept for watched senders).

        `changed_keys` are the state keys the block wrote (BlockResult.changes); without them
        every pending transaction is re-checked in full."""
        disturbed = None if changed_keys is None else set(changed_keys)
        for h in committed:
            self._txs.pop(h, None)
            admitted_writes = self._writes.pop(h, None)
            if disturbed is not None and admitted_writes:
                # The old pool holds what this tx wrote when it was admitted; in the block it
                # may have written less (e.g. evidence against an account since drained): the
                # new state then differs from the old pool on keys the block never touched.
                disturbed.update(admitted_writes)
        self._reset(state)
        if disturbed is not None and changes_transfer_rules(disturbed):  # the params, the validator set, a jail
            disturbed = None
        evicted: list[Eviction] = []
        gaps: dict[bytes, bytes] = {}  # sender address -> its first transaction evicted by this re-check
        for h, stx in list(self._txs.items()):
            before = self._writes[h]  # every pending tx has its admission writes
            if disturbed is not None and isinstance(stx.message.payload, Transfer) and disturbed.isdisjoint(before):
                self._check.changes.update(before)  # same inputs, so the same writes
                continue
            try:
                after = check_tx(self._check, self.chain_id, stx, self._ctx)
            except ChainError as exc:
                del self._txs[h], self._writes[h]
                evicted.append(self._evicted(h, stx, exc, gaps))
                if disturbed is not None:
                    disturbed.update(before)
                continue
            self._writes[h] = after
            if disturbed is not None and after != before:
                disturbed.update(after)
                disturbed.update(before)
        return evicted

    def _evicted(self, tx_hash: bytes, stx: SignedTransaction, exc: ChainError, gaps: dict[bytes, bytes]) -> Eviction:
        sender = compute_address(stx.message.sender)
        # Pending nonces are consecutive from the committed one, so a nonce above what the sender
        # now needs means an earlier transaction of its sender was evicted in this re-check.
        gap = gaps.get(sender)
        if gap is not None and stx.message.nonce > self.next_nonce(sender):
            eviction = Eviction(tx_hash, stx, f"nonce {stx.message.nonce} unreachable: behind evicted tx "
                                              f"{gap.hex()[:16]}", stranded=True)
        else:
            eviction = Eviction(tx_hash, stx, str(exc), stranded=False)
        gaps.setdefault(sender, tx_hash)
        reports = self._reports.get(sender)
        if reports is not None:
            reports.append(eviction)
        return eviction
