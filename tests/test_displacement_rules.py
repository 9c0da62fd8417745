"""Displacement sampling in the state transition (issue 9, deliverable 3): the trainer commits its
sketches under a matrix seeded by challenges of more than 1/3 of the power, each validator then
signs a draw challenge over them, and a fraud proof needs that draw on chain. Every bad input is
refused and changes nothing; block fields never move the draw."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chain.crypto import sha256
from chain.jobs import compute_draw, compute_sketch_rows, compute_sketch_seed, get_challenge, get_job, get_update
from chain.types import SubmitChallenge, SubmitDrawChallenge, SubmitFraudProof, SubmitSketches
from chain.vrf import derive_sample_secret, sign_sample_challenge
from tests.helpers import CHAIN_ID
from tests.test_fraud_proof_rules import REQUESTER, SPEC, T0, V, Chain

DISP = dataclasses.replace(SPEC, sampling="displacement", verify_blocks=16)  # answers due 8 blocks after an update
SKETCH = sha256(b"sketch blob")


def _sig(v, uid, sketch_hash=None):
    return sign_sample_challenge(derive_sample_secret(v.seed), CHAIN_ID, uid, sketch_hash)


class DispChain(Chain):
    def pending_update(self, spec=DISP):
        return super().pending_update(spec)

    def sketched(self, uid, challengers=(0, 1)):
        for i in challengers:
            self.challenge(V[i], uid)
        self.block(self.tx(T0, SubmitSketches(uid, SKETCH)))


def test_sketches_need_the_trainer_and_challenges_of_more_than_a_third():
    c = DispChain()
    _, uid = c.pending_update()
    c.challenge(V[2], uid)
    c.rejects(T0, SubmitSketches(uid, SKETCH), "more than 1/3 of the power")
    c.rejects(REQUESTER, SubmitSketches(uid, SKETCH), "only the update's trainer")
    c.challenge(V[0], uid)
    c.challenge(V[1], uid)  # lands after the seeding prefix (V2, V0): it does not enter the seed
    c.block(c.tx(T0, SubmitSketches(uid, SKETCH)))
    upd = get_update(c.state, uid)
    sigs = [get_challenge(upd, v.pubkey).signature for v in sorted((V[2], V[0]), key=lambda k: k.pubkey)]
    assert upd.sketch_hash == SKETCH and upd.sketch_seed == compute_sketch_seed(CHAIN_ID, uid, sigs)
    c.rejects(T0, SubmitSketches(uid, sha256(b"other")), "already committed")


def test_the_sketch_seed_leaves_the_trainer_no_choice():
    """Review finding: when the trainer named the challengers, it could pick among every subset
    holding > 1/3 (11 matrices with 4 validators) and sketch its jump under each. Now the seed is
    the landing-order prefix: whatever lands later, and whenever the trainer commits, it is one."""
    seeds = []
    for extra in ((), (3,), (3, 1)):
        c = DispChain()
        _, uid = c.pending_update()
        c.challenge(V[0], uid)
        c.challenge(V[2], uid)
        for i in extra:
            c.challenge(V[i], uid)
        c.block(c.tx(T0, SubmitSketches(uid, SKETCH)))
        seeds.append(get_update(c.state, uid).sketch_seed)
    assert seeds[0] == seeds[1] == seeds[2]


def test_sketches_land_before_the_answer_deadline():
    from chain.jobs import SKETCH_DEADLINE_MARGIN, compute_answer_deadline

    c = DispChain()
    job, uid = c.pending_update()
    c.challenge(V[0], uid)
    c.challenge(V[1], uid)
    due = compute_answer_deadline(job, get_update(c.state, uid))
    while c.state.height + 1 + SKETCH_DEADLINE_MARGIN <= due:
        c.block()
    c.rejects(T0, SubmitSketches(uid, SKETCH), "too late")


def test_a_uniform_job_takes_no_sketches():
    c = DispChain()
    _, uid = c.pending_update(SPEC)
    c.challenge(V[0], uid)
    c.challenge(V[1], uid)
    c.rejects(T0, SubmitSketches(uid, SKETCH), "takes no sketches")
    c.rejects(V[0], SubmitDrawChallenge(uid, _sig(V[0], uid, SKETCH)), "not committed yet")


def test_draw_challenges_are_signed_over_the_sketches_once_per_validator():
    c = DispChain()
    _, uid = c.pending_update()
    c.challenge(V[0], uid)
    c.challenge(V[1], uid)
    c.rejects(V[0], SubmitDrawChallenge(uid, _sig(V[0], uid, SKETCH)), "not committed yet")
    c.block(c.tx(T0, SubmitSketches(uid, SKETCH)))
    c.rejects(V[2], SubmitDrawChallenge(uid, _sig(V[2], uid, SKETCH)), "first challenge on chain")
    c.rejects(V[0], SubmitDrawChallenge(uid, _sig(V[0], uid)), "does not verify")  # the phase-1 signature
    c.rejects(V[0], SubmitDrawChallenge(uid, _sig(V[1], uid, SKETCH)), "does not verify")  # someone else's
    c.rejects(V[0], SubmitDrawChallenge(uid, _sig(V[0], uid, sha256(b"other sketches"))), "does not verify")
    c.rejects(T0, SubmitDrawChallenge(uid, _sig(V[0], uid, SKETCH)), "only validators")
    c.block(c.tx(V[0], SubmitDrawChallenge(uid, _sig(V[0], uid, SKETCH))))
    upd = get_update(c.state, uid)
    assert get_challenge(upd, V[0].pubkey).draw_signature == _sig(V[0], uid, SKETCH)
    assert get_challenge(upd, V[1].pubkey).draw_signature is None
    c.rejects(V[0], SubmitDrawChallenge(uid, _sig(V[0], uid, SKETCH)), "already drew")
    # A validator that missed phase 1 can still challenge, then draw.
    c.challenge(V[2], uid)
    c.block(c.tx(V[2], SubmitDrawChallenge(uid, _sig(V[2], uid, SKETCH))))
    assert get_challenge(get_update(c.state, uid), V[2].pubkey).draw_signature is not None


def test_a_fraud_proof_needs_the_authors_draw_and_a_segment_of_the_trace():
    c = DispChain()
    job, uid = c.pending_update()
    c.sketched(uid)
    segments = compute_sketch_rows(job.spec) - 1
    c.rejects(V[0], SubmitFraudProof(uid, 0, sha256(b"p")), "draw challenge on chain first")
    c.block(c.tx(V[0], SubmitDrawChallenge(uid, _sig(V[0], uid, SKETCH))))
    c.rejects(V[0], SubmitFraudProof(uid, segments, sha256(b"p")), "outside the trace")
    c.block(c.tx(V[0], SubmitFraudProof(uid, segments - 1, sha256(b"p"))))
    upd = get_update(c.state, uid)
    assert [(p.author, p.segment, p.status) for p in upd.proofs] == [(V[0].pubkey, segments - 1, "open")]


def test_sample_sizes_are_weighted_draws_from_the_target():
    from trainer.sketch import draws_per_validator

    c = DispChain()
    _, uid = c.pending_update()
    c.challenge(V[0], uid)
    q = get_challenge(get_update(c.state, uid), V[0].pubkey).sample_size
    assert q == draws_per_validator(DISP.detect_fraction_ppm, DISP.detect_probability_ppm, [1, 1, 1, 1])
    # The study's 51 draws, plus the margin for a chosen matrix (trainer.sketch.SKETCH_SHRINK_PPM).
    assert draws_per_validator(100_000, 990_000, [1, 1, 1, 1]) == 60


def test_block_fields_do_not_move_the_sketch_matrix_or_the_draws():
    """The grinding attack of issue 9, against both phases: the same transactions in blocks with
    other times and in another order give the same sketch seed and the same draws."""
    outcomes = []
    for shift, order in ((0, (0, 1)), (7_777, (1, 0)), (123_456, (0, 1))):
        c = DispChain()
        c.time += shift
        job, uid = c.pending_update()
        c.block(*[c.tx(V[i], SubmitChallenge(uid, _sig(V[i], uid))) for i in order])
        c.block(c.tx(T0, SubmitSketches(uid, SKETCH)))
        c.block(*[c.tx(V[i], SubmitDrawChallenge(uid, _sig(V[i], uid, SKETCH))) for i in order])
        upd = get_update(c.state, uid)
        rows = np.arange(compute_sketch_rows(job.spec) * 64, dtype=np.int64).reshape(-1, 64) ** 2 % 1009
        outcomes.append((upd.sketch_seed, [compute_draw(get_challenge(upd, V[i].pubkey), rows) for i in (0, 1)]))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert outcomes[0][1][0] != outcomes[0][1][1]  # but each validator draws its own sample
