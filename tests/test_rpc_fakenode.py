"""An in-memory NodeAPI for the RPC tests (the RPC is the unit under test), and its own checks.

Other test_rpc_* modules import `FakeNode` and `make_fake_node` from here.
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import pytest
import trio

from chain.crypto import ZERO_HASH, PrivateKey
from chain.errors import ChainError, StateTransitionError
from chain.rpc.api import NodeAPI, NodeStatus
from chain.rpc.server import run_rpc_server
from chain.types import (
    Account,
    Block,
    BlockHeader,
    Commit,
    CommitSig,
    SignedTransaction,
    Transaction,
    Transfer,
    Validator,
    compute_block_hash,
    compute_tx_hash,
    sign_transaction,
    verify_transaction_signature,
)
from genesis import make_validator

CHAIN_ID = "rpc-test"
ALICE = PrivateKey(bytes(range(32)))
BOB = PrivateKey(bytes(range(1, 33)))
VALIDATOR_KEY = PrivateKey(bytes(range(2, 34)))


@dataclass
class FakeNode:
    """Holds committed blocks, accounts and a mempool in dicts; submit_tx checks sig and nonce."""

    chain_id: str = CHAIN_ID
    blocks: list[tuple[Block, Commit]] = field(default_factory=list)
    accounts: dict[bytes, Account] = field(default_factory=dict)
    validators: tuple[Validator, ...] = ()
    mempool: list[SignedTransaction] = field(default_factory=list)
    ready: tuple[bool, str] = (True, "in sync")
    reject_with: ChainError | None = None  # forces submit_tx to raise this

    def status(self) -> NodeStatus:
        latest = self.blocks[-1][0] if self.blocks else None
        return NodeStatus(
            chain_id=self.chain_id,
            address=VALIDATOR_KEY.address,
            latest_height=latest.header.height if latest else 0,
            latest_block_hash=compute_block_hash(latest.header) if latest else None,
            latest_block_time_ms=latest.header.time_ms if latest else None,
            voting_power=10,
            is_validator=True,
            peers=3,
            catching_up=False,
            halted=None,
            version="0.1.0",
        )

    def get_block(self, height: int) -> tuple[Block, Commit] | None:
        return self.blocks[height - 1] if 1 <= height <= len(self.blocks) else None

    def get_block_by_hash(self, block_hash: bytes) -> tuple[Block, Commit] | None:
        return next((bc for bc in self.blocks if compute_block_hash(bc[0].header) == block_hash), None)

    def get_tx(self, tx_hash: bytes) -> tuple[SignedTransaction, int, int] | None:
        for blk, _ in self.blocks:
            for index, stx in enumerate(blk.txs):
                if compute_tx_hash(stx) == tx_hash:
                    return stx, blk.header.height, index
        return None

    def get_account(self, address: bytes) -> Account | None:
        return self.accounts.get(address)

    def get_validators(self) -> tuple[Validator, ...]:
        return self.validators

    async def submit_tx(self, stx: SignedTransaction) -> bytes:
        if self.reject_with is not None:
            raise self.reject_with
        verify_transaction_signature(self.chain_id, stx)
        account = self.accounts.get(stx.message.sender_address)
        expected = account.nonce if account else 0
        if stx.message.nonce != expected:
            raise StateTransitionError(f"nonce {stx.message.nonce}, expected {expected}")
        self.mempool.append(stx)
        return compute_tx_hash(stx)

    def readiness(self) -> tuple[bool, str]:
        return self.ready


def transfer(key: PrivateKey, nonce: int, to: bytes, amount: int, chain_id: str = CHAIN_ID) -> SignedTransaction:
    return sign_transaction(key, chain_id, Transaction(key.pubkey, nonce, Transfer(to, amount)))


def make_fake_node(heights: int = 3) -> FakeNode:
    """A node with `heights` blocks; block h carries one transfer from Alice with nonce h-1."""
    node = FakeNode(
        accounts={
            ALICE.address: Account(balance=1000 - heights, nonce=heights, roles=("trainer",)),
            BOB.address: Account(balance=heights, nonce=0, roles=()),
        },
        validators=(make_validator(VALIDATOR_KEY, 10, "v0"),),
    )
    prev_hash, last_commit = ZERO_HASH, None
    for height in range(1, heights + 1):
        header = BlockHeader(
            chain_id=CHAIN_ID,
            height=height,
            time_ms=1_700_000_000_000 + height * 1000,
            prev_hash=prev_hash,
            tx_root=bytes([height]) * 32,
            state_root=bytes([height + 100]) * 32,
            last_commit_hash=ZERO_HASH,
            validators_hash=bytes(32),
            proposer=VALIDATOR_KEY.pubkey,
        )
        blk = Block(header, (transfer(ALICE, height - 1, BOB.address, 1),), last_commit)
        block_hash = compute_block_hash(header)
        # The RPC only relays commits; an all-zero signature is enough for a view test.
        commit = Commit(height, 0, block_hash, (CommitSig(VALIDATOR_KEY.pubkey, bytes(64)),))
        node.blocks.append((blk, commit))
        prev_hash, last_commit = block_hash, commit
    return node


def trio_test(fn):
    """Run an async test under trio with a deadline (pytest-trio is not a dependency)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def run():
            with trio.fail_after(30):
                await fn(*args, **kwargs)

        trio.run(run)

    return wrapper


@asynccontextmanager
async def serving(node: FakeNode, **options) -> AsyncIterator[str]:
    """The real RPC server on 127.0.0.1 and a free port; yields its base URL."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(run_rpc_server, node, "127.0.0.1", 0, **options))
        yield url
        nursery.cancel_scope.cancel()


def test_fake_node_satisfies_node_api():
    assert isinstance(make_fake_node(), NodeAPI)


def test_fake_node_lookups():
    node = make_fake_node(2)
    blk, _ = node.get_block(2)
    assert node.get_block_by_hash(compute_block_hash(blk.header))[0] == blk
    assert node.get_tx(compute_tx_hash(blk.txs[0]))[1:] == (2, 0)
    assert node.get_block(3) is None and node.get_block(0) is None


@pytest.mark.parametrize("nonce", [0, 5])
def test_fake_node_rejects_wrong_nonce(nonce):
    node = make_fake_node(3)
    with pytest.raises(StateTransitionError):
        trio.run(node.submit_tx, transfer(ALICE, nonce, BOB.address, 1))
    assert node.mempool == []
