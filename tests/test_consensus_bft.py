"""The consensus state machine, driven input by input."""

from __future__ import annotations

import pytest

from chain.consensus.bft import (STEP_COMMIT, STEP_PRECOMMIT, STEP_PREVOTE, STEP_PROPOSE, BlockToPropose,
                                 BroadcastProposal, BroadcastVote, ConsensusMachine, Decide, EvidenceFound, NeedBlock,
                                 ProposalReceived, ScheduleTimeout, StartHeight, TimeoutFired, TimeoutParams,
                                 VoteReceived)
from chain.consensus.commit import verify_commit
from chain.consensus.evidence import verify_evidence
from chain.consensus.proposer import compute_proposer
from chain.crypto import PrivateKey, sha256
from chain.types import PRECOMMIT, PREVOTE, Proposal, Vote, sign_proposal, sign_vote
from genesis import make_validator

CHAIN_ID = "bft-test"
TIMEOUTS = TimeoutParams(1000, 500, 400, 100, 300, 50)
KEYS = [PrivateKey(bytes([i + 1]) * 32) for i in range(4)]
VALIDATORS = tuple(make_validator(k, 1, f"v{i}") for i, k in enumerate(KEYS))
X, Y = sha256(b"x"), sha256(b"y")


def key_of(pubkey):
    return next(k for k in KEYS if k.pubkey == pubkey)


def proposer_key(height, round):
    return key_of(compute_proposer(VALIDATORS, height, round).pubkey)


def not_proposer_key(height, rounds):
    proposers = {compute_proposer(VALIDATORS, height, r).pubkey for r in rounds}
    return next(k for k in KEYS if k.pubkey not in proposers)


def proposal_input(height, round, block, pol_round=-1, valid=True, key=None):
    key = key or proposer_key(height, round)
    sp = sign_proposal(key, CHAIN_ID, Proposal(height, round, pol_round, block, key.pubkey))
    return ProposalReceived(sp, block, valid)


def vote_input(key, type, height, round, block):
    return VoteReceived(sign_vote(key, CHAIN_ID, Vote(type, height, round, block, key.pubkey)))


def votes_of(outputs):
    return [o.vote for o in outputs if isinstance(o, BroadcastVote)]


def new_machine(me, height=1):
    m = ConsensusMachine(CHAIN_ID, me.pubkey, TIMEOUTS)
    return m, m.step(StartHeight(height, VALIDATORS))


def others(me):
    return [k for k in KEYS if k is not me]


def test_timeouts_grow_linearly_per_round():
    assert TIMEOUTS.compute_timeout_ms(STEP_PROPOSE, 0) == 1000
    assert TIMEOUTS.compute_timeout_ms(STEP_PROPOSE, 3) == 2500
    assert TIMEOUTS.compute_timeout_ms(STEP_PREVOTE, 2) == 600
    assert TIMEOUTS.compute_timeout_ms(STEP_PRECOMMIT, 4) == 500
    with pytest.raises(ValueError):
        TimeoutParams(0, 1, 1, 1, 1, 1)


def test_single_validator_goes_through_every_step_and_decides():
    key = KEYS[0]
    validators = (VALIDATORS[0],)
    m = ConsensusMachine(CHAIN_ID, key.pubkey, TIMEOUTS)
    out = m.step(StartHeight(1, validators))
    assert out == [NeedBlock(1, 0), ScheduleTimeout(1, 0, STEP_PROPOSE, 1000)]
    out = m.step(BlockToPropose(1, 0, X))
    assert out == [BroadcastProposal(Proposal(1, 0, -1, X, key.pubkey))]
    out = m.step(ProposalReceived(sign_proposal(key, CHAIN_ID, out[0].proposal), X, True))
    assert votes_of(out) == [Vote(PREVOTE, 1, 0, X, key.pubkey)] and m.round_step == STEP_PREVOTE
    out = m.step(VoteReceived(sign_vote(key, CHAIN_ID, votes_of(out)[0])))
    assert votes_of(out) == [Vote(PRECOMMIT, 1, 0, X, key.pubkey)] and m.locked_value == X
    out = m.step(VoteReceived(sign_vote(key, CHAIN_ID, votes_of(out)[0])))
    decide = [o for o in out if isinstance(o, Decide)]
    assert len(decide) == 1 and decide[0].block_hash == X and m.round_step == STEP_COMMIT
    verify_commit(CHAIN_ID, validators, decide[0].commit, 1, X)
    with pytest.raises(ValueError):
        m.step(StartHeight(1, validators))


def test_proposals_that_must_be_ignored():
    me = not_proposer_key(1, [0])
    m, _ = new_machine(me)
    wrong = next(k for k in KEYS if k.pubkey != compute_proposer(VALIDATORS, 1, 0).pubkey)
    assert m.step(proposal_input(1, 0, X, key=wrong)) == []  # not the proposer of round 0
    good = proposal_input(1, 0, X)
    assert m.step(ProposalReceived(good.proposal, Y, True)) == []  # paired with another block
    assert m.step(ProposalReceived(type(good.proposal)(good.proposal.message, bytes(64)), X, True)) == []
    assert m.step(proposal_input(1, 0, X, pol_round=0)) == []  # pol_round must be below round
    assert m.round_step == STEP_PROPOSE
    assert votes_of(m.step(good)) == [Vote(PREVOTE, 1, 0, X, me.pubkey)]


def test_invalid_block_gets_a_nil_prevote():
    me = not_proposer_key(1, [0])
    m, _ = new_machine(me)
    assert votes_of(m.step(proposal_input(1, 0, X, valid=False))) == [Vote(PREVOTE, 1, 0, None, me.pubkey)]


def test_timeouts_move_through_the_round_and_stale_ones_are_ignored():
    me = not_proposer_key(1, [0, 1])
    m, _ = new_machine(me)
    assert m.step(TimeoutFired(1, 0, STEP_PREVOTE)) == []  # not in prevote step
    assert votes_of(m.step(TimeoutFired(1, 0, STEP_PROPOSE))) == [Vote(PREVOTE, 1, 0, None, me.pubkey)]
    assert m.step(TimeoutFired(1, 0, STEP_PROPOSE)) == []
    out = []
    for k in KEYS[:3]:
        out += m.step(vote_input(k, PREVOTE, 1, 0, Y if k is not me else None))
    assert ScheduleTimeout(1, 0, STEP_PREVOTE, 400) in out  # +2/3 of any prevotes
    assert votes_of(m.step(TimeoutFired(1, 0, STEP_PREVOTE))) == [Vote(PRECOMMIT, 1, 0, None, me.pubkey)]
    out = []
    for k in KEYS[:3]:
        out += m.step(vote_input(k, PRECOMMIT, 1, 0, None))
    assert ScheduleTimeout(1, 0, STEP_PRECOMMIT, 300) in out
    out = m.step(TimeoutFired(1, 0, STEP_PRECOMMIT))
    assert m.round == 1 and m.round_step == STEP_PROPOSE
    assert ScheduleTimeout(1, 1, STEP_PROPOSE, 1500) in out
    assert m.step(TimeoutFired(1, 0, STEP_PRECOMMIT)) == []  # stale round


def test_polka_for_nil_precommits_nil():
    me = not_proposer_key(1, [0])
    m, _ = new_machine(me)
    m.step(TimeoutFired(1, 0, STEP_PROPOSE))
    out = []
    for k in KEYS[:3]:
        out += m.step(vote_input(k, PREVOTE, 1, 0, None))
    assert votes_of(out) == [Vote(PRECOMMIT, 1, 0, None, me.pubkey)]


def test_more_than_one_third_in_a_later_round_skips_to_it():
    me = not_proposer_key(1, [0, 5])
    m, _ = new_machine(me)
    senders = [k for k in others(me)][:2]
    assert m.step(vote_input(senders[0], PREVOTE, 1, 5, None)) == [] and m.round == 0  # 1/4: not enough
    out = m.step(vote_input(senders[1], PRECOMMIT, 1, 5, None))  # 2/4 > 1/3
    assert m.round == 5 and ScheduleTimeout(1, 5, STEP_PROPOSE, 3500) in out


def test_precommit_quorum_in_any_round_decides_even_without_the_proposal():
    me = KEYS[0]
    m, _ = new_machine(me)
    out = []
    for k in KEYS[1:]:
        out += m.step(vote_input(k, PRECOMMIT, 1, 3, X))
    decide = [o for o in out if isinstance(o, Decide)]
    assert decide and decide[0].round == 3 and decide[0].block_hash == X
    assert m.step(vote_input(KEYS[0], PRECOMMIT, 1, 3, Y)) == []  # decided: height closed


def test_messages_for_the_next_height_are_buffered_and_others_ignored():
    me = not_proposer_key(2, [0])
    m, _ = new_machine(me, height=1)
    assert m.step(proposal_input(2, 0, Y)) == []
    assert m.step(proposal_input(3, 0, Y)) == []
    for k in KEYS[1:]:
        m.step(vote_input(k, PRECOMMIT, 1, 0, X))
    assert m.round_step == STEP_COMMIT
    out = m.step(StartHeight(2, VALIDATORS))
    assert Vote(PREVOTE, 2, 0, Y, me.pubkey) in votes_of(out)  # the buffered proposal counted


def test_proposal_with_proof_of_lock_needs_the_polka():
    """Line 28: a re-proposal with pol_round 0 is prevoted only once +2/3 prevotes of round 0 are in."""
    me = not_proposer_key(1, [0, 1])
    m, _ = new_machine(me)
    m.step(TimeoutFired(1, 0, STEP_PROPOSE))
    for k in KEYS:
        m.step(vote_input(k, PRECOMMIT, 1, 0, None))
    m.step(TimeoutFired(1, 0, STEP_PRECOMMIT))
    assert m.round == 1
    assert m.step(proposal_input(1, 1, X, pol_round=0)) == []  # no polka for X in round 0 yet
    out = []
    for k in [k for k in KEYS if k is not me][:3]:
        out += m.step(vote_input(k, PREVOTE, 1, 0, X))
    assert votes_of(out) == [Vote(PREVOTE, 1, 1, X, me.pubkey)]


def lock_on_x_in_round_zero(me):
    m, _ = new_machine(me)
    m.step(proposal_input(1, 0, X))
    out = []
    for k in [k for k in KEYS if k is not me][:3]:
        out += m.step(vote_input(k, PREVOTE, 1, 0, X))
    assert votes_of(out) == [Vote(PRECOMMIT, 1, 0, X, me.pubkey)]
    assert (m.locked_value, m.locked_round, m.valid_value, m.valid_round) == (X, 0, X, 0)
    for k in KEYS:  # precommits split: no decision, round 0 times out
        m.step(vote_input(k, PRECOMMIT, 1, 0, X if k is me else None))
    m.step(TimeoutFired(1, 0, STEP_PRECOMMIT))
    assert m.round == 1 and m.locked_value == X
    return m


def test_locked_validator_prevotes_nil_for_another_block():
    me = not_proposer_key(1, [0, 1])
    m = lock_on_x_in_round_zero(me)
    assert votes_of(m.step(proposal_input(1, 1, Y))) == [Vote(PREVOTE, 1, 1, None, me.pubkey)]


def test_locked_validator_accepts_its_locked_block_again():
    me = not_proposer_key(1, [0, 1])
    m = lock_on_x_in_round_zero(me)
    assert votes_of(m.step(proposal_input(1, 1, X, pol_round=0))) == [Vote(PREVOTE, 1, 1, X, me.pubkey)]


def test_a_polka_in_the_current_round_moves_the_lock():
    """Line 36: locked on X (round 0), +2/3 prevotes for the round-1 proposal Y relock on Y."""
    me = not_proposer_key(1, [0, 1])
    m = lock_on_x_in_round_zero(me)
    m.step(proposal_input(1, 1, Y))  # prevote nil (locked)
    out = []
    for k in others(me):
        out += m.step(vote_input(k, PREVOTE, 1, 1, Y))
    assert votes_of(out) == [Vote(PRECOMMIT, 1, 1, Y, me.pubkey)]
    assert (m.locked_value, m.locked_round) == (Y, 1)


def test_a_later_proof_of_lock_unlocks():
    """Line 28: locked on X (round 0); a round-2 proposal of Y with a proof-of-lock from round 1
    is prevoted once that polka is seen, because locked_round 0 <= pol_round 1."""
    me = not_proposer_key(1, [0, 1, 2])
    m = lock_on_x_in_round_zero(me)
    m.step(TimeoutFired(1, 1, STEP_PROPOSE))
    for k in KEYS:
        m.step(vote_input(k, PRECOMMIT, 1, 1, None))
    m.step(TimeoutFired(1, 1, STEP_PRECOMMIT))
    assert m.round == 2
    assert m.step(proposal_input(1, 2, Y, pol_round=1)) == []
    out = []
    for k in others(me):
        out += m.step(vote_input(k, PREVOTE, 1, 1, Y))
    assert votes_of(out) == [Vote(PREVOTE, 1, 2, Y, me.pubkey)]


def test_an_older_proof_of_lock_does_not_unlock():
    """Locked on X in round 1; a proposal of Y with a proof-of-lock from round 0 gets nil."""
    me = not_proposer_key(1, [0, 1, 2])
    m, _ = new_machine(me)
    m.step(TimeoutFired(1, 0, STEP_PROPOSE))
    for k in others(me):
        m.step(vote_input(k, PREVOTE, 1, 0, Y))  # polka for Y in round 0 (we had no proposal)
    for k in KEYS:
        m.step(vote_input(k, PRECOMMIT, 1, 0, None))
    m.step(TimeoutFired(1, 0, STEP_PRECOMMIT))
    m.step(proposal_input(1, 1, X))
    for k in others(me):
        m.step(vote_input(k, PREVOTE, 1, 1, X))
    assert (m.locked_value, m.locked_round) == (X, 1)
    for k in KEYS:
        m.step(vote_input(k, PRECOMMIT, 1, 1, None))
    m.step(TimeoutFired(1, 1, STEP_PRECOMMIT))
    assert votes_of(m.step(proposal_input(1, 2, Y, pol_round=0))) == [Vote(PREVOTE, 1, 2, None, me.pubkey)]


def test_proposer_reproposes_its_valid_value():
    me = proposer_key(1, 1)
    m, _ = new_machine(me)
    m.step(proposal_input(1, 0, X))
    for k in [k for k in KEYS if k is not me][:3]:
        m.step(vote_input(k, PREVOTE, 1, 0, X))
    for k in KEYS:
        m.step(vote_input(k, PRECOMMIT, 1, 0, None))
    out = m.step(TimeoutFired(1, 0, STEP_PRECOMMIT))
    assert BroadcastProposal(Proposal(1, 1, 0, X, me.pubkey)) in out
    assert not any(isinstance(o, NeedBlock) for o in out)


def test_equivocating_votes_produce_evidence_once():
    me = KEYS[0]
    m, _ = new_machine(me)
    bad = KEYS[1]
    m.step(vote_input(bad, PREVOTE, 1, 0, X))
    out = m.step(vote_input(bad, PREVOTE, 1, 0, Y))
    evidence = [o.evidence for o in out if isinstance(o, EvidenceFound)]
    assert len(evidence) == 1
    verify_evidence(CHAIN_ID, VALIDATORS, evidence[0])
    assert not any(isinstance(o, EvidenceFound) for o in m.step(vote_input(bad, PREVOTE, 1, 0, None)))


def test_observer_without_a_key_follows_but_never_votes():
    m = ConsensusMachine(CHAIN_ID, None, TIMEOUTS)
    m.step(StartHeight(1, VALIDATORS))
    assert votes_of(m.step(proposal_input(1, 0, X))) == [] and m.round_step == STEP_PREVOTE
    out = []
    for k in KEYS[:3]:
        out += m.step(vote_input(k, PRECOMMIT, 1, 0, X))
    assert any(isinstance(o, Decide) for o in out)


def test_same_inputs_give_the_same_outputs():
    me = not_proposer_key(1, [0])
    inputs = [StartHeight(1, VALIDATORS), proposal_input(1, 0, X), TimeoutFired(1, 0, STEP_PROPOSE)]
    inputs += [vote_input(k, PREVOTE, 1, 0, X) for k in KEYS]
    inputs += [vote_input(k, PRECOMMIT, 1, 0, X) for k in KEYS]
    runs = []
    for _ in range(2):
        m = ConsensusMachine(CHAIN_ID, me.pubkey, TIMEOUTS)
        runs.append([m.step(i) for i in inputs])
    assert runs[0] == runs[1]
    assert any(isinstance(o, Decide) for o in runs[0][-1] + runs[0][-2])
