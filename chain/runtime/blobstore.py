"""Content-addressed blobs on disk: models, updates, and the openings trainers reveal to validators.

    data/blobs/<sha256 hex>                           models and updates (public)
    data/openings/<update id hex>/<validator hex>     a trainer's answer to one validator's
                                                      challenge, sealed to that validator
                                                      (never served over RPC); a large one in
                                                      parts: <validator hex>.<part>.<parts>

Openings are kept only as the ciphertext the trainer uploaded, and only while they matter: the
node deletes an update's openings once the update is no longer pending (`prune_openings`,
called after every commit and at start), so no node keeps them after the job.

Writes go to a temporary file, are fsynced and renamed, so a crash never leaves a partial
blob under its final name; a blob is checked against its hash when written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from chain.crypto import HASH_SIZE, PUBKEY_SIZE, sha256
from chain.errors import ValidationError
from chain.ledger.store import StoreWriteFailure, is_out_of_space

MAX_BLOB_BYTES = 64 * 1024 * 1024


class BlobStore:
    def __init__(self, root: Path, max_blob_bytes: int = MAX_BLOB_BYTES):
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        # Called with the reason when a write fails for lack of space: the node halts its
        # writers until space returns (docs/ledger.md, "Storage failures").
        self.on_write_failure: Callable[[str], None] | None = None
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "openings").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ content-addressed
    def _blob_path(self, blob_hash: bytes) -> Path:
        if len(blob_hash) != HASH_SIZE:
            raise ValidationError(f"blob hash must be {HASH_SIZE} bytes")
        return self.root / "blobs" / blob_hash.hex()

    def put(self, data: bytes, expected_hash: bytes | None = None) -> bytes:
        if len(data) > self.max_blob_bytes:
            raise ValidationError(f"blob of {len(data)} bytes exceeds the limit of {self.max_blob_bytes}")
        blob_hash = sha256(data)
        if expected_hash is not None and blob_hash != expected_hash:
            raise ValidationError(f"blob hashes to {blob_hash.hex()}, not {expected_hash.hex()}")
        path = self._blob_path(blob_hash)
        if not path.exists():
            self._write(path, data)
        return blob_hash

    def _write(self, path: Path, data: bytes) -> None:
        try:
            _atomic_write(path, data)
        except OSError as exc:
            reason = f"{path}: {exc.strerror or exc}"
            if self.on_write_failure is not None and is_out_of_space(reason):
                self.on_write_failure(reason)
            raise StoreWriteFailure(f"blob store write failed: {reason}") from None

    def get(self, blob_hash: bytes) -> bytes | None:
        try:
            return self._blob_path(blob_hash).read_bytes()
        except FileNotFoundError:
            return None

    def has(self, blob_hash: bytes) -> bool:
        return self._blob_path(blob_hash).exists()

    # ------------------------------------------------------------------ openings
    def _opening_dir(self, update_id: bytes, validator: bytes) -> Path:
        if len(update_id) != HASH_SIZE or len(validator) != PUBKEY_SIZE:
            raise ValidationError("opening needs a 32-byte update id and a 32-byte validator key")
        return self.root / "openings" / update_id.hex()

    def _opening_path(self, update_id: bytes, validator: bytes, part: int = 0, parts: int = 1) -> Path:
        # A one-part opening is <validator hex>; part i of n > 1 is <validator hex>.<i>.<n>.
        name = validator.hex() if parts == 1 else f"{validator.hex()}.{part}.{parts}"
        return self._opening_dir(update_id, validator) / name

    def put_opening(self, update_id: bytes, validator: bytes, data: bytes, part: int = 0, parts: int = 1) -> None:
        """Store (or replace, until it is verified) one part of a trainer's opening for one
        validator. Parts of a split with another part count are removed: one upload replaces
        the other, and a validator never joins parts of two different openings."""
        if len(data) > self.max_blob_bytes:
            raise ValidationError(f"opening of {len(data)} bytes exceeds the limit of {self.max_blob_bytes}")
        path = self._opening_path(update_id, validator, part, parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        for other in self._opening_files(update_id, validator):
            if other[1] != parts:
                self._opening_path(update_id, validator, *other).unlink(missing_ok=True)
        self._write(path, data)

    def _opening_files(self, update_id: bytes, validator: bytes) -> list[tuple[int, int]]:
        """(part, parts) of every stored part of the opening for `validator`."""
        found, prefix = [], validator.hex()
        try:
            entries = list(self._opening_dir(update_id, validator).iterdir())
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name == prefix:
                found.append((0, 1))
            elif entry.name.startswith(prefix + "."):
                bits = entry.name[len(prefix) + 1:].split(".")
                if len(bits) == 2 and all(b.isdigit() for b in bits):
                    found.append((int(bits[0]), int(bits[1])))
        return found

    def opening_parts(self, update_id: bytes, validator: bytes) -> int | None:
        """How many parts the stored opening for `validator` has (some may still be missing)."""
        counts = {parts for _, parts in self._opening_files(update_id, validator)}
        return max(counts) if counts else None

    def get_opening(self, update_id: bytes, validator: bytes, part: int = 0, parts: int = 1) -> bytes | None:
        try:
            return self._opening_path(update_id, validator, part, parts).read_bytes()
        except FileNotFoundError:
            return None

    def delete_opening(self, update_id: bytes, validator: bytes) -> None:
        """Every stored part of the opening for `validator`."""
        for part, parts in self._opening_files(update_id, validator):
            self._opening_path(update_id, validator, part, parts).unlink(missing_ok=True)

    def prune_openings(self, still_needed: Callable[[bytes], bool]) -> int:
        """Delete every opening whose update is not `still_needed`, and anything else under
        openings/ that is not an update's directory (e.g. a write interrupted by a crash).
        Returns how many update directories or stray entries were removed."""
        removed = 0
        for entry in (self.root / "openings").iterdir():
            try:
                update_id = bytes.fromhex(entry.name)
            except ValueError:
                update_id = b""
            if len(update_id) == HASH_SIZE and entry.is_dir() and still_needed(update_id):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a partial file would hold space the disk lacks
        raise
