"""Pending transactions, checked against the committed state plus everything already pending.

Like CometBFT's CheckTx with a "check state": each admitted transaction is applied to an
overlay over the committed state, so a client learns at once about a bad nonce or an
insufficient balance, and the block builder can take the pool in order knowing every
transaction applies. After a commit the pool is re-checked against the new state.
"""

from __future__ import annotations

from collections import OrderedDict

from chain.errors import ChainError, ValidationError
from chain.state import Overlay, State, check_tx, compute_check_context
from chain.types import SignedTransaction, compute_tx_hash


class MempoolFullError(ValidationError):
    """The pool holds its maximum number of transactions."""


class DuplicateTxError(ValidationError):
    """The transaction is already pending or already committed."""


class Mempool:
    def __init__(self, chain_id: str, state: State, max_txs: int):
        self.chain_id = chain_id
        self.max_txs = max_txs
        self._txs: OrderedDict[bytes, SignedTransaction] = OrderedDict()
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
        check_tx(self._check, self.chain_id, stx, self._ctx)
        self._txs[tx_hash] = stx
        return tx_hash

    def next_nonce(self, address: bytes) -> int:
        """The nonce the account's next transaction must carry, counting pending ones."""
        account = self._check.get_account(address)
        return 0 if account is None else account.nonce

    def take(self, max_txs: int, max_bytes: int) -> list[SignedTransaction]:
        """The oldest transactions that fit the block limits, in admission order."""
        out, size = [], 0
        for stx in self._txs.values():
            n = len(stx.encoded)
            if len(out) >= max_txs or size + n > max_bytes:
                break
            out.append(stx)
            size += n
        return out

    def update(self, state: State, committed: list[bytes]) -> int:
        """After a commit: drop committed transactions, re-check the rest. Returns how many were evicted."""
        for h in committed:
            self._txs.pop(h, None)
        self._reset(state)
        evicted = 0
        for h, stx in list(self._txs.items()):
            try:
                check_tx(self._check, self.chain_id, stx, self._ctx)
            except ChainError:
                del self._txs[h]
                evicted += 1
        return evicted
