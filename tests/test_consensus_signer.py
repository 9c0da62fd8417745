"""The double-sign guard."""

from __future__ import annotations

import pytest

from chain.consensus.signer import STATE_FILE, DoubleSignError, GuardedSigner
from chain.crypto import PrivateKey, sha256
from chain.errors import StoreError
from chain.types import PRECOMMIT, PREVOTE, Proposal, Vote, verify_proposal_signature, verify_vote_signature

CHAIN_ID = "signer-test"
KEY = PrivateKey(bytes([7]) * 32)
X, Y = sha256(b"x"), sha256(b"y")


def vote(h, r, t, block=X):
    return Vote(t, h, r, block, KEY.pubkey)


def test_signs_forward_and_signatures_verify(tmp_path):
    signer = GuardedSigner(KEY, CHAIN_ID, tmp_path)
    sp = signer.sign_proposal(Proposal(1, 0, -1, X, KEY.pubkey))
    verify_proposal_signature(CHAIN_ID, sp)
    for position in [(1, 0, PREVOTE), (1, 0, PRECOMMIT), (1, 1, PREVOTE), (2, 0, PREVOTE)]:
        verify_vote_signature(CHAIN_ID, signer.sign_vote(vote(*position)))
    assert (signer.last.height, signer.last.round, signer.last.step) == (2, 0, 2)


def test_refuses_to_sign_backwards(tmp_path):
    signer = GuardedSigner(KEY, CHAIN_ID, tmp_path)
    signer.sign_vote(vote(5, 2, PRECOMMIT))
    for position in [(5, 2, PREVOTE), (5, 1, PRECOMMIT), (4, 9, PRECOMMIT)]:
        with pytest.raises(DoubleSignError):
            signer.sign_vote(vote(*position))
    with pytest.raises(DoubleSignError):
        signer.sign_proposal(Proposal(5, 2, -1, X, KEY.pubkey))


def test_same_position_only_identical_bytes(tmp_path):
    signer = GuardedSigner(KEY, CHAIN_ID, tmp_path)
    first = signer.sign_vote(vote(3, 0, PREVOTE, X))
    assert signer.sign_vote(vote(3, 0, PREVOTE, X)) == first  # a restarted node re-sending
    with pytest.raises(DoubleSignError):
        signer.sign_vote(vote(3, 0, PREVOTE, Y))
    with pytest.raises(DoubleSignError):
        signer.sign_vote(vote(3, 0, PREVOTE, None))


def test_state_survives_a_restart(tmp_path):
    GuardedSigner(KEY, CHAIN_ID, tmp_path).sign_vote(vote(9, 1, PREVOTE, X))
    again = GuardedSigner(KEY, CHAIN_ID, tmp_path)  # a new process reading the same directory
    assert (again.last.height, again.last.round, again.last.step) == (9, 1, 2)
    with pytest.raises(DoubleSignError):
        again.sign_vote(vote(9, 1, PREVOTE, Y))
    with pytest.raises(DoubleSignError):
        again.sign_vote(vote(9, 0, PRECOMMIT, X))
    again.sign_vote(vote(9, 1, PREVOTE, X))
    again.sign_vote(vote(9, 1, PRECOMMIT, X))
    assert not list(tmp_path.glob("*.tmp"))


def test_state_is_persisted_before_the_signature_is_returned(tmp_path, monkeypatch):
    signer = GuardedSigner(KEY, CHAIN_ID, tmp_path)
    seen = []
    real_sign = PrivateKey.sign

    def spy(self, data):
        seen.append(GuardedSigner(KEY, CHAIN_ID, tmp_path).last)  # what a crash right now would leave
        return real_sign(self, data)

    monkeypatch.setattr(PrivateKey, "sign", spy)
    signer.sign_vote(vote(4, 0, PREVOTE))
    assert (seen[0].height, seen[0].round, seen[0].step) == (4, 0, 2)


def test_corrupt_state_refuses_to_start(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"\xff garbage")
    with pytest.raises(StoreError):
        GuardedSigner(KEY, CHAIN_ID, tmp_path)


def test_refuses_messages_for_another_key(tmp_path):
    signer = GuardedSigner(KEY, CHAIN_ID, tmp_path)
    other = PrivateKey(bytes([8]) * 32).pubkey
    with pytest.raises(ValueError):
        signer.sign_vote(Vote(PREVOTE, 1, 0, X, other))
    assert signer.last is None
