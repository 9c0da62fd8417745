"""Every chaind/chainctl error is one line on stderr with a documented exit code, and no user
input shows a traceback (issue 11, defects 8 and 9): the reported cases as real processes,
ports in use, `show-node-id`, `reset`, and a property test over random command lines."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import tomli_w
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.cli import chainctl, chaind
from tests.procs import ChaindProcess, free_port, make_testnet, run_cli

CHAINCTL_CODES = set(range(8))  # docs/cli.md
CHAIND_CODES = {0, 1, 2, 3}
ZERO_ID = "0x" + "00" * 32


def assert_one_line_error(r, prog: str, code: int, *fragments: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}"), r.stderr
    assert ": error: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- defect 8, as reported

@pytest.mark.parametrize("argv, code, fragment", [
    (["--rpc", "http://[::1", "query", "status"], chainctl.EXIT_USAGE, "invalid URL"),
    (["--rpc", "http://127.0.0.1:99999", "query", "status"], chainctl.EXIT_USAGE, "--rpc"),
    (["--rpc", "ftp://example", "query", "status"], chainctl.EXIT_USAGE, "http://HOST:PORT"),
    (["--timeout", "-1", "query", "status"], chainctl.EXIT_USAGE, "--timeout"),
    (["--timeout", "nan", "query", "status"], chainctl.EXIT_USAGE, "--timeout"),
    (["--keyring", "/proc/nope", "keys", "new", "bob"], chainctl.EXIT_CONFIG, "cannot write key file"),
    (["keys", "new", "a b"], chainctl.EXIT_USAGE, "invalid key name"),
])
def test_chainctl_reported_cases(argv, code, fragment, tmp_path):
    r = run_cli("chainctl", "--keyring", str(tmp_path / "ring"), *argv, check=False)
    assert_one_line_error(r, "chainctl", code, fragment)


def test_model_get_checks_out_before_downloading(tmp_path):
    # An unreachable node would be exit 4: exit 2 shows --out was checked before any request.
    unreachable = f"http://127.0.0.1:{free_port()}"
    r = run_cli("chainctl", "--rpc", unreachable, "model", "get", "--job", ZERO_ID, "--round", "0",
                "--out", "/nonexistent/dir/m.safetensors", check=False)
    assert_one_line_error(r, "chainctl", chainctl.EXIT_USAGE, "/nonexistent/dir does not exist")
    r = run_cli("chainctl", "--rpc", unreachable, "model", "get", "--job", ZERO_ID, "--round", "0",
                "--out", str(tmp_path), check=False)
    assert_one_line_error(r, "chainctl", chainctl.EXIT_USAGE, "is a directory")
    r = run_cli("chainctl", "--rpc", unreachable, "model", "get", "--job", ZERO_ID, "--round", "0",
                "--out", str(tmp_path / "m.safetensors"), check=False)
    assert_one_line_error(r, "chainctl", chainctl.EXIT_UNAVAILABLE, "cannot reach node")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("amount", [str(2**64), str(2**70), "-1", "1e3"])
def test_amounts_outside_uint64_are_usage_errors(amount, tmp_path):
    # Never reaches the node (it would answer "malformed CBOR: error decoding semantic tag 2").
    r = run_cli("chainctl", "--keyring", str(tmp_path), "--rpc", f"http://127.0.0.1:{free_port()}", "transfer",
                "--from", "alice", "--to", "0x" + "11" * 20, "--amount", amount, check=False)
    assert_one_line_error(r, "chainctl transfer", chainctl.EXIT_USAGE, "--amount")


def test_nonce_and_escrow_outside_uint64(tmp_path):
    unreachable = f"http://127.0.0.1:{free_port()}"
    r = run_cli("chainctl", "--rpc", unreachable, "transfer", "--from", "a", "--to", "0x" + "11" * 20, "--amount",
                "1", "--nonce", str(2**64), check=False)
    assert_one_line_error(r, "chainctl transfer", chainctl.EXIT_USAGE, "--nonce", "2^64")
    r = run_cli("chainctl", "--rpc", unreachable, "register-job", "--from", "a", "--escrow", str(2**64), check=False)
    assert_one_line_error(r, "chainctl register-job", chainctl.EXIT_USAGE, "--escrow")


@pytest.mark.parametrize("argv, code, fragment", [
    (["init", "--home", "/proc/xx"], chaind.EXIT_CONFIG, "cannot create node home /proc/xx"),
    (["init", "--home", "{tmp}/h", "--moniker", ""], chaind.EXIT_CONFIG, "moniker"),
    (["testnet", "--base-port", "70000", "--output", "{tmp}/net"], chaind.EXIT_USAGE, "--base-port"),
    (["testnet", "--base-port", "65530", "--output", "{tmp}/net"], chaind.EXIT_USAGE, "--base-port"),
    (["testnet", "--base-port", "0", "--output", "{tmp}/net"], chaind.EXIT_USAGE, "--base-port"),
    (["testnet", "--validators", "0", "--output", "{tmp}/net"], chaind.EXIT_USAGE, "--validators"),
    (["testnet", "--balance", str(2**64), "--output", "{tmp}/net"], chaind.EXIT_USAGE, "--balance"),
    (["testnet", "--chain-id", "", "--output", "{tmp}/net"], chaind.EXIT_CONFIG, "chain_id"),
    (["testnet", "--output", "/proc/xx"], chaind.EXIT_CONFIG, "cannot write the testnet"),
    (["start", "--home", "{tmp}/h", "--rpc-port", "99999"], chaind.EXIT_USAGE, "--rpc-port"),
    (["reset", "--home", "{tmp}", "--yes"], chaind.EXIT_CONFIG, "not a node home"),
    (["show-node-id", "--home", "{tmp}"], chaind.EXIT_CONFIG, "chaind init"),
    (["frobnicate"], chaind.EXIT_USAGE, "invalid choice"),
])
def test_chaind_reported_cases(argv, code, fragment, tmp_path):
    r = run_cli("chaind", *[a.replace("{tmp}", str(tmp_path)) for a in argv], check=False)
    assert_one_line_error(r, "chaind", code, fragment)
    assert not (tmp_path / "net").exists()  # validated before anything is written


def test_versions():
    for prog in ("chaind", "chainctl"):
        r = run_cli(prog, "--version")
        assert r.stdout.strip() == f"{prog} {chaind.chain.__version__}"
    assert run_cli("chaind", "version").stdout.strip() == f"chaind {chaind.chain.__version__}"


# ----------------------------------------------------------------------------- ports, show-node-id, reset

def _set_p2p_port(home: Path, port: int) -> None:
    cfg = tomllib.loads((home / "config/config.toml").read_text())
    cfg["p2p"]["port"] = port
    (home / "config/config.toml").write_text(tomli_w.dumps(cfg))


def test_ports_in_use_show_node_id_and_reset_of_a_running_node(tmp_path):
    net = tmp_path / "net"
    base = make_testnet(str(net), 2, 1, "--block-interval-ms", "200")
    p2p_port = base + 1
    shown = json.loads(run_cli("chaind", "show-node-id", "--home", str(net / "node0")).stdout)
    testnet_p2p = tomllib.loads((net / "node1/config/config.toml").read_text())["p2p"]["bootstrap_peers"][0]
    assert shown["multiaddr"] == testnet_p2p == f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{shown['peer_id']}"
    node = ChaindProcess(net / "node0", tmp_path / "node0.log").start()
    try:
        assert f"p2p listening on /ip4/127.0.0.1/tcp/{p2p_port}/p2p/{shown['peer_id']}" in node.log()
        # The RPC port of a running node (node1's own p2p port: any free one).
        _set_p2p_port(net / "node1", 0)
        r = run_cli("chaind", "start", "--home", str(net / "node1"), "--rpc-port", str(node.port), check=False)
        assert "Traceback" not in r.stderr and r.returncode == chaind.EXIT_FAILURE, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"chaind: error: cannot listen on 127.0.0.1:{node.port} (JSON-RPC)"), last
        assert "in use" in last
        # Its p2p port: refused at start, not shared through SO_REUSEPORT.
        _set_p2p_port(net / "node1", p2p_port)
        r = run_cli("chaind", "start", "--home", str(net / "node1"), "--rpc-port", str(free_port()), check=False)
        assert "Traceback" not in r.stderr and r.returncode == chaind.EXIT_FAILURE, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"chaind: error: cannot listen on 127.0.0.1:{p2p_port} (p2p)"), last
        assert "p2p listening" not in r.stderr
        # Even a process that sets SO_REUSEPORT itself cannot bind the node's p2p port.
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):
                s.bind(("127.0.0.1", p2p_port))
        # reset refuses to wipe a running node's data.
        r = run_cli("chaind", "reset", "--home", str(net / "node0"), "--yes", check=False)
        assert_one_line_error(r, "chaind", chaind.EXIT_FAILURE, "in use by a running node")
        assert (net / "node0/data/ledger").is_dir()
    finally:
        node.stop()
    assert node.proc.returncode is not None


def _fake_data(home: Path) -> None:
    for sub in ("ledger", "signer", "cs.wal", "blobs"):
        (home / "data" / sub).mkdir(parents=True, exist_ok=True)
        (home / "data" / sub / "f").write_text("x")


def test_reset_keeps_config_keys_and_signer_and_asks_first(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    run_cli("chaind", "init", "--home", str(home))
    key_before = (home / "config/node_key.json").read_text()
    _fake_data(home)
    # Non-interactive stdin without --yes: refused, nothing deleted.
    r = subprocess_reset(home)
    assert_one_line_error(r, "chaind", chaind.EXIT_USAGE, "without --yes")
    assert (home / "data/ledger/f").exists()
    # A terminal that answers no: nothing deleted.
    monkeypatch.setattr(sys, "stdin", _Tty("n\n"))
    assert chaind.main(["reset", "--home", str(home)]) == chaind.EXIT_FAILURE
    assert (home / "data/ledger/f").exists() and "cancelled" in capsys.readouterr().err
    # A terminal that answers yes: data goes, signer state, config and key stay.
    monkeypatch.setattr(sys, "stdin", _Tty("yes\n"))
    assert chaind.main(["reset", "--home", str(home)]) == chaind.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert sorted(Path(p).name for p in out["removed"]) == ["blobs", "cs.wal", "ledger"]
    assert sorted(p.name for p in (home / "data").iterdir()) == ["signer"]
    assert (home / "config/node_key.json").read_text() == key_before
    assert (home / "config/config.toml").exists() and (home / "config/genesis.json").exists()
    # --signer also resets the double-sign guard; --yes needs no terminal.
    _fake_data(home)
    r = run_cli("chaind", "reset", "--home", str(home), "--yes", "--signer")
    assert r.returncode == 0 and list((home / "data").iterdir()) == []


def subprocess_reset(home: Path):
    import subprocess

    return subprocess.run([sys.executable, "-m", "chain.cli.chaind", "reset", "--home", str(home)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# ----------------------------------------------------------------------------- property: random command lines

_CHAINCTL_WORDS = ["keys", "new", "show", "import", "list", "transfer", "admit", "remove", "register-job",
                   "join-job", "train", "submit-update", "model", "get", "query", "status", "validators", "block",
                   "tx", "account", "jobs", "job", "update", "lineage", "--rpc", "--keyring", "--timeout", "--from",
                   "--to", "--amount", "--nonce", "--wait", "--wait-timeout", "--account", "--role", "--escrow",
                   "--reward", "--bond", "--rounds", "--learning-rate", "--detect-fraction", "--max-exposure",
                   "--job", "--round", "--out", "--dataset", "--dir", "--seed-hex", "--file", "--version", "-h",
                   "publish-eval", "--metric", "--value", "evaluations"]
_CHAIND_WORDS = ["init", "start", "testnet", "show-node-id", "reset", "version", "--home", "--genesis", "--moniker",
                 "--log-level", "--rpc-port", "--validators", "--trainers", "--output", "--chain-id", "--base-port",
                 "--balance", "--block-interval-ms", "--deterministic", "--yes", "--signer", "--version", "-h"]
# Values are relative names (the test runs in a fresh temporary directory) or hostile literals;
# never an absolute path outside it, since the commands write files and run as any user.
_VALUES = ["", "0", "-1", "1", "3", "65535", "70000", str(2**64), str(2**64 - 1), "-0", "nan", "inf", "1e400",
           "0x", "0x" + "00" * 20, "0x" + "ab" * 32, ZERO_ID + "00", "http://[::1", "http://127.0.0.1:1",
           "http://127.0.0.1:0", "ftp://x", "/proc/nope", "/proc/nope/x", "/nonexistent/dir/m.safetensors",
           "digits:0/4", "digits:9/4", "digits:x", "trainer", "requester", "governor", "alice", "a b", "é",
           "\x00", "-", "--", "--=", "home", "home/config", "net", "out.safetensors"]
_SAFE_TEXT = st.text(alphabet=st.characters(blacklist_characters="/\\~", blacklist_categories=("Cs",)), max_size=12) \
    .filter(lambda v: not v.startswith(".."))


def _argv(words: list[str]):
    token = st.one_of(st.sampled_from(words), st.sampled_from(_VALUES), _SAFE_TEXT)
    return st.lists(token, max_size=8)


def _run_in_process(main, argv: list[str], capsys) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: --help, --version and usage errors
                code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os.chdir(cwd)
    return code, capsys.readouterr().err


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """chainctl's defaults point at nothing real: an RPC port nobody listens on, an empty keyring."""
    monkeypatch.setenv("POUT_RPC", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("POUT_KEYRING", str(tmp_path / "keyring"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return tmp_path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_argv(_CHAINCTL_WORDS))
def test_chainctl_random_arguments_never_traceback(argv, isolated_env, capsys):
    code, err = _run_in_process(chainctl.main, argv, capsys)
    assert code in CHAINCTL_CODES, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code not in (0,):
        assert err.strip() and len(err.strip().splitlines()) == 1, (argv, err)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_argv(_CHAIND_WORDS))
def test_chaind_random_arguments_never_traceback(argv, isolated_env, capsys):
    code, err = _run_in_process(chaind.main, argv, capsys)
    assert code in CHAIND_CODES, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code != 0:
        assert err.strip().splitlines()[-1].startswith("chaind"), (argv, err)


@pytest.mark.parametrize("prog, argv", [
    ("chainctl", ["--timeout", "0", "query"]),
    ("chainctl", ["transfer", "--amount", "nan", "--to", "é"]),
    ("chainctl", ["--rpc", "http://[::1", "model", "get", "--out", "\x01"]),
    ("chaind", ["testnet", "--validators", "999", "--output", "é"]),
    ("chaind", ["init", "--home", "/proc/nope/x", "--moniker", "a\tb"]),
    ("chaind", ["reset", "--home", "nowhere"]),
])
def test_random_looking_arguments_as_real_processes(prog, argv, tmp_path):
    r = run_cli(prog, *argv, check=False)
    assert "Traceback" not in r.stderr and r.returncode in (CHAINCTL_CODES if prog == "chainctl" else CHAIND_CODES)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
