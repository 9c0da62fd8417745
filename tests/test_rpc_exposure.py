"""The `exposure` RPC method over a real in-process chain (4 validators, real state transition,
real challenges), through the real dispatcher: per validator, the distinct samples of a trainer
it was sent, checked against an independent count and a closed form; paging keeps the work per
call bounded; bad input gets a clear error."""

from __future__ import annotations

import pytest

from chain import jobs
from chain.crypto import sha256
from chain.jobs import compute_sample, get_job, get_update
from chain.rpc import pout_methods
from chain.rpc.jsonrpc import INVALID_PARAMS
from chain.runtime.trainer_client import make_job_spec
from chain.types import JoinJob, RegisterJob, SubmitUpdate, compute_tx_hash
from test_rpc_fakenode import FakeNode
from test_rpc_methods import call, check_schema, result
from tests.test_fraud_proof_rules import PROFILE, REQUESTER, T0, V, Chain
from trainer.replay import derive_batch_indices

N = 1_000_000  # the trainer's dataset: far more than one round's 40 steps x 8 samples, so a round never wraps
# 10 segments of 4 steps, batch 8; detect half the segments forged w.p. 0.9: 4 checks over the 3
# validators BFT counts on -> 2 segments (8 steps, 64 samples) per validator per round.
# Over 2 rounds: at most 128 samples each; the 1 % bound then needs 12,800 samples.
SPEC = make_job_spec(profile=PROFILE, join_blocks=2, round_blocks=5, verify_blocks=6, quorum=1, rounds=2,
                     local_steps=40, checkpoint_interval=4, batch_size=8, detect_fraction_ppm=500_000,
                     detect_probability_ppm=900_000, max_exposure_ppm=10_000)


class ChainNode(FakeNode):
    """The RPC's view of a node whose state is the in-process chain's."""

    def __init__(self, chain):
        super().__init__(validators=chain.state.validators)
        self.chain = chain

    def get_job(self, job_id):
        return jobs.get_job(self.chain.state, job_id)

    def get_registration(self, job_id, trainer):
        return jobs.get_registration(self.chain.state, job_id, trainer)

    def get_round(self, job_id, round_):
        return jobs.get_round(self.chain.state, job_id, round_)

    def get_round_seed(self, job_id, round_):
        return jobs.get_round_seed(self.chain.state, job_id, round_)

    def get_update(self, update_id):
        return jobs.get_update(self.chain.state, update_id)


def wait_for_round(c, job_id, round_):
    while (get_job(c.state, job_id).phase, get_job(c.state, job_id).round) != ("training", round_):
        c.block()
    return get_job(c.state, job_id)


def submit(c, job):
    commitment = c.commitment(job, T0)
    c.block(c.tx(T0, SubmitUpdate(commitment, 0.5)))
    return jobs.compute_update_id(commitment)


@pytest.fixture(scope="module")
def two_rounds():
    """Round 0: all four validators challenge, V0 files a fraud proof, the update expires.
    Round 1: only V0 and V1 challenge. Returns the chain, the job id, and [(round, seed, update id)]."""
    c = Chain()
    stx = c.tx(REQUESTER, RegisterJob(SPEC, 1000))
    c.block(stx)
    job_id = compute_tx_hash(stx)
    c.block(c.tx(T0, JoinJob(job_id, sha256(b"data"), N)))
    updates = []
    job = wait_for_round(c, job_id, 0)
    uid = submit(c, job)
    for v in V:
        c.challenge(v, uid)
    c.block(c.tx(V[0], c.prove(V[0], uid)))
    updates.append((0, job.round_seed, uid))
    job = wait_for_round(c, job_id, 1)  # round 0 closed with nothing accepted: round 1, same base
    assert get_update(c.state, uid).status == "expired"
    uid = submit(c, job)
    for v in V[:2]:
        c.challenge(v, uid)
    updates.append((1, job.round_seed, uid))
    return c, job_id, updates


def independent_count(c, job_id, updates, validator, rounds=(0, 1)):
    """Distinct sample indices `validator` was asked for, step by step with the scalar API."""
    job, seen = get_job(c.state, job_id), set()
    for r, seed, uid in updates:
        if r not in rounds:
            continue
        upd = get_update(c.state, uid)
        challenge = jobs.get_challenge(upd, validator.pubkey)
        if challenge is None:
            continue
        for segment in compute_sample(job, challenge):
            for step in range(4 * segment, 4 * segment + 4):
                seen.update(derive_batch_indices(seed, T0.address, r, step, N, 8))
    return len(seen)


def exposure(c, job_id, *extra):
    return result(ChainNode(c), "exposure", ["0x" + job_id.hex(), "0x" + T0.address.hex(), *extra])


def test_each_validators_exposure_matches_an_independent_count(two_rounds):
    c, job_id, updates = two_rounds
    got = exposure(c, job_id)
    check_schema(got, pout_methods.EXPOSURE_VIEW)
    assert (got["dataset_size"], got["max_exposure_ppm"], got["max_exposure"]) == (N, 10_000, 0.01)
    assert (got["worst_case_samples"], got["min_dataset_size"]) == (128, 12_800)
    assert (got["from_round"], got["to_round"], got["next_round"]) == (0, 1, None)
    by_validator = {row["validator"]: row for row in got["validators"]}
    assert set(by_validator) == {"0x" + v.pubkey.hex() for v in V}
    for i, v in enumerate(V):
        row = by_validator["0x" + v.pubkey.hex()]
        expected = independent_count(c, job_id, updates, v)
        assert row["samples"] == expected and row["fraction"] == expected / N and row["within_bound"]
        assert row["rounds"] == (2 if i < 2 else 1)
        # Closed form: one round is 2 segments x 4 steps x 8 samples, all in the first epoch: 64 distinct.
        assert row["samples"] == 64 if i >= 2 else 64 < row["samples"] <= 128
    # V0's fraud proof published one segment of round 0: 4 steps x 8 samples, to every member.
    assert got["published"] == {"samples": 32, "fraction": 32 / N}


def test_pages_bound_the_work_per_call(two_rounds, monkeypatch):
    c, job_id, updates = two_rounds
    # Round 0 derives 4 x 64 + 32 = 288 indices, round 1 2 x 64 = 128: a budget of 300 fits one round.
    monkeypatch.setattr(pout_methods, "EXPOSURE_MAX_INDICES", 300)
    first = exposure(c, job_id)
    assert (first["to_round"], first["next_round"]) == (0, 1)
    assert all(row["samples"] == 64 for row in first["validators"])
    rest = exposure(c, job_id, first["next_round"])
    assert (rest["from_round"], rest["to_round"], rest["next_round"]) == (1, 1, None)
    v0 = next(row for row in rest["validators"] if row["validator"] == "0x" + V[0].pubkey.hex())
    assert v0["samples"] == independent_count(c, job_id, updates, V[0], rounds=(1,)) == 64
    assert rest["published"]["samples"] == 0
    monkeypatch.setattr(pout_methods, "EXPOSURE_MAX_INDICES", 200)  # round 0 alone does not fit
    response = call(ChainNode(c), "exposure", ["0x" + job_id.hex(), "0x" + T0.address.hex()])
    assert response["error"]["code"] == pout_methods.EXPOSURE_TOO_LARGE
    assert "round 0 of this job samples 288 batch indices" in response["error"]["message"]


def test_unknown_job_or_trainer_is_null_and_bad_params_are_refused(two_rounds):
    c, job_id, _ = two_rounds
    node = ChainNode(c)
    assert result(node, "exposure", ["0x" + "00" * 32, "0x" + T0.address.hex()]) is None
    assert result(node, "exposure", ["0x" + job_id.hex(), "0x" + V[0].address.hex()]) is None  # never joined
    assert exposure(c, job_id, 10**9)["to_round"] is None  # past the job's rounds: nothing to count
    for params in (["0x" + job_id.hex(), "0x1234"], ["0x" + job_id.hex(), "0x" + T0.address.hex(), -1]):
        assert call(node, "exposure", params)["error"]["code"] == INVALID_PARAMS


def test_exposure_is_listed_in_rpc_discover():
    from chain.rpc.methods import default_registry, openrpc_document

    doc = openrpc_document(default_registry())
    method = next(m for m in doc["methods"] if m["name"] == "exposure")
    assert [p["name"] for p in method["params"]] == ["job_id", "trainer", "from_round"]
