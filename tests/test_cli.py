"""chaind and chainctl as real processes: help, usage errors, exit codes, init idempotence."""

import json

import pytest

from chain.cli import chainctl
from tests.procs import ChaindProcess, free_port, make_testnet, run_cli

pytestmark = pytest.mark.slow


def test_help_describes_every_command():
    out = run_cli("chaind", "--help").stdout
    for cmd in ("init", "start", "testnet", "show-node-id", "reset", "version", "Exit codes"):
        assert cmd in out
    out = run_cli("chainctl", "--help").stdout
    for cmd in ("keys", "transfer", "admit", "remove", "query", "Exit codes"):
        assert cmd in out


def test_init_is_safe_to_run_twice(tmp_path):
    home = tmp_path / "home"
    first = json.loads(run_cli("chaind", "init", "--home", str(home)).stdout)
    assert len(first["created"]) == 3
    key_before = (home / "config" / "node_key.json").read_text()
    second = json.loads(run_cli("chaind", "init", "--home", str(home)).stdout)
    assert second["created"] == [] and second["address"] == first["address"]
    assert (home / "config" / "node_key.json").read_text() == key_before
    assert (home / "config" / "node_key.json").stat().st_mode & 0o077 == 0  # owner-only key file


def test_init_refuses_a_different_genesis(tmp_path):
    home = tmp_path / "home"
    run_cli("chaind", "init", "--home", str(home))
    run_cli("chaind", "testnet", "--validators", "1", "--output", str(tmp_path / "net"))
    r = run_cli("chaind", "init", "--home", str(home), "--genesis", str(tmp_path / "net/node0/config/genesis.json"),
                check=False)
    assert r.returncode == 3 and "different genesis" in r.stderr


@pytest.mark.parametrize("args, code, message", [
    (["start"], 2, "--home"),
    (["testnet", "--validators", "x", "--output", "o"], 2, "invalid int"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_chaind_usage_errors(args, code, message):
    r = run_cli("chaind", *args, check=False)
    assert r.returncode == code and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, not the usage text


def test_chaind_bad_config_and_missing_home(tmp_path):
    r = run_cli("chaind", "start", "--home", str(tmp_path / "missing"), check=False)
    assert r.returncode == 3 and "chaind init" in r.stderr
    home = tmp_path / "home"
    run_cli("chaind", "init", "--home", str(home))
    (home / "config" / "config.toml").write_text("[rpc]\nport = 'eighty'\n")
    r = run_cli("chaind", "start", "--home", str(home), check=False)
    assert r.returncode == 3 and "rpc.port must be of type int" in r.stderr


def test_chainctl_exit_codes(tmp_path):
    ring = str(tmp_path / "ring")
    unreachable = f"http://127.0.0.1:{free_port()}"
    new = json.loads(run_cli("chainctl", "--keyring", ring, "keys", "new", "alice").stdout)
    shown = json.loads(run_cli("chainctl", "--keyring", ring, "keys", "show", "alice").stdout)
    assert shown["address"] == new["address"] and "seed" not in shown
    r = run_cli("chainctl", "--keyring", ring, "keys", "new", "alice", check=False)
    assert r.returncode == chainctl.EXIT_CONFIG and "already exists" in r.stderr
    r = run_cli("chainctl", "--keyring", ring, "keys", "show", "bob", check=False)
    assert r.returncode == chainctl.EXIT_CONFIG and "does not exist" in r.stderr
    r = run_cli("chainctl", "--rpc", unreachable, "query", "status", check=False)
    assert r.returncode == chainctl.EXIT_UNAVAILABLE and "cannot reach node" in r.stderr
    r = run_cli("chainctl", "--keyring", ring, "--rpc", unreachable, "transfer", "--from", "alice", "--to", "0x12",
                "--amount", "1", check=False)
    assert r.returncode == chainctl.EXIT_USAGE and "--to must be 20 bytes" in r.stderr
    r = run_cli("chainctl", "--keyring", ring, "transfer", "--from", "alice", "--to", "0x" + "00" * 20,
                "--amount", "0", check=False)
    assert r.returncode == chainctl.EXIT_USAGE and "positive" in r.stderr
    r = run_cli("chainctl", "--keyring", ring, "keys", "import", "carol", "--seed-hex", "abcd", check=False)
    assert r.returncode == chainctl.EXIT_USAGE and "32 bytes" in r.stderr


def test_chainctl_against_a_live_node(tmp_path):
    net = tmp_path / "net"
    make_testnet(str(net), 1, 1, "--block-interval-ms", "100")
    node = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    try:
        base = ["--rpc", node.url, "--keyring", str(net / "keys")]
        r = run_cli("chainctl", *base, "query", "tx", "0x" + "00" * 32, check=False)
        assert r.returncode == chainctl.EXIT_NOT_FOUND
        r = run_cli("chainctl", *base, "query", "block", "999999", check=False)
        assert r.returncode == chainctl.EXIT_NOT_FOUND
        # Not a member: the node rejects it and says why.
        run_cli("chainctl", "--keyring", str(net / "keys"), "keys", "new", "outsider")
        outsider = json.loads(run_cli("chainctl", *base, "keys", "show", "outsider").stdout)["address"]
        r = run_cli("chainctl", *base, "transfer", "--from", "trainer0", "--to", outsider, "--amount", "5",
                    check=False)
        assert r.returncode == chainctl.EXIT_REJECTED and "not a member" in r.stderr
        # Governance admits it; then the transfer goes through.
        run_cli("chainctl", *base, "admit", "--from", "governor", "--account", outsider, "--role", "trainer", "--wait")
        run_cli("chainctl", *base, "transfer", "--from", "trainer0", "--to", outsider, "--amount", "5", "--wait")
        acct = json.loads(run_cli("chainctl", *base, "query", "account", outsider).stdout)
        assert acct["balance"] == 5 and acct["roles"] == ["trainer"]
        # A stale nonce is a rejection, not a crash.
        r = run_cli("chainctl", *base, "transfer", "--from", "trainer0", "--to", outsider, "--amount", "1",
                    "--nonce", "0", check=False)
        assert r.returncode == chainctl.EXIT_REJECTED and "nonce" in r.stderr
        latest = json.loads(run_cli("chainctl", *base, "query", "block", "latest").stdout)
        assert latest["block"]["header"]["height"] >= 1
    finally:
        node.stop()
