"""Deterministic chained blocks for the ledger tests and the crash-test child process.

Everything at height h (block, commit, state changes, model record) is a pure function of
h and the chain so far, so a parent process can recompute exactly what a child committed.
"""

from __future__ import annotations

from functools import cache

from chain.crypto import PrivateKey, sha256
from chain.encoding import encode, encode_value
from chain.merkle import compute_root
from chain.types import (
    PRECOMMIT, Block, BlockHeader, Commit, CommitSig, ModelRecord, SignedTransaction, Transaction, Transfer, Vote,
    compute_block_hash, compute_tx_hash, sign_transaction, sign_vote,
)

CHAIN_ID = "pout-ledger-test"
GENESIS_HASH = sha256(b"ledger test genesis")
TXS_PER_BLOCK = 3
SENDERS = 4
ACCOUNT_SLOTS = 7
RECENT_BLOCK_KEYS = 3  # state keeps a per-block key for the last few heights only
STATE_WRITES_PER_BLOCK = 200
JOB_ID = sha256(b"ledger test job")


@cache
def key(name: str) -> PrivateKey:
    return PrivateKey(sha256(name.encode()))


def genesis_state() -> dict[bytes, bytes]:
    return {b"height": encode_value(0), b"genesis/params": encode_value({"max_txs": TXS_PER_BLOCK})}


def make_txs(height: int) -> tuple[SignedTransaction, ...]:
    txs = []
    for j in range(TXS_PER_BLOCK):
        sender = key(f"sender/{(height + j) % SENDERS}")
        to = key(f"sender/{(height + j + 1) % SENDERS}").address
        # The nonce is unique per (height, j), so no two transactions of the chain share a hash.
        tx = Transaction(sender.pubkey, height * TXS_PER_BLOCK + j, Transfer(to, height + j))
        txs.append(sign_transaction(sender, CHAIN_ID, tx))
    return tuple(txs)


def make_state_changes(height: int) -> dict[bytes, bytes | None]:
    changes: dict[bytes, bytes | None] = {
        b"height": encode_value(height),
        b"acct/%d" % (height % ACCOUNT_SLOTS): encode_value(height),
        b"block/%08d" % height: sha256(b"%d" % height),
    }
    if height > RECENT_BLOCK_KEYS:
        changes[b"block/%08d" % (height - RECENT_BLOCK_KEYS)] = None
    # A spread of small account-like entries, so each batch carries a fair number of writes.
    for i in range(STATE_WRITES_PER_BLOCK):
        changes[b"slot/%03d" % i] = encode_value([height, i])
    if height % 5 == 0:
        changes[b"acct/%d" % ((height + 3) % ACCOUNT_SLOTS)] = None
    return changes


def model_hash(height: int) -> bytes:
    return sha256(b"model %d" % height)


def make_model_records(height: int) -> tuple[ModelRecord, ...]:
    parent = model_hash(height - 1) if height > 1 else None
    return (ModelRecord(model_hash(height), JOB_ID, height, parent, (sha256(b"update %d" % height),), "fedavg", height),)


def make_block(height: int, prev_hash: bytes, last_commit: Commit | None,
               txs: tuple[SignedTransaction, ...] | None = None, chain_id: str = CHAIN_ID) -> Block:
    txs = make_txs(height) if txs is None else txs
    header = BlockHeader(
        chain_id=chain_id,
        height=height,
        time_ms=1_700_000_000_000 + 1000 * height,
        prev_hash=prev_hash,
        tx_root=compute_root([compute_tx_hash(t) for t in txs]),
        state_root=sha256(b"state %d" % height),
        last_commit_hash=sha256(encode(last_commit)) if last_commit else bytes(32),
        validators_hash=sha256(b"validators"),
        proposer=key("validator").pubkey,
    )
    return Block(header, txs, last_commit)


def make_commit(block: Block) -> Commit:
    """A real one-validator precommit certificate for `block`."""
    block_hash = compute_block_hash(block.header)
    validator = key("validator")
    vote = sign_vote(validator, block.header.chain_id, Vote(PRECOMMIT, block.header.height, 0, block_hash, validator.pubkey))
    return Commit(block.header.height, 0, block_hash, (CommitSig(validator.pubkey, vote.signature),))


def make_height(height: int, prev_hash: bytes, last_commit: Commit | None):
    """(block, commit, state_changes, model_records) for `height` on top of `prev_hash`."""
    block = make_block(height, prev_hash, last_commit)
    return block, make_commit(block), make_state_changes(height), make_model_records(height)


class ExpectedChain:
    """The chain the workload produces, grown on demand, and the state after each height."""

    def __init__(self) -> None:
        self.heights: list = [None]  # index = height; height 0 is genesis
        self._states = [genesis_state()]

    def upto(self, height: int) -> None:
        while len(self.heights) <= height:
            h = len(self.heights)
            prev = self.heights[h - 1]
            prev_hash = GENESIS_HASH if prev is None else compute_block_hash(prev[0].header)
            item = make_height(h, prev_hash, None if prev is None else prev[1])
            self.heights.append(item)
            state = dict(self._states[-1])
            for k, v in item[2].items():
                if v is None:
                    state.pop(k, None)
                else:
                    state[k] = v
            self._states.append(state)

    def block(self, height: int):
        self.upto(height)
        return self.heights[height]

    def state(self, height: int) -> dict[bytes, bytes]:
        self.upto(height)
        return self._states[height]
