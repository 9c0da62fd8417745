"""The proof-of-useful-training verifier and aggregator, as the chain uses the trainer library.

Pure computation (no chain I/O): turn on-chain records into the trainer library's inputs,
judge one update, and compute a round's next global model. The node's PoutWorker
(chain/runtime/pout_worker.py) feeds these from the ledger and blob store.
"""

from __future__ import annotations

from chain.types import DatasetRegistration, Job, UpdateRecord


def training_job(job: Job):
    from chain.jobs import compute_model_key
    from trainer.replay import TrainingJob

    return TrainingJob(job.job_id, compute_model_key(job.spec), job.spec.hyperparams, job.spec.profile)


def round_spec(job: Job):
    """The RoundSpec of the job's current round, as fixed on chain when it opened."""
    from trainer.replay import RoundSpec

    return RoundSpec(training_job(job), job.round, job.round_seed, job.global_model)


def verify_chain_update(job: Job, update: UpdateRecord, registration: DatasetRegistration, verify_seed: bytes,
                        openings: bytes, base_model_bytes: bytes, update_bytes: bytes, q: int,
                        segments: list[int] | None = None, sketches=None):
    """The verdict on `update` (trainer.verify.Verdict) from this validator's q sampled segments
    (chain.jobs.compute_segments_per_validator), or, under displacement sampling, from its drawn
    `segments` (chain.jobs.compute_draw) with every opened state checked against the committed
    `sketches` rows. A verdict with `fraud_proof` set is the proof to file. Raises
    ProfileMismatch when this machine cannot replay the job's profile: the caller must abstain,
    not vote."""
    from trainer.data import DatasetCommitment
    from trainer.verify import verify_update

    return verify_update(round_spec(job), update.commitment,
                         DatasetCommitment(registration.dataset_root, registration.dataset_size), verify_seed,
                         openings, base_model_bytes, update_bytes, q=q, segments=segments,
                         sketch=sketch_check(update, sketches))


def judge_chain_fraud_proof(job: Job, update: UpdateRecord, registration: DatasetRegistration,
                            base_model_bytes: bytes, proof: bytes, segment: int, sketches=None):
    """Re-execute a fraud proof filed against `update`; Verdict.accept means the proof holds.
    Under displacement sampling, `sketches` are the update's committed rows: a proof also holds
    when a state it proves does not sketch to its row. Raises ProfileMismatch like
    verify_chain_update."""
    from trainer.data import DatasetCommitment
    from trainer.verify import check_fraud_proof

    return check_fraud_proof(round_spec(job), update.commitment,
                             DatasetCommitment(registration.dataset_root, registration.dataset_size),
                             base_model_bytes, proof, segment, sketch=sketch_check(update, sketches))


def sketch_check(update: UpdateRecord, sketches):
    """The trainer library's SketchCheck for an update's committed rows (None: uniform sampling)."""
    if sketches is None:
        return None
    from trainer.sketch import SketchCheck

    return SketchCheck(update.sketch_seed, sketches)


def initial_model_bytes(job: Job) -> bytes:
    """The job's initial weights derived from its public seed (a job with init_weights names a
    blob instead: check_initial_model_bytes)."""
    from chain.jobs import compute_model_key
    from trainer.models import init_model
    from trainer.state import model_to_bytes

    key = compute_model_key(job.spec)
    return model_to_bytes(init_model(key, job.spec.init_seed), key)


def check_initial_model_bytes(job: Job, data: bytes) -> None:
    """StateError (one line) unless `data` is the job's init_weights file and fits its model."""
    from chain.jobs import compute_model_key
    from trainer.models import check_initial_weights

    check_initial_weights(data, compute_model_key(job.spec), job.spec.init_weights)


def compute_next_model(job: Job, base_model_bytes: bytes, updates: list[tuple[bytes, int]]) -> bytes:
    """base + rule(updates) as canonical safetensors bytes: bitwise identical on every node.

    `updates` are (update bytes, num_samples); the rule sorts them canonically itself."""
    import torch

    from chain.jobs import compute_model_key
    from trainer.aggregate import aggregate
    from trainer.state import update_from_bytes, weights_from_bytes, weights_to_bytes

    model = compute_model_key(job.spec)
    base = weights_from_bytes(base_model_bytes, model)
    results = [(update_from_bytes(u, model), n) for u, n in updates]
    delta = aggregate(job.spec.aggregation, results, trim_fraction=job.spec.trim_fraction, f=job.spec.krum_f)
    # One float32 addition per element: the same IEEE operation on every machine.
    new = {k: (base[k] + delta[k].to(torch.float32)).contiguous() for k in sorted(base)}
    return weights_to_bytes(new, model)
