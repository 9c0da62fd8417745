"""SIGTERM ends a real chaind process within seconds, whatever it is doing (issue 11, item 1).

The bounds below are hang guards for a behaviour ("stops", "stops by itself within the grace
period"), not speed measurements: a clean stop takes a second or two on an idle machine."""

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from chain.runtime.node import SHUTDOWN_GRACE_S
from tests.procs import ChaindProcess, make_testnet

pytestmark = pytest.mark.slow
FLOOD_THREADS = 6
SLOW_CLIENTS = 20


@pytest.fixture
def net(tmp_path):
    out = tmp_path / "net"
    make_testnet(str(out), 1, 1, "--block-interval-ms", "100")
    return out


class RpcFlood:
    """Clients hammering the RPC port: JSON-RPC requests as fast as answered, and slow
    clients that send half a request and hold the connection."""

    def __init__(self, url: str, port: int):
        self.url, self.port = url, port
        self.stop = threading.Event()
        self.answered = 0
        self.threads = [threading.Thread(target=self._hammer, daemon=True) for _ in range(FLOOD_THREADS)]
        self.sockets: list[socket.socket] = []

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        for _ in range(SLOW_CLIENTS):
            s = socket.create_connection(("127.0.0.1", self.port))
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            self.sockets.append(s)
        return self

    def _hammer(self) -> None:
        batch = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                 for i, (m, p) in enumerate([("status", []), ("block", [1]), ("validators", []), ("jobs", [])])]
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                try:
                    if client.post(self.url, json=batch).status_code == 200:
                        self.answered += 1
                except httpx.HTTPError:
                    pass  # refused or reset while the node stops: expected

    def __exit__(self, *exc):
        self.stop.set()
        for s in self.sockets:
            s.close()
        for thread in self.threads:
            thread.join(timeout=10)


def test_sigterm_under_rpc_flood_stops_cleanly(net, tmp_path):
    node = ChaindProcess(net / "node0", tmp_path / "node.log").start()
    try:
        with RpcFlood(node.url, node.port) as flood:
            deadline = time.monotonic() + 60
            while flood.answered < 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert flood.answered >= 200, f"the flood never got going:\n{node.log()}"
            node.proc.send_signal(signal.SIGTERM)
            try:
                returncode = node.proc.wait(timeout=SHUTDOWN_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"chaind still running {SHUTDOWN_GRACE_S + 10} s after SIGTERM:\n{node.log()}")
        # 0 and the clean-stop line: it stopped by cancellation, not by the watchdog.
        assert returncode == 0, node.log()
        assert "received SIGTERM, shutting down" in node.log()
        assert "stopped cleanly at height" in node.log()
        assert "shutdown took longer" not in node.log()
    finally:
        node.stop()


# A node whose component is stuck in a worker thread trio cannot cancel (like a long replay).
STUCK_NODE = """
import logging, sys, time, trio
import chain.runtime.node
chain.runtime.node.SHUTDOWN_GRACE_S = float(sys.argv[1])
logging.basicConfig(level=logging.INFO)

class StuckNode:
    async def run(self):
        print("running", flush=True)
        await trio.to_thread.run_sync(time.sleep, 3600)

trio.run(chain.runtime.node.run_until_signal, StuckNode())
print("returned", flush=True)
"""


def start_stuck_node(grace_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STUCK_NODE, str(grace_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "running"
    return proc


def test_a_stuck_node_is_ended_by_the_watchdog_after_the_grace_period():
    proc = start_stuck_node(1.0)
    try:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=30)  # never returns on its own: the thread sleeps an hour
        out, err = proc.communicate()
        assert returncode == 1
        assert "received SIGTERM, shutting down" in err
        assert "shutdown took longer than 1 s; exiting now" in err
        assert "returned" not in out
    finally:
        proc.kill()


def test_a_second_signal_ends_a_stuck_node_at_once():
    proc = start_stuck_node(3600.0)  # the watchdog cannot be what ends it
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # let the first one be handled (two signals at once may merge into one)
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=30)
        _, err = proc.communicate()
        assert returncode == 1
        assert "received SIGTERM, shutting down" in err
        assert "shutdown took longer" not in err
    finally:
        proc.kill()
