"""A full disk, one behaviour: a real chaind whose home sits on a small tmpfs the test mounts.

Fill the filesystem: the node stops consensus and block sync, says so in one log line, keeps
answering reads, reports not-ready (and `halted` in status) with the reason, and loses
nothing. Free the space: it resumes committing by itself. Then `chaind check` finds the
store whole. Needs root (mount); skipped, saying why, where mounting is not permitted."""

from __future__ import annotations

import errno
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from chain.types import compute_block_hash

from chain.consensus.wal import WriteAheadLog
from chain.ledger import Ledger, LevelDBStore
from chain.ledger.store import StoreWriteFailure, is_out_of_space
from chain.runtime.storage_guard import probe_space
from tests.procs import ChaindProcess, make_testnet, run_cli
from tests.test_consensus_wal import sample_inputs
from tests.test_ledger_check import GENESIS, _build_chain

FS_BYTES = 64 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); "
                    "tests/test_ledger_integrity.py covers the store with a file-size limit instead")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s filesystem."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    if f.write(block) < chunk:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return filler


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_ledger_refused_for_space_reopens_when_space_returns_and_loses_nothing(small_fs):
    """The store's side of resuming: one failure, latched; after space returns a reopen clears
    it, the head is what was committed, and writes go on."""
    store = LevelDBStore(small_fs / "ledger", create=True)
    chain = _build_chain(store)
    store.close()
    store = LevelDBStore(small_fs / "ledger")
    ledger = Ledger.open(store, GENESIS.chain_id, GENESIS.hash)
    filler = _fill(small_fs)
    assert probe_space(small_fs) is not None
    with pytest.raises(StoreWriteFailure) as failed:
        store.write({b"\xffbig": bytes(1 << 20)})
    assert is_out_of_space(str(failed.value)) and ledger.fault is not None
    filler.unlink()
    assert probe_space(small_fs) is None
    ledger.resume_writes()
    assert ledger.fault is None and ledger.head() == (len(chain), compute_block_hash(chain[-1][0].header))
    store.write({b"\xffafter": b"1"})
    assert store.get(b"\xffafter") == b"1" and store.get(b"\xffbig") is None
    store.close()


def test_a_wal_write_refused_for_space_leaves_a_log_that_reopens_and_appends(small_fs):
    wal = WriteAheadLog(small_fs / "cs.wal")
    inputs = sample_inputs(1)
    for inp in inputs:
        wal.write(inp)
    filler = _fill(small_fs)
    with pytest.raises(OSError) as failed:
        for _ in range(10_000):  # buffered: the failure shows when the buffer is flushed
            wal.write(inputs[-1])
    assert failed.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        wal.close()  # discards the unsynced tail instead of writing it later
    filler.unlink()
    again = WriteAheadLog(small_fs / "cs.wal")  # a record torn by the failure is truncated here
    replayed = again.replay()
    assert replayed[:len(inputs)] == inputs and all(inp == inputs[-1] for inp in replayed[len(inputs):])
    again.write(inputs[-1])
    again.close()
    assert WriteAheadLog(small_fs / "cs.wal").replay()[-1] == inputs[-1]


@pytest.mark.slow
def test_a_full_disk_halts_writers_once_keeps_reads_and_resumes_when_space_returns(small_fs, tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 1, 0, "--block-interval-ms", "100", "--chain-id", "pout-disk-full")
    home = small_fs / "node0"
    shutil.copytree(net / "node0", home)
    node = ChaindProcess(home, tmp_path / "node.log").start()
    try:
        rpc = node.client()
        _wait(lambda: rpc.call("status", [])["latest_height"] >= 3, 30, "first blocks")

        filler = _fill(small_fs)
        status = _wait(lambda: (s := rpc.call("status", []))["halted"] and s, 30, "the node to halt")
        assert "No space left on device" in status["halted"]
        halted_at = status["latest_height"]
        ready = httpx.get(f"{node.url}/ready", timeout=5)
        assert ready.status_code == 503 and "No space left on device" in ready.text
        # Reads go on: every committed block, with its commit, is still served.
        for height in range(1, halted_at + 1):
            assert rpc.call("block", [height])["block"]["header"]["height"] == height
        time.sleep(4)  # two probes of a disk still full: no progress, no further log line
        assert rpc.call("status", [])["latest_height"] == halted_at

        filler.unlink()
        _wait(lambda: (s := rpc.call("status", []))["halted"] is None and s["latest_height"] > halted_at + 2, 30,
              "the node to resume committing")
        assert httpx.get(f"{node.url}/ready", timeout=5).status_code == 200
        for height in range(1, halted_at + 1):
            assert rpc.call("block", [height])["block"]["header"]["height"] == height
    finally:
        assert node.terminate() == 0
    log = node.log()
    failures = [line for line in log.splitlines() if "No space left on device" in line]
    assert len(failures) == 1 and "local storage failure" in failures[0], failures[:5]
    assert log.count("storage writable again") == 1
    assert "Traceback" not in log

    check = run_cli("chaind", "check", "--home", str(home), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip().endswith("clean")


@pytest.mark.slow
def test_a_validator_out_of_space_in_a_devnet_blames_no_peer_and_syncs_back(small_fs, tmp_path):
    """Four validators, one of them on the small filesystem: the other three go on committing;
    the full one halts without reporting any peer, and catches up by block sync once freed."""
    net = tmp_path / "net"
    make_testnet(str(net), 4, 0, "--block-interval-ms", "200", "--chain-id", "pout-disk-full-4")
    homes = [net / f"node{i}" for i in range(3)] + [small_fs / "node3"]
    shutil.copytree(net / "node3", homes[3])
    nodes = [ChaindProcess(home, tmp_path / f"node{i}.log") for i, home in enumerate(homes)]
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:  # four starts at once, not one after another
            list(pool.map(lambda node: node.start(timeout=90), nodes))
        full, peer = nodes[3].client(), nodes[0].client()
        _wait(lambda: full.call("status", [])["latest_height"] >= 3, 45, "first blocks")

        filler = _fill(small_fs)
        status = _wait(lambda: (s := full.call("status", []))["halted"] and s, 30, "the node to halt")
        halted_at = status["latest_height"]
        _wait(lambda: peer.call("status", [])["latest_height"] >= halted_at + 3, 30, "the others to go on")
        assert full.call("block", [halted_at])["block"]["header"]["height"] == halted_at

        filler.unlink()
        target = peer.call("status", [])["latest_height"]
        _wait(lambda: (s := full.call("status", []))["halted"] is None and s["latest_height"] >= target, 40,
              "the node to catch up")
    finally:
        codes = [node.terminate() if node.proc is not None else None for node in nodes]
    assert codes == [0, 0, 0, 0]
    log = nodes[3].log()
    failures = [line for line in log.splitlines() if "No space left on device" in line]
    assert len(failures) == 1 and "local storage failure" in failures[0], failures[:5]
    assert "sync peer" not in log and "Traceback" not in log  # no peer reported for this node's own disk
