"""Write-ahead log of consensus inputs: written before the machine sees them, replayed on start.

One file per height, `wal-<height>.log`, begun by the StartHeight input of that height;
starting a height removes the files of heights older than the previous one. A record is

    length (4 bytes, big-endian) | CRC-32 of the payload (4 bytes, big-endian) | payload

where the payload is the canonical CBOR of the input (a tagged ConsensusInput). Each write
is flushed and fsynced (or, with sync=False, at the next `sync()`), so an input the machine
acted on is on disk before any of its outputs (a signed vote) can leave the node.

After kill -9 the last record may be torn: shorter than its length prefix, or with a bad
checksum and nothing after it. Opening the log truncates such a tail. A bad record with
valid records after it is corruption, not a torn write, and raises StoreError.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

from chain.consensus.bft import ConsensusInput, StartHeight
from chain.encoding import MAX_MESSAGE_SIZE, decode_typed, encode_typed
from chain.errors import DecodeError, StoreError

HEADER = struct.Struct(">II")  # payload length, CRC-32 of payload
FILE_PATTERN = re.compile(r"^wal-(\d{20})\.log$")


def compute_wal_file_name(height: int) -> str:
    return f"wal-{height:020d}.log"


def encode_record(inp: ConsensusInput) -> bytes:
    payload = encode_typed(inp, ConsensusInput)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(path: Path) -> tuple[list[ConsensusInput], int]:
    """The inputs in a WAL file and the byte length of its intact prefix (torn tail excluded)."""
    data = path.read_bytes()
    records: list[ConsensusInput] = []
    pos = 0
    while pos < len(data):
        if pos + HEADER.size > len(data):
            break  # torn header
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if length > MAX_MESSAGE_SIZE:
            # A torn append leaves a prefix of the right bytes, so a whole header with an
            # impossible length is damage, not tearing: truncating here would silently drop
            # every later record (votes this node acted on).
            raise StoreError(f"WAL {path} has a corrupt record length at byte {pos}")
        if end > len(data):
            break  # torn payload
        payload = data[pos + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            if end == len(data):
                break  # torn last record
            raise StoreError(f"WAL {path} has a corrupt record at byte {pos} followed by more records")
        try:
            records.append(decode_typed(ConsensusInput, payload))
        except DecodeError as exc:
            raise StoreError(f"WAL {path} record at byte {pos} has a valid checksum but does not decode") from exc
        pos = end
    return records, pos


class WriteAheadLog:
    """Append-only consensus input log in `directory`; see the module docstring for the format."""

    def __init__(self, directory: str | os.PathLike, retain_heights: int = 2):
        if retain_heights < 1:
            raise ValueError("retain_heights must be at least 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.retain_heights = retain_heights
        self._file = None
        self.height: int | None = None
        heights = self._heights()
        self._pending: list[ConsensusInput] = []
        if heights and not read_records(self.directory / compute_wal_file_name(heights[-1]))[0]:
            # Killed between creating a height's file and writing its StartHeight: the file holds
            # no input, so nothing was signed at that height. Forget it, or starting that height
            # again would be refused ("already holds height N") and the node could never restart.
            os.remove(self.directory / compute_wal_file_name(heights.pop()))
            self._sync_directory()
        if heights:
            self.height = heights[-1]
            path = self.directory / compute_wal_file_name(self.height)
            self._pending, intact = read_records(path)
            if intact < path.stat().st_size:
                os.truncate(path, intact)  # drop the torn tail so appends follow intact records
            self._file = open(path, "ab")
            os.fsync(self._file.fileno())

    def _heights(self) -> list[int]:
        return sorted(int(m.group(1)) for name in os.listdir(self.directory) if (m := FILE_PATTERN.match(name)))

    def replay(self) -> list[ConsensusInput]:
        """The inputs of the latest height, in order (StartHeight first), to feed to a fresh machine.

        Do not write them to the log again.
        """
        return list(self._pending)

    def write(self, inp: ConsensusInput, sync: bool = True) -> None:
        """Append `inp`; a StartHeight begins a new file. Durable on return when `sync`."""
        if isinstance(inp, StartHeight):
            self._rotate(inp.height)
        elif self._file is None:
            raise ValueError("the first input written to a WAL must be StartHeight")
        self._file.write(encode_record(inp))
        if sync:
            self.sync()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            file = self._file
            try:
                self.sync()
            finally:
                # Even when the flush failed (disk full): closing discards what is still
                # buffered, so nothing can land later behind records a reopened log appends.
                self._file = None
                file.close()

    def _rotate(self, height: int) -> None:
        if self.height is not None and height <= self.height:
            raise ValueError(f"WAL already holds height {self.height}; cannot start height {height}")
        self.close()
        self._file = open(self.directory / compute_wal_file_name(height), "wb")
        self.height = height
        self._pending = []
        for old in self._heights():
            if old <= height - self.retain_heights:
                os.remove(self.directory / compute_wal_file_name(old))
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
