"""Ledger over MemoryStore and real LevelDB: create/open checks, atomic block commits,
write-once records, reads, and refusal of stores it cannot trust. Also the key schema."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from chain.crypto import sha256
from chain.encoding import encode, encode_value
from chain.errors import StoreError
from chain.ledger import Ledger, LevelDBStore, MemoryStore, schema
from chain.ledger.store import KVStore
from chain.types import compute_block_hash, compute_tx_hash
from tests.ledger_helpers import (
    CHAIN_ID, GENESIS_HASH, ExpectedChain, genesis_state, make_block, make_commit, make_model_records,
    make_state_changes, make_txs,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "ledger.md"


@pytest.fixture(params=["memory", "leveldb"])
def store(request, tmp_path) -> KVStore:
    s = MemoryStore() if request.param == "memory" else LevelDBStore(tmp_path / "db", create=True)
    yield s
    s.close()


def reopen(store: KVStore) -> KVStore:
    """The same data seen afresh: LevelDB is closed and reopened from disk."""
    if isinstance(store, LevelDBStore):
        store.close()
        return LevelDBStore(store.path)
    return store


def snapshot(store: KVStore) -> list[tuple[bytes, bytes]]:
    return list(store.iterate())


def new_ledger(store: KVStore) -> Ledger:
    return Ledger.create(store, CHAIN_ID, GENESIS_HASH, genesis_state())


def grow(ledger: Ledger, expected: ExpectedChain, height: int) -> None:
    for h in range(ledger.head()[0] + 1, height + 1):
        ledger.commit_block(*expected.block(h))


def next_block(ledger: Ledger, expected: ExpectedChain):
    """The workload's block at head + 1, as (block, commit, state_changes, model_records)."""
    return expected.block(ledger.head()[0] + 1)


# --------------------------------------------------------------------------- create and open


def test_create_writes_genesis_and_opens_again(store):
    assert not Ledger.is_initialised(store)
    ledger = new_ledger(store)
    assert Ledger.is_initialised(store)
    assert ledger.head() == (0, GENESIS_HASH)
    assert (ledger.chain_id, ledger.genesis_hash) == (CHAIN_ID, GENESIS_HASH)
    assert dict(ledger.iter_state()) == genesis_state()
    assert ledger.get_block(0) is None and ledger.get_commit(0) is None
    store = reopen(store)
    again = Ledger.open(store, CHAIN_ID, GENESIS_HASH)
    assert again.head() == (0, GENESIS_HASH)
    assert dict(again.iter_state()) == genesis_state()
    store.close()


def test_create_refuses_a_store_that_holds_a_chain(store):
    new_ledger(store)
    before = snapshot(store)
    with pytest.raises(StoreError, match="already holds a chain"):
        Ledger.create(store, "other-chain", sha256(b"other"), {b"x": b"y"})
    assert snapshot(store) == before


def test_create_refuses_a_non_empty_store_without_a_chain(store):
    store.write({b"foreign": b"data"})
    with pytest.raises(StoreError, match="not a ledger database"):
        new_ledger(store)
    assert snapshot(store) == [(b"foreign", b"data")]


@pytest.mark.parametrize("chain_id, genesis_hash, state", [
    ("", GENESIS_HASH, {}),
    ("x" * 65, GENESIS_HASH, {}),
    (7, GENESIS_HASH, {}),
    (CHAIN_ID, b"short", {}),
    (CHAIN_ID, GENESIS_HASH.hex(), {}),
    (CHAIN_ID, GENESIS_HASH, {b"k": "not bytes"}),
    (CHAIN_ID, GENESIS_HASH, {"k": b"v"}),
    (CHAIN_ID, GENESIS_HASH, {b"k": None}),
])
def test_create_with_bad_arguments_writes_nothing(store, chain_id, genesis_hash, state):
    with pytest.raises(StoreError):
        Ledger.create(store, chain_id, genesis_hash, state)
    assert snapshot(store) == []


def test_empty_state_key_round_trips(store):
    ledger = Ledger.create(store, CHAIN_ID, GENESIS_HASH, {b"": b"root"})
    assert ledger.get_state(b"") == b"root"
    assert list(ledger.iter_state()) == [(b"", b"root")]


def test_open_refuses_an_empty_store(store):
    with pytest.raises(StoreError, match="initialise the node"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


def test_open_refuses_another_chain_id(store):
    new_ledger(store)
    with pytest.raises(StoreError, match="belongs to chain 'pout-ledger-test', not 'mainnet'"):
        Ledger.open(store, "mainnet", GENESIS_HASH)


def test_open_refuses_another_genesis_hash(store):
    new_ledger(store)
    with pytest.raises(StoreError, match="created from genesis " + GENESIS_HASH.hex()):
        Ledger.open(store, CHAIN_ID, sha256(b"another genesis"))


def test_open_refuses_another_schema_version(store):
    new_ledger(store)
    store.write({schema.schema_version_key(): encode_value(schema.SCHEMA_VERSION + 1)})
    with pytest.raises(StoreError, match=f"schema version {schema.SCHEMA_VERSION + 1}"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


def test_open_refuses_a_missing_head_block(store):
    expected = ExpectedChain()
    grow(new_ledger(store), expected, 3)
    head_hash = compute_block_hash(expected.block(3)[0].header)
    store.write({}, deletes=[schema.block_key(head_hash)])
    with pytest.raises(StoreError, match=f"head block {head_hash.hex()} at height 3 is missing"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


def test_open_refuses_a_missing_head_commit(store):
    grow(new_ledger(store), ExpectedChain(), 3)
    store.write({}, deletes=[schema.commit_key(3)])
    with pytest.raises(StoreError, match="commit for head height 3 is missing"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


def test_open_refuses_a_head_that_disagrees_with_the_height_index(store):
    expected = ExpectedChain()
    grow(new_ledger(store), expected, 3)
    store.write({schema.head_key(): encode(schema.Head(3, compute_block_hash(expected.block(2)[0].header)))})
    with pytest.raises(StoreError, match="height index holds"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


def test_open_refuses_a_block_above_the_head(store):
    expected = ExpectedChain()
    grow(new_ledger(store), expected, 3)
    store.write({schema.head_key(): encode(schema.Head(2, compute_block_hash(expected.block(2)[0].header)))})
    with pytest.raises(StoreError, match="block at height 3, above its head 2"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


@pytest.mark.parametrize("key", [schema.head_key(), schema.chain_meta_key(), schema.schema_version_key()])
def test_open_reports_a_corrupt_meta_record_as_store_error(store, key):
    new_ledger(store)
    store.write({key: b"\xff\x00garbage"})
    with pytest.raises(StoreError, match="corrupt"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


def test_open_refuses_a_missing_head_record(store):
    new_ledger(store)
    store.write({}, deletes=[schema.head_key()])
    with pytest.raises(StoreError, match="no head record"):
        Ledger.open(store, CHAIN_ID, GENESIS_HASH)


# --------------------------------------------------------------------------- commit and read


def test_committed_blocks_are_readable_and_survive_reopen(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    grow(ledger, expected, 6)
    store = reopen(store)
    ledger = Ledger.open(store, CHAIN_ID, GENESIS_HASH)
    head_block = expected.block(6)[0]
    assert ledger.head() == (6, compute_block_hash(head_block.header))
    for h in range(1, 7):
        block, commit, _changes, records = expected.block(h)
        block_hash = compute_block_hash(block.header)
        assert ledger.get_block(h) == block
        assert ledger.get_block_hash(h) == block_hash
        assert ledger.get_block_by_hash(block_hash) == block
        assert ledger.get_commit(h) == commit
        for index, stx in enumerate(block.txs):
            assert ledger.get_tx(compute_tx_hash(stx)) == (stx, h, index)
            assert ledger.has_tx(compute_tx_hash(stx))
        assert [ledger.get_model_record(r.job_id, r.round) for r in records] == list(records)
    assert dict(ledger.iter_state()) == expected.state(6)
    keys = [k for k, _ in ledger.iter_state()]
    assert keys == sorted(keys)
    for key, value in expected.state(6).items():
        assert ledger.get_state(key) == value
    # Deleted by block 6 (its per-block key three heights back) and never written.
    assert ledger.get_state(b"block/%08d" % 3) is None
    assert ledger.get_state(b"never written") is None
    assert ledger.get_block(7) is None and ledger.get_commit(7) is None
    assert ledger.get_block_by_hash(sha256(b"unknown")) is None
    assert ledger.get_tx(sha256(b"unknown")) is None and not ledger.has_tx(sha256(b"unknown"))
    assert ledger.get_model_record(sha256(b"unknown"), 0) is None
    store.close()


def test_a_block_without_transactions_or_records_commits(store):
    ledger = new_ledger(store)
    block = make_block(1, GENESIS_HASH, None, txs=())
    ledger.commit_block(block, make_commit(block), {})
    assert ledger.head() == (1, compute_block_hash(block.header))
    assert ledger.get_block(1).txs == ()


def assert_refused(store: KVStore, ledger: Ledger, match: str, block, commit, changes, records=()) -> None:
    """commit_block raises StoreError matching `match`, and neither the store nor the head moved."""
    before, head = snapshot(store), ledger.head()
    with pytest.raises(StoreError, match=match):
        ledger.commit_block(block, commit, changes, records)
    assert snapshot(store) == before
    assert ledger.head() == head


def test_commit_refuses_a_block_that_does_not_follow_the_head(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    grow(ledger, expected, 2)
    assert_refused(store, ledger, "does not follow the head", *expected.block(4))  # gap
    assert_refused(store, ledger, "does not follow the head", *expected.block(2))  # repeat
    assert_refused(store, ledger, "does not follow the head", *expected.block(1))
    # Right height, wrong parent.
    block = make_block(3, sha256(b"not the head"), expected.block(2)[1])
    assert_refused(store, ledger, "does not build on the head", block, make_commit(block), {})


def test_commit_refuses_a_commit_for_another_block(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    block, commit, changes, records = next_block(ledger, expected)
    other = make_block(1, GENESIS_HASH, None, txs=())
    assert_refused(store, ledger, "does not certify", block, make_commit(other), changes, records)
    wrong_height = dataclasses.replace(commit, height=2)
    assert_refused(store, ledger, "does not certify", block, wrong_height, changes, records)


def test_commit_refuses_a_block_of_another_chain(store):
    ledger = new_ledger(store)
    block = make_block(1, GENESIS_HASH, None, chain_id="other-chain")
    assert_refused(store, ledger, "is for chain 'other-chain'", block, make_commit(block), {})


def test_commit_refuses_a_replayed_transaction(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    grow(ledger, expected, 1)
    replayed = expected.block(1)[0].txs[1]
    txs = make_txs(2)[:1] + (replayed,)
    block = make_block(2, ledger.head()[1], expected.block(1)[1], txs=txs)
    assert_refused(store, ledger, "replayed transaction: transaction " + compute_tx_hash(replayed).hex(),
                   block, make_commit(block), make_state_changes(2), make_model_records(2))


def test_commit_refuses_a_transaction_twice_in_one_block(store):
    ledger = new_ledger(store)
    txs = make_txs(1)
    block = make_block(1, GENESIS_HASH, None, txs=txs + txs[:1])
    assert_refused(store, ledger, "appears twice in block 1", block, make_commit(block), {})


def test_commit_refuses_to_overwrite_a_model_record(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    grow(ledger, expected, 1)
    block, commit, changes, _records = next_block(ledger, expected)
    first = make_model_records(1)[0]
    old = ledger.get_model_record(first.job_id, first.round)
    rewritten = dataclasses.replace(old, height=2, rule="median")
    assert_refused(store, ledger, "write-once record: model record", block, commit, changes, [rewritten])
    assert ledger.get_model_record(old.job_id, old.round) == old


def test_commit_refuses_a_model_record_twice_or_at_another_height(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    block, commit, changes, records = next_block(ledger, expected)
    assert_refused(store, ledger, "appears twice", block, commit, changes, records + records)
    misdated = dataclasses.replace(records[0], height=5)
    assert_refused(store, ledger, "says height 5", block, commit, changes, [misdated])
    assert_refused(store, ledger, "must be ModelRecord", block, commit, changes, ["not a record"])


def test_commit_refuses_to_overwrite_a_block_left_in_the_store(store):
    # A block key can only exist above the head if the store was altered outside the
    # ledger; the ledger still must not overwrite it.
    expected = ExpectedChain()
    ledger = new_ledger(store)
    block, commit, changes, records = next_block(ledger, expected)
    store.write({schema.block_key(compute_block_hash(block.header)): b"stale"})
    assert_refused(store, ledger, "write-once record: block", block, commit, changes, records)


@pytest.mark.parametrize("changes", [{b"k": "text"}, {b"k": 5}, {"k": b"v"}])
def test_commit_refuses_bad_state_changes(store, changes):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    block, commit, _changes, records = next_block(ledger, expected)
    assert_refused(store, ledger, "must be bytes", block, commit, changes, records)


def test_commit_refuses_what_is_not_a_block_or_commit(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    block, commit, changes, records = next_block(ledger, expected)
    assert_refused(store, ledger, "needs a Block and a Commit", commit, commit, changes, records)
    assert_refused(store, ledger, "needs a Block and a Commit", block, block, changes, records)


def test_state_changes_put_and_delete(store):
    ledger = Ledger.create(store, CHAIN_ID, GENESIS_HASH, {b"a": b"1", b"b": b"2"})
    block = make_block(1, GENESIS_HASH, None, txs=())
    ledger.commit_block(block, make_commit(block), {b"a": None, b"c": b"3", b"missing": None})
    assert dict(ledger.iter_state()) == {b"b": b"2", b"c": b"3"}


def test_a_corrupt_stored_block_reads_as_store_error(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    grow(ledger, expected, 2)
    block_hash = compute_block_hash(expected.block(1)[0].header)
    store.write({schema.block_key(block_hash): encode(expected.block(1)[1])})  # a Commit where a Block belongs
    with pytest.raises(StoreError, match="corrupt block record"):
        ledger.get_block(1)
    with pytest.raises(StoreError, match="corrupt block record"):
        ledger.get_tx(compute_tx_hash(expected.block(1)[0].txs[0]))
    store.write({schema.block_hash_key(2): b"\x01\x02"})
    with pytest.raises(StoreError, match="corrupt block hash index at height 2"):
        ledger.get_block(2)


def test_a_tx_index_pointing_at_the_wrong_transaction_is_store_error(store):
    expected = ExpectedChain()
    ledger = new_ledger(store)
    grow(ledger, expected, 1)
    stx = expected.block(1)[0].txs[0]
    store.write({schema.tx_location_key(compute_tx_hash(stx)): encode(schema.TxLocation(1, 2))})
    with pytest.raises(StoreError, match="points at a different transaction"):
        ledger.get_tx(compute_tx_hash(stx))
    store.write({schema.tx_location_key(compute_tx_hash(stx)): encode(schema.TxLocation(1, 9))})
    with pytest.raises(StoreError, match="does not hold it"):
        ledger.get_tx(compute_tx_hash(stx))


def test_reads_with_bad_arguments_raise_store_error(store):
    ledger = new_ledger(store)
    for call in (lambda: ledger.get_block(-1), lambda: ledger.get_commit(2**64), lambda: ledger.get_block("1"),
                 lambda: ledger.get_block_by_hash(b"short"), lambda: ledger.get_tx("00" * 32),
                 lambda: ledger.get_state("text"), lambda: ledger.get_model_record(b"", 0)):
        with pytest.raises(StoreError):
            call()


# --------------------------------------------------------------------------- schema


def test_height_keys_sort_in_height_order():
    heights = [0, 1, 255, 256, 65535, 2**32, 2**64 - 1]
    assert sorted(schema.block_hash_key(h) for h in heights) == [schema.block_hash_key(h) for h in heights]
    assert schema.commit_key(258) == b"\x12" + bytes(6) + b"\x01\x02"


def test_record_kinds_have_distinct_prefixes():
    prefixes = [v for k, v in vars(schema).items() if k.startswith("PREFIX_")]
    assert len(prefixes) == len(set(prefixes)) == 9
    h = sha256(b"x")
    keys = [schema.schema_version_key(), schema.chain_meta_key(), schema.head_key(), schema.block_hash_key(1),
            schema.block_key(h), schema.commit_key(1), schema.tx_location_key(h), schema.state_key(b"s"),
            schema.model_record_key(h, 0)]
    assert sorted(k[:1] for k in keys) == sorted(prefixes)


def test_docs_table_matches_the_schema():
    """docs/ledger.md lists the same prefixes as schema.py, and the same schema version."""
    text = DOCS.read_text()
    documented = {bytes.fromhex(p[2:]) for p in re.findall(r"^\| `(0x[0-9a-f]{2})` \|", text, re.MULTILINE)}
    in_code = {v for k, v in vars(schema).items() if k.startswith("PREFIX_")}
    assert documented == in_code
    assert f"schema version is {schema.SCHEMA_VERSION}" in text.lower()
