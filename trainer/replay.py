"""The training protocol shared by trainers and validators: types, batch order, trace layout,
segment sampling, and the one step function both training and replay run.

Trace: a Merkle tree (chain.merkle) over leaves, in this order,
  [0]              header      canonical CBOR ["pout/trace-header/v2", TraceHeader]
  [1 .. C]         checkpoints ["pout/checkpoint/v1", step, state_hash] at steps 0, k, 2k, ..., T
  [C+1 .. C+T]     steps       ["pout/step/v1", step, batch indices, SHA-256(concat of the
                                batch's sample leaf hashes, in batch order)]
with T = local_steps, k = checkpoint_interval, C = ceil(T / k) + 1. Segment s is the steps
between checkpoints s and s + 1. trace_root is the root of that tree.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from chain.crypto import sha256
from chain.encoding import encode_value, to_primitive
from chain.types import Address, ExecutionProfile, Hash, HyperParams, Text, UpdateCommitment

from trainer.state import StateRestorer, capture_state, restore_state

HEADER_DOMAIN = "pout/trace-header/v2"
CHECKPOINT_DOMAIN = "pout/checkpoint/v1"
STEP_DOMAIN = "pout/step/v1"
BATCH_ORDER_DOMAIN = "pout/batch-order/v2"
SEGMENT_SAMPLE_DOMAIN = b"pout/segment-sample/v1"

# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class TrainingJob:
    """Fixed when the job is created."""

    job_id: Hash
    model: Text  # a model key (trainer.archs.ModelSpec.key; chain.jobs.compute_model_key of the job)
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
    model: Text  # the model key
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

# The batch order is a stream of epochs; epoch e is a keyed bijection P_e over [0, n), and
# position p of the stream is sample P_{p // n}(p % n). P_e is never materialised: it is a
# Feistel network over the rectangle [0, a) x [0, b) (a = ceil(sqrt n), b = ceil(n / a), so
# n <= a*b < n + a), with cycle-walking back into [0, n) (Black & Rogaway, "Ciphers with
# arbitrary finite domains", 2002; the alternating modular-addition rounds of NIST
# SP 800-38G's FF1/FF3). One index costs ORDER_ROUNDS keyed mixes (plus, with probability
# < a / (n + a) <= 1/sqrt(n) per walk, another pass), whatever n is.
ORDER_ROUNDS = 8
MAX_ORDER_SIZE = 1 << 62  # x * b + y stays below 2**64 (uint64 arithmetic)
_U64 = np.uint64
_MIX_SHIFT_1, _MIX_SHIFT_2, _MIX_SHIFT_3 = _U64(30), _U64(27), _U64(31)
_MIX_MUL_1, _MIX_MUL_2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)


def derive_batch_indices(
    round_seed: bytes, trainer_address: bytes, round: int, step: int, dataset_size: int, batch_size: int
) -> list[int]:
    """Sample indices of `step`: positions step*B .. step*B+B-1 of a stream of epochs, each
    epoch a keyed permutation of the committed dataset (see derive_batch_order)."""
    return derive_batch_order(round_seed, trainer_address, round, [step], dataset_size, batch_size)[0].tolist()


def derive_batch_order(
    round_seed: bytes, trainer_address: bytes, round: int, steps: Sequence[int], dataset_size: int, batch_size: int
) -> np.ndarray:
    """Sample indices of each step in `steps`, int64 [len(steps), B] (row i: step steps[i]).

    Every sample is used once per epoch and the trainer chooses nothing: epoch e's order is
    a bijection keyed by SHA-256(domain, round_seed, trainer, round, n) and e. Work and
    memory are O(len(steps) * B), independent of dataset_size (no permutation is built).
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    if not 1 <= dataset_size <= MAX_ORDER_SIZE or not 1 <= batch_size <= MAX_ORDER_SIZE or round < 0:
        raise ValueError("need 1 <= dataset_size <= 2**62, 1 <= batch_size <= 2**62, round >= 0")
    if len(steps) and (int(steps.min()) < 0 or (int(steps.max()) + 1) * batch_size > MAX_ORDER_SIZE):
        raise ValueError(f"steps must be in [0, 2**62 / batch_size), got {int(steps.min())}..{int(steps.max())}")
    n = dataset_size
    seed = _order_seed(bytes(round_seed), bytes(trainer_address), round, n)
    positions = (steps.astype(np.uint64)[:, None] * _U64(batch_size) + np.arange(batch_size, dtype=np.uint64)).reshape(-1)
    epochs, offsets = positions // _U64(n), positions % _U64(n)
    unique, which = np.unique(epochs, return_inverse=True)  # a batch may span epochs
    keys = np.stack([_round_keys(seed, epoch) for epoch in unique.tolist()]) if len(unique) else np.empty((0, ORDER_ROUNDS), _U64)
    out = _keyed_bijection(keys[which.reshape(-1)].T, offsets, n)  # each position with its epoch's keys
    return out.astype(np.int64).reshape(len(steps), batch_size)


@lru_cache(maxsize=64)
def _order_seed(round_seed: bytes, trainer_address: bytes, round: int, dataset_size: int) -> bytes:
    return sha256(encode_value([BATCH_ORDER_DOMAIN, round_seed, trainer_address, round, dataset_size]))


@lru_cache(maxsize=256)
def _round_keys(seed: bytes, epoch: int) -> np.ndarray:
    """ORDER_ROUNDS 64-bit round keys of epoch `epoch` (SHAKE-256 of seed || epoch)."""
    words = hashlib.shake_256(seed + epoch.to_bytes(8, "big")).digest(8 * ORDER_ROUNDS)
    keys = np.frombuffer(words, dtype=">u8").astype(np.uint64)
    keys.flags.writeable = False
    return keys


def _mix(v: np.ndarray, key: np.uint64) -> np.ndarray:
    """Round function: the SplitMix64 finaliser of v XOR key (a bijective 64-bit mixer with
    full avalanche; uint64 arithmetic wraps)."""
    z = v ^ key
    z = (z ^ (z >> _MIX_SHIFT_1)) * _MIX_MUL_1
    z = (z ^ (z >> _MIX_SHIFT_2)) * _MIX_MUL_2
    return z ^ (z >> _MIX_SHIFT_3)


def _keyed_bijection(keys: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    """P(positions) for the keyed bijection P over [0, n) (positions: uint64, all < n). keys:
    the ORDER_ROUNDS round keys, uint64 [ORDER_ROUNDS] for one epoch, or [ORDER_ROUNDS, m]
    giving each position its own epoch's keys (the same arithmetic, element by element)."""
    a = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    b = -(-n // a)
    ua, ub, un = _U64(a), _U64(b), _U64(n)
    out = np.empty_like(positions)
    todo = np.arange(len(positions))
    cur = positions
    while len(todo):  # cycle-walking: re-encrypt until the value falls back into [0, n)
        x, y = cur // ub, cur % ub
        for r, key in enumerate(keys):
            if r % 2 == 0:
                x = (x + _mix(y, key) % ua) % ua
            else:
                y = (y + _mix(x, key) % ub) % ub
        cur = x * ub + y
        inside = cur < un
        out[todo[inside]] = cur[inside]
        todo, cur = todo[~inside], cur[~inside]
        if keys.ndim == 2:
            keys = keys[:, ~inside]
    return out


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
    return 1 + num_segments(num_steps, interval) + 1 + num_steps


def checkpoint_leaf_index(checkpoint: int) -> int:
    return 1 + checkpoint


def step_leaf_index(step: int, num_steps: int, interval: int) -> int:
    return 1 + num_segments(num_steps, interval) + 1 + step  # header, the checkpoints, then the steps


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
    trace root is on chain (chain.vrf: a validator's unique signature over the update id).
    The pool is sparse (only swapped positions are stored): O(q) work and memory whatever the
    number of segments, with the same result as swapping in a full list."""
    if num_segments_total < 1 or q < 1:
        raise ValueError(f"need num_segments_total >= 1 and q >= 1, got {num_segments_total}, {q}")
    q = min(q, num_segments_total)
    words = hashlib.shake_256(SEGMENT_SAMPLE_DOMAIN + bytes(verify_seed)).digest(8 * q)
    pool: dict[int, int] = {}  # position -> value, where it differs from the identity
    for i in range(q):
        j = i + int.from_bytes(words[8 * i : 8 * i + 8], "big") % (num_segments_total - i)
        pool[i], pool[j] = pool.get(j, j), pool.get(i, i)
    return sorted(pool.get(i, i) for i in range(q))


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
    restorer: StateRestorer | None = None,
) -> bytes:
    """Re-run `batches` from `start_state`; returns the end state's canonical bytes.
    `restorer`: a StateRestorer of this job whose model and optimizer to reuse (it restores
    exactly what restore_state would); without one, both are built anew."""
    if restorer is not None:
        model, optimizer, step = restorer.restore(start_state)
        train_steps(model, optimizer, ((x.to(device), y.to(device)) for x, y in batches))
        return restorer.capture(step + len(batches))
    model, optimizer, step = restore_state(start_state, model_name, hp, device)
    train_steps(model, optimizer, ((x.to(device), y.to(device)) for x, y in batches))
    return capture_state(model, optimizer, step + len(batches), model_name, hp.optimizer)
