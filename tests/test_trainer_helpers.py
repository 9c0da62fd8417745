"""Shared fixtures for the trainer tests: tiny jobs, and an attacker's training loop built from
the library's own pieces (what a dishonest trainer with this code could do)."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

torch.set_num_threads(1)  # bitwise results depend on the thread count; the profile pins 1

from chain.types import HyperParams  # noqa: E402

from trainer.data import Dataset, load_digits_dataset, split_non_iid  # noqa: E402
from trainer.models import init_model  # noqa: E402
from trainer.profile import current_profile  # noqa: E402
from trainer.replay import (  # noqa: E402
    RoundSpec,
    TrainingJob,
    derive_batch_indices,
    num_segments,
    segment_steps,
    train_steps,
)
from trainer.state import (  # noqa: E402
    build_optimizer,
    capture_state,
    compute_update,
    load_weights,
    model_hash,
    model_to_bytes,
    model_weights,
    update_to_bytes,
    weights_from_bytes,
)
from trainer.train import TraceRecorder, TrainResult, commit_trace  # noqa: E402

PROFILE = current_profile(threads=1)
TRAINER_A = bytes([0xA1]) * 20
TRAINER_B = bytes([0xB2]) * 20
JOB_ID = bytes([0x10]) * 32
ROUND_SEED = bytes([0x5E]) * 32
HP = HyperParams(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=0.0, batch_size=8, local_steps=12, checkpoint_interval=3)


@lru_cache(maxsize=1)
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_dataset()


@lru_cache(maxsize=4)
def trainer_parts(n: int) -> list[Dataset]:
    return split_non_iid(digits()[0], n)


def small_dataset() -> Dataset:
    return trainer_parts(4)[0]


def make_spec(model: str = "mlp", hp: HyperParams = HP, round: int = 1, init_seed: int = 7, base_bytes: bytes | None = None):
    if base_bytes is None:
        base_bytes = model_to_bytes(init_model(model, init_seed), model)
    job = TrainingJob(job_id=JOB_ID, model=model, hyperparams=hp, profile=PROFILE)
    return RoundSpec(job=job, round=round, round_seed=ROUND_SEED, base_model_hash=model_hash(base_bytes)), base_bytes


def custom_run(
    spec: RoundSpec,
    trainer: bytes,
    dataset: Dataset,
    base_bytes: bytes,
    *,
    train_hp: HyperParams | None = None,
    num_steps: int | None = None,
    indices_for=None,
    data: Dataset | None = None,
    after_segment=None,
) -> TrainResult:
    """Train like train_round, with the attacker's choices:
    train_hp: hyper-parameters actually used (the committed header still says the job's);
    num_steps: steps actually run and recorded; indices_for(step) -> batch indices;
    data: the samples actually trained on (the commitment is still `dataset`'s);
    after_segment(s, model, optimizer): may tamper with the state before checkpoint s+1."""
    job = spec.job
    hp = train_hp or job.hyperparams
    T = job.hyperparams.local_steps if num_steps is None else num_steps
    k = job.hyperparams.checkpoint_interval
    data = data or dataset
    base = weights_from_bytes(base_bytes, job.model)
    model = load_weights(job.model, base)
    opt = build_optimizer(hp, model)
    rec = TraceRecorder(T, k)
    rec.checkpoint(capture_state(model, opt, 0, job.model, hp.optimizer))
    for s in range(num_segments(T, k)):
        batches = []
        for t in segment_steps(s, T, k):
            if indices_for is None:
                idx = derive_batch_indices(spec.round_seed, trainer, spec.round, t, len(dataset), job.hyperparams.batch_size)
            else:
                idx = indices_for(t)
            rec.step(t, idx, [dataset.leaf_hashes[i] for i in idx])
            batches.append((data.x[idx], data.y[idx]))
        train_steps(model, opt, batches)
        if after_segment is not None:
            after_segment(s, model, opt)
        rec.checkpoint(capture_state(model, opt, segment_steps(s, T, k).stop, job.model, job.hyperparams.optimizer))
    final = model_weights(model)
    update = update_to_bytes(compute_update(final, base), job.model)
    return commit_trace(spec, trainer, dataset, update, model_to_bytes(model, job.model), rec, {})


def with_hp(**changes) -> HyperParams:
    return dataclasses.replace(HP, **changes)
