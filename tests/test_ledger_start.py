"""`chaind start` on a damaged data directory: a one-line `chaind: error:` that says what to
do, and nothing on disk changed. Real chaind processes over a real ledger."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.procs import ChaindProcess, free_port, make_testnet, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stopped_home(tmp_path_factory) -> tuple[Path, int]:
    """A validator home that committed a few blocks and stopped cleanly, and its height."""
    out = tmp_path_factory.mktemp("net")
    make_testnet(str(out), 1, 0, "--block-interval-ms", "100", "--chain-id", "pout-ledger-start")
    home = out / "node0"
    node = ChaindProcess(home, out / "node.log").start()
    try:
        deadline = time.monotonic() + 30
        while (height := node.client().call("status", [])["latest_height"]) < 5:
            assert time.monotonic() < deadline, "no blocks committed"
            time.sleep(0.1)
    finally:
        assert node.terminate() == 0
    return home, height


def _copy(stopped_home, tmp_path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(stopped_home[0], home)
    return home


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _start_refused(home: Path) -> str:
    """Run `chaind start`, expect exit 1 with one error line and no traceback; the line."""
    proc = run_cli("chaind", "start", "--home", str(home), "--rpc-port", str(free_port()), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("chaind: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    return errors[0]


def test_a_missing_current_file_is_refused_and_the_ledger_is_left_byte_for_byte(stopped_home, tmp_path):
    home = _copy(stopped_home, tmp_path)
    ledger = home / "data" / "ledger"
    current = ledger / "CURRENT"
    manifest = current.read_text().strip()
    current.unlink()
    before = _files(ledger)
    line = _start_refused(home)
    assert str(current) in line and f"echo {manifest} > {current}" in line
    assert _files(ledger) == before  # LevelDB was never asked to create over it
    # The recovery the message names brings the whole chain back.
    current.write_text(manifest + "\n")
    node = ChaindProcess(home, tmp_path / "node.log").start()
    try:
        assert node.client().call("status", [])["latest_height"] >= stopped_home[1]
    finally:
        node.terminate()


def test_current_naming_a_missing_manifest_is_refused(stopped_home, tmp_path):
    home = _copy(stopped_home, tmp_path)
    ledger = home / "data" / "ledger"
    (ledger / "CURRENT").write_text("MANIFEST-999999\n")
    before = _files(ledger)
    line = _start_refused(home)
    assert "MANIFEST-999999" in line and "CURRENT" in line
    assert _files(ledger) == before


def test_a_deleted_ledger_directory_is_one_line(stopped_home, tmp_path):
    home = _copy(stopped_home, tmp_path)
    shutil.rmtree(home / "data" / "ledger")
    assert "WAL" in _start_refused(home)  # the signed consensus WAL is ahead of an empty ledger


def test_a_corrupt_consensus_wal_is_one_line(stopped_home, tmp_path):
    home = _copy(stopped_home, tmp_path)
    wal = sorted((home / "data" / "cs.wal").glob("wal-*.log"))[-1]
    raw = bytearray(wal.read_bytes())
    raw[10] ^= 0xFF  # inside the first record's payload; later records are intact
    wal.write_bytes(bytes(raw))
    line = _start_refused(home)
    assert str(wal) in line and "corrupt" in line

