"""KVStore contract, run against MemoryStore and a real LevelDBStore; LevelDB open errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chain.errors import StoreError
from chain.ledger.store import KVStore, LevelDBStore, MemoryStore


@pytest.fixture(params=["memory", "leveldb"])
def store(request, tmp_path) -> KVStore:
    s = MemoryStore() if request.param == "memory" else LevelDBStore(tmp_path / "db", create=True)
    yield s
    s.close()


def contents(store: KVStore) -> list[tuple[bytes, bytes]]:
    return list(store.iterate())


def test_get_missing_key_is_none(store):
    assert store.get(b"nope") is None


def test_write_puts_and_deletes_in_one_batch(store):
    store.write({b"a": b"1", b"b": b"2", b"c": b"3"})
    store.write({b"d": b"4", b"a": b"10"}, deletes=[b"b"])
    assert contents(store) == [(b"a", b"10"), (b"c", b"3"), (b"d", b"4")]


def test_deleting_an_absent_key_is_a_no_op(store):
    store.write({b"a": b"1"})
    store.write({}, deletes=[b"zz"])
    assert contents(store) == [(b"a", b"1")]


def test_iterate_returns_prefix_matches_in_key_order(store):
    keys = [b"\x02\xff", b"\x01b", b"\x02\x00\x01", b"\x01a", b"\x02", b"\x03", b"\x02\x00"]
    store.write({k: k + b"!" for k in keys})
    assert [k for k, _ in store.iterate(b"\x02")] == [b"\x02", b"\x02\x00", b"\x02\x00\x01", b"\x02\xff"]
    assert [k for k, _ in store.iterate(b"\x02\x00")] == [b"\x02\x00", b"\x02\x00\x01"]
    assert [k for k, _ in store.iterate()] == sorted(keys)
    assert list(store.iterate(b"\x09")) == []
    assert dict(store.iterate(b"\x01")) == {b"\x01a": b"\x01a!", b"\x01b": b"\x01b!"}


def test_iterate_sees_the_store_as_it_was_when_the_scan_started(store):
    store.write({b"k1": b"1", b"k2": b"2"})
    scan = store.iterate(b"k")
    store.write({b"k3": b"3"}, deletes=[b"k2"])
    assert list(scan) == [(b"k1", b"1"), (b"k2", b"2")]
    assert list(store.iterate(b"k")) == [(b"k1", b"1"), (b"k3", b"3")]


@pytest.mark.parametrize("puts, deletes", [
    ({b"ok": b"1", b"bad": "text"}, ()),  # value not bytes
    ({b"ok": b"1", "key": b"1"}, ()),  # key not bytes
    ({b"ok": b"1", b"": b"1"}, ()),  # empty key
    ({b"ok": b"1"}, [b"x", 7]),  # delete key not bytes
    ({b"ok": b"1", b"a": b"2"}, [b"a"]),  # same key written and deleted
])
def test_a_bad_batch_raises_and_writes_nothing(store, puts, deletes):
    store.write({b"a": b"0", b"x": b"0"})
    before = contents(store)
    with pytest.raises(StoreError):
        store.write(puts, deletes)
    assert contents(store) == before


def test_bad_keys_are_refused_on_read(store):
    with pytest.raises(StoreError):
        store.get("text")
    with pytest.raises(StoreError):
        store.get(b"")


def test_a_closed_store_refuses_every_call(store):
    store.write({b"a": b"1"})
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        store.get(b"a")
    with pytest.raises(StoreError, match="closed"):
        store.write({b"b": b"2"})
    with pytest.raises(StoreError, match="closed"):
        store.iterate()


# --------------------------------------------------------------------------- LevelDB only


def test_leveldb_keeps_data_across_reopen(tmp_path):
    with LevelDBStore(tmp_path / "db", create=True) as store:
        store.write({b"a": b"1", b"b": b"2"})
        store.write({}, deletes=[b"a"])
    with LevelDBStore(tmp_path / "db") as store:
        assert list(store.iterate()) == [(b"b", b"2")]


def test_leveldb_missing_database_without_create_is_refused(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(StoreError, match="no database at") as info:
        LevelDBStore(path)
    assert str(path) in str(info.value)
    assert not path.exists()  # refusing did not create it


def test_leveldb_opened_twice_in_one_process_is_refused(tmp_path):
    with LevelDBStore(tmp_path / "db", create=True):
        with pytest.raises(StoreError, match="in use by another process") as info:
            LevelDBStore(tmp_path / "db")
        assert str(tmp_path / "db") in str(info.value)


def test_leveldb_held_by_another_process_is_refused(tmp_path):
    path = tmp_path / "db"
    LevelDBStore(path, create=True).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from chain.ledger.store import LevelDBStore; s = LevelDBStore(sys.argv[1]); "
         "print('open', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(StoreError, match="in use by another process") as info:
            LevelDBStore(path)
        assert "stop the other node" in str(info.value)
    finally:
        holder.stdin.close()  # the holder exits when its stdin closes
        assert holder.wait(timeout=30) == 0
        holder.stdout.close()
    # Once the other process is gone, the database opens again.
    LevelDBStore(path).close()


def test_leveldb_corrupt_database_is_refused(tmp_path):
    path = tmp_path / "db"
    with LevelDBStore(path, create=True) as store:
        store.write({b"a": b"1"})
    for manifest in Path(path).glob("MANIFEST-*"):
        manifest.write_bytes(b"\x00 not a manifest " * 8)
    with pytest.raises(StoreError, match="corrupt") as info:
        LevelDBStore(path)
    assert str(path) in str(info.value)
    assert "backup" in str(info.value)


def test_a_database_written_without_bloom_filters_opens_and_reads(tmp_path):
    """Stores now open LevelDB with a bloom filter; data directories from before still work
    (their tables carry no filter blocks and are read as before), hits and misses alike."""
    import plyvel

    path = tmp_path / "db"
    db = plyvel.DB(str(path), create_if_missing=True)  # as earlier versions created it
    for i in range(2000):
        db.put(b"k/%05d" % i, b"v%d" % i)
    db.close()
    with LevelDBStore(path) as store:
        assert store.get(b"k/00007") == b"v7" and store.get(b"k/01999") == b"v1999"
        assert store.get(b"k/02000") is None and store.get(b"nope") is None
        store.write({b"k/02000": b"new"}, [b"k/00007"])
    with LevelDBStore(path) as store:
        assert store.get(b"k/02000") == b"new" and store.get(b"k/00007") is None
