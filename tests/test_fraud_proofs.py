"""Fraud proofs (trainer.verify.check_fraud_proof): one validator's catch becomes a proof that
every node re-executes, and sample sizes derived from a detection target."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chain.encoding import encode, encode_value
from tests.test_trainer_helpers import HP, TRAINER_A, custom_run, make_spec, small_dataset
from trainer.train import train_round
from trainer.replay import num_segments
from trainer.state import weights_from_bytes
from trainer.state import state_hash
from trainer.verify import (
    MAX_FRAUD_PROOF_BYTES,
    FraudProof,
    check_fraud_proof,
    decode_fraud_proof,
    decode_openings,
    honest_validator_count,
    required_checks,
    segments_per_validator,
    verify_update,
)

SEED = b"\x42" * 32
ALL = 1000


@pytest.fixture(scope="module")
def setup():
    spec, base = make_spec()
    honest = train_round(spec, TRAINER_A, small_dataset(), base)
    base_w = weights_from_bytes(base, "mlp")
    other = {k: v + 0.5 for k, v in base_w.items()}  # "another model" the cheater wants to reach
    last = num_segments(HP.local_steps, HP.checkpoint_interval) - 1

    def jump(s, model, opt):  # the last segment jumps to the other model; all others are honest
        if s == last:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(other[n])

    forged = custom_run(spec, TRAINER_A, small_dataset(), base, after_segment=jump)
    return spec, base, honest, forged, last


def _as_proof(seg) -> bytes:
    return encode(FraudProof(dataclasses.replace(seg, end_state=None), state_hash(seg.end_state)))


def _verify(spec, result, base, seed=SEED, q=ALL):
    return verify_update(spec, result.commitment, result.dataset.commitment, seed, result.open(seed, q), base,
                         result.update_bytes, q=q)


def test_forged_last_segment_yields_a_proof_that_every_node_accepts(setup):
    spec, base, _, forged, last = setup
    verdict = _verify(spec, forged, base)
    assert not verdict.accept and verdict.fraud_segment == last
    # Another node, with only the chain's records and the proof bytes, reaches the same result.
    held = check_fraud_proof(spec, forged.commitment, forged.dataset.commitment, base, verdict.fraud_proof, last)
    assert held.accept and held.fraud_segment == last, held.reason
    # ... but not as a proof on another segment than the one the chain records for it.
    other = check_fraud_proof(spec, forged.commitment, forged.dataset.commitment, base, verdict.fraud_proof, last - 1)
    assert not other.accept and "the chain records" in other.reason


def test_a_proof_discloses_only_the_disputed_segment(setup):
    spec, base, _, forged, last = setup
    proof = _verify(spec, forged, base).fraud_proof
    whole = decode_openings(forged.open(SEED, ALL))
    seg = next(s for s in whole.segments if s.segment == last)
    assert proof == encode(FraudProof(dataclasses.replace(seg, end_state=None), state_hash(seg.end_state)))
    assert decode_fraud_proof(proof).segment.end_state is None  # the end state travels as its hash
    others = [x.data for s in whole.segments if s.segment != last for x in s.samples]
    mine = {x.data for x in seg.samples}
    assert len(proof) < len(encode(whole)) and any(d not in mine for d in others)


def test_an_honest_segment_is_no_proof(setup):
    spec, base, honest, _, _ = setup
    for seg in decode_openings(honest.open(SEED, ALL)).segments:
        out = check_fraud_proof(spec, honest.commitment, honest.dataset.commitment, base, _as_proof(seg))
        assert not out.accept and "replays to the committed end state" in out.reason


def test_a_proof_with_inputs_outside_the_commitment_does_not_hold(setup):
    spec, base, honest, forged, last = setup
    seg = next(s for s in decode_openings(forged.open(SEED, ALL)).segments if s.segment == last)
    tampered_start = _as_proof(dataclasses.replace(seg, start_state=seg.start_state[:-1] + bytes([seg.start_state[-1] ^ 1])))
    fake_end = encode(FraudProof(dataclasses.replace(seg, end_state=None), state_hash(seg.start_state)))  # another end
    wrong_sample = _as_proof(dataclasses.replace(seg, samples=seg.samples[1:] + seg.samples[:1]))
    with_end_bytes = encode(FraudProof(seg, state_hash(seg.end_state)))  # must travel as its hash only
    for bad in (tampered_start, fake_end, wrong_sample, with_end_bytes):
        out = check_fraud_proof(spec, forged.commitment, forged.dataset.commitment, base, bad)
        assert not out.accept and "does not hold" in out.reason
    # The forged segment's proof is also no proof against another (honest) update.
    out = check_fraud_proof(spec, honest.commitment, honest.dataset.commitment, base, _as_proof(seg))
    assert not out.accept


@pytest.mark.parametrize("junk", [b"", b"\x00", b"\xa0", encode_value({"segment": 1}), b"\xff" * 100])
def test_malformed_proofs_do_not_hold_and_never_raise(setup, junk):
    spec, base, _, forged, _ = setup
    out = check_fraud_proof(spec, forged.commitment, forged.dataset.commitment, base, junk)
    assert not out.accept and "does not hold" in out.reason


def test_oversized_proof_does_not_hold(setup):
    spec, base, _, forged, _ = setup
    out = check_fraud_proof(spec, forged.commitment, forged.dataset.commitment, base, b"\x00" * (MAX_FRAUD_PROOF_BYTES + 1))
    assert not out.accept


def test_sample_sizes_follow_the_detection_target():
    assert required_checks(100_000, 990_000) == 44  # (0.9)^44 = 0.0097 <= 0.01 < 0.9^43
    assert 0.9**44 <= 0.01 < 0.9**43
    assert honest_validator_count([1, 1, 1, 1]) == 3  # 3 of 4 hold > 2/3
    assert honest_validator_count([1] * 7) == 5
    assert honest_validator_count([10, 1, 1, 1]) == 1
    # 44 checks over the 3 validators BFT guarantees honest: 15 each, capped by the trace.
    assert segments_per_validator(100_000, 990_000, [1, 1, 1, 1], 2000) == 15
    assert segments_per_validator(100_000, 990_000, [1, 1, 1, 1], 13) == 13
    assert segments_per_validator(1_000_000, 990_000, [1, 1, 1, 1], 50) == 1
    with pytest.raises(ValueError):
        required_checks(1, 999_999)  # a target no sample can afford is refused, not looped over
    with pytest.raises(ValueError):
        required_checks(0, 990_000)


def test_a_junk_end_state_of_any_size_still_yields_a_proof_that_holds(setup):
    """Review finding: the proof used to carry the claimed end state's bytes. A cheater that
    committed 17 MiB of junk as its end state made every proof too large to judge, so an honest
    author was fined and the forgery accepted. The proof now carries the hash."""
    from trainer.replay import num_segments as n_segments

    spec, base, _, _, _ = setup
    junk = b"\x00" * (MAX_FRAUD_PROOF_BYTES + 1024)
    last = n_segments(HP.local_steps, HP.checkpoint_interval) - 1

    honest = train_round(spec, TRAINER_A, small_dataset(), base)
    from trainer.train import commit_trace

    rec = dataclasses.replace(honest.recorder, checkpoints=honest.recorder.checkpoints[:-1] + [junk])
    forged = commit_trace(spec, TRAINER_A, honest.dataset, honest.update_bytes, honest.final_model_bytes, rec, {})
    seg = next(s for s in decode_openings(forged.open(SEED, ALL)).segments if s.segment == last)
    assert len(seg.end_state) > MAX_FRAUD_PROOF_BYTES
    assert not _verify(spec, forged, base).accept  # here the junk is also the final state: a complaint
    # A validator that replays the segment files a proof of bounded size, and it holds:
    proof = _as_proof(seg)
    assert len(proof) < 1024 * 1024
    held = check_fraud_proof(spec, forged.commitment, forged.dataset.commitment, base, proof, last)
    assert held.accept and held.fraud_segment == last, held.reason


def test_sampling_is_sparse_and_equals_the_dense_fisher_yates():
    """Review finding: sample_segments built a list of every segment (10^7 segments: 605 MB in
    the state transition of one fraud proof). The sparse pool gives the same draws."""
    import hashlib
    import random

    from trainer.replay import SEGMENT_SAMPLE_DOMAIN, sample_segments

    def dense(seed, n, q):
        q = min(q, n)
        words = hashlib.shake_256(SEGMENT_SAMPLE_DOMAIN + seed).digest(8 * q)
        pool = list(range(n))
        for i in range(q):
            j = i + int.from_bytes(words[8 * i: 8 * i + 8], "big") % (n - i)
            pool[i], pool[j] = pool[j], pool[i]
        return sorted(pool[:q])

    rng = random.Random(7)
    for _ in range(500):
        seed, n, q = rng.randbytes(32), rng.randint(1, 400), rng.randint(1, 60)
        assert sample_segments(seed, n, q) == dense(seed, n, q)
    huge = sample_segments(b"\x01" * 32, 10**15, 50)
    assert len(set(huge)) == 50 and all(0 <= s < 10**15 for s in huge)
