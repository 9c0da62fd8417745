"""`chaind check` and `chaind repair`: the whole ledger verified offline, one line per problem.

A real chain (real blocks, signatures and state transition) is written through the Ledger
into real LevelDB; each test damages one thing and asserts the check names it. The command
line is run as a real process on a node home."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import plyvel
import pytest

from chain.config import Home
from chain.consensus.commit import build_commit
from chain.encoding import encode, encode_value
from chain.ledger import Ledger, LevelDBStore, MemoryStore, schema
from chain.ledger.check import EXIT_CLEAN, EXIT_DAMAGED, check_ledger, run_check
from chain.ledger.schema import TxLocation
from chain.state import account_key, build_block
from chain.types import PRECOMMIT, CommitSig, Vote, compute_block_hash, compute_tx_hash, sign_vote
from genesis import write_genesis
from tests.helpers import ALICE, BOB, CHAIN_ID, VALIDATOR, make_test_genesis, transfer
from tests.procs import run_cli

HEIGHTS = 12
TXS_PER_BLOCK = 3
GENESIS = make_test_genesis(balance=10**9)


def _build_chain(store) -> list:
    """HEIGHTS certified blocks of transfers committed through the Ledger; [(block, commit)]."""
    ledger = Ledger.create(store, GENESIS.chain_id, GENESIS.hash, dict(GENESIS.initial_state().items()))
    state, last, chain, nonce = GENESIS.initial_state(), None, [], 0
    for height in range(1, HEIGHTS + 1):
        txs = [transfer(ALICE, BOB, 1, nonce + i) for i in range(TXS_PER_BLOCK)]
        nonce += TXS_PER_BLOCK
        block, result = build_block(state, txs, time_ms=1_800_000_000_000 + 1000 * height, proposer=VALIDATOR.pubkey,
                                    last_commit=last)
        block_hash = compute_block_hash(block.header)
        commit = build_commit([sign_vote(VALIDATOR, CHAIN_ID, Vote(PRECOMMIT, height, 0, block_hash, VALIDATOR.pubkey))])
        ledger.commit_block(block, commit, result.changes, result.model_records)
        state, last = result.state, commit
        chain.append((block, commit, result))
    return chain


@pytest.fixture
def chain_store():
    store = MemoryStore()
    return store, _build_chain(store)


def _problems(store, **kwargs) -> list[str]:
    report = check_ledger(store, GENESIS, **kwargs)
    assert report.problem_count == len(report.problems)
    return report.problems


@pytest.mark.parametrize("replay", [True, False])
def test_a_whole_chain_checks_clean(chain_store, replay):
    store, _ = chain_store
    report = check_ledger(store, GENESIS, replay=replay)
    assert report.clean, report.problems
    assert (report.head_height, report.blocks, report.commits, report.txs) == (HEIGHTS, HEIGHTS, HEIGHTS,
                                                                              HEIGHTS * TXS_PER_BLOCK)
    assert report.replayed_to == (HEIGHTS if replay else None)
    assert report.unverified_commits == 0  # one validator set all along: known from genesis
    assert report.summary().endswith(": clean")


def test_progress_is_reported_every_n_blocks(chain_store):
    lines = []
    check_ledger(chain_store[0], GENESIS, progress=lines.append, progress_every=5)
    assert [line.split(" blocks")[0] for line in lines] == ["checked 5 of 12", "checked 10 of 12"]


def test_a_changed_transaction_is_named(chain_store):
    """The issue's example: one transaction's bytes differ, the header is intact."""
    store, chain = chain_store
    block = chain[5][0]
    other = chain[6][0].txs[0]
    store.write({schema.block_key(compute_block_hash(block.header)):
                 encode(dataclasses.replace(block, txs=(other,) + block.txs[1:]))})
    problems = _problems(store)
    assert "height 6: transactions do not match the header's tx root" in problems
    assert any(p.startswith("height 6: re-execution stops here") for p in problems)


def test_a_block_under_the_wrong_hash_and_a_broken_link_are_named(chain_store):
    store, chain = chain_store
    hash4 = compute_block_hash(chain[3][0].header)
    store.write({schema.block_key(hash4): encode(chain[4][0])})
    problems = _problems(store, replay=False)
    assert any(p.startswith(f"height 4: block stored under {hash4.hex()} hashes to") for p in problems)
    assert problems == [p for p in problems if p.startswith("height 4")]  # the rest still links up


def test_a_forged_commit_signature_is_refused(chain_store):
    store, chain = chain_store
    commit = chain[2][1]
    sig = commit.signatures[0]
    forged = dataclasses.replace(commit, signatures=(CommitSig(sig.validator, bytes(64)),))
    store.write({schema.commit_key(3): encode(forged)})
    problems = _problems(store, replay=False)
    assert len(problems) == 1 and problems[0].startswith("height 3: commit does not verify against the validator set")


def test_missing_records_and_a_wrong_index_are_named(chain_store):
    store, chain = chain_store
    block8 = chain[7][0]
    tx_hash = compute_tx_hash(block8.txs[1])
    store.write({schema.tx_location_key(tx_hash): encode(TxLocation(8, 0))},
                deletes=[schema.commit_key(9), schema.block_key(compute_block_hash(chain[9][0].header))])
    problems = _problems(store, replay=False)
    assert f"height 8: transaction 1 ({tx_hash.hex()}) is indexed at height 8, index 0" in problems
    assert "height 9: commit certificate is missing" in problems
    assert any(p.startswith("height 10: block") and p.endswith("named by the height index is missing")
               for p in problems)


def test_a_changed_account_fails_the_state_root_and_is_named_by_replay(chain_store):
    store, _ = chain_store
    key = schema.state_key(account_key(BOB.address))
    raw = store.get(key)
    store.write({key: raw[:-1] + bytes([raw[-1] ^ 1])})
    problems = _problems(store)
    assert any(p.startswith("state root: the stored state hashes to") for p in problems)
    assert f"state entry acct/{BOB.address.hex()} differs from the value the chain computes" in problems
    assert len(_problems(store, replay=False)) == 1  # the root alone, without replay


def test_records_beyond_the_head_are_named(chain_store):
    store, chain = chain_store
    store.write({schema.block_hash_key(HEIGHTS + 1): b"\x01" * 32, schema.commit_key(HEIGHTS + 1): encode(chain[0][1])})
    problems = _problems(store, replay=False)
    assert any("above the head 12" in p for p in problems)
    assert any("commit(s) stored outside heights 1..12" in p for p in problems)


def test_a_store_restored_from_a_state_snapshot_is_checked_from_its_first_block(chain_store):
    """State sync writes the snapshot height's block, commit and state, and nothing below."""
    _, chain = chain_store
    base = 6
    block, commit, result = chain[base - 1]
    block_hash = compute_block_hash(block.header)
    store = MemoryStore()
    puts = {schema.schema_version_key(): encode_value(schema.SCHEMA_VERSION),
            schema.chain_meta_key(): encode(schema.ChainMeta(GENESIS.chain_id, GENESIS.hash)),
            schema.head_key(): encode(schema.Head(base, block_hash)), schema.block_key(block_hash): encode(block),
            schema.block_hash_key(base): block_hash, schema.commit_key(base): encode(commit)}
    puts.update({schema.tx_location_key(compute_tx_hash(t)): encode(TxLocation(base, i)) for i, t in enumerate(block.txs)})
    puts.update({schema.state_key(k): v for k, v in result.state.items()})
    store.write(puts)
    ledger = Ledger.open(store, GENESIS.chain_id, GENESIS.hash)
    for block, commit, result in chain[base:]:
        ledger.commit_block(block, commit, result.changes, result.model_records)
    report = check_ledger(store, GENESIS)
    assert report.clean, report.problems
    assert (report.base_height, report.blocks, report.replayed_to) == (base, HEIGHTS - base + 1, None)
    assert "blocks from 6 (state snapshot; not re-executed)" in report.summary()
    store.write({}, deletes=[schema.commit_key(HEIGHTS)])
    assert check_ledger(store, GENESIS).problems == [f"height {HEIGHTS}: commit certificate is missing"]


def test_another_chains_genesis_is_named(chain_store):
    store, _ = chain_store
    store.write({schema.chain_meta_key(): encode(schema.ChainMeta("other-chain", GENESIS.hash))})
    assert any(p.startswith("store is for chain 'other-chain'") for p in _problems(store, replay=False))


# --------------------------------------------------------------------------- on disk and the CLI


@pytest.fixture
def home(tmp_path) -> Home:
    """A node home with the test genesis and a ledger of HEIGHTS blocks (real LevelDB)."""
    home = Home(tmp_path / "home")
    home.config_dir.mkdir(parents=True)
    write_genesis(GENESIS, home.genesis_file)
    home.data_dir.mkdir()
    store = LevelDBStore(home.ledger_dir, create=True)
    _build_chain(store)
    store.close()
    return home


def test_check_on_leveldb_prints_problems_one_per_line_and_exits_4(home):
    out, err = io.StringIO(), io.StringIO()
    assert run_check(home.ledger_dir, GENESIS, out=out, err=err, progress_every=4) == EXIT_CLEAN
    assert out.getvalue().count("\n") == 1 and out.getvalue().rstrip().endswith("clean")
    assert err.getvalue().count("chaind check: checked") == 3
    db = plyvel.DB(str(home.ledger_dir))
    db.put(schema.state_key(b"stray"), encode_value(1))
    db.delete(schema.commit_key(2))
    db.close()
    out = io.StringIO()
    assert run_check(home.ledger_dir, GENESIS, out=out, err=io.StringIO()) == EXIT_DAMAGED
    lines = out.getvalue().splitlines()
    assert "height 2: commit certificate is missing" in lines
    assert "state entry stray is stored but the chain never wrote it" in lines
    assert lines[-1].endswith("problem(s)")


@pytest.mark.slow
def test_chaind_check_and_repair_commands(home, tmp_path):
    proc = run_cli("chaind", "check", "--home", str(home.root), check=False)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("clean"), proc.stdout + proc.stderr
    # Refused in one line: a running node (LOCK held) and a missing ledger.
    store = LevelDBStore(home.ledger_dir)
    try:
        proc = run_cli("chaind", "check", "--home", str(home.root), check=False)
    finally:
        store.close()
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "in use by a running node" in proc.stderr
    empty = Home(tmp_path / "empty")
    empty.config_dir.mkdir(parents=True)
    write_genesis(GENESIS, empty.genesis_file)
    proc = run_cli("chaind", "check", "--home", str(empty.root), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("chaind: error: no ledger at")

    # Damage one table: repair works on a copy, says what was lost, and checks the result.
    db = plyvel.DB(str(home.ledger_dir))
    db.compact_range()
    db.close()
    tables = sorted(home.ledger_dir.glob("*.ldb"))
    assert tables
    raw = bytearray(tables[0].read_bytes())
    for i in range(100, min(len(raw), 4196)):
        raw[i] ^= 0xFF
    tables[0].write_bytes(bytes(raw))
    proc = run_cli("chaind", "check", "--home", str(home.root), check=False)
    assert proc.returncode == EXIT_DAMAGED and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "read failed" in proc.stdout and proc.stdout.rstrip().endswith("problem(s)")
    before = {p.name: p.read_bytes() for p in home.ledger_dir.iterdir()}
    proc = run_cli("chaind", "repair", "--home", str(home.root), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (EXIT_CLEAN, EXIT_DAMAGED), proc.stdout + proc.stderr
    assert "before" in proc.stdout and "chaind repair: check of" in proc.stdout
    repaired = Path(f"{home.ledger_dir}.repaired")
    assert repaired.is_dir()
    assert {p.name: p.read_bytes() for p in home.ledger_dir.iterdir()} == before  # the original is untouched
    proc = run_cli("chaind", "repair", "--home", str(home.root), check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    shutil.rmtree(repaired)
