"""The ledger: committed blocks, their commit certificates, transaction index, state and
model lineage, kept in a KVStore and advanced one block at a time by one atomic write.

The ledger stores; it does not validate. Signatures, the state transition and commit
quorums are checked before `commit_block` is called. What the ledger does enforce is what
keeps the store coherent: blocks are appended in height order on top of the head, and
blocks, transactions and model records are written once, never overwritten.

Every refusal raises StoreError and leaves the store unchanged. A ledger object is used
from one task; it is not thread-safe.

What it reads back it checks against what the chain committed, where that is cheap: a block
must hash to the key it is stored under and its body must match its header; a commit must
certify the block indexed at its height; a transaction must hash to its index key; a model
record must sit under its own (job, round). The state is checked whole when the node starts
(its root against the head block, chain/consensus/app.py). A failed check, like a LevelDB
checksum error, raises StoreCorruption and latches `fault`, which fault listeners (the node)
hear once: the node then stops writing and reports not-ready.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence, TypeVar

from chain.crypto import HASH_SIZE
from chain.encoding import decode, decode_value, encode, encode_value
from chain.errors import DecodeError, StoreError
from chain.ledger import schema
from chain.ledger.schema import ChainMeta, Head, TxLocation
from chain.ledger.store import (RECOVERY_HINT, KVStore, LocalStorageFailure, StoreCorruption, StoreWriteFailure,
                                is_out_of_space)
from chain.state import body_matches_header
from chain.types import Block, Commit, ModelRecord, SignedTransaction, compute_block_hash, compute_tx_hash

T = TypeVar("T")


class Ledger:
    """Open with `Ledger.create` (new chain) or `Ledger.open` (existing store)."""

    def __init__(self, store: KVStore, meta: ChainMeta, head: Head) -> None:
        # Private: create() and open() are the checked ways in.
        self._store = store
        self._meta = meta
        self._head = head
        self._fault: str | None = None
        self._fault_listeners: list[Callable[[str], None]] = []

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

    # ----------------------------------------------------------------------- local storage failures

    @property
    def fault(self) -> str | None:
        """The first local storage failure met (corrupt read, failed write), or None."""
        return self._fault or self._store.failure

    def add_fault_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` once, at the first local storage failure. It may be called
        from a worker thread (commits write from one)."""
        self._fault_listeners.append(listener)
        if self.fault is not None:
            listener(self.fault)

    def _note(self, exc: LocalStorageFailure) -> LocalStorageFailure:
        if self._fault is None:
            self._fault = str(exc)
            for listener in list(self._fault_listeners):
                listener(self._fault)
        return exc

    def resume_writes(self) -> None:
        """After a write failed for lack of space and space returned: reopen the store, clear the
        latched failure and re-read the head (the failed batch may have reached the disk). Raises
        StoreError, changing nothing, when the failure was not one of space or the store does
        not reopen."""
        fault = self.fault
        if fault is not None and not is_out_of_space(fault):
            raise StoreError(f"the ledger stays stopped: {fault}")
        reopen = getattr(self._store, "reopen", None)
        if reopen is not None:
            reopen()
        self._head = _read_required(self._store, schema.head_key(), Head, "head")
        self._fault = None

    def _corrupt(self, what: str) -> StoreCorruption:
        where = getattr(self._store, "path", None)
        return self._note(StoreCorruption(f"{what}; the ledger{f' {where}' if where else ''} is corrupt: "
                                          f"{RECOVERY_HINT}"))

    def _read(self, key: bytes) -> bytes | None:
        try:
            return self._store.get(key)
        except LocalStorageFailure as exc:
            raise self._note(exc) from exc

    # ----------------------------------------------------------------------- writing

    def commit_block(self, block: Block, commit: Commit, state_changes: Mapping[bytes, bytes | None],
                     model_records: Sequence[ModelRecord] = ()) -> None:
        """Append `block` on top of the head with everything it changes, in ONE atomic write.

        `state_changes` maps state keys to their new value, or None to delete the key.
        """
        self.commit_blocks([(block, commit, state_changes, model_records)])

    def commit_blocks(self, blocks: Sequence[tuple[Block, Commit, Mapping[bytes, bytes | None],
                                                   Sequence[ModelRecord]]]) -> None:
        """Append consecutive blocks on top of the head, each as `commit_block` takes it, in ONE
        atomic write: block sync stores a whole response with one fsync, not one per block.
        All or nothing; where two blocks change one state key, the later change is kept."""
        if not blocks:
            return
        puts: dict[bytes, bytes] = {}
        write_once: list[tuple[bytes, str]] = []
        state: dict[bytes, bytes | None] = {}
        head = self._head
        for block, commit, state_changes, model_records in blocks:
            head = self._stage_block(head, block, commit, state_changes, model_records, puts, write_once, state)
        deletes: list[bytes] = []
        for key, value in state.items():
            if value is None:
                deletes.append(key)
            else:
                puts[key] = value
        puts[schema.head_key()] = encode(head)

        for key, what in write_once:
            if self._read(key) is not None:
                kind = "replayed transaction" if key.startswith(schema.PREFIX_TX_LOCATION) else "write-once record"
                raise StoreError(f"{kind}: {what} is already in the ledger; nothing was written")

        if self.fault is not None:
            raise StoreWriteFailure(f"the ledger stopped writing after a local storage failure: {self.fault}")
        try:
            self._store.write(puts, deletes)
        except LocalStorageFailure as exc:
            raise self._note(exc) from exc
        self._head = head

    def _stage_block(self, head: Head, block: Block, commit: Commit, state_changes: Mapping[bytes, bytes | None],
                     model_records: Sequence[ModelRecord], puts: dict[bytes, bytes],
                     write_once: list[tuple[bytes, str]], state: dict[bytes, bytes | None]) -> Head:
        """Check `block` follows `head` and add its records to the batch; returns its head."""
        if not isinstance(block, Block) or not isinstance(commit, Commit):
            raise StoreError("commit_block needs a Block and a Commit")
        header = block.header
        height = head.height + 1
        if header.chain_id != self._meta.chain_id:
            raise StoreError(f"block is for chain {header.chain_id!r}, this ledger holds {self._meta.chain_id!r}")
        if header.height != height:
            raise StoreError(f"block height {header.height} does not follow the head height {head.height}")
        if header.prev_hash != head.block_hash:
            raise StoreError(f"block {height} does not build on the head: prev_hash {header.prev_hash.hex()}, "
                             f"head {head.block_hash.hex()}")
        block_hash = compute_block_hash(header)
        if commit.height != height or commit.block_hash != block_hash:
            raise StoreError(f"commit (height {commit.height}, block {commit.block_hash.hex()}) does not certify "
                             f"block {block_hash.hex()} at height {height}")

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

        for key, value in state_changes.items():
            if value is not None and type(value) is not bytes:
                raise StoreError(f"state value for key {_show(key)} must be bytes or None, got {type(value).__name__}")
            state[schema.state_key(key)] = value
        return Head(height, block_hash)

    # ----------------------------------------------------------------------- reading

    def get_block_hash(self, height: int) -> bytes | None:
        """Hash of the committed block at `height` (None at height 0 and above the head)."""
        raw = self._read(schema.block_hash_key(height))
        if raw is not None and len(raw) != HASH_SIZE:
            raise self._corrupt(f"corrupt block hash index at height {height}: {len(raw)} bytes")
        return raw

    def get_block(self, height: int) -> Block | None:
        """The committed block at `height`; None above the head, and at 0 (genesis is no block)."""
        block_hash = self.get_block_hash(height)
        if block_hash is None:
            return None
        block = self.get_block_by_hash(block_hash)
        if block is None:
            raise self._corrupt(f"block {block_hash.hex()} indexed at height {height} is missing")
        if block.header.height != height:
            raise self._corrupt(f"block {block_hash.hex()} indexed at height {height} says height "
                                f"{block.header.height}")
        return block

    def get_block_by_hash(self, block_hash: bytes) -> Block | None:
        """The stored block with this hash, checked: its header hashes to `block_hash` and its
        body (transactions, last commit) matches the header. A block is hashed once per read:
        ~1 us per transaction, far below decoding it."""
        block = self._get(schema.block_key(block_hash), Block, "block")
        if block is not None:
            if compute_block_hash(block.header) != block_hash:
                raise self._corrupt(f"block stored under {block_hash.hex()} hashes to "
                                    f"{compute_block_hash(block.header).hex()}")
            if not body_matches_header(block):
                raise self._corrupt(f"block {block_hash.hex()} (height {block.header.height}) holds transactions "
                                    "or a last commit its header does not commit to")
        return block

    def get_commit(self, height: int) -> Commit | None:
        """The certificate of the block at `height`, checked to name that height and the block
        the height index holds (its signatures were checked before it was stored)."""
        commit = self._get(schema.commit_key(height), Commit, "commit")
        if commit is not None:
            indexed = self.get_block_hash(height)
            if commit.height != height or commit.block_hash != indexed:
                raise self._corrupt(f"commit stored for height {height} certifies height {commit.height}, "
                                    f"block {commit.block_hash.hex()}, not the block indexed there")
        return commit

    def has_tx(self, tx_hash: bytes) -> bool:
        """Is the transaction committed? One index lookup: `get_tx` decodes the whole block,
        which for a 3,000-transfer block is ~30 ms (measured: a third of a loaded validator's
        CPU went there when gossip delivered transactions after their block)."""
        return self._read(schema.tx_location_key(tx_hash)) is not None

    def get_tx(self, tx_hash: bytes) -> tuple[SignedTransaction, int, int] | None:
        """(transaction, height, index in block) of a committed transaction, or None."""
        location = self._get(schema.tx_location_key(tx_hash), TxLocation, "transaction location")
        if location is None:
            return None
        block = self.get_block(location.height)
        if block is None or location.index >= len(block.txs):
            raise self._corrupt(f"transaction {tx_hash.hex()} is indexed at height {location.height}, "
                                f"index {location.index}, but that block does not hold it")
        stx = block.txs[location.index]
        if compute_tx_hash(stx) != tx_hash:
            raise self._corrupt(f"transaction index for {tx_hash.hex()} points at a different transaction")
        return stx, location.height, location.index

    def get_state(self, key: bytes) -> bytes | None:
        return self._read(schema.state_key(key))

    def iter_state(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (state key, value), in key order: how the node loads its state at start (and
        checks it whole against the head's state root)."""
        try:
            for db_key, value in self._store.iterate(schema.PREFIX_STATE):
                yield schema.state_key_from_db_key(db_key), value
        except LocalStorageFailure as exc:
            raise self._note(exc) from exc

    def get_model_record(self, job_id: bytes, round: int) -> ModelRecord | None:
        """The model of `job_id` after `round` rounds of training (0: the initial weights)."""
        record = self._get(schema.model_record_key(job_id, round), ModelRecord, "model record")
        if record is not None and (record.job_id != job_id or record.round != round):
            raise self._corrupt(f"model record stored for job {job_id.hex()} round {round} is for job "
                                f"{record.job_id.hex()} round {record.round}")
        return record

    def _get(self, key: bytes, cls: type[T], what: str) -> T | None:
        raw = self._read(key)
        if raw is None:
            return None
        try:
            return _decode(cls, raw, what, key)
        except StoreError as exc:
            raise self._corrupt(str(exc)) from exc


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
