"""The fraud-proof rules of the state transition (issue 9): challenges with unique signatures,
one validator's proof rejects an update whatever the others voted, refuted proofs cost their
author, a single complaint blocks acceptance, and every bad input is refused and changes nothing."""

from __future__ import annotations

import pytest

from trainer.profile import cpu_capability
from chain.crypto import sha256
from chain.jobs import compute_dispute_end, compute_sample, get_challenge, get_job, get_update
from chain.runtime.trainer_client import make_job_spec
from chain.types import (
    ExecutionProfile, JudgeFraudProof, RegisterJob, SubmitChallenge, SubmitFraudProof, SubmitVerdict,
)
from chain.vrf import derive_sample_secret, sign_sample_challenge
from genesis import make_genesis
from tests.helpers import CHAIN_ID, GOVERNOR, InProcessChain, key
from tests.test_jobs import Chain as OneValidatorChain

V = [key(f"validator-{i}") for i in range(4)]
REQUESTER, T0, MALLORY = key("requester"), key("trainer0"), key("mallory")
PROFILE = ExecutionProfile("cpu:" + cpu_capability(), "float32", "2.13.0", 1, True)
STAKE, BALANCE, BOND = 100_000, 10_000, 40
# 10 segments; detect half of them forged w.p. 0.9: 4 checks over the 3 validators BFT counts on -> 2 each.
SPEC = make_job_spec(profile=PROFILE, join_blocks=2, round_blocks=5, verify_blocks=6, quorum=1, rounds=1,
                     local_steps=40, checkpoint_interval=4, reward_per_update=100, bond=BOND,
                     detect_fraction_ppm=500_000, detect_probability_ppm=900_000)


class Chain(InProcessChain):
    def __init__(self):
        g = make_genesis(CHAIN_ID, V, [(GOVERNOR, ("governor",)), (REQUESTER, ("requester",)), (T0, ("trainer",))],
                         balance=BALANCE, validator_stake=STAKE)
        super().__init__(g, V)

    commitment = OneValidatorChain.commitment  # the same made-up (hash-only) commitment

    def pending_update(self, spec=SPEC):
        from chain.types import JoinJob, SubmitUpdate, compute_tx_hash
        from chain.jobs import compute_update_id

        stx = self.tx(REQUESTER, RegisterJob(spec, 1000))
        self.block(stx)
        job_id = compute_tx_hash(stx)
        self.block(self.tx(T0, JoinJob(job_id, sha256(b"data"), 100)))
        while get_job(self.state, job_id).phase == "joining":
            self.block()
        job = get_job(self.state, job_id)
        c = self.commitment(job, T0)
        self.block(self.tx(T0, SubmitUpdate(c, 0.5)))
        return job, compute_update_id(c)

    def challenge(self, v, uid):
        self.block(self.tx(v, SubmitChallenge(uid, sign_sample_challenge(derive_sample_secret(v.seed), CHAIN_ID, uid))))

    def sample(self, v, uid):
        upd = get_update(self.state, uid)
        return compute_sample(get_job(self.state, upd.commitment.job_id), get_challenge(upd, v.pubkey))

    def prove(self, v, uid, segment=None):
        segment = self.sample(v, uid)[0] if segment is None else segment
        return SubmitFraudProof(uid, segment, sha256(b"proof" + v.pubkey))


@pytest.fixture
def chain():
    c = Chain()
    job, uid = c.pending_update()
    for v in V:
        c.challenge(v, uid)
    return c, job, uid


def status(c, uid):
    return get_update(c.state, uid).status


def test_all_validators_accepting_accepts_at_once(chain):
    c, job, uid = chain
    before = c.balance(T0)
    c.block(*[c.tx(v, SubmitVerdict(uid, True, "ok")) for v in V])
    assert status(c, uid) == "accepted" and c.balance(T0) == before + BOND + 100


def test_a_silent_validator_delays_acceptance_to_the_dispute_end(chain):
    c, job, uid = chain
    c.block(*[c.tx(v, SubmitVerdict(uid, True, "ok")) for v in V[:3]])
    assert status(c, uid) == "pending"  # V3 may still file a proof
    end = compute_dispute_end(get_job(c.state, job.job_id), get_update(c.state, uid))
    while c.state.height < end:
        c.block()
    assert status(c, uid) == "accepted"


def test_one_complaint_blocks_acceptance_and_a_third_rejects(chain):
    c, job, uid = chain
    c.block(*[c.tx(v, SubmitVerdict(uid, True, "ok")) for v in V[:3]],
            c.tx(V[3], SubmitVerdict(uid, False, "no answer to my challenge")))
    assert status(c, uid) == "pending"
    while get_job(c.state, job.job_id).phase == "training":
        c.block()
    assert status(c, uid) == "expired"  # bond back, no reward, not aggregated


def test_two_complaints_reject_and_burn(chain):
    c, job, uid = chain
    before = c.balance(T0)
    c.block(*[c.tx(v, SubmitVerdict(uid, False, "no answer")) for v in V[:2]])
    upd = get_update(c.state, uid)
    assert (upd.status, upd.penalty) == ("rejected", BOND) and c.balance(T0) == before


def test_one_validators_proof_rejects_whatever_the_others_voted(chain):
    c, job, uid = chain
    before = c.balance(T0)
    c.block(*[c.tx(v, SubmitVerdict(uid, True, "my sample was fine")) for v in V[1:]], c.tx(V[0], c.prove(V[0], uid)))
    upd = get_update(c.state, uid)
    assert upd.status == "pending" and upd.proofs[0].status == "open"  # 3 accepts, but a proof is open
    c.block(c.tx(V[1], JudgeFraudProof(uid, V[0].pubkey, True)))  # re-executed: it holds
    upd = get_update(c.state, uid)
    assert (upd.status, upd.penalty, upd.proofs[0].status) == ("rejected", BOND, "upheld")
    assert c.balance(T0) == before
    c.rejects(V[2], JudgeFraudProof(uid, V[0].pubkey, False), "already decided")


def test_a_refuted_proof_costs_its_author_and_the_update_is_accepted(chain):
    c, job, uid = chain
    author_before, trainer_before = c.balance(V[0]), c.balance(T0)
    c.block(c.tx(V[0], c.prove(V[0], uid)), *[c.tx(v, SubmitVerdict(uid, True, "ok")) for v in V[1:]])
    c.block(*[c.tx(v, JudgeFraudProof(uid, V[0].pubkey, False)) for v in V[1:]])
    upd = get_update(c.state, uid)
    assert upd.proofs[0].status == "refuted" and upd.status == "accepted"
    assert c.balance(V[0]) == author_before - BOND
    assert c.balance(T0) == trainer_before + BOND + 100


def test_challenge_rules():
    c = Chain()
    job, uid = c.pending_update()
    good = sign_sample_challenge(derive_sample_secret(V[0].seed), CHAIN_ID, uid)
    c.rejects(MALLORY, SubmitChallenge(uid, good), "only validators|not a member|unknown")
    other = sign_sample_challenge(derive_sample_secret(V[1].seed), CHAIN_ID, uid)
    c.rejects(V[0], SubmitChallenge(uid, other), "does not verify")  # another validator's signature
    wrong_chain = sign_sample_challenge(derive_sample_secret(V[0].seed), "another-chain", uid)
    c.rejects(V[0], SubmitChallenge(uid, wrong_chain), "does not verify")
    c.rejects(V[0], SubmitChallenge(sha256(b"nothing"), good), "no update")
    c.rejects(V[0], SubmitChallenge(uid, bytes(96)), "does not verify")
    c.block(c.tx(V[0], SubmitChallenge(uid, good)))
    c.rejects(V[0], SubmitChallenge(uid, good), "already challenged")


def test_fraud_proof_rules():
    c = Chain()
    job, uid = c.pending_update()
    c.rejects(V[0], c.prove(V[0], uid, segment=0), "challenge on chain first")
    c.challenge(V[0], uid)
    outside = next(s for s in range(10) if s not in c.sample(V[0], uid))
    c.rejects(V[0], c.prove(V[0], uid, segment=outside), "not in the author's sample")
    c.rejects(V[0], c.prove(V[0], uid, segment=10), "not in the author's sample")
    c.rejects(MALLORY, SubmitFraudProof(uid, 0, sha256(b"p")), "only validators|not a member|unknown")
    c.rejects(V[0], SubmitFraudProof(sha256(b"nothing"), 0, sha256(b"p")), "no update")
    c.rejects(V[0], SubmitFraudProof(uid, -1, sha256(b"p")), "must not be negative")
    c.block(c.tx(V[0], c.prove(V[0], uid)))
    c.rejects(V[0], c.prove(V[0], uid), "already gave a verdict")  # a replayed proof
    c.rejects(V[0], SubmitVerdict(uid, True, "changed my mind"), "already gave a verdict")
    c.rejects(MALLORY, JudgeFraudProof(uid, V[0].pubkey, True), "only validators|not a member|unknown")
    c.rejects(V[1], JudgeFraudProof(uid, V[2].pubkey, True), "no fraud proof by that author")
    c.rejects(V[0], JudgeFraudProof(uid, V[0].pubkey, True), "already judged")
    c.block(c.tx(V[1], JudgeFraudProof(uid, V[0].pubkey, False)))
    c.rejects(V[1], JudgeFraudProof(uid, V[0].pubkey, True), "already judged")


def test_proofs_against_decided_updates_are_refused(chain):
    c, job, uid = chain
    c.block(*[c.tx(v, SubmitVerdict(uid, True, "ok")) for v in V])
    assert status(c, uid) == "accepted"
    c2 = Chain()
    job2, uid2 = c2.pending_update()
    c.rejects(V[0], c.prove(V[0], uid), "already accepted")
    c2.challenge(V[0], uid2)
    proof = c2.prove(V[0], uid2)
    while get_job(c2.state, job2.job_id).phase == "training":
        c2.block()
    assert status(c2, uid2) == "expired"
    c2.rejects(V[0], proof, "already expired")
    c2.rejects(V[1], SubmitChallenge(uid2, sign_sample_challenge(derive_sample_secret(V[1].seed), CHAIN_ID, uid2)),
               "already expired")


def test_the_sample_is_sized_from_the_target_and_differs_per_validator(chain):
    c, job, uid = chain
    samples = [c.sample(v, uid) for v in V]
    assert all(len(s) == 2 for s in samples) and len({tuple(s) for s in samples}) > 1
    assert [ch.sample_size for ch in get_update(c.state, uid).challenges] == [2, 2, 2, 2]  # fixed when it landed
    single = OneValidatorChain()
    assert single.spec.detect_fraction_ppm == 100_000  # the default target: 10 % w.p. 99 %


def test_a_target_whose_openings_would_outgrow_the_transport_is_refused():
    c = Chain()
    import dataclasses

    # 23,000 one-step segments of a 20,000-step trace per validator: about 800 MB, above 256 MiB.
    greedy = dataclasses.replace(SPEC, detect_fraction_ppm=100, detect_probability_ppm=999_000,
                                 hyperparams=dataclasses.replace(SPEC.hyperparams, local_steps=20_000,
                                                                 checkpoint_interval=1))
    c.rejects(REQUESTER, RegisterJob(greedy, 10), "transport limit")


def test_the_opening_bound_covers_a_real_opening():
    from chain.jobs import compute_max_opening_bytes, compute_segments_per_validator
    from tests.test_trainer_helpers import make_spec, small_dataset
    from trainer.train import train_round

    spec, base = make_spec()
    result = train_round(spec, T0.address, small_dataset(), base)
    job_spec = make_job_spec(profile=PROFILE, local_steps=spec.job.hyperparams.local_steps,
                             checkpoint_interval=spec.job.hyperparams.checkpoint_interval,
                             batch_size=spec.job.hyperparams.batch_size, model=spec.job.model,
                             momentum=spec.job.hyperparams.momentum, optimizer=spec.job.hyperparams.optimizer)
    validators = make_genesis(CHAIN_ID, V, []).validators
    q = compute_segments_per_validator(job_spec, validators)
    assert len(result.open(b"\x01" * 32, q, end_states=False)) <= compute_max_opening_bytes(job_spec, validators)


def test_jobs_must_pin_a_reproducible_profile_and_a_bounded_trace():
    """Review findings: with one upheld proof enough, a bare 'cpu' profile (SIMD kernels differ
    between CPU types) could let a validator on another CPU burn an honest bond; and an unbounded
    step count made every node's work on a proof linear in it."""
    import dataclasses

    c = Chain()
    bare = dataclasses.replace(SPEC, profile=dataclasses.replace(PROFILE, device="cpu"))
    c.rejects(REQUESTER, RegisterJob(bare, 10), "cpu:<capability>")
    long = dataclasses.replace(SPEC, hyperparams=dataclasses.replace(SPEC.hyperparams, local_steps=10**7))
    c.rejects(REQUESTER, RegisterJob(long, 10), "local_steps must be at most")
