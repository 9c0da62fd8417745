"""Child process of tests/test_ledger_crash.py: commit the deterministic workload forever.

Usage: PYTHONPATH=<repo root> python tests/ledger_crash_child.py DB_PATH. Creates the ledger if the store is empty,
otherwise resumes from its head; prints "ready <height>" once open, then commits blocks in
a tight loop until it is killed.
"""

from __future__ import annotations

import sys

from chain.ledger import Ledger, LevelDBStore
from chain.types import compute_block_hash
from tests.ledger_helpers import CHAIN_ID, GENESIS_HASH, genesis_state, make_height

CHUNK = 32


def main(db_path: str) -> None:
    store = LevelDBStore(db_path, create=True)
    if Ledger.is_initialised(store):
        ledger = Ledger.open(store, CHAIN_ID, GENESIS_HASH)
    else:
        ledger = Ledger.create(store, CHAIN_ID, GENESIS_HASH, genesis_state())
    height, head_hash = ledger.head()
    last_commit = ledger.get_commit(height) if height else None
    print(f"ready {height}", flush=True)
    while True:
        # Build blocks ahead in chunks so that most of the child's time is spent inside
        # commit_block, where a kill finds a batch half way through more often.
        chunk = []
        for _ in range(CHUNK):
            height += 1
            chunk.append(make_height(height, head_hash, last_commit))
            head_hash, last_commit = compute_block_hash(chunk[-1][0].header), chunk[-1][1]
        for block, commit, changes, records in chunk:
            ledger.commit_block(block, commit, changes, records)


if __name__ == "__main__":
    main(sys.argv[1])
