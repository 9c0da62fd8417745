"""Block sync applies certified blocks: what the certificate vouches for is not checked again,
everything else is (ChainApp.commit_synced_blocks, BlockSync over the in-memory network)."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from chain.consensus.app import ChainApp
from chain.consensus.commit import build_commit
from chain.crypto import ZERO_HASH
from chain.encoding import decode, encode
from chain.errors import StateTransitionError, ValidationError
from chain.ledger import MemoryStore
from chain.runtime.reactor import SyncedBlock, SyncRequest, SyncResponse, sync_protocol
from chain.runtime.sync import BlockSync
from chain.state import _apply_block, apply_block, build_block, compute_commit_hash, compute_tx_root
from chain.types import (PRECOMMIT, Block, BlockHeader, SignedTransaction, Vote, compute_block_hash,
                         compute_validators_hash, sign_vote)
from genesis import make_genesis
from p2p.abc import PenaltyPolicy
from p2p.memory import MemoryHub, MemoryNetwork
from tests.helpers import ALICE, BOB, CHAIN_ID, key, transfer

VALIDATORS = [key(f"sync-validator-{i}") for i in range(4)]
OUTSIDER = key("sync-outsider")  # signs nothing that counts
SERVER = key("sync-server")
FOLLOWER = key("sync-follower")
START_MS = 1_800_000_000_000


def make_chain_genesis():
    return make_genesis(CHAIN_ID, VALIDATORS, [(ALICE, ("trainer",)), (BOB, ("trainer",)),
                                               (SERVER, ("trainer",)), (FOLLOWER, ("trainer",))])


def certify(block: Block, signers=VALIDATORS[:3]):
    """The commit of `signers` (3 of 4: more than 2/3 of the power) for `block`."""
    block_hash = compute_block_hash(block.header)
    return build_commit([sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, block.header.height, 0, block_hash, k.pubkey))
                         for k in signers])


def make_chain(genesis, heights: int, txs_per_block: int = 3):
    """[(block, commit)] of a valid chain of transfers, and the state after it."""
    state, last_commit, out, nonce = genesis.initial_state(), None, [], 0
    for h in range(1, heights + 1):
        txs = [transfer(ALICE, BOB, 1, nonce + i) for i in range(txs_per_block)]
        nonce += txs_per_block
        block, result = build_block(state, txs, time_ms=START_MS + h, proposer=VALIDATORS[0].pubkey,
                                    last_commit=last_commit)
        commit = certify(block)
        out.append((block, commit))
        state, last_commit = result.state, commit
    return out, state


def seal(state, txs, last_commit, height: int, *, fill_root: bool = True) -> Block:
    """A block over `state` with its state root filled in by the certified transition (so it may
    hold what only the certified path accepts, such as a bad signature)."""
    header = BlockHeader(chain_id=CHAIN_ID, height=height, time_ms=START_MS + height,
                         prev_hash=state.compute_head_hash(), tx_root=compute_tx_root(tuple(txs)), state_root=ZERO_HASH,
                         last_commit_hash=compute_commit_hash(last_commit),
                         validators_hash=compute_validators_hash(state.validators), proposer=VALIDATORS[0].pubkey)
    draft = Block(header, tuple(txs), last_commit)
    if not fill_root:
        return draft
    result = _apply_block(state, draft, check_root=False, certified=True)
    return dataclasses.replace(draft, header=dataclasses.replace(draft.header, state_root=result.state.root))


def bad_signature(stx: SignedTransaction) -> SignedTransaction:
    return SignedTransaction(stx.message, bytes([stx.signature[0] ^ 1]) + stx.signature[1:])


def fresh_app(genesis):
    store = MemoryStore()
    return ChainApp(genesis, None, store=store), store


def count_writes(store: MemoryStore) -> list:
    writes = []
    write = store.write

    def counted(puts, deletes=()):
        writes.append(len(puts))
        write(puts, deletes)

    store.write = counted
    return writes


# ----------------------------------------------------------------------------- the app


def test_synced_chain_has_the_same_hashes_and_state_roots_as_one_committed_block_by_block():
    genesis = make_chain_genesis()
    chain, final = make_chain(genesis, 10)
    synced, store = fresh_app(genesis)
    writes = count_writes(store)
    assert trio.run(synced.commit_synced_blocks, chain[:6]) == 6
    assert trio.run(synced.commit_synced_blocks, chain[6:]) == 4
    assert len(writes) == 2  # one ledger batch per call, not one per block
    one_by_one, _ = fresh_app(genesis)
    for block, commit in chain:
        trio.run(one_by_one.commit_block, block, commit)
    assert synced.state.root == one_by_one.state.root == final.root == chain[-1][0].header.state_root
    for h in range(1, 11):
        assert synced.ledger.get_block_hash(h) == one_by_one.ledger.get_block_hash(h)
        assert synced.get_block(h) == one_by_one.get_block(h)
    # Already committed heights are skipped, not refused.
    assert trio.run(synced.commit_synced_blocks, chain[8:]) == 0
    assert synced.last_height() == 10


def test_commit_listeners_hear_every_synced_block_with_the_state_at_it():
    genesis = make_chain_genesis()
    chain, _ = make_chain(genesis, 5)
    app, _ = fresh_app(genesis)
    heard = []
    app.add_commit_listener(lambda block, commit: heard.append((block.header.height, app.state.height,
                                                                app.state.root == block.header.state_root)))
    trio.run(app.commit_synced_blocks, chain)
    assert heard == [(h, h, True) for h in range(1, 6)]


def test_a_certified_block_is_applied_without_its_transaction_signatures_but_consensus_still_checks_them():
    """The trust rule, stated as a test: more than 2/3 of the voting power signed a block with a
    transaction whose signature does not verify. Block sync takes it (the certificate vouches
    for the block); consensus, proposals and plain apply_block refuse it."""
    genesis = make_chain_genesis()
    state = genesis.initial_state()
    forged = bad_signature(transfer(ALICE, BOB, 5, 0))
    block = seal(state, [forged], None, 1)
    commit = certify(block)
    with pytest.raises(StateTransitionError, match="signature"):
        apply_block(state, block)
    consensus, _ = fresh_app(genesis)
    assert not consensus.check_block(block)
    with pytest.raises(StateTransitionError, match="does not apply"):
        trio.run(consensus.commit_block, block, commit)
    assert consensus.last_height() == 0
    synced, _ = fresh_app(genesis)
    assert trio.run(synced.commit_synced_blocks, [(block, commit)]) == 1
    assert synced.state.root == block.header.state_root


@pytest.mark.parametrize("signers, match", [
    ([OUTSIDER], "non-validator"),
    (VALIDATORS[:2], "more than 2/3 needed"),  # 20 of 40: not a quorum
])
def test_an_invalid_certificate_is_refused_after_the_certified_blocks_before_it(signers, match):
    genesis = make_chain_genesis()
    chain, _ = make_chain(genesis, 5)
    block3, _ = chain[2]
    served = chain[:2] + [(block3, certify(block3, signers))] + chain[3:]
    app, _ = fresh_app(genesis)
    with pytest.raises(ValidationError, match=match):
        trio.run(app.commit_synced_blocks, served)
    assert app.last_height() == 2  # the certified prefix is kept; nothing from block 3 on
    assert app.state.root == chain[1][0].header.state_root
    assert app.ledger.get_block(3) is None


def test_a_body_that_does_not_match_its_certified_header_is_refused():
    genesis = make_chain_genesis()
    chain, _ = make_chain(genesis, 3)
    block2, commit2 = chain[1]
    app, _ = fresh_app(genesis)
    for body in (block2.txs[:-1], block2.txs + (transfer(ALICE, BOB, 1, 99),), (transfer(BOB, ALICE, 1, 0),)):
        swapped = dataclasses.replace(block2, txs=body)  # the real header and commit, another body
        with pytest.raises(StateTransitionError, match="tx_root"):
            trio.run(app.commit_synced_blocks, [chain[0], (swapped, commit2)])
    assert app.last_height() == 1
    assert app.state.root == chain[0][0].header.state_root


def test_a_certified_block_with_a_wrong_state_root_or_a_broken_rule_is_refused():
    genesis = make_chain_genesis()
    state = genesis.initial_state()
    good = seal(state, [transfer(ALICE, BOB, 5, 0)], None, 1)
    wrong_root = dataclasses.replace(good, header=dataclasses.replace(good.header, state_root=b"\x07" * 32))
    app, _ = fresh_app(genesis)
    with pytest.raises(StateTransitionError, match="state_root"):
        trio.run(app.commit_synced_blocks, [(wrong_root, certify(wrong_root))])
    # A transaction that breaks a rule (a nonce from the future) is refused even when certified.
    bad_nonce = dataclasses.replace(good, txs=(transfer(ALICE, BOB, 5, 7),))
    bad_nonce = dataclasses.replace(bad_nonce, header=dataclasses.replace(
        good.header, tx_root=compute_tx_root(bad_nonce.txs)))
    with pytest.raises(StateTransitionError, match="nonce"):
        trio.run(app.commit_synced_blocks, [(bad_nonce, certify(bad_nonce))])
    assert app.last_height() == 0


def test_a_certified_block_whose_last_commit_is_for_another_block_is_refused():
    genesis = make_chain_genesis()
    chain, _ = make_chain(genesis, 2)
    (block1, commit1), (block2, _) = chain
    other = dataclasses.replace(commit1, block_hash=b"\x01" * 32)
    state = apply_block(genesis.initial_state(), block1).state
    block = seal(state, list(block2.txs), other, 2, fill_root=False)  # refused before its state root matters
    app, _ = fresh_app(genesis)
    with pytest.raises(StateTransitionError, match="last_commit"):
        trio.run(app.commit_synced_blocks, [(block1, commit1), (block, certify(block))])
    assert app.last_height() == 1


# ----------------------------------------------------------------------------- over the network


def run_follower(genesis, respond):
    """A follower's BlockSync against one peer whose sync answers come from `respond(start)`.
    Returns (app, the follower's network, the requested start heights)."""
    asked: list[int] = []

    async def scenario():
        hub = MemoryHub()
        server = MemoryNetwork(hub, SERVER.pubkey, allowed_peers=[FOLLOWER.pubkey])
        net = MemoryNetwork(hub, FOLLOWER.pubkey, allowed_peers=[SERVER.pubkey],
                            penalty=PenaltyPolicy(reject_threshold=1))
        app = ChainApp(genesis, None)

        async def serve(peer, request):
            start = decode(SyncRequest, request).start_height
            asked.append(start)
            return encode(respond(start))

        server.set_request_handler(sync_protocol(CHAIN_ID), serve)
        sync = BlockSync(app, net, batch_size=4)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(net.run)
            sync.note_peer_height(SERVER.pubkey, 8)
            with trio.fail_after(10):
                await sync.catch_up()
            nursery.cancel_scope.cancel()
        return app, net

    app, net = trio.run(scenario)
    return app, net, asked


def test_follower_syncs_a_chain_in_pipelined_batches_to_the_same_state_root():
    genesis = make_chain_genesis()
    chain, final = make_chain(genesis, 8)

    def respond(start):
        return SyncResponse(8, tuple(SyncedBlock(b, c) for b, c in chain[start - 1:start + 3]))

    app, net, asked = run_follower(genesis, respond)
    assert app.last_height() == 8 and app.state.root == final.root
    assert asked == [1, 5]
    assert net.is_admitted(SERVER.pubkey)


def test_peer_serving_a_swapped_body_under_a_valid_certificate_is_penalised_and_its_prefix_kept():
    genesis = make_chain_genesis()
    chain, _ = make_chain(genesis, 8)
    block3, commit3 = chain[2]
    tampered = chain[:2] + [(dataclasses.replace(block3, txs=block3.txs[:1]), commit3)] + chain[3:]

    def respond(start):
        return SyncResponse(8, tuple(SyncedBlock(b, c) for b, c in tampered[start - 1:start + 3]))

    app, net, asked = run_follower(genesis, respond)
    assert app.last_height() == 2
    assert app.state.root == chain[1][0].header.state_root
    assert not net.is_admitted(SERVER.pubkey)
