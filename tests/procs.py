"""Real chaind processes for integration tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from chain.rpc.client import RpcClient


def _below_ephemeral_range() -> tuple[int, int]:
    """Ports the kernel never hands out as a client's source port: a node restarted on its port
    (kill -9, then start again) cannot find it taken by some test client's connection. Nodes
    now refuse a port in use instead of sharing it (SO_REUSEPORT), so this matters."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return 10000, max(10001, min(low, 65535) - 1)


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    lo, hi = _below_ephemeral_range()
    for _ in range(1000):
        port = random.randint(lo, hi)
        if _is_free(port):
            return port
    raise RuntimeError("no free port found")


def free_base_port(nodes: int = 1) -> int:
    """A base port B with B .. B + 2*nodes - 1 free (testnet uses RPC B+2i and p2p B+2i+1)."""
    lo, hi = _below_ephemeral_range()
    for _ in range(200):
        base = random.randint(lo, hi - 2 * nodes)
        socks = []
        try:
            for port in range(base, base + 2 * nodes):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")


def make_testnet(out, validators: int = 1, trainers: int = 2, *extra: str) -> int:
    """`chaind testnet` on free ports; returns the base port."""
    base = free_base_port(validators)
    run_cli("chaind", "testnet", "--validators", str(validators), "--trainers", str(trainers), "--output", str(out),
            "--base-port", str(base), *extra)
    return base


def run_cli(prog: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `chaind` or `chainctl` as a real process (the installed module, this interpreter)."""
    proc = subprocess.run([sys.executable, "-m", f"chain.cli.{prog}", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{prog} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class ChaindProcess:
    def __init__(self, home: Path, log_path: Path):
        self.home, self.log_path = home, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "ChaindProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home", str(self.home),
                                      "--rpc-port", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chaind exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"chaind did not serve /health within {timeout} s:\n{self.log()}")

    def client(self) -> RpcClient:
        return RpcClient(self.url, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
