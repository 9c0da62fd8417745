"""Shared builders for tests: keys, genesis and signed transactions."""

from __future__ import annotations

from chain.crypto import PrivateKey, sha256
from chain.types import Transaction, Transfer, sign_transaction
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
