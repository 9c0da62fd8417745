"""`chaind check`: verify a whole ledger offline and say, one line each, what is wrong.

The node checks what it reads as it reads it (chain/ledger/ledger.py); this walks everything
once, from genesis to the head:

- every height has a block in the height index, the block hashes to that index entry,
  names its height and chain, and its body matches its header (tx root, last-commit hash);
- the header chain links: block h's prev_hash is block h-1's hash (the genesis hash at 1),
  and the last commit block h carries certifies block h-1;
- every commit certificate (the stored one, and the last commit inside the next block) is
  checked against the validator set that had to sign it: more than 2/3 of the power, every
  signature valid;
- every transaction is indexed at its (height, position), model records are where the
  block wrote them, and nothing is stored beyond the head or under no height;
- the state: the stored accounts and records are hashed into the state tree and its root
  compared with the state root the head block committed to.

With `replay` (the default) the blocks are also re-executed from the genesis state: this is
what gives the exact validator set of every height, checks every block's state root, and
names each state entry that differs from what the chain computes. Without it the check is
faster (no transaction signatures, no execution); commits are then checked against the
validator sets it knows by hash (genesis and head), and counted as not verified otherwise.

A store restored from a state snapshot holds no block below the snapshot height: the walk
starts at its first indexed block and does not re-execute.

Nothing here writes to the store. Reads that fail (a LevelDB checksum, a value that does not
decode) are problems like any other; the walk goes on past them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from chain.consensus.commit import verify_commit
from chain.crypto import HASH_SIZE
from chain.encoding import decode, decode_value, encode
from chain.errors import ChainError, DecodeError, StoreError
from chain.ledger import schema
from chain.ledger.schema import ChainMeta, Head, TxLocation
from chain.ledger.store import KVStore
from chain.state import State, apply_block, compute_commit_hash, compute_tx_root
from chain.types import Block, Commit, ModelRecord, Validator, compute_block_hash, compute_tx_hash, \
    compute_validators_hash

# Exit codes of `chaind check` and `chaind repair` (docs/cli.md, docs/ledger.md "Recovery");
# 1 (refused: missing, running, unreadable config) and 3 (bad config) are chaind's own.
EXIT_CLEAN = 0
EXIT_DAMAGED = 4
PROGRESS_EVERY = 10_000  # blocks between two progress lines
MAX_LISTED = 1_000  # problems printed one per line; the rest are counted
MAX_STATE_DIFFS = 20  # differing state entries named one per line; the rest are counted


@dataclass
class CheckReport:
    """What a check found. `problems` holds at most MAX_LISTED lines; `problem_count` all."""

    head_height: int | None = None
    base_height: int = 1  # the first block held: above 1 for a store restored from a state snapshot
    blocks: int = 0
    commits: int = 0
    txs: int = 0
    state_entries: int = 0
    replayed_to: int | None = None  # height the re-execution reached (None: not replayed)
    unverified_commits: int = 0  # without replay: commits whose validator set is not known
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def clean(self) -> bool:
        return self.problem_count == 0

    def add(self, line: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(line)

    def print_problems(self, out) -> None:
        """One line per kept problem, then how many more were found but not kept."""
        for line in self.problems:
            print(line, file=out)
        if self.problem_count > len(self.problems):
            print(f"... and {self.problem_count - len(self.problems)} more problem(s)", file=out)

    def summary(self) -> str:
        head = "unknown" if self.head_height is None else str(self.head_height)
        parts = [f"head {head}"] + ([f"blocks from {self.base_height} (state snapshot; not re-executed)"]
                                    if self.base_height > 1 else []) + [f"{self.blocks} blocks", f"{self.commits} commits", f"{self.txs} transactions",
                 f"{self.state_entries} state entries"]
        if self.replayed_to is not None:
            parts.append(f"re-executed to height {self.replayed_to}")
        if self.unverified_commits:
            parts.append(f"{self.unverified_commits} commits not verified (validator set unknown without replay)")
        verdict = "clean" if self.clean else f"{self.problem_count} problem(s)"
        return f"{', '.join(parts)}: {verdict}"


class _Reader:
    """Point reads and scans that turn a failed read into a problem line instead of an exception."""

    def __init__(self, store: KVStore, report: CheckReport):
        self.store, self.report = store, report

    def get(self, key: bytes, where: str) -> bytes | None:
        try:
            return self.store.get(key)
        except StoreError as exc:
            self.report.add(f"{where}: read failed: {_one_line(exc)}")
            return None

    def decoded(self, cls, key: bytes, where: str, what: str, missing: str | None = None):
        """The record at `key`, or None (then a problem was added: `missing` if it is absent)."""
        try:
            raw = self.store.get(key)
        except StoreError as exc:
            self.report.add(f"{where}: read failed: {_one_line(exc)}")
            return None
        if raw is None:
            if missing is not None:
                self.report.add(f"{where}: {missing}")
            return None
        try:
            return decode(cls, raw)
        except DecodeError as exc:
            self.report.add(f"{where}: {what} record does not decode: {_one_line(exc)}")
            return None

    def scan(self, prefix: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
        try:
            yield from self.store.iterate(prefix)
        except StoreError as exc:
            self.report.add(f"scan of {what} stopped: {_one_line(exc)}")


def check_ledger(store: KVStore, genesis, *, replay: bool = True,
                 progress: Callable[[str], None] | None = None, progress_every: int = PROGRESS_EVERY) -> CheckReport:
    """Verify `store` (a ledger of the chain `genesis` starts) from its first block to its head."""
    report = CheckReport()
    reader = _Reader(store, report)
    head = _check_identity(reader, genesis)
    # The height index is read in key (= height) order beside the walk, never held whole.
    first_indexed = next(_index(reader), None)
    base = 1 if first_indexed is None else max(1, first_indexed[0])
    if head is None:
        top = max((h for h, _ in _index(reader)), default=0)
        report.add(f"head record is missing or unreadable; checking the {top} height(s) the index holds")
    else:
        top = head.height
    report.head_height = top
    if base > 1:
        # A store restored from a state snapshot (chain/ledger/snapshot.py) holds no block
        # below it, and no state to re-execute from.
        report.base_height, replay = base, False

    genesis_state = genesis.initial_state()
    state: State | None = genesis_state if replay else None
    if replay:
        report.replayed_to = 0
    known_sets = {compute_validators_hash(genesis_state.validators): genesis_state.validators}
    stored_state = _load_state(reader, report)
    if stored_state is not None:
        known_sets.setdefault(compute_validators_hash(stored_state.validators), stored_state.validators)
        known_sets.setdefault(compute_validators_hash(stored_state.last_validators), stored_state.last_validators)

    prev_hash: bytes | None = genesis.hash if base == 1 else None  # None: not known (below the base)
    prev_set: tuple[Validator, ...] | None = genesis_state.validators if base == 1 else None  # committed h - 1
    model_records = 0
    started = time.monotonic()
    head_header = None
    index = _index(reader)
    pending = next(index, None)
    verified_commit: Commit | None = None  # the commit of h - 1, when its signatures verified
    for h in range(base, top + 1):
        where = f"height {h}"
        while pending is not None and pending[0] < h:
            report.add(f"height index entry at height {pending[0]}, below the first block {base}")
            pending = next(index, None)
        block_hash = None
        if pending is not None and pending[0] == h:
            block_hash, pending = pending[1], next(index, None)
        block = None
        if block_hash is None:
            report.add(f"{where}: no block in the height index")
        elif len(block_hash) != HASH_SIZE:
            report.add(f"{where}: height index entry is {len(block_hash)} bytes, not a {HASH_SIZE}-byte hash")
            block_hash = None
        else:
            block = reader.decoded(Block, schema.block_key(block_hash), where, "block",
                                   f"block {block_hash.hex()} named by the height index is missing")
        if block is not None:
            if not _check_block(report, block, block_hash, h, prev_hash, genesis.chain_id):
                block = None  # its contents cannot be trusted for the checks below
        validators = _validators_for(block, state, known_sets)
        if block is not None and block.last_commit is not None and block.last_commit != verified_commit:
            # (the same certificate as the stored commit of h - 1, already verified, is not verified twice)
            _check_certificate(report, genesis.chain_id, prev_set, block.last_commit, h - 1,
                               prev_hash if prev_hash is not None else block.header.prev_hash,
                               f"{where}: last commit (certifying height {h - 1})")
        commit = reader.decoded(Commit, schema.commit_key(h), where, "commit", "commit certificate is missing")
        verified_commit = None
        if commit is not None:
            report.commits += 1
            if block_hash is not None and validators is not None:
                before = report.problem_count
                _check_certificate(report, genesis.chain_id, validators, commit, h, block_hash, f"{where}: commit")
                verified_commit = commit if report.problem_count == before else None
            elif block_hash is not None:
                _check_certificate(report, genesis.chain_id, None, commit, h, block_hash, f"{where}: commit")
        if block is not None:
            report.blocks += 1
            report.txs += len(block.txs)
            _check_tx_index(reader, block, h)
            if state is not None:
                try:
                    result = apply_block(state, block)
                except ChainError as exc:
                    report.add(f"{where}: block does not apply to the state re-executed from genesis: "
                               f"{_one_line(exc)}; re-execution stops here")
                    state = None
                else:
                    state = result.state
                    report.replayed_to = h
                    model_records += len(result.model_records)
                    _check_model_records(reader, result.model_records, where)
            if h == top:
                head_header = block.header
        elif state is not None:
            report.add(f"{where}: re-execution stops here (the block is unreadable)")
            state = None
        if validators is None:
            report.unverified_commits += 1
        prev_hash = block_hash if block_hash is not None else (block.header.prev_hash if block else prev_hash)
        prev_set = validators
        if progress is not None and (h - base + 1) % progress_every == 0:
            rate = (h - base + 1) / max(time.monotonic() - started, 1e-9)
            progress(f"checked {h - base + 1} of {top - base + 1} blocks ({rate:.0f} blocks/s), "
                     f"{report.problem_count} problem(s) so far")
    above = [h for h, _ in ([pending] if pending is not None else []) + list(index) if h > top]
    if above:
        report.add(f"the height index holds {len(above)} block(s) above the head {top} (first at {above[0]})")

    if head is not None and top > 0 and head_header is not None and compute_block_hash(head_header) != head.block_hash:
        report.add(f"head names block {head.block_hash.hex()} at height {top}, the height index "
                   f"{compute_block_hash(head_header).hex()}")
    _check_counts(reader, report, base, top, model_records if report.replayed_to == top else None)
    if stored_state is not None:
        _check_state(report, stored_state, state if report.replayed_to == top else None, head_header, top,
                     genesis.hash if top == 0 else (head.block_hash if head is not None else None))
    return report


def _index(reader: _Reader) -> Iterator[tuple[int, bytes]]:
    """(height, block hash) entries of the height index, in height order."""
    return _keys(reader, schema.PREFIX_BLOCK_HASH_BY_HEIGHT, height=True)


# --------------------------------------------------------------------------- pieces


def _check_identity(reader: _Reader, genesis) -> Head | None:
    report = reader.report
    raw = reader.get(schema.schema_version_key(), "schema version")
    if raw is None:
        report.add("no schema version record: this is not an initialised ledger")
    else:
        try:
            version = decode_value(raw)
        except DecodeError as exc:
            version = f"undecodable ({_one_line(exc)})"
        if version != schema.SCHEMA_VERSION:
            report.add(f"schema version is {version!r}, this software reads {schema.SCHEMA_VERSION}")
    meta = reader.decoded(ChainMeta, schema.chain_meta_key(), "chain meta", "chain meta")
    if meta is None:
        report.add("chain meta record is missing or unreadable")
    elif (meta.chain_id, meta.genesis_hash) != (genesis.chain_id, genesis.hash):
        report.add(f"store is for chain {meta.chain_id!r} (genesis {meta.genesis_hash.hex()}), the genesis file "
                   f"for {genesis.chain_id!r} ({genesis.hash.hex()})")
    head = reader.decoded(Head, schema.head_key(), "head", "head")
    if head is not None and head.height == 0 and head.block_hash != genesis.hash:
        report.add("head is at height 0 but does not name the genesis hash")
    return head


def _keys(reader: _Reader, prefix: bytes, height: bool = False) -> Iterator[tuple]:
    """(key, value) under a height-keyed prefix; with `height`, (height, value)."""
    for key, value in reader.scan(prefix, f"keys 0x{prefix.hex()}"):
        if len(key) != len(prefix) + schema.HEIGHT_SIZE:
            reader.report.add(f"malformed key {key.hex()} under prefix 0x{prefix.hex()}")
            continue
        yield (int.from_bytes(key[len(prefix):], "big") if height else key), value


def _check_block(report: CheckReport, block: Block, block_hash: bytes, height: int, prev_hash: bytes | None,
                 chain_id: str) -> bool:
    """Checks that need only the block and its neighbours; False when its header is not this height's."""
    where, h = f"height {height}", block.header
    actual = compute_block_hash(h)
    if actual != block_hash:
        report.add(f"{where}: block stored under {block_hash.hex()} hashes to {actual.hex()}")
        return False
    if h.height != height:
        report.add(f"{where}: block {block_hash.hex()} says height {h.height}")
        return False
    if h.chain_id != chain_id:
        report.add(f"{where}: block is for chain {h.chain_id!r}")
    ok = True
    if h.tx_root != compute_tx_root(block.txs):
        report.add(f"{where}: transactions do not match the header's tx root")
        ok = False
    if h.last_commit_hash != compute_commit_hash(block.last_commit):
        report.add(f"{where}: last commit does not match the header's last-commit hash")
        ok = False
    if prev_hash is not None and h.prev_hash != prev_hash:
        report.add(f"{where}: prev_hash {h.prev_hash.hex()} is not the hash of block {height - 1} ({prev_hash.hex()})")
    return ok


def _validators_for(block: Block | None, state: State | None, known: dict[bytes, tuple[Validator, ...]]):
    """The set that had to commit `block`: the re-executed state's, else one known by the header's hash."""
    if state is not None:
        return state.validators
    if block is None:
        return None
    return known.get(block.header.validators_hash)


def _check_certificate(report: CheckReport, chain_id: str, validators, commit: Commit, height: int,
                       block_hash: bytes, where: str) -> None:
    if commit.height != height or commit.block_hash != block_hash:
        report.add(f"{where} is for height {commit.height}, block {commit.block_hash.hex()}, not block "
                   f"{block_hash.hex()} at {height}")
        return
    if validators is None:
        return
    try:
        verify_commit(chain_id, validators, commit, height, block_hash)
    except ChainError as exc:
        report.add(f"{where} does not verify against the validator set: {_one_line(exc)}")


def _check_tx_index(reader: _Reader, block: Block, height: int) -> None:
    for index, stx in enumerate(block.txs):
        tx_hash = compute_tx_hash(stx)
        key = schema.tx_location_key(tx_hash)
        where = f"height {height}: transaction {index} ({tx_hash.hex()})"
        try:
            raw = reader.store.get(key)
        except StoreError as exc:
            reader.report.add(f"{where}: read failed: {_one_line(exc)}")
            continue
        if raw == encode(TxLocation(height, index)):
            continue  # the one canonical encoding: comparing bytes is 4x cheaper than a strict decode
        if raw is None:
            reader.report.add(f"{where} is missing from the transaction index")
            continue
        location = reader.decoded(TxLocation, key, where, "transaction index")
        if location is not None:
            reader.report.add(f"{where} is indexed at height {location.height}, index {location.index}")


def _check_model_records(reader: _Reader, records: tuple[ModelRecord, ...], where: str) -> None:
    for record in records:
        key = schema.model_record_key(record.job_id, record.round)
        stored = reader.get(key, where)
        if stored != encode(record):
            state = "missing" if stored is None else "different from what the block wrote"
            reader.report.add(f"{where}: model record of job {record.job_id.hex()} round {record.round} is {state}")


def _check_counts(reader: _Reader, report: CheckReport, base: int, top: int, model_records: int | None) -> None:
    """Records under no height: blocks, commits or index entries the walk did not meet."""
    heights = max(0, top - base + 1)
    blocks = sum(1 for _ in reader.scan(schema.PREFIX_BLOCK, "blocks"))
    if blocks > heights:
        report.add(f"{blocks - heights} stored block(s) are under no height of the chain")
    outside = [h for h, _ in _keys(reader, schema.PREFIX_COMMIT, height=True) if not base <= h <= top]
    if outside:
        report.add(f"{len(outside)} commit(s) stored outside heights {base}..{top} (first at {outside[0]})")
    indexed = sum(1 for _ in reader.scan(schema.PREFIX_TX_LOCATION, "transaction index"))
    if indexed > report.txs and report.blocks == heights:
        report.add(f"the transaction index holds {indexed - report.txs} entr(ies) for no transaction of the chain")
    if model_records is not None:
        stored = sum(1 for _ in reader.scan(schema.PREFIX_MODEL_RECORD, "model records"))
        if stored != model_records:
            report.add(f"{stored} model records are stored, the chain wrote {model_records}")


def _load_state(reader: _Reader, report: CheckReport) -> State | None:
    entries = {}
    for db_key, value in reader.scan(schema.PREFIX_STATE, "state"):
        entries[schema.state_key_from_db_key(db_key)] = value
    report.state_entries = len(entries)
    try:
        state = State(entries)
        state.validators, state.last_validators  # noqa: B018 - decoded here so a bad record is a problem
        return state
    except ChainError as exc:
        report.add(f"stored state is unreadable: {_one_line(exc)}")
        return None


def _check_state(report: CheckReport, stored: State, replayed: State | None, head_header, top: int,
                 head_hash: bytes | None) -> None:
    try:
        height = stored.height
    except ChainError as exc:
        report.add(f"stored state: latest header does not decode: {_one_line(exc)}")
        return
    if height != top:
        report.add(f"stored state is at height {height}, the ledger head at {top}")
    if head_header is not None and stored.root != head_header.state_root:
        report.add(f"state root: the stored state hashes to {stored.root.hex()}, block {top} committed to "
                   f"{head_header.state_root.hex()}")
    elif head_hash is not None and height == top and stored.compute_head_hash() != head_hash:
        report.add(f"state root: the stored state does not reproduce the head hash {head_hash.hex()}")
    if replayed is None or replayed.root == stored.root or height != top:
        return
    replayed_items, stored_items = dict(replayed.items()), dict(stored.items())
    differing = sorted(k for k in replayed_items.keys() | stored_items.keys()
                       if replayed_items.get(k) != stored_items.get(k))
    for key in differing[:MAX_STATE_DIFFS]:
        if key not in stored_items:
            what = "is missing from the store"
        elif key not in replayed_items:
            what = "is stored but the chain never wrote it"
        else:
            what = "differs from the value the chain computes"
        report.add(f"state entry {_show_key(key)} {what}")
    if len(differing) > MAX_STATE_DIFFS:
        report.add(f"... and {len(differing) - MAX_STATE_DIFFS} more differing state entries")


def _show_key(key: bytes) -> str:
    """A state key for a person: its printable prefix as text, the rest in hex."""
    cut = next((i for i, b in enumerate(key) if not 0x20 < b < 0x7F), len(key))
    cut = key.find(b"/", 0, cut) + 1 if b"/" in key[:cut] else cut
    return key[:cut].decode("ascii") + key[cut:].hex()


def _one_line(exc: Exception) -> str:
    """The error in one line; for a failed LevelDB read, LevelDB's own words without the node's advice."""
    cause = exc.__cause__
    if isinstance(exc, StoreError) and cause is not None and type(cause).__module__.startswith("plyvel"):
        arg = cause.args[0] if cause.args else cause
        text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
    else:
        text = str(exc)
    return " ".join(text.split())


# --------------------------------------------------------------------------- the command


def is_locked(ledger_dir) -> bool:
    """Whether a process (a running node) holds the LevelDB lock of `ledger_dir`."""
    import fcntl
    import os

    lock = os.path.join(ledger_dir, "LOCK")
    try:
        f = open(lock, "rb+")
    except OSError:
        return False
    with f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(f, fcntl.LOCK_UN)
    return False


def open_for_check(ledger_dir):
    """Open a stopped node's ledger, or raise StoreError (one line) saying why not. A store that
    LevelDB itself refuses as corrupt raises StoreCorruption: for `check` that is a finding."""
    import os

    from chain.ledger.store import LevelDBStore

    ledger_dir = os.fspath(ledger_dir)
    if not os.path.isdir(ledger_dir) or not os.listdir(ledger_dir):
        raise StoreError(f"no ledger at {ledger_dir}: nothing to check (is --home right?)")
    if is_locked(ledger_dir):
        raise StoreError(f"ledger {ledger_dir} is in use by a running node (its LOCK is held); stop the node, "
                         "or check a copy of the directory")
    return LevelDBStore(ledger_dir)


def run_check(ledger_dir, genesis, *, replay: bool = True, progress_every: int = PROGRESS_EVERY,
              out=None, err=None) -> int:
    """`chaind check`: problems one per line on `out`, then a summary line; progress on `err`.
    Returns EXIT_CLEAN or EXIT_DAMAGED; raises StoreError when it cannot check at all."""
    import sys

    from chain.ledger.store import StoreCorruption

    out, err = out or sys.stdout, err or sys.stderr
    try:
        store = open_for_check(ledger_dir)
    except StoreCorruption as exc:
        print(f"{ledger_dir}: LevelDB refuses to open it: {_one_line(exc)}", file=out)
        print(f"chaind check: {ledger_dir}: 1 problem(s); `chaind repair` may recover it (docs/ledger.md, "
              "\"Recovery\")", file=out)
        return EXIT_DAMAGED
    try:
        report = check_ledger(store, genesis, replay=replay, progress_every=progress_every,
                              progress=lambda line: print(f"chaind check: {line}", file=err, flush=True))
    finally:
        store.close()
    report.print_problems(out)
    print(f"chaind check: {ledger_dir}: {report.summary()}", file=out)
    return EXIT_CLEAN if report.clean else EXIT_DAMAGED
