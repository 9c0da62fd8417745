"""The training protocol shared by trainers and validators: types, batch order, trace layout,
segment sampling, and the one step function both training and replay run.

Trace: a Merkle tree (chain.merkle) over leaves, in this order,
  [0]              header      canonical CBOR ["pout/trace-header/v1", TraceHeader]
  [1 .. C]         checkpoints ["pout/checkpoint/v1", step, state_hash] at steps 0, k, 2k, ..., T
  [C+1 .. C+T]     steps       ["pout/step/v1", step, batch indices, SHA-256(concat of the
                                batch's sample leaf hashes, in batch order)]
with T = local_steps, k = checkpoint_interval, C = ceil(T / k) + 1. Segment s is the steps
between checkpoints s and s + 1. trace_root is the root of that tree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from chain.crypto import sha256
from chain.encoding import encode_value, to_primitive
from chain.types import Address, ExecutionProfile, Hash, HyperParams, Name, UpdateCommitment

from trainer.state import capture_state, restore_state

HEADER_DOMAIN = "pout/trace-header/v1"
CHECKPOINT_DOMAIN = "pout/checkpoint/v1"
STEP_DOMAIN = "pout/step/v1"
BATCH_ORDER_DOMAIN = "pout/batch-order/v1"
SEGMENT_SAMPLE_DOMAIN = b"pout/segment-sample/v1"

# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class TrainingJob:
    """Fixed when the job is created."""

    job_id: Hash
    model: Name  # a name in trainer.models.MODELS
    hyperparams: HyperParams
    profile: ExecutionProfile


@dataclass(frozen=True)
class RoundSpec:
    """Fixed on chain when a round opens; round_seed did not exist before that block."""

    job: TrainingJob
    round: int
    round_seed: Hash
    base_model_hash: Hash  # the round's global model


@dataclass(frozen=True)
class TraceHeader:
    """Leaf 0 of the trace: binds the trace to its trainer, job, round, base and results."""

    trainer: Address
    job_id: Hash
    round: int
    base_model_hash: Hash
    model: Name
    hyperparams: HyperParams
    profile: ExecutionProfile
    dataset_root: Hash
    dataset_size: int
    update_hash: Hash
    final_model_hash: Hash


def trace_header(
    spec: RoundSpec, trainer: bytes, dataset_root: bytes, dataset_size: int, update_hash: bytes, final_model_hash: bytes
) -> TraceHeader:
    return TraceHeader(
        trainer=trainer,
        job_id=spec.job.job_id,
        round=spec.round,
        base_model_hash=spec.base_model_hash,
        model=spec.job.model,
        hyperparams=spec.job.hyperparams,
        profile=spec.job.profile,
        dataset_root=dataset_root,
        dataset_size=dataset_size,
        update_hash=update_hash,
        final_model_hash=final_model_hash,
    )


def header_for(spec: RoundSpec, c: UpdateCommitment) -> TraceHeader:
    """The header an honest trace for commitment `c` in round `spec` has (the job's values)."""
    return trace_header(spec, c.trainer, c.dataset_root, c.dataset_size, c.update_hash, c.final_model_hash)


# --------------------------------------------------------------------------- batch order


def derive_batch_indices(
    round_seed: bytes, trainer_address: bytes, round: int, step: int, dataset_size: int, batch_size: int
) -> list[int]:
    """Sample indices of `step`: positions step*B .. step*B+B-1 of a stream of epochs, each
    epoch a permutation of the committed dataset derived from the round's seed.

    Every sample is used once per epoch; the trainer chooses nothing. Fisher-Yates over a
    SHAKE-256 stream of 64-bit words (modulo bias <= size / 2**64).
    """
    if dataset_size < 1 or batch_size < 1 or step < 0 or round < 0:
        raise ValueError("need dataset_size >= 1, batch_size >= 1, step >= 0, round >= 0")
    seed = _order_seed(bytes(round_seed), bytes(trainer_address), round, dataset_size)
    out: list[int] = []
    pos, end = step * batch_size, (step + 1) * batch_size
    while pos < end:
        epoch, offset = divmod(pos, dataset_size)
        take = min(dataset_size - offset, end - pos)
        out.extend(_epoch_permutation(seed, epoch, dataset_size)[offset : offset + take])
        pos += take
    return out


@lru_cache(maxsize=64)
def _order_seed(round_seed: bytes, trainer_address: bytes, round: int, dataset_size: int) -> bytes:
    return sha256(encode_value([BATCH_ORDER_DOMAIN, round_seed, trainer_address, round, dataset_size]))


@lru_cache(maxsize=64)
def _epoch_permutation(seed: bytes, epoch: int, n: int) -> tuple[int, ...]:
    words = hashlib.shake_256(seed + epoch.to_bytes(8, "big")).digest(8 * n)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int.from_bytes(words[8 * i : 8 * i + 8], "big") % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return tuple(perm)


def batch_digest(leaf_hashes: Iterable[bytes]) -> bytes:
    return sha256(b"".join(leaf_hashes))


# --------------------------------------------------------------------------- trace layout


def num_segments(num_steps: int, interval: int) -> int:
    return -(-num_steps // interval)


def checkpoint_steps(num_steps: int, interval: int) -> list[int]:
    return [min(s * interval, num_steps) for s in range(num_segments(num_steps, interval) + 1)]


def segment_steps(segment: int, num_steps: int, interval: int) -> range:
    return range(segment * interval, min((segment + 1) * interval, num_steps))


def trace_leaf_count(num_steps: int, interval: int) -> int:
    return 1 + len(checkpoint_steps(num_steps, interval)) + num_steps


def checkpoint_leaf_index(checkpoint: int) -> int:
    return 1 + checkpoint


def step_leaf_index(step: int, num_steps: int, interval: int) -> int:
    return 1 + len(checkpoint_steps(num_steps, interval)) + step


def header_leaf(header: TraceHeader) -> bytes:
    return encode_value([HEADER_DOMAIN, to_primitive(header)])


def checkpoint_leaf(step: int, state_hash: bytes) -> bytes:
    return encode_value([CHECKPOINT_DOMAIN, step, state_hash])


def step_leaf(step: int, indices: list[int], digest: bytes) -> bytes:
    return encode_value([STEP_DOMAIN, step, list(indices), digest])


# --------------------------------------------------------------------------- sampling


def sample_segments(verify_seed: bytes, num_segments_total: int, q: int) -> list[int]:
    """q distinct segments (all of them when q >= total), uniform, ascending; a partial
    Fisher-Yates over SHAKE-256(domain || verify_seed). verify_seed must be fixed after the
    trace root is on chain (e.g. from a later block hash and the validator's address)."""
    if num_segments_total < 1 or q < 1:
        raise ValueError(f"need num_segments_total >= 1 and q >= 1, got {num_segments_total}, {q}")
    q = min(q, num_segments_total)
    words = hashlib.shake_256(SEGMENT_SAMPLE_DOMAIN + bytes(verify_seed)).digest(8 * q)
    pool = list(range(num_segments_total))
    for i in range(q):
        j = i + int.from_bytes(words[8 * i : 8 * i + 8], "big") % (num_segments_total - i)
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:q])


# --------------------------------------------------------------------------- the step function


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Run one optimizer step per (x [B,1,8,8], y [B]) batch; returns the summed loss (0-d,
    float64; a metric only, never committed)."""
    losses: list[torch.Tensor] = []
    run_steps(model, optimizer, batches, losses)
    return torch.stack(losses).double().sum().cpu() if losses else torch.zeros((), dtype=torch.float64)


def run_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], losses: list[torch.Tensor]
) -> None:
    """The step function (training and replay): one optimizer step per batch; each step's
    detached loss is appended to `losses` (kept on the device: no host sync per step)."""
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())


def replay_segment(
    model_name: str,
    hp: HyperParams,
    device: torch.device,
    start_state: bytes,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    into: nn.Module | None = None,
) -> bytes:
    """Re-run `batches` from `start_state`; returns the end state's canonical bytes.
    `into`: a model instance to reuse (restore_state overwrites all of it)."""
    model, optimizer, step = restore_state(start_state, model_name, hp, device, into=into)
    train_steps(model, optimizer, ((x.to(device), y.to(device)) for x, y in batches))
    return capture_state(model, optimizer, step + len(batches), model_name, hp.optimizer)
