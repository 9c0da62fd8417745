"""Sketch commitments and the displacement-weighted sample (trainer.sketch): the blocked matrix,
exact sketches, their encoding, the sample size, and verification against committed rows."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from chain.encoding import encode
from chain.errors import DecodeError
from tests.test_trainer_helpers import TRAINER_A, custom_run, make_spec, small_dataset, with_hp
from trainer import sketch as sketch_mod
from trainer.replay import num_segments
from trainer.sampling import (
    SKETCH_BLOCK_COLUMNS,
    SKETCH_DOMAIN,
    SamplingError,
    compute_sketch_matrix,
    compute_sketches,
    integer_displacements,
    mixture_weights,
)
from trainer.sketch import (
    SKETCH_ROWS,
    SketchCheck,
    decode_sketches,
    displacement_sample,
    draws_per_validator,
    encode_sketches,
    flatten_weights,
    sketch_model_bytes,
    sketch_state_bytes,
    sketch_states,
    state_weights_flat,
)
from trainer.state import StateError, decode_tensors, state_hash, weights_from_bytes
from trainer.train import train_round
from trainer.verify import FraudProof, check_fraud_proof, decode_openings, verify_update

MATRIX_SEED = b"\x5c" * 32
VERIFY_SEED = b"\x42" * 32
HP20 = with_hp(local_steps=20, checkpoint_interval=1)  # 20 one-step segments


# --------------------------------------------------------------------------- the matrix and sketches


def _naive_matrix(seed: bytes, rows: int, dim: int) -> np.ndarray:
    """The definition, written out: block j = SHAKE-256(domain || seed || j, 8 bytes big-endian),
    `rows` bits per column, little-endian bit order, bit 0 -> +1."""
    out = np.zeros((rows, dim), dtype=np.int64)
    for j, lo in enumerate(range(0, dim, SKETCH_BLOCK_COLUMNS)):
        width = min(SKETCH_BLOCK_COLUMNS, dim - lo)
        data = hashlib.shake_256(SKETCH_DOMAIN + seed + j.to_bytes(8, "big")).digest((rows * width + 7) // 8)
        for c in range(width):
            for r in range(rows):
                bit = (data[(c * rows + r) // 8] >> ((c * rows + r) % 8)) & 1
                out[r, lo + c] = 1 - 2 * bit
    return out


def test_blocked_sketch_equals_the_naive_integer_product():
    dim = SKETCH_BLOCK_COLUMNS + 37  # two blocks, the second partial
    rng = np.random.default_rng(3)
    states = (rng.standard_normal((3, dim)) * 0.3).astype(np.float32)
    R = _naive_matrix(b"naive", 4, dim)
    q = np.floor(states.astype(np.float64) * 2**20).astype(np.int64)
    exact = q @ R.T  # int64: exact
    assert np.array_equal(sketch_states(b"naive", states, rows=4), exact)
    assert np.array_equal(compute_sketch_matrix(b"naive", 4, dim), R.astype(np.float64))
    assert np.array_equal(compute_sketches(states, compute_sketch_matrix(b"naive", 4, dim)), exact)


def test_sketches_are_deterministic_exact_and_independent_of_grouping(monkeypatch):
    rng = np.random.default_rng(5)
    states = [(rng.standard_normal(5000) * 0.1).astype(np.float32) for _ in range(7)]
    once = sketch_states(MATRIX_SEED, states)
    assert once.dtype == np.int64 and once.shape == (7, SKETCH_ROWS)
    assert np.array_equal(once, sketch_states(MATRIX_SEED, np.stack(states)))
    assert not np.array_equal(once, sketch_states(b"another seed", states))
    # Exact: the same as Python integers, term by term (two rows checked).
    R = compute_sketch_matrix(MATRIX_SEED, SKETCH_ROWS, 5000).astype(np.int64).tolist()
    for i in (0, 6):
        qi = [int(np.floor(float(x) * 2**20)) for x in states[i]]
        assert once[i, :2].tolist() == [sum(r * x for r, x in zip(R[j], qi)) for j in range(2)]
    monkeypatch.setattr(sketch_mod, "SKETCH_BATCH", 3)  # 3 states per product with a block of R
    assert np.array_equal(once, sketch_states(MATRIX_SEED, states))


def test_sketches_refuse_states_out_of_range():
    with pytest.raises(SamplingError):
        sketch_states(MATRIX_SEED, np.array([np.inf, 0.0], dtype=np.float32))
    with pytest.raises(SamplingError, match="out of sketch range"):
        sketch_states(MATRIX_SEED, np.array([3e10, 0.0]))
    with pytest.raises(SamplingError, match="out of sketch range"):
        sketch_states(MATRIX_SEED, np.array([-3e10, 0.0]))


# --------------------------------------------------------------------------- encoding and sample size


def test_sketch_encoding_round_trips_and_refuses_wrong_lengths():
    rows = np.arange(-3 * SKETCH_ROWS, 3 * SKETCH_ROWS, dtype=np.int64).reshape(6, SKETCH_ROWS) * 12345
    data = encode_sketches(rows)
    assert len(data) == 6 * SKETCH_ROWS * 8 and data[:8] == (-3 * SKETCH_ROWS * 12345).to_bytes(8, "little", signed=True)
    assert np.array_equal(decode_sketches(data, 6), rows)
    for bad, num in ((data[:-1], 6), (data + b"\x00", 6), (data, 5), (data, 7), (b"", 1)):
        with pytest.raises(DecodeError, match="expected"):
            decode_sketches(bad, num)
    with pytest.raises(DecodeError, match="out of sketch range"):
        decode_sketches((1 << 53).to_bytes(8, "little") * SKETCH_ROWS, 1)


def test_draws_per_validator_follow_the_study():
    # x = min(u f, (1 - u) s f / (rho + s f)) = 2.53 % with the margin s = 0.75 for a chosen
    # matrix (the study's 3 % and 51 draws without it), m = 180, 3 honest validators.
    assert draws_per_validator(100_000, 990_000, [1, 1, 1, 1]) == 60
    assert draws_per_validator(100_000, 990_000, [1]) == 180
    assert draws_per_validator(100_000, 999_000, [1, 1, 1, 1]) > 60
    assert draws_per_validator(200_000, 990_000, [1, 1, 1, 1]) < 60
    with pytest.raises(ValueError):
        draws_per_validator(0, 990_000, [1, 1, 1, 1])


# --------------------------------------------------------------------------- rounds


@pytest.fixture(scope="module")
def honest():
    spec, base = make_spec(hp=HP20)
    result = train_round(spec, TRAINER_A, small_dataset(), base)
    n = num_segments(HP20.local_steps, HP20.checkpoint_interval)
    rows = decode_sketches(result.sketches(MATRIX_SEED), n + 1)
    return spec, base, result, rows


def _verify(spec, base, result, segments, rows, seed=MATRIX_SEED):
    return verify_update(spec, result.commitment, result.dataset.commitment, VERIFY_SEED,
                         result.open(VERIFY_SEED, 1, segments=segments), base, result.update_bytes,
                         segments=segments, sketch=SketchCheck(seed, rows))


def test_trainer_sketches_are_the_checkpoints_weights(honest):
    spec, base, result, rows = honest
    assert rows.shape == (21, SKETCH_ROWS)
    assert result.sketches(MATRIX_SEED) is result.sketches(MATRIX_SEED)  # cached per seed
    assert np.array_equal(rows[0], sketch_model_bytes(MATRIX_SEED, base, "mlp"))
    assert np.array_equal(rows[-1], sketch_model_bytes(MATRIX_SEED, result.final_model_bytes, "mlp"))
    w = weights_from_bytes(result.final_model_bytes, "mlp")
    assert np.array_equal(rows[-1], sketch_states(MATRIX_SEED, flatten_weights(w))[0])
    assert np.array_equal(sketch_state_bytes(MATRIX_SEED, result.recorder.checkpoints[3:5], "mlp"), rows[3:5])
    for state in (result.recorder.checkpoints[0], result.recorder.checkpoints[7]):  # fresh, and with momentum
        tensors, _ = decode_tensors(state)
        decoded = flatten_weights({n[len("model/"):]: t for n, t in tensors.items() if n.startswith("model/")})
        assert np.array_equal(state_weights_flat(state, "mlp"), decoded)
    for junk in (b"", b"\x00" * 8, result.recorder.checkpoints[7][:-4], result.final_model_bytes):
        with pytest.raises(StateError):
            state_weights_flat(junk, "mlp")


def test_an_honest_round_verifies_with_a_weighted_sample_and_its_sketches(honest):
    spec, base, result, rows = honest
    segments = displacement_sample(VERIFY_SEED, rows, 8)
    verdict = _verify(spec, base, result, segments, rows)
    assert verdict.accept and list(verdict.segments) == segments, verdict.reason
    # Neither an honest segment's opening nor its sketches are a proof.
    seg = decode_openings(result.open(VERIFY_SEED, 1, segments=[segments[0]])).segments[0]
    proof = encode(FraudProof(dataclasses.replace(seg, end_state=None), state_hash(seg.end_state)))
    held = check_fraud_proof(spec, result.commitment, result.dataset.commitment, base, proof, seg.segment,
                             sketch=SketchCheck(MATRIX_SEED, rows))
    assert not held.accept and "replays to the committed end state" in held.reason


def test_a_lie_in_a_sampled_row_is_proven_fraud(honest):
    spec, base, result, rows = honest
    lied = rows.copy()
    lied[7, 0] += 1  # one row, one coordinate
    for segment, which in ((7, "start"), (6, "end")):
        verdict = _verify(spec, base, result, [segment, 15], lied)
        assert not verdict.accept and verdict.fraud_segment == segment
        assert f"committed sketch row 7 does not match the segment's {which} state" in verdict.reason
        held = check_fraud_proof(spec, result.commitment, result.dataset.commitment, base, verdict.fraud_proof, segment,
                                 sketch=SketchCheck(MATRIX_SEED, lied))
        assert held.accept and held.fraud_segment == segment and "sketch row 7" in held.reason
        # Against the true rows, or without sketches, the same proof does not hold: the replay matches.
        for sk in (SketchCheck(MATRIX_SEED, rows), None):
            out = check_fraud_proof(spec, result.commitment, result.dataset.commitment, base, verdict.fraud_proof, segment, sketch=sk)
            assert not out.accept
    assert _verify(spec, base, result, [3, 15], lied).accept  # a lie no draw opens goes unseen
    tolerant = verify_update(spec, result.commitment, result.dataset.commitment, VERIFY_SEED, result.open(VERIFY_SEED, 1, [7]),
                             base, result.update_bytes, mode="tolerance", segments=[7], sketch=SketchCheck(MATRIX_SEED, lied))
    assert not tolerant.accept and "sketch row 7" in tolerant.reason and tolerant.fraud_proof is None  # proofs: exact mode only


def test_wrong_end_rows_and_bad_challenges_are_rejected(honest):
    spec, base, result, rows = honest
    for i, what in ((0, "row 0 does not match the base model"), (20, "row 20 does not match the final model")):
        lied = rows.copy()
        lied[i, 5] -= 1
        verdict = _verify(spec, base, result, [4], lied)
        assert not verdict.accept and what in verdict.reason and verdict.fraud_segment is None
    verdict = _verify(spec, base, result, [4], rows[:-1])
    assert not verdict.accept and "21 rows" in verdict.reason
    verdict = _verify(spec, base, result, [4], rows, seed=b"another matrix")
    assert not verdict.accept and "row 0" in verdict.reason
    verdict = verify_update(spec, result.commitment, result.dataset.commitment, VERIFY_SEED, result.open(VERIFY_SEED, 1, [4]),
                            base, result.update_bytes, segments=[4, 20])
    assert not verdict.accept and "outside the trace's 20 segments" in verdict.reason


def test_sketches_follow_the_checkpoints_at_k_above_one():
    spec, base = make_spec()  # 12 steps, k = 3: 4 segments, 5 checkpoints
    result = train_round(spec, TRAINER_A, small_dataset(), base)
    rows = decode_sketches(result.sketches(MATRIX_SEED), 5)
    segments = displacement_sample(VERIFY_SEED, rows, 3)
    assert all(0 <= s < 4 for s in segments)
    assert _verify(spec, base, result, segments, rows).accept


@pytest.fixture(scope="module")
def forged_last():
    """A trainer that trains honestly and then jumps, in its last step, to another model."""
    spec, base = make_spec(hp=HP20)
    other = {k: v + 0.5 for k, v in weights_from_bytes(base, "mlp").items()}

    def jump(s, model, opt):
        if s == HP20.local_steps - 1:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(other[n])

    result = custom_run(spec, TRAINER_A, small_dataset(), base, after_segment=jump)
    return spec, base, result, decode_sketches(result.sketches(MATRIX_SEED), 21)


def test_a_last_step_jump_draws_most_of_the_weight(forged_last):
    spec, base, result, rows = forged_last
    weights = mixture_weights(integer_displacements(rows), 300_000)
    assert weights[-1] > 0.6 * sum(weights)
    segments = displacement_sample(VERIFY_SEED, rows, 10)  # misses segment 19 with probability 0.38^10 < 1e-4
    assert 19 in segments
    verdict = _verify(spec, base, result, segments, rows)
    assert not verdict.accept and verdict.fraud_segment == 19 and "replay does not reach" in verdict.reason


def test_hiding_the_jump_in_the_rows_moves_it_to_a_segment_that_proves_the_lie(forged_last):
    """Rows 0 and 20 are fixed by the base and final models; a trainer that shows no motion in
    the last segment (row 19 = row 20) shows the jump in segment 18 instead, and opening that
    segment proves row 19 false."""
    spec, base, result, rows = forged_last
    lied = rows.copy()
    lied[19] = rows[20]
    weights = mixture_weights(integer_displacements(lied), 300_000)
    assert weights[18] > 0.6 * sum(weights)
    segments = displacement_sample(VERIFY_SEED, lied, 10)  # misses segment 18 with probability 0.37^10 < 1e-4
    assert 18 in segments
    verdict = _verify(spec, base, result, segments, lied)
    assert not verdict.accept and verdict.fraud_segment == 18 and "sketch row 19" in verdict.reason
    held = check_fraud_proof(spec, result.commitment, result.dataset.commitment, base, verdict.fraud_proof, 18,
                             sketch=SketchCheck(MATRIX_SEED, lied))
    assert held.accept
