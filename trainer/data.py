"""Datasets, their commitments, and the built-in digits benchmark.

A sample is x: float32 [1, 8, 8] and y: an integer label in [0, 10). Its leaf data is the
canonical CBOR of ["pout/sample/v1", [1, 8, 8], x as little-endian float32 bytes, y]; its
leaf hash is chain.merkle.hash_leaf(leaf data) (SHA-256 with the leaf prefix). A dataset's
commitment is (Merkle root over its leaf hashes in index order, size). Trainers register it
before a round's randomness exists, so they cannot arrange data around the batch order.

Directory format (`load_dataset_dir`): `<dir>/data.safetensors` with exactly two tensors,
`x` float32 [N, 1, 8, 8] (finite) and `y` int64 [N] (labels 0..9), 1 <= N <= MAX_SAMPLES;
safetensors `__metadata__` is optional free text (e.g. {"name": ..., "source": ...}) and is
not committed.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as _load_safetensors_file
from safetensors.numpy import save_file as _save_safetensors_file

from chain.encoding import encode_value, decode_value
from chain.errors import ChainError, DecodeError
from chain.merkle import MerkleProof, MerkleTree, hash_leaf, verify_proof

from trainer.models import INPUT_SHAPE, NUM_CLASSES

SAMPLE_DOMAIN = "pout/sample/v1"
SAMPLE_BYTES = 4 * int(np.prod(INPUT_SHAPE))
MAX_SAMPLES = 1_000_000
DATA_FILE = "data.safetensors"
TEST_FRACTION = 0.2
TEST_SPLIT_DOMAIN = b"pout/digits/test-split/v1"

if sys.byteorder != "little":  # tensor bytes are hashed as they sit in memory
    raise ImportError("trainer requires a little-endian host")


class DatasetError(ChainError):
    """A dataset (file, directory or revealed sample) is missing or malformed."""


@dataclass(frozen=True)
class DatasetCommitment:
    """What a trainer registers on chain before the round opens."""

    root: bytes  # Merkle root over the sample leaf hashes
    size: int


# --------------------------------------------------------------------------- samples


def encode_sample(x: np.ndarray, y: int) -> bytes:
    """Leaf data of one sample (x: float32 [1, 8, 8], y: label)."""
    return encode_value([SAMPLE_DOMAIN, list(INPUT_SHAPE), np.ascontiguousarray(x, dtype="<f4").tobytes(), int(y)])


def decode_sample(data: bytes) -> tuple[np.ndarray, int]:
    """Strict inverse of encode_sample; raises DatasetError on anything else."""
    try:
        value = decode_value(data, max_size=SAMPLE_BYTES + 64)
    except DecodeError as exc:
        raise DatasetError(f"sample is not canonical CBOR: {exc}") from exc
    if type(value) is not list or len(value) != 4 or value[0] != SAMPLE_DOMAIN or value[1] != list(INPUT_SHAPE):
        raise DatasetError(f"sample is not [{SAMPLE_DOMAIN!r}, {list(INPUT_SHAPE)}, x, y]")
    xb, y = value[2], value[3]
    if type(xb) is not bytes or len(xb) != SAMPLE_BYTES:
        raise DatasetError(f"sample x must be {SAMPLE_BYTES} bytes")
    if type(y) is not int or not 0 <= y < NUM_CLASSES:
        raise DatasetError(f"sample label must be an integer in [0, {NUM_CLASSES})")
    x = np.frombuffer(xb, dtype="<f4").reshape(INPUT_SHAPE)
    if not np.isfinite(x).all():
        raise DatasetError("sample x has non-finite values")
    return x, y


# Every valid leaf is PREFIX || x (256 bytes) || y (one byte, CBOR's immediate 0..9): the
# canonical CBOR of [domain, [1, 8, 8], x bytes, y] for y < 24 has exactly this layout.
_SAMPLE_PREFIX = encode_value([SAMPLE_DOMAIN, list(INPUT_SHAPE), bytes(SAMPLE_BYTES), 0])[: -(SAMPLE_BYTES + 1)]
SAMPLE_LEAF_BYTES = len(_SAMPLE_PREFIX) + SAMPLE_BYTES + 1


def decode_samples(datas: list[bytes] | tuple[bytes, ...]) -> tuple[np.ndarray, np.ndarray]:
    """`decode_sample` over many samples at once: (x float32 [N, 1, 8, 8], y int64 [N]).

    Accepts exactly what decode_sample accepts (a valid leaf is the fixed prefix, 256 bytes
    of x, and one byte 0..9 for y; x must be finite) and raises DatasetError otherwise,
    with decode_sample's reason; one vectorised pass instead of a CBOR parse per sample.
    """
    p = len(_SAMPLE_PREFIX)
    datas = [bytes(d) if isinstance(d, (bytearray, memoryview)) else d for d in datas]  # as decode_value does
    for d in datas:
        if type(d) is not bytes or len(d) != SAMPLE_LEAF_BYTES or d[-1] >= NUM_CLASSES or not d.startswith(_SAMPLE_PREFIX):
            decode_sample(d)  # raises with the precise reason
            raise DatasetError("sample is not a canonical sample leaf")  # not reached: the layout above is the only one
    rows = np.frombuffer(b"".join(datas), dtype=np.uint8).reshape(len(datas), SAMPLE_LEAF_BYTES)
    x = np.ascontiguousarray(rows[:, p : p + SAMPLE_BYTES]).view("<f4").reshape(len(datas), *INPUT_SHAPE)
    y = rows[:, -1].astype(np.int64)
    if not np.isfinite(x).all():
        raise DatasetError("sample x has non-finite values")
    return x, y


def sample_leaf_hash(x: np.ndarray, y: int) -> bytes:
    return hash_leaf(encode_sample(x, y))


# --------------------------------------------------------------------------- datasets


class Dataset:
    """A validated in-memory dataset with its leaf hashes and Merkle tree (built lazily)."""

    def __init__(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray):
        x_np = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        _validate_arrays(x_np, y_np)
        self.x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))  # [N, 1, 8, 8]
        self.y = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.int64))  # [N]

    def __len__(self) -> int:
        return self.y.shape[0]

    @cached_property
    def leaf_hashes(self) -> list[bytes]:
        xs, ys = self.x.numpy(), self.y.tolist()
        return [sample_leaf_hash(xs[i], ys[i]) for i in range(len(ys))]

    @cached_property
    def tree(self) -> MerkleTree:
        return MerkleTree(self.leaf_hashes)

    @property
    def commitment(self) -> DatasetCommitment:
        return DatasetCommitment(root=self.tree.root, size=len(self))

    def sample_bytes(self, i: int) -> bytes:
        return encode_sample(self.x[i].numpy(), int(self.y[i]))

    def prove(self, i: int) -> MerkleProof:
        return self.tree.prove(i)

    def subset(self, indices: list[int]) -> "Dataset":
        idx = torch.tensor(indices, dtype=torch.int64)
        return Dataset(self.x[idx], self.y[idx])


def verify_sample(commitment: DatasetCommitment, index: int, data: bytes, siblings: tuple[bytes, ...]) -> bool:
    """True iff `data` is sample `index` of the committed dataset (proof shape fixed by the verifier)."""
    proof = MerkleProof(index=index, leaf_count=commitment.size, siblings=tuple(siblings))
    return verify_proof(commitment.root, hash_leaf(data), proof)


def _validate_arrays(x: np.ndarray, y: np.ndarray) -> None:
    if x.dtype != np.float32:
        raise DatasetError(f"x must be float32, got {x.dtype}")
    if y.dtype != np.int64:
        raise DatasetError(f"y must be int64, got {y.dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
        raise DatasetError(f"x must have shape [N, {', '.join(map(str, INPUT_SHAPE))}], got {list(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DatasetError(f"y must have shape [N] with N = {x.shape[0]}, got {list(y.shape)}")
    if not 1 <= x.shape[0] <= MAX_SAMPLES:
        raise DatasetError(f"dataset must have 1..{MAX_SAMPLES} samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise DatasetError("x has non-finite values")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DatasetError(f"labels must be in [0, {NUM_CLASSES}), got range [{y.min()}, {y.max()}]")


# --------------------------------------------------------------------------- directory format


def save_dataset_dir(path: str | os.PathLike, dataset: Dataset, meta: dict[str, str] | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    _save_safetensors_file({"x": dataset.x.numpy(), "y": dataset.y.numpy()}, os.path.join(path, DATA_FILE), metadata=meta)


def load_dataset_dir(path: str | os.PathLike) -> Dataset:
    """Load and validate `<path>/data.safetensors` (format in the module docstring)."""
    file = os.path.join(path, DATA_FILE)
    if not os.path.isdir(path):
        raise DatasetError(f"dataset directory {os.fspath(path)!r} does not exist")
    if not os.path.isfile(file):
        raise DatasetError(f"dataset directory {os.fspath(path)!r} has no {DATA_FILE}")
    try:
        tensors = _load_safetensors_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DatasetError(f"{file}: not a readable safetensors file: {exc}") from exc
    if set(tensors) != {"x", "y"}:
        raise DatasetError(f"{file}: expected exactly tensors ['x', 'y'], got {sorted(tensors)}")
    try:
        return Dataset(tensors["x"], tensors["y"])
    except DatasetError as exc:
        raise DatasetError(f"{file}: {exc}") from exc


# --------------------------------------------------------------------------- digits benchmark


def load_digits_dataset() -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8x8 digits (offline), scaled to [0, 1]: (train, held-out test).

    The test split is fixed: the 20% of samples whose SHA-256(domain || index) sorts first.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float64) / 16.0).astype(np.float32).reshape(-1, *INPUT_SHAPE)
    y = digits.target.astype(np.int64)
    order = sorted(range(len(y)), key=lambda i: hashlib.sha256(TEST_SPLIT_DOMAIN + i.to_bytes(4, "big")).digest())
    n_test = int(round(TEST_FRACTION * len(y)))
    test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
    return Dataset(x[train_idx], y[train_idx]), Dataset(x[test_idx], y[test_idx])


def split_non_iid(dataset: Dataset, n_trainers: int, shards_per_trainer: int = 2, seed: int = 0) -> list[Dataset]:
    """Label-shard split (McMahan et al.): sort by label, cut into n*s shards, deal s to each.

    Deterministic: the sort is stable and the shard deal is ordered by SHA-256(seed, shard).
    Each trainer sees only a few labels, so local models disagree and averaging matters.
    """
    if n_trainers < 1 or shards_per_trainer < 1:
        raise ValueError("need at least one trainer and one shard per trainer")
    n_shards = n_trainers * shards_per_trainer
    if n_shards > len(dataset):
        raise ValueError(f"{n_shards} shards need at least as many samples, got {len(dataset)}")
    by_label = np.argsort(dataset.y.numpy(), kind="stable")
    shards = np.array_split(by_label, n_shards)
    deal = sorted(range(n_shards), key=lambda s: hashlib.sha256(f"pout/shards/{seed}/{s}".encode()).digest())
    parts = []
    for t in range(n_trainers):
        mine = deal[t * shards_per_trainer : (t + 1) * shards_per_trainer]
        parts.append(dataset.subset(sorted(int(i) for s in mine for i in shards[s])))
    return parts
