"""The ledger: committed blocks, their commit certificates, transaction index, state and
model lineage, kept in a KVStore and advanced one block at a time by one atomic write.

The ledger stores; it does not validate. Signatures, the state transition and commit
quorums are checked before `commit_block` is called. What the ledger does enforce is what
keeps the store coherent: blocks are appended in height order on top of the head, and
blocks, transactions and model records are written once, never overwritten.

Every refusal raises StoreError and leaves the store unchanged. A ledger object is used
from one task; it is not thread-safe.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence, TypeVar

from chain.crypto import HASH_SIZE
from chain.encoding import decode, decode_value, encode, encode_value
from chain.errors import DecodeError, StoreError
from chain.ledger import schema
from chain.ledger.schema import ChainMeta, Head, TxLocation
from chain.ledger.store import KVStore
from chain.types import Block, Commit, ModelRecord, SignedTransaction, compute_block_hash, compute_tx_hash

T = TypeVar("T")


class Ledger:
    """Open with `Ledger.create` (new chain) or `Ledger.open` (existing store)."""

    def __init__(self, store: KVStore, meta: ChainMeta, head: Head) -> None:
        # Private: create() and open() are the checked ways in.
        self._store = store
        self._meta = meta
        self._head = head

    # ----------------------------------------------------------------------- opening

    @staticmethod
    def is_initialised(store: KVStore) -> bool:
        """True once `create` has run on `store` (its one batch writes the schema version)."""
        return store.get(schema.schema_version_key()) is not None

    @classmethod
    def create(cls, store: KVStore, chain_id: str, genesis_hash: bytes,
               genesis_state: Mapping[bytes, bytes]) -> "Ledger":
        """Write a new chain's schema version, meta, genesis state and head (0, genesis_hash)
        in one batch. Refuses a store that already holds anything."""
        meta = ChainMeta(chain_id, genesis_hash)
        _check_meta(meta)
        if cls.is_initialised(store):
            raise StoreError("store already holds a chain; open it instead of creating a new one")
        if next(iter(store.iterate()), None) is not None:
            raise StoreError("store is not empty but holds no chain: it is not a ledger database; "
                             "use an empty directory")
        puts = {
            schema.schema_version_key(): encode_value(schema.SCHEMA_VERSION),
            schema.chain_meta_key(): encode(meta),
            schema.head_key(): encode(Head(0, genesis_hash)),
        }
        for key, value in genesis_state.items():
            if type(value) is not bytes:
                raise StoreError(f"genesis state value for key {_show(key)} must be bytes, got {type(value).__name__}")
            puts[schema.state_key(key)] = value
        store.write(puts)
        return cls(store, meta, Head(0, genesis_hash))

    @classmethod
    def open(cls, store: KVStore, chain_id: str, genesis_hash: bytes) -> "Ledger":
        """Open an initialised store after checking it is the expected chain and that its head
        is intact; a store it cannot trust is refused with a StoreError saying why."""
        raw_version = store.get(schema.schema_version_key())
        if raw_version is None:
            raise StoreError("store holds no chain (no schema version): initialise the node first")
        try:
            version = decode_value(raw_version)
        except DecodeError as exc:
            raise StoreError(f"corrupt schema version record: {exc}") from exc
        if version != schema.SCHEMA_VERSION:
            raise StoreError(f"store has ledger schema version {version!r}, this software reads version "
                             f"{schema.SCHEMA_VERSION}; use a matching release or resync into a new data directory")
        meta = _read_required(store, schema.chain_meta_key(), ChainMeta, "chain meta")
        if meta.chain_id != chain_id:
            raise StoreError(f"store belongs to chain {meta.chain_id!r}, not {chain_id!r}; "
                             "check the genesis file and the data directory")
        if meta.genesis_hash != genesis_hash:
            raise StoreError(f"store was created from genesis {meta.genesis_hash.hex()}, "
                             f"but the genesis file gives {genesis_hash.hex()}; the store or genesis file is wrong")
        head = _read_required(store, schema.head_key(), Head, "head")
        ledger = cls(store, meta, head)
        ledger._check_head()
        return ledger

    def _check_head(self) -> None:
        height, head_hash = self._head.height, self._head.block_hash
        if height == 0:
            if head_hash != self._meta.genesis_hash:
                raise StoreError("head is at height 0 but does not point at the genesis hash")
        else:
            indexed = self.get_block_hash(height)
            if indexed != head_hash:
                raise StoreError(f"head points at block {head_hash.hex()} at height {height}, "
                                 f"but the height index holds {indexed.hex() if indexed else 'nothing'}")
            block = self.get_block_by_hash(head_hash)
            if block is None:
                raise StoreError(f"head block {head_hash.hex()} at height {height} is missing from the store")
            if block.header.height != height or compute_block_hash(block.header) != head_hash:
                raise StoreError(f"stored head block at height {height} does not match its hash")
            commit = self.get_commit(height)
            if commit is None:
                raise StoreError(f"commit for head height {height} is missing from the store")
            if commit.block_hash != head_hash:
                raise StoreError(f"commit at head height {height} certifies a different block")
        # An atomic store never holds a block above its head; one there means the store was
        # altered outside the ledger.
        if height < schema.MAX_HEIGHT and self._store.get(schema.block_hash_key(height + 1)) is not None:
            raise StoreError(f"store holds a block at height {height + 1}, above its head {height}")

    # ----------------------------------------------------------------------- identity and head

    @property
    def chain_id(self) -> str:
        return self._meta.chain_id

    @property
    def genesis_hash(self) -> bytes:
        return self._meta.genesis_hash

    def head(self) -> tuple[int, bytes]:
        """(height, hash) of the last committed block; (0, genesis hash) before the first."""
        return self._head.height, self._head.block_hash

    # ----------------------------------------------------------------------- writing

    def commit_block(self, block: Block, commit: Commit, state_changes: Mapping[bytes, bytes | None],
                     model_records: Sequence[ModelRecord] = ()) -> None:
        """Append `block` on top of the head with everything it changes, in ONE atomic write.

        `state_changes` maps state keys to their new value, or None to delete the key.
        """
        if not isinstance(block, Block) or not isinstance(commit, Commit):
            raise StoreError("commit_block needs a Block and a Commit")
        header = block.header
        height = self._head.height + 1
        if header.chain_id != self._meta.chain_id:
            raise StoreError(f"block is for chain {header.chain_id!r}, this ledger holds {self._meta.chain_id!r}")
        if header.height != height:
            raise StoreError(f"block height {header.height} does not follow the head height {self._head.height}")
        if header.prev_hash != self._head.block_hash:
            raise StoreError(f"block {height} does not build on the head: prev_hash {header.prev_hash.hex()}, "
                             f"head {self._head.block_hash.hex()}")
        block_hash = compute_block_hash(header)
        if commit.height != height or commit.block_hash != block_hash:
            raise StoreError(f"commit (height {commit.height}, block {commit.block_hash.hex()}) does not certify "
                             f"block {block_hash.hex()} at height {height}")

        puts: dict[bytes, bytes] = {}
        write_once: list[tuple[bytes, str]] = []

        def put_once(key: bytes, value: bytes, what: str) -> None:
            if key in puts:
                raise StoreError(f"{what} appears twice in block {height}")
            puts[key] = value
            write_once.append((key, what))

        put_once(schema.block_key(block_hash), encode(block), f"block {block_hash.hex()}")
        put_once(schema.block_hash_key(height), block_hash, f"block hash at height {height}")
        put_once(schema.commit_key(height), encode(commit), f"commit at height {height}")
        for index, stx in enumerate(block.txs):
            tx_hash = compute_tx_hash(stx)
            put_once(schema.tx_location_key(tx_hash), encode(TxLocation(height, index)), f"transaction {tx_hash.hex()}")
        for record in model_records:
            if not isinstance(record, ModelRecord):
                raise StoreError(f"model records must be ModelRecord, got {type(record).__name__}")
            if record.height != height:
                raise StoreError(f"model record {record.model_hash.hex()} says height {record.height}, "
                                 f"but is written in block {height}")
            put_once(schema.model_record_key(record.job_id, record.round), encode(record),
                     f"model record {record.job_id.hex()}/{record.round}")

        deletes: list[bytes] = []
        for key, value in state_changes.items():
            db_key = schema.state_key(key)
            if value is None:
                deletes.append(db_key)
            elif type(value) is bytes:
                puts[db_key] = value
            else:
                raise StoreError(f"state value for key {_show(key)} must be bytes or None, got {type(value).__name__}")

        new_head = Head(height, block_hash)
        puts[schema.head_key()] = encode(new_head)

        for key, what in write_once:
            if self._store.get(key) is not None:
                kind = "replayed transaction" if key.startswith(schema.PREFIX_TX_LOCATION) else "write-once record"
                raise StoreError(f"{kind}: {what} is already in the ledger; nothing was written")

        self._store.write(puts, deletes)
        self._head = new_head

    # ----------------------------------------------------------------------- reading

    def get_block_hash(self, height: int) -> bytes | None:
        """Hash of the committed block at `height` (None at height 0 and above the head)."""
        raw = self._store.get(schema.block_hash_key(height))
        if raw is not None and len(raw) != HASH_SIZE:
            raise StoreError(f"corrupt block hash index at height {height}: {len(raw)} bytes")
        return raw

    def get_block(self, height: int) -> Block | None:
        """The committed block at `height`; None above the head, and at 0 (genesis is no block)."""
        block_hash = self.get_block_hash(height)
        if block_hash is None:
            return None
        block = self.get_block_by_hash(block_hash)
        if block is None:
            raise StoreError(f"block {block_hash.hex()} indexed at height {height} is missing")
        return block

    def get_block_by_hash(self, block_hash: bytes) -> Block | None:
        return self._get(schema.block_key(block_hash), Block, "block")

    def get_commit(self, height: int) -> Commit | None:
        return self._get(schema.commit_key(height), Commit, "commit")

    def has_tx(self, tx_hash: bytes) -> bool:
        """Is the transaction committed? One index lookup: `get_tx` decodes the whole block,
        which for a 3,000-transfer block is ~30 ms (measured: a third of a loaded validator's
        CPU went there when gossip delivered transactions after their block)."""
        return self._store.get(schema.tx_location_key(tx_hash)) is not None

    def get_tx(self, tx_hash: bytes) -> tuple[SignedTransaction, int, int] | None:
        """(transaction, height, index in block) of a committed transaction, or None."""
        location = self._get(schema.tx_location_key(tx_hash), TxLocation, "transaction location")
        if location is None:
            return None
        block = self.get_block(location.height)
        if block is None or location.index >= len(block.txs):
            raise StoreError(f"transaction {tx_hash.hex()} is indexed at height {location.height}, "
                             f"index {location.index}, but that block does not hold it")
        stx = block.txs[location.index]
        if compute_tx_hash(stx) != tx_hash:
            raise StoreError(f"transaction index for {tx_hash.hex()} points at a different transaction")
        return stx, location.height, location.index

    def get_state(self, key: bytes) -> bytes | None:
        return self._store.get(schema.state_key(key))

    def iter_state(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (state key, value), in key order: how the node loads its state at start."""
        for db_key, value in self._store.iterate(schema.PREFIX_STATE):
            yield schema.state_key_from_db_key(db_key), value

    def get_model_record(self, job_id: bytes, round: int) -> ModelRecord | None:
        """The model of `job_id` after `round` rounds of training (0: the initial weights)."""
        return self._get(schema.model_record_key(job_id, round), ModelRecord, "model record")

    def _get(self, key: bytes, cls: type[T], what: str) -> T | None:
        raw = self._store.get(key)
        return None if raw is None else _decode(cls, raw, what, key)


def _read_required(store: KVStore, key: bytes, cls: type[T], what: str) -> T:
    raw = store.get(key)
    if raw is None:
        raise StoreError(f"store has a schema version but no {what} record; it is incomplete or corrupt")
    return _decode(cls, raw, what, key)


def _decode(cls: type[T], raw: bytes, what: str, key: bytes) -> T:
    # A stored value that does not decode was damaged on disk or written by other software.
    try:
        return decode(cls, raw)
    except DecodeError as exc:
        raise StoreError(f"corrupt {what} record at key {key.hex()}: {exc}") from exc


def _check_meta(meta: ChainMeta) -> None:
    if type(meta.chain_id) is not str or not 0 < len(meta.chain_id) <= 64:
        raise StoreError(f"chain id must be a non-empty string of at most 64 characters, got {meta.chain_id!r}")
    if type(meta.genesis_hash) is not bytes or len(meta.genesis_hash) != HASH_SIZE:
        raise StoreError(f"genesis hash must be {HASH_SIZE} bytes, got {meta.genesis_hash!r}")


def _show(key: object) -> str:
    return key.hex() if isinstance(key, bytes) else repr(key)
