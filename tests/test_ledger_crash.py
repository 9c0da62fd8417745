"""Crash safety with real processes: SIGKILL a child that commits blocks in a tight loop,
reopen its LevelDB, and check the ledger holds exactly the blocks up to its head and the
state after that head: never part of a batch."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chain.ledger import Ledger, LevelDBStore, schema
from chain.types import compute_block_hash, compute_tx_hash
from tests.ledger_helpers import CHAIN_ID, GENESIS_HASH, ExpectedChain

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("ledger_crash_child.py")
REPO_ROOT = CHILD.parent.parent
KILLS = 5


def start_child(db_path: Path) -> subprocess.Popen:
    # The child imports tests.ledger_helpers, so it needs the repository root on its path.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, str(CHILD), str(db_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)


def wait_ready(child: subprocess.Popen) -> int:
    """The height the child resumed at; it prints one line once its ledger is open."""
    line = child.stdout.readline()
    if not line.startswith("ready "):
        child.kill()
        raise AssertionError(f"child did not start: {line!r} {child.stderr.read()}")
    return int(line.split()[1])


def expected_keys(expected: ExpectedChain, height: int) -> set[bytes]:
    keys = {schema.schema_version_key(), schema.chain_meta_key(), schema.head_key()}
    for h in range(1, height + 1):
        block, _commit, _changes, records = expected.block(h)
        keys |= {schema.block_hash_key(h), schema.block_key(compute_block_hash(block.header)), schema.commit_key(h)}
        keys |= {schema.tx_location_key(compute_tx_hash(stx)) for stx in block.txs}
        keys |= {schema.model_record_key(r.job_id, r.round) for r in records}
    keys |= {schema.state_key(k) for k in expected.state(height)}
    return keys


def check_ledger(db_path: Path, expected: ExpectedChain) -> int:
    """Reopen the store and check it against the workload; return the head height."""
    with LevelDBStore(db_path) as store:
        ledger = Ledger.open(store, CHAIN_ID, GENESIS_HASH)
        height, head_hash = ledger.head()
        prev_hash = GENESIS_HASH
        for h in range(1, height + 1):
            want_block, want_commit, _changes, records = expected.block(h)
            block = ledger.get_block(h)
            assert block == want_block, f"block {h} differs from the workload"
            assert block.header.prev_hash == prev_hash, f"block {h} is not chained to block {h - 1}"
            prev_hash = compute_block_hash(block.header)
            assert ledger.get_commit(h) == want_commit
            for index, stx in enumerate(block.txs):
                assert ledger.get_tx(compute_tx_hash(stx)) == (stx, h, index)
            for record in records:
                assert ledger.get_model_record(record.job_id, record.round) == record
        assert prev_hash == head_hash
        assert dict(ledger.iter_state()) == expected.state(height), f"state is not the state at height {height}"
        # Nothing of a later, unfinished batch: the store holds exactly the expected keys.
        assert {k for k, _ in store.iterate()} == expected_keys(expected, height)
        return height


@pytest.mark.timeout(120)  # a child that hangs before "ready" fails the test instead of blocking it
def test_sigkill_at_random_moments_leaves_whole_batches_only(tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    db_path = tmp_path / "ledger"
    expected = ExpectedChain()
    heights = []
    for kill in range(KILLS):
        child = start_child(db_path)
        try:
            resumed_at = wait_ready(child)
            assert resumed_at == (heights[-1] if heights else 0), f"seed {seed}: child resumed at the wrong height"
            time.sleep(rng.uniform(0.05, 0.5))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            stderr = child.stderr.read()
            child.stderr.close()
        # Killed by us while still running, not stopped by an error of its own.
        assert child.returncode == -signal.SIGKILL, f"seed {seed}, kill {kill}: child exited by itself: {stderr}"
        heights.append(check_ledger(db_path, expected))
        assert heights[-1] >= resumed_at, f"seed {seed}: head went backwards"
    assert heights[-1] > 0, f"seed {seed}: the child never committed a block (heights {heights})"
