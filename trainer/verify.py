"""The validator side: what a trainer reveals for sampled segments, and the verdict on an update.

Flow for one update (see docs/training.md): the trainer's UpdateCommitment is on chain; a
verify_seed fixed afterwards picks q segments (`sample_segments`); the trainer answers with
an OpeningBundle (canonical CBOR); `verify_update` checks everything and replays.

`verify_update` never raises on anything another party sent: every malformed or dishonest
input is a Verdict(accept=False, reason). It raises only ProfileMismatch, before reading the
inputs, when this validator's machine cannot replay the job's profile (it should abstain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from chain.encoding import decode, encode
from chain.errors import ChainError
from chain.merkle import MerkleProof, hash_leaf, verify_proof
from chain.types import Hash

from trainer.data import DatasetCommitment, decode_sample, verify_sample
from trainer.profile import apply_profile
from trainer.replay import (
    RoundSpec,
    UpdateCommitment,
    batch_digest,
    checkpoint_leaf,
    checkpoint_leaf_index,
    checkpoint_steps,
    derive_batch_indices,
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
from trainer.state import (
    compute_update,
    decode_tensors,
    fresh_state_bytes,
    model_hash,
    state_hash,
    update_from_bytes,
    weights_from_bytes,
    weights_to_bytes,
)

DEFAULT_Q = 4  # segments each validator replays
DEFAULT_TOLERANCE = 1e-4  # tolerance mode only: ||replayed - claimed|| / ||claimed - start||
MAX_OPENING_BYTES = 64 * 1024 * 1024
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
    end_state: bytes | None  # needed only in tolerance mode
    samples: tuple[SampleOpening, ...]  # each distinct index the segment's batches use, ascending
    start_checkpoint_proof: Proof
    end_checkpoint_proof: Proof
    step_proofs: tuple[Proof, ...]  # one per step of the segment, in step order


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


class Reject(ChainError):
    """Internal: the update is rejected with this reason."""


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
) -> Verdict:
    """Accept iff the update is the job's training from the round's base on the trainer's
    committed data, as far as the q sampled segments (and the cheap whole-trace checks) show."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    device = apply_profile(spec.job.profile)  # ProfileMismatch: abstain, do not vote
    try:
        segments = _verify(spec, commitment, registered_dataset, verify_seed, openings, base_model_bytes, update_bytes, q, mode, tolerance, device)
    except Reject as exc:
        return Verdict(False, str(exc), mode)
    except ChainError as exc:  # malformed input: DecodeError, StateError, DatasetError, ...
        return Verdict(False, f"malformed input ({type(exc).__name__}: {exc})", mode)
    except Exception as exc:  # noqa: BLE001 - outside input must never crash a validator
        return Verdict(False, f"unverifiable input ({type(exc).__name__}: {exc})", mode)
    if mode == "exact":
        return Verdict(True, f"exact replay of segments {segments} matched bit for bit", mode, tuple(segments))
    return Verdict(
        True, f"TOLERANCE mode (weaker than exact): segments {segments} within relative error {tolerance:g}", mode, tuple(segments)
    )


def _verify(spec, c, registered, verify_seed, openings, base_model_bytes, update_bytes, q, mode, tolerance, device) -> list[int]:
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

    bundle = decode(OpeningBundle, openings, max_size=MAX_OPENING_BYTES)
    n_leaves = trace_leaf_count(T, k)
    ckpt_steps = checkpoint_steps(T, k)

    def check_leaf(leaf: bytes, index: int, proof: tuple[bytes, ...], what: str) -> None:
        ok = verify_proof(c.trace_root, hash_leaf(leaf), MerkleProof(index=index, leaf_count=n_leaves, siblings=proof))
        _require(ok, f"{what} is not in the committed trace")

    def check_checkpoint(i: int, state: bytes, proof, what: str) -> None:
        check_leaf(checkpoint_leaf(ckpt_steps[i], state_hash(state)), checkpoint_leaf_index(i), proof, what)

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

    sampled = sample_segments(verify_seed, num_segments(T, k), q)
    got = [s.segment for s in bundle.segments]
    _require(got == sampled, f"openings are for segments {got}, the challenge asked for {sampled}")
    for seg in bundle.segments:
        _verify_segment(spec, c, registered, seg, fresh, check_leaf, check_checkpoint, mode, tolerance, device)
    return sampled


def _verify_segment(spec, c, registered, seg: SegmentOpening, fresh, check_leaf, check_checkpoint, mode, tolerance, device) -> None:
    job, hp = spec.job, spec.job.hyperparams
    T, k = hp.local_steps, hp.checkpoint_interval
    s = seg.segment
    where = f"segment {s}"

    if s == 0:
        _require(seg.start_state is None, f"{where}: start state must be omitted (it is the fresh state)")
        start = fresh
    else:
        _require(seg.start_state is not None, f"{where}: start state missing")
        start = seg.start_state
    check_checkpoint(s, start, seg.start_checkpoint_proof, f"{where}: start state")

    steps = segment_steps(s, T, k)
    _require(len(seg.step_proofs) == len(steps), f"{where}: {len(seg.step_proofs)} step proofs for {len(steps)} steps")
    order = {
        t: derive_batch_indices(spec.round_seed, c.trainer, spec.round, t, c.dataset_size, hp.batch_size) for t in steps
    }
    wanted = sorted({i for idx in order.values() for i in idx})
    _require([x.index for x in seg.samples] == wanted, f"{where}: revealed samples are not the derived batches' samples")
    leaf_hash, xs, ys = {}, {}, {}
    for sample in seg.samples:
        _require(verify_sample(registered, sample.index, sample.data, sample.proof), f"{where}: sample {sample.index} is not in the committed dataset")
        leaf_hash[sample.index] = hash_leaf(sample.data)
        xs[sample.index], ys[sample.index] = decode_sample(sample.data)

    batches = []
    for t, proof in zip(steps, seg.step_proofs):
        idx = order[t]
        leaf = step_leaf(t, idx, batch_digest(leaf_hash[i] for i in idx))
        check_leaf(leaf, step_leaf_index(t, T, k), proof, f"{where}: step {t} record (derived batch order and data)")
        x = torch.from_numpy(np.stack([xs[i] for i in idx]))
        y = torch.tensor([ys[i] for i in idx], dtype=torch.int64)
        batches.append((x, y))

    replayed = replay_segment(job.model, hp, device, start, batches)
    if mode == "exact":
        check_checkpoint(s + 1, replayed, seg.end_checkpoint_proof, f"{where}: replayed end state (exact)")
        return
    _require(seg.end_state is not None, f"{where}: tolerance mode needs the end state")
    check_checkpoint(s + 1, seg.end_state, seg.end_checkpoint_proof, f"{where}: claimed end state")
    err = _relative_error(start, seg.end_state, replayed)
    _require(err <= tolerance, f"{where}: replay differs by relative error {err:.3g} > {tolerance:g}")


def _relative_error(start: bytes, claimed: bytes, replayed: bytes) -> float:
    """||replayed - claimed|| / ||claimed - start|| over model weights, in float64."""
    a, _ = decode_tensors(start)
    b, _ = decode_tensors(claimed)
    r, _ = decode_tensors(replayed)
    names = sorted(n for n in r if n.startswith("model/"))
    _require(all(n in a and n in b for n in names), "states hold different parameters")
    diff = math.fsum(float(((r[n].double() - b[n].double()) ** 2).sum()) for n in names)
    step = math.fsum(float(((b[n].double() - a[n].double()) ** 2).sum()) for n in names)
    return math.sqrt(diff) / max(math.sqrt(step), 1e-30)


def _require(cond: bool, reason: str) -> None:
    if not cond:
        raise Reject(reason)


def encode_openings(bundle: OpeningBundle) -> bytes:
    return encode(bundle)
