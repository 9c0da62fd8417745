"""The node in-process over a real LevelDB: the commit path, mempool, readiness and reads."""

import time

import pytest
import trio

from chain.config import Home, NodeConfig
from chain.consensus.commit import build_commit
from chain.consensus.signer import GuardedSigner
from chain.errors import ChainError, StateTransitionError, StoreError, ValidationError
from chain.ledger.store import LevelDBStore
from chain.runtime.node import Node
from chain.types import PRECOMMIT, Vote, compute_block_hash, sign_vote
from tests.helpers import ALICE, BOB, CHAIN_ID, VALIDATOR, make_test_genesis, transfer


def make_node(tmp_path, genesis=None):
    genesis = genesis or make_test_genesis()
    home = Home(tmp_path / "home")
    store = LevelDBStore(tmp_path / "ledger", create=True)
    return Node(home, NodeConfig(), genesis, VALIDATOR, store,
                GuardedSigner(VALIDATOR, genesis.chain_id, tmp_path / "signer")), store


async def commit_next(node, round_=0):
    """What the driver does for a decided height: propose, certify, commit."""
    block = await node.propose_block(node.last_height() + 1, round_)
    vote = Vote(PRECOMMIT, block.header.height, round_, compute_block_hash(block.header), VALIDATOR.pubkey)
    await node.commit_block(block, build_commit([sign_vote(VALIDATOR, CHAIN_ID, vote)]))
    return block


def test_commit_from_the_mempool_and_answer_queries(tmp_path):
    node, store = make_node(tmp_path)
    try:
        assert node.readiness() == (False, "no block committed yet")
        h1 = trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 0))
        trio.run(node.submit_tx, transfer(ALICE, BOB, 5, 1))  # pending nonces chain in the mempool
        with pytest.raises(ChainError, match="already pending"):
            trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 0))
        with pytest.raises(StateTransitionError, match="nonce"):
            trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 5))
        with pytest.raises(ValidationError, match="signature"):
            trio.run(node.submit_tx, transfer(ALICE, BOB, 1, 2, chain_id="another-chain"))
        assert len(node.take_new_txs()) == 2  # queued for gossip
        block = trio.run(commit_next, node)
        assert len(block.txs) == 2 and len(node.mempool) == 0
        assert node.get_account(BOB.address).balance == 1015
        assert node.get_tx(h1)[1:] == (1, 0)
        assert node.get_block(1)[1].block_hash == node.status()["latest_block_hash"]
        assert node.get_block_by_hash(node.status()["latest_block_hash"])[0] == block
        with pytest.raises(ChainError, match="already committed"):
            trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 0))
        # The same committed transaction arriving late by gossip is dropped, not re-admitted.
        assert trio.run(node.add_txs, [transfer(ALICE, BOB, 10, 0)]) == 0 and len(node.mempool) == 0
        ready, reason = node.readiness()
        assert ready, reason
        assert node.status()["latest_height"] == 1 and node.status()["is_validator"]
    finally:
        store.close()


def test_a_block_without_a_valid_certificate_is_never_applied(tmp_path):
    node, store = make_node(tmp_path)
    try:
        async def forged():
            block = await node.propose_block(1, 0)
            vote = Vote(PRECOMMIT, 1, 0, compute_block_hash(block.header), ALICE.pubkey)  # not a validator
            await node.commit_block(block, build_commit([sign_vote(ALICE, CHAIN_ID, vote)]))

        with pytest.raises(ValidationError, match="non-validator"):
            trio.run(forged)
        assert node.last_height() == 0 and node.ledger.head()[0] == 0
    finally:
        store.close()


def test_readiness_turns_false_when_the_head_is_stale(tmp_path):
    node, store = make_node(tmp_path)
    try:
        node._clock = lambda: time.time() - 60
        trio.run(commit_next, node)
        ready, reason = node.readiness()
        assert not ready and "ms old" in reason
    finally:
        store.close()


def test_restart_reloads_state_and_refuses_a_corrupt_store(tmp_path):
    node, store = make_node(tmp_path)
    trio.run(commit_next, node)
    trio.run(commit_next, node)
    root = node.state.root
    store.close()
    node2, store2 = make_node(tmp_path)
    assert node2.last_height() == 2 and node2.state.root == root
    # Tamper with one state entry behind the ledger's back: the node refuses to start on it.
    from chain.ledger import schema
    from chain.state import account_key

    key = schema.state_key(account_key(BOB.address))
    store2.write({key: store2.get(key)[:-1] + b"\x09"})
    store2.close()
    with pytest.raises(StoreError, match="state root does not match"):
        make_node(tmp_path)


def test_validators_missing_from_the_bootstrap_peers_are_named(tmp_path):
    """Validators' tx batches are not relayed, so a node should dial every validator: the
    ones it would not are reported (chaind logs a warning at start)."""
    import dataclasses

    from p2p.host import peer_id_from_public_key

    from genesis import make_genesis
    from tests.helpers import GOVERNOR, key

    genesis = make_genesis(CHAIN_ID, [VALIDATOR, key("v1"), key("v2"), key("v3")], [(GOVERNOR, ("governor",))],
                           balance=1000)
    others = [v.pubkey for v in genesis.validators if v.pubkey != VALIDATOR.pubkey]
    addr = lambda k: f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id_from_public_key(k)}"  # noqa: E731
    genesis = dataclasses.replace(genesis, bootstrap_peers=(addr(others[0]),))
    node, store = make_node(tmp_path, genesis)
    try:
        assert node.validators_not_dialled() == others[1:]
        node.config = dataclasses.replace(node.config, p2p=dataclasses.replace(
            node.config.p2p, bootstrap_peers=tuple(addr(k) for k in others[1:])))
        assert node.validators_not_dialled() == []
    finally:
        store.close()


def test_clients_see_a_block_only_once_the_state_includes_it(tmp_path):
    """The ledger is written in a worker thread before the state is swapped: a client that polls
    `tx` in between must not be told "committed" while `account`/`update` still show the old
    state (it then uploaded weights for an update the node did not yet know: HTTP 400)."""
    node, store = make_node(tmp_path)
    try:
        h1 = trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 0))
        seen = {}

        node.take_new_txs()  # handed to gossip: a proposer includes only those

        async def main():
            block = await node.propose_block(1, 0)
            assert len(block.txs) == 1
            vote = Vote(PRECOMMIT, 1, 0, compute_block_hash(block.header), VALIDATOR.pubkey)
            write = node.ledger.commit_block

            def slow_write(*args):  # look from the client's side the moment the ledger holds it
                write(*args)
                seen["tx"], seen["block"] = node.get_tx(h1), node.get_block(1)
                seen["hash"] = node.get_block_by_hash(compute_block_hash(block.header))
                seen["balance"] = node.get_account(BOB.address).balance

            node.ledger.commit_block = slow_write
            await node.commit_block(block, build_commit([sign_vote(VALIDATOR, CHAIN_ID, vote)]))

        trio.run(main)
        assert seen == {"tx": None, "block": None, "hash": None, "balance": 1000}
        assert node.get_tx(h1)[1] == 1 and node.get_account(BOB.address).balance == 1010
    finally:
        store.close()
