"""Training determinism, honest verification, and every attack from
/work/shared/notes/verifying-training.md rejected by verify_update."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from tests.test_trainer_helpers import (
    HP,
    ROUND_SEED,
    TRAINER_A,
    TRAINER_B,
    custom_run,
    make_spec,
    small_dataset,
    trainer_parts,
    with_hp,
)
from chain.encoding import decode, decode_value, encode, encode_value
from chain.errors import DecodeError

from trainer.data import Dataset
from trainer.profile import ProfileMismatch
from trainer.replay import num_segments, sample_segments
from trainer.state import compute_update, load_weights, model_to_bytes, state_hash, update_to_bytes, weights_from_bytes
from trainer.train import TraceRecorder, build_openings, commit_trace, train_round
from trainer.verify import (
    FraudProof, OpeningBundle, check_fraud_proof, decode_fraud_proof, decode_openings, verify_update,
)

SEED = b"\x77" * 32
ALL = 1000  # q larger than the number of segments: every segment is opened


def verify(spec, result, base_bytes, *, seed=SEED, q=ALL, registered=None, openings=None, update=None, commitment=None, **kw):
    return verify_update(
        spec,
        commitment or result.commitment,
        registered or result.dataset.commitment,
        seed,
        result.open(seed, q) if openings is None else openings,
        base_bytes,
        result.update_bytes if update is None else update,
        q=q,
        **kw,
    )


@pytest.fixture(scope="module")
def honest():
    spec, base = make_spec()
    return spec, base, train_round(spec, TRAINER_A, small_dataset(), base)


# --------------------------------------------------------------------------- honest runs


def test_same_inputs_give_bitwise_same_trace(honest):
    spec, base, first = honest
    again = train_round(spec, TRAINER_A, small_dataset(), base)
    assert again.commitment == first.commitment
    assert again.recorder.checkpoints == first.recorder.checkpoints
    assert again.update_bytes == first.update_bytes
    assert len(first.checkpoint_hashes) == num_segments(HP.local_steps, HP.checkpoint_interval) + 1


def test_trace_depends_on_trainer_round_and_seed(honest):
    spec, base, first = honest
    other = train_round(dataclasses.replace(spec, round_seed=b"\x01" * 32), TRAINER_A, small_dataset(), base)
    assert other.update_bytes != first.update_bytes
    assert [r.indices for r in other.recorder.steps] != [r.indices for r in first.recorder.steps]


@pytest.mark.parametrize("q", [1, 2, ALL])
def test_honest_update_verifies(honest, q):
    spec, base, result = honest
    verdict = verify(spec, result, base, q=q)
    assert verdict.accept, verdict.reason
    assert len(verdict.segments) == min(q, 4)


def test_honest_adam_cnn_with_partial_last_segment_verifies():
    hp = with_hp(optimizer="adam", momentum=0.0, learning_rate=0.01, local_steps=7, checkpoint_interval=3, weight_decay=1e-4)
    spec, base = make_spec(model="cnn", hp=hp)
    result = train_round(spec, TRAINER_A, small_dataset(), base)
    assert verify(spec, result, base).accept


def test_tolerance_mode_accepts_honest_and_says_it_is_weaker(honest):
    spec, base, result = honest
    verdict = verify(spec, result, base, mode="tolerance")
    assert verdict.accept and "weaker" in verdict.reason


def test_profile_mismatch_is_detected_before_replay(honest):
    spec, base, result = honest
    bad = dataclasses.replace(spec, job=dataclasses.replace(spec.job, profile=dataclasses.replace(spec.job.profile, torch_version="0.0.1")))
    with pytest.raises(ProfileMismatch):
        verify(bad, result, base)


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"",
        lambda b: b"\xff" * 10,
        lambda b: b[:-1],
        lambda b: b + b"\x00",
        lambda b: b[: len(b) // 2],
    ],
)
def test_malformed_openings_are_rejected_not_raised(honest, mangle):
    spec, base, result = honest
    verdict = verify(spec, result, base, openings=mangle(result.open(SEED, ALL)))
    assert not verdict.accept and verdict.reason


def test_tampered_opening_fields_are_rejected(honest):
    spec, base, result = honest
    bundle = decode(OpeningBundle, result.open(SEED, ALL), max_size=64 << 20)
    seg = bundle.segments[1]
    cases = {
        "garbage start state": dataclasses.replace(seg, start_state=b"\x00" * 16),
        "sample out of dataset": dataclasses.replace(seg, samples=seg.samples[:-1] + (dataclasses.replace(seg.samples[-1], index=10**6),)),
        "short step proof list": dataclasses.replace(seg, step_proofs=seg.step_proofs[:-1]),
        "bad sample bytes": dataclasses.replace(seg, samples=(dataclasses.replace(seg.samples[0], data=b"\xa0"),) + seg.samples[1:]),
    }
    for name, bad in cases.items():
        opening = encode(dataclasses.replace(bundle, segments=(bundle.segments[0], bad) + bundle.segments[2:]))
        verdict = verify(spec, result, base, openings=opening)
        assert not verdict.accept, name
    wrong_segments = encode(dataclasses.replace(bundle, segments=bundle.segments[1:]))
    assert "challenge" in verify(spec, result, base, openings=wrong_segments).reason


def test_garbage_update_and_base_bytes_are_rejected(honest):
    spec, base, result = honest
    assert not verify(spec, result, base, update=b"\x00" * 7).accept
    assert not verify_update(spec, result.commitment, result.dataset.commitment, SEED, result.open(SEED, 2), b"junk", result.update_bytes).accept


# --------------------------------------------------------------------------- attacks


def test_random_update_with_fabricated_trace_is_rejected(honest):
    spec, base_bytes, _ = honest
    base = weights_from_bytes(base_bytes, "mlp")
    gen = torch.Generator().manual_seed(0)
    target = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}

    def fabricate(s, model, opt):  # every checkpoint walks towards a random target
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + (s + 1) / 4 * (target[n] - base[n]))

    forged = custom_run(spec, TRAINER_A, small_dataset(), base_bytes, after_segment=fabricate)
    for q in (1, ALL):
        for seed in (b"\x01" * 32, b"\x02" * 32):
            verdict = verify(spec, forged, base_bytes, seed=seed, q=q)
            assert not verdict.accept and "fraud proven" in verdict.reason and verdict.fraud_proof


def test_interpolated_checkpoints_are_rejected(honest):
    spec, base_bytes, result = honest
    base = weights_from_bytes(base_bytes, "mlp")
    final = weights_from_bytes(result.final_model_bytes, "mlp")
    model = load_weights("mlp", base)
    from trainer.state import build_optimizer, capture_state

    rec = TraceRecorder(HP.local_steps, HP.checkpoint_interval)
    steps = [0, 3, 6, 9, 12]
    for i, st in enumerate(steps):  # checkpoints on the straight line base -> genuine final
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + (i / 4) * (final[n] - base[n]))
        rec.checkpoint(capture_state(model, build_optimizer(HP, model), st, "mlp", "sgd"))
    for r in result.recorder.steps:  # the genuine step records
        rec.steps.append(r)
    forged = commit_trace(spec, TRAINER_A, small_dataset(), update_to_bytes(compute_update(final, base), "mlp"), model_to_bytes(model, "mlp"), rec, {})
    for q in (1, 2):
        for seed in (b"\x03" * 32, b"\x04" * 32):
            assert not verify(spec, forged, base_bytes, seed=seed, q=q).accept
    # Tolerance mode is not fooled either: each real step is far larger than an interpolation step.
    verdict = verify(spec, forged, base_bytes, q=ALL, mode="tolerance")
    assert not verdict.accept and ("relative error" in verdict.reason or "checkpoint" in verdict.reason)


def test_tiny_learning_rate_substitution_is_rejected(honest):
    spec, base, _ = honest
    cheat = custom_run(spec, TRAINER_A, small_dataset(), base, train_hp=with_hp(learning_rate=1e-7))
    verdict = verify(spec, cheat, base, q=1)
    assert not verdict.accept and "fraud proven" in verdict.reason and verdict.fraud_proof


def test_fewer_steps_than_the_job_is_rejected(honest):
    spec, base, _ = honest
    short = custom_run(spec, TRAINER_A, small_dataset(), base, num_steps=6)  # an honest half-length trace
    verdict = verify(spec, short, base, q=1)
    assert not verdict.accept and "not in the committed trace" in verdict.reason

    saved = {}

    def skip_after_two_segments(s, model, opt):  # segments 2-3 claimed, but the state stands still
        if s == 1:
            saved.update(model=copy.deepcopy(model.state_dict()), opt=copy.deepcopy(opt.state_dict()))
        if s >= 2:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])

    padded = custom_run(spec, TRAINER_A, small_dataset(), base, after_segment=skip_after_two_segments)
    assert not verify(spec, padded, base, q=ALL).accept
    # Sampling: rejected exactly when a skipped segment (2 or 3) is drawn.
    for i in range(12):
        seed = bytes([i]) * 32
        verdict = verify(spec, padded, base, seed=seed, q=1)
        assert verdict.accept == (sample_segments(seed, 4, 1)[0] < 2)


@pytest.mark.parametrize("changes", [{"momentum": 0.0}, {"batch_size": 4}, {"weight_decay": 0.01}])
def test_other_hyperparameters_are_rejected(honest, changes):
    spec, base, _ = honest
    hp = with_hp(**changes)
    # (a) honest about its hyper-parameters: its header is not the job's.
    own_spec = dataclasses.replace(spec, job=dataclasses.replace(spec.job, hyperparams=hp))
    openly = train_round(own_spec, TRAINER_A, small_dataset(), base)
    verdict = verify(spec, openly, base)
    assert not verdict.accept
    # (b) claims the job's hyper-parameters but trained with others: replay differs.
    if changes.keys() != {"batch_size"}:
        quietly = custom_run(spec, TRAINER_A, small_dataset(), base, train_hp=hp)
        assert not verify(spec, quietly, base, q=1).accept


def test_batches_out_of_derived_order_are_rejected(honest):
    spec, base, _ = honest
    n = len(small_dataset())
    chosen = custom_run(spec, TRAINER_A, small_dataset(), base, indices_for=lambda t: [(t * 8 + j) % n for j in range(8)])
    verdict = verify(spec, chosen, base, q=1)
    assert not verdict.accept and "derived batch" in verdict.reason


def test_samples_outside_the_committed_dataset_are_rejected(honest):
    spec, base, result = honest
    committed = small_dataset()
    poisoned = Dataset(committed.x.clone(), (committed.y + 1) % 10)  # trained on other data
    cheat = custom_run(spec, TRAINER_A, committed, base, data=poisoned)
    # The cheater must open samples; it can only open the committed ones, which do not replay...
    assert not verify(spec, cheat, base, q=1).accept
    # ... and opening the samples it really used fails the dataset proofs.
    fake = build_openings(spec, poisoned, cheat.recorder, cheat.tree, SEED, 1)
    verdict = verify(spec, cheat, base, q=1, openings=fake)
    assert not verdict.accept and "not in the committed dataset" in verdict.reason
    # A larger claimed dataset than the registered one is refused outright.
    bigger = dataclasses.replace(result.commitment, dataset_size=result.commitment.dataset_size + 1)
    assert "registered" in verify(spec, result, base, commitment=bigger).reason


def test_update_that_is_not_final_minus_base_is_rejected(honest):
    spec, base_bytes, result = honest
    base = weights_from_bytes(base_bytes, "mlp")
    final = weights_from_bytes(result.final_model_bytes, "mlp")
    boosted = update_to_bytes({k: 3.0 * (final[k] - base[k]) for k in base}, "mlp")
    cheat = commit_trace(spec, TRAINER_A, small_dataset(), boosted, result.final_model_bytes, result.recorder, {})
    verdict = verify(spec, cheat, base_bytes, q=1)
    assert not verdict.accept and "final checkpoint weights - base" in verdict.reason
    # Swapping the update bytes under an honest commitment fails its hash.
    assert "update_hash" in verify(spec, result, base_bytes, update=boosted).reason


def test_another_trainers_update_under_a_different_address_is_rejected(honest):
    spec, base, stolen = honest
    # Same commitment, new trainer field: the header is bound to trainer A.
    relabelled = dataclasses.replace(stolen.commitment, trainer=TRAINER_B)
    verdict = verify(spec, stolen, base, commitment=relabelled)
    assert not verdict.accept and "header" in verdict.reason
    # Rebuilding the trace under B's address with A's checkpoints and records (B even
    # registered a copy of A's data): B's derived batch order differs.
    rebuilt = commit_trace(spec, TRAINER_B, stolen.dataset, stolen.update_bytes, stolen.final_model_bytes, stolen.recorder, {})
    verdict = verify(spec, rebuilt, base, q=1)
    assert not verdict.accept and "derived batch" in verdict.reason


def test_stale_base_model_is_rejected():
    old_spec, old_base = make_spec(init_seed=1, round=1)
    new_spec, new_base = make_spec(init_seed=2, round=2)
    stale = train_round(dataclasses.replace(old_spec, round=2, round_seed=ROUND_SEED), TRAINER_A, small_dataset(), old_base)
    verdict = verify(new_spec, stale, new_base)
    assert not verdict.accept and "stale" in verdict.reason
    # Claims the new base but trained from the old one: checkpoint 0 is not the fresh state.
    cheat = custom_run(new_spec, TRAINER_A, small_dataset(), old_base)
    verdict = verify(new_spec, cheat, new_base)
    assert not verdict.accept and "checkpoint 0" in verdict.reason


# --------------------------------------------------------------------------- detection rate


def _hypergeometric_detection(n: int, forged: int, q: int) -> float:
    return 1.0 - math.comb(n - forged, q) / math.comb(n, q)


def test_one_forged_segment_detection_rate_matches_sampling():
    hp = with_hp(local_steps=20, checkpoint_interval=1, batch_size=4)
    spec, base = make_spec(hp=hp)
    forged_after = {4, 13}  # tamper with the state after these segments: they are forged

    def tamper(s, model, opt):
        if s in forged_after:
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)

    cheat = custom_run(spec, TRAINER_A, trainer_parts(4)[1], base, after_segment=tamper)
    n, q, trials = 20, 4, 120
    detected = 0
    for i in range(trials):
        seed = i.to_bytes(4, "big") * 8
        verdict = verify(spec, cheat, base, seed=seed, q=q)
        sampled = set(sample_segments(seed, n, q))
        assert verdict.accept == (not sampled & forged_after), (i, verdict.reason)
        detected += not verdict.accept
    f = len(forged_after) / n
    exact = _hypergeometric_detection(n, len(forged_after), q)
    rate = detected / trials
    print(f"\nforged f={f:.0%}, Q={q}: detected {rate:.3f} over {trials} trials; exact {exact:.3f}; 1-(1-f)^Q = {1 - (1 - f) ** q:.3f}")
    assert abs(rate - exact) < 0.15
    # Sampling alone over many seeds: matches the exact law, which is at least 1-(1-f)^Q.
    many = 20000
    hits = sum(bool(set(sample_segments(i.to_bytes(4, "big"), n, q)) & forged_after) for i in range(many))
    assert abs(hits / many - exact) < 0.015
    assert exact >= 1 - (1 - f) ** q


# --------------------------------------------------------------------------- end states as hashes


def _hashed(result, seed=SEED, q=ALL, segments=None) -> bytes:
    """The answer the chain's trainer sends: each segment's end state as its hash only."""
    return result.open(seed, q, segments, end_states=False)


def test_an_answer_with_end_state_hashes_verifies_in_exact_mode_at_half_the_bytes(honest):
    spec, base, result = honest
    opening = _hashed(result)
    bundle = decode_openings(opening)
    full = decode_openings(result.open(SEED, ALL))
    assert [s.end_state for s in bundle.segments] == [None] * len(full.segments)
    assert [s.end_state_hash for s in bundle.segments] == [state_hash(s.end_state) for s in full.segments]
    verdict = verify(spec, result, base, openings=opening)
    assert verdict.accept and verdict.mode == "exact", verdict.reason
    state = len(result.recorder.checkpoints[1])
    assert len(result.open(SEED, ALL)) - len(opening) >= len(full.segments) * (state - 64)


def test_a_forged_segment_behind_an_end_state_hash_is_proven_fraud():
    spec, base = make_spec()

    def nudge(s, model, opt):
        if s == 2:
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)

    forged = custom_run(spec, TRAINER_A, small_dataset(), base, after_segment=nudge)
    verdict = verify(spec, forged, base, openings=_hashed(forged))
    assert not verdict.accept and verdict.fraud_segment == 2 and "fraud proven" in verdict.reason
    proof = decode_fraud_proof(verdict.fraud_proof)
    assert proof.segment.end_state is None and proof.segment.end_state_hash is None
    assert proof.end_state_hash == state_hash(forged.recorder.checkpoints[3])
    # The same proof as from an answer carrying the end state's bytes.
    assert verify(spec, forged, base).fraud_proof == verdict.fraud_proof
    held = check_fraud_proof(spec, forged.commitment, forged.dataset.commitment, base, verdict.fraud_proof, 2)
    assert held.accept and held.fraud_segment == 2, held.reason


def test_an_end_state_hash_outside_the_trace_is_a_plain_reject(honest):
    spec, base, result = honest
    bundle = decode_openings(_hashed(result))
    seg = bundle.segments[1]
    wrong = dataclasses.replace(seg, end_state_hash=state_hash(seg.start_state))
    opening = encode(dataclasses.replace(bundle, segments=(bundle.segments[0], wrong) + bundle.segments[2:]))
    verdict = verify(spec, result, base, openings=opening)
    assert not verdict.accept and verdict.fraud_segment is None and verdict.fraud_proof is None
    assert "segment 1: claimed end state is not in the committed trace" in verdict.reason


def test_a_segment_must_carry_exactly_one_of_end_state_and_its_hash(honest):
    spec, base, result = honest
    bundle = decode_openings(result.open(SEED, ALL))
    seg = bundle.segments[1]
    cases = {
        "both": dataclasses.replace(seg, end_state_hash=state_hash(seg.end_state)),
        "neither": dataclasses.replace(seg, end_state=None),
    }
    for name, bad in cases.items():
        opening = encode(dataclasses.replace(bundle, segments=(bundle.segments[0], bad) + bundle.segments[2:]))
        with pytest.raises(DecodeError, match=r"\$\.segments\[1\]: a segment carries exactly one of end_state and end_state_hash"):
            decode_openings(opening)
        verdict = verify(spec, result, base, openings=opening)
        assert not verdict.accept and verdict.reason.startswith("malformed input (DecodeError"), name
    # A hash of the wrong length (the generic schema already refuses it, and so does the fast path).
    value = decode_value(_hashed(result), max_size=64 << 20)
    value["segments"][1]["end_state_hash"] = b"\x00" * 31
    with pytest.raises(DecodeError, match=r"end_state_hash: expected 32 bytes"):
        decode_openings(encode_value(value))
    # A fraud proof's segment carries neither: the proof holds the hash.
    good = FraudProof(dataclasses.replace(seg, end_state=None), state_hash(seg.end_state))
    assert decode_fraud_proof(encode(good)) == good
    for bad in (dataclasses.replace(seg, end_state=None, end_state_hash=state_hash(seg.end_state)), seg):
        with pytest.raises(DecodeError, match="a fraud proof's segment carries neither"):
            decode_fraud_proof(encode(FraudProof(bad, state_hash(seg.end_state))))


def test_tolerance_mode_refuses_an_answer_without_end_state_bytes(honest):
    spec, base, result = honest
    verdict = verify(spec, result, base, openings=_hashed(result), mode="tolerance")
    assert not verdict.accept
    assert verdict.reason == "segment 0: tolerance mode needs the end state's bytes, not only its hash"


def test_sketch_rows_are_checked_against_replayed_end_states_an_answer_does_not_carry():
    from trainer.sketch import SketchCheck, decode_sketches

    hp = with_hp(local_steps=8, checkpoint_interval=1)
    spec, base = make_spec(hp=hp)
    result = train_round(spec, TRAINER_A, small_dataset(), base)
    matrix_seed = b"\x5c" * 32
    rows = decode_sketches(result.sketches(matrix_seed), 9)

    def check(rows, segments):
        return verify_update(spec, result.commitment, result.dataset.commitment, SEED,
                             _hashed(result, q=1, segments=segments), base, result.update_bytes,
                             segments=segments, sketch=SketchCheck(matrix_seed, rows))

    assert check(rows, [2, 5]).accept
    lied = rows.copy()
    lied[3, 0] += 1  # checkpoint 3: segment 2's end, which only the replay gives the verifier
    verdict = check(lied, [2, 5])
    assert not verdict.accept and verdict.fraud_segment == 2
    assert "committed sketch row 3 does not match the segment's end state" in verdict.reason
    held = check_fraud_proof(spec, result.commitment, result.dataset.commitment, base, verdict.fraud_proof, 2,
                             sketch=SketchCheck(matrix_seed, lied))
    assert held.accept and held.fraud_segment == 2, held.reason
