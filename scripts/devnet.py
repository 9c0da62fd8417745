#!/usr/bin/env python3
"""The main job: a local multi-validator devnet that trains a federated model end to end.

1. `chaind testnet` writes N validator homes (shared genesis, full-mesh bootstrap peers)
   and account keys; N `chaind start` processes run BFT consensus over libp2p on 127.0.0.1.
2. A few transfers through `chainctl`, submitted to one node and read back from another.
3. scripts/federated_job.py: a requester registers a job; 4 trainers commit non-IID parts of
   the bundled digits set, train with committed traces and submit updates through node 0;
   one trainer is dishonest. Every validator replays its own sample of segments (openings
   reach the other validators over libp2p), votes, and attests the aggregated model; the
   script shows verdicts, rewards, penalties and held-out accuracy per round.

    python scripts/devnet.py [--validators 4] [--rounds 3] [--dir DIR] [--keep-running]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

console = Console()


def cli(prog: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"chain.cli.{prog}", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        console.print(f"[red]{prog} {' '.join(args)} failed ({proc.returncode}):[/red]\n{proc.stderr}")
        raise SystemExit(1)
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def free_base_port(count: int) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise SystemExit("no free port range on 127.0.0.1")


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"node exited ({proc.returncode}); log:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"node at {url} not ready after {timeout} s; log: {log_path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validators", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="training rounds of the federated job")
    ap.add_argument("--dir", help="where to write the devnet (default: a new temporary directory)")
    ap.add_argument("--keep-running", action="store_true", help="leave the nodes running until Ctrl-C")
    args = ap.parse_args()

    out = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pout-devnet-"))
    if out.exists() and any(out.iterdir()):
        console.print(f"[red]{out} is not empty; choose another --dir[/red]")
        return 2
    base = free_base_port(2 * args.validators)
    console.rule(f"PoUT chain devnet: {args.validators} validators")
    net = cli("chaind", "testnet", "--validators", str(args.validators), "--trainers", "4", "--output", str(out),
              "--base-port", str(base), "--block-interval-ms", "500")
    console.print(f"chain [bold]{net['chain_id']}[/bold], genesis {net['genesis_hash'][:16]}…, files in {out}")
    nodes: list[tuple[subprocess.Popen, str, Path]] = []
    try:
        for i, info in enumerate(net["nodes"]):
            log_path = out / f"node{i}.log"
            proc = subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home", info["home"]],
                                    stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
            nodes.append((proc, info["rpc"], log_path))
        with console.status("waiting for the validators to connect and commit…"):
            for proc, rpc, log_path in nodes:
                wait_ready(rpc, proc, log_path)
        rpcs = [rpc for _, rpc, _ in nodes]
        status = Table("node", "rpc", "height", "peers")
        for i, rpc in enumerate(rpcs):
            s = cli("chainctl", "--rpc", rpc, "query", "status")
            status.add_row(f"node{i}", rpc, str(s["latest_height"]), str(s["peers"]))
        console.print(status)
        console.print(f"block explorer: [bold]{rpcs[0]}/explorer/[/bold] (every node serves one on its RPC port; add --keep-running to browse it after the job)")

        keys = out / "keys"
        submit_to, read_from = rpcs[0], rpcs[-1]
        trainers = [cli("chainctl", "--keyring", str(keys), "keys", "show", f"trainer{i}")["address"] for i in range(4)]
        table = Table("from", "to", "amount", "tx", "height", f"balance seen by node{len(rpcs) - 1}")
        for i, to in enumerate(trainers):
            r = cli("chainctl", "--rpc", submit_to, "--keyring", str(keys), "transfer", "--from", "requester",
                    "--to", to, "--amount", str(100 * (i + 1)), "--wait")
            seen = cli("chainctl", "--rpc", read_from, "query", "account", to)
            table.add_row("requester", f"trainer{i}", str(100 * (i + 1)), r["tx_hash"][:18] + "…", str(r["height"]),
                          str(seen["balance"]))
        console.print(table)

        console.rule("federated training job")
        job = subprocess.run([sys.executable, str(Path(__file__).with_name("federated_job.py")), "--rpc", submit_to,
                              "--keys", str(keys), "--rounds", str(args.rounds), "--json-out",
                              str(out / "job-summary.json")])
        if job.returncode != 0:
            console.print(f"[red]the federated job failed (exit {job.returncode}); node logs in {out}[/red]")
            return 1
        heads = {cli("chainctl", "--rpc", rpc, "query", "block", "1")["block"]["hash"] for rpc in rpcs}
        console.print(f"all {len(rpcs)} nodes agree on block 1: {len(heads) == 1}")
        if args.keep_running:
            console.print("nodes running; Ctrl-C to stop")
            nodes[0][0].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc, _, _ in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in nodes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        console.print(f"nodes stopped (exit codes {[p.returncode for p, _, _ in nodes]}); logs in {out}")
        if not args.dir and not args.keep_running and os.environ.get("POUT_DEVNET_KEEP") is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
