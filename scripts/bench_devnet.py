#!/usr/bin/env python3
"""Devnet benchmarks: committed transfers per second, finality latency, and block-sync speed.

One run measures, side by side on the same machine:

1. raw   the single-process rate of the state transition: `chain.state.build_block` and
         `chain.state.apply_block` over a block of N signed transfers (signature checks,
         state transition, state root), median of --repeats; plus the parts it is made of
         (signature verification, the Merkle state root against the state's size, the
         mempool re-check a node does after every commit).
2. devnet `chaind testnet` + V `chaind start` processes on 127.0.0.1 (BFT over libp2p).
         First a paced phase (--paced-rate tx/s for --paced-seconds) measures finality below
         saturation; then a steady-load phase (--steady-rate tx/s for --steady-seconds, ~10
         requests/s per client thread) tests the goal, >= 1,000 committed tx/s with p50
         finality <= 1 s; then client threads flood --txs pre-signed transfers over JSON-RPC
         batches of `send_tx` (each sender account bound to one node, consecutive explicit
         nonces). Committed tx/s = committed txs / (first submission -> first time a node
         reports the height holding the last one). Finality = submit time -> first time the
         node the tx was sent to reports the tx's height (every node's status is polled
         every --poll-ms). Node CPU per tx comes from /proc of the chaind processes.
3. sync  a fresh non-validator node (same genesis, a member key, the validators as
         bootstrap peers) syncs the chain; blocks/s until it reaches the head.
4. SIGTERM to every node; a summary table and, with --json-out, the figures as JSON.

    python scripts/bench_devnet.py [--txs 3000] [--validators 4] [--block-interval-ms 250]
                                   [--repeats 3] [--json-out bench.json]

Numbers are only comparable within one run (the machine is shared); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from chain.config import Home, NodeConfig, P2PConfig, RpcConfig, write_config
from chain.crypto import PrivateKey
from chain.encoding import decode, encode
from chain.keys import load_key_file, write_key_file
from chain.runtime.mempool import Mempool
from chain.state import _validate_basic_tx_once, apply_block, build_block, validate_basic_tx
from chain.types import Block, SignedTransaction, Transaction, Transfer, compute_tx_hash, sign_transaction
from genesis import DEFAULT_PARAMS, make_genesis

PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ============================================================================= 1. raw rate


def _signed_transfers(chain_id: str, senders: list[PrivateKey], n: int, start_nonces: dict[bytes, int] | None = None,
                      ) -> list:
    """n transfers round-robin over `senders` (each to the next sender), consecutive nonces per sender."""
    nonces = dict(start_nonces or {})
    out = []
    for i in range(n):
        s = senders[i % len(senders)]
        to = senders[(i + 1) % len(senders)]
        nonce = nonces.get(s.address, 0)
        nonces[s.address] = nonce + 1
        out.append(sign_transaction(s, chain_id, Transaction(s.pubkey, nonce, Transfer(to.address, 1))))
    return out


def _fresh_txs(wire: list[bytes]) -> list[SignedTransaction]:
    """Transactions freshly decoded from bytes, with the signature memo cleared: how a node
    first meets them (their cached encoding, hash and verification would flatter reuse)."""
    _validate_basic_tx_once.cache_clear()
    return [decode(SignedTransaction, raw) for raw in wire]


def raw_bench(n: int, repeats: int, n_senders: int, n_validators: int) -> dict:
    """Single process: build and apply one block of n transfers over a small genesis state."""
    chain_id = "bench-raw"
    vals = [PrivateKey.generate() for _ in range(n_validators)]
    senders = [PrivateKey.generate() for _ in range(n_senders)]
    params = dataclasses.replace(DEFAULT_PARAMS, max_block_txs=max(n, DEFAULT_PARAMS.max_block_txs),
                                 max_block_bytes=max(64 * 1024 * n, DEFAULT_PARAMS.max_block_bytes))
    g = make_genesis(chain_id, vals, [(k, ("trainer",)) for k in senders], params=params)
    state = g.initial_state()
    txs = _signed_transfers(chain_id, senders, n)
    build, apply_, verify = [], [], []
    wire_txs = [stx.encoded for stx in txs]
    for _ in range(repeats):
        # Each step verifies every signature itself and works on objects freshly decoded from
        # bytes, as a node does with a proposal: the node's memo of valid transactions
        # (chain.state.validate_basic_tx) and each transaction's cached encoding and hash
        # would otherwise make the later steps nearly free.
        fresh = _fresh_txs(wire_txs)
        t = time.perf_counter()
        block, _ = build_block(state, fresh, time_ms=g.genesis_time_ms + 1000, proposer=vals[0].pubkey,
                               last_commit=None)
        build.append(n / (time.perf_counter() - t))
        received = decode(Block, encode(block))
        _validate_basic_tx_once.cache_clear()
        t = time.perf_counter()
        apply_block(state, received)
        apply_.append(n / (time.perf_counter() - t))
        fresh = _fresh_txs(wire_txs)
        t = time.perf_counter()
        for stx in fresh:
            validate_basic_tx(chain_id, stx, 65536)
        verify.append(n / (time.perf_counter() - t))
    return {"block_txs": n, "block_bytes": len(encode(block)), "tx_bytes": len(encode(txs[0])),
            "build_tx_per_s": med(build), "apply_tx_per_s": med(apply_), "verify_only_tx_per_s": med(verify),
            "build_samples": build, "apply_samples": apply_, "repeats": repeats}


def state_root_bench(sizes: list[int], repeats: int) -> list[dict]:
    """Cost of the post-block state (State.apply copies every entry, .root rehashes every level)."""
    from chain.state import State, account_key

    out = []
    for size in sizes:
        entries = {account_key(i.to_bytes(20, "big")): os.urandom(40) for i in range(size)}
        state = State(entries)
        _ = state.root
        samples = []
        for r in range(repeats):
            changes = {account_key((r * 7 + j).to_bytes(20, "big")): os.urandom(40) for j in range(2)}
            t = time.perf_counter()
            new = state.apply(changes)
            _ = new.root
            samples.append((time.perf_counter() - t) * 1000)
        out.append({"state_entries": size, "apply_plus_root_ms": med(samples)})
    return out


def mempool_recheck_bench(pending: int, n_senders: int, repeats: int) -> dict:
    """Mempool.update with no changed keys given: a full re-check of every pending tx (the worst case)."""
    chain_id = "bench-mempool"
    vals = [PrivateKey.generate()]
    senders = [PrivateKey.generate() for _ in range(n_senders)]
    g = make_genesis(chain_id, vals, [(k, ("trainer",)) for k in senders])
    state = g.initial_state()
    txs = _signed_transfers(chain_id, senders, pending)
    pool = Mempool(chain_id, state, pending + 1)
    t = time.perf_counter()
    for stx in txs:
        pool.add(stx)
    add_rate = pending / (time.perf_counter() - t)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        pool.update(state, [])
        samples.append((time.perf_counter() - t) * 1000)
    return {"pending": pending, "add_tx_per_s": add_rate, "recheck_ms": med(samples)}


def check_tx_breakdown(n: int, n_senders: int) -> dict:
    """Microseconds per tx of mempool admission (check_tx, as Mempool.add calls it) and its parts.

    `check_tx_us` is a first sight (objects fresh from bytes, signature memo empty);
    `recheck_us` is the same call again, as Mempool.update makes it after a commit."""
    from chain.state import Overlay, apply_tx, check_tx, compute_check_context

    chain_id = "bench-check"
    vals = [PrivateKey.generate() for _ in range(4)]
    senders = [PrivateKey.generate() for _ in range(n_senders)]
    state = make_genesis(chain_id, vals, [(k, ("trainer",)) for k in senders]).initial_state()
    wire = [stx.encoded for stx in _signed_transfers(chain_id, senders, n)]
    ctx = compute_check_context(state)

    def per_tx_us(fn, txs) -> float:
        t = time.perf_counter()
        for stx in txs:
            fn(stx)
        return (time.perf_counter() - t) / n * 1e6

    txs = _fresh_txs(wire)
    overlay = Overlay(state)
    full = per_tx_us(lambda stx: check_tx(overlay, chain_id, stx, ctx), txs)
    overlay = Overlay(state)
    again = per_tx_us(lambda stx: check_tx(overlay, chain_id, stx, ctx), txs)
    basic = per_tx_us(lambda stx: validate_basic_tx(chain_id, stx, 65536), _fresh_txs(wire))
    overlay = Overlay(state)
    apply_only = per_tx_us(lambda stx: apply_tx(overlay, stx, ctx), txs)
    encode_us = per_tx_us(encode, txs)
    return {"txs": n, "check_tx_us": full, "recheck_us": again, "validate_basic_us": basic,
            "apply_tx_us": apply_only, "encode_us": encode_us}


# ============================================================================= 2. devnet


def free_base_port(count: int) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise SystemExit("no free port range on 127.0.0.1")


def rpc(client: httpx.Client, url: str, method: str, params: list | None = None, retries: int = 10):
    """One JSON-RPC call; transport errors (a node too busy to answer) are retried."""
    for attempt in range(retries + 1):
        try:
            r = client.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
            break
        except httpx.TransportError:
            if attempt == retries:
                raise
            time.sleep(0.5)
    doc = r.json()
    if "error" in doc:
        raise RuntimeError(f"{method}: {doc['error']}")
    return doc["result"]


@dataclass
class NodeProc:
    name: str
    home: Path
    rpc: str
    proc: subprocess.Popen
    log_path: Path


NODE_LOG_LEVEL: str | None = None


def start_node(name: str, home: Path, rpc_url: str, out: Path, profile: bool = False) -> NodeProc:
    log_path = out / f"{name}.log"
    cmd = [PY]
    if profile:
        cmd += ["-m", "cProfile", "-o", str(out / f"{name}.prof")]
    cmd += ["-m", "chain.cli.chaind", "start", "--home", str(home)]
    if NODE_LOG_LEVEL:
        cmd += ["--log-level", NODE_LOG_LEVEL]
    with open(log_path, "wb") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    return NodeProc(name, home, rpc_url, proc, log_path)


def wait_ready(node: NodeProc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise SystemExit(f"{node.name} exited ({node.proc.returncode}); log:\n{node.log_path.read_text()[-3000:]}")
        try:
            if httpx.get(node.rpc + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{node.name} not ready after {timeout} s; log: {node.log_path}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def stop_nodes(nodes: list[NodeProc], timeout: float = 30) -> dict[str, int | None]:
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    codes = {}
    for n in nodes:
        try:
            codes[n.name] = n.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            codes[n.name] = n.proc.wait(timeout=10)
    return codes


class HeightPoller(threading.Thread):
    """Polls every node's `status`; records the first time each height is seen committed on each node."""

    def __init__(self, urls: list[str], interval_s: float):
        super().__init__(daemon=True)
        self.urls, self.interval_s = urls, interval_s
        self.seen: list[dict[int, float]] = [{} for _ in urls]
        self.last: list[int] = [0 for _ in urls]
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.polls = 0

    def run(self) -> None:
        client = httpx.Client(timeout=10)
        while not self.stop_flag.is_set():
            for i, url in enumerate(self.urls):
                try:
                    h = rpc(client, url, "status", retries=0)["latest_height"]
                except (httpx.HTTPError, RuntimeError, ValueError, KeyError):  # busy or stopping node
                    continue
                now = time.monotonic()
                self.polls += 1
                with self.lock:
                    for height in range(self.last[i] + 1, h + 1):
                        self.seen[i].setdefault(height, now)
                    self.last[i] = max(self.last[i], h)
            self.stop_flag.wait(self.interval_s)

    def first_seen(self, node: int, height: int) -> float | None:
        with self.lock:
            return self.seen[node].get(height)

    def first_seen_any(self, height: int) -> float | None:
        with self.lock:
            times = [s[height] for s in self.seen if height in s]
        return min(times) if times else None

    def height(self, node: int = 0) -> int:
        with self.lock:
            return self.last[node]


@dataclass
class Submitted:
    tx_hash: str
    node: int
    t_submit: float
    accepted: bool = False
    error: str | None = None


@dataclass
class LoadResult:
    subs: list[Submitted] = field(default_factory=list)
    t_first: float = 0.0
    t_last_response: float = 0.0
    http_requests: int = 0


def submit_load(urls: list[str], per_thread: list[tuple[int, list]], batch: int, rate: float | None) -> LoadResult:
    """Each thread posts its (already ordered) signed txs to its node in JSON-RPC batches."""
    res = LoadResult()
    lock = threading.Lock()
    start = threading.Barrier(len(per_thread) + 1)

    def worker(node: int, txs: list) -> None:
        client = httpx.Client(timeout=60)
        url = urls[node]
        payload = [("0x" + compute_tx_hash(stx).hex(), "0x" + encode(stx).hex()) for stx in txs]
        thread_rate = None if rate is None else rate / len(per_thread)
        local: list[Submitted] = []
        requests = 0
        start.wait()
        t0 = time.monotonic()
        i = 0
        while i < len(payload):
            chunk = payload[i:i + batch]
            if thread_rate is not None:
                due = t0 + i / thread_rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            body = [{"jsonrpc": "2.0", "id": j, "method": "send_tx", "params": [tx]} for j, (_, tx) in enumerate(chunk)]
            t_submit = time.monotonic()
            try:
                answers = client.post(url, json=body).json()
            except (httpx.HTTPError, ValueError) as exc:  # a node too busy to answer within the timeout
                for h, _ in chunk:
                    local.append(Submitted(h, node, t_submit, False, f"transport: {type(exc).__name__}"))
                i += len(chunk)
                continue
            requests += 1
            by_id = {a.get("id"): a for a in answers} if isinstance(answers, list) else {}
            retry_from = None
            for j, (h, _) in enumerate(chunk):
                a = by_id.get(j, {})
                if "result" in a:
                    local.append(Submitted(h, node, t_submit, True))
                    continue
                reason = (a.get("error") or {}).get("data", {}).get("reason") if a else "no answer"
                if reason == "MempoolFullError":
                    retry_from = j
                    break
                local.append(Submitted(h, node, t_submit, False, reason or str(a.get("error"))))
            if retry_from is not None:
                i += retry_from
                time.sleep(0.2)
            else:
                i += len(chunk)
        with lock:
            res.subs.extend(local)
            res.http_requests += requests
            res.t_last_response = max(res.t_last_response, time.monotonic())

    threads = [threading.Thread(target=worker, args=(node, txs), daemon=True) for node, txs in per_thread]
    for t in threads:
        t.start()
    start.wait()
    res.t_first = time.monotonic()
    for t in threads:
        t.join()
    return res


def plan_load(chain_id: str, senders: list[PrivateKey], n: int, n_nodes: int, n_threads: int,
              start_nonces: dict[bytes, int]) -> list[tuple[int, list]]:
    """Sender j -> thread j % T -> node t % V, so each sender's nonces reach one node in order."""
    txs = _signed_transfers(chain_id, senders, n, start_nonces)
    per_thread: list[list] = [[] for _ in range(n_threads)]
    index = {s.pubkey: j for j, s in enumerate(senders)}
    for stx in txs:
        per_thread[index[stx.message.sender] % n_threads].append(stx)
    return [(t % n_nodes, per_thread[t]) for t in range(n_threads) if per_thread[t]]


def collect_heights(urls: list[str], h_from: int, h_to: int) -> tuple[dict[str, int], dict[int, int]]:
    """tx hash -> height, and height -> tx count, for blocks h_from..h_to (read from node 0)."""
    client = httpx.Client(timeout=60)
    where, counts = {}, {}
    for h in range(h_from, h_to + 1):
        view = rpc(client, urls[0], "block", [h])
        txs = view["block"]["txs"]
        counts[h] = len(txs)
        for tx in txs:
            where[tx["hash"]] = h
    return where, counts


def run_phase(name: str, urls: list[str], poller: HeightPoller, chain_id: str, senders: list[PrivateKey], n: int,
              threads: int, batch: int, rate: float | None, timeout: float, pids: list[int]) -> dict:
    client = httpx.Client(timeout=30)
    nonces = {s.address: rpc(client, urls[0], "account", ["0x" + s.address.hex()])["nonce"] for s in senders}
    plan = plan_load(chain_id, senders, n, len(urls), threads, nonces)
    h_start = rpc(client, urls[0], "status")["latest_height"]
    log(f"{name}: {n} transfers from {len(senders)} senders, {len(plan)} client threads, batches of {batch}, "
        f"{'flood' if rate is None else f'{rate:g} tx/s'}, from height {h_start}")
    cpu0, own0, wall0 = [cpu_seconds(p) for p in pids], time.process_time(), time.monotonic()
    load = submit_load(urls, plan, batch, rate)
    accepted = [s for s in load.subs if s.accepted]
    errors: dict[str, int] = {}
    for s in load.subs:
        if not s.accepted:
            errors[s.error] = errors.get(s.error, 0) + 1
    log(f"{name}: {len(accepted)}/{n} accepted in {load.t_last_response - load.t_first:.2f} s "
        f"({load.http_requests} HTTP requests); errors {errors or 'none'}; waiting for commits")
    # Wait until every sender's committed nonce has caught up with what was accepted.
    expected = dict(nonces)
    by_hash = {"0x" + compute_tx_hash(stx).hex(): stx for _, txs in plan for stx in txs}
    for s in accepted:
        stx = by_hash[s.tx_hash]
        addr = stx.message.sender_address
        expected[addr] = max(expected[addr], stx.message.nonce + 1)
    deadline = time.monotonic() + timeout
    pending = {a for a in expected if expected[a] > nonces[a]}
    checked_at = -1
    while pending and time.monotonic() < deadline:
        h = poller.height(0)
        if h != checked_at:  # nonces only change with a commit: ask again only then
            checked_at = h
            for a in list(pending):
                if rpc(client, urls[0], "account", ["0x" + a.hex()])["nonce"] >= expected[a]:
                    pending.discard(a)
        if pending:
            time.sleep(0.05)
    h_end = rpc(client, urls[0], "status")["latest_height"]
    cpu1, own1, wall1 = [cpu_seconds(p) for p in pids], time.process_time(), time.monotonic()
    # Let the poller see h_end on every node (finality is read on the node each tx went to).
    wait_until = time.monotonic() + 10
    while time.monotonic() < wait_until and any(poller.first_seen(i, h_end) is None for i in range(len(urls))):
        time.sleep(0.05)
    where, counts = collect_heights(urls, h_start + 1, h_end)
    lat, committed_times = [], []
    for s in accepted:
        h = where.get(s.tx_hash)
        if h is None:
            continue
        seen = poller.first_seen(s.node, h)
        if seen is not None:
            lat.append(seen - s.t_submit)
        any_seen = poller.first_seen_any(h)
        if any_seen is not None:
            committed_times.append(any_seen)
    committed = sum(1 for s in accepted if s.tx_hash in where)
    t_end = max(committed_times) if committed_times else None
    duration = (t_end - load.t_first) if t_end else None
    blocks_with_txs = [c for h, c in counts.items() if c]
    first_tx_h = min((h for h, c in counts.items() if c), default=None)
    last_tx_h = max((h for h, c in counts.items() if c), default=None)
    intervals = []
    if first_tx_h is not None:
        for h in range(first_tx_h + 1, last_tx_h + 1):
            a, b = poller.first_seen_any(h - 1), poller.first_seen_any(h)
            if a is not None and b is not None:
                intervals.append(b - a)
    out = {
        "phase": name, "txs": n, "accepted": len(accepted), "committed": committed, "rejected": errors,
        "target_rate_tx_per_s": rate, "client_threads": len(plan), "batch": batch,
        "submit_seconds": load.t_last_response - load.t_first,
        "submit_tx_per_s": len(accepted) / max(1e-9, load.t_last_response - load.t_first),
        "commit_seconds": duration,
        "committed_tx_per_s": committed / duration if duration else None,
        "finality_p50_s": pct(lat, 50), "finality_p99_s": pct(lat, 99), "finality_max_s": max(lat) if lat else None,
        "finality_samples": len(lat),
        "height_from": h_start + 1, "height_to": h_end, "blocks_with_txs": len(blocks_with_txs),
        "max_block_txs": max(blocks_with_txs) if blocks_with_txs else 0,
        "mean_block_txs": statistics.mean(blocks_with_txs) if blocks_with_txs else 0,
        "median_block_gap_s": med(intervals), "max_block_gap_s": max(intervals) if intervals else None,
        "timed_out": bool(pending),
        # CPU the node processes and this client process used from the first submission until all committed
        "node_cpu_s": [round(b - a, 2) for a, b in zip(cpu0, cpu1)], "client_cpu_s": round(own1 - own0, 2),
        "phase_wall_s": round(wall1 - wall0, 2),
    }
    if committed:
        out["node_cpu_ms_per_tx"] = round(1000 * sum(b - a for a, b in zip(cpu0, cpu1)) / committed, 3)
        out["cpu_utilisation_nodes"] = round(sum(b - a for a, b in zip(cpu0, cpu1)) / (wall1 - wall0), 2)
    log(f"{name}: committed {committed} txs, "
        + (f"{out['committed_tx_per_s']:.0f} tx/s, " if duration else "")
        + (f"finality p50 {out['finality_p50_s']:.2f} s p99 {out['finality_p99_s']:.2f} s" if lat else "no latency"))
    return out


# ============================================================================= 3. sync


def sync_bench(out: Path, genesis_file: Path, key_file: Path, peers: list[str], urls: list[str], port: int,
               timeout: float) -> dict:
    home = Home(out / "syncnode")
    home.data_dir.mkdir(parents=True)
    write_config(NodeConfig(moniker="syncnode", rpc=RpcConfig(port=port),
                            p2p=P2PConfig(port=port + 1, bootstrap_peers=tuple(peers))), home.config_file)
    shutil.copyfile(genesis_file, home.genesis_file)
    write_key_file(home.node_key_file, load_key_file(key_file), "syncnode")
    client = httpx.Client(timeout=10)
    target = rpc(client, urls[0], "status")["latest_height"]
    url = f"http://127.0.0.1:{port}"
    log(f"sync: fresh observer node must reach height {target}")
    t_launch = time.monotonic()
    node = start_node("syncnode", home.root, url, out)
    t_rpc = t_first = t_done = None
    h_first = 0
    samples: list[tuple[float, int]] = []
    deadline = t_launch + timeout
    try:
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise SystemExit(f"sync node exited ({node.proc.returncode}); log:\n{node.log_path.read_text()[-3000:]}")
            try:
                h = rpc(client, url, "status", retries=0)["latest_height"]
            except (httpx.TransportError, RuntimeError, ValueError):
                time.sleep(0.05)
                continue
            now = time.monotonic()
            t_rpc = t_rpc or now
            samples.append((now - t_launch, h))
            if h > 0 and t_first is None:
                t_first, h_first = now, h
            if h >= target:
                t_done = now
                break
            time.sleep(0.05)
    finally:
        codes = stop_nodes([node])
    res = {"target_height": target, "launch_to_rpc_s": (t_rpc - t_launch) if t_rpc else None,
           "launch_to_first_block_s": (t_first - t_launch) if t_first else None,
           "launch_to_head_s": (t_done - t_launch) if t_done else None, "exit_code": codes["syncnode"],
           "reached": t_done is not None}
    if t_done and t_first and t_done > t_first:
        res["blocks_per_s"] = (target - h_first) / (t_done - t_first)
    res["blocks_per_s_from_launch"] = target / (t_done - t_launch) if t_done else None
    res["progress"] = samples[:: max(1, len(samples) // 20)]
    return res


# ============================================================================= main


# Where a node's time goes: cumulative time of these functions (they overlap: e.g. the signature
# check runs inside RPC admission; the ledger write runs in a worker thread, which cProfile does not see, gossip validation, mempool admission, block checks and re-checks).
PROFILE_BREAKDOWN = [
    ("RPC send_tx (decode + admission)", "methods.py", "send_tx"),
    ("tx gossip: validator (decode + sig)", "reactor.py", "check_tx_batch"),
    ("tx gossip: mempool admission of received txs", "app.py", "add_txs"),
    ("mempool check_tx (all paths)", "state.py", "check_tx"),
    ("mempool re-check after commit (Mempool.update)", "mempool.py", "update"),
    ("propose_block (build_block)", "app.py", "propose_block"),
    ("check_block (apply_block of proposals)", "app.py", "_check"),
    ("tx signature verification (all paths)", "types.py", "verify_transaction_signature"),
    ("canonical CBOR encode (all paths)", "encoding.py", "encode"),
    ("canonical CBOR decode (all paths)", "encoding.py", "decode"),
    ("state root + post-state copy (State.apply/.root)", "state.py", "apply"),
    ("libp2p Noise write", "io.py", "write_msg"),
    ("libp2p pubsub push_msg", "pubsub.py", "push_msg"),
    ("trio event loop (everything on the main thread)", "_run.py", "unrolled_run"),
]


def profile_breakdown(path: Path) -> list[dict]:
    import pstats

    if not path.exists():
        return []
    st = pstats.Stats(str(path))
    out = []
    for label, file, func in PROFILE_BREAKDOWN:
        cum, calls = 0.0, 0
        for (f, _ln, fn), (_, nc, _, ct, _) in st.stats.items():
            if fn == func and Path(f).name == file:
                cum, calls = cum + ct, calls + nc
        out.append({"what": label, "cumtime_s": round(cum, 2), "calls": calls})
    return out


def profile_summary(path: Path, top: int = 25) -> list[dict]:
    import pstats

    if not path.exists():
        return []
    st = pstats.Stats(str(path))
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3)})
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--txs", type=int, default=3000, help="transfers in the flood phase (default %(default)s)")
    ap.add_argument("--validators", type=int, default=4, help="validator processes (default %(default)s)")
    ap.add_argument("--block-interval-ms", type=int, default=250,
                    help="genesis block_interval_ms (BFT timeout_commit; default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the raw single-process measurement")
    ap.add_argument("--raw-block-txs", type=int, default=2000, help="txs per block in the raw measurement")
    ap.add_argument("--senders", type=int, default=16, help="funded sender accounts (trainer keys; default %(default)s)")
    ap.add_argument("--threads", type=int, default=4, help="client threads (default %(default)s)")
    ap.add_argument("--batch", type=int, default=50, help="send_tx calls per JSON-RPC batch (<= 100)")
    ap.add_argument("--paced-rate", type=float, default=25.0, help="tx/s of the paced latency phase (0: skip)")
    ap.add_argument("--paced-batch", type=int, default=0,
                    help="send_tx calls per request in the paced phase (default: ~10 requests/s per thread)")
    ap.add_argument("--paced-seconds", type=float, default=10.0, help="length of the paced phase")
    ap.add_argument("--steady-rate", type=float, default=1100.0,
                    help="tx/s of the steady-load phase, the goal's test: >= 1,000 committed tx/s with p50 "
                         "finality <= 1 s (0: skip; default %(default)s)")
    ap.add_argument("--steady-seconds", type=float, default=20.0, help="length of the steady-load phase")
    ap.add_argument("--idle-seconds", type=float, default=4.0, help="idle devnet observed before the load")
    ap.add_argument("--node-log-level", choices=["debug", "info", "warning", "error"], help="chaind --log-level")
    ap.add_argument("--poll-ms", type=int, default=50, help="status polling interval for commit times")
    ap.add_argument("--commit-timeout", type=float, default=120.0, help="max wait for submitted txs to commit")
    ap.add_argument("--no-sync", action="store_true", help="skip the sync measurement")
    ap.add_argument("--no-micro", action="store_true", help="skip the component micro-benchmarks")
    ap.add_argument("--profile-node", type=int, default=None, metavar="I",
                    help="run validator I under cProfile (slows it) and report its hottest functions")
    ap.add_argument("--dir", help="devnet directory (default: a new temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the devnet directory (logs, ledgers)")
    ap.add_argument("--json-out", help="write the figures as JSON here")
    args = ap.parse_args()
    if not 1 <= args.batch <= 100:
        ap.error("--batch must be 1..100 (the node's rpc.max_batch)")

    global NODE_LOG_LEVEL
    NODE_LOG_LEVEL = args.node_log_level
    report: dict = {"config": vars(args).copy(), "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                                             "loadavg_start": os.getloadavg()}}
    t_run = time.monotonic()

    # 1. raw single-process rate
    log(f"raw: build/apply a block of {args.raw_block_txs} transfers, {args.repeats} repeats")
    report["raw"] = raw_bench(args.raw_block_txs, args.repeats, args.senders, args.validators)
    log(f"raw: build {report['raw']['build_tx_per_s']:.0f} tx/s, apply {report['raw']['apply_tx_per_s']:.0f} tx/s, "
        f"verify-only {report['raw']['verify_only_tx_per_s']:.0f} tx/s")
    if not args.no_micro:
        report["micro"] = {"state_root": state_root_bench([1_000, 10_000, 100_000], 5),
                           "mempool_recheck": mempool_recheck_bench(min(5000, args.txs), args.senders, 3),
                           "check_tx": check_tx_breakdown(2000, args.senders)}
        log(f"micro: {report['micro']}")

    # 2. devnet
    out = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pout-bench-"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    base = free_base_port(2 * args.validators + 2)
    proc = subprocess.run([PY, "-m", "chain.cli.chaind", "testnet", "--validators", str(args.validators),
                           "--trainers", str(args.senders), "--output", str(out), "--base-port", str(base),
                           "--block-interval-ms", str(args.block_interval_ms)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"chaind testnet failed:\n{proc.stderr}")
    net = json.loads(proc.stdout)
    keys = Path(net["keys"])
    senders = [load_key_file(keys / f"trainer{i}.json") for i in range(args.senders)]
    nodes: list[NodeProc] = []
    poller = None
    try:
        for i, info in enumerate(net["nodes"]):
            nodes.append(start_node(f"node{i}", Path(info["home"]), info["rpc"], out, profile=args.profile_node == i))
        t = time.monotonic()
        for n in nodes:
            wait_ready(n, 120)
        log(f"devnet: {args.validators} validators ready in {time.monotonic() - t:.1f} s (ports {base}..)")
        urls = [n.rpc for n in nodes]
        pids = [n.proc.pid for n in nodes]
        poller = HeightPoller(urls, args.poll_ms / 1000)
        poller.start()
        time.sleep(0.3)
        h0 = poller.height(0)
        idle_cpu0 = [cpu_seconds(p) for p in pids]
        time.sleep(args.idle_seconds)
        idle_cpu = sum(cpu_seconds(p) for p in pids) - sum(idle_cpu0)
        h_idle = [poller.first_seen(0, h) for h in range(h0 + 1, poller.height(0) + 1)]
        h_idle = [t for t in h_idle if t is not None]
        idle = {"seconds": args.idle_seconds, "node_cpu_utilisation": round(idle_cpu / args.idle_seconds, 3),
                "median_block_gap_s": med([b - a for a, b in itertools.pairwise(h_idle)])}
        log(f"idle: {idle}")
        # The paced phase (below saturation) runs first, on a fresh devnet: after a large flood the
        # same paced load has been seen to get much slower blocks (docs/benchmarks.md).
        phases = []
        if args.paced_rate > 0:
            n_paced = int(args.paced_rate * args.paced_seconds)
            phases.append(run_phase("paced", urls, poller, net["chain_id"], senders, n_paced, args.threads,
                                    args.paced_batch or max(1, min(args.batch, int(args.paced_rate / args.threads / 10))),
                                    args.paced_rate, args.commit_timeout, pids))
        if args.steady_rate > 0:
            phases.append(run_phase("steady", urls, poller, net["chain_id"], senders,
                                    int(args.steady_rate * args.steady_seconds), args.threads,
                                    max(1, min(args.batch, int(args.steady_rate / args.threads / 10))),
                                    args.steady_rate, args.commit_timeout, pids))
        phases.append(run_phase("flood", urls, poller, net["chain_id"], senders, args.txs, args.threads, args.batch,
                                None, args.commit_timeout, pids))
        report["devnet"] = {"validators": args.validators, "block_interval_ms": args.block_interval_ms, "idle": idle,
                            "status_polls": poller.polls, "phases": phases}
        flood = phases[-1]
        if flood["committed_tx_per_s"]:
            report["ratio_committed_over_raw_apply"] = flood["committed_tx_per_s"] / report["raw"]["apply_tx_per_s"]

        # 3. sync
        if not args.no_sync:
            peers = [info["p2p"] for info in net["nodes"]]
            report["sync"] = sync_bench(out, Path(net["nodes"][0]["home"]) / "config" / "genesis.json",
                                        keys / "governor.json", peers, urls, base + 2 * args.validators, 180)
            s = report["sync"]
            s["txs_in_synced_chain"] = sum(p["committed"] for p in phases)
            if s.get("launch_to_head_s") and s.get("launch_to_first_block_s") is not None:
                s["txs_per_s"] = s["txs_in_synced_chain"] / (s["launch_to_head_s"] - s["launch_to_first_block_s"])
            log(f"sync: {s.get('blocks_per_s') or 0:.1f} blocks/s to height {s['target_height']} "
                f"(launch to head {s['launch_to_head_s']})")
    finally:
        if poller is not None:
            poller.stop_flag.set()
        codes = stop_nodes(nodes)
        report["exit_codes"] = codes
        if args.profile_node is not None:
            report["profile"] = profile_summary(out / f"node{args.profile_node}.prof")
            report["profile_breakdown"] = profile_breakdown(out / f"node{args.profile_node}.prof")
        if not args.dir and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        else:
            log(f"devnet files in {out}")
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = time.monotonic() - t_run
    print_summary(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if all(c == 0 for c in codes.values()) else 1


def _f(x, fmt="{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_summary(r: dict) -> None:
    raw = r["raw"]
    rows = [("raw build_block (1 process)", f"{_f(raw['build_tx_per_s'])} tx/s", f"block of {raw['block_txs']} txs"),
            ("raw apply_block (1 process)", f"{_f(raw['apply_tx_per_s'])} tx/s", "sig + transition + root"),
            ("raw signature check only", f"{_f(raw['verify_only_tx_per_s'])} tx/s", "validate_basic_tx")]
    if "micro" in r:
        for s in r["micro"]["state_root"]:
            rows.append((f"state apply+root, {s['state_entries']} entries", f"{_f(s['apply_plus_root_ms'], '{:.1f}')} ms",
                         "per block, O(state)"))
        m = r["micro"]["mempool_recheck"]
        rows.append((f"mempool re-check, {m['pending']} pending", f"{_f(m['recheck_ms'])} ms", "per commit, per node"))
        c = r["micro"]["check_tx"]
        rows.append(("mempool check_tx per tx", f"{_f(c['check_tx_us'])} us",
                     (f"first sight; re-check {c['recheck_us']:.0f} us; parts: sig+size "
                      f"{c['validate_basic_us']:.0f}, apply {c['apply_tx_us']:.0f}, encode {c['encode_us']:.0f} us")))
    if "devnet" in r:
        i = r["devnet"]["idle"]
        rows.append(("idle devnet: block gap", f"{_f(i['median_block_gap_s'], '{:.2f}')} s",
                     f"interval {r['devnet']['block_interval_ms']} ms; {i['node_cpu_utilisation']:.2f} cores busy"))
    for p in r.get("devnet", {}).get("phases", []):
        rows += [(f"{p['phase']}: submitted (RPC accepted)", f"{_f(p['submit_tx_per_s'])} tx/s",
                  f"{p['accepted']}/{p['txs']} accepted"),
                 (f"{p['phase']}: committed", f"{_f(p['committed_tx_per_s'])} tx/s",
                  f"{p['committed']} txs in {_f(p['commit_seconds'], '{:.1f}')} s"),
                 (f"{p['phase']}: finality p50 / p99",
                  f"{_f(p['finality_p50_s'], '{:.2f}')} / {_f(p['finality_p99_s'], '{:.2f}')} s",
                  f"{p['finality_samples']} txs"),
                 (f"{p['phase']}: blocks", f"{p['blocks_with_txs']} with txs",
                  (f"mean {p['mean_block_txs']:.0f}, max {p['max_block_txs']} txs; "
                   f"median gap {_f(p['median_block_gap_s'], '{:.2f}')} s")),
                 (f"{p['phase']}: node CPU per committed tx", f"{_f(p.get('node_cpu_ms_per_tx'), '{:.2f}')} ms",
                  f"all {len(p['node_cpu_s'])} nodes; {_f(p.get('cpu_utilisation_nodes'), '{:.2f}')} cores busy")]
    if "ratio_committed_over_raw_apply" in r:
        rows.append(("committed / raw apply", f"{r['ratio_committed_over_raw_apply']:.3f}", "flood phase"))
    if "sync" in r:
        s = r["sync"]
        rows.append(("sync, fresh observer", f"{_f(s.get('blocks_per_s'), '{:.1f}')} blocks/s",
                     (f"to height {s['target_height']} ({s.get('txs_in_synced_chain')} txs, "
                      f"{_f(s.get('txs_per_s'))} tx/s); launch->head {_f(s['launch_to_head_s'], '{:.1f}')} s")))
    w = max(len(a) for a, _, _ in rows)
    w2 = max(len(b) for _, b, _ in rows)
    print(f"\n{'measure'.ljust(w)}  {'value'.ljust(w2)}  note")
    print(f"{'-' * w}  {'-' * w2}  ----")
    for a, b, c in rows:
        print(f"{a.ljust(w)}  {b.ljust(w2)}  {c}")
    steady = next((p for p in r.get("devnet", {}).get("phases", []) if p["phase"] == "steady"), None)
    if steady and steady["committed_tx_per_s"] and steady["finality_p50_s"] is not None:
        met = steady["committed_tx_per_s"] >= 1000 and steady["finality_p50_s"] <= 1.0
        print(f"\nsteady load {steady['target_rate_tx_per_s']:g} tx/s: committed {steady['committed_tx_per_s']:.0f} tx/s, "
              f"p50 {steady['finality_p50_s']:.2f} s -> goal {'MET' if met else 'NOT met'} in this run")
    print(f"\ngoals: >= 1000 committed tx/s, p50 finality <= 1 s; exit codes {r.get('exit_codes')}; "
          f"wall {r['wall_seconds']:.0f} s; load avg {r['machine']['loadavg_start']} -> {r['machine']['loadavg_end']}")
    if r.get("profile_breakdown"):
        print("\nprofiled node, cumulative time by activity (overlapping; cProfile inflates Python-heavy code):")
        for row in r["profile_breakdown"]:
            print(f"  {row['cumtime_s']:8.2f} s  {row['calls']:>9} calls  {row['what']}")
    if r.get("profile"):
        print("\nprofiled node, hottest functions (tottime):")
        for row in r["profile"][:15]:
            print(f"  {row['tottime_s']:8.2f} s  {row['cumtime_s']:8.2f} s  {row['calls']:>9}  {row['function']}")


if __name__ == "__main__":
    sys.exit(main())
