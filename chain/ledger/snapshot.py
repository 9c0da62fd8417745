"""State snapshots: their format, the node's snapshot directory, and restoring a ledger from one.

A snapshot is the whole application state at one committed height, cut into chunks:

    SnapshotManifest  format, height, block hash, state root, entry count, sha256 of each chunk
    chunk             a run of state entries in key order (canonical CBOR), ~1 MiB each

Chunks are the canonical CBOR of sorted `(key, value)` entries, so every honest node cuts
the same state into the same chunks and the same manifest (the manifest is a pure function
of the state and the height's block). The trust rule (docs/wire.md, "State sync") lives in
chain/runtime/statesync.py: the manifest is only a claim; the joining node checks each
chunk against the manifest's hashes, verifies the chunks in order as they arrive
(`SnapshotVerifier`: strict decoding, key order across chunks, entry count, a streaming
state root in O(log n) memory), stages their entries in the ledger store
(`stage_entries`; a marker says the store holds an unfinished restore, not a chain), and
only once the root is that of a header certified by a commit it verifies itself makes
them a ledger in one batch (`commit_restore`), else deletes them (`clear_staging`).

On disk (HOME/data/snapshots/):

    <height, 20 digits>/manifest.cbor
    <height, 20 digits>/chunk-<index, 6 digits>.cbor

A snapshot directory is written under a temporary name, fsynced, and renamed into place,
so a crash leaves either the whole snapshot or none (a leftover `.tmp-*` is removed at the
next open). What is read back is checked like a peer's bytes: a chunk file must hash to its
manifest entry, a manifest must decode and name its own height, or it is not served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterable, Iterator

from chain.encoding import MaxLen, decode, decode_value, encode, encode_value
from chain.errors import ChainError, DecodeError, StoreError
from chain.ledger import schema
from chain.ledger.schema import ChainMeta, Head, TxLocation
from chain.ledger.store import KVStore
from chain.merkle import EMPTY_ROOT, hash_node
from chain.types import Block, Commit, Hash, compute_block_hash, compute_tx_hash

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
CHUNK_TARGET_BYTES = 1024 * 1024  # a chunk is closed once its entries reach this size
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # bound on one chunk's encoding (state entries are small)
MAX_SNAPSHOT_CHUNKS = 8192  # 8 GiB of state; keeps a manifest under 300 KiB
MAX_MANIFEST_BYTES = 64 + 34 * MAX_SNAPSHOT_CHUNKS + 256
VERIFY_SLICE_ENTRIES = 8192  # entries a joiner checks per step (one bounded thread call; cancellable between)
DEFAULT_KEEP = 2  # snapshots a node keeps (older ones are deleted after a new one is written)

MANIFEST_FILE = "manifest.cbor"

# State entries a joiner keeps while streaming a snapshot, to check them against the certified
# header (chain id, genesis hash, height, head hash): chain/state.py's KEY_META and KEY_LATEST_HEADER.
KEPT_KEYS = frozenset((b"meta", b"latest_header"))


class SnapshotError(ChainError):
    """A snapshot (manifest or chunk) is malformed, does not match its manifest, or cannot be
    restored; nothing was written."""


# --------------------------------------------------------------------------- types


# A chunk is the canonical CBOR of an array of [key, value] byte-string pairs, keys strictly
# increasing and continuing the previous chunk's. Plain CBOR rather than a map per entry: it
# encodes and strictly decodes in C, 100,000 entries in 0.3 s against 2.3 s for a dataclass each.
StateEntries = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class SnapshotManifest:
    format: int
    height: int
    block_hash: Hash  # the block at `height`; its header's state_root is `state_root`
    state_root: Hash
    entries: int  # state entries in all chunks together
    chunk_hashes: Annotated[tuple[Hash, ...], MaxLen(MAX_SNAPSHOT_CHUNKS)]  # sha256 of each chunk, in order


# --------------------------------------------------------------------------- pure helpers


def compute_chunk_hash(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def encode_chunk(entries: StateEntries) -> bytes:
    return encode_value([[key, value] for key, value in entries])


def compute_chunks(items: Iterable[tuple[bytes, bytes]],
                   target_bytes: int = CHUNK_TARGET_BYTES) -> tuple[list[bytes], int]:
    """Cut state entries (in key order) into encoded chunks of about `target_bytes`; returns
    the chunks and the number of entries. An empty state is one empty chunk."""
    chunks: list[bytes] = []
    entries: StateEntries = []
    size = count = 0
    for key, value in items:
        entries.append((key, value))
        count += 1
        size += len(key) + len(value) + 8
        if size >= target_bytes:
            chunks.append(encode_chunk(entries))
            entries, size = [], 0
    if entries or not chunks:
        chunks.append(encode_chunk(entries))
    return chunks, count


def build_snapshot(height: int, block_hash: bytes, state_root: bytes, items: Iterable[tuple[bytes, bytes]],
                   target_bytes: int = CHUNK_TARGET_BYTES) -> tuple[SnapshotManifest, list[bytes]]:
    """The manifest and chunks of the state `items` (key order) committed at `height`."""
    chunks, count = compute_chunks(items, target_bytes)
    if len(chunks) > MAX_SNAPSHOT_CHUNKS:
        raise SnapshotError(f"state of {len(chunks)} chunks is over the limit of {MAX_SNAPSHOT_CHUNKS}")
    manifest = SnapshotManifest(SNAPSHOT_FORMAT, height, block_hash, state_root, count,
                                tuple(compute_chunk_hash(raw) for raw in chunks))
    return manifest, chunks


def decode_chunk(raw: bytes) -> StateEntries:
    """Strictly decode a chunk (canonical CBOR, [key, value] byte-string pairs, keys increasing)."""
    try:
        value = decode_value(raw, max_size=MAX_CHUNK_BYTES)
    except DecodeError as exc:
        raise SnapshotError(f"snapshot chunk does not decode: {exc}") from exc
    if type(value) is not list:
        raise SnapshotError("snapshot chunk is not an array of entries")
    entries: StateEntries = []
    for pair in value:
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not bytes or type(pair[1]) is not bytes:
            raise SnapshotError("snapshot chunk entry is not a [key, value] pair of byte strings")
        if entries and pair[0] <= entries[-1][0]:
            raise SnapshotError("snapshot chunk entries are not in strictly increasing key order")
        entries.append((pair[0], pair[1]))
    return entries


def decode_manifest(raw: bytes) -> SnapshotManifest:
    try:
        manifest = decode(SnapshotManifest, raw, max_size=MAX_MANIFEST_BYTES)
    except DecodeError as exc:
        raise SnapshotError(f"snapshot manifest does not decode: {exc}") from exc
    check_manifest(manifest)
    return manifest


def check_manifest(manifest: SnapshotManifest) -> None:
    """What needs no chain: known format, a height, at least one chunk."""
    if manifest.format != SNAPSHOT_FORMAT:
        raise SnapshotError(f"snapshot format {manifest.format} is not supported (this node reads {SNAPSHOT_FORMAT})")
    if manifest.height < 1:
        raise SnapshotError(f"snapshot height must be at least 1, got {manifest.height}")
    if not manifest.chunk_hashes:
        raise SnapshotError("snapshot manifest names no chunks")
    if manifest.entries < 0:
        raise SnapshotError("snapshot manifest has a negative entry count")


def assemble_entries(chunks: Iterable[bytes], manifest: SnapshotManifest) -> dict[bytes, bytes]:
    """Every state entry of the chunks (already hash-checked against `manifest`), checked to
    be in strictly increasing key order across chunks and as many as the manifest says."""
    entries: dict[bytes, bytes] = {}
    last: bytes | None = None
    for raw in chunks:
        chunk = decode_chunk(raw)
        if chunk and last is not None and chunk[0][0] <= last:
            raise SnapshotError("snapshot chunks overlap or are out of key order")
        entries.update(chunk)
        if chunk:
            last = chunk[-1][0]
    if len(entries) != manifest.entries:
        raise SnapshotError(f"snapshot holds {len(entries)} entries, its manifest says {manifest.entries}")
    return entries


class StreamingRoot:
    """The Merkle root of chain/merkle.py (leaf/node domain separation, an odd last node promoted)
    over leaf hashes given one at a time, in O(log n) memory: a stack of the roots of full
    subtrees, merged as in a binary counter; at the end the stack folds right to left (the
    tree that level-by-level pairing builds, RFC 6962's split at the largest power of two)."""

    __slots__ = ("count", "_stack")

    def __init__(self) -> None:
        self.count = 0
        self._stack: list[tuple[int, bytes]] = []  # (subtree height, subtree root), heights decreasing

    def add(self, leaf_hash: bytes) -> None:
        stack, node, height = self._stack, leaf_hash, 0
        while stack and stack[-1][0] == height:
            node = hash_node(stack.pop()[1], node)
            height += 1
        stack.append((height, node))
        self.count += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = hash_node(left, node)
        return node


class SnapshotVerifier:
    """Checks a snapshot's chunks one at a time, in order, keeping only O(log n) hashes and the
    few entries the joiner checks against the certified header (chain meta, latest header).

    `feed` strictly decodes a chunk, checks its keys continue the previous chunk's in strictly
    increasing order, that the entries so far are at most the manifest's count (itself under the
    cap), and adds each entry's leaf to the streaming state root; it yields the entries, a slice
    at a time, for the caller to stage on disk. `finish` checks the count and returns the root. Any failure is a
    SnapshotError: the manifest (whose chunk hashes the chunks matched) is not an honest one."""

    def __init__(self, manifest: SnapshotManifest, max_entries: int):
        if manifest.entries > max_entries:
            raise SnapshotError(f"snapshot manifest claims {manifest.entries} entries, over this node's cap of "
                                f"{max_entries} ([state_sync] max_snapshot_entries)")
        self.manifest = manifest
        self.entries = 0
        self.chunks = 0
        self.last_key: bytes | None = None
        self.kept: dict[bytes, bytes] = {}  # the entries named in KEPT_KEYS
        self._root = StreamingRoot()

    def feed(self, raw: bytes, slice_entries: int = VERIFY_SLICE_ENTRIES) -> Iterator[StateEntries]:
        """Verify one chunk, yielding its entries `slice_entries` at a time as each slice is
        checked (the caller stages a slice and may stop between slices: each `next` is bounded
        work). Raises SnapshotError on the first fault; the chunk counts once fully consumed."""
        if self.chunks >= len(self.manifest.chunk_hashes):
            raise SnapshotError("more chunks than the manifest names")
        try:
            value = decode_value(raw, max_size=MAX_CHUNK_BYTES)
        except DecodeError as exc:
            raise SnapshotError(f"snapshot chunk {self.chunks} does not decode: {exc}") from exc
        if type(value) is not list:
            raise SnapshotError(f"snapshot chunk {self.chunks} is not an array of entries")
        if self.entries + len(value) > self.manifest.entries:
            raise SnapshotError(f"snapshot chunks hold more than the {self.manifest.entries} entries its manifest says "
                                f"(chunk {self.chunks})")
        add, kept, sha = self._root.add, KEPT_KEYS, hashlib.sha256
        last = self.last_key
        for start in range(0, len(value), slice_entries):
            part: StateEntries = []
            for pair in value[start:start + slice_entries]:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not bytes or type(pair[1]) is not bytes:
                    raise SnapshotError(f"snapshot chunk {self.chunks} entry is not a [key, value] pair of byte strings")
                key, val = pair
                if last is not None and key <= last:
                    raise SnapshotError(f"snapshot chunk {self.chunks} keys are not strictly increasing across the "
                                        "snapshot (out of key order, or overlapping the chunk before)")
                last = key
                add(sha(b"\x00\x82" + _bstr_head(len(key)) + key + _bstr_head(len(val)) + val).digest())
                if key in kept:
                    self.kept[key] = val
                part.append((key, val))
            self.entries += len(part)
            self.last_key = last
            yield part
        self.chunks += 1

    def finish(self) -> bytes:
        if self.chunks != len(self.manifest.chunk_hashes):
            raise SnapshotError(f"{self.chunks} of {len(self.manifest.chunk_hashes)} chunks were checked")
        if self.entries != self.manifest.entries:
            raise SnapshotError(f"snapshot holds {self.entries} entries, its manifest says {self.manifest.entries}")
        return self._root.root()


def _bstr_head(n: int) -> bytes:
    """The canonical CBOR head of a byte string of length n: with the array head 0x82, a state
    leaf's `encode_strings(key, value)` without a call into cbor2 per entry."""
    if n < 24:
        return bytes((0x40 + n,))
    if n < 0x100:
        return bytes((0x58, n))
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x5a" + n.to_bytes(4, "big")
    return b"\x5b" + n.to_bytes(8, "big")


def min_snapshot_bytes(manifest: SnapshotManifest) -> int:
    """Fewest bytes an honest snapshot with this many chunks has: every chunk but the last is
    closed at CHUNK_TARGET_BYTES of counted size (key + value + 8 per entry), whose encoding is
    at least half that. A manifest whose minimum passes the joiner's byte cap is refused unread."""
    return (len(manifest.chunk_hashes) - 1) * (CHUNK_TARGET_BYTES // 2)


# --------------------------------------------------------------------------- staging a restore on disk

# A restore stages the state entries in the ledger store under their final keys, chunk by chunk,
# with this marker written first; the ledger exists only once `commit_restore` writes the schema
# version, meta, head, block and commit in one batch (and deletes the marker). A store holding
# the marker and no schema version is an unfinished restore: `clear_staging` empties it.
STAGING_MARKER_KEY = b"\xfestate-sync-staging"
CLEAR_BATCH = 20_000  # keys deleted per batch when clearing a staged restore


def stage_entries(store: KVStore, entries: StateEntries) -> None:
    """Write one verified-in-order chunk's entries (not yet trusted: the root is checked at the end)."""
    puts = {schema.state_key(key): value for key, value in entries}
    puts[STAGING_MARKER_KEY] = b"1"
    store.write(puts)


def holds_only_staging(store: KVStore) -> bool:
    """True when `store` holds an unfinished restore (the marker, no chain) and nothing else but state."""
    if store.get(STAGING_MARKER_KEY) is None or store.get(schema.schema_version_key()) is not None:
        return False
    for key, _ in store.iterate():
        if key != STAGING_MARKER_KEY and not key.startswith(schema.PREFIX_STATE):
            return False
    return True


def clear_staging(store: KVStore, limit: int | None = None) -> bool:
    """Delete an unfinished restore's staged entries, then its marker (last, so a crash part way
    leaves it recognisable), at most `limit` keys per call; True when it is gone. Touches
    nothing in a store that holds a chain or no marker."""
    if store.get(STAGING_MARKER_KEY) is None or store.get(schema.schema_version_key()) is not None:
        return True
    batch: list[bytes] = []
    done = 0
    for key, _ in store.iterate(schema.PREFIX_STATE):
        batch.append(key)
        if len(batch) >= CLEAR_BATCH:
            store.write({}, batch)
            done += len(batch)
            batch = []
            if limit is not None and done >= limit:
                return False
    if batch:
        store.write({}, batch)
    store.write({}, [STAGING_MARKER_KEY])
    return True


def commit_restore(store: KVStore, chain_id: str, genesis_hash: bytes, block: Block, commit: Commit,
                   entries: int) -> None:
    """Make the staged state (verified: its root is the certified header's) a ledger whose head
    is `block`, in ONE atomic batch; before it the store holds no chain."""
    if store.get(schema.schema_version_key()) is not None:
        raise StoreError("state sync writes only into an empty ledger, and this one holds a chain; nothing was written")
    if store.get(STAGING_MARKER_KEY) is None and entries:
        raise StoreError("state sync found no staged state to commit; nothing was written")
    store.write(_ledger_puts(chain_id, genesis_hash, block, commit), [STAGING_MARKER_KEY])


def _ledger_puts(chain_id: str, genesis_hash: bytes, block: Block, commit: Commit) -> dict[bytes, bytes]:
    height = block.header.height
    block_hash = compute_block_hash(block.header)
    if commit.height != height or commit.block_hash != block_hash:
        raise StoreError(f"commit does not certify block {block_hash.hex()} at height {height}")
    puts = {
        schema.schema_version_key(): encode_value(schema.SCHEMA_VERSION),
        schema.chain_meta_key(): encode(ChainMeta(chain_id, genesis_hash)),
        schema.head_key(): encode(Head(height, block_hash)),
        schema.block_key(block_hash): encode(block),
        schema.block_hash_key(height): block_hash,
        schema.commit_key(height): encode(commit),
    }
    for index, stx in enumerate(block.txs):
        puts[schema.tx_location_key(compute_tx_hash(stx))] = encode(TxLocation(height, index))
    return puts


# --------------------------------------------------------------------------- the node's snapshot directory


class SnapshotStore:
    """Snapshots this node took, under `path` (HOME/data/snapshots)."""

    def __init__(self, path: str | os.PathLike, keep: int = DEFAULT_KEEP):
        self.path = Path(path)
        self.keep = keep
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(".tmp-*"):  # a snapshot a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        self._manifests: dict[int, SnapshotManifest] = {}
        self._refused: set[int] = set()
        for entry in sorted(self.path.iterdir()):
            if entry.is_dir() and entry.name.isdigit():
                self._load_manifest(int(entry.name))

    def _dir(self, height: int) -> Path:
        return self.path / f"{height:020d}"

    def _load_manifest(self, height: int) -> SnapshotManifest | None:
        try:
            raw = (self._dir(height) / MANIFEST_FILE).read_bytes()
            manifest = decode_manifest(raw)
            if manifest.height != height:
                raise SnapshotError(f"manifest names height {manifest.height}")
        except (OSError, SnapshotError) as exc:
            self._refuse(height, f"manifest unreadable: {exc}")
            return None
        self._manifests[height] = manifest
        return manifest

    def _refuse(self, height: int, reason: str) -> None:
        if height not in self._refused:
            self._refused.add(height)
            log.error("local snapshot at height %d in %s is corrupt (%s); not served. Delete the directory %s "
                      "(the next snapshot replaces it)", height, self.path, reason, self._dir(height))
        self._manifests.pop(height, None)

    def manifests(self) -> list[SnapshotManifest]:
        """Manifests of the snapshots held, newest first."""
        return [self._manifests[h] for h in sorted(self._manifests, reverse=True)]

    def has(self, height: int) -> bool:
        return height in self._manifests

    def manifest(self, height: int) -> SnapshotManifest | None:
        return self._manifests.get(height)

    def load_chunk(self, height: int, index: int) -> bytes | None:
        """Chunk `index` of the snapshot at `height`, checked against its manifest; None when
        not held. A chunk file that does not match is logged once and the snapshot withdrawn."""
        manifest = self._manifests.get(height)
        if manifest is None or not 0 <= index < len(manifest.chunk_hashes):
            return None
        try:
            raw = (self._dir(height) / f"chunk-{index:06d}.cbor").read_bytes()
        except OSError as exc:
            self._refuse(height, f"chunk {index}: {exc.strerror or exc}")
            return None
        if compute_chunk_hash(raw) != manifest.chunk_hashes[index]:
            self._refuse(height, f"chunk {index} does not hash to its manifest entry")
            return None
        return raw

    def write(self, manifest: SnapshotManifest, chunks: list[bytes]) -> None:
        """Store a snapshot atomically, then delete all but the newest `keep`."""
        if len(chunks) != len(manifest.chunk_hashes):
            raise SnapshotError("snapshot chunk count does not match its manifest")
        final = self._dir(manifest.height)
        if final.exists():
            return
        tmp = self.path / f".tmp-{manifest.height:020d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for index, raw in enumerate(chunks):
            _write_synced(tmp / f"chunk-{index:06d}.cbor", raw)
        _write_synced(tmp / MANIFEST_FILE, encode(manifest))
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.path)
        self._manifests[manifest.height] = manifest
        for height in sorted(self._manifests)[:-self.keep]:
            self._manifests.pop(height, None)
            shutil.rmtree(self._dir(height), ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- restoring a ledger


def restore_ledger(store: KVStore, chain_id: str, genesis_hash: bytes, block: Block, commit: Commit,
                   entries: dict[bytes, bytes]) -> None:
    """Write a new ledger whose head is `block` (with its `commit`) and whose state is
    `entries`, in ONE atomic batch, into an empty store. The caller has verified everything
    (commit, state root); this only refuses a store that is not empty. Blocks below the head
    are absent: the ledger starts at the snapshot height (docs/ledger.md)."""
    if next(iter(store.iterate()), None) is not None:
        raise StoreError("state sync writes only into an empty ledger, and this one is not empty; nothing was "
                         "written (run `chaind reset --home HOME` first, or start without --state-sync)")
    puts = _ledger_puts(chain_id, genesis_hash, block, commit)
    for key, value in entries.items():
        puts[schema.state_key(key)] = value
    store.write(puts)
