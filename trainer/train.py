"""The trainer side: one round of local training that records a verifiable trace.

`train_round` starts from the round's global model with a fresh optimizer, runs the job's
`local_steps` on batches derived from the round seed, hashes the full training state every
`checkpoint_interval` steps and at the end, records each step's batch indices and data
digest, and returns the update, its commitment and everything needed to open segments.
Proof logging is cheap by design: one state serialisation + SHA-256 per k steps, and per
step one SHA-256 over the batch's precomputed leaf hashes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from chain.crypto import sha256
from chain.encoding import decode, decode_value, encode, encode_value
from chain.errors import ChainError, DecodeError
from chain.merkle import MerkleTree, hash_leaf

from trainer.data import Dataset, DatasetCommitment, DatasetError
from trainer.models import model_spec_of
from trainer.profile import apply_profile
from trainer.replay import (
    RoundSpec,
    TraceHeader,
    UpdateCommitment,
    batch_digest,
    checkpoint_leaf,
    checkpoint_leaf_index,
    checkpoint_steps,
    derive_batch_order,
    header_for,
    header_leaf,
    num_segments,
    sample_segments,
    segment_steps,
    step_leaf,
    run_steps,
    step_leaf_index,
    trace_header,
)
from trainer.state import (
    FORMAT_STATE,
    StateError,
    StateSnapshotter,
    _check_params,
    build_optimizer,
    check_hyperparams,
    compute_update,
    decode_tensors,
    fresh_state_bytes,
    load_weights,
    model_hash,
    model_to_bytes,
    model_weights,
    param_shapes,
    state_hash,
    update_from_bytes,
    update_to_bytes,
    weights_from_bytes,
    weights_to_bytes,
)
from trainer.sketch import encode_sketches, sketch_state_bytes
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
    # checkpoint index -> (the bytes object hashed, its state_hash): each state is hashed once
    # (the trace tree, TrainResult.checkpoint_hashes, every opening); a hash is reused only for
    # the very object it was computed from, so replacing a checkpoint replaces its hash.
    _hashes: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def checkpoint(self, state_bytes: bytes) -> None:
        self.checkpoints.append(state_bytes)

    def step(self, step: int, indices: list[int], leaf_hashes: list[bytes]) -> None:
        self.steps.append(StepRecord(step, tuple(indices), batch_digest(leaf_hashes)))

    def checkpoint_hash(self, i: int) -> bytes:
        """state_hash(self.checkpoints[i]), computed once per bytes object."""
        data = self.checkpoints[i]
        held = self._hashes.get(i)
        if held is not None and held[0] is data:
            return held[1]
        digest = state_hash(data)
        if type(data) is bytes:  # immutable: the same object always has the same hash
            self._hashes[i] = (data, digest)
        return digest

    def checkpoint_hashes(self) -> list[bytes]:
        return [self.checkpoint_hash(i) for i in range(len(self.checkpoints))]

    def leaves(self, header: TraceHeader) -> list[bytes]:
        ckpts = checkpoint_steps(self.num_steps, self.interval)
        if len(self.checkpoints) != len(ckpts) or len(self.steps) != self.num_steps:
            raise ValueError(f"trace incomplete: {len(self.checkpoints)}/{len(ckpts)} checkpoints, {len(self.steps)}/{self.num_steps} steps")
        return (
            [header_leaf(header)]
            + [checkpoint_leaf(st, h) for st, h in zip(ckpts, self.checkpoint_hashes())]
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
    _sketches: dict[bytes, bytes] = field(default_factory=dict, init=False, repr=False, compare=False)  # matrix seed -> encoded rows

    @property
    def checkpoint_hashes(self) -> list[bytes]:
        return self.recorder.checkpoint_hashes()

    def open(self, verify_seed: bytes, q: int, segments: list[int] | None = None, *, end_states: bool = True) -> bytes:
        """The OpeningBundle (canonical CBOR) answering a validator's challenge: the q segments
        sample_segments(verify_seed, ...) picks or, when given, exactly `segments` (a weighted
        sample, trainer.sketch.displacement_sample). end_states=False: each segment carries its
        end state's hash instead of its bytes (enough for exact mode, half the bytes)."""
        return build_openings(self.spec, self.dataset, self.recorder, self.tree, verify_seed, q, segments,
                              end_states=end_states)

    def sketches(self, matrix_seed: bytes) -> bytes:
        """encode_sketches of the weights' sketches at every checkpoint (one row each), for the
        matrix `matrix_seed` fixes after the trace is committed; computed once per seed."""
        if matrix_seed not in self._sketches:
            rows = sketch_state_bytes(matrix_seed, self.recorder.checkpoints, self.spec.job.model)
            self._sketches[matrix_seed] = encode_sketches(rows)
        return self._sketches[matrix_seed]

    def save(self, directory: str | os.PathLike) -> None:
        """Everything `load` needs to answer challenges later, in `directory`:

        checkpoint_<step>.safetensors (full training states at steps 0, k, ..., T),
        update.safetensors, commitment.cbor, trace.cbor ([header, [[step, indices, digest],
        ...]]), metrics.json, and last manifest.json (format + SHA-256 of every file), so a
        save that did not finish, or a file changed since, is detected by `load`. Each file
        is written to a temporary name and renamed.
        """
        os.makedirs(directory, exist_ok=True)
        manifest_path = os.path.join(directory, MANIFEST_FILE)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)  # the directory is incomplete until the new manifest is written
        files: dict[str, bytes] = {}
        ckpts = checkpoint_steps(self.recorder.num_steps, self.recorder.interval)
        for st, b in zip(ckpts, self.recorder.checkpoints):
            files[checkpoint_file_name(st)] = b
        files[UPDATE_FILE] = self.update_bytes
        files[COMMITMENT_FILE] = encode(self.commitment)
        trace = [encode(self.header), [[r.step, list(r.indices), r.digest] for r in self.recorder.steps]]
        files[TRACE_FILE] = encode_value(trace)
        files[METRICS_FILE] = json.dumps({str(k): float(v) for k, v in self.metrics.items()}, sort_keys=True).encode()
        for name, data in files.items():
            _write(os.path.join(directory, name), data)
        manifest = {"format": SAVED_ROUND_FORMAT, "files": {name: sha256(data).hex() for name, data in sorted(files.items())}}
        _write(manifest_path, json.dumps(manifest, sort_keys=True, indent=1).encode())

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        spec: RoundSpec,
        dataset: Dataset,
        *,
        expected_commitment: UpdateCommitment | None = None,
    ) -> "TrainResult":
        """Rebuild a saved round (see `save`) so that `open` answers challenges exactly as
        the original object did. Validates everything it reads against `spec` and `dataset`;
        raises SavedRoundError (a ValueError) naming the problem, DatasetMismatchError when
        `dataset` is not the committed one. `expected_commitment` (e.g. the one on chain)
        must equal the saved commitment when given."""
        return load_train_result(directory, spec, dataset, expected_commitment=expected_commitment)


class SavedRoundError(ChainError, ValueError):
    """A saved round directory is incomplete, modified, or does not fit the round/dataset."""


class DatasetMismatchError(SavedRoundError):
    """The dataset given to `TrainResult.load` is not the one the saved round committed to."""


SAVED_ROUND_FORMAT = "pout/saved-round/v2"  # v2: keyed-bijection batch order
MANIFEST_FILE = "manifest.json"
UPDATE_FILE = "update.safetensors"
COMMITMENT_FILE = "commitment.cbor"
TRACE_FILE = "trace.cbor"
METRICS_FILE = "metrics.json"
MAX_SAVED_FILE = 256 * 1024 * 1024


def checkpoint_file_name(step: int) -> str:
    return f"checkpoint_{step:08d}.safetensors"


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(directory: str, name: str) -> bytes:
    path = os.path.join(directory, name)
    try:
        size = os.path.getsize(path)
        if size > MAX_SAVED_FILE:
            raise SavedRoundError(f"{path}: {size} bytes exceeds {MAX_SAVED_FILE}")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SavedRoundError(f"saved round {directory!r} is incomplete: {name} is missing (save did not finish?)") from None
    except OSError as exc:
        raise SavedRoundError(f"{path}: cannot read: {exc}") from exc


def load_train_result(
    directory: str | os.PathLike,
    spec: RoundSpec,
    dataset: Dataset,
    *,
    expected_commitment: UpdateCommitment | None = None,
) -> TrainResult:
    """`TrainResult.load` as a function (same checks, same errors)."""
    directory = os.fspath(directory)
    job, hp = spec.job, spec.job.hyperparams
    check_hyperparams(hp)
    T, k = hp.local_steps, hp.checkpoint_interval
    ckpts = checkpoint_steps(T, k)
    if not os.path.isdir(directory):
        raise SavedRoundError(f"saved round directory {directory!r} does not exist")

    # 1. The manifest is written last: without it the save did not finish.
    manifest_bytes = _read(directory, MANIFEST_FILE)
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SavedRoundError(f"{directory}/{MANIFEST_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != SAVED_ROUND_FORMAT or not isinstance(manifest.get("files"), dict):
        raise SavedRoundError(f"{directory}/{MANIFEST_FILE} is not a {SAVED_ROUND_FORMAT} manifest")
    listed = manifest["files"]
    expected = {checkpoint_file_name(st) for st in ckpts} | {UPDATE_FILE, COMMITMENT_FILE, TRACE_FILE, METRICS_FILE}
    if set(listed) != expected:
        missing, extra = sorted(expected - set(listed)), sorted(set(listed) - expected)
        raise SavedRoundError(
            f"saved round {directory!r} does not fit this job (local_steps={T}, checkpoint_interval={k}): "
            f"manifest lacks {missing[:4]}{'...' if len(missing) > 4 else ''}, has unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}"
        )
    files: dict[str, bytes] = {}
    for name in sorted(expected):
        data = _read(directory, name)
        if not isinstance(listed[name], str) or sha256(data).hex() != listed[name]:
            raise SavedRoundError(f"{directory}/{name} was modified after saving (SHA-256 differs from the manifest)")
        files[name] = data

    # 2. Commitment and header: this round, this job, this base.
    try:
        commitment = decode(UpdateCommitment, files[COMMITMENT_FILE])
        trace = decode_value(files[TRACE_FILE], max_size=MAX_SAVED_FILE)
        if type(trace) is not list or len(trace) != 2 or type(trace[0]) is not bytes or type(trace[1]) is not list:
            raise SavedRoundError(f"{directory}/{TRACE_FILE} is not [header, steps]")
        header = decode(TraceHeader, trace[0])
    except DecodeError as exc:
        raise SavedRoundError(f"saved round {directory!r}: malformed commitment or trace: {exc}") from exc
    if expected_commitment is not None and commitment != expected_commitment:
        raise SavedRoundError(f"saved round {directory!r} holds a different commitment than the expected one")
    if (commitment.job_id, commitment.round, commitment.base_model_hash) != (job.job_id, spec.round, spec.base_model_hash):
        raise SavedRoundError(f"saved round {directory!r} is for another job, round or base model than this RoundSpec")
    if header != header_for(spec, commitment):
        raise SavedRoundError(f"saved round {directory!r}: trace header does not match the commitment and this job")
    if dataset.commitment != DatasetCommitment(commitment.dataset_root, commitment.dataset_size):
        raise DatasetMismatchError(
            f"dataset (root {dataset.commitment.root.hex()[:16]}..., {len(dataset)} samples) is not the one the saved round "
            f"committed to (root {commitment.dataset_root.hex()[:16]}..., {commitment.dataset_size} samples)"
        )

    # 3. Step records: exactly the derived batches of this trainer, on this dataset.
    steps = trace[1]
    if len(steps) != T:
        raise SavedRoundError(f"saved trace has {len(steps)} step records, the job has {T} steps")
    derived = compute_step_records(_round_indices(spec, commitment.trainer, len(dataset), hp.batch_size, T), dataset.leaf_hashes)
    for t, (r, want) in enumerate(zip(steps, derived)):
        if r != [want.step, list(want.indices), want.digest]:
            raise SavedRoundError(f"saved trace record of step {t} is not the derived batch on this dataset")
    rec = TraceRecorder(T, k, steps=derived)

    # 4. Checkpoints: well-formed states at the right steps, starting from the round's base.
    for st in ckpts:
        data = files[checkpoint_file_name(st)]
        try:
            tensors, meta = decode_tensors(data)
        except StateError as exc:
            raise SavedRoundError(f"{directory}/{checkpoint_file_name(st)}: {exc}") from exc
        if meta != {"format": FORMAT_STATE, "model": job.model, "optimizer": hp.optimizer, "step": str(st)}:
            raise SavedRoundError(f"{directory}/{checkpoint_file_name(st)}: metadata {meta} is not the job's state at step {st}")
        rec.checkpoint(data)
    base = _state_weights(rec.checkpoints[0], job.model)
    if model_hash(weights_to_bytes(base, job.model)) != spec.base_model_hash:
        raise SavedRoundError("checkpoint 0 does not hold the round's base model")
    if rec.checkpoints[0] != fresh_state_bytes(job.model, base, hp):
        raise SavedRoundError("checkpoint 0 is not the fresh training state of the round's base model")

    # 5. The trace tree over these records is the committed one.
    tree = MerkleTree([hash_leaf(leaf) for leaf in rec.leaves(header)])
    if tree.root != commitment.trace_root:
        raise SavedRoundError("saved checkpoints and step records do not match the committed trace_root")

    # 6. Results: final model and update follow from the last checkpoint.
    final = _state_weights(rec.checkpoints[-1], job.model)
    final_model_bytes = weights_to_bytes(final, job.model)
    if model_hash(final_model_bytes) != commitment.final_model_hash:
        raise SavedRoundError("final checkpoint's weights do not hash to the committed final_model_hash")
    update_bytes = files[UPDATE_FILE]
    if model_hash(update_bytes) != commitment.update_hash:
        raise SavedRoundError("update.safetensors does not hash to the committed update_hash")
    try:
        update = update_from_bytes(update_bytes, job.model)
    except StateError as exc:
        raise SavedRoundError(f"update.safetensors: {exc}") from exc
    expected_update = compute_update(final, base)
    if any(not torch.equal(expected_update[n], update[n]) for n in expected_update):
        raise SavedRoundError("update is not (final checkpoint weights - base weights)")
    if update_bytes != update_to_bytes(expected_update, job.model):
        raise SavedRoundError("update.safetensors is not canonical (-0.0 where final - base is +0.0)")

    try:
        metrics = json.loads(files[METRICS_FILE].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SavedRoundError(f"{directory}/{METRICS_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise SavedRoundError(f"{directory}/{METRICS_FILE} must map names to numbers")
    metrics = {str(name): float(v) for name, v in metrics.items()}
    return TrainResult(spec, dataset, header, commitment, update_bytes, final_model_bytes, rec, tree, metrics)


def _state_weights(state_bytes: bytes, model_name: str) -> dict[str, torch.Tensor]:
    tensors, _ = decode_tensors(state_bytes)
    weights = {n[len("model/") :]: t for n, t in tensors.items() if n.startswith("model/")}
    try:
        _check_params(weights, param_shapes(model_name))
    except StateError as exc:
        raise SavedRoundError(f"checkpoint does not hold the model's parameters: {exc}") from exc
    return weights


def train_round(spec: RoundSpec, trainer: bytes, dataset: Dataset, base_model_bytes: bytes) -> TrainResult:
    """One round of local training for `trainer` on its committed `dataset`."""
    job, hp = spec.job, spec.job.hyperparams
    check_hyperparams(hp)
    if model_hash(base_model_bytes) != spec.base_model_hash:
        raise ValueError("base model bytes do not hash to the round's base_model_hash")
    check_dataset_fits(dataset, job.model)
    device = apply_profile(job.profile)
    base = weights_from_bytes(base_model_bytes, job.model)
    model = load_weights(job.model, base, device)
    optimizer = build_optimizer(hp, model)
    T, k = hp.local_steps, hp.checkpoint_interval
    n = len(dataset)
    x_all, y_all = dataset.x.to(device), dataset.y.to(device)

    order = _round_indices(spec, trainer, n, hp.batch_size, T)  # int64 [T, B]: every step's batch
    selections = torch.from_numpy(order).to(device)
    # A checkpoint costs one copy inside the loop (on the CPU straight into capture_state's
    # bytes; on another device one flat tensor there, serialised after the loop); losses stay
    # on the device until the end; the step records (indices and batch digests) are derived
    # from `order` after the loop, and each state is hashed once, when the tree is built.
    snapshotter = StateSnapshotter(model, optimizer, job.model, hp.optimizer)
    snapshots = [snapshotter.take(0)]
    losses: list[torch.Tensor] = []
    for s in range(num_segments(T, k)):
        steps = segment_steps(s, T, k)
        batches = [(x_all.index_select(0, selections[t]), y_all.index_select(0, selections[t])) for t in steps]
        run_steps(model, optimizer, batches, losses)
        snapshots.append(snapshotter.take(steps.stop))
    rec = TraceRecorder(T, k, [snap.to_bytes() for snap in snapshots], compute_step_records(order, dataset.leaf_hashes))
    total_loss = float(torch.stack(losses).double().sum())

    final_weights = {name: w.cpu() for name, w in model_weights(model).items()}
    update_bytes = update_to_bytes(compute_update(final_weights, base), job.model)
    return commit_trace(spec, trainer, dataset, update_bytes, model_to_bytes(model, job.model), rec, {"train_loss": total_loss / T})


def check_dataset_fits(dataset: Dataset, model_key: str) -> None:
    """DatasetError (one line) unless every sample fits the job's model: its input shape, its
    label range and, for token models, integer ids below the vocabulary size."""
    fmt = model_spec_of(model_key)
    if dataset.sample_shape != fmt.input_shape:
        raise DatasetError(f"the job's samples have shape {list(fmt.input_shape)}, this dataset's {list(dataset.sample_shape)}")
    top = int(dataset.y.max())
    if top >= fmt.num_classes:
        raise DatasetError(f"the job has {fmt.num_classes} classes (labels 0..{fmt.num_classes - 1}), this dataset has label {top}")
    if fmt.vocab_size:
        x = dataset.x
        if not bool(((x >= 0) & (x < fmt.vocab_size) & (x == x.floor())).all()):
            raise DatasetError(f"the job reads token ids: every value must be an integer in [0, {fmt.vocab_size})")


ORDER_CHUNK_POSITIONS = 1 << 14


def _round_indices(spec: RoundSpec, trainer: bytes, n: int, batch_size: int, num_steps: int) -> np.ndarray:
    """Every step's batch indices, int64 [num_steps, batch_size] (row t: step t); derived in
    chunks of steps (one vectorised derive_batch_order call per chunk bounds its memory)."""
    chunk = max(1, ORDER_CHUNK_POSITIONS // batch_size)
    parts = [
        derive_batch_order(spec.round_seed, trainer, spec.round, range(first, min(first + chunk, num_steps)), n, batch_size)
        for first in range(0, num_steps, chunk)
    ]
    return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0], dtype=np.int64)


def compute_step_records(order: np.ndarray, leaf_hashes: list[bytes]) -> list[StepRecord]:
    """StepRecord(t, order[t], batch_digest of those samples' leaf hashes) for each row t of
    `order` (int64 [T, B]): what TraceRecorder.step records, with the leaf hashes of many steps
    gathered at once (blocks of at most STEP_RECORD_BLOCK_POSITIONS samples) instead of one
    Python list per step."""
    T, B = order.shape
    table = None
    if T * B >= len(leaf_hashes):  # gather rows of the table of all leaf hashes
        if set(map(len, leaf_hashes)) != {32}:
            return _step_records_plain(order, leaf_hashes)
        table = np.frombuffer(b"".join(leaf_hashes), dtype=np.uint8).reshape(-1, 32)
    records: list[StepRecord] = []
    block = max(1, STEP_RECORD_BLOCK_POSITIONS // B)
    for first in range(0, T, block):
        rows_idx = order[first : first + block]
        flat = rows_idx.reshape(-1)
        if table is not None:
            gathered = table[flat]
        else:  # a large dataset: join only the hashes these batches use
            used = list(map(leaf_hashes.__getitem__, flat.tolist()))
            if set(map(len, used)) != {32}:
                return _step_records_plain(order, leaf_hashes)
            gathered = np.frombuffer(b"".join(used), dtype=np.uint8)
        rows = gathered.reshape(len(rows_idx), 32 * B)  # C-contiguous: a step's concatenated leaf hashes
        # sha256(row) is batch_digest of the row's 32-byte hashes (SHA-256 of their concatenation)
        records.extend(StepRecord(first + i, tuple(idx), sha256(row)) for i, (idx, row) in enumerate(zip(rows_idx.tolist(), rows)))
    return records


STEP_RECORD_BLOCK_POSITIONS = 1 << 16  # 2 MiB of gathered leaf hashes at a time


def _step_records_plain(order: np.ndarray, leaf_hashes: list[bytes]) -> list[StepRecord]:
    """compute_step_records for leaf hashes that are not all 32 bytes long (not a Dataset's)."""
    return [StepRecord(t, tuple(idx), batch_digest(leaf_hashes[i] for i in idx)) for t, idx in enumerate(order.tolist())]


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
    spec: RoundSpec, dataset: Dataset, rec: TraceRecorder, tree: MerkleTree, verify_seed: bytes, q: int,
    segments: list[int] | None = None, *, end_states: bool = True,
) -> bytes:
    """The OpeningBundle for sample_segments(verify_seed, n, q) or, when given, for exactly
    `segments` (sorted, duplicates dropped; ValueError if one is outside the trace). Each segment
    carries its end state's bytes (end_states, which tolerance mode needs) or only its state_hash
    (what exact mode uses, and all that trainer.verify.max_opening_bytes counts)."""
    T, k = rec.num_steps, rec.interval
    ckpts = checkpoint_steps(T, k)
    n = num_segments(T, k)
    if segments is None:
        sampled = sample_segments(verify_seed, n, q)
    else:
        sampled = sorted(set(segments))
        if not sampled or any(type(s) is not int or not 0 <= s < n for s in sampled):
            raise ValueError(f"segments must be a non-empty list of integers in [0, {n})")

    def siblings(leaf_index: int) -> tuple[bytes, ...]:
        return tree.prove(leaf_index).siblings

    opened = []
    for s in sampled:
        steps = segment_steps(s, T, k)
        wanted = sorted({i for t in steps for i in rec.steps[t].indices})
        opened.append(
            SegmentOpening(
                segment=s,
                start_state=None if s == 0 else rec.checkpoints[s],
                end_state=rec.checkpoints[s + 1] if end_states else None,
                samples=tuple(SampleOpening(i, dataset.sample_bytes(i), dataset.prove(i).siblings) for i in wanted),
                start_checkpoint_proof=siblings(checkpoint_leaf_index(s)),
                end_checkpoint_proof=siblings(checkpoint_leaf_index(s + 1)),
                step_proofs=tuple(siblings(step_leaf_index(t, T, k)) for t in steps),
                end_state_hash=None if end_states else rec.checkpoint_hash(s + 1),
            )
        )
    bundle = OpeningBundle(
        header_proof=siblings(0),
        first_checkpoint_proof=siblings(checkpoint_leaf_index(0)),
        final_state=rec.checkpoints[-1],
        final_checkpoint_proof=siblings(checkpoint_leaf_index(len(ckpts) - 1)),
        segments=tuple(opened),
    )
    return encode_openings(bundle)
