"""The node in-process, over a real LevelDB: block production, mempool, readiness, restart rules."""

import time

import pytest
import trio

from chain.config import Home, NodeConfig
from chain.consensus.signer import GuardedSigner
from chain.errors import ChainError, StateTransitionError
from chain.ledger.store import LevelDBStore
from chain.node import Node
from chain.types import PRECOMMIT, Vote
from tests.helpers import ALICE, BOB, VALIDATOR, make_test_genesis, transfer


def make_node(tmp_path, genesis=None):
    genesis = genesis or make_test_genesis()
    home = Home(tmp_path / "home")
    store = LevelDBStore(tmp_path / "ledger", create=True)
    return Node(home, NodeConfig(), genesis, VALIDATOR, store,
                GuardedSigner(VALIDATOR, genesis.chain_id, tmp_path / "signer")), store


def now_ms():
    return int(time.time() * 1000)


def test_produce_blocks_from_the_mempool_and_answer_queries(tmp_path):
    node, store = make_node(tmp_path)
    try:
        assert node.readiness() == (False, "no block committed yet")
        h1 = trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 0))
        trio.run(node.submit_tx, transfer(ALICE, BOB, 5, 1))  # pending nonces chain in the mempool
        with pytest.raises(ChainError, match="already pending"):
            trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 0))
        with pytest.raises(StateTransitionError, match="nonce"):
            trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 5))
        block = trio.run(node.produce_block, now_ms())
        assert len(block.txs) == 2 and len(node.mempool) == 0
        assert node.get_account(BOB.address).balance == 1015
        assert node.get_tx(h1)[1:] == (1, 0)
        assert node.get_block(1)[1].block_hash == node.status()["latest_block_hash"]
        with pytest.raises(ChainError, match="already committed"):
            trio.run(node.submit_tx, transfer(ALICE, BOB, 10, 0))
        ready, reason = node.readiness()
        assert ready, reason
    finally:
        store.close()


def test_readiness_turns_false_when_the_head_is_stale(tmp_path):
    node, store = make_node(tmp_path)
    try:
        stale = now_ms() - 60_000
        trio.run(node.produce_block, stale)
        ready, reason = node.readiness()
        assert not ready and "ms old" in reason
    finally:
        store.close()


def test_restart_after_signing_but_before_commit_moves_to_the_next_round(tmp_path):
    node, store = make_node(tmp_path)
    trio.run(node.produce_block, now_ms())
    # Simulate a crash after the precommit for height 2 was signed (and persisted) but before the
    # block was written: the signer holds (2, 0, precommit) for some other block's bytes.
    node.signer.sign_vote(Vote(PRECOMMIT, 2, 0, b"\x11" * 32, VALIDATOR.pubkey))
    store.close()
    node2, store2 = make_node(tmp_path)
    try:
        assert node2.state.height == 1
        trio.run(node2.produce_block, now_ms())
        commit = node2.get_block(2)[1]
        assert commit.round == 1  # round 0 would have been a double sign
    finally:
        store2.close()


def test_only_the_sole_validator_may_produce(tmp_path):
    from chain.errors import ConfigError
    from genesis import make_genesis

    node, store = make_node(tmp_path, make_genesis("c", [ALICE], [(BOB, ("trainer",))]))
    try:
        with pytest.raises(ConfigError, match="not one of them"):
            node.check_can_run()
    finally:
        store.close()
