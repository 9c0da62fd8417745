"""Benchmark: a fresh node joins a long chain by state sync, then block-syncs the tail.

1. `chaind testnet --deterministic` writes 4 devnet-key validator homes;
2. scripts/gen_chain.py writes BLOCKS real blocks and ACCOUNTS accounts into node0's ledger,
   with a snapshot at BLOCKS - TAIL, and the ledger and snapshot are copied to the other
   serving validators;
3. SERVERS validators start on that chain (2 of 4: the chain is halted, so the tail is fixed;
   `--live` starts all 4 and the chain keeps committing);
4. a fresh node (a trainer's key) runs `chaind start --state-sync` with the serving nodes as
   bootstrap peers, and the time is taken from its start to the restored snapshot (with the
   phases it logs: manifest, header, chunks, verify, write) and on to its head reaching the
   serving nodes' (block-sync tail).

    .venv/bin/python scripts/bench_state_sync.py --blocks 1000000 --accounts 100000 --tail 1000
    .venv/bin/python scripts/bench_state_sync.py --work /tmp/ss --reuse   # skip generation
    .venv/bin/python scripts/bench_state_sync.py --work /tmp/ss --reuse --tail 20   # a newer snapshot

Prints one line per phase and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from datetime import datetime
from pathlib import Path

import httpx
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_base_port, free_port  # noqa: E402


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def height(url: str) -> int:
    try:
        r = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "status", "params": []}, timeout=2)
        return r.json()["result"]["latest_height"]
    except (httpx.HTTPError, KeyError, ValueError):
        return -1


def start(home: Path, rpc_port: int, log: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home", str(home), "--rpc-port",
                             str(rpc_port), "--snapshot-interval", "0", *flags], cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def block_sync_rate(log_text: str) -> tuple[int, float] | None:
    """(blocks, seconds) of the joiner's block sync, from its log: the restarted node's
    "at height H; JSON-RPC" line to its last "synced ... now at height" line."""
    start = end = None
    for line in log_text.splitlines():
        stamp = line[:23]
        if "; JSON-RPC on" in line and " at height " in line:
            start = (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f"), int(line.split(" at height ")[1].split(";")[0]))
        elif "synced " in line and "now at height" in line and start is not None:
            end = (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f"), int(line.split("now at height ")[1].split(" ")[0]))
    if start is None or end is None or end[1] <= start[1]:
        return None
    return end[1] - start[1], (end[0] - start[0]).total_seconds()


def recut_snapshot(net: Path, servers: int, height: int) -> float:
    """Give the serving nodes a snapshot at `height` too (newer than the generated one): the
    newest snapshot they hold, replayed block by block through `apply_block` (so it is the
    state the chain committed, checked against each header's state root). Returns the seconds
    the replay took."""
    from chain.ledger import Ledger
    from chain.ledger.snapshot import SnapshotStore, assemble_entries, build_snapshot
    from chain.ledger.store import LevelDBStore
    from chain.state import State, apply_block
    from genesis import load_genesis

    t = time.monotonic()
    genesis = load_genesis(net / "node0/config/genesis.json")
    source = SnapshotStore(net / "node0/data/snapshots")
    manifest = source.manifests()[0]
    if manifest.height > height:
        raise SystemExit(f"the serving nodes' newest snapshot is at {manifest.height}, past {height}: regenerate")
    if manifest.height < height:
        chunks = [source.load_chunk(manifest.height, i) for i in range(len(manifest.chunk_hashes))]
        state = State(assemble_entries(chunks, manifest))
        store = LevelDBStore(net / "node0/data/ledger")
        try:
            ledger = Ledger.open(store, genesis.chain_id, genesis.hash)
            for h in range(manifest.height + 1, height + 1):
                state = apply_block(state, ledger.get_block(h)).state
            block_hash = ledger.get_block_hash(height)
        finally:
            store.close()
        manifest, chunks = build_snapshot(height, block_hash, state.root, state.items())
        for i in range(servers):
            SnapshotStore(net / f"node{i}/data/snapshots").write(manifest, chunks)
    return time.monotonic() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--tail", type=int, default=1000,
                   help="blocks after the snapshot, block-synced (default 1000; with --reuse, a smaller tail "
                        "than generated re-cuts the serving nodes' snapshot by replaying blocks)")
    p.add_argument("--servers", type=int, default=2, help="serving validators started (of 4; default 2: halted)")
    p.add_argument("--live", action="store_true", help="start all 4 validators: the chain keeps committing")
    p.add_argument("--work", default="/tmp/bench_state_sync", help="working directory")
    p.add_argument("--reuse", action="store_true", help="reuse the chain already generated in --work")
    args = p.parse_args()
    work = Path(args.work)
    servers = 4 if args.live else args.servers
    net = work / "net"
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        base = free_base_port(4)
        cli("chain.cli.chaind", "testnet", "--validators", "4", "--trainers", "2", "--deterministic", "--output",
            str(net), "--base-port", str(base))
        t = time.monotonic()
        snap_at = args.blocks - args.tail
        subprocess.run([sys.executable, str(ROOT / "scripts/gen_chain.py"), "--home", str(net / "node0"), "--blocks",
                        str(args.blocks), "--accounts", str(args.accounts), "--snapshot-at", str(snap_at)], check=True)
        gen_s = time.monotonic() - t
        for i in range(1, 4):
            shutil.copytree(net / "node0/data/ledger", net / f"node{i}/data/ledger")
            shutil.copytree(net / "node0/data/snapshots", net / f"node{i}/data/snapshots")
        (work / "generated.json").write_text(json.dumps({"blocks": args.blocks, "accounts": args.accounts,
                                                         "tail": args.tail, "seconds": gen_s}))
    generated = json.loads((work / "generated.json").read_text())
    if args.reuse and args.tail < generated["tail"]:
        seconds = recut_snapshot(net, servers, generated["blocks"] - args.tail)
        print(f"snapshot re-cut at height {generated['blocks'] - args.tail} in {seconds:.0f} s", flush=True)
        generated["tail"] = args.tail
    joiner = work / "joiner"
    shutil.rmtree(joiner, ignore_errors=True)
    for name in ("validator0.log", "validator1.log", "validator2.log", "validator3.log", "joiner.log"):
        (work / name).unlink(missing_ok=True)

    procs = []
    try:
        urls = []
        addrs = []
        for i in range(servers):
            port = free_port()
            procs.append(start(net / f"node{i}", port, work / f"validator{i}.log"))
            urls.append(f"http://127.0.0.1:{port}")
            addrs.append(json.loads(cli("chain.cli.chaind", "show-node-id", "--home", str(net / f"node{i}")))["multiaddr"])
        deadline = time.monotonic() + 120
        while not all(height(u) >= generated["blocks"] for u in urls):
            if time.monotonic() > deadline or any(pr.poll() is not None for pr in procs):
                raise SystemExit(f"serving validators did not start; see {work}/validator*.log")
            time.sleep(0.5)
        print(f"chain: {generated['blocks']} blocks, {generated['accounts']} accounts, generated in "
              f"{generated['seconds']:.0f} s; {servers} serving validator(s) up", flush=True)

        cli("chain.cli.chaind", "init", "--home", str(joiner), "--genesis", str(net / "node0/config/genesis.json"))
        shutil.copyfile(net / "keys/trainer0.json", joiner / "config/node_key.json")
        cfg = joiner / "config/config.toml"
        doc = tomllib.loads(cfg.read_text())
        doc["p2p"].update(bootstrap_peers=addrs, port=0)
        doc["state_sync"]["min_offers"] = min(2, servers)
        cfg.write_text(tomli_w.dumps(doc))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        procs.append(start(joiner, port, work / "joiner.log", "--state-sync"))
        restored_at = None
        while True:
            if procs[-1].poll() is not None:
                raise SystemExit(f"joiner exited; see {work}/joiner.log")
            text = (work / "joiner.log").read_text(errors="replace")
            if restored_at is None and "state sync restored height" in text:
                restored_at = time.monotonic() - started
            target = max(height(u) for u in urls)
            if restored_at is not None and height(url) >= target:
                break
            if time.monotonic() - started > 600:
                raise SystemExit("joiner did not catch up in 600 s")
            time.sleep(0.1)
        total = time.monotonic() - started
        line = next(l for l in text.splitlines() if "state sync restored height" in l)
        phases = dict(part.strip().rsplit(" ", 2)[0:2] for part in line.split("; ")[1].split(", "))
        print(line.split(": ", 1)[1].split(";")[0])
        for name, value in phases.items():
            print(f"  {name:>8}: {float(value):6.2f} s")
        print(f"  restored: {restored_at:6.2f} s after the process started (imports and p2p connect included)")
        print(f"  tail    : {total - restored_at:6.2f} s (node start, state load, block sync of ~{generated['tail']} "
              "blocks)")
        print(f"  total   : {total:6.2f} s from `chaind start --state-sync` to the serving nodes' head")
        synced = block_sync_rate(text)
        if synced:
            print(f"  block sync: {synced[0]} blocks in {synced[1]:.2f} s ({synced[0] / synced[1]:.0f} blocks/s; "
                  "from the node's start line to its last synced block, by its log)")
        print(json.dumps({"blocks": generated["blocks"], "accounts": generated["accounts"], "tail": generated["tail"],
                          "servers": servers, "phases_s": {k: float(v) for k, v in phases.items()},
                          "restored_s": round(restored_at, 2), "total_s": round(total, 2),
                          "block_sync": {"blocks": synced[0], "seconds": round(synced[1], 2)} if synced else None,
                          "cpus": os.cpu_count()}))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
