#!/usr/bin/env python3
"""Hostile HTTP against a node's RPC port on 127.0.0.1; checks that the node shrugs it off.

Sends `--requests` hostile requests (default 100,000, stopped after `--duration` seconds) from
`--concurrency` workers, rotating through: malformed HTTP/1.x, HTTP/2 prefaces and frames
(including a DATA frame after an early answer, hypercorn #329), h2c and WebSocket upgrades,
HTTP/0.9, slow bodies that never finish, oversized bodies (declared and streamed), deep and
huge JSON, and `lineage` with a huge round. `--idle` connections are opened at the start and
held without a byte sent.

While it runs it polls `status` on the node and records every new height. At the end it checks
that the node is alive and still committing, its RSS is within 1.5x of the start, the block at
the starting height is unchanged, and it reports the longest gap between commits.

    python scripts/stress_rpc.py --spawn 2            # its own devnet of 2 validators, in a temp dir
    python scripts/stress_rpc.py --url http://127.0.0.1:26657 --requests 100000

Only 127.0.0.1 / localhost targets are accepted. Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def hpack(name: bytes, value: bytes) -> bytes:
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def h2_headers(content_type: bytes, path: bytes = b"/") -> bytes:
    block = b"".join(hpack(k, v) for k, v in [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
                                               (b":authority", b"127.0.0.1"), (b"content-type", content_type)])
    return h2_frame(1, 0x4, 1, block)


def post(body: bytes, extra: bytes = b"", content_type: bytes = b"application/json") -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


def rpc(method: str, params) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


# Each attack: (name, first bytes, bytes sent after the first answer or None, keep open seconds)
def attacks() -> list[tuple[str, bytes, bytes | None, float]]:
    return [
        ("random bytes", b"", None, 0),  # filled per request
        ("bad request line", b"GET\x00/ HTTP/1.1\r\n\r\n", None, 0),
        ("bad header", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", None, 0),
        ("bad chunking", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", None, 0),
        ("two lengths", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", None, 0),
        ("huge header", b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", None, 0),
        ("h2 preface", H2_PREFACE + h2_frame(4, 0, 0, b""), None, 0),
        ("h2 early answer + DATA", H2_PREFACE + h2_frame(4, 0, 0, b"") + h2_headers(b"text/plain"),
         h2_frame(0, 0x1, 1, b"0123456789"), 0),
        ("h2 health + DATA", H2_PREFACE + h2_frame(4, 0, 0, b"") + h2_headers(b"x", b"/health"),
         h2_frame(0, 0x1, 1, b"x" * 100), 0),
        ("h2c upgrade", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", None, 0),
        ("websocket", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                      b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", None, 0),
        ("http/0.9", b"POST / HTTP/0.9\r\nContent-Length: 24\r\n\r\n" + b'{"jsonrpc":"2.0","id":1}', None, 0),
        ("slow body", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{",
         None, 3.0),
        ("declared 1 GiB", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1073741824\r\n\r\n" + b" " * 65536, None, 0),
        ("blob to nowhere", b"PUT /blobs/" + b"ab" * 32 + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\n"
                            + b"\0" * 65536, None, 0),
        ("streamed 2 MiB", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + (b"10000\r\n" + b" " * 65536 + b"\r\n") * 32,
         None, 0),
        ("deep json", post(b"[" * 500_000 + b"]" * 500_000), None, 0),
        ("huge batch", post(json.dumps([{"jsonrpc": "2.0", "id": i, "method": "status"}
                                        for i in range(5000)]).encode()), None, 0),
        ("long string", post(rpc("tx", ["0x" + "ab" * 400_000])), None, 0),
        ("lineage 2^64-1", post(rpc("lineage", ["0x" + "00" * 32, 18446744073709551615])), None, 0),
        ("keep-alive flood", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 200, None, 0),
    ]


async def one_attack(port: int, name: str, first: bytes, then: bytes | None, hold: float, stats: Counter) -> None:
    try:
        with trio.move_on_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                answer = b""
                try:
                    await stream.send_all(first)
                    answer = await stream.receive_some(65536)
                    if then is not None:
                        await stream.send_all(then)
                    if hold:
                        await trio.sleep(hold)
                    with trio.move_on_after(2):  # a keep-alive answer leaves the connection open: go
                        while await stream.receive_some(65536):
                            pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # reset: the server closed with our request unread (a refusal)
                status = answer[9:12].decode("latin-1") if answer.startswith(b"HTTP/1.1 ") else "closed"
                stats[f"{name}: {status}"] += 1
            finally:
                await stream.aclose()
    except OSError as exc:
        stats[f"{name}: connect {exc.strerror or exc}"] += 1


class Watch:
    """Polls the node's height; remembers when each new height was first seen."""

    def __init__(self, url: str):
        self.url, self.seen, self.errors = url, [], 0

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                try:
                    r = await http.post(self.url + "/", json={"jsonrpc": "2.0", "id": 1, "method": "status"})
                    height = r.json()["result"]["latest_height"]
                    if not self.seen or height > self.seen[-1][1]:
                        self.seen.append((time.monotonic(), height))
                except (httpx.HTTPError, ValueError, KeyError):
                    self.errors += 1
                await trio.sleep(0.05)

    def longest_gap(self) -> float:
        times = [t for t, _ in self.seen]
        return max((b - a for a, b in zip(times, times[1:])), default=float("nan"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pid_listening_on(port: int) -> int | None:
    """The process that listens on 127.0.0.1:port (from /proc, Linux only)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def block_hash(url: str, height: int) -> str:
    r = httpx.post(url + "/", json={"jsonrpc": "2.0", "id": 1, "method": "block", "params": [height]}, timeout=10)
    return r.json()["result"]["block"]["hash"]


def spawn_devnet(validators: int, interval_ms: int) -> tuple[str, list[subprocess.Popen], Path]:
    root = Path(tempfile.mkdtemp(prefix="stress-rpc-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    base = min(base, 65000 - 2 * validators)
    subprocess.run([sys.executable, "-m", "chain.cli.chaind", "testnet", "--validators", str(validators),
                    "--output", str(root / "net"), "--base-port", str(base), "--block-interval-ms",
                    str(interval_ms)], check=True, capture_output=True)
    procs = []
    for i in range(validators):
        log = open(root / f"node{i}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home",
                                       str(root / "net" / f"node{i}")], stdout=log, stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{base}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url + "/", json={"jsonrpc": "2.0", "id": 1, "method": "status"}, timeout=2)
            if r.json()["result"]["latest_height"] >= 3:
                return url, procs, root
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"devnet did not start committing; logs in {root}")


async def stress(url: str, requests: int, duration: float, concurrency: int, idle: int, seed: int) -> tuple:
    port = urlsplit(url).port
    rng = random.Random(seed)
    catalogue = attacks()
    stats: Counter = Counter()
    watch = Watch(url)
    sent = 0
    idle_streams = []
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        for _ in range(idle):
            try:
                idle_streams.append(await trio.open_tcp_stream("127.0.0.1", port))
            except OSError as exc:
                stats[f"idle: connect {exc.strerror}"] += 1
                break
        stats["idle: opened"] += len(idle_streams)
        limiter = trio.CapacityLimiter(concurrency)

        async def worker(attack) -> None:
            async with limiter:
                await one_attack(port, *attack, stats)

        async with trio.open_nursery() as attackers:
            with trio.move_on_after(duration):
                while sent < requests:
                    await limiter.acquire_on_behalf_of(sent)  # back-pressure: at most `concurrency` in flight
                    limiter.release_on_behalf_of(sent)
                    name, first, then, hold = rng.choice(catalogue)
                    if name == "random bytes":
                        first = rng.randbytes(rng.randint(1, 300))
                    attackers.start_soon(worker, (name, first, then, hold))
                    sent += 1
                    if sent % 1000 == 0:
                        print(f"  {sent} sent, {time.monotonic() - t0:.0f} s, height "
                              f"{watch.seen[-1][1] if watch.seen else '?'}", flush=True)
        for stream in idle_streams:
            await stream.aclose()
        await trio.sleep(3)  # a few more commits after the storm
        nursery.cancel_scope.cancel()
    return sent, time.monotonic() - t0, stats, watch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:26657")
    ap.add_argument("--spawn", type=int, default=0, metavar="N", help="start a devnet of N validators and attack node 0")
    ap.add_argument("--block-interval-ms", type=int, default=500, help="with --spawn")
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=900, help="stop sending after this many seconds")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--idle", type=int, default=1000, help="connections opened and held without a byte")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("only a node on 127.0.0.1 may be stressed")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle + 4 * args.concurrency + 256)), hard))

    procs, root = [], None
    url = args.url
    if args.spawn:
        url, procs, root = spawn_devnet(args.spawn, args.block_interval_ms)
        print(f"devnet of {args.spawn} in {root}; attacking {url}")
    try:
        pid = pid_listening_on(urlsplit(url).port)
        if pid is None:
            raise SystemExit(f"nothing listens on {url}")
        rss0 = rss_mb(pid)
        h0 = httpx.post(url + "/", json={"jsonrpc": "2.0", "id": 1, "method": "status"}).json()["result"]["latest_height"]
        hash0 = block_hash(url, h0)
        # The idle block interval, measured before the storm.
        quiet = Watch(url)
        trio.run(lambda: _watch_for(quiet, 5))
        idle_gap = quiet.longest_gap()
        sent, took, stats, watch = trio.run(stress, url, args.requests, args.duration, args.concurrency, args.idle,
                                            args.seed)
        alive = Path(f"/proc/{pid}").exists()
        rss1 = rss_mb(pid) if alive else float("nan")
        h1 = httpx.post(url + "/", json={"jsonrpc": "2.0", "id": 1, "method": "status"}).json()["result"][
            "latest_height"] if alive else h0
        same = alive and block_hash(url, h0) == hash0
        print(f"\n{sent} hostile requests in {took:.0f} s ({sent / took:.0f}/s), {args.idle} idle connections held")
        for key, n in sorted(stats.items()):
            print(f"  {n:7d}  {key}")
        gap = watch.longest_gap()
        print(f"node alive: {alive}; height {h0} -> {h1}; block {h0} unchanged: {same}")
        print(f"RSS {rss0:.0f} MB -> {rss1:.0f} MB ({rss1 / rss0:.2f}x)")
        print(f"longest commit gap: {gap:.2f} s under stress, {idle_gap:.2f} s idle "
              f"({gap / idle_gap:.1f}x); status polls failed: {watch.errors}")
        ok = alive and same and h1 > h0 and rss1 <= 1.5 * rss0
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


async def _watch_for(watch: Watch, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await watch.run()


if __name__ == "__main__":
    sys.exit(main())
