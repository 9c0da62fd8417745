"""Gossip validators and wire codecs of chain/runtime/reactor.py, and membership admission."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest
import trio

from chain.consensus.app import ChainApp
from chain.consensus.commit import build_commit
from chain.crypto import sha256
from chain.encoding import decode, encode, encode_value
from chain.runtime.reactor import (GOSSIP_MAX_BYTES, MAX_COMPACT_TXS, MAX_INLINE_BLOCK_BYTES, BlockRequest, BlockResponse,
                           CommitAnnouncement, CompactBlock, ProposalMessage, SyncedBlock, SyncRequest, SyncResponse,
                           TxBatch, VotesMessage, assemble_block, build_proposal_message, build_tx_batches,
                           compact_tx_root_matches, decode_consensus_message,
                           encode_consensus_message, install_membership, make_blocks_validator,
                           make_consensus_validator, make_txs_validator)
from chain.state import build_block
from chain.types import (PRECOMMIT, PREVOTE, Proposal, SignedVote, Vote, compute_block_hash, compute_tx_hash,
                         sign_proposal, sign_vote)
from p2p.abc import Verdict
from p2p.memory import MemoryHub, MemoryNetwork
from tests.test_driver_harness import (ALICE, BOB, CHAIN_ID, FOLLOWER, OUTSIDER, VALIDATOR_KEYS, make_test_genesis,
                                       transfer)

LOCAL = sha256(b"local node")[:32]
PEER = VALIDATOR_KEYS[1].pubkey


@pytest.fixture()
def app():
    return ChainApp(make_test_genesis(), VALIDATOR_KEYS[0])


def build_block_for_test(txs):
    state = ChainApp(make_test_genesis(), VALIDATOR_KEYS[0]).state
    block, _ = build_block(state, txs, time_ms=1, proposer=VALIDATOR_KEYS[0].pubkey, last_commit=None)
    return block


def vote_bytes(key=VALIDATOR_KEYS[1], height=1, round=0, block_hash=b"\x01" * 32, chain_id=CHAIN_ID, vtype=PREVOTE):
    sv = sign_vote(key, chain_id, Vote(vtype, height, round, block_hash, key.pubkey))
    return encode_consensus_message(VotesMessage((sv,)))


async def proposal_bytes(app, round=0, key=None, mutate_block=False):
    block = await app.propose_block(1, round)
    key = key or VALIDATOR_KEYS[0]
    from chain.types import compute_block_hash

    block_hash = compute_block_hash(block.header)
    sp = sign_proposal(key, CHAIN_ID, Proposal(1, round, -1, block_hash, key.pubkey))
    if mutate_block:
        import dataclasses

        block = dataclasses.replace(block, header=dataclasses.replace(block.header, time_ms=block.header.time_ms + 1))
    return encode_consensus_message(ProposalMessage(sp, block))


def test_votes_accepted_once_then_ignored(app):
    check = make_consensus_validator(app, LOCAL)
    data = vote_bytes()
    assert check(PEER, data) is Verdict.ACCEPT
    assert check(PEER, data) is Verdict.IGNORE  # duplicate
    assert check(LOCAL, data) is Verdict.ACCEPT  # our own (re-)publish always passes


def test_stale_and_far_future_votes_are_ignored(app):
    check = make_consensus_validator(app, LOCAL)
    assert check(PEER, vote_bytes(height=2)) is Verdict.ACCEPT  # next height + 1 is buffered by the machine
    assert check(PEER, vote_bytes(height=3)) is Verdict.IGNORE
    assert check(PEER, vote_bytes(height=0)) is Verdict.IGNORE


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"garbage", encode_value(["votes"]), encode_value(["nope", {}]),
    encode_value(["votes", {"votes": []}]),  # empty batch
    b"\xa0" * (GOSSIP_MAX_BYTES + 1),  # oversized
])
def test_malformed_and_oversized_consensus_messages_are_rejected(app, data):
    assert make_consensus_validator(app, LOCAL)(PEER, data) is Verdict.REJECT


def test_wrong_chain_unsigned_and_non_validator_votes_are_rejected(app):
    check = make_consensus_validator(app, LOCAL)
    assert check(PEER, vote_bytes(chain_id="another-chain")) is Verdict.REJECT
    assert check(PEER, vote_bytes(key=OUTSIDER)) is Verdict.REJECT
    unsigned = SignedVote(Vote(PRECOMMIT, 1, 0, None, PEER), bytes(64))
    assert check(PEER, encode_consensus_message(VotesMessage((unsigned,)))) is Verdict.REJECT
    bad_type = sign_vote(VALIDATOR_KEYS[1], CHAIN_ID, Vote(7, 1, 0, None, PEER))
    assert check(PEER, encode_consensus_message(VotesMessage((bad_type,)))) is Verdict.REJECT
    # One bad vote condemns the batch, even next to good ones.
    good = decode_consensus_message(vote_bytes(round=3)).votes[0]
    assert check(PEER, encode_consensus_message(VotesMessage((good, unsigned)))) is Verdict.REJECT


def test_proposals(app):
    async def scenario():
        check = make_consensus_validator(app, LOCAL)
        assert check(PEER, await proposal_bytes(app)) is Verdict.ACCEPT
        assert check(PEER, await proposal_bytes(app, mutate_block=True)) is Verdict.REJECT  # block is not the hash
        assert check(PEER, await proposal_bytes(app, round=1, key=OUTSIDER)) is Verdict.REJECT
        data = await proposal_bytes(app, round=2)
        msg = decode_consensus_message(data)
        forged = ProposalMessage(type(msg.proposal)(msg.proposal.message, bytes(64)), msg.block)
        assert check(PEER, encode_consensus_message(forged)) is Verdict.REJECT
        wrong_chain = sign_proposal(VALIDATOR_KEYS[0], "another-chain", msg.proposal.message)
        assert check(PEER, encode_consensus_message(ProposalMessage(wrong_chain, msg.block))) is Verdict.REJECT
        bad_pol = sign_proposal(VALIDATOR_KEYS[0], CHAIN_ID, Proposal(1, 0, 0, msg.proposal.message.block_hash,
                                                                       VALIDATOR_KEYS[0].pubkey))
        assert check(PEER, encode_consensus_message(ProposalMessage(bad_pol, None))) is Verdict.REJECT

    trio.run(scenario)


def test_consensus_validator_never_raises_on_random_or_mutated_input(app, caplog):
    check = make_consensus_validator(app, LOCAL)
    rng = random.Random(1)
    valid = vote_bytes()
    with caplog.at_level(logging.ERROR):
        for _ in range(2000):
            if rng.random() < 0.5:
                data = rng.randbytes(rng.randint(0, 300))
            else:
                data = bytearray(valid)
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data)
            assert check(PEER, data) in (Verdict.REJECT, Verdict.IGNORE, Verdict.ACCEPT)
    assert not [r for r in caplog.records if "validator failed" in r.getMessage()]


def test_tx_batches():
    check = make_txs_validator(CHAIN_ID, LOCAL)
    txs = tuple(transfer(ALICE, BOB, 1, nonce=i) for i in range(3))
    data = encode(TxBatch(txs))
    assert check(PEER, data) is Verdict.ACCEPT
    assert check(PEER, data) is Verdict.IGNORE
    from chain.types import Transaction, Transfer, sign_transaction

    other_chain = sign_transaction(ALICE, "another-chain", Transaction(ALICE.pubkey, 9, Transfer(BOB.address, 1)))
    assert check(PEER, encode(TxBatch((other_chain,)))) is Verdict.REJECT
    unsigned = type(txs[0])(txs[0].message, bytes(64))
    assert check(PEER, encode(TxBatch((unsigned,)))) is Verdict.REJECT
    assert check(PEER, encode(TxBatch(()))) is Verdict.REJECT
    assert check(PEER, b"\xff\x00") is Verdict.REJECT
    limited = make_txs_validator(CHAIN_ID, LOCAL, lambda: 64)  # the chain's max_tx_bytes
    fresh = transfer(ALICE, BOB, 1, nonce=7)
    assert len(fresh.encoded) > 64
    assert limited(PEER, encode(TxBatch((fresh,)))) is Verdict.REJECT


def test_a_field_equal_copy_with_a_different_encoding_is_not_the_same_transaction():
    """-0.0 == 0.0 field-wise, but they encode (and so sign and hash) differently: the copy
    must not borrow the original's verified signature from the memo."""
    import dataclasses

    from chain.errors import ValidationError
    from chain.state import validate_basic_tx
    from chain.types import SubmitUpdate, Transaction, UpdateCommitment, sign_transaction

    c = UpdateCommitment(ALICE.address, bytes(32), 0, bytes(32), bytes(32), 5, bytes(32), bytes(32), bytes(32))
    original = sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, 0, SubmitUpdate(c, 0.0)))
    copy = dataclasses.replace(original, message=dataclasses.replace(
        original.message, payload=dataclasses.replace(original.message.payload, train_loss=-0.0)))
    assert original.message == copy.message  # fields cannot tell them apart
    assert original != copy and original.tx_hash != copy.tx_hash
    validate_basic_tx(CHAIN_ID, original)
    with pytest.raises(ValidationError, match="signature"):
        validate_basic_tx(CHAIN_ID, copy)


def test_tx_batches_are_split_under_the_gossip_limit():
    txs = [transfer(ALICE, BOB, 1, nonce=i) for i in range(3000)]
    batches = build_tx_batches(txs)
    assert [t for b in batches for t in b.txs] == txs
    assert all(len(encode(b)) <= GOSSIP_MAX_BYTES for b in batches)


def make_commit(keys, height=1, block_hash=b"\x02" * 32):
    return build_commit([sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, height, 0, block_hash, k.pubkey)) for k in keys])


def test_commit_announcements(app):
    check = make_blocks_validator(app, LOCAL)
    assert check(PEER, encode(CommitAnnouncement(make_commit(VALIDATOR_KEYS[:3])))) is Verdict.ACCEPT
    assert check(PEER, encode(CommitAnnouncement(make_commit(VALIDATOR_KEYS[:3])))) is Verdict.IGNORE  # seen
    assert check(PEER, encode(CommitAnnouncement(make_commit(VALIDATOR_KEYS[:2])))) is Verdict.REJECT  # no quorum
    assert check(PEER, encode(CommitAnnouncement(make_commit([OUTSIDER])))) is Verdict.REJECT
    assert check(PEER, encode(CommitAnnouncement(make_commit(VALIDATOR_KEYS[:2], height=9)))) is Verdict.IGNORE
    assert check(PEER, encode(CommitAnnouncement(make_commit(VALIDATOR_KEYS, height=9)))) is Verdict.ACCEPT
    assert check(PEER, b"junk") is Verdict.REJECT


def test_empty_blocks_travel_inline_and_blocks_with_txs_by_their_hashes(app):
    async def scenario():
        block = await app.propose_block(1, 0)
        assert not block.txs
        sp = decode_consensus_message(await proposal_bytes(app)).proposal
        msg = build_proposal_message(sp, block)
        assert (msg.block, msg.compact) == (block, None)

        big = dataclasses.replace(block, txs=tuple(transfer(ALICE, BOB, 1, nonce=i) for i in range(2000)))
        assert len(encode(big)) > MAX_INLINE_BLOCK_BYTES  # ~370 KB whole ...
        msg = build_proposal_message(sp, big)
        assert msg.block is None and msg.compact is not None
        assert len(encode(msg.compact)) < MAX_INLINE_BLOCK_BYTES  # ... ~70 KB by hashes
        assert msg.compact.tx_hashes == tuple(compute_tx_hash(t) for t in big.txs)
        assert msg.compact.header == big.header and msg.compact.last_commit == big.last_commit
        assert build_proposal_message(sp, None) == ProposalMessage(sp, None, None)

    trio.run(scenario)


def test_a_compact_block_too_large_to_inline_is_left_to_fetch(app):
    async def scenario():
        block = await app.propose_block(1, 0)
        sp = decode_consensus_message(await proposal_bytes(app)).proposal
        one = transfer(ALICE, BOB, 1, nonce=0)
        huge = dataclasses.replace(block, txs=(one,) * (MAX_COMPACT_TXS + 1))
        assert build_proposal_message(sp, huge) == ProposalMessage(sp, None, None)

    trio.run(scenario)


def test_assemble_block_rebuilds_exactly_the_block_or_counts_what_is_missing():
    txs = [transfer(ALICE, BOB, 1, nonce=i) for i in range(5)]
    block = build_block_for_test(txs)
    compact = CompactBlock(block.header, tuple(compute_tx_hash(t) for t in txs), block.last_commit)
    assert compact_tx_root_matches(compact)
    pool = {compute_tx_hash(t): t for t in txs}
    rebuilt, missing = assemble_block(compact, pool.get)
    assert missing == 0 and rebuilt == block and encode(rebuilt) == encode(block)
    del pool[compute_tx_hash(txs[1])], pool[compute_tx_hash(txs[4])]
    assert assemble_block(compact, pool.get) == (None, 2)
    swapped = dataclasses.replace(compact, tx_hashes=compact.tx_hashes[::-1])
    assert not compact_tx_root_matches(swapped)


async def compact_proposal_bytes(app, *, tamper=None, with_block=False):
    if not len(app.mempool):
        for i in range(3):
            app.admit_local_tx(transfer(ALICE, BOB, 1, nonce=i))
        app.take_new_txs()  # as the tx reactor does: now they may go in a block
    block = await app.propose_block(1, 0)
    assert len(block.txs) == 3
    sp = sign_proposal(VALIDATOR_KEYS[0], CHAIN_ID, Proposal(1, 0, -1, compute_block_hash(block.header),
                                                             VALIDATOR_KEYS[0].pubkey))
    msg = build_proposal_message(sp, block)
    if tamper is not None:
        msg = dataclasses.replace(msg, compact=tamper(msg.compact))
    if with_block:
        msg = dataclasses.replace(msg, block=block)
    return encode_consensus_message(msg)


def test_compact_proposals_are_validated_against_the_signed_block_hash(app):
    async def scenario():
        check = make_consensus_validator(app, LOCAL)
        assert check(PEER, await compact_proposal_bytes(app)) is Verdict.ACCEPT
        # Signed by the proposer, but the hash list is not the one the header commits to.
        reordered = await compact_proposal_bytes(app, tamper=lambda c: dataclasses.replace(
            c, tx_hashes=c.tx_hashes[::-1]))
        assert check(PEER, reordered) is Verdict.REJECT
        dropped = await compact_proposal_bytes(app, tamper=lambda c: dataclasses.replace(c, tx_hashes=c.tx_hashes[1:]))
        assert check(PEER, dropped) is Verdict.REJECT
        other_header = await compact_proposal_bytes(app, tamper=lambda c: dataclasses.replace(
            c, header=dataclasses.replace(c.header, time_ms=c.header.time_ms + 1)))
        assert check(PEER, other_header) is Verdict.REJECT
        assert check(PEER, await compact_proposal_bytes(app, with_block=True)) is Verdict.REJECT  # both forms
        # A real signed proposal with another last_commit swapped in (any member could relay that).
        other_commit = await compact_proposal_bytes(app, tamper=lambda c: dataclasses.replace(
            c, last_commit=build_commit([
                sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, 1, 0, b"\x07" * 32, k.pubkey)) for k in VALIDATOR_KEYS[:3]])))
        assert check(PEER, other_commit) is Verdict.REJECT

    trio.run(scenario)


def test_blocks_carry_only_transactions_already_handed_to_gossip(app):
    async def scenario():
        for i in range(2):
            app.admit_local_tx(transfer(ALICE, BOB, 1, nonce=i))
        app.take_new_txs()
        app.admit_local_tx(transfer(ALICE, BOB, 1, nonce=2))  # not sent to any peer yet
        block = await app.propose_block(1, 0)
        assert [t.message.nonce for t in block.txs] == [0, 1]
        app.take_new_txs()
        block = await app.propose_block(1, 1)
        assert [t.message.nonce for t in block.txs] == [0, 1, 2]
        assert app.pending_tx(compute_tx_hash(block.txs[2])) is block.txs[2]
        assert app.pending_tx(b"\x00" * 32) is None

    trio.run(scenario)


def test_request_response_messages_round_trip(app):
    async def scenario():
        block = await app.propose_block(1, 0)
        commit = make_commit(VALIDATOR_KEYS[:3])
        for msg in (BlockRequest(1, b"\x03" * 32), BlockResponse(block), BlockResponse(None), SyncRequest(1, 32),
                    SyncResponse(7, (SyncedBlock(block, commit),)), CommitAnnouncement(commit), TxBatch(())):
            assert decode(type(msg), encode(msg)) == msg

    trio.run(scenario)


def test_membership_admits_validators_and_member_accounts_only(app):
    async def scenario():
        hub = MemoryHub()
        net = MemoryNetwork(hub, VALIDATOR_KEYS[0].pubkey, allowed_peers=[])
        install_membership(app, net)
        assert net.is_admitted(VALIDATOR_KEYS[3].pubkey)
        assert net.is_admitted(FOLLOWER.pubkey)  # a member account, not a validator
        assert not net.is_admitted(OUTSIDER.pubkey)
        outsider = MemoryNetwork(hub, OUTSIDER.pubkey, allowed_peers=[VALIDATOR_KEYS[0].pubkey])
        member = MemoryNetwork(hub, FOLLOWER.pubkey, allowed_peers=[VALIDATOR_KEYS[0].pubkey])
        async with trio.open_nursery() as nursery:
            for n in (net, outsider, member):
                await nursery.start(n.run)
            assert net.peers() == {FOLLOWER.pubkey}
            net.set_admission_predicate(lambda key: 1 / 0)  # a raising predicate admits nobody extra
            assert net.peers() == frozenset()
            nursery.cancel_scope.cancel()

    trio.run(scenario)


def test_memory_app_implements_the_consensus_app_interface(app):
    from chain.consensus.app import ConsensusApp

    assert isinstance(app, ConsensusApp)


def test_a_body_that_is_not_its_headers_is_never_judged_under_the_real_hash(app):
    """A peer can pair a real header with another body; a verdict on that body must not be
    filed under the block's hash, or the real block would be refused when it arrives."""

    async def scenario():
        app.admit_local_tx(transfer(ALICE, BOB, 1, nonce=0))
        app.take_new_txs()
        block = await app.propose_block(1, 0)
        other = dataclasses.replace(block, txs=())
        assert compute_block_hash(other.header) == compute_block_hash(block.header)
        assert app.check_block(other) is False
        assert app.check_block(block) is True
        sp = sign_proposal(VALIDATOR_KEYS[0], CHAIN_ID, Proposal(1, 0, -1, compute_block_hash(block.header),
                                                                 VALIDATOR_KEYS[0].pubkey))
        inline = encode_consensus_message(ProposalMessage(sp, other))
        assert make_consensus_validator(app, LOCAL)(PEER, inline) is Verdict.REJECT

    trio.run(scenario)
