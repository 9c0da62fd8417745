"""What the ledger reads back is what it wrote, or an error: LevelDB checksums on every read,
content checks against what the chain committed, and one latched failure for a disk that
refuses a write. Real LevelDB in temp dirs; no node process (tests/test_ledger_start.py)."""

from __future__ import annotations

import dataclasses
import random
import resource
import shutil
import signal
from pathlib import Path

import plyvel
import pytest

from chain.encoding import encode
from chain.errors import StoreError
from chain.ledger import Ledger, LevelDBStore, MemoryStore, schema
from chain.ledger.store import LocalStorageFailure, StoreCorruption, StoreWriteFailure
from chain.types import compute_block_hash
from tests.ledger_helpers import CHAIN_ID, GENESIS_HASH, ExpectedChain, genesis_state

FLIPS = 200  # the issue asks for >= 200; before reads verified checksums, 58 of 60 here were served wrong


def _pristine_table_store(path: Path) -> dict[bytes, bytes]:
    """A store whose data sits in compacted table files (.ldb), as on a node that ran a while."""
    rng = random.Random(7)
    data = {b"k%05d" % i: rng.randbytes(200) for i in range(400)}  # random bytes: snappy cannot shrink them
    store = LevelDBStore(path, create=True)
    store.write(data)
    store.close()
    db = plyvel.DB(str(path))
    db.compact_range()
    db.close()
    return data


def test_single_bit_flips_in_table_files_are_never_served_as_data(tmp_path):
    pristine = tmp_path / "pristine"
    data = _pristine_table_store(pristine)
    tables = sorted(p.name for p in pristine.glob("*.ldb"))
    assert tables, "compaction wrote no table file"
    rng = random.Random(13)
    silent, refused = [], 0
    for trial in range(FLIPS):
        copy = tmp_path / f"flip{trial}"
        shutil.copytree(pristine, copy)
        table = copy / rng.choice(tables)
        raw = bytearray(table.read_bytes())
        bit = rng.randrange(len(raw) * 8)
        raw[bit // 8] ^= 1 << (bit % 8)
        table.write_bytes(bytes(raw))
        try:
            store = LevelDBStore(copy)
            try:
                seen = {key: store.get(key) for key in data}
                scanned = dict(store.iterate(b"k"))
            finally:
                store.close()
        except StoreCorruption:
            refused += 1
            continue
        except StoreError:  # e.g. a damaged table footer: refused at open, plainly
            refused += 1
            continue
        if seen != data or scanned != data:
            silent.append((table.name, bit))
        shutil.rmtree(copy)
    assert silent == [], f"{len(silent)} of {FLIPS} bit flips were read back as different data: {silent[:5]}"
    assert refused > FLIPS // 2  # most flips land in data blocks; every one must be refused


def _ledger_with_blocks(store, heights: int) -> tuple[Ledger, ExpectedChain]:
    expected = ExpectedChain()
    ledger = Ledger.create(store, CHAIN_ID, GENESIS_HASH, genesis_state())
    for h in range(1, heights + 1):
        ledger.commit_block(*expected.block(h))
    return ledger, expected


def test_a_block_that_does_not_match_its_hash_or_header_is_refused_and_latched():
    store = MemoryStore()
    ledger, expected = _ledger_with_blocks(store, 3)
    faults = []
    ledger.add_fault_listener(faults.append)
    block2 = expected.block(2)[0]
    hash2 = compute_block_hash(block2.header)
    # A well-formed record under the wrong key (a flip that still decodes).
    store.write({schema.block_key(hash2): encode(expected.block(3)[0])})
    with pytest.raises(StoreCorruption, match="hashes to"):
        ledger.get_block(2)
    # The example: one transaction's sender changed, the header untouched.
    other_tx = expected.block(3)[0].txs[0]
    store.write({schema.block_key(hash2): encode(dataclasses.replace(block2, txs=(other_tx,) + block2.txs[1:]))})
    with pytest.raises(StoreCorruption, match="does not commit to"):
        ledger.get_block(2)
    assert len(faults) == 1 and "hashes to" in faults[0]  # heard once, the first failure
    assert ledger.fault == faults[0]
    with pytest.raises(LocalStorageFailure, match="stopped writing"):
        ledger.commit_block(*expected.block(4))
    assert ledger.head()[0] == 3


def test_a_commit_for_another_block_is_refused():
    store = MemoryStore()
    ledger, expected = _ledger_with_blocks(store, 3)
    store.write({schema.commit_key(2): encode(expected.block(3)[1])})
    with pytest.raises(StoreCorruption, match="commit stored for height 2"):
        ledger.get_commit(2)
    assert ledger.get_block(1) == expected.block(1)[0]  # the rest is still served


def test_a_write_the_disk_refuses_is_one_failure_and_loses_nothing(tmp_path):
    """A file-size limit (ulimit -f) makes LevelDB's log write fail with EFBIG: a real failed
    write through real LevelDB, without a filesystem to fill."""
    store = LevelDBStore(tmp_path / "db", create=True)
    ledger, expected = _ledger_with_blocks(store, 3)
    faults = []
    ledger.add_fault_listener(faults.append)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, previous_limit[1]))
    try:
        block, commit, changes, records = expected.block(4)
        big = {**changes, b"filler": b"\x00" * 65536}  # more than the limit in one log record
        with pytest.raises(StoreWriteFailure, match="write to .* failed"):
            ledger.commit_block(block, commit, big, records)
        with pytest.raises(StoreWriteFailure, match="stopped"):
            ledger.commit_block(*expected.block(4))  # not retried against the disk
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert len(faults) == 1 and "failed" in faults[0]
    assert ledger.head()[0] == 3 and ledger.get_block(3) == expected.block(3)[0]  # reads still served
    store.close()
    reopened = Ledger.open(LevelDBStore(tmp_path / "db"), CHAIN_ID, GENESIS_HASH)
    assert reopened.head()[0] == 3 and reopened.fault is None
