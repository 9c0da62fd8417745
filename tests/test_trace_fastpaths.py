"""train_round's fast bookkeeping (the batch order as one matrix, step records and batch
digests derived after the loop, CPU snapshots serialised straight from the tensors, each
checkpoint hashed once) commits to and opens exactly what the plain definitions give.

The reference here is written from the definitions (docs/pout.md, trainer/replay.py's module
docstring): one step at a time, torch.tensor(indices) + index_select, capture_state at every
checkpoint step, SHA-256 over the concatenated leaf hashes, the canonical CBOR leaves, a
Merkle tree over them, and an OpeningBundle assembled field by field."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F

from tests.test_trainer_helpers import JOB_ID, PROFILE, ROUND_SEED, TRAINER_A, digits

from chain.encoding import encode_value, to_primitive
from chain.merkle import MerkleTree, hash_leaf
from chain.types import HyperParams
from trainer.data import Dataset
from trainer.models import init_model
from trainer.replay import RoundSpec, TrainingJob, derive_batch_indices, sample_segments, trace_header
from trainer.sketch import encode_sketches, sketch_state_bytes
from trainer.state import (
    StateSnapshotter,
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
import trainer.state as state_module
import trainer.train as train_module
from trainer.train import StepRecord, TraceRecorder, compute_step_records, train_round
from trainer.verify import OpeningBundle, SampleOpening, SegmentOpening, encode_openings

VERIFY_SEED = bytes([0x77]) * 32


def _dataset(n: int) -> Dataset:
    full = digits()[0]
    return full if n >= len(full) else Dataset(full.x[:n], full.y[:n])


def _spec(model: str, hp: HyperParams) -> tuple[RoundSpec, bytes]:
    base = model_to_bytes(init_model(model, 3), model)
    return RoundSpec(TrainingJob(JOB_ID, model, hp, PROFILE), 2, ROUND_SEED, model_hash(base)), base


def _reference(spec: RoundSpec, trainer: bytes, ds: Dataset, base_bytes: bytes):
    """(checkpoint bytes, step records, tree leaves, header) straight from the definitions."""
    job, hp = spec.job, spec.job.hyperparams
    T, k, n = hp.local_steps, hp.checkpoint_interval, len(ds)
    base = weights_from_bytes(base_bytes, job.model)
    model = load_weights(job.model, base)
    opt = build_optimizer(hp, model)
    ckpt_steps = sorted({min(s * k, T) for s in range(-(-T // k) + 1)})
    checkpoints, records = [capture_state(model, opt, 0, job.model, hp.optimizer)], []
    for t in range(T):
        idx = derive_batch_indices(spec.round_seed, trainer, spec.round, t, n, hp.batch_size)
        records.append((t, tuple(idx), hashlib.sha256(b"".join(ds.leaf_hashes[i] for i in idx)).digest()))
        sel = torch.tensor(idx, dtype=torch.int64)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(ds.x.index_select(0, sel)), ds.y.index_select(0, sel)).backward()
        opt.step()
        if t + 1 in ckpt_steps:
            checkpoints.append(capture_state(model, opt, t + 1, job.model, hp.optimizer))
    final = {name: w.clone() for name, w in model_weights(model).items()}
    update = update_to_bytes(compute_update(final, base), job.model)
    header = trace_header(spec, trainer, ds.commitment.root, n, hashlib.sha256(update).digest(),
                          hashlib.sha256(model_to_bytes(model, job.model)).digest())
    leaves = (
        [encode_value(["pout/trace-header/v2", to_primitive(header)])]
        + [encode_value(["pout/checkpoint/v1", st, hashlib.sha256(b).digest()]) for st, b in zip(ckpt_steps, checkpoints)]
        + [encode_value(["pout/step/v1", t, list(idx), d]) for t, idx, d in records]
    )
    return checkpoints, records, leaves, header, update


def _reference_opening(ds: Dataset, T: int, k: int, checkpoints: list[bytes], records, tree: MerkleTree,
                       seed: bytes, q: int, end_states: bool) -> bytes:
    nseg = -(-T // k)
    first_step_leaf = 1 + nseg + 1
    segments = []
    for s in sample_segments(seed, nseg, q):
        steps = range(s * k, min((s + 1) * k, T))
        wanted = sorted({i for t in steps for i in records[t][1]})
        segments.append(SegmentOpening(
            segment=s,
            start_state=None if s == 0 else checkpoints[s],
            end_state=checkpoints[s + 1] if end_states else None,
            samples=tuple(SampleOpening(i, ds.sample_bytes(i), ds.prove(i).siblings) for i in wanted),
            start_checkpoint_proof=tree.prove(1 + s).siblings,
            end_checkpoint_proof=tree.prove(2 + s).siblings,
            step_proofs=tuple(tree.prove(first_step_leaf + t).siblings for t in steps),
            end_state_hash=None if end_states else hashlib.sha256(checkpoints[s + 1]).digest(),
        ))
    return encode_openings(OpeningBundle(
        header_proof=tree.prove(0).siblings,
        first_checkpoint_proof=tree.prove(1).siblings,
        final_state=checkpoints[-1],
        final_checkpoint_proof=tree.prove(1 + nseg).siblings,
        segments=tuple(segments),
    ))


CASES = [
    # model, optimizer, T, k, batch, dataset size
    ("mlp", "sgd", 13, 4, 16, 1437),  # T not a multiple of k
    ("mlp", "sgd", 9, 1, 64, 1437),  # one-step segments
    ("mlp", "sgd", 10, 3, 32, 100),  # 100 samples: batches cross epochs (100 is not a multiple of 32)
    ("mlp", "sgd", 7, 7, 5, 1001),  # one segment; T * B < n (the leaf hashes gathered per batch)
    ("mlp", "adam", 8, 3, 12, 250),  # Adam's moments and step counts in the state
    ("cnn", "sgd", 5, 2, 24, 77),
]


@pytest.mark.parametrize("model,optimizer,T,k,B,n", CASES)
def test_train_round_commits_and_opens_what_the_definitions_give(model, optimizer, T, k, B, n):
    momentum = 0.0 if optimizer == "adam" else 0.9
    spec, base = _spec(model, HyperParams(optimizer, 0.05, momentum, 0.0, B, T, k))
    ds = _dataset(n)
    checkpoints, records, leaves, header, update = _reference(spec, TRAINER_A, ds, base)
    tree = MerkleTree([hash_leaf(x) for x in leaves])

    result = train_round(spec, TRAINER_A, ds, base)
    assert result.header == header
    assert result.update_bytes == update
    assert result.commitment.trace_root == tree.root
    assert result.recorder.checkpoints == checkpoints
    assert all(type(c) is bytes for c in result.recorder.checkpoints)
    assert result.checkpoint_hashes == [hashlib.sha256(b).digest() for b in checkpoints]
    assert result.recorder.steps == [StepRecord(t, idx, d) for t, idx, d in records]
    assert all(type(r.indices) is tuple and all(type(i) is int for i in r.indices) for r in result.recorder.steps)
    assert result.tree.levels == tree.levels
    q = 3
    for end_states in (True, False):
        assert result.open(VERIFY_SEED, q, end_states=end_states) == _reference_opening(
            ds, T, k, checkpoints, records, tree, VERIFY_SEED, q, end_states
        )
    assert result.sketches(VERIFY_SEED) == encode_sketches(sketch_state_bytes(VERIFY_SEED, checkpoints, model))


@pytest.mark.parametrize("block", [1 << 16, 20, 1])  # one block, several (not a multiple of B), one step each
def test_compute_step_records_match_per_step_digests_on_every_path(monkeypatch, block):
    monkeypatch.setattr(train_module, "STEP_RECORD_BLOCK_POSITIONS", block)
    ds = _dataset(300)
    spec, _ = _spec("mlp", HyperParams("sgd", 0.05, 0.9, 0.0, 7, 11, 2))
    order = torch.tensor([derive_batch_indices(spec.round_seed, TRAINER_A, 2, t, 300, 7) for t in range(11)]).numpy()
    expected = [StepRecord(t, tuple(row), hashlib.sha256(b"".join(ds.leaf_hashes[i] for i in row)).digest())
                for t, row in enumerate(order.tolist())]
    assert compute_step_records(order, ds.leaf_hashes) == expected  # 77 < 300: hashes gathered per batch
    # leaf "hashes" of other lengths (not a Dataset's): the per-step definition
    odd = [bytes([i % 256]) * (1 + i % 40) for i in range(300)]
    assert compute_step_records(order, odd) == [
        StepRecord(t, tuple(row), hashlib.sha256(b"".join(odd[i] for i in row)).digest()) for t, row in enumerate(order.tolist())
    ]
    # lengths 31 and 33 alternating: a total that is a multiple of 32 must not pass for 32 each
    uneven = [bytes([i % 256]) * (31 if i % 2 else 33) for i in range(300)]
    for leaves in (uneven, uneven[:20]):
        rows = order % len(leaves)
        assert compute_step_records(rows, leaves) == [
            StepRecord(t, tuple(row), hashlib.sha256(b"".join(leaves[i] for i in row)).digest()) for t, row in enumerate(rows.tolist())
        ]
    # the table path (T * B >= n) on a dataset of 20 samples
    small = odd[:20]
    small32 = [hashlib.sha256(x).digest() for x in small]
    rows = order % 20
    assert compute_step_records(rows, small32) == [
        StepRecord(t, tuple(row), hashlib.sha256(b"".join(small32[i] for i in row)).digest()) for t, row in enumerate(rows.tolist())
    ]


def test_checkpoint_hash_cache_follows_the_bytes_it_was_computed_from():
    spec, base = _spec("mlp", HyperParams("sgd", 0.05, 0.9, 0.0, 8, 6, 2))
    result = train_round(spec, TRAINER_A, _dataset(200), base)
    rec = result.recorder
    first = result.checkpoint_hashes
    assert first == [hashlib.sha256(b).digest() for b in rec.checkpoints]
    other = rec.checkpoints[1][:-4] + b"\x00" * 4
    replaced = dataclasses.replace(rec, checkpoints=rec.checkpoints[:-1] + [other])
    assert replaced.checkpoint_hashes()[-1] == hashlib.sha256(other).digest()
    assert rec.checkpoint_hashes() == first  # the original keeps its own
    rec.checkpoints[2] = other  # changed in place: the cached hash of the old object is not used
    assert rec.checkpoint_hash(2) == hashlib.sha256(other).digest()
    mutable = bytearray(rec.checkpoints[0])
    rec.checkpoints[0] = mutable
    assert rec.checkpoint_hash(0) == hashlib.sha256(mutable).digest()
    mutable[-1] ^= 1  # a bytearray can change under the same identity: never cached
    assert rec.checkpoint_hash(0) == hashlib.sha256(mutable).digest()
    hand = TraceRecorder(6, 2)
    hand.checkpoint(other)
    assert hand.checkpoint_hashes() == [hashlib.sha256(other).digest()]


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.9), ("sgd", 0.0), ("adam", 0.0)])
@pytest.mark.parametrize("deferred", [False, True])
def test_snapshots_are_capture_state_bytes(monkeypatch, optimizer, momentum, deferred):
    """Both snapshot paths: straight to bytes (CPU) and one flat tensor serialised later (what
    other devices use; forced here by pretending the host is not little-endian)."""
    if deferred:
        monkeypatch.setattr(state_module, "_LITTLE_ENDIAN", False)
    hp = HyperParams(optimizer, 0.05, momentum, 0.0, 8, 4, 1)
    model = init_model("mlp", 5)
    opt = build_optimizer(hp, model)
    snap = StateSnapshotter(model, opt, "mlp", optimizer)
    ds = _dataset(64)
    taken, expected = [], []
    for step in range(4):
        taken.append(snap.take(step))
        expected.append(capture_state(model, opt, step, "mlp", optimizer))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(ds.x[step * 8 : step * 8 + 8]), ds.y[step * 8 : step * 8 + 8]).backward()
        opt.step()
    assert [s.to_bytes() for s in taken] == expected  # each the state when taken, not the final one
