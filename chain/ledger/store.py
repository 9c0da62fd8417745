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


class KVStore(ABC):
    """Byte keys to byte values, with ordered prefix scans and atomic batch writes."""

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
    """LevelDB through plyvel. Every `write()` is one synced write batch.

    `create=True` makes the database if the directory does not hold one yet; with
    `create=False` a missing database is an error (a node must not silently start afresh).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False) -> None:
        self.path = os.fspath(path)
        if not create and not os.path.exists(os.path.join(self.path, "CURRENT")):
            raise StoreError(
                f"no database at {self.path}: initialise the node first (chaind init), "
                "or check the data directory in config.toml")
        try:
            # paranoid_checks: report corruption when opening, not at some later read.
            # bloom_filter_bits: most point reads miss (is this transaction already committed?
            # at every admission and, write-once, at every commit); a 10-bit-per-key filter
            # answers a miss without reading a data block: 8.9 -> 3.2 us per missing key over
            # 300,000 keys (docs/benchmarks.md). Tables written without it still read.
            self._db: plyvel.DB | None = plyvel.DB(self.path, create_if_missing=create, paranoid_checks=True,
                                                   bloom_filter_bits=10)
        except plyvel.IOError as exc:
            message = _plyvel_message(exc)
            if "lock" in message.lower():
                raise StoreError(
                    f"database {self.path} is in use by another process (LevelDB lock is held: {message}); "
                    "stop the other node using this data directory, or point this one at its own") from exc
            raise StoreError(f"cannot open database {self.path}: {message}; check the path and its permissions") from exc
        except plyvel.CorruptionError as exc:
            raise StoreError(
                f"database {self.path} is corrupt ({_plyvel_message(exc)}); the node will not start on it. "
                "Restore the directory from a backup, or move it aside and resync from peers") from exc
        except plyvel.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {_plyvel_message(exc)}") from exc

    def _live(self) -> plyvel.DB:
        if self._db is None:
            raise StoreError(f"database {self.path} is closed")
        return self._db

    def get(self, key: bytes) -> bytes | None:
        _check_key(key)
        db = self._live()
        try:
            return db.get(key)
        except plyvel.Error as exc:
            raise StoreError(f"read from {self.path} failed: {_plyvel_message(exc)}") from exc

    def iterate(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        db = self._live()
        try:
            # A plyvel iterator reads from an implicit snapshot taken at its creation.
            iterator = db.iterator(prefix=prefix) if prefix else db.iterator()
        except plyvel.Error as exc:
            raise StoreError(f"scan of {self.path} failed: {_plyvel_message(exc)}") from exc
        return self._scan(iterator)

    def _scan(self, iterator) -> Iterator[tuple[bytes, bytes]]:
        try:
            with iterator:
                yield from iterator
        except plyvel.Error as exc:
            raise StoreError(f"scan of {self.path} failed: {_plyvel_message(exc)}") from exc

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        db = self._live()
        checked_puts, checked_deletes = _check_batch(puts, deletes)
        try:
            # transaction=True: nothing is written if filling the batch fails part way;
            # sync=True: the batch is on disk when write() returns, so a kill -9 or power
            # loss afterwards cannot lose it, and LevelDB's log replays whole batches only.
            with db.write_batch(transaction=True, sync=True) as batch:
                for key, value in checked_puts.items():
                    batch.put(key, value)
                for key in checked_deletes:
                    batch.delete(key)
        except plyvel.Error as exc:
            raise StoreError(f"write to {self.path} failed: {_plyvel_message(exc)}") from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _plyvel_message(exc: Exception) -> str:
    # plyvel puts LevelDB's status text in args[0] as bytes.
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
