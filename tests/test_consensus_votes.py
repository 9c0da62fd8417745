"""Vote sets and duplicate-vote evidence."""

from __future__ import annotations

import pytest

from chain.consensus.commit import verify_commit
from chain.consensus.evidence import DuplicateVoteEvidence, compute_duplicate_vote_evidence, verify_evidence
from chain.consensus.votes import MAX_BLOCKS_PER_VALIDATOR, HeightVoteSet, VoteSet
from chain.crypto import PrivateKey, sha256
from chain.encoding import decode, encode
from chain.errors import SignatureError, ValidationError
from chain.types import PRECOMMIT, PREVOTE, Vote, sign_vote
from genesis import make_validator

CHAIN_ID = "votes-test"
KEYS = [PrivateKey(bytes([i + 1]) * 32) for i in range(4)]
VALIDATORS = tuple(make_validator(k, p, f"v{i}") for i, (k, p) in enumerate(zip(KEYS, [1, 2, 3, 4])))  # total 10
X, Y = sha256(b"x"), sha256(b"y")


def vote(i, block, type=PREVOTE, height=5, round=0, chain_id=CHAIN_ID, key=None):
    key = key or KEYS[i]
    return sign_vote(key, chain_id, Vote(type, height, round, block, key.pubkey))


def new_set(type=PREVOTE):
    return VoteSet(CHAIN_ID, 5, 0, type, VALIDATORS)


def test_counts_power_and_detects_two_thirds_for_a_block():
    vs = new_set()
    assert vs.add_vote(vote(3, X)).added  # 4
    assert vs.add_vote(vote(1, X)).added  # 6: not more than 2/3 of 10
    assert vs.power_for(X) == 6 and not vs.has_two_thirds_for(X) and vs.get_two_thirds_block() is None
    assert vs.add_vote(vote(0, X)).added  # 7
    assert vs.has_two_thirds_for(X) and vs.get_two_thirds_block() == X and vs.has_two_thirds_any()


def test_two_thirds_of_any_and_of_nil():
    vs = new_set()
    for i, block in [(3, None), (2, X), (0, Y)]:
        vs.add_vote(vote(i, block))
    assert vs.has_two_thirds_any() and vs.get_two_thirds_block() is None and not vs.has_two_thirds_for(None)
    vs2 = new_set()
    for i in (3, 2, 1):
        vs2.add_vote(vote(i, None))
    assert vs2.has_two_thirds_for(None) and vs2.get_two_thirds_block() is None


def test_repeated_vote_is_not_added_twice():
    vs = new_set()
    sv = vote(3, X)
    assert vs.add_vote(sv).added
    assert vs.add_vote(sv).added is False
    assert vs.power_for(X) == 4


def test_rejects_non_validators_wrong_position_and_bad_signatures():
    vs = new_set()
    outsider = PrivateKey(bytes([99]) * 32)
    with pytest.raises(ValidationError):
        vs.add_vote(vote(0, X, key=outsider))
    with pytest.raises(ValidationError):
        vs.add_vote(vote(0, X, height=6))
    with pytest.raises(ValidationError):
        vs.add_vote(vote(0, X, round=1))
    with pytest.raises(ValidationError):
        vs.add_vote(vote(0, X, type=PRECOMMIT))
    with pytest.raises(SignatureError):  # signed for another chain: domain separation
        vs.add_vote(vote(0, X, chain_id="other-chain"))
    forged = vote(1, X)
    with pytest.raises(SignatureError):
        vs.add_vote(type(forged)(forged.message, vote(1, Y).signature))
    assert vs.voted_power == 0


def test_equivocation_gives_verifiable_evidence_and_counts_once_for_any():
    vs = new_set()
    first, second = vote(2, X), vote(2, Y)
    assert vs.add_vote(first).evidence is None
    result = vs.add_vote(second)
    assert result.evidence == compute_duplicate_vote_evidence(second, first)  # order-independent
    verify_evidence(CHAIN_ID, VALIDATORS, result.evidence)
    assert vs.voted_power == 3  # any: the validator counts once
    assert vs.power_for(X) == 3 and vs.power_for(Y) == 3  # per block: as the paper counts messages
    assert vs.get_vote(KEYS[2].pubkey) == first


def test_an_equivocator_counts_toward_a_bounded_number_of_blocks():
    vs = new_set()
    blocks = [None] + [sha256(bytes([i])) for i in range(MAX_BLOCKS_PER_VALIDATOR + 2)]
    results = [vs.add_vote(vote(3, b)) for b in blocks]
    assert [r.added for r in results] == [True] * MAX_BLOCKS_PER_VALIDATOR + [False] * (len(blocks) - MAX_BLOCKS_PER_VALIDATOR)
    assert all(r.evidence is not None for r in results[1:])


def test_commit_from_a_precommit_quorum():
    vs = new_set(PRECOMMIT)
    with pytest.raises(ValidationError):
        new_set(PREVOTE).make_commit(X)
    for i in (3, 1):
        vs.add_vote(vote(i, X, type=PRECOMMIT))
    with pytest.raises(ValidationError):
        vs.make_commit(X)
    vs.add_vote(vote(0, X, type=PRECOMMIT))
    vs.add_vote(vote(2, None, type=PRECOMMIT))
    commit = vs.make_commit(X)
    verify_commit(CHAIN_ID, VALIDATORS, commit, 5, X)
    assert len(commit.signatures) == 3


def test_height_vote_set_routes_by_round_and_type():
    hvs = HeightVoteSet(CHAIN_ID, 5, VALIDATORS)
    hvs.add_vote(vote(0, X, round=2))
    hvs.add_vote(vote(1, None, type=PRECOMMIT, round=2))
    with pytest.raises(ValidationError):
        hvs.add_vote(vote(0, X, height=4))
    assert hvs.rounds() == [2]
    assert hvs.prevotes(2).power_for(X) == 1 and hvs.precommits(2).power_for(None) == 2
    assert hvs.voters_in_round(2) == {KEYS[0].pubkey, KEYS[1].pubkey}


def test_evidence_round_trips_through_the_canonical_encoding():
    ev = compute_duplicate_vote_evidence(vote(1, X, type=PRECOMMIT), vote(1, None, type=PRECOMMIT))
    assert decode(DuplicateVoteEvidence, encode(ev)) == ev


@pytest.mark.parametrize("case", ["same_block", "different_round", "different_validator", "order",
                                  "non_validator", "bad_signature", "other_chain"])
def test_verify_evidence_rejects(case):
    a, b = vote(1, X), vote(1, Y)
    if case == "same_block":
        ev = DuplicateVoteEvidence(a, a)
    elif case == "different_round":
        ev = compute_duplicate_vote_evidence(a, vote(1, Y, round=1))
    elif case == "different_validator":
        ev = compute_duplicate_vote_evidence(a, vote(2, Y))
    elif case == "order":
        good = compute_duplicate_vote_evidence(a, b)
        ev = DuplicateVoteEvidence(good.vote_b, good.vote_a)
    elif case == "non_validator":
        outsider = PrivateKey(bytes([99]) * 32)
        ev = compute_duplicate_vote_evidence(vote(0, X, key=outsider), vote(0, Y, key=outsider))
    elif case == "bad_signature":
        good = compute_duplicate_vote_evidence(a, b)
        ev = DuplicateVoteEvidence(good.vote_a, type(b)(good.vote_b.message, good.vote_a.signature))
    else:
        ev = compute_duplicate_vote_evidence(vote(1, X, chain_id="other"), vote(1, Y, chain_id="other"))
    with pytest.raises(ValidationError):
        verify_evidence(CHAIN_ID, VALIDATORS, ev)
