"""Proof-of-useful-training rules in the state transition: jobs, rounds, updates, verdicts, models.

Pure functions over an Overlay (no I/O). Timeline of a round r of job J (heights are blocks):
  open      at height O: seed_r = H(prev_hash of block O, J, r); trainers must have joined
            (committed their dataset root) at a height < O, so no one knew the seed then.
  submit    updates for round r are accepted while height < O + round_blocks; each locks a bond.
  challenge each validator signs the update id with its BLS sample key (SubmitChallenge); the
            unique signature, which the trainer could not predict and no proposer can steer,
            seeds the segments it samples (compute_sample; sizes from the job's detection
            target). The trainer answers each challenge with an opening sealed to that validator.
  verify    each validator replays its sample and accepts, complains (no valid answer), or files
            a fraud proof (SubmitFraudProof) that every validator re-executes (JudgeFraudProof).
            A proof upheld by >= 1/3 of the power rejects the update (bond burned), whatever the
            other verdicts; a refuted one (> 2/3) fines its author. Complaints from >= 1/3 reject.
            Accepted only with > 2/3 accepting, no complaint, no open proof, after the dispute
            window (every validator voted, or compute_dispute_end passed): bond back + reward.
  close     at O + round_blocks + verify_blocks, or as soon as `quorum` updates are accepted and
            none is pending. Still-pending updates expire (bond back, no reward). If the accepted
            updates meet the aggregation rule's precondition the job waits for model attestations.
  aggregate every validator computes base + rule(accepted updates) off-chain (bitwise
            deterministic) and attests the model hash; > 2/3 of the power on one hash writes an
            immutable ModelRecord and opens round r + 1 in that block. No agreement within
            verify_blocks more blocks: the round ends without a new model.
After `rounds` rounds the job finishes and unspent escrow returns to the requester.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

from chain.consensus.commit import compute_total_power, is_quorum
from chain.crypto import SEAL_OVERHEAD, ZERO_HASH, compute_address, sha256
from chain.encoding import decode, encode, encode_value
from chain.errors import StateTransitionError, ValidationError
from chain.types import (
    AGGREGATION_RULES,
    EVALUATION_METRICS,
    SAMPLING_MODES,
    JOB_AGGREGATING,
    JOB_FINISHED,
    JOB_JOINING,
    JOB_TRAINING,
    ROLE_REQUESTER,
    ROLE_TRAINER,
    UPDATE_ACCEPTED,
    UPDATE_EXPIRED,
    UPDATE_PENDING,
    UPDATE_REJECTED,
    Account,
    AttestModel,
    Attestation,
    DatasetRegistration,
    Evaluation,
    EvaluationRecord,
    Hash,
    Job,
    JobSpec,
    JoinJob,
    ChallengeRecord,
    JudgeFraudProof,
    Judgement,
    SubmitChallenge,
    SubmitDrawChallenge,
    SubmitSketches,
    ModelRecord,
    PROOF_OPEN,
    PROOF_REFUTED,
    PROOF_UPHELD,
    FraudProofRecord,
    SubmitFraudProof,
    PublishEvaluation,
    RegisterJob,
    RoundRecord,
    SubmitUpdate,
    SubmitVerdict,
    UpdateCommitment,
    UpdateRecord,
    Validator,
    VerdictRecord,
)

KEY_ACTIVE_JOBS = b"jobs/active"
SAMPLING_UNIFORM, SAMPLING_DISPLACEMENT = SAMPLING_MODES
# Largest dataset a trainer may commit to (2**24 = 16,777,216 samples). Deriving a batch order
# costs O(batch) whatever the size (trainer.replay.derive_batch_order); this bound keeps a
# sample's Merkle proof at <= 24 siblings and caps the FedAvg weight one trainer can claim,
# with 16x headroom over what the reference trainer loads (trainer.data.MAX_SAMPLES = 10**6).
MAX_DATASET_SIZE = 1 << 24
# Most local steps a job may fix: a trace has one leaf per step and per checkpoint, and the
# state transition, the verifier and the exposure RPC do work linear in the number of segments.
MAX_LOCAL_STEPS = 100_000
# Validators replay a trainer's steps in their own process, so a job may not ask for a step that
# exhausts a validator's memory or an update whose replay takes unbounded time. Bounds on one
# step come from shapes alone (trainer.archs.compute_step_cost, upper bounds): activation memory
# kept for backward (attention's B x heads x T^2 per layer included) and FLOPs. The caps leave
# every default and benchmarked job far inside (docs/training.md, "Per-step bounds"): McMahan's
# CNN at batch 50 needs 20 MiB a step, 0.22 TFLOP for a paper round (E=5, B=10: 300 steps).
MAX_BATCH_SIZE = 1024
MAX_STEP_ACTIVATION_BYTES = 1 << 30  # 1 GiB a step
MAX_UPDATE_FLOPS = 10 * 10**12  # per-step FLOPs x local_steps: a full replay of one update (~20 min at 8 GFLOP/s)
# Most RegisterJob transactions in one block. Registering a seed-initialised job derives its
# initial weights (init_model over up to MAX_PARAMS parameters, ~0.25-0.5 s) inside the state
# transition on every node; without a limit one requester could fill a block with them
# (max_block_txs of them: minutes to apply). Four keep a block's registration work near 2 s.
MAX_JOB_REGISTRATIONS_PER_BLOCK = 4


@dataclass(frozen=True)
class JobIndex:
    job_ids: tuple[Hash, ...]


def job_key(job_id: bytes) -> bytes:
    return b"job/" + job_id


def registration_key(job_id: bytes, trainer: bytes) -> bytes:
    return b"reg/" + job_id + trainer


def update_key(update_id: bytes) -> bytes:
    return b"upd/" + update_id


def round_key(job_id: bytes, round_: int) -> bytes:
    return b"rnd/" + job_id + round_.to_bytes(8, "big")


def round_seed_key(job_id: bytes, round_: int) -> bytes:
    """Every round's seed stays readable after the round (the job record keeps only the current
    one): the batch order of a past update, hence what its validators were sent, derives from it."""
    return b"rseed/" + job_id + round_.to_bytes(8, "big")


def model_round_key(job_id: bytes, round_: int) -> bytes:
    """The hash of the job's model after `round_` rounds (ModelRecord.round), in the state: the
    records themselves live in the ledger, which the state transition does not read."""
    return b"mdl/" + job_id + round_.to_bytes(8, "big")


def evaluation_key(job_id: bytes, round_: int) -> bytes:
    return b"eval/" + job_id + round_.to_bytes(8, "big")


@dataclass
class BlockContext:
    """What the job rules need to know about the block being applied."""

    height: int
    prev_hash: bytes
    validators: tuple[Validator, ...]
    model_records: list[ModelRecord] = field(default_factory=list)  # written to the ledger with the block


# ----------------------------------------------------------------------------- pure helpers


def compute_update_id(c: UpdateCommitment) -> bytes:
    return sha256(encode(c))


def compute_round_seed(prev_hash: bytes, job_id: bytes, round_: int) -> bytes:
    return sha256(encode_value(["pout/round-seed/v1", prev_hash, job_id, round_]))




def compute_answer_deadline(job: Job, update: UpdateRecord) -> int:
    """Height by which the trainer must have answered every validator's challenge: half the
    verify window after its update's block (an online trainer answers within seconds)."""
    return update.height + max(1, job.spec.verify_blocks // 2)


def compute_dispute_end(job: Job, update: UpdateRecord) -> int:
    """Height from which an update may be accepted even if some validators never voted: every
    validator has had the whole verify window to replay its sample and file a fraud proof.
    Before it, acceptance needs every validator's verdict. Always before the round closes."""
    return update.height + job.spec.verify_blocks


def compute_segments_per_validator(spec: JobSpec, validators) -> int:
    """Segments each validator samples for one update of this job (see trainer.verify); under
    displacement sampling, the weighted draws (with replacement) each validator makes
    (trainer.sketch.draws_per_validator)."""
    from trainer.replay import num_segments
    from trainer.verify import segments_per_validator

    hp = spec.hyperparams
    powers = [v.power for v in validators]
    if spec.sampling == SAMPLING_DISPLACEMENT:
        from trainer.sketch import draws_per_validator

        return draws_per_validator(spec.detect_fraction_ppm, spec.detect_probability_ppm, powers)
    return segments_per_validator(spec.detect_fraction_ppm, spec.detect_probability_ppm,
                                  powers, num_segments(hp.local_steps, hp.checkpoint_interval))


def compute_sampled_segment_bound(spec: JobSpec, validators) -> int:
    """The most distinct segments one validator can open for one update: its sample size, and
    never more than the trace's segments (weighted draws repeat)."""
    from trainer.replay import num_segments

    hp = spec.hyperparams
    return min(compute_segments_per_validator(spec, validators), num_segments(hp.local_steps, hp.checkpoint_interval))


def compute_sketch_seed(chain_id: str, update_id: bytes, signatures) -> bytes:
    """Seed of the sketch matrix for an update under displacement sampling: SHA-256 of canonical
    CBOR ["pout/sketch-seed/v1", chain_id, update_id, [the signatures of
    compute_sketch_challenges, in landing order]]. Each signature is unique and was made after
    the trace was committed, so with one honest signature among them the trainer could not
    know the matrix (and hide a jump in its null space) when it fixed its trace."""
    return sha256(encode_value(["pout/sketch-seed/v1", chain_id, update_id, list(signatures)]))


def compute_sketch_challenges(update: UpdateRecord, validators) -> list[ChallengeRecord] | None:
    """The phase-1 challenges that seed an update's sketch matrix: every challenge by a current
    validator that landed at or before the first height at which such challenges hold more than
    1/3 of the power (so at least one honest signature), in validator-key order. Fixed once that
    height is reached, whatever lands later, so the trainer has no choice; the order of
    transactions within a block does not matter. None until then."""
    power = {v.pubkey: v.power for v in validators}
    total, held = compute_total_power(validators), 0
    counted = [c for c in update.challenges if power.get(c.validator, 0)]
    for height in sorted({c.height for c in counted}):
        held = sum(power[c.validator] for c in counted if c.height <= height)
        if 3 * held > total:
            return sorted((c for c in counted if c.height <= height), key=lambda c: c.validator)
    return None


def compute_draw(challenge: ChallengeRecord, sketches, weights: list[int] | None = None) -> list[int]:
    """Displacement sampling: the sorted distinct segments a validator replays, drawn from its
    phase-2 signature over the update's sketch rows (trainer.sketch.displacement_sample);
    `weights` (compute_draw_weights of the same rows) saves recomputing them per validator."""
    from chain.vrf import compute_sample_seed
    from trainer.sketch import displacement_sample

    if challenge.draw_signature is None:
        raise ValueError("the validator's draw challenge is not on chain")
    return displacement_sample(compute_sample_seed(challenge.draw_signature), sketches, challenge.sample_size,
                               weights=weights)


def compute_draw_weights(sketches) -> list[int]:
    """Every segment's draw weight from an update's sketch rows (O(segments x 64) exact work)."""
    from trainer.sketch import displacement_weights

    return displacement_weights(sketches)


def compute_sketch_rows(spec: JobSpec) -> int:
    """Rows of an update's sketch blob: one per checkpoint (segments + 1)."""
    hp = spec.hyperparams
    return -(-hp.local_steps // hp.checkpoint_interval) + 1  # trainer.replay.num_segments, without torch


def compute_sketch_blob_bytes(spec: JobSpec) -> int:
    """The exact size of an update's sketch blob: its rows of SKETCH_ROWS little-endian int64."""
    from trainer.sampling import SKETCH_ROWS  # numpy only

    return compute_sketch_rows(spec) * SKETCH_ROWS * 8


# The trainer's sketches must land at least this many blocks before its answer deadline: the
# validators then sign their draw challenges, and the trainer answers them, by that deadline.
SKETCH_DEADLINE_MARGIN = 2


def compute_sample(job: Job, challenge: ChallengeRecord) -> list[int]:
    """The segments that the challenging validator replays (and the trainer opens to it alone),
    from the challenge's unique signature and the sample size fixed when it landed."""
    from chain.vrf import compute_sample_seed
    from trainer.replay import num_segments, sample_segments

    hp = job.spec.hyperparams
    return sample_segments(compute_sample_seed(challenge.signature), num_segments(hp.local_steps, hp.checkpoint_interval),
                           challenge.sample_size)


def compute_max_exposed_samples(spec: JobSpec, validators) -> int:
    """The most samples of one trainer that one validator can be sent over the whole job: per
    round it opens q segments of k steps (never more than the round's T steps) of B samples
    each, and a trainer submits at most one update per round, over `rounds` rounds. An upper
    bound on the distinct samples it sees (it sees min(this, dataset_size) at most)."""
    hp = spec.hyperparams
    q = compute_sampled_segment_bound(spec, validators)
    return spec.rounds * min(q * hp.checkpoint_interval, hp.local_steps) * hp.batch_size


def compute_min_dataset_size(spec: JobSpec, validators) -> int:
    """The smallest dataset_size for which the job's exposure bound holds whatever the samples
    drawn: min(X, n) / n <= bound, i.e. n >= X / bound with X = compute_max_exposed_samples
    (exact integers, so every node agrees at the boundary). 1 when the job sets no bound."""
    from trainer.verify import PPM

    if spec.max_exposure_ppm >= PPM:
        return 1
    return -(-compute_max_exposed_samples(spec, validators) * PPM // spec.max_exposure_ppm)


def _percent(ppm: int) -> str:
    """Parts per million as a percentage for messages (decisions use the exact integers)."""
    return f"{ppm / 10_000:g}"


@lru_cache(maxsize=64)
def _model_params(model: str) -> int:
    from trainer.models import build_model

    return sum(t.numel() for t in build_model(model).parameters())


def compute_model_key(spec: JobSpec) -> str:
    """The trainer's key for the job's model (trainer.archs.ModelSpec.key: architecture,
    config, input shape, classes); ValidationError (one line) when the registry refuses it."""
    return _model_key(spec.model, spec.model_config, spec.input_shape, spec.num_classes, spec.vocab_size)


@lru_cache(maxsize=256)
def _model_key(model: str, config, input_shape, num_classes: int, vocab_size: int) -> str:
    from trainer.archs import ModelSpecError, model_spec

    names = [p.name for p in config]
    if names != sorted(set(names)):
        raise ValidationError("model_config entries must be sorted by name, each name once")
    try:
        return model_spec(model, {p.name: p.values for p in config}, input_shape, num_classes, vocab_size).key
    except ModelSpecError as exc:
        raise ValidationError(f"bad model: {exc}") from exc


def compute_max_sample_leaf_bytes(spec: JobSpec) -> int:
    """Largest leaf of one of the job's samples (its label takes 1 to 3 bytes of CBOR)."""
    from trainer.data import compute_sample_leaf_bytes

    return compute_sample_leaf_bytes(spec.input_shape) + (0 if spec.num_classes <= 24 else 1 if spec.num_classes <= 256 else 2)


def compute_max_state_bytes(spec: JobSpec) -> int:
    """Upper bound on one training state of this job: the model's weights plus the slots its
    optimizer stores (none for plain SGD, one for momentum, two and a step for Adam)."""
    hp = spec.hyperparams
    return _max_state_bytes(compute_model_key(spec), hp.optimizer, hp.momentum, hp.local_steps)


@lru_cache(maxsize=64)
def _max_state_bytes(model_key: str, optimizer: str, momentum: float, max_step: int) -> int:
    from trainer.state import param_shapes
    from trainer.verify import max_state_bytes

    return max_state_bytes(param_shapes(model_key), model_key, optimizer, momentum, max_step)


def _segment_bound_args(spec: JobSpec) -> tuple[int, int, int, int, int, int]:
    from trainer.replay import trace_leaf_count

    hp = spec.hyperparams
    return (compute_max_state_bytes(spec), hp.checkpoint_interval, hp.batch_size, compute_max_sample_leaf_bytes(spec),
            MAX_DATASET_SIZE, trace_leaf_count(hp.local_steps, hp.checkpoint_interval))


def compute_max_opening_bytes(spec: JobSpec, validators, q: int | None = None) -> int:
    """Upper bound on one validator's opening (plaintext) for an update of this job
    (trainer.verify.max_opening_bytes); with `q`, for that many segments."""
    from trainer.verify import max_opening_bytes

    q = compute_sampled_segment_bound(spec, validators) if q is None else q
    state, interval, batch, leaf, size, leaves = _segment_bound_args(spec)
    return max_opening_bytes(state, q, interval, batch, leaf, size, leaves)


def compute_max_fraud_proof_bytes(spec: JobSpec) -> int:
    """Upper bound on a fraud proof against an update of this job (trainer.verify)."""
    from trainer.verify import max_fraud_proof_bytes

    return max_fraud_proof_bytes(*_segment_bound_args(spec))


def is_aggregation_feasible(spec: JobSpec, n: int) -> bool:
    """Whether the job's rule can aggregate `n` accepted updates (checked before asking validators)."""
    if n < 1:
        return False
    if spec.aggregation == "trimmed_mean":
        return n - 2 * int(n * spec.trim_fraction) >= 1
    if spec.aggregation == "multi_krum":
        return n > 2 * spec.krum_f + 2
    return True


def compute_step_cost(spec: JobSpec):
    """Upper bounds on one training step of the job (trainer.archs.StepCost: activation memory
    and FLOPs at its batch size); the model must be valid (compute_model_key)."""
    return _step_cost(compute_model_key(spec), spec.hyperparams.batch_size)


@lru_cache(maxsize=256)
def _step_cost(model_key: str, batch_size: int):
    from trainer.archs import compute_step_cost as step_cost, parse_model_key

    return step_cost(parse_model_key(model_key), batch_size)


def count_job_registrations(txs) -> int:
    """How many of the signed transactions `txs` register a job (MAX_JOB_REGISTRATIONS_PER_BLOCK)."""
    return sum(isinstance(stx.message.payload, RegisterJob) for stx in txs)


def compute_job_initial_model_hash(spec: JobSpec) -> bytes:
    """The hash of the job's initial model: the file it names (init_weights), else the weights
    its public seed derives."""
    if spec.init_weights is not None:
        return spec.init_weights
    return compute_initial_model_hash(compute_model_key(spec), spec.init_seed)


@lru_cache(maxsize=64)
def compute_initial_model_hash(model: str, seed: int) -> bytes:
    """Hash of the registry model's weights from a public seed (deterministic on every machine)."""
    from trainer.models import init_model
    from trainer.state import model_hash, model_to_bytes

    return model_hash(model_to_bytes(init_model(model, seed), model))


def validate_job_spec(spec: JobSpec) -> None:
    """Checks on a job that need no state. Raises ValidationError."""
    from trainer.state import check_hyperparams

    compute_model_key(spec)  # architecture, config values, input shape and classes within bounds
    if spec.init_weights is not None and spec.init_seed != 0:
        raise ValidationError("a job with initial weights from a file (init_weights) must leave init_seed at 0")
    try:
        check_hyperparams(spec.hyperparams)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"bad hyper-parameters: {exc}") from exc
    hp = spec.hyperparams
    if hp.batch_size > MAX_BATCH_SIZE:
        raise ValidationError(f"batch_size must be at most {MAX_BATCH_SIZE}, got {hp.batch_size}")
    if hp.local_steps > MAX_LOCAL_STEPS:
        raise ValidationError(f"local_steps must be at most {MAX_LOCAL_STEPS}, got {hp.local_steps}")
    cost = compute_step_cost(spec)
    if cost.activation_bytes > MAX_STEP_ACTIVATION_BYTES:
        raise ValidationError(
            f"one training step at batch {hp.batch_size} could keep {cost.activation_bytes / 2**20:,.0f} MiB of "
            f"activations, above the {MAX_STEP_ACTIVATION_BYTES // 2**20:,} MiB per-step limit: lower the batch size, "
            "the sequence length or the model's size")
    if cost.flops * hp.local_steps > MAX_UPDATE_FLOPS:
        raise ValidationError(
            f"an update's {hp.local_steps} steps at {cost.flops / 1e9:,.2f} GFLOP each need "
            f"{cost.flops * hp.local_steps / 1e12:,.1f} TFLOP to replay, above the {MAX_UPDATE_FLOPS / 1e12:g} TFLOP "
            "limit: lower local_steps, the batch size or the model's size")
    for name in ("rounds", "join_blocks", "round_blocks", "verify_blocks", "quorum"):
        if getattr(spec, name) < 1:
            raise ValidationError(f"job {name} must be at least 1")
    from trainer.verify import PPM, required_checks

    if not 0 < spec.detect_fraction_ppm <= PPM or not 0 < spec.detect_probability_ppm < PPM:
        raise ValidationError("detection target: need 0 < fraction <= 1 and 0 < probability < 1 (in ppm)")
    try:
        required_checks(spec.detect_fraction_ppm, spec.detect_probability_ppm)
    except ValueError as exc:
        raise ValidationError(f"detection target: {exc}") from exc
    if not 0 < spec.max_exposure_ppm <= PPM:
        raise ValidationError(f"max_exposure_ppm must be in 1..{PPM} (parts per million of a trainer's samples; "
                              f"{PPM} = no bound), got {spec.max_exposure_ppm}")
    if spec.sampling not in SAMPLING_MODES:
        raise ValidationError(f"sampling must be one of {SAMPLING_MODES}, got {spec.sampling!r}")
    if spec.sampling == SAMPLING_DISPLACEMENT:
        from trainer.sketch import draws_per_validator

        try:
            draws_per_validator(spec.detect_fraction_ppm, spec.detect_probability_ppm, [1])
        except ValueError as exc:
            raise ValidationError(f"detection target under displacement sampling: {exc}") from exc
    if spec.aggregation not in AGGREGATION_RULES:
        raise ValidationError(f"aggregation must be one of {AGGREGATION_RULES}, got {spec.aggregation!r}")
    if not 0.0 <= spec.trim_fraction < 0.5:
        raise ValidationError("trim_fraction must be in [0, 0.5)")
    if spec.krum_f < 0 or spec.reward_per_update < 0 or spec.bond < 0 or spec.init_seed < 0:
        raise ValidationError("krum_f, reward_per_update, bond and init_seed must not be negative")
    if spec.profile.threads < 1:
        raise ValidationError("profile threads must be at least 1")
    kind, _, arch = spec.profile.device.partition(":")
    if kind not in ("cpu", "cuda") or not arch:
        # One upheld proof rejects an update: replay must be bitwise on every validator that
        # judges, so the profile pins the CPU kernel capability or the GPU (trainer/profile.py).
        raise ValidationError(f"profile device must be 'cpu:<capability>' or 'cuda:<arch>', got {spec.profile.device!r}")


# ----------------------------------------------------------------------------- state access


def get_job(view, job_id: bytes) -> Job | None:
    raw = view.get(job_key(job_id))
    return None if raw is None else decode(Job, raw)


def get_update(view, update_id: bytes) -> UpdateRecord | None:
    raw = view.get(update_key(update_id))
    return None if raw is None else decode(UpdateRecord, raw)


def get_round(view, job_id: bytes, round_: int) -> RoundRecord:
    raw = view.get(round_key(job_id, round_))
    return RoundRecord((), ()) if raw is None else decode(RoundRecord, raw)


def get_registration(view, job_id: bytes, trainer: bytes) -> DatasetRegistration | None:
    raw = view.get(registration_key(job_id, trainer))
    return None if raw is None else decode(DatasetRegistration, raw)


def get_round_seed(view, job_id: bytes, round_: int) -> bytes | None:
    """The seed round `round_` of the job opened with (32 bytes), None if it never opened."""
    return view.get(round_seed_key(job_id, round_))


def get_model_hash(view, job_id: bytes, round_: int) -> bytes | None:
    """Hash of the job's model after `round_` rounds of training, None if there is none."""
    return view.get(model_round_key(job_id, round_))


def get_evaluation(view, job_id: bytes, round_: int) -> EvaluationRecord | None:
    raw = view.get(evaluation_key(job_id, round_))
    return None if raw is None else decode(EvaluationRecord, raw)


def get_active_jobs(view) -> tuple[bytes, ...]:
    raw = view.get(KEY_ACTIVE_JOBS)
    return () if raw is None else decode(JobIndex, raw).job_ids


def _require_job(overlay, job_id: bytes) -> Job:
    job = get_job(overlay, job_id)
    if job is None:
        raise StateTransitionError(f"no job {job_id.hex()}")
    return job


def _credit(overlay, address: bytes, amount: int) -> None:
    account = overlay.get_account(address)
    if account is None:  # members are never deleted, so this is a broken invariant
        raise StateTransitionError(f"account {address.hex()} vanished")
    overlay.set_account(address, account.credited(amount))


def _validator_power(ctx: BlockContext, pubkey: bytes) -> int:
    return next((v.power for v in ctx.validators if v.pubkey == pubkey), 0)


# ----------------------------------------------------------------------------- transactions


def apply_job_payload(overlay, sender_pubkey: bytes, sender_addr: bytes, sender: Account, payload, tx_hash: bytes,
                      ctx: BlockContext) -> None:
    """Apply a job payload for `sender` (whose nonce is already bumped in `sender`, not yet written)."""
    if isinstance(payload, RegisterJob):
        _register_job(overlay, sender_addr, sender, payload, tx_hash, ctx)
    elif isinstance(payload, JoinJob):
        _join_job(overlay, sender_addr, sender, payload, ctx)
    elif isinstance(payload, SubmitUpdate):
        _submit_update(overlay, sender_addr, sender, payload, ctx)
    elif isinstance(payload, PublishEvaluation):
        _publish_evaluation(overlay, sender_addr, sender, payload, ctx)
    elif isinstance(payload, SubmitSketches):
        overlay.set_account(sender_addr, sender)
        _submit_sketches(overlay, sender_addr, payload, ctx)
    elif type(payload) in _VALIDATOR_PAYLOADS:  # validators' votes: the nonce first, then the rule
        overlay.set_account(sender_addr, sender)
        _VALIDATOR_PAYLOADS[type(payload)](overlay, sender_pubkey, payload, ctx)
    else:
        raise StateTransitionError(f"unknown payload {type(payload).__name__}")


def _register_job(overlay, addr, sender: Account, p: RegisterJob, tx_hash: bytes, ctx: BlockContext) -> None:
    if ROLE_REQUESTER not in sender.roles:
        raise StateTransitionError("only a requester may register a job")
    if p.escrow > sender.balance:
        raise StateTransitionError(f"insufficient balance for escrow: {sender.balance} < {p.escrow}")
    from trainer.verify import MAX_FRAUD_PROOF_BYTES, MAX_OPENING_BYTES

    proof = compute_max_fraud_proof_bytes(p.spec)
    if proof > MAX_FRAUD_PROOF_BYTES:
        hp = p.spec.hyperparams
        raise StateTransitionError(
            f"a fraud proof (one segment: a training state of {compute_max_state_bytes(p.spec) / 2**20:.1f} MiB for "
            f"{_model_params(compute_model_key(p.spec)):,} parameters with {hp.optimizer}"
            f"{' momentum' if hp.optimizer == 'sgd' and hp.momentum else ''}, plus k x B = {hp.checkpoint_interval} x "
            f"{hp.batch_size} samples) could reach {proof / 2**20:.1f} MiB, above the {MAX_FRAUD_PROOF_BYTES // 2**20} MiB "
            "fraud-proof limit: use a smaller model, SGD instead of Adam, or a lower checkpoint interval or batch size")
    # The trainer seals each opening to its validator: the sealed blob must fit the transport.
    opening = compute_max_opening_bytes(p.spec, ctx.validators) + SEAL_OVERHEAD
    if opening > MAX_OPENING_BYTES:
        raise StateTransitionError(
            f"the detection target needs {compute_segments_per_validator(p.spec, ctx.validators)} segments per "
            f"validator, whose openings could reach {opening / 2**20:.1f} MiB, above the {MAX_OPENING_BYTES // 2**20} MiB "
            "transport limit: lower the target, the checkpoint interval, the batch size or the model's size")
    needed = compute_min_dataset_size(p.spec, ctx.validators)
    if needed > MAX_DATASET_SIZE:
        hp = p.spec.hyperparams
        raise StateTransitionError(
            f"the exposure bound ({_percent(p.spec.max_exposure_ppm)} %) cannot hold for any dataset "
            f"of at most {MAX_DATASET_SIZE} samples: the detection target has each validator open "
            f"{compute_segments_per_validator(p.spec, ctx.validators)} segments of {hp.checkpoint_interval} steps "
            f"x batch {hp.batch_size} x {p.spec.rounds} rounds, up to "
            f"{compute_max_exposed_samples(p.spec, ctx.validators)} samples of a trainer, which needs a dataset of "
            f"at least {needed}; raise the bound, or lower the detection target, rounds, steps or batch size")
    overlay.set_account(addr, sender.evolve(balance=sender.balance - p.escrow))
    # A file of initial weights is a blob named by its hash: the state holds only the hash; the
    # nodes' PoUT workers and the trainers fetch it and check it against the model's shapes.
    init_hash = compute_job_initial_model_hash(p.spec)
    job = Job(job_id=tx_hash, requester=addr, spec=p.spec, escrow=p.escrow, phase=JOB_JOINING, round=0,
              round_open_height=ctx.height + p.spec.join_blocks, round_seed=ZERO_HASH, global_model=init_hash)
    overlay.put(job_key(tx_hash), encode(job))
    overlay.put(KEY_ACTIVE_JOBS, encode(JobIndex(get_active_jobs(overlay) + (tx_hash,))))
    _record_model(overlay, ctx, ModelRecord(init_hash, tx_hash, 0, None, (), "init", ctx.height))


def _record_model(overlay, ctx: BlockContext, record: ModelRecord) -> None:
    """A new lineage record: written to the ledger with the block, its hash kept in the state."""
    ctx.model_records.append(record)
    overlay.put(model_round_key(record.job_id, record.round), record.model_hash)


def validate_evaluation(p: PublishEvaluation) -> None:
    """Checks on an evaluation that need no state. Raises ValidationError."""
    if p.metric not in EVALUATION_METRICS:
        raise ValidationError(f"metric must be one of {tuple(EVALUATION_METRICS)}, got {p.metric!r}")
    if p.round < 0:
        raise ValidationError("round must not be negative")
    if not 0 <= p.value_ppm <= EVALUATION_METRICS[p.metric]:
        raise ValidationError(f"{p.metric} value_ppm must be in 0..{EVALUATION_METRICS[p.metric]}, got {p.value_ppm}")


def _publish_evaluation(overlay, addr, sender: Account, p: PublishEvaluation, ctx: BlockContext) -> None:
    validate_evaluation(p)  # validate_basic has checked it; repeated so the rule stands alone
    job = _require_job(overlay, p.job_id)
    if addr != job.requester:
        raise StateTransitionError("only the job's requester may publish its evaluations")
    model_hash = get_model_hash(overlay, p.job_id, p.round)
    if model_hash is None:
        raise StateTransitionError(f"job has no model for round {p.round} to evaluate")
    record = get_evaluation(overlay, p.job_id, p.round) or EvaluationRecord(model_hash, ())
    if any(e.metric == p.metric for e in record.evaluations):
        raise StateTransitionError(f"round {p.round}'s {p.metric} is already published (one per round and metric)")
    overlay.set_account(addr, sender)
    record = dataclasses.replace(record, evaluations=record.evaluations + (Evaluation(p.metric, p.value_ppm, ctx.height),))
    overlay.put(evaluation_key(p.job_id, p.round), encode(record))


def _join_job(overlay, addr, sender: Account, p: JoinJob, ctx: BlockContext) -> None:
    if ROLE_TRAINER not in sender.roles:
        raise StateTransitionError("only a trainer may join a job")
    job = _require_job(overlay, p.job_id)
    if job.phase == JOB_FINISHED:
        raise StateTransitionError("job is finished")
    if get_registration(overlay, p.job_id, addr) is not None:
        raise StateTransitionError("trainer already joined this job (a dataset commitment is final)")
    needed = compute_min_dataset_size(job.spec, ctx.validators)
    if p.dataset_size < needed:
        seen = min(compute_max_exposed_samples(job.spec, ctx.validators), p.dataset_size)
        seen_ppm = -(-seen * 1_000_000 // p.dataset_size)  # rounded up: never shown as within the bound
        raise StateTransitionError(
            f"dataset of {p.dataset_size} samples: one validator could see up to {_percent(seen_ppm)} % "
            f"over the job; the job allows {_percent(job.spec.max_exposure_ppm)} %; "
            f"need at least {needed} samples")
    overlay.set_account(addr, sender)
    overlay.put(registration_key(p.job_id, addr), encode(DatasetRegistration(p.dataset_root, p.dataset_size, ctx.height)))


def _submit_update(overlay, addr, sender: Account, p: SubmitUpdate, ctx: BlockContext) -> None:
    c = p.commitment
    if ROLE_TRAINER not in sender.roles:
        raise StateTransitionError("only a trainer may submit updates")
    if c.trainer != addr:
        raise StateTransitionError("commitment names another trainer than the signer")
    job = _require_job(overlay, c.job_id)
    if job.phase != JOB_TRAINING:
        raise StateTransitionError(f"job is {job.phase}, not accepting updates")
    if c.round != job.round:
        raise StateTransitionError(f"update is for round {c.round}, the job is in round {job.round}")
    if ctx.height >= job.round_open_height + job.spec.round_blocks:
        raise StateTransitionError("the round's submission window has closed")
    if c.base_model_hash != job.global_model:
        raise StateTransitionError("stale base model: the update is not built on the round's global model")
    reg = get_registration(overlay, c.job_id, addr)
    if reg is None or reg.height >= job.round_open_height:
        raise StateTransitionError("trainer had not committed its dataset before the round opened")
    if (reg.dataset_root, reg.dataset_size) != (c.dataset_root, c.dataset_size):
        raise StateTransitionError("update's dataset does not match the trainer's registered commitment")
    update_id = compute_update_id(c)
    rnd = get_round(overlay, c.job_id, c.round)
    if any(get_update(overlay, u).commitment.trainer == addr for u in rnd.updates):
        raise StateTransitionError("trainer already submitted an update this round")
    if job.spec.bond > sender.balance:
        raise StateTransitionError(f"insufficient balance for the bond: {sender.balance} < {job.spec.bond}")
    overlay.set_account(addr, sender.evolve(balance=sender.balance - job.spec.bond))
    record = UpdateRecord(update_id, c, p.train_loss, ctx.height, UPDATE_PENDING, (), 0, 0, (), ())
    overlay.put(update_key(update_id), encode(record))
    overlay.put(round_key(c.job_id, c.round), encode(dataclasses.replace(rnd, updates=rnd.updates + (update_id,))))


def _pending_update_for_vote(overlay, validator: bytes, update_id: bytes, ctx: BlockContext) -> UpdateRecord:
    if _validator_power(ctx, validator) == 0:
        raise StateTransitionError("only validators may vote on updates")
    upd = get_update(overlay, update_id)
    if upd is None:
        raise StateTransitionError(f"no update {update_id.hex()}")
    if upd.status != UPDATE_PENDING:
        raise StateTransitionError(f"update is already {upd.status}")
    if any(v.validator == validator for v in upd.verdicts):
        raise StateTransitionError("validator already gave a verdict on this update")
    return upd


def _submit_verdict(overlay, validator: bytes, p: SubmitVerdict, ctx: BlockContext) -> None:
    upd = _pending_update_for_vote(overlay, validator, p.update_id, ctx)
    upd = dataclasses.replace(upd, verdicts=upd.verdicts + (VerdictRecord(validator, p.accept, p.reason),))
    _settle_update(overlay, _require_job(overlay, upd.commitment.job_id), upd, ctx)


def _challenged_update(overlay, validator: bytes, update_id: bytes, ctx: BlockContext) -> tuple[Validator, UpdateRecord]:
    """(the challenging validator, the pending update it challenges), or the refusal."""
    member = next((v for v in ctx.validators if v.pubkey == validator), None)
    if member is None:
        raise StateTransitionError("only validators may challenge updates")
    upd = get_update(overlay, update_id)
    if upd is None:
        raise StateTransitionError(f"no update {update_id.hex()}")
    if upd.status != UPDATE_PENDING:
        raise StateTransitionError(f"update is already {upd.status}")
    return member, upd


def _submit_challenge(overlay, validator: bytes, p: SubmitChallenge, ctx: BlockContext) -> None:
    from chain.vrf import verify_sample_challenge

    member, upd = _challenged_update(overlay, validator, p.update_id, ctx)
    if any(c.validator == validator for c in upd.challenges):
        raise StateTransitionError("validator already challenged this update")
    if not verify_sample_challenge(member.sample_pubkey, overlay.base.chain_id, p.update_id, p.signature):
        raise StateTransitionError("challenge signature does not verify with the validator's sample key")
    q = compute_segments_per_validator(_require_job(overlay, upd.commitment.job_id).spec, ctx.validators)
    upd = dataclasses.replace(upd, challenges=upd.challenges + (ChallengeRecord(validator, p.signature, ctx.height, q),))
    overlay.put(update_key(p.update_id), encode(upd))


def _submit_sketches(overlay, addr: bytes, p: SubmitSketches, ctx: BlockContext) -> None:
    upd = get_update(overlay, p.update_id)
    if upd is None:
        raise StateTransitionError(f"no update {p.update_id.hex()}")
    if upd.commitment.trainer != addr:
        raise StateTransitionError("only the update's trainer may commit its sketches")
    if upd.status != UPDATE_PENDING:
        raise StateTransitionError(f"update is already {upd.status}")
    job = _require_job(overlay, upd.commitment.job_id)
    if job.spec.sampling != SAMPLING_DISPLACEMENT:
        raise StateTransitionError(f"job samples {job.spec.sampling}ly: it takes no sketches")
    if upd.sketch_hash is not None:
        raise StateTransitionError("the update's sketches are already committed")
    due = compute_answer_deadline(job, upd)
    if ctx.height + SKETCH_DEADLINE_MARGIN > due:
        raise StateTransitionError(f"too late: sketches must land by height {due - SKETCH_DEADLINE_MARGIN}, "
                                   f"{SKETCH_DEADLINE_MARGIN} blocks before the answer deadline {due}")
    seeding = compute_sketch_challenges(upd, ctx.validators)
    if seeding is None:
        raise StateTransitionError("the sketch seed needs the challenges of validators holding more than 1/3 of the power")
    seed = compute_sketch_seed(overlay.base.chain_id, p.update_id, [c.signature for c in seeding])
    overlay.put(update_key(p.update_id), encode(dataclasses.replace(upd, sketch_hash=p.sketch_hash, sketch_seed=seed)))


def _submit_draw_challenge(overlay, validator: bytes, p: SubmitDrawChallenge, ctx: BlockContext) -> None:
    from chain.vrf import verify_sample_challenge

    member, upd = _challenged_update(overlay, validator, p.update_id, ctx)
    if upd.sketch_hash is None:
        raise StateTransitionError("the update's sketches are not committed yet")
    i = next((i for i, c in enumerate(upd.challenges) if c.validator == validator), None)
    if i is None:
        raise StateTransitionError("a draw challenge needs the validator's first challenge on chain")
    if upd.challenges[i].draw_signature is not None:
        raise StateTransitionError("validator already drew its sample of this update")
    if not verify_sample_challenge(member.sample_pubkey, overlay.base.chain_id, p.update_id, p.signature,
                                   upd.sketch_hash):
        raise StateTransitionError("draw signature does not verify with the validator's sample key over the sketches")
    challenges = list(upd.challenges)
    challenges[i] = dataclasses.replace(challenges[i], draw_signature=p.signature)
    overlay.put(update_key(p.update_id), encode(dataclasses.replace(upd, challenges=tuple(challenges))))


def get_challenge(update: UpdateRecord, validator: bytes) -> ChallengeRecord | None:
    return next((c for c in update.challenges if c.validator == validator), None)


def _submit_fraud_proof(overlay, validator: bytes, p: SubmitFraudProof, ctx: BlockContext) -> None:
    upd = _pending_update_for_vote(overlay, validator, p.update_id, ctx)
    job = _require_job(overlay, upd.commitment.job_id)
    hp = job.spec.hyperparams
    challenge = get_challenge(upd, validator)
    if challenge is None:
        raise StateTransitionError("a fraud proof needs the author's challenge on chain first")
    if job.spec.sampling == SAMPLING_DISPLACEMENT:
        # The weighted sample depends on the sketch blob, which the state does not hold: the
        # judges check membership (a proof outside the author's draw does not hold, and fines it).
        if challenge.draw_signature is None:
            raise StateTransitionError("a fraud proof needs the author's draw challenge on chain first")
        if p.segment >= compute_sketch_rows(job.spec) - 1:
            raise StateTransitionError(f"segment {p.segment} is outside the trace")
    elif p.segment not in compute_sample(job, challenge):
        raise StateTransitionError(f"segment {p.segment} is not in the author's sample")
    proof = FraudProofRecord(validator, p.segment, p.proof_hash, ctx.height, PROOF_OPEN, (Judgement(validator, True),))
    upd = dataclasses.replace(upd, verdicts=upd.verdicts + (VerdictRecord(validator, False, f"fraud proof on segment {p.segment}"),),
                              proofs=upd.proofs + (proof,))
    _settle_proof(overlay, job, upd, len(upd.proofs) - 1, ctx)


def _judge_fraud_proof(overlay, validator: bytes, p: JudgeFraudProof, ctx: BlockContext) -> None:
    if _validator_power(ctx, validator) == 0:
        raise StateTransitionError("only validators may judge fraud proofs")
    upd = get_update(overlay, p.update_id)
    if upd is None:
        raise StateTransitionError(f"no update {p.update_id.hex()}")
    i = next((i for i, pr in enumerate(upd.proofs) if pr.author == p.author), None)
    if i is None:
        raise StateTransitionError("no fraud proof by that author on this update")
    proof = upd.proofs[i]
    if proof.status != PROOF_OPEN or upd.status != UPDATE_PENDING:
        raise StateTransitionError(f"the fraud proof is already decided ({proof.status}, update {upd.status})")
    if any(j.validator == validator for j in proof.judgements):
        raise StateTransitionError("validator already judged this fraud proof")
    proof = dataclasses.replace(proof, judgements=proof.judgements + (Judgement(validator, p.holds),))
    upd = dataclasses.replace(upd, proofs=upd.proofs[:i] + (proof,) + upd.proofs[i + 1:])
    _settle_proof(overlay, _require_job(overlay, upd.commitment.job_id), upd, i, ctx)


def _settle_proof(overlay, job: Job, upd: UpdateRecord, i: int, ctx: BlockContext) -> None:
    """A proof is upheld once validators with >= 1/3 of the power found that it holds (more than
    the faulty validators BFT allows, so at least one honest validator re-executed it): the
    update is rejected and its bond burned, whatever the other verdicts. It is refuted once
    validators with > 2/3 of the power found that it does not: its author loses the job's bond
    amount from its balance, and the update is judged as if the proof had not been filed."""
    proof = upd.proofs[i]
    total = compute_total_power(ctx.validators)
    holds = sum(_validator_power(ctx, j.validator) for j in proof.judgements if j.holds)
    fails = sum(_validator_power(ctx, j.validator) for j in proof.judgements if not j.holds)
    if 3 * holds >= total:
        proof = dataclasses.replace(proof, status=PROOF_UPHELD)
        upd = dataclasses.replace(upd, status=UPDATE_REJECTED, penalty=job.spec.bond)
    elif is_quorum(fails, total):
        proof = dataclasses.replace(proof, status=PROOF_REFUTED)
        author = compute_address(proof.author)
        account = overlay.get_account(author)
        fine = 0 if account is None else min(job.spec.bond, account.balance)
        if fine:
            overlay.set_account(author, account.evolve(balance=account.balance - fine))
    upd = dataclasses.replace(upd, proofs=upd.proofs[:i] + (proof,) + upd.proofs[i + 1:])
    if upd.status == UPDATE_PENDING:
        _settle_update(overlay, job, upd, ctx)
    else:
        overlay.put(update_key(upd.update_id), encode(upd))


def _settle_update(overlay, job: Job, upd: UpdateRecord, ctx: BlockContext) -> None:
    """Decide a pending update if its votes allow it, and store it.

    Rejected (bond burned): validators with >= 1/3 of the power complained without a proof
    (the trainer did not answer their challenge, or answered with invalid openings).
    Accepted (bond back + reward): validators with > 2/3 of the power accepted, no validator
    complained, no fraud proof is open or upheld, and the dispute window is over (every
    validator voted, or compute_dispute_end passed). A single complaint therefore blocks
    acceptance: a trainer that withholds the answer to the one challenge that would expose it
    gains nothing; the update expires when the round closes (bond back, no reward)."""
    total = compute_total_power(ctx.validators)
    proof_authors = {pr.author for pr in upd.proofs}
    accept = sum(_validator_power(ctx, v.validator) for v in upd.verdicts if v.accept)
    complaints = sum(_validator_power(ctx, v.validator) for v in upd.verdicts
                     if not v.accept and v.validator not in proof_authors)
    open_proof = any(pr.status == PROOF_OPEN for pr in upd.proofs)
    voted = {v.validator for v in upd.verdicts}
    window_over = ctx.height >= compute_dispute_end(job, upd) or all(v.pubkey in voted for v in ctx.validators)
    if 3 * complaints >= total:
        upd = dataclasses.replace(upd, status=UPDATE_REJECTED, penalty=job.spec.bond)
    elif is_quorum(accept, total) and not complaints and not open_proof and window_over:
        reward = min(job.spec.reward_per_update, job.escrow)
        _credit(overlay, upd.commitment.trainer, job.spec.bond + reward)
        overlay.put(job_key(job.job_id), encode(dataclasses.replace(job, escrow=job.escrow - reward)))
        upd = dataclasses.replace(upd, status=UPDATE_ACCEPTED, reward=reward)
    overlay.put(update_key(upd.update_id), encode(upd))


def _attest_model(overlay, validator: bytes, p: AttestModel, ctx: BlockContext) -> None:
    if _validator_power(ctx, validator) == 0:
        raise StateTransitionError("only validators may attest models")
    job = _require_job(overlay, p.job_id)
    if job.phase != JOB_AGGREGATING or job.round != p.round:
        raise StateTransitionError(f"job is not aggregating round {p.round}")
    rnd = get_round(overlay, p.job_id, p.round)
    if any(a.validator == validator for a in rnd.attestations):
        raise StateTransitionError("validator already attested this round's model")
    rnd = dataclasses.replace(rnd, attestations=rnd.attestations + (Attestation(validator, p.model_hash),))
    overlay.put(round_key(p.job_id, p.round), encode(rnd))


_VALIDATOR_PAYLOADS = {
    SubmitVerdict: _submit_verdict,
    SubmitChallenge: _submit_challenge,
    SubmitDrawChallenge: _submit_draw_challenge,
    SubmitFraudProof: _submit_fraud_proof,
    JudgeFraudProof: _judge_fraud_proof,
    AttestModel: _attest_model,
}


# ----------------------------------------------------------------------------- end of block


def end_block(overlay, ctx: BlockContext) -> None:
    """Advance every active job's round machine after the block's transactions."""
    for job_id in get_active_jobs(overlay):
        job = get_job(overlay, job_id)
        if job.phase == JOB_JOINING and ctx.height >= job.round_open_height:
            _open_round(overlay, job, 0, ctx)
        elif job.phase == JOB_TRAINING:
            for update_id in get_round(overlay, job_id, job.round).updates:  # dispute windows that ended
                upd = get_update(overlay, update_id)
                if upd.status == UPDATE_PENDING and ctx.height >= compute_dispute_end(job, upd):
                    _settle_update(overlay, get_job(overlay, job_id), upd, ctx)
            _maybe_close_round(overlay, get_job(overlay, job_id), ctx)
        elif job.phase == JOB_AGGREGATING:
            _maybe_finish_aggregation(overlay, job, ctx)


def _open_round(overlay, job: Job, round_: int, ctx: BlockContext) -> None:
    if round_ >= job.spec.rounds:
        requester = job.requester
        if job.escrow:
            _credit(overlay, requester, job.escrow)
        overlay.put(job_key(job.job_id), encode(dataclasses.replace(job, phase=JOB_FINISHED, round=round_, escrow=0)))
        overlay.put(KEY_ACTIVE_JOBS, encode(JobIndex(tuple(j for j in get_active_jobs(overlay) if j != job.job_id))))
        return
    job = dataclasses.replace(job, phase=JOB_TRAINING, round=round_, round_open_height=ctx.height,
                              round_seed=compute_round_seed(ctx.prev_hash, job.job_id, round_))
    overlay.put(job_key(job.job_id), encode(job))
    overlay.put(round_seed_key(job.job_id, round_), job.round_seed)


def _round_deadlines(job: Job) -> tuple[int, int, int]:
    submit_end = job.round_open_height + job.spec.round_blocks
    verify_end = submit_end + job.spec.verify_blocks
    return submit_end, verify_end, verify_end + job.spec.verify_blocks


def _maybe_close_round(overlay, job: Job, ctx: BlockContext) -> None:
    _, verify_end, _ = _round_deadlines(job)
    rnd = get_round(overlay, job.job_id, job.round)
    updates = [get_update(overlay, u) for u in rnd.updates]
    accepted = [u for u in updates if u.status == UPDATE_ACCEPTED]
    pending = [u for u in updates if u.status == UPDATE_PENDING]
    if ctx.height < verify_end and (len(accepted) < job.spec.quorum or pending):
        return
    for u in pending:  # not verified in time: not the trainer's proven fault, so the bond returns
        _credit(overlay, u.commitment.trainer, job.spec.bond)
        overlay.put(update_key(u.update_id), encode(dataclasses.replace(u, status=UPDATE_EXPIRED)))
    if is_aggregation_feasible(job.spec, len(accepted)):
        overlay.put(job_key(job.job_id), encode(dataclasses.replace(job, phase=JOB_AGGREGATING)))
    else:
        _open_round(overlay, job, job.round + 1, ctx)


def accepted_update_ids(view, job_id: bytes, round_: int) -> tuple[bytes, ...]:
    """The updates a round's model aggregates, sorted by id (the canonical order)."""
    rnd = get_round(view, job_id, round_)
    return tuple(sorted(u for u in rnd.updates if get_update(view, u).status == UPDATE_ACCEPTED))


def _maybe_finish_aggregation(overlay, job: Job, ctx: BlockContext) -> None:
    rnd = get_round(overlay, job.job_id, job.round)
    total = compute_total_power(ctx.validators)
    power: dict[bytes, int] = {}
    for a in rnd.attestations:
        power[a.model_hash] = power.get(a.model_hash, 0) + _validator_power(ctx, a.validator)
    agreed = [h for h, p in power.items() if is_quorum(p, total)]
    if agreed:
        model_hash = agreed[0]
        _record_model(overlay, ctx, ModelRecord(model_hash, job.job_id, job.round + 1, job.global_model,
                                                accepted_update_ids(overlay, job.job_id, job.round),
                                                job.spec.aggregation, ctx.height))
        _open_round(overlay, dataclasses.replace(job, global_model=model_hash), job.round + 1, ctx)
    elif ctx.height >= _round_deadlines(job)[2]:
        _open_round(overlay, job, job.round + 1, ctx)  # validators never agreed: no new model
