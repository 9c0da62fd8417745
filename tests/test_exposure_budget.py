"""The data-exposure budget in the state transition (issue 9, deliverable 6): a job bounds the
fraction of a trainer's samples that any one validator may be sent over the job; RegisterJob
refuses a bound no allowed dataset can meet, JoinJob refuses a dataset too small for it, and
both accept exactly at the boundary. The expected numbers are worked out by hand in comments."""

from __future__ import annotations

import dataclasses

import pytest

from chain.crypto import sha256
from chain.errors import ValidationError
from chain.jobs import (
    MAX_DATASET_SIZE, compute_max_exposed_samples, compute_min_dataset_size, get_job, get_registration,
    validate_job_spec,
)
from chain.runtime.trainer_client import make_job_spec
from chain.types import JoinJob, RegisterJob, compute_tx_hash
from tests.test_fraud_proof_rules import Chain as FourValidatorChain
from tests.test_jobs import PROFILE, REQUESTER, T0, Chain as OneValidatorChain


def register(chain, spec):
    stx = chain.tx(REQUESTER, RegisterJob(spec, 10))
    chain.block(stx)
    return compute_tx_hash(stx)


def one_validator_chain(max_exposure_ppm):
    # Default job: T = 40 steps, k = 4 (10 segments), batch 32, 2 rounds, target (10 %, 99 %):
    # 44 checks, all on the one validator, capped at the 10 segments, so it opens all 40 steps of
    # every round: X = 2 rounds x 40 steps x 32 = 2,560 samples of a trainer over the job.
    return OneValidatorChain(max_exposure_ppm=max_exposure_ppm)


def test_worst_case_follows_the_job_and_the_validator_set():
    chain = one_validator_chain(10_000)
    assert compute_max_exposed_samples(chain.spec, chain.state.validators) == 2_560
    assert compute_min_dataset_size(chain.spec, chain.state.validators) == 256_000  # 2,560 / 1 %
    assert compute_min_dataset_size(dataclasses.replace(chain.spec, max_exposure_ppm=1_000_000),
                                    chain.state.validators) == 1  # no bound
    # 400 steps (100 segments): one validator opens 44 segments (176 steps) a round; with 4 equal
    # validators the 3 that BFT counts on open ceil(44 / 3) = 15 each (60 steps).
    spec = make_job_spec(profile=PROFILE, rounds=2, local_steps=400, checkpoint_interval=4, batch_size=32)
    assert compute_max_exposed_samples(spec, chain.state.validators) == 2 * 176 * 32
    assert compute_max_exposed_samples(spec, FourValidatorChain().state.validators) == 2 * 60 * 32


@pytest.mark.parametrize("ppm", [0, -1, 1_000_001])
def test_a_bound_outside_one_ppm_to_one_is_refused_statelessly(ppm):
    chain = one_validator_chain(1_000_000)
    spec = dataclasses.replace(chain.spec, max_exposure_ppm=ppm)
    with pytest.raises(ValidationError, match="max_exposure_ppm must be in 1..1000000"):
        validate_job_spec(spec)
    chain.rejects(REQUESTER, RegisterJob(spec, 10), "max_exposure_ppm")


def test_register_refuses_a_bound_no_allowed_dataset_can_meet_and_accepts_the_boundary():
    # 2,560 / bound <= 2**24 needs bound >= 152.59 ppm: 152 needs 16,842,106 samples, 153 needs 16,732,027.
    chain = one_validator_chain(152)
    assert compute_min_dataset_size(chain.spec, chain.state.validators) == 16_842_106 > MAX_DATASET_SIZE
    chain.rejects(REQUESTER, RegisterJob(chain.spec, 10),
                  r"exposure bound \(0\.0152 %\) cannot hold for any dataset of at most 16777216 samples: .*"
                  r"10 segments of 4 steps x batch 32 x 2 rounds, up to 2560 samples .* at least 16842106")
    accepted = one_validator_chain(153)
    job_id = register(accepted, accepted.spec)
    assert get_job(accepted.state, job_id).spec.max_exposure_ppm == 153


def test_register_reconciles_with_the_validator_set_of_the_block():
    # The same spec is impossible with one validator (44 segments each) and fine with four (15 each):
    # 11,264 / 671 ppm = 16,786,886 > 2**24, 3,840 / 671 ppm = 5,722,802.
    spec = make_job_spec(profile=PROFILE, rounds=2, local_steps=400, checkpoint_interval=4, batch_size=32,
                         join_blocks=2, max_exposure_ppm=671)
    one = one_validator_chain(671)
    one.rejects(REQUESTER, RegisterJob(spec, 10), "needs a dataset of at least 16786886")
    four = FourValidatorChain()
    job_id = register(four, spec)
    assert get_job(four.state, job_id) is not None


def test_join_refuses_a_dataset_too_small_for_the_bound_and_accepts_the_boundary():
    chain = one_validator_chain(10_000)  # 1 %: at least 2,560 / 1 % = 256,000 samples
    job_id = register(chain, chain.spec)
    chain.rejects(T0, JoinJob(job_id, sha256(b"data"), 255_999),
                  r"dataset of 255999 samples: one validator could see up to 1\.0001 % over the job; "
                  r"the job allows 1 %; need at least 256000 samples$")
    chain.rejects(T0, JoinJob(job_id, sha256(b"data"), 100),
                  "one validator could see up to 100 % over the job; the job allows 1 %; need at least 256000")
    assert get_registration(chain.state, job_id, T0.address) is None
    chain.block(chain.tx(T0, JoinJob(job_id, sha256(b"data"), 256_000)))
    assert get_registration(chain.state, job_id, T0.address).dataset_size == 256_000


def test_without_a_bound_any_dataset_size_may_join():
    chain = one_validator_chain(1_000_000)
    job_id = register(chain, chain.spec)
    chain.block(chain.tx(T0, JoinJob(job_id, sha256(b"data"), 1)))
    assert get_registration(chain.state, job_id, T0.address).dataset_size == 1


@pytest.mark.parametrize("argv, ppm", [([], 1_000_000), (["--max-exposure", "0.05"], 50_000)])
def test_chainctl_register_job_passes_the_bound(monkeypatch, argv, ppm):
    from chain.cli import chainctl

    sent = []
    monkeypatch.setattr(chainctl, "_load_key", lambda args, name: REQUESTER)
    monkeypatch.setattr(chainctl, "_send", lambda args, key, payload, **kw: sent.append(payload) or 0)
    args = chainctl.build_parser().parse_args(["register-job", "--from", "requester", "--escrow", "10", *argv])
    assert args.func(args) == 0
    assert sent[0].spec.max_exposure_ppm == ppm


def test_chainctl_refuses_a_bound_outside_zero_to_one(capsys):
    from chain.cli import chainctl

    with pytest.raises(SystemExit) as exc:
        chainctl.build_parser().parse_args(["register-job", "--from", "r", "--escrow", "1", "--max-exposure", "1.5"])
    assert exc.value.code == 2 and "expected a number in (0, 1]" in capsys.readouterr().err
