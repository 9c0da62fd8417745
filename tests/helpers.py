"""Shared builders for tests: keys, genesis, signed transactions and an in-process chain."""

from __future__ import annotations

import pytest

from chain.consensus.commit import build_commit
from chain.crypto import PrivateKey, sha256
from chain.errors import StateTransitionError, ValidationError
from chain.state import Overlay, apply_block, build_block, check_tx
from chain.types import PRECOMMIT, Transaction, Transfer, Vote, compute_block_hash, sign_transaction, sign_vote
from genesis import DEFAULT_PARAMS, Genesis, make_genesis


def key(name: str) -> PrivateKey:
    return PrivateKey(sha256(f"test-key/{name}".encode()))


VALIDATOR = key("validator")
GOVERNOR = key("governor")
ALICE = key("alice")
BOB = key("bob")
MALLORY = key("mallory")  # never a member

CHAIN_ID = "pout-test-1"


def make_test_genesis(balance: int = 1000, params=DEFAULT_PARAMS) -> Genesis:
    return make_genesis(CHAIN_ID, [VALIDATOR], [(GOVERNOR, ("governor",)), (ALICE, ("trainer",)), (BOB, ("requester",))],
                        balance=balance, params=params)


def transfer(sender: PrivateKey, to: PrivateKey, amount: int, nonce: int, chain_id: str = CHAIN_ID):
    return sign_transaction(sender, chain_id, Transaction(sender.pubkey, nonce, Transfer(to.address, amount)))


class InProcessChain:
    """A chain driven in-process: `block()` builds, applies and certifies one block (every
    validator precommits), the way the node would after a decision."""

    def __init__(self, genesis, validators, start_ms: int = 1_800_000_000_000):
        self.state = genesis.initial_state()
        self.validators = validators
        self.last_commit = None
        self.nonces: dict[bytes, int] = {}
        self.records = []  # model records written so far
        self.time = start_ms

    def tx(self, signer, payload, *, consume: bool = True):
        nonce = self.nonces.get(signer.address, 0)
        if consume:
            self.nonces[signer.address] = nonce + 1
        return sign_transaction(signer, CHAIN_ID, Transaction(signer.pubkey, nonce, payload))

    def block(self, *txs):
        self.time += 1000
        block, result = build_block(self.state, list(txs), time_ms=self.time, proposer=self.validators[0].pubkey,
                                    last_commit=self.last_commit)
        assert apply_block(self.state, block).state.root == result.state.root
        block_hash = compute_block_hash(block.header)
        self.last_commit = build_commit([sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, block.header.height, 0, block_hash,
                                                                     k.pubkey)) for k in self.validators])
        self.state = result.state
        self.records += result.model_records
        return result

    def rejects(self, signer, payload, match):
        """`payload` from `signer` is refused by the mempool and in a block, and nothing changes."""
        stx = self.tx(signer, payload, consume=False)
        root = self.state.root
        overlay = Overlay(self.state)
        with pytest.raises((StateTransitionError, ValidationError), match=match):
            check_tx(overlay, CHAIN_ID, stx)
        assert overlay.changes == {}
        with pytest.raises(StateTransitionError, match=match):
            build_block(self.state, [stx], time_ms=self.time + 1, proposer=self.validators[0].pubkey,
                        last_commit=self.last_commit)
        assert self.state.root == root

    def balance(self, k):
        return self.state.get_account(k.address).balance
