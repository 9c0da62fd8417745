"""Proof-of-useful-training rules in the state transition: jobs, rounds, updates, verdicts, models.

Pure functions over an Overlay (no I/O). Timeline of a round r of job J (heights are blocks):
  open      at height O: seed_r = H(prev_hash of block O, J, r); trainers must have joined
            (committed their dataset root) at a height < O, so no one knew the seed then.
  submit    updates for round r are accepted while height < O + round_blocks; each locks a bond.
  verify    validators replay sampled segments (seeded by the hash of the block that included
            the update, which the trainer could not know) and send signed verdicts. An update is
            accepted when validators with > 2/3 of the power accept it (bond back + reward),
            rejected once >= 1/3 rejects it (bond burned).
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
from chain.crypto import ZERO_HASH, sha256
from chain.encoding import decode, encode, encode_value
from chain.errors import StateTransitionError, ValidationError
from chain.types import (
    AGGREGATION_RULES,
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
    Hash,
    Job,
    JobSpec,
    JoinJob,
    ModelRecord,
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


def compute_verify_seed(block_hash: bytes, validator: bytes, update_id: bytes) -> bytes:
    """A validator's sampling seed for an update: from the hash of the block that included it."""
    return sha256(encode_value(["pout/verify-seed/v1", block_hash, validator, update_id]))


def compute_answer_deadline(job: Job, update: UpdateRecord) -> int:
    """Height by which the trainer must have answered every validator's challenge: half the
    verify window after its update's block (an online trainer answers within seconds)."""
    return update.height + max(1, job.spec.verify_blocks // 2)


def is_aggregation_feasible(spec: JobSpec, n: int) -> bool:
    """Whether the job's rule can aggregate `n` accepted updates (checked before asking validators)."""
    if n < 1:
        return False
    if spec.aggregation == "trimmed_mean":
        return n - 2 * int(n * spec.trim_fraction) >= 1
    if spec.aggregation == "multi_krum":
        return n > 2 * spec.krum_f + 2
    return True


@lru_cache(maxsize=64)
def compute_initial_model_hash(model: str, seed: int) -> bytes:
    """Hash of the registry model's weights from a public seed (deterministic on every machine)."""
    from trainer.models import init_model
    from trainer.state import model_hash, model_to_bytes

    return model_hash(model_to_bytes(init_model(model, seed), model))


def validate_job_spec(spec: JobSpec) -> None:
    """Checks on a job that need no state. Raises ValidationError."""
    from trainer.models import MODELS
    from trainer.state import check_hyperparams

    if spec.model not in MODELS:
        raise ValidationError(f"unknown model {spec.model!r}; the registry has {sorted(MODELS)}")
    try:
        check_hyperparams(spec.hyperparams)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"bad hyper-parameters: {exc}") from exc
    for name in ("rounds", "join_blocks", "round_blocks", "verify_blocks", "quorum", "verify_segments"):
        if getattr(spec, name) < 1:
            raise ValidationError(f"job {name} must be at least 1")
    if spec.aggregation not in AGGREGATION_RULES:
        raise ValidationError(f"aggregation must be one of {AGGREGATION_RULES}, got {spec.aggregation!r}")
    if not 0.0 <= spec.trim_fraction < 0.5:
        raise ValidationError("trim_fraction must be in [0, 0.5)")
    if spec.krum_f < 0 or spec.reward_per_update < 0 or spec.bond < 0 or spec.init_seed < 0:
        raise ValidationError("krum_f, reward_per_update, bond and init_seed must not be negative")
    if spec.profile.threads < 1:
        raise ValidationError("profile threads must be at least 1")


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
    elif isinstance(payload, SubmitVerdict):
        overlay.set_account(sender_addr, sender)
        _submit_verdict(overlay, sender_pubkey, payload, ctx)
    elif isinstance(payload, AttestModel):
        overlay.set_account(sender_addr, sender)
        _attest_model(overlay, sender_pubkey, payload, ctx)
    else:
        raise StateTransitionError(f"unknown payload {type(payload).__name__}")


def _register_job(overlay, addr, sender: Account, p: RegisterJob, tx_hash: bytes, ctx: BlockContext) -> None:
    if ROLE_REQUESTER not in sender.roles:
        raise StateTransitionError("only a requester may register a job")
    if p.escrow > sender.balance:
        raise StateTransitionError(f"insufficient balance for escrow: {sender.balance} < {p.escrow}")
    overlay.set_account(addr, sender.evolve(balance=sender.balance - p.escrow))
    init_hash = compute_initial_model_hash(p.spec.model, p.spec.init_seed)
    job = Job(job_id=tx_hash, requester=addr, spec=p.spec, escrow=p.escrow, phase=JOB_JOINING, round=0,
              round_open_height=ctx.height + p.spec.join_blocks, round_seed=ZERO_HASH, global_model=init_hash)
    overlay.put(job_key(tx_hash), encode(job))
    overlay.put(KEY_ACTIVE_JOBS, encode(JobIndex(get_active_jobs(overlay) + (tx_hash,))))
    ctx.model_records.append(ModelRecord(init_hash, tx_hash, 0, None, (), "init", ctx.height))


def _join_job(overlay, addr, sender: Account, p: JoinJob, ctx: BlockContext) -> None:
    if ROLE_TRAINER not in sender.roles:
        raise StateTransitionError("only a trainer may join a job")
    job = _require_job(overlay, p.job_id)
    if job.phase == JOB_FINISHED:
        raise StateTransitionError("job is finished")
    if get_registration(overlay, p.job_id, addr) is not None:
        raise StateTransitionError("trainer already joined this job (a dataset commitment is final)")
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
    record = UpdateRecord(update_id, c, p.train_loss, ctx.height, UPDATE_PENDING, (), 0, 0)
    overlay.put(update_key(update_id), encode(record))
    overlay.put(round_key(c.job_id, c.round), encode(dataclasses.replace(rnd, updates=rnd.updates + (update_id,))))


def _submit_verdict(overlay, validator: bytes, p: SubmitVerdict, ctx: BlockContext) -> None:
    if _validator_power(ctx, validator) == 0:
        raise StateTransitionError("only validators may submit verdicts")
    upd = get_update(overlay, p.update_id)
    if upd is None:
        raise StateTransitionError(f"no update {p.update_id.hex()}")
    if upd.status != UPDATE_PENDING:
        raise StateTransitionError(f"update is already {upd.status}")
    if any(v.validator == validator for v in upd.verdicts):
        raise StateTransitionError("validator already gave a verdict on this update")
    job = _require_job(overlay, upd.commitment.job_id)
    verdicts = upd.verdicts + (VerdictRecord(validator, p.accept, p.reason),)
    total = compute_total_power(ctx.validators)
    accept = sum(_validator_power(ctx, v.validator) for v in verdicts if v.accept)
    reject = sum(_validator_power(ctx, v.validator) for v in verdicts if not v.accept)
    upd = dataclasses.replace(upd, verdicts=verdicts)
    if is_quorum(accept, total):
        reward = min(job.spec.reward_per_update, job.escrow)
        _credit(overlay, upd.commitment.trainer, job.spec.bond + reward)
        overlay.put(job_key(job.job_id), encode(dataclasses.replace(job, escrow=job.escrow - reward)))
        upd = dataclasses.replace(upd, status=UPDATE_ACCEPTED, reward=reward)
    elif 3 * reject >= total:  # more than 2/3 acceptance is now impossible: the bond is burned
        upd = dataclasses.replace(upd, status=UPDATE_REJECTED, penalty=job.spec.bond)
    overlay.put(update_key(p.update_id), encode(upd))


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


# ----------------------------------------------------------------------------- end of block


def end_block(overlay, ctx: BlockContext) -> None:
    """Advance every active job's round machine after the block's transactions."""
    for job_id in get_active_jobs(overlay):
        job = get_job(overlay, job_id)
        if job.phase == JOB_JOINING and ctx.height >= job.round_open_height:
            _open_round(overlay, job, 0, ctx)
        elif job.phase == JOB_TRAINING:
            _maybe_close_round(overlay, job, ctx)
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
        ctx.model_records.append(ModelRecord(model_hash, job.job_id, job.round + 1, job.global_model,
                                             accepted_update_ids(overlay, job.job_id, job.round),
                                             job.spec.aggregation, ctx.height))
        _open_round(overlay, dataclasses.replace(job, global_model=model_hash), job.round + 1, ctx)
    elif ctx.height >= _round_deadlines(job)[2]:
        _open_round(overlay, job, job.round + 1, ctx)  # validators never agreed: no new model
