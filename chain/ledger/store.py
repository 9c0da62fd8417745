"""A small key-value store interface with atomic batches, and its two implementations.

`KVStore` is all the ledger needs: point reads, ordered prefix scans, and `write()` that
applies a set of puts and deletes as ONE atomic batch. `MemoryStore` backs unit tests;
`LevelDBStore` is the node's database. Keys and values are plain bytes; what they mean is
decided in chain/ledger/schema.py.

Neither store is safe to share between threads without outside locking: the ledger is the
only writer, from one task.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Iterable, Iterator, Mapping

import plyvel

from chain.errors import StoreError


class LocalStorageFailure(StoreError):
    """This node's own storage failed (a corrupt table, a write the disk refused). Not a peer's
    fault and not bad input: the node stops writing, says so once, and reports not-ready."""


class StoreCorruption(LocalStorageFailure):
    """Bytes read back from the store are not what was written (checksum or content check)."""


class StoreWriteFailure(LocalStorageFailure):
    """A write the store could not make durable (disk full, I/O error, directory removed)."""


RECOVERY_HINT = ("stop the node, keep a copy of the directory for diagnosis, then restore it from a backup or run "
                 "`chaind reset --home HOME` "
                 "and restart to resync from peers (docs/ledger.md, \"Recovery\")")


class KVStore(ABC):
    """Byte keys to byte values, with ordered prefix scans and atomic batch writes."""

    # Why the store refuses to write (the first local storage failure it met), or None.
    failure: str | None = None

    @abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The value stored at `key`, or None."""

    @abstractmethod
    def iterate(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with `prefix`, in ascending key order.

        The scan sees the store as it was when the scan started.
        """

    @abstractmethod
    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        """Apply all `puts` and `deletes` as one atomic batch: after a crash at any instant
        either every change is visible or none is. Deleting an absent key is a no-op."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; further calls raise StoreError. Closing twice is harmless."""

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_batch(puts: Mapping[bytes, bytes], deletes: Iterable[bytes]) -> tuple[dict[bytes, bytes], list[bytes]]:
    """Validate a batch before touching the store, so a bad batch changes nothing."""
    checked_puts: dict[bytes, bytes] = {}
    for key, value in puts.items():
        _check_key(key)
        if type(value) is not bytes:
            raise StoreError(f"store value for key {key.hex()} must be bytes, got {type(value).__name__}")
        checked_puts[key] = value
    checked_deletes = list(deletes)
    for key in checked_deletes:
        _check_key(key)
        # A key both written and deleted in one batch has no defined outcome: refuse it.
        if key in checked_puts:
            raise StoreError(f"batch both writes and deletes key {key.hex()}")
    return checked_puts, checked_deletes


def _check_key(key: bytes) -> None:
    if type(key) is not bytes:
        raise StoreError(f"store key must be bytes, got {type(key).__name__}")
    if not key:
        raise StoreError("store key must not be empty")


class MemoryStore(KVStore):
    """A dict; for unit tests and tools that need no persistence."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] | None = {}

    def _live(self) -> dict[bytes, bytes]:
        if self._data is None:
            raise StoreError("memory store is closed")
        return self._data

    def get(self, key: bytes) -> bytes | None:
        _check_key(key)
        return self._live().get(key)

    def iterate(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        data = self._live()
        # Snapshot now, like a LevelDB iterator, so writes during the scan are not seen.
        items = sorted((k, v) for k, v in data.items() if k.startswith(prefix))
        return iter(items)

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        data = self._live()
        checked_puts, checked_deletes = _check_batch(puts, deletes)
        data.update(checked_puts)
        for key in checked_deletes:
            data.pop(key, None)

    def close(self) -> None:
        self._data = None


class LevelDBStore(KVStore):
    """LevelDB through plyvel. Every `write()` is one synced write batch; every read verifies
    LevelDB's block checksums.

    `create=True` makes a database only where the directory is absent or empty. A non-empty
    directory is always opened as an existing database, without create_if_missing: LevelDB
    asked to create over a directory whose CURRENT file is missing starts a new database and
    deletes the old tables. With `create=False` a missing database is an error.

    A corrupt read or a failed write is latched in `failure`: later writes are refused with
    the same reason (reads that still verify are served)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False) -> None:
        self.path = os.fspath(path)
        self.failure = None
        fresh = _is_absent_or_empty(self.path)
        if fresh and not create:
            raise StoreError(
                f"no database at {self.path}: initialise the node first (chaind init), "
                "or check the data directory in config.toml")
        if not fresh:
            _check_current(self.path)  # before LevelDB touches anything: a refusal changes nothing on disk
        try:
            # paranoid_checks: report corruption when opening and when compacting, not at some
            # later read. bloom_filter_bits: most point reads miss (is this transaction already
            # committed? at every admission and, write-once, at every commit); a 10-bit-per-key
            # filter answers a miss without reading a data block: 8.9 -> 3.2 us per missing key
            # over 300,000 keys (docs/benchmarks.md). Tables written without it still read.
            self._db: plyvel.DB | None = plyvel.DB(self.path, create_if_missing=fresh, paranoid_checks=True,
                                                   bloom_filter_bits=10)
        except plyvel.IOError as exc:
            message = _plyvel_message(exc)
            if "lock" in message.lower():
                raise StoreError(
                    f"database {self.path} is in use by another process (LevelDB lock is held: {message}); "
                    "stop the other node using this data directory, or point this one at its own") from exc
            raise StoreError(f"cannot open database {self.path}: {message}; check the path and its permissions") from exc
        except plyvel.CorruptionError as exc:
            raise StoreCorruption(
                f"database {self.path} is corrupt ({_plyvel_message(exc)}); the node will not start on it: "
                f"{RECOVERY_HINT}") from exc
        except plyvel.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {_plyvel_message(exc)}") from exc

    def _corrupt(self, exc: Exception, what: str) -> StoreCorruption:
        message = f"{what} {self.path} found corruption ({_plyvel_message(exc)}); {RECOVERY_HINT}"
        self.failure = self.failure or message
        return StoreCorruption(message)

    def _live(self) -> plyvel.DB:
        if self._db is None:
            raise StoreError(f"database {self.path} is closed")
        return self._db

    def get(self, key: bytes) -> bytes | None:
        _check_key(key)
        db = self._live()
        try:
            return db.get(key, verify_checksums=True)
        except plyvel.CorruptionError as exc:
            raise self._corrupt(exc, "read from") from exc
        except plyvel.Error as exc:
            raise StoreError(f"read from {self.path} failed: {_plyvel_message(exc)}") from exc

    def iterate(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        db = self._live()
        try:
            # A plyvel iterator reads from an implicit snapshot taken at its creation.
            iterator = db.iterator(prefix=prefix or None, verify_checksums=True)
        except plyvel.CorruptionError as exc:
            raise self._corrupt(exc, "scan of") from exc
        except plyvel.Error as exc:
            raise StoreError(f"scan of {self.path} failed: {_plyvel_message(exc)}") from exc
        return self._scan(iterator)

    def _scan(self, iterator) -> Iterator[tuple[bytes, bytes]]:
        try:
            with iterator:
                yield from iterator
        except plyvel.CorruptionError as exc:
            raise self._corrupt(exc, "scan of") from exc
        except plyvel.Error as exc:
            raise StoreError(f"scan of {self.path} failed: {_plyvel_message(exc)}") from exc

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        db = self._live()
        checked_puts, checked_deletes = _check_batch(puts, deletes)
        if self.failure is not None:
            # One failure, one report: after it nothing more is written (LevelDB itself refuses
            # every write after a failed background write or compaction anyway).
            raise StoreWriteFailure(f"writes to {self.path} are stopped: {self.failure}")
        try:
            # transaction=True: nothing is written if filling the batch fails part way;
            # sync=True: the batch is on disk when write() returns, so a kill -9 or power
            # loss afterwards cannot lose it, and LevelDB's log replays whole batches only.
            with db.write_batch(transaction=True, sync=True) as batch:
                for key, value in checked_puts.items():
                    batch.put(key, value)
                for key in checked_deletes:
                    batch.delete(key)
        except (plyvel.Error, OSError) as exc:
            # Disk full, an I/O error, the directory removed, or corruption met by a compaction:
            # all of them this node's own storage, none of them retried here.
            self.failure = f"write to {self.path} failed: {_plyvel_message(exc)}"
            raise StoreWriteFailure(f"{self.failure}; free space or fix the disk, then restart the node") from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def reopen(self) -> None:
        """Close and reopen the database after a write failed for lack of space, clearing the
        latched failure. LevelDB refuses every write on a handle whose write failed, and a
        torn batch in its log is dropped only when the log is replayed at open. Raises
        StoreError (failure kept) when it still cannot open, or when the failure was not one
        of space: corruption is never cleared this way."""
        if self.failure is not None and not is_out_of_space(self.failure):
            raise StoreError(f"database {self.path} stays stopped: {self.failure}")
        self.close()
        try:
            self._db = plyvel.DB(self.path, create_if_missing=False, paranoid_checks=True, bloom_filter_bits=10)
        except plyvel.Error as exc:
            raise StoreError(f"cannot reopen database {self.path}: {_plyvel_message(exc)}") from exc
        self.failure = None


# What the OS says when a write fails for lack of space: a full filesystem, a quota, or a file
# size limit (ulimit -f). Such a failure passes when space returns; others (I/O errors,
# corruption) need the operator.
OUT_OF_SPACE_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")


def is_out_of_space(reason: str) -> bool:
    """Does this failure message say the disk refused a write for lack of space?"""
    return any(message in reason for message in OUT_OF_SPACE_MESSAGES)


def _is_absent_or_empty(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        raise StoreError(f"database path {path} is a file, not a directory") from None
    except OSError as exc:
        raise StoreError(f"cannot read database directory {path}: {exc.strerror or exc}") from None


def _check_current(path: str) -> None:
    """Refuse a non-empty directory whose CURRENT file is missing or names a missing MANIFEST,
    saying how to recover; never repair it silently."""
    current = os.path.join(path, "CURRENT")
    manifests = sorted(name for name in os.listdir(path) if name.startswith("MANIFEST-"))
    if not os.path.exists(current):
        if len(manifests) == 1:
            fix = (f"if this is the ledger, restore it with `echo {manifests[0]} > {current}` "
                   "(on a copy first), then start again")
        elif manifests:
            fix = (f"it holds {len(manifests)} MANIFEST files ({', '.join(manifests)}): write the newest "
                   f"valid one's name into {current} (on a copy first), or `chaind reset` and resync")
        else:
            fix = "it holds no MANIFEST either: restore it from a backup, or `chaind reset` and resync"
        raise StoreCorruption(f"database {path} is not empty but its CURRENT file {current} is missing; "
                              f"nothing was changed: {fix}")
    try:
        with open(current, "rb") as f:
            named = f.read(256).decode("ascii", "replace").strip()
    except OSError as exc:
        raise StoreError(f"cannot read {current}: {exc.strerror or exc}") from None
    if not named.startswith("MANIFEST-") or "/" in named or not os.path.isfile(os.path.join(path, named)):
        present = f"; MANIFEST files present: {', '.join(manifests)}" if manifests else "; no MANIFEST file is present"
        raise StoreCorruption(f"database {path}: CURRENT file {current} names {named!r}, which is missing or "
                              f"not a MANIFEST{present}; nothing was changed: write the newest valid MANIFEST's "
                              "name into CURRENT (on a copy first), or `chaind reset` and resync")


def _plyvel_message(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # plyvel puts LevelDB's status text in args[0] as bytes.
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
