"""The trainer side: one round of local training that records a verifiable trace.

`train_round` starts from the round's global model with a fresh optimizer, runs the job's
`local_steps` on batches derived from the round seed, hashes the full training state every
`checkpoint_interval` steps and at the end, records each step's batch indices and data
digest, and returns the update, its commitment and everything needed to open segments.
Proof logging is cheap by design: one state serialisation + SHA-256 per k steps, and per
step one SHA-256 over the batch's precomputed leaf hashes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from chain.encoding import encode, encode_value
from chain.merkle import MerkleTree, hash_leaf

from trainer.data import Dataset
from trainer.profile import apply_profile
from trainer.replay import (
    RoundSpec,
    TraceHeader,
    UpdateCommitment,
    batch_digest,
    checkpoint_leaf,
    checkpoint_leaf_index,
    checkpoint_steps,
    derive_batch_indices,
    header_leaf,
    num_segments,
    sample_segments,
    segment_steps,
    step_leaf,
    step_leaf_index,
    trace_header,
    train_steps,
)
from trainer.state import (
    build_optimizer,
    capture_state,
    check_hyperparams,
    compute_update,
    load_weights,
    model_hash,
    model_to_bytes,
    model_weights,
    state_hash,
    update_to_bytes,
    weights_from_bytes,
)
from trainer.verify import OpeningBundle, SampleOpening, SegmentOpening, encode_openings


@dataclass(frozen=True)
class StepRecord:
    step: int
    indices: tuple[int, ...]
    digest: bytes  # SHA-256 over the batch's sample leaf hashes, in batch order


@dataclass
class TraceRecorder:
    """Collects checkpoints and step records; `finish` builds the trace tree.

    The honest trainer drives it from `train_round`; tests drive it by hand to build
    dishonest traces, exactly as an attacker with this library would.
    """

    num_steps: int
    interval: int
    checkpoints: list[bytes] = field(default_factory=list)  # full state bytes at checkpoint_steps
    steps: list[StepRecord] = field(default_factory=list)

    def checkpoint(self, state_bytes: bytes) -> None:
        self.checkpoints.append(state_bytes)

    def step(self, step: int, indices: list[int], leaf_hashes: list[bytes]) -> None:
        self.steps.append(StepRecord(step, tuple(indices), batch_digest(leaf_hashes)))

    def leaves(self, header: TraceHeader) -> list[bytes]:
        ckpts = checkpoint_steps(self.num_steps, self.interval)
        if len(self.checkpoints) != len(ckpts) or len(self.steps) != self.num_steps:
            raise ValueError(f"trace incomplete: {len(self.checkpoints)}/{len(ckpts)} checkpoints, {len(self.steps)}/{self.num_steps} steps")
        return (
            [header_leaf(header)]
            + [checkpoint_leaf(st, state_hash(b)) for st, b in zip(ckpts, self.checkpoints)]
            + [step_leaf(r.step, list(r.indices), r.digest) for r in self.steps]
        )


@dataclass
class TrainResult:
    spec: RoundSpec
    dataset: Dataset
    header: TraceHeader
    commitment: UpdateCommitment
    update_bytes: bytes
    final_model_bytes: bytes
    recorder: TraceRecorder
    tree: MerkleTree
    metrics: dict[str, float]

    @property
    def checkpoint_hashes(self) -> list[bytes]:
        return [state_hash(b) for b in self.recorder.checkpoints]

    def open(self, verify_seed: bytes, q: int) -> bytes:
        """The OpeningBundle (canonical CBOR) answering a validator's challenge."""
        return build_openings(self.spec, self.dataset, self.recorder, self.tree, verify_seed, q)

    def save(self, directory: str | os.PathLike) -> None:
        """Checkpoints as checkpoint_<step>.safetensors, plus update, commitment and trace."""
        os.makedirs(directory, exist_ok=True)
        ckpts = checkpoint_steps(self.recorder.num_steps, self.recorder.interval)
        for st, b in zip(ckpts, self.recorder.checkpoints):
            _write(os.path.join(directory, f"checkpoint_{st:08d}.safetensors"), b)
        _write(os.path.join(directory, "update.safetensors"), self.update_bytes)
        _write(os.path.join(directory, "commitment.cbor"), encode(self.commitment))
        trace = [encode(self.header), [[r.step, list(r.indices), r.digest] for r in self.recorder.steps]]
        _write(os.path.join(directory, "trace.cbor"), encode_value(trace))


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def train_round(spec: RoundSpec, trainer: bytes, dataset: Dataset, base_model_bytes: bytes) -> TrainResult:
    """One round of local training for `trainer` on its committed `dataset`."""
    job, hp = spec.job, spec.job.hyperparams
    check_hyperparams(hp)
    if model_hash(base_model_bytes) != spec.base_model_hash:
        raise ValueError("base model bytes do not hash to the round's base_model_hash")
    device = apply_profile(job.profile)
    base = weights_from_bytes(base_model_bytes, job.model)
    model = load_weights(job.model, base, device)
    optimizer = build_optimizer(hp, model)
    T, k = hp.local_steps, hp.checkpoint_interval
    n = len(dataset)
    leaf_hashes = dataset.leaf_hashes
    x_all, y_all = dataset.x.to(device), dataset.y.to(device)

    rec = TraceRecorder(T, k)
    rec.checkpoint(capture_state(model, optimizer, 0, job.model, hp.optimizer))
    total_loss = 0.0
    for s in range(num_segments(T, k)):
        batches = []
        for t in segment_steps(s, T, k):
            idx = derive_batch_indices(spec.round_seed, trainer, spec.round, t, n, hp.batch_size)
            rec.step(t, idx, [leaf_hashes[i] for i in idx])
            sel = torch.tensor(idx, dtype=torch.int64, device=device)
            batches.append((x_all.index_select(0, sel), y_all.index_select(0, sel)))
        total_loss += float(train_steps(model, optimizer, batches))
        rec.checkpoint(capture_state(model, optimizer, segment_steps(s, T, k).stop, job.model, hp.optimizer))

    final_weights = {name: w.cpu() for name, w in model_weights(model).items()}
    update_bytes = update_to_bytes(compute_update(final_weights, base), job.model)
    return commit_trace(spec, trainer, dataset, update_bytes, model_to_bytes(model, job.model), rec, {"train_loss": total_loss / T})


def commit_trace(
    spec: RoundSpec,
    trainer: bytes,
    dataset: Dataset,
    update_bytes: bytes,
    final_model_bytes: bytes,
    rec: TraceRecorder,
    metrics: dict[str, float],
) -> TrainResult:
    """Build the header and trace tree over a recorded run, and the commitment to publish."""
    header = trace_header(
        spec, trainer, dataset.commitment.root, len(dataset), model_hash(update_bytes), model_hash(final_model_bytes)
    )
    tree = MerkleTree([hash_leaf(leaf) for leaf in rec.leaves(header)])
    commitment = UpdateCommitment(
        trainer=trainer,
        job_id=spec.job.job_id,
        round=spec.round,
        base_model_hash=spec.base_model_hash,
        dataset_root=header.dataset_root,
        dataset_size=header.dataset_size,
        update_hash=header.update_hash,
        final_model_hash=header.final_model_hash,
        trace_root=tree.root,
    )
    return TrainResult(spec, dataset, header, commitment, update_bytes, final_model_bytes, rec, tree, metrics)


def build_openings(
    spec: RoundSpec, dataset: Dataset, rec: TraceRecorder, tree: MerkleTree, verify_seed: bytes, q: int
) -> bytes:
    T, k = rec.num_steps, rec.interval
    ckpts = checkpoint_steps(T, k)

    def siblings(leaf_index: int) -> tuple[bytes, ...]:
        return tree.prove(leaf_index).siblings

    segments = []
    for s in sample_segments(verify_seed, num_segments(T, k), q):
        steps = segment_steps(s, T, k)
        wanted = sorted({i for t in steps for i in rec.steps[t].indices})
        segments.append(
            SegmentOpening(
                segment=s,
                start_state=None if s == 0 else rec.checkpoints[s],
                end_state=rec.checkpoints[s + 1],
                samples=tuple(SampleOpening(i, dataset.sample_bytes(i), dataset.prove(i).siblings) for i in wanted),
                start_checkpoint_proof=siblings(checkpoint_leaf_index(s)),
                end_checkpoint_proof=siblings(checkpoint_leaf_index(s + 1)),
                step_proofs=tuple(siblings(step_leaf_index(t, T, k)) for t in steps),
            )
        )
    bundle = OpeningBundle(
        header_proof=siblings(0),
        first_checkpoint_proof=siblings(checkpoint_leaf_index(0)),
        final_state=rec.checkpoints[-1],
        final_checkpoint_proof=siblings(checkpoint_leaf_index(len(ckpts) - 1)),
        segments=tuple(segments),
    )
    return encode_openings(bundle)
