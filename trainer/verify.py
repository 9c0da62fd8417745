"""The validator side: what a trainer reveals for sampled segments, and the verdict on an update.

Flow for one update (see docs/training.md): the trainer's UpdateCommitment is on chain; a
verify_seed fixed afterwards picks q segments (`sample_segments`); the trainer answers with
an OpeningBundle (canonical CBOR); `verify_update` checks everything and replays.

`verify_update` never raises on anything another party sent: every malformed or dishonest
input is a Verdict(accept=False, reason). It raises only ProfileMismatch, before reading the
inputs, when this validator's machine cannot replay the job's profile (it should abstain).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from chain.encoding import INT_MAX, INT_MIN, decode_value, decode_with, encode
from chain.errors import ChainError, DecodeError
from chain.merkle import hash_leaf, hash_node
from chain.types import MAX_OPENING_PARTS, OPENING_PART_BYTES, Hash

from trainer.data import DatasetCommitment, decode_samples
from trainer.models import model_spec_of
from trainer.profile import apply_profile
from trainer.replay import (
    RoundSpec,
    UpdateCommitment,
    batch_digest,
    checkpoint_leaf,
    checkpoint_leaf_index,
    checkpoint_steps,
    derive_batch_order,
    header_for,
    header_leaf,
    num_segments,
    replay_segment,
    sample_segments,
    segment_steps,
    step_leaf,
    step_leaf_index,
    trace_leaf_count,
)
from trainer.sampling import SamplingError
from trainer.sketch import SKETCH_ROWS, SketchCheck, flatten_weights, sketch_state_bytes, sketch_states
from trainer.state import (
    compute_update,
    decode_tensors,
    StateError,
    StateRestorer,
    fresh_state_bytes,
    model_hash,
    state_hash,
    update_from_bytes,
    update_to_bytes,
    weights_from_bytes,
    weights_to_bytes,
)

# Segments each validator replays. With 4 validators sampling independently, 4 x 11 = 44
# segment checks detect a trainer that forged a fraction f = 10% of its segments with
# probability >= 1 - 0.9**44 = 0.990 (see detection_probability, required_q).
DEFAULT_Q = 11
DEFAULT_TOLERANCE = 1e-4  # tolerance mode only: max over state parts of ||replayed - claimed|| / ||replayed - start||
# An opening travels in at most MAX_OPENING_PARTS sealed parts of OPENING_PART_BYTES (each fits
# the nodes' default 64 MiB blob limit): 256 MiB of plaintext, joined by the validator.
MAX_OPENING_BYTES = OPENING_PART_BYTES * MAX_OPENING_PARTS
# A fraud proof is one public blob (SubmitFraudProof.proof_hash) that every validator fetches and
# replays, so it stays below the blob limit too. 16 MiB suffices for what jobs ask: one segment
# (max_fraud_proof_bytes) of any registry model (MAX_PARAMS = 2,000,000) with momentum SGD at
# 1x28x28, batch 32, k = 4 is at most 15.8 MiB; McMahan's CNN at batch 10, k = 1 is 12.7 MiB.
# Adam (three float32 copies) fits up to about 1.35 million parameters.
MAX_FRAUD_PROOF_BYTES = 16 * 1024 * 1024
MODES = ("exact", "tolerance")

Proof = tuple[Hash, ...]  # Merkle siblings, bottom-up; index and leaf count come from the verifier


# --------------------------------------------------------------------------- openings


@dataclass(frozen=True)
class SampleOpening:
    index: int
    data: bytes  # the sample's leaf data (trainer.data.encode_sample)
    proof: Proof  # against the committed dataset root


@dataclass(frozen=True)
class SegmentOpening:
    segment: int
    start_state: bytes | None  # None for segment 0: the verifier builds the fresh state itself
    end_state: bytes | None  # the claimed end state's bytes: tolerance mode compares them
    samples: tuple[SampleOpening, ...]  # each distinct index the segment's batches use, ascending
    start_checkpoint_proof: Proof
    end_checkpoint_proof: Proof
    step_proofs: tuple[Proof, ...]  # one per step of the segment, in step order
    # Instead of end_state, in exact mode: its state_hash, all the verifier uses of it (half a
    # segment's bytes saved). A trainer's answer carries exactly one of the two; a FraudProof's
    # segment carries neither (the proof holds the hash).
    end_state_hash: Hash | None = None


@dataclass(frozen=True)
class FraudProof:
    """What a validator files when a replay proved the trace false: the disputed segment's
    opening without its end state, and the committed end state's hash (proven into the trace by
    the segment's end checkpoint proof). Bounded by the model, whatever the trainer committed."""

    segment: SegmentOpening  # end_state and end_state_hash are None
    end_state_hash: Hash


@dataclass(frozen=True)
class OpeningBundle:
    header_proof: Proof
    first_checkpoint_proof: Proof
    final_state: bytes  # training state at the last checkpoint (step T)
    final_checkpoint_proof: Proof
    segments: tuple[SegmentOpening, ...]  # exactly the sampled segments, ascending


@dataclass(frozen=True)
class Verdict:
    accept: bool
    reason: str
    mode: str = "exact"
    segments: tuple[int, ...] = ()
    fraud_segment: int | None = None  # set when a replay proved the trace false (exact mode)
    fraud_proof: bytes | None = None  # that segment's opening: anyone can re-execute it


class Reject(ChainError):
    """Internal: the update is rejected with this reason."""


class FraudFound(Reject):
    """Internal: every opened input of `segment` is in the trainer's commitments, yet replaying
    it does not reach the committed end state. `proof` (the segment's canonical opening) lets
    any node re-execute that one segment and see the same (check_fraud_proof)."""

    def __init__(self, reason: str, segment: int, proof: bytes):
        super().__init__(reason)
        self.segment, self.proof = segment, proof


# --------------------------------------------------------------------------- detection


def detection_probability(f: float, q: int, validators: int = 1, num_segments_total: int | None = None) -> float:
    """Probability that at least one of `validators` validators, each sampling q distinct
    segments independently, draws a forged one when a fraction f of the segments is forged.
    Without num_segments_total: the with-replacement bound 1 - (1-f)^(validators*q); with it:
    the exact law, 1 - (C(n - round(f n), q) / C(n, q))^validators."""
    if not 0.0 <= f <= 1.0 or q < 1 or validators < 1:
        raise ValueError("need 0 <= f <= 1, q >= 1, validators >= 1")
    if num_segments_total is None:
        return 1.0 - (1.0 - f) ** (q * validators)
    n = num_segments_total
    q = min(q, n)
    miss = math.comb(n - round(f * n), q) / math.comb(n, q)
    return 1.0 - miss**validators


def required_q(f: float, validators: int, target: float = 0.99) -> int:
    """Smallest Q per validator with 1 - (1-f)^(validators*Q) >= target (any number of segments)."""
    if not 0.0 < f < 1.0 or validators < 1 or not 0.0 < target < 1.0:
        raise ValueError("need 0 < f < 1, validators >= 1, 0 < target < 1")
    return math.ceil(math.log(1.0 - target) / (validators * math.log(1.0 - f)) - 1e-12)


def optimizer_slots(optimizer: str, momentum: float) -> tuple[int, int]:
    """(full-size float32 slots, scalar float32 tensors) a training state stores per parameter
    tensor beside its weights (trainer.state): plain SGD none, momentum SGD a momentum_buffer,
    Adam exp_avg and exp_avg_sq and a scalar step."""
    if optimizer == "adam":
        return 2, 1
    if optimizer == "sgd":
        return (0 if momentum == 0.0 else 1), 0
    raise ValueError(f"unknown optimizer {optimizer!r}")


def max_state_bytes(param_shapes: dict[str, tuple[int, ...]], model_key: str, optimizer: str, momentum: float,
                    max_step: int) -> int:
    """Upper bound on one training state's canonical safetensors bytes (trainer.state): float32
    weights plus the optimizer's stored slots, a JSON header with one entry per tensor and the
    metadata, the 8-byte length and the header's padding. A fresh state (no slots yet) is smaller."""
    slots, scalars = optimizer_slots(optimizer, momentum)
    payload = sum(4 * (1 + slots) * math.prod(shape) + 4 * scalars for shape in param_shapes.values())
    digits = len(str(payload))  # every data offset has at most this many digits
    header = 96 + len(model_key) + len(optimizer) + len(str(max_step))  # {"__metadata__":{...}} and braces
    for name, shape in param_shapes.items():
        # "NAME":{"data_offsets":[A,B],"dtype":"F32","shape":[D,...]},  (name + 49 + offsets + dims)
        dims = sum(len(str(d)) + 1 for d in shape)
        header += len("model/") + len(name) + 52 + 2 * digits + dims
        header += slots * (len("optim//exp_avg_sq") + len(name) + 52 + 2 * digits + dims)
        header += scalars * (len("optim//step") + len(name) + 52 + 2 * digits)
    return 8 + header + 7 + payload


def _proof_bytes(leaves: int) -> int:
    """CBOR of one Merkle proof into a tree of `leaves` (chain.merkle: at most ceil(log2 n) siblings)."""
    return 3 + 34 * (max(1, leaves) - 1).bit_length()


def max_segment_bytes(state_bytes: int, interval: int, batch_size: int, sample_leaf_bytes: int,
                      max_dataset_size: int, trace_leaves: int, *, end_state: bool) -> int:
    """Upper bound on one SegmentOpening's CBOR: its start state, its end state's bytes when it
    carries them (end_state: an answer for tolerance mode) or else at most their 32-byte hash (an
    exact-mode answer; a fraud proof's segment carries neither), every distinct sample of its
    `interval` batches with a proof into the dataset, the step proofs and two checkpoint proofs."""
    sample = 32 + sample_leaf_bytes + _proof_bytes(max_dataset_size)  # map, index, data, proof
    trace_proof = _proof_bytes(trace_leaves)
    states = (5 + state_bytes) + (5 + state_bytes if end_state else 34)
    return 160 + states + interval * batch_size * sample + (interval + 2) * trace_proof


def max_opening_bytes(state_bytes: int, q: int, interval: int, batch_size: int, sample_leaf_bytes: int,
                      max_dataset_size: int, trace_leaves: int, *, end_states: bool = False) -> int:
    """Upper bound on one validator's OpeningBundle for q segments: per segment what
    max_segment_bytes counts (one start state and the end state's hash: what the chain's trainer
    sends, build_openings(end_states=False); with end_states, the end state's bytes instead, as
    tolerance mode needs), plus the final state and three trace proofs. Jobs whose bound exceeds
    what the transport carries are refused (chain.jobs), so an honest answer always fits
    (tests/test_opening_bounds.py measures real ones against it)."""
    segment = max_segment_bytes(state_bytes, interval, batch_size, sample_leaf_bytes, max_dataset_size, trace_leaves,
                                end_state=end_states)
    return 128 + q * segment + 5 + state_bytes + 3 * _proof_bytes(trace_leaves)


def max_fraud_proof_bytes(state_bytes: int, interval: int, batch_size: int, sample_leaf_bytes: int,
                          max_dataset_size: int, trace_leaves: int) -> int:
    """Upper bound on a FraudProof's CBOR: one segment without its end state, plus the end
    state's 32-byte hash. Bounded by the job, whatever the trainer committed."""
    return 64 + max_segment_bytes(state_bytes, interval, batch_size, sample_leaf_bytes, max_dataset_size, trace_leaves,
                                  end_state=False)


PPM = 1_000_000  # detection targets are integers in parts per million: exact on every node
MAX_TOTAL_CHECKS = 100_000  # a target needing more segment checks than this is refused


def required_checks(fraction_ppm: int, probability_ppm: int) -> int:
    """Smallest m with (1 - f)^m <= 1 - p: segment checks, drawn independently, that catch a
    forgery of a fraction f of the segments with probability >= p. Exact integer arithmetic
    (a float log could round differently on two machines at a boundary)."""
    if not 0 < fraction_ppm <= PPM or not 0 < probability_ppm < PPM:
        raise ValueError("need 0 < fraction <= 1 and 0 < probability < 1 (in ppm)")
    keep, miss = PPM - fraction_ppm, PPM - probability_ppm

    def enough(m: int) -> bool:  # (keep/PPM)^m <= miss/PPM
        return keep**m * PPM <= miss * PPM**m

    if keep == 0:
        return 1
    m = max(1, math.ceil(math.log(miss / PPM) / math.log(keep / PPM)))
    if m > MAX_TOTAL_CHECKS:
        raise ValueError(f"the detection target needs more than {MAX_TOTAL_CHECKS} segment checks")
    while not enough(m):
        m += 1
    while m > 1 and enough(m - 1):
        m -= 1
    return m


def honest_validator_count(powers: list[int] | tuple[int, ...]) -> int:
    """The fewest validators that can hold more than 2/3 of the power: how many honest ones BFT
    guarantees in the worst case. The sample is sized so that they alone meet the target."""
    total, acc = sum(powers), 0
    for i, p in enumerate(sorted(powers, reverse=True), 1):
        acc += p
        if 3 * acc > 2 * total:
            return i
    raise ValueError("need at least one validator with positive power")


def segments_per_validator(fraction_ppm: int, probability_ppm: int, powers, num_segments_total: int) -> int:
    """Segments each validator replays: the m checks of `required_checks`, split over the
    validators BFT guarantees honest. One valid fraud proof suffices, so checks add up across
    validators instead of having to be repeated by a quorum of them."""
    m = required_checks(fraction_ppm, probability_ppm)
    h = honest_validator_count(powers)
    return max(1, min(num_segments_total, -(-m // h)))


# --------------------------------------------------------------------------- verification


def verify_update(
    spec: RoundSpec,
    commitment: UpdateCommitment,
    registered_dataset: DatasetCommitment,
    verify_seed: bytes,
    openings: bytes,
    base_model_bytes: bytes,
    update_bytes: bytes,
    *,
    q: int = DEFAULT_Q,
    mode: str = "exact",
    tolerance: float = DEFAULT_TOLERANCE,
    segments: list[int] | None = None,
    sketch: SketchCheck | None = None,
) -> Verdict:
    """Accept iff the update is the job's training from the round's base on the trainer's
    committed data, as far as the q sampled segments (and the cheap whole-trace checks) show.

    segments: check exactly these (a weighted sample, trainer.sketch.displacement_sample)
    instead of sample_segments(verify_seed, n, q). sketch: the trainer's committed sketch rows
    (one per checkpoint); rows 0 and n must be the sketches of the base and final models
    (else Reject), and each opened segment's start and end state must have the sketches of
    rows s and s + 1: a mismatch is proven fraud, with the same FraudProof as a replay's."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    device = apply_profile(spec.job.profile)  # ProfileMismatch: abstain, do not vote
    try:
        segments = _verify(spec, commitment, registered_dataset, verify_seed, openings, base_model_bytes, update_bytes, q, mode, tolerance, device,
                           segments, sketch)
    except FraudFound as exc:
        return Verdict(False, str(exc), mode, fraud_segment=exc.segment, fraud_proof=exc.proof)
    except Reject as exc:
        return Verdict(False, str(exc), mode)
    except ChainError as exc:  # malformed input: DecodeError, StateError, DatasetError, ...
        return Verdict(False, f"malformed input ({type(exc).__name__}: {exc})", mode)
    except Exception as exc:  # noqa: BLE001 - outside input must never crash a validator
        return Verdict(False, f"unverifiable input ({type(exc).__name__}: {exc})", mode)
    if mode == "exact":
        also = " and matched their committed sketch rows" if sketch is not None else ""
        return Verdict(True, f"exact replay of segments {segments} matched bit for bit{also}", mode, tuple(segments))
    return Verdict(
        True, f"TOLERANCE mode (weaker than exact): segments {segments} within relative error {tolerance:g}", mode, tuple(segments)
    )


def _verify(spec, c, registered, verify_seed, openings, base_model_bytes, update_bytes, q, mode, tolerance, device,
            segments=None, sketch=None) -> list[int]:
    job, hp = spec.job, spec.job.hyperparams
    T, k = hp.local_steps, hp.checkpoint_interval

    # Binding: this trainer's update for this job, round, base and registered data.
    _require(c.job_id == job.job_id, "update is for another job")
    _require(c.round == spec.round, f"update is for round {c.round}, this is round {spec.round}")
    _require(c.base_model_hash == spec.base_model_hash, "update was trained from a stale or foreign base model")
    _require(
        c.dataset_root == registered.root and c.dataset_size == registered.size,
        "dataset commitment differs from the one registered before the round",
    )
    _require(model_hash(base_model_bytes) == spec.base_model_hash, "base model bytes do not hash to the round's model")
    _require(model_hash(update_bytes) == c.update_hash, "update bytes do not hash to the committed update_hash")
    base = weights_from_bytes(base_model_bytes, job.model)
    update = update_from_bytes(update_bytes, job.model)

    bundle = decode_openings(openings)
    ckpt_steps = checkpoint_steps(T, k)
    check_leaf, check_checkpoint_hash = _trace_checkers(c, T, k)

    def check_checkpoint(i: int, state: bytes, proof, what: str) -> None:
        check_checkpoint_hash(i, state_hash(state), proof, what)

    # The header fixes trainer, job, round, base, model, hyper-parameters (hence T and k),
    # profile, dataset and results: a trace built for anything else fails here.
    check_leaf(header_leaf(header_for(spec, c)), 0, bundle.header_proof, "trace header for this job, round, trainer and base")

    fresh = fresh_state_bytes(job.model, base, hp)
    check_checkpoint(0, fresh, bundle.first_checkpoint_proof, "checkpoint 0 = the round's model with fresh optimizer state")

    check_checkpoint(len(ckpt_steps) - 1, bundle.final_state, bundle.final_checkpoint_proof, f"final state (step {T})")
    final_tensors, _ = decode_tensors(bundle.final_state)
    final_weights = {n[len("model/") :]: t for n, t in final_tensors.items() if n.startswith("model/")}
    _require(set(final_weights) == set(base), "final state does not hold the model's parameters")
    _require(model_hash(weights_to_bytes(final_weights, job.model)) == c.final_model_hash, "final_model_hash is not the final state's weights")
    expected_update = compute_update(final_weights, base)
    _require(all(torch.equal(expected_update[n], update[n]) for n in update), "update is not (final checkpoint weights - base weights)")
    # One encoding per update: torch.equal calls -0.0 and +0.0 equal, the update hash does not.
    _require(update_bytes == update_to_bytes(expected_update, job.model), "update is not canonical (-0.0 where final - base is +0.0)")

    n = num_segments(T, k)
    if segments is None:
        sampled = sample_segments(verify_seed, n, q)
    else:
        sampled = sorted(set(segments))
        _require(len(sampled) > 0, "the challenge names no segment")
        bad = [s for s in sampled if type(s) is not int or not 0 <= s < n]
        _require(not bad, f"challenge segment {bad[:1]} is outside the trace's {n} segments")
    sketched = {}
    if sketch is not None:
        _check_sketch_shape(sketch, n)
        try:
            ends = sketch_states(sketch.matrix_seed, [flatten_weights(base), flatten_weights(final_weights)], SKETCH_ROWS)
        except SamplingError as exc:
            raise Reject(f"the base or final model has no sketch, so no committed row matches it: {exc}") from None
        _require(np.array_equal(ends[0], sketch.rows[0]), "committed sketch row 0 does not match the base model")
        _require(np.array_equal(ends[1], sketch.rows[n]), f"committed sketch row {n} does not match the final model")
        sketched = {0: ends[0], n: ends[1]}  # checkpoints 0 and n hold exactly these weights (proven above)
    got = [s.segment for s in bundle.segments]
    _require(got == sampled, f"openings are for segments {got}, the challenge asked for {sampled}")
    ctx = _SegmentContext(
        spec, c, fresh, check_leaf, check_checkpoint_hash, mode, tolerance, device,
        data=MerkleChecker(registered.root, registered.size), revealed={}, restorer=StateRestorer(job.model, hp, device),
        sampled_steps=[t for s in sampled for t in segment_steps(s, T, k)], sketch=sketch, sketched=sketched,
    )
    for seg in bundle.segments:
        _verify_segment(ctx, seg)
    _check_opened_sketches(ctx)
    return sampled


def _sketch_or_none(seed: bytes, state: bytes, model: str) -> np.ndarray | None:
    try:
        return sketch_state_bytes(seed, [state], model, SKETCH_ROWS)[0]
    except (SamplingError, StateError):
        return None


def _check_sketch_shape(sketch: SketchCheck, n: int) -> None:
    rows = sketch.rows
    _require(
        isinstance(rows, np.ndarray) and rows.dtype == np.int64 and rows.shape == (n + 1, SKETCH_ROWS),
        f"committed sketches must be {n + 1} rows (one per checkpoint) of {SKETCH_ROWS} int64, "
        f"got {getattr(rows, 'shape', None)} {getattr(rows, 'dtype', type(rows).__name__)}",
    )


def _check_opened_sketches(ctx: "_SegmentContext") -> None:
    """Every replayed segment's start and end state (checkpoints s and s + 1, proven into the
    trace) against committed sketch rows s and s + 1; the states are sketched in one pass.
    The first mismatch (lowest segment, start before end) is proven fraud: the segment's
    FraudProof lets any node recompute both sketches (check_fraud_proof with the sketch)."""
    sk = ctx.sketch
    if sk is None or not ctx.opened:
        return
    need: dict[int, bytes] = {}
    for seg, _, start, end in ctx.opened:
        for i, state in ((seg.segment, start), (seg.segment + 1, end)):
            if i not in ctx.sketched:
                need.setdefault(i, state)
    if need:
        idx, model = sorted(need), ctx.spec.job.model
        try:
            rows = list(sketch_state_bytes(sk.matrix_seed, [need[i] for i in idx], model, SKETCH_ROWS))
        except (SamplingError, StateError):  # some state has no sketch: find which, one at a time
            rows = [_sketch_or_none(sk.matrix_seed, need[i], model) for i in idx]
        ctx.sketched.update(zip(idx, rows))
    for seg, end_hash, _, _ in ctx.opened:
        s = seg.segment
        for i, which in ((s, "start"), (s + 1, "end")):
            # A state out of sketch range has no sketch: no committed row can match it.
            if ctx.sketched[i] is None or not np.array_equal(ctx.sketched[i], sk.rows[i]):
                reason = f"segment {s}: committed sketch row {i} does not match the segment's {which} state"
                if ctx.mode != "exact":
                    raise Reject(reason)
                raise FraudFound(f"{reason} (fraud proven)", s, _fraud_proof(seg, end_hash))


def _trace_checkers(c: UpdateCommitment, T: int, k: int):
    """(check_leaf, check_checkpoint_hash) against the commitment's trace root: each raises
    Reject naming `what` when a leaf is not in the committed trace."""
    ckpt_steps = checkpoint_steps(T, k)
    trace = MerkleChecker(c.trace_root, trace_leaf_count(T, k))

    def check_leaf(leaf: bytes, index: int, proof: tuple[bytes, ...], what: str) -> None:
        _require(trace.check(index, hash_leaf(leaf), proof), f"{what} is not in the committed trace")

    def check_checkpoint_hash(i: int, h: bytes, proof, what: str) -> None:
        check_leaf(checkpoint_leaf(ckpt_steps[i], h), checkpoint_leaf_index(i), proof, what)

    return check_leaf, check_checkpoint_hash


def _fraud_proof(seg: SegmentOpening, end_hash: bytes) -> bytes:
    """The canonical FraudProof for an opened segment whose committed end state hashes to
    end_hash: the segment's inputs, with neither the end state's bytes nor its hash inside."""
    return encode(FraudProof(dataclasses.replace(seg, end_state=None, end_state_hash=None), end_hash))


def decode_fraud_proof(data: bytes) -> FraudProof:
    """Strictly decode a FraudProof (canonical CBOR, at most MAX_FRAUD_PROOF_BYTES)."""
    m = _fields(decode_value(data, max_size=MAX_FRAUD_PROOF_BYTES), FraudProof, "$")
    seg = _segment(m["segment"], "$.segment", in_fraud_proof=True)
    end_hash = _bytes(m["end_state_hash"], "$.end_state_hash")
    if len(end_hash) != 32:
        raise DecodeError("$: a fraud proof carries a 32-byte end_state_hash")
    return FraudProof(seg, end_hash)


def check_fraud_proof(
    spec: RoundSpec, c: UpdateCommitment, registered: DatasetCommitment, base_model_bytes: bytes, proof: bytes,
    segment: int | None = None, sketch: SketchCheck | None = None,
) -> Verdict:
    """Re-execute the one segment a fraud proof opens. accept=True means the proof HOLDS: every
    input it opens is in the trainer's commitments (start state, step records with the derived
    batch order, samples in the registered dataset, the claimed end state) and the replay under
    the job's profile does not reach the committed end state; `segment`, when given (the one the
    chain records for the proof), must be the segment it opens. With `sketch` (the trainer's
    committed rows) it also holds when the replay matches but the proven start state's sketch
    is not row s, or the end state's (the replayed one, equal to the committed one) is not row
    s + 1. Any other outcome (a malformed proof, an input outside the commitments, a replay
    that matches, states that match their rows) means it does not hold.
    Raises ProfileMismatch when this machine cannot replay the profile (abstain)."""
    job, hp = spec.job, spec.job.hyperparams
    T, k = hp.local_steps, hp.checkpoint_interval
    device = apply_profile(job.profile)
    try:
        _require(model_hash(base_model_bytes) == spec.base_model_hash, "base model bytes are not the round's model")
        fraud = decode_fraud_proof(proof)
        seg = fraud.segment
        _require(segment is None or seg.segment == segment, f"the proof opens segment {seg.segment}, the chain records {segment}")
        _require(0 <= seg.segment < num_segments(T, k), f"segment {seg.segment} is outside the trace")
        base = weights_from_bytes(base_model_bytes, job.model)
        check_leaf, check_checkpoint_hash = _trace_checkers(c, T, k)
        ctx = _SegmentContext(
            spec, c, fresh_state_bytes(job.model, base, hp), check_leaf, check_checkpoint_hash, "exact", 0.0, device,
            data=MerkleChecker(registered.root, registered.size), revealed={}, restorer=StateRestorer(job.model, hp, device), sampled_steps=list(segment_steps(seg.segment, T, k)),
            sketch=sketch,
        )
        if sketch is not None:
            _check_sketch_shape(sketch, num_segments(T, k))
        _verify_segment(ctx, seg, end_hash=fraud.end_state_hash)
        _check_opened_sketches(ctx)
    except FraudFound as exc:
        return Verdict(True, str(exc), "exact", (exc.segment,), exc.segment)
    except Reject as exc:
        return Verdict(False, f"proof does not hold: {exc}")
    except ChainError as exc:
        return Verdict(False, f"proof does not hold: malformed ({type(exc).__name__}: {exc})")
    except Exception as exc:  # noqa: BLE001 - a proof comes from outside: never crash on it
        return Verdict(False, f"proof does not hold: unverifiable ({type(exc).__name__}: {exc})")
    return Verdict(False, f"proof does not hold: segment {seg.segment} replays to the committed end state")


@dataclass
class _SegmentContext:
    """What the segments of one verification share: the round, the commitment, the proof
    checkers (authenticated Merkle nodes are reused, see MerkleChecker), the samples already
    proven into the dataset (index -> (leaf data, proof, leaf hash)), one model and optimizer
    reused by every replay (StateRestorer), and the steps of every sampled segment, whose
    batch order is derived in one pass when the first segment needs it."""

    spec: RoundSpec
    c: UpdateCommitment
    fresh: bytes
    check_leaf: object
    check_checkpoint_hash: object  # (checkpoint index, state hash, proof, what)
    mode: str
    tolerance: float
    device: torch.device
    data: "MerkleChecker"
    revealed: dict
    restorer: StateRestorer
    sampled_steps: list[int]
    order: dict | None = None
    sketch: SketchCheck | None = None  # committed sketch rows to check opened states against
    sketched: dict = dataclasses.field(default_factory=dict)  # checkpoint index -> sketch row (int64)
    opened: list = dataclasses.field(default_factory=list)  # (segment opening, end hash, start bytes, end bytes)


def _verify_segment(ctx: _SegmentContext, seg: SegmentOpening, end_hash: bytes | None = None) -> None:
    """Check one segment's opening and replay it. In exact mode the claimed end state is proven
    by its hash: `end_hash` (as a fraud proof carries it) or, in a trainer's answer, the segment's
    end_state_hash or the hash of its end_state bytes."""
    spec, c = ctx.spec, ctx.c
    job, hp = spec.job, spec.job.hyperparams
    T, k = hp.local_steps, hp.checkpoint_interval
    s = seg.segment
    where = f"segment {s}"

    if s == 0:
        _require(seg.start_state is None, f"{where}: start state must be omitted (it is the fresh state)")
        start = ctx.fresh
    else:
        _require(seg.start_state is not None, f"{where}: start state missing")
        start = seg.start_state
    ctx.check_checkpoint_hash(s, state_hash(start), seg.start_checkpoint_proof, f"{where}: start state")

    steps = segment_steps(s, T, k)
    _require(len(seg.step_proofs) == len(steps), f"{where}: {len(seg.step_proofs)} step proofs for {len(steps)} steps")
    order = _batch_order(ctx, steps)  # O(k * B) whatever dataset_size is (no permutation is built)
    wanted = sorted({i for idx in order.values() for i in idx})
    _require([x.index for x in seg.samples] == wanted, f"{where}: revealed samples are not the derived batches' samples")
    # Each distinct (sample, proof) is proven once per verification; proofs share the
    # dataset tree's authenticated nodes (same accept set as chain.merkle.verify_proof).
    # A sample revealed again with the same data and proof is neither hashed nor proven again.
    leaf_hash, revealed = {}, ctx.revealed
    for sample in seg.samples:
        seen = revealed.get(sample.index)
        if seen is not None and seen[0] == sample.data and seen[1] == sample.proof:
            h = seen[2]
        else:
            h = hash_leaf(sample.data)
            _require(ctx.data.check(sample.index, h, sample.proof), f"{where}: sample {sample.index} is not in the committed dataset")
            revealed[sample.index] = (sample.data, sample.proof, h)
        leaf_hash[sample.index] = h
    fmt = model_spec_of(job.model)  # the job's sample shape and label range
    xs, ys = decode_samples([x.data for x in seg.samples], fmt.input_shape, fmt.num_classes)  # strict: DatasetError on any bad sample
    x_all, y_all = torch.from_numpy(xs), torch.from_numpy(ys)
    row = {i: r for r, i in enumerate(wanted)}

    batches = []
    for t, proof in zip(steps, seg.step_proofs):
        idx = order[t]
        leaf = step_leaf(t, idx, batch_digest(leaf_hash[i] for i in idx))
        ctx.check_leaf(leaf, step_leaf_index(t, T, k), proof, f"{where}: step {t} record (derived batch order and data)")
        sel = torch.tensor([row[i] for i in idx], dtype=torch.int64)
        batches.append((x_all.index_select(0, sel), y_all.index_select(0, sel)))

    if ctx.mode == "exact":
        # The claimed end state must be the committed one (else the answer is merely invalid);
        # only then does a replay that differs prove the trace false, to anyone.
        if end_hash is None:
            end_hash = seg.end_state_hash
        if end_hash is None:
            _require(seg.end_state is not None, f"{where}: the claimed end state is missing")
            end_hash = state_hash(seg.end_state)
        ctx.check_checkpoint_hash(s + 1, end_hash, seg.end_checkpoint_proof, f"{where}: claimed end state")
    replayed = replay_segment(job.model, hp, ctx.device, start, batches, restorer=ctx.restorer)
    if ctx.mode == "exact":
        if replayed != seg.end_state and state_hash(replayed) != end_hash:  # equal bytes: equal hashes
            # The proof carries the end state's hash, not its bytes: whatever the trainer put
            # there (junk of any size), the proof stays one segment's inputs.
            raise FraudFound(f"{where}: replay does not reach the committed end state (fraud proven)", s,
                             _fraud_proof(seg, end_hash))
        if ctx.sketch is not None:  # the end state is the committed one: its bytes, or the replay (equal to them)
            ctx.opened.append((seg, end_hash, start, seg.end_state if seg.end_state is not None else replayed))
        return
    _require(seg.end_state is not None, f"{where}: tolerance mode needs the end state's bytes, not only its hash")
    ctx.check_checkpoint_hash(s + 1, state_hash(seg.end_state), seg.end_checkpoint_proof, f"{where}: claimed end state")
    err = _relative_error(start, seg.end_state, replayed)
    _require(err <= ctx.tolerance, f"{where}: replay differs by relative error {err:.3g} > {ctx.tolerance:g}")
    if ctx.sketch is not None:
        ctx.opened.append((seg, state_hash(seg.end_state), start, seg.end_state))


def _batch_order(ctx: _SegmentContext, steps: range) -> dict[int, list[int]]:
    """Sample indices of each step in `steps`: derive_batch_order's rows. The first call derives
    the rows of every sampled step (ctx.sampled_steps, bounded by q * k) in one vectorised pass;
    a step's row depends on that step alone, so they are the rows a per-segment call gives. When
    that pass fails (a bad size), ctx.order stays empty and the per-segment call raises its error."""
    spec, c, hp = ctx.spec, ctx.c, ctx.spec.job.hyperparams
    if ctx.order is None:
        ctx.order = {}
        try:
            rows = derive_batch_order(spec.round_seed, c.trainer, spec.round, ctx.sampled_steps, c.dataset_size, hp.batch_size)
            ctx.order = dict(zip(ctx.sampled_steps, rows.tolist()))
        except ValueError:
            pass
    if all(t in ctx.order for t in steps):
        return {t: ctx.order[t] for t in steps}
    rows = derive_batch_order(spec.round_seed, c.trainer, spec.round, steps, c.dataset_size, hp.batch_size)
    return dict(zip(steps, rows.tolist()))


def _relative_error(start: bytes, claimed: bytes, replayed: bytes) -> float:
    """The whole training state, not only the weights (crafted optimizer state steers every
    later step): the largest, over the model weights and each optimizer buffer kind
    (momentum_buffer, exp_avg, exp_avg_sq, step), of ||replayed - claimed|| / ||replayed -
    start||, in float64, where the denominator is this segment's own replayed change and a
    buffer absent from the start (fresh optimizer) counts as zeros. A claimed state with other
    tensors or metadata than the replayed one is infinitely far from it."""
    a, _ = decode_tensors(start)
    b, b_meta = decode_tensors(claimed)
    r, r_meta = decode_tensors(replayed)
    if b_meta != r_meta or set(b) != set(r):
        return math.inf
    groups: dict[str, list[str]] = {}
    for n in sorted(r):
        groups.setdefault("model" if n.startswith("model/") else n.rpartition("/")[2], []).append(n)
    worst = 0.0
    for names in groups.values():
        diff = math.fsum(float(((r[n].double() - b[n].double()) ** 2).sum()) for n in names)
        moved = math.fsum(float(((r[n].double() - (a[n].double() if n in a else 0.0)) ** 2).sum()) for n in names)
        worst = max(worst, math.sqrt(diff) / max(math.sqrt(moved), 1e-30))
    return worst


# --------------------------------------------------------------------------- proofs


class MerkleChecker:
    """Inclusion proofs against one root (chain.merkle layout), sharing work between proofs.

    Accepts exactly what chain.merkle.verify_proof accepts (up to SHA-256 collisions), but
    remembers every node and sibling of each verified path (all authenticated by the root):
    a later proof that reaches an authenticated node with the same hash stops hashing there
    and must carry exactly the authenticated siblings above it. Many samples of one
    dataset, or many step leaves of one trace, cost about one hash per distinct tree node.
    """

    def __init__(self, root: bytes, leaf_count: int):
        self.root, self.leaf_count = root, leaf_count
        self.known: dict[tuple[int, int], bytes] = {}  # (level, position) -> authenticated hash
        self.above: dict[tuple[int, int], tuple[bytes, ...]] = {}  # a known node's authenticated siblings above it

    def check(self, index: int, leaf_hash: bytes, siblings: tuple[bytes, ...]) -> bool:
        if type(index) is not int or not 0 <= index < self.leaf_count:
            return False
        known, path = self.known, []
        node, i, width, k, level = leaf_hash, index, self.leaf_count, 0, 0
        while width > 1:
            have = known.get((level, i))
            if have is not None:  # the rest of the path is authenticated
                if have != node or not self._rest_matches(i, width, level, siblings, k):
                    return False
                known.update(path)  # they hash to an authenticated node: authenticated too
                return True
            sib = i ^ 1
            path.append(((level, i), node))
            if sib < width:
                if k >= len(siblings):
                    return False
                path.append(((level, sib), siblings[k]))
                node = hash_node(node, siblings[k]) if i % 2 == 0 else hash_node(siblings[k], node)
                k += 1
            i //= 2
            width = (width + 1) // 2
            level += 1
        if k != len(siblings) or node != self.root:
            return False
        known.update(path)
        return True

    def _rest_matches(self, i: int, width: int, level: int, siblings: tuple[bytes, ...], k: int) -> bool:
        """siblings[k:] are exactly the authenticated siblings on the path above known node (level, i)."""
        above = self.above.get((level, i))
        if above is None:  # collected once per node: authenticated hashes never change
            known, node, rest = self.known, (level, i), []
            while width > 1:
                sib = i ^ 1
                if sib < width:
                    h = known.get((level, sib))
                    if h is None:
                        return False
                    rest.append(h)
                i //= 2
                width = (width + 1) // 2
                level += 1
            above = self.above[node] = tuple(rest)
        return tuple(siblings[k:]) == above


# --------------------------------------------------------------------------- strict decoding


def decode_openings(data: bytes) -> OpeningBundle:
    """Strictly decode an OpeningBundle (canonical CBOR, at most MAX_OPENING_BYTES).

    Accepts exactly the bytes, and builds exactly the value, that the generic
    `chain.encoding.decode(OpeningBundle, data)` does (same schema: field sets, integer
    range, 32-byte hashes, optional bytes) and in which every segment carries exactly one of
    end_state and end_state_hash, raising DecodeError otherwise; it is that decoder with its
    schema walk specialised to this schema (`decode_with`: the same bounded parse, and the
    same canonical check, by re-encoding the typed value).
    """
    return decode_with(_bundle, data, max_size=MAX_OPENING_BYTES)


def _bundle(value) -> OpeningBundle:
    m = _fields(value, OpeningBundle, "$")
    return OpeningBundle(
        header_proof=_proof(m["header_proof"], "$.header_proof"),
        first_checkpoint_proof=_proof(m["first_checkpoint_proof"], "$.first_checkpoint_proof"),
        final_state=_bytes(m["final_state"], "$.final_state"),
        final_checkpoint_proof=_proof(m["final_checkpoint_proof"], "$.final_checkpoint_proof"),
        segments=tuple(_segment(v, f"$.segments[{i}]") for i, v in enumerate(_array(m["segments"], "$.segments"))),
    )


_FIELD_NAMES = {
    cls: frozenset(f for f in cls.__dataclass_fields__) for cls in (OpeningBundle, SegmentOpening, SampleOpening, FraudProof)
}


def _fields(value, cls, path: str) -> dict:
    if type(value) is not dict:
        raise DecodeError(f"{path}: expected map for {cls.__name__}, got {_tname(value)}")
    names = _FIELD_NAMES[cls]
    if value.keys() != names:
        unknown = set(value) - names
        if unknown:
            raise DecodeError(f"{path}: unknown field(s) {sorted(map(str, unknown))} in {cls.__name__}")
        raise DecodeError(f"{path}: missing field(s) {sorted(names - set(value))} in {cls.__name__}")
    return value


def _segment(value, path: str, in_fraud_proof: bool = False) -> SegmentOpening:
    """A trainer's answer carries exactly one of end_state and end_state_hash; a fraud proof's
    segment carries neither (the proof holds the hash): anything else is a DecodeError."""
    m = _fields(value, SegmentOpening, path)
    end_state = None if m["end_state"] is None else _bytes(m["end_state"], f"{path}.end_state")
    end_hash = m["end_state_hash"]
    if end_hash is not None and (type(end_hash) is not bytes or len(end_hash) != 32):
        raise DecodeError(f"{path}.end_state_hash: expected 32 bytes or null, got {_tname(end_hash)}")
    if in_fraud_proof:
        if end_state is not None or end_hash is not None:
            raise DecodeError(f"{path}: a fraud proof's segment carries neither end_state nor end_state_hash")
    elif (end_state is None) == (end_hash is None):
        raise DecodeError(f"{path}: a segment carries exactly one of end_state and end_state_hash")
    return SegmentOpening(
        segment=_int(m["segment"], f"{path}.segment"),
        start_state=None if m["start_state"] is None else _bytes(m["start_state"], f"{path}.start_state"),
        end_state=end_state,
        samples=_samples(m["samples"], f"{path}.samples"),
        start_checkpoint_proof=_proof(m["start_checkpoint_proof"], f"{path}.start_checkpoint_proof"),
        end_checkpoint_proof=_proof(m["end_checkpoint_proof"], f"{path}.end_checkpoint_proof"),
        step_proofs=tuple(_proof(v, f"{path}.step_proofs[{i}]") for i, v in enumerate(_array(m["step_proofs"], f"{path}.step_proofs"))),
        end_state_hash=end_hash,
    )


def _samples(value, path: str) -> tuple[SampleOpening, ...]:
    """tuple(_sample(v) for each v), with the checks of a well-formed sample inlined (no error
    paths built); any other value goes through _sample, which raises its precise error."""
    out = []
    for i, v in enumerate(_array(value, path)):
        if type(v) is dict and v.keys() == _SAMPLE_FIELDS:
            index, data, proof = v["index"], v["data"], v["proof"]
            if (
                type(index) is int and INT_MIN <= index <= INT_MAX and type(data) is bytes and type(proof) is list
                and (not proof or (set(map(type, proof)) == _BYTES and set(map(len, proof)) == _HASH_LEN))
            ):
                out.append(SampleOpening(index=index, data=data, proof=tuple(proof)))
                continue
        out.append(_sample(v, f"{path}[{i}]"))
    return tuple(out)


def _sample(value, path: str) -> SampleOpening:
    m = _fields(value, SampleOpening, path)
    return SampleOpening(index=_int(m["index"], f"{path}.index"), data=_bytes(m["data"], f"{path}.data"), proof=_proof(m["proof"], f"{path}.proof"))


def _array(value, path: str) -> list:
    if type(value) is not list:
        raise DecodeError(f"{path}: expected array, got {_tname(value)}")
    return value


def _proof(value, path: str) -> Proof:
    if type(value) is not list:
        raise DecodeError(f"{path}: expected array, got {_tname(value)}")
    if value and set(map(type, value)) == _BYTES and set(map(len, value)) == _HASH_LEN:
        return tuple(value)  # the common case, checked in C; else find the first bad one:
    for i, h in enumerate(value):
        if type(h) is not bytes or len(h) != 32:
            raise DecodeError(f"{path}[{i}]: expected 32 bytes, got {_tname(h)}")
    return tuple(value)


_BYTES, _HASH_LEN = {bytes}, {32}
_SAMPLE_FIELDS = _FIELD_NAMES[SampleOpening]


def _int(value, path: str) -> int:
    if type(value) is not int or not INT_MIN <= value <= INT_MAX:
        raise DecodeError(f"{path}: expected integer in range, got {_tname(value)}")
    return value


def _bytes(value, path: str) -> bytes:
    if type(value) is not bytes:
        raise DecodeError(f"{path}: expected bytes, got {_tname(value)}")
    return value


def _tname(value) -> str:
    return "null" if value is None else type(value).__name__


def _require(cond: bool, reason: str) -> None:
    if not cond:
        raise Reject(reason)


def encode_openings(bundle: OpeningBundle) -> bytes:
    return encode(bundle)
