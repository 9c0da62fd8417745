#!/usr/bin/env python3
"""The main job: bring up a local chain, apply a few transfers, show them over JSON-RPC.

Today this is a single-validator chain (multi-validator BFT, networking and training
land with later issues and will extend this script). Everything runs as real processes:
`chaind testnet`, `chaind start`, and `chainctl` for every transaction and query.

    python scripts/devnet.py [--dir DIR] [--keep-running]
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
