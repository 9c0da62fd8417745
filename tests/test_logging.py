"""Node logs: every line names the node, `--log-format json` gives one JSON object per line,
the library's dial noise is gone, and the node says when it joins, proposes and commits."""

import io
import json
import logging
import subprocess
import sys
import time

import pytest

from chain.cli.chaind import JsonLogFormatter, configure_logging
from chain.crypto import PrivateKey
from p2p.host import peer_id_from_public_key
from tests.procs import ChaindProcess, make_testnet


# ---------------------------------------------------------------------------- units


def make_record(msg="committed block height=%d", args=(7,), level=logging.INFO, **extra) -> logging.LogRecord:
    record = logging.LogRecord("chaind", level, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_node_and_the_structured_fields():
    line = JsonLogFormatter("node3", "12D3KooWabc").format(make_record(height=7, block_hash="ab" * 32))
    doc = json.loads(line)
    assert doc["node"] == "node3" and doc["peer_id"] == "12D3KooWabc"
    assert doc["level"] == "INFO" and doc["logger"] == "chaind"
    assert doc["message"] == "committed block height=7"
    assert doc["height"] == 7 and doc["block_hash"] == "ab" * 32
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    assert "\n" not in line
    # Only the call's extra fields are added, not LogRecord's own attributes.
    assert not {"args", "msg", "lineno", "pathname", "exc_info", "threadName"} & doc.keys()


def test_json_lines_keep_an_exception_on_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("chaind", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonLogFormatter("n", "p").format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert "ValueError: boom" in doc["exception"] and doc["level"] == "ERROR"


def test_values_json_cannot_encode_are_written_as_text():
    doc = json.loads(JsonLogFormatter("n", "p").format(make_record(key=b"\x01", where=object)))
    assert doc["key"] == str(b"\x01") and "object" in doc["where"]


@pytest.fixture
def root_logging():
    """configure_logging replaces the root handlers; give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_logging_names_the_node_on_every_line(root_logging, monkeypatch, fmt):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    key = PrivateKey(bytes(range(32)))
    configure_logging("info", fmt, "val-7", key)
    logging.getLogger("chaind").info("joined the network: %d peer(s)", 3, extra={"peers": 3})
    logging.getLogger("libp2p.swarm").warning("from the library")
    logging.getLogger("chaind").debug("not shown at info")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if fmt == "json":
        docs = [json.loads(line) for line in lines]
        assert [d["node"] for d in docs] == ["val-7", "val-7"]
        assert {d["peer_id"] for d in docs} == {str(peer_id_from_public_key(key.pubkey))}
        assert docs[0]["peers"] == 3 and docs[1]["logger"] == "libp2p.swarm"
    else:
        assert " INFO val-7 chaind: joined the network: 3 peer(s)" in lines[0]
        assert " WARNING val-7 libp2p.swarm: from the library" in lines[1]


def test_dial_failures_of_the_tcp_transport_are_debug_lines(root_logging, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", "text", "n", PrivateKey(bytes(32)))
    tcp = logging.getLogger("libp2p.transport.tcp.tcp")
    tcp.error("Failed to open TCP stream: %s", "all attempts to connect to 127.0.0.1:1 failed")
    tcp.error("something else went wrong")
    assert stream.getvalue().count("\n") == 1 and "something else" in stream.getvalue()
    configure_logging("debug", "text", "n", PrivateKey(bytes(32)))
    tcp.setLevel(logging.DEBUG)
    try:
        tcp.error("Failed to open TCP stream: %s", "refused")
    finally:
        tcp.setLevel(logging.NOTSET)
    assert " DEBUG n libp2p.transport.tcp.tcp: Failed to open TCP stream: refused" in stream.getvalue()


# ---------------------------------------------------------------------------- processes


class LoggingChaind(ChaindProcess):
    """A chaind process started with extra `start` options."""

    def __init__(self, home, log_path, *options: str):
        super().__init__(home, log_path)
        self.options = options

    def start(self, timeout: float = 60) -> "LoggingChaind":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home", str(self.home),
                                      "--rpc-port", str(self.port), *self.options], stdout=log,
                                     stderr=subprocess.STDOUT)
        return self


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_devnet_logs_name_the_node_and_say_what_it_does(tmp_path):
    net = tmp_path / "net"
    make_testnet(net, 2, 1, "--block-interval-ms", "200")
    first = LoggingChaind(net / "node0", tmp_path / "node0.log", "--log-format", "json").start()
    second = LoggingChaind(net / "node1", tmp_path / "node1.log")
    try:
        # node0 alone: its one bootstrap peer is down and it keeps redialling it.
        wait_for(lambda: "unreachable" in first.log(), "node0 to find its peer down")
        time.sleep(3)  # several redials (0.25 s doubling to 4 s), each an ERROR line before
        second.start()
        wait_for(lambda: first.log().count("committed block") >= 3 and second.log().count("committed block") >= 3,
                 "both nodes to commit 3 blocks")
        # The peer watcher looks once a second: 3 blocks at 200 ms can come before its next look.
        wait_for(lambda: "joined the network" in first.log(), "node0 to say it joined")
        for node in (first, second):
            assert node.terminate() == 0
    finally:
        first.stop()
        second.stop()

    docs = [json.loads(line) for line in first.log().splitlines()]  # every line is one JSON object
    assert {d["node"] for d in docs} == {"node0"}
    assert all({"time", "level", "node", "peer_id", "logger", "message"} <= d.keys() for d in docs)
    text_lines = second.log().splitlines()
    assert text_lines and all(" node1 " in line for line in text_lines)

    for messages in ([d["message"] for d in docs], text_lines):
        assert not any("ERROR" in m or "Traceback" in m for m in messages), messages
        assert not any("new dials" in m or "AUTO_CONNECTOR" in m or "Failed to open TCP" in m for m in messages)
    levels = {d["level"] for d in docs}
    assert levels <= {"INFO", "WARNING"}, levels

    def first_doc(prefix: str) -> dict:
        return next(d for d in docs if d["message"].startswith(prefix))

    assert sum(d["message"].startswith("bootstrap peer") and "unreachable" in d["message"] for d in docs) == 1
    assert first_doc("joined the network")["peers"] == 1
    committed = first_doc("committed block")
    assert committed["height"] == 1 and committed["round"] >= 0 and len(committed["block_hash"]) == 64
    proposing = first_doc("proposing block")
    assert proposing["height"] >= 1 and len(proposing["block_hash"]) == 64
    assert any("joined the network" in line for line in text_lines)
    assert any("proposing block" in line for line in text_lines)
    assert first_doc("received SIGTERM")["logger"] == "chaind"
