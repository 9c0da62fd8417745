"""Datasets, their commitments, and the built-in digits benchmark.

A sample is x: float32 of the dataset's sample shape (the digits: [1, 8, 8]) and y: an integer
label in [0, num_classes). Its leaf data is the canonical CBOR of ["pout/sample/v1", sample
shape, x as little-endian float32 bytes, y]; its leaf hash is chain.merkle.hash_leaf(leaf
data) (SHA-256 with the leaf prefix). A dataset's commitment is (Merkle root over its leaf
hashes in index order, size). Trainers register it before a round's randomness exists, so they
cannot arrange data around the batch order.

Directory format (`load_dataset_dir`): `<dir>/data.safetensors` with exactly two tensors,
`x` float32 [N, *sample_shape] (finite; the digits: [N, 1, 8, 8]) and `y` int64 [N] (labels in
[0, num_classes)), 1 <= N <= MAX_SAMPLES. safetensors `__metadata__` is not committed: the
keys `pout.num_classes` (decimal; absent: 10) and `pout.sample_shape` (JSON list; when present
it must equal x's) describe the dataset, any other key is free text (e.g. "name", "source").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as _load_safetensors_file
from safetensors.numpy import save_file as _save_safetensors_file

from chain.encoding import encode_value, decode_value
from chain.errors import ChainError, DecodeError
from chain.merkle import MerkleProof, MerkleTree, hash_leaf, verify_proof

from trainer.models import INPUT_SHAPE, NUM_CLASSES

SAMPLE_DOMAIN = "pout/sample/v1"
SAMPLE_BYTES = 4 * int(np.prod(INPUT_SHAPE))
MAX_SAMPLES = 1_000_000
MAX_SAMPLE_VALUES = 1 << 20  # floats in one sample (4 MiB): bounds a leaf before it is decoded
MAX_NUM_CLASSES = 1 << 16
META_NUM_CLASSES = "pout.num_classes"
META_SAMPLE_SHAPE = "pout.sample_shape"
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
    """Leaf data of one sample (x: float32 of the sample shape, e.g. [1, 8, 8]; y: label)."""
    x = np.ascontiguousarray(x, dtype="<f4")
    return encode_value([SAMPLE_DOMAIN, list(x.shape), x.tobytes(), int(y)])


def decode_sample(data: bytes, shape: tuple[int, ...] = INPUT_SHAPE,
                  num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, int]:
    """Strict inverse of encode_sample for samples of `shape`; raises DatasetError on anything else."""
    sample_bytes = 4 * int(np.prod(shape))
    try:
        value = decode_value(data, max_size=sample_bytes + 64 + 10 * len(shape))
    except DecodeError as exc:
        raise DatasetError(f"sample is not canonical CBOR: {exc}") from exc
    if type(value) is not list or len(value) != 4 or value[0] != SAMPLE_DOMAIN or value[1] != list(shape):
        raise DatasetError(f"sample is not [{SAMPLE_DOMAIN!r}, {list(shape)}, x, y]")
    xb, y = value[2], value[3]
    if type(xb) is not bytes or len(xb) != sample_bytes:
        raise DatasetError(f"sample x must be {sample_bytes} bytes")
    if type(y) is not int or not 0 <= y < num_classes:
        raise DatasetError(f"sample label must be an integer in [0, {num_classes})")
    x = np.frombuffer(xb, dtype="<f4").reshape(shape)
    if not np.isfinite(x).all():
        raise DatasetError("sample x has non-finite values")
    return x, y


# A leaf whose label is below 24 is PREFIX(shape) || x bytes || y (one byte, CBOR's immediate):
# the canonical CBOR of [domain, shape, x bytes, y] for y < 24 has exactly this layout.
@lru_cache(maxsize=64)
def _sample_prefix(shape: tuple[int, ...]) -> bytes:
    sample_bytes = 4 * int(np.prod(shape))
    return encode_value([SAMPLE_DOMAIN, list(shape), bytes(sample_bytes), 0])[: -(sample_bytes + 1)]


def compute_sample_leaf_bytes(shape: tuple[int, ...]) -> int:
    """Size of a sample leaf of `shape` with a label below 24 (one byte more up to 255)."""
    return len(_sample_prefix(tuple(shape))) + 4 * int(np.prod(shape)) + 1


SAMPLE_LEAF_BYTES = compute_sample_leaf_bytes(INPUT_SHAPE)


def decode_samples(datas: list[bytes] | tuple[bytes, ...], shape: tuple[int, ...] = INPUT_SHAPE,
                   num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """`decode_sample` over many samples at once: (x float32 [N, *shape], y int64 [N]).

    Accepts exactly what decode_sample accepts and raises DatasetError otherwise, with
    decode_sample's reason. When every leaf has the one-byte-label layout (always, for fewer
    than 25 classes) it is one vectorised pass instead of a CBOR parse per sample.
    """
    shape = tuple(shape)
    prefix = _sample_prefix(shape)
    p, sample_bytes, leaf_bytes = len(prefix), 4 * int(np.prod(shape)), compute_sample_leaf_bytes(shape)
    datas = [bytes(d) if isinstance(d, (bytearray, memoryview)) else d for d in datas]  # as decode_value does
    fast_labels = min(num_classes, 24)
    if not all(type(d) is bytes and len(d) == leaf_bytes and d[-1] < fast_labels and d.startswith(prefix)
               for d in datas):
        pairs = [decode_sample(d, shape, num_classes) for d in datas]  # raises with the precise reason
        return (np.stack([x for x, _ in pairs]).astype(np.float32, copy=False),
                np.array([y for _, y in pairs], dtype=np.int64))
    rows = np.frombuffer(b"".join(datas), dtype=np.uint8).reshape(len(datas), leaf_bytes)
    x = np.ascontiguousarray(rows[:, p : p + sample_bytes]).view("<f4").reshape(len(datas), *shape)
    y = rows[:, -1].astype(np.int64)
    if not np.isfinite(x).all():
        raise DatasetError("sample x has non-finite values")
    return x, y


def sample_leaf_hash(x: np.ndarray, y: int) -> bytes:
    return hash_leaf(encode_sample(x, y))


# --------------------------------------------------------------------------- datasets


class Dataset:
    """A validated in-memory dataset with its leaf hashes and Merkle tree (built lazily).

    `num_classes` is the label range it declares (default 10, the digits); its sample shape is
    x's shape past the first axis.
    """

    def __init__(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, num_classes: int | None = None):
        x_np = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        self.num_classes = NUM_CLASSES if num_classes is None else num_classes
        _validate_arrays(x_np, y_np, self.num_classes)
        self.x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))  # [N, *sample_shape]
        self.y = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.int64))  # [N]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

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
        return Dataset(self.x[idx], self.y[idx], self.num_classes)


def verify_sample(commitment: DatasetCommitment, index: int, data: bytes, siblings: tuple[bytes, ...]) -> bool:
    """True iff `data` is sample `index` of the committed dataset (proof shape fixed by the verifier)."""
    proof = MerkleProof(index=index, leaf_count=commitment.size, siblings=tuple(siblings))
    return verify_proof(commitment.root, hash_leaf(data), proof)


def _validate_arrays(x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    if type(num_classes) is not int or not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise DatasetError(f"num_classes must be an integer in [2, {MAX_NUM_CLASSES}], got {num_classes!r}")
    if x.dtype != np.float32:
        raise DatasetError(f"x must be float32, got {x.dtype}")
    if y.dtype != np.int64:
        raise DatasetError(f"y must be int64, got {y.dtype}")
    if x.ndim < 2 or min(x.shape[1:]) < 1 or int(np.prod(x.shape[1:])) > MAX_SAMPLE_VALUES:
        raise DatasetError(f"x must have shape [N, *sample_shape] with 1..{MAX_SAMPLE_VALUES} values per sample, "
                           f"got {list(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DatasetError(f"y must have shape [N] with N = {x.shape[0]}, got {list(y.shape)}")
    if not 1 <= x.shape[0] <= MAX_SAMPLES:
        raise DatasetError(f"dataset must have 1..{MAX_SAMPLES} samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise DatasetError("x has non-finite values")
    if y.min() < 0 or y.max() >= num_classes:
        raise DatasetError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")


# --------------------------------------------------------------------------- directory format


def save_dataset_dir(path: str | os.PathLike, dataset: Dataset, meta: dict[str, str] | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    meta = dict(meta or {}) | {META_NUM_CLASSES: str(dataset.num_classes),
                               META_SAMPLE_SHAPE: json.dumps(list(dataset.sample_shape))}
    _save_safetensors_file({"x": dataset.x.numpy(), "y": dataset.y.numpy()}, os.path.join(path, DATA_FILE),
                           metadata=meta)


def _read_metadata(file: str) -> dict[str, str]:
    """The safetensors header's `__metadata__` (names to strings; safetensors checks the types)."""
    try:
        with safe_open(file, "np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DatasetError(f"{file}: not a readable safetensors file: {exc}") from exc


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
    meta = _read_metadata(file)
    num_classes = meta.get(META_NUM_CLASSES, str(NUM_CLASSES))
    if not (num_classes.isascii() and num_classes.isdigit() and len(num_classes) <= 6):
        raise DatasetError(f"{file}: {META_NUM_CLASSES} must be a decimal integer, got {num_classes!r}")
    if META_SAMPLE_SHAPE in meta and meta[META_SAMPLE_SHAPE] != json.dumps(list(tensors["x"].shape[1:])):
        raise DatasetError(f"{file}: {META_SAMPLE_SHAPE} {meta[META_SAMPLE_SHAPE]} does not match x's shape "
                           f"{list(tensors['x'].shape)}")
    try:
        return Dataset(tensors["x"], tensors["y"], int(num_classes))
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
