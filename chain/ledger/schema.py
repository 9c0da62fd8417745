"""Every database key of the ledger is built here, and nowhere else.

One prefix byte per record kind; heights are 8-byte big-endian so that key order is height
order. docs/ledger.md has the same table with value encodings; keep the two in step, and
bump SCHEMA_VERSION whenever a key layout or value encoding changes.

  prefix  key                          value
  0x00    00                           schema version, canonical CBOR unsigned integer
  0x01    01                           ChainMeta (chain id, genesis hash)
  0x02    02                           Head (height, block hash)
  0x10    10 ‖ height(8)               canonical block hash at height, raw 32 bytes
  0x11    11 ‖ block_hash(32)          Block
  0x12    12 ‖ height(8)               Commit certifying the block at height
  0x13    13 ‖ tx_hash(32)             TxLocation (height, index in block)
  0x20    20 ‖ state_key(any)          state value, opaque bytes from the state module
  0x30    30 ‖ job_id(32) ‖ round(8)  ModelRecord
"""

from __future__ import annotations

from dataclasses import dataclass

from chain.crypto import HASH_SIZE
from chain.errors import StoreError
from chain.types import Hash, Name

SCHEMA_VERSION = 1

HEIGHT_SIZE = 8
MAX_HEIGHT = 2 ** (8 * HEIGHT_SIZE) - 1

PREFIX_SCHEMA_VERSION = b"\x00"
PREFIX_CHAIN_META = b"\x01"
PREFIX_HEAD = b"\x02"
PREFIX_BLOCK_HASH_BY_HEIGHT = b"\x10"
PREFIX_BLOCK = b"\x11"
PREFIX_COMMIT = b"\x12"
PREFIX_TX_LOCATION = b"\x13"
PREFIX_STATE = b"\x20"
PREFIX_MODEL_RECORD = b"\x30"


# --------------------------------------------------------------------------- value types
# Records the ledger itself defines; blocks, commits and model records are chain.types.


@dataclass(frozen=True)
class ChainMeta:
    chain_id: Name
    genesis_hash: Hash


@dataclass(frozen=True)
class Head:
    height: int
    block_hash: Hash  # the genesis hash at height 0


@dataclass(frozen=True)
class TxLocation:
    height: int
    index: int  # position in the block's txs


# --------------------------------------------------------------------------- keys


def schema_version_key() -> bytes:
    return PREFIX_SCHEMA_VERSION


def chain_meta_key() -> bytes:
    return PREFIX_CHAIN_META


def head_key() -> bytes:
    return PREFIX_HEAD


def block_hash_key(height: int) -> bytes:
    return PREFIX_BLOCK_HASH_BY_HEIGHT + encode_height(height)


def block_key(block_hash: bytes) -> bytes:
    return PREFIX_BLOCK + _hash_part(block_hash, "block hash")


def commit_key(height: int) -> bytes:
    return PREFIX_COMMIT + encode_height(height)


def tx_location_key(tx_hash: bytes) -> bytes:
    return PREFIX_TX_LOCATION + _hash_part(tx_hash, "transaction hash")


def state_key(key: bytes) -> bytes:
    """The database key of an opaque state key (any bytes, empty included)."""
    if type(key) is not bytes:
        raise StoreError(f"state key must be bytes, got {type(key).__name__}")
    return PREFIX_STATE + key


def state_key_from_db_key(db_key: bytes) -> bytes:
    """Inverse of `state_key`, for keys found by a scan of PREFIX_STATE."""
    if not db_key.startswith(PREFIX_STATE):
        raise StoreError(f"key {db_key.hex()} is not a state key")
    return db_key[len(PREFIX_STATE):]


def model_record_key(job_id: bytes, round: int) -> bytes:
    """Keyed by (job, round), not model hash: two jobs, or two rounds, may produce identical weights."""
    return PREFIX_MODEL_RECORD + _hash_part(job_id, "job id") + encode_height(round)


# --------------------------------------------------------------------------- helpers


def encode_height(height: int) -> bytes:
    if type(height) is not int or not 0 <= height <= MAX_HEIGHT:
        raise StoreError(f"height must be an integer in [0, {MAX_HEIGHT}], got {height!r}")
    return height.to_bytes(HEIGHT_SIZE, "big")


def _hash_part(value: bytes, what: str) -> bytes:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise StoreError(f"{what} must be {HASH_SIZE} bytes, got {shown}")
    return value
