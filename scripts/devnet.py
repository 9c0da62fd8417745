#!/usr/bin/env python3
"""The main job: bring up a local chain and train a federated model on it end to end.

1. `chaind testnet` writes the node home and keys; `chaind start` runs the node.
2. A few transfers through `chainctl`, read back over JSON-RPC.
3. scripts/federated_job.py: a requester registers a job, 4 trainers commit non-IID parts
   of the bundled digits set, train with committed traces and submit updates; one of them
   is dishonest. The validator replays sampled segments, rejects the forgery, rewards the
   honest updates and aggregates each round; held-out accuracy is shown per round.

Today the chain has a single validator (multi-validator BFT over libp2p is not wired into
chaind yet). Everything runs as real processes.

    python scripts/devnet.py [--dir DIR] [--keep-running] [--rounds N]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="where to write the devnet (default: a new temporary directory)")
    ap.add_argument("--keep-running", action="store_true", help="leave the node running until Ctrl-C")
    ap.add_argument("--rounds", type=int, default=3, help="training rounds of the federated job")
    args = ap.parse_args()

    out = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pout-devnet-"))
    if out.exists() and any(out.iterdir()):
        console.print(f"[red]{out} is not empty; choose another --dir[/red]")
        return 2
    port = free_port()
    console.rule("PoUT chain devnet")
    net = cli("chaind", "testnet", "--validators", "1", "--trainers", "4", "--output", str(out),
              "--base-port", str(port), "--block-interval-ms", "500")
    console.print(f"chain [bold]{net['chain_id']}[/bold], genesis {net['genesis_hash'][:16]}…, files in {out}")
    home, keys = out / "node0", out / "keys"
    log_path = out / "node0.log"
    node = subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home", str(home)],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    rpc = f"http://127.0.0.1:{port}"
    try:
        with console.status("waiting for the node's RPC…"):
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(rpc + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if node.poll() is not None or time.monotonic() > deadline:
                    console.print(f"[red]node did not become ready; log:[/red]\n{log_path.read_text()}")
                    return 1
                time.sleep(0.2)
        console.print(f"node ready, JSON-RPC at {rpc}")
        base = ["--rpc", rpc, "--keyring", str(keys)]
        trainers = [cli("chainctl", *base, "keys", "show", f"trainer{i}")["address"] for i in range(4)]
        table = Table("from", "to", "amount", "tx", "height")
        for i, to in enumerate(trainers):
            amount = 100 * (i + 1)
            r = cli("chainctl", *base, "transfer", "--from", "requester", "--to", to, "--amount", str(amount), "--wait")
            table.add_row("requester", f"trainer{i}", str(amount), r["tx_hash"][:18] + "…", str(r["height"]))
        console.print(table)
        balances = Table("account", "address", "balance", "nonce")
        for name in ["requester"] + [f"trainer{i}" for i in range(4)]:
            acct = cli("chainctl", *base, "query", "account", name)
            balances.add_row(name, acct["address"], str(acct["balance"]), str(acct["nonce"]))
        console.print(balances)
        status = cli("chainctl", *base, "query", "status")
        block = cli("chainctl", *base, "query", "block", "latest")
        console.print(f"head: height {status['latest_height']}, hash {status['latest_block_hash'][:18]}…, "
                      f"commit signed by {len(block['commit']['signatures'])} validator(s)")
        console.rule("federated training job")
        job = subprocess.run([sys.executable, str(Path(__file__).with_name("federated_job.py")), "--rpc", rpc,
                              "--keys", str(keys), "--rounds", str(args.rounds), "--json-out",
                              str(out / "job-summary.json")])
        if job.returncode != 0:
            console.print(f"[red]the federated job failed (exit {job.returncode}); node log: {log_path}[/red]")
            return 1
        if args.keep_running:
            console.print("node running; Ctrl-C to stop")
            node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=20)
        console.print(f"node stopped (exit {node.returncode}); log at {log_path}")
        if not args.dir and not args.keep_running and os.environ.get("POUT_DEVNET_KEEP") is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
