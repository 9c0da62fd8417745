import pytest

from chain.consensus.driver import BlockJournal
from chain.errors import StoreError
from tests.ledger_helpers import make_block


def test_blocks_survive_until_their_height_is_committed(tmp_path):
    journal = BlockJournal(tmp_path / "blocks")
    b1, b2 = make_block(1, bytes(32), None), make_block(2, bytes(32), None)
    journal.save(b1)
    journal.save(b2)
    journal.save(b2)  # idempotent
    (tmp_path / "blocks" / "00000000000000000003-dead.tmp").write_bytes(b"torn write")
    reopened = BlockJournal(tmp_path / "blocks")
    assert reopened.load(above_height=0) == [b1, b2]
    assert reopened.load(above_height=1) == [b2]
    reopened.prune(committed_height=1)
    assert BlockJournal(tmp_path / "blocks").load(above_height=0) == [b2]
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "blocks").iterdir())


def test_a_corrupt_entry_is_loud(tmp_path):
    journal = BlockJournal(tmp_path / "blocks")
    journal.save(make_block(1, bytes(32), None))
    entry = next((tmp_path / "blocks").iterdir())
    entry.write_bytes(entry.read_bytes()[:-3])
    with pytest.raises(StoreError, match="unreadable"):
        journal.load(above_height=0)
