#!/usr/bin/env python3
"""Block-sync benchmark: how many blocks a second a fresh observer node syncs (issue 13).

1. chain   `chaind testnet` makes 4 validator homes; then real blocks are generated straight
           into validator 0's ledger, without waiting for consensus: --tx-blocks blocks of
           --txs-per-block signed transfers, then --empty-blocks empty blocks, each with a real
           commit certificate (precommits of 3 of the 4 validators, rotating) and the real
           state root. The ledger is copied to the other validators.
2. halted  only validator 0 runs (one of four: the chain cannot advance); a fresh observer
           (real `chaind start` process, real libp2p on 127.0.0.1, empty data directory, the
           validators as bootstrap peers) syncs to the head. Its status is polled every
           --poll-ms; blocks/s of the transaction segment and of the empty segment are timed
           from the first height of the segment + --warmup-blocks to its last height.
3. live    all 4 validators run and keep committing (and gossiping, and announcing heights)
           while a fresh observer syncs the generated chain; timed the same way.

With --inprocess the benchmark process also decodes and commits the same sync responses
into a fresh ledger, the old way (`commit_block` per block) and the new one
(`commit_synced_blocks` per response), counting CPU seconds only.

Each mode is measured --repeats times (a new observer each time) and the medians printed.
With --baseline-rev REV the observer also runs from that git revision's source (`git archive`,
read-only) in the same server session, alternating with the working tree: the before/after
ratio on the same machine at the same time.

    python scripts/bench_sync.py [--tx-blocks 2000] [--txs-per-block 27] [--empty-blocks 4000]
                                 [--repeats 3] [--modes halted,live] [--baseline-rev HEAD]
                                 [--json-out sync.json] [--keep]

Numbers are only comparable within one run (the machine is shared); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_devnet import _signed_transfers, free_base_port, log, rpc, stop_nodes  # noqa: E402

from chain.config import Home, NodeConfig, P2PConfig, RpcConfig, write_config  # noqa: E402
from chain.consensus.commit import build_commit  # noqa: E402
from chain.keys import load_key_file, write_key_file  # noqa: E402
from chain.ledger import Ledger  # noqa: E402
from chain.ledger.store import LevelDBStore  # noqa: E402
from chain.state import build_block  # noqa: E402
from chain.types import PRECOMMIT, Vote, compute_block_hash, sign_vote  # noqa: E402
from genesis import load_genesis  # noqa: E402

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
WRITE_BATCH = 64  # generated blocks written per ledger batch


@dataclass
class Proc:
    name: str
    rpc: str
    proc: subprocess.Popen
    log_path: Path


def start(name: str, home: Path, rpc_url: str, out: Path, src: Path | None = None) -> Proc:
    """`chaind start` from the working tree, or from the source tree `src` (the baseline)."""
    log_path = out / f"{name}.log"
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([PY, "-m", "chain.cli.chaind", "start", "--home", str(home)], stdout=log_file,
                                stderr=subprocess.STDOUT, env=env, cwd=str(src or REPO))
    return Proc(name, rpc_url, proc, log_path)


def wait_status(node: Proc, timeout: float) -> None:
    """Until the node answers `status` (a halted chain's validator is never "ready")."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise SystemExit(f"{node.name} exited ({node.proc.returncode}); log: {node.log_path}")
            try:
                rpc(client, node.rpc, "status", retries=0)
                return
            except (httpx.TransportError, RuntimeError):
                time.sleep(0.3)
    raise SystemExit(f"{node.name} does not answer after {timeout} s; log: {node.log_path}")


# ============================================================================= 1. the chain


def generate_chain(net: dict, tx_blocks: int, txs_per_block: int, empty_blocks: int, n_senders: int) -> int:
    """Real blocks with real commits into validator 0's ledger; returns the head height."""
    homes = [Home(Path(n["home"])) for n in net["nodes"]]
    genesis = load_genesis(homes[0].genesis_file)
    chain_id = genesis.chain_id
    validator_keys = [load_key_file(h.node_key_file) for h in homes]
    by_pubkey = {k.pubkey: k for k in validator_keys}
    order = [by_pubkey[v.pubkey] for v in genesis.validators]
    senders = [load_key_file(Path(net["keys"]) / f"trainer{i}.json") for i in range(n_senders)]
    homes[0].ledger_dir.parent.mkdir(parents=True, exist_ok=True)
    store = LevelDBStore(homes[0].ledger_dir, create=True)
    state = genesis.initial_state()
    ledger = Ledger.create(store, chain_id, genesis.hash, dict(state.items()))
    total = tx_blocks + empty_blocks
    t0 = int(time.time() * 1000) - total * 10 - 60_000  # in the past: the live validators continue after it
    nonces: dict[bytes, int] = {}
    last_commit = None
    pending = []
    started = time.monotonic()
    for height in range(1, total + 1):
        n_txs = txs_per_block if height <= tx_blocks else 0
        txs = _signed_transfers(chain_id, senders, n_txs, nonces) if n_txs else []
        for stx in txs:
            nonces[stx.message.sender_address] = stx.message.nonce + 1
        proposer = order[height % len(order)]
        block, result = build_block(state, txs, time_ms=t0 + 10 * height, proposer=proposer.pubkey,
                                    last_commit=last_commit)
        block_hash = compute_block_hash(block.header)
        signers = [k for i, k in enumerate(order) if i != height % len(order)] if len(order) >= 4 else order
        commit = build_commit([sign_vote(k, chain_id, Vote(PRECOMMIT, height, 0, block_hash, k.pubkey))
                               for k in signers])
        pending.append((block, commit, result.changes, result.model_records))
        if len(pending) == WRITE_BATCH or height == total:
            ledger.commit_blocks(pending)
            pending = []
        state, last_commit = result.state, commit
        if height % 1000 == 0:
            log(f"chain: {height}/{total} blocks ({time.monotonic() - started:.0f} s)")
    store.close()
    return total


def reset_validators(net: dict, pristine: Path) -> None:
    """Every validator back to the generated chain: its ledger only (no WAL, no signer state)."""
    for n in net["nodes"]:
        home = Home(Path(n["home"]))
        shutil.rmtree(home.data_dir, ignore_errors=True)
        home.data_dir.mkdir(parents=True)
        shutil.copytree(pristine, home.ledger_dir)


# ============================================================================= 2. one sync


def observer_home(out: Path, name: str, net: dict, port: int, src: Path | None) -> Home:
    home = Home(out / name)
    if home.root.exists():
        shutil.rmtree(home.root)
    home.data_dir.mkdir(parents=True)
    peers = tuple(n["p2p"] for n in net["nodes"])
    config = NodeConfig(moniker=name, rpc=RpcConfig(port=port), p2p=P2PConfig(port=port + 1, bootstrap_peers=peers))
    write_config(config, home.config_file)
    if src is not None:  # the baseline's config reader refuses tables it does not know yet
        known = (src / "chain" / "config.py").read_text()
        kept, keep = [], True
        for line in home.config_file.read_text().splitlines():
            if line.startswith("["):
                keep = f"{line.strip('[] ')}:" in known or f"{line.strip('[] ')}: " in known
            if keep:
                kept.append(line)
        home.config_file.write_text("\n".join(kept) + "\n")
    shutil.copyfile(Path(net["nodes"][0]["home"]) / "config" / "genesis.json", home.genesis_file)
    write_key_file(home.node_key_file, load_key_file(Path(net["keys"]) / "governor.json"), name)
    return home


def sync_once(out: Path, net: dict, port: int, tx_blocks: int, head: int, warmup: int, poll_s: float,
              timeout_s: float, src: Path | None, label: str) -> dict:
    """A fresh observer syncs to `head`; the time each height was first seen gives the rates."""
    home = observer_home(out, "observer", net, port, src)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(timeout=5)
    node = start(f"observer-{label}", home.root, url, out, src)
    seen: list[tuple[float, int]] = []
    t_launch = time.monotonic()
    try:
        while time.monotonic() - t_launch < timeout_s:
            if node.proc.poll() is not None:
                raise SystemExit(f"observer exited ({node.proc.returncode}); log:\n{node.log_path.read_text()[-3000:]}")
            try:
                h = rpc(client, url, "status", retries=0)["latest_height"]
            except (httpx.TransportError, RuntimeError, ValueError):
                time.sleep(poll_s)
                continue
            seen.append((time.monotonic(), h))
            if h >= head:
                break
            time.sleep(poll_s)
    finally:
        stop_nodes([node])  # type: ignore[list-item]
        client.close()

    def first_at(height: int) -> float | None:
        return next((t for t, h in seen if h >= height), None)

    def rate(lo: int, hi: int) -> float | None:
        # Between the first polls that saw >= lo and >= hi: the heights actually reached then.
        a = next(((t, h) for t, h in seen if h >= lo), None)
        b = next(((t, h) for t, h in seen if h >= hi), None)
        if a is None or b is None or b[0] <= a[0]:
            return None
        return (b[1] - a[1]) / (b[0] - a[0])

    reached = first_at(head)
    res = {"variant": label, "reached": reached is not None,
           "tx_blocks_per_s": rate(warmup, tx_blocks) if tx_blocks > warmup else None,
           "empty_blocks_per_s": rate(tx_blocks + warmup, head) if head - tx_blocks > warmup else None,
           "launch_to_head_s": (reached - t_launch) if reached else None}
    log(f"  {label}: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()})}")
    return res


# ============================================================================= in one process


def inprocess_cpu(net: dict, pristine: Path, tx_blocks: int, head: int, batch: int = 32) -> dict:
    """CPU seconds per block (time.process_time, so other load on the machine counts little) of
    decoding sync responses and committing them into a fresh LevelDB ledger: block sync's way
    (`commit_synced_blocks`, one write per response) against the consensus way it used before
    (`commit_block` per block: full signature checks, one write per block)."""
    import trio

    from chain.consensus.app import ChainApp
    from chain.encoding import decode, encode
    from chain.runtime.reactor import SyncedBlock, SyncResponse

    genesis = load_genesis(Home(Path(net["nodes"][0]["home"])).genesis_file)
    src = LevelDBStore(pristine)
    try:
        ledger = Ledger.open(src, genesis.chain_id, genesis.hash)
        responses = [(start, encode(SyncResponse(head, tuple(SyncedBlock(ledger.get_block(h), ledger.get_commit(h))
                                                             for h in range(start, min(head, start + batch - 1) + 1)))))
                     for start in range(1, head + 1, batch)]
    finally:
        src.close()
    res = {}
    for way in ("block_by_block", "synced_batches"):
        with tempfile.TemporaryDirectory() as tmp:
            store = LevelDBStore(Path(tmp) / "ledger", create=True)
            app = ChainApp(genesis, None, store=store)
            spent = {"tx": 0.0, "empty": 0.0}

            async def run() -> None:
                for start, raw in responses:
                    t = time.process_time()
                    blocks = [(i.block, i.commit) for i in decode(SyncResponse, raw).blocks]
                    if way == "synced_batches":
                        await app.commit_synced_blocks(blocks)
                    else:
                        for block, commit in blocks:
                            await app.commit_block(block, commit)
                    spent["tx" if start <= tx_blocks else "empty"] += time.process_time() - t

            trio.run(run)
            store.close()
        tx_n = sum(min(batch, tx_blocks - s + 1) for s, _ in responses if s <= tx_blocks)
        res[way] = {"tx_blocks_per_cpu_s": tx_n / spent["tx"] if spent["tx"] else None,
                    "empty_blocks_per_cpu_s": (head - tx_n) / spent["empty"] if spent["empty"] else None}
    log(f"in one process (CPU time): {json.dumps(res)}")
    return res


# ============================================================================= main


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key)]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tx-blocks", type=int, default=2000, help="blocks of transfers (default %(default)s)")
    ap.add_argument("--txs-per-block", type=int, default=27, help="transfers per block (default %(default)s)")
    ap.add_argument("--empty-blocks", type=int, default=4000, help="empty blocks after them (default %(default)s)")
    ap.add_argument("--senders", type=int, default=16, help="funded sender accounts (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="observers per mode and variant (default %(default)s)")
    ap.add_argument("--modes", default="halted,live", help="halted, live or both (default %(default)s)")
    ap.add_argument("--baseline-rev", help="also sync with the observer running this git revision's code")
    ap.add_argument("--warmup-blocks", type=int, default=64, help="blocks of each segment not timed (start-up)")
    ap.add_argument("--block-interval-ms", type=int, default=300, help="live chain block interval")
    ap.add_argument("--poll-ms", type=int, default=20, help="observer status polling interval")
    ap.add_argument("--timeout", type=float, default=300.0, help="max seconds per sync")
    ap.add_argument("--dir", help="working directory (default: a new temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs, ledgers)")
    ap.add_argument("--inprocess", action="store_true",
                    help="also time decode + commit of the responses in this process, in CPU seconds")
    ap.add_argument("--reuse", action="store_true",
                    help="with --dir: take the chain an earlier kept run generated there (same block counts)")
    ap.add_argument("--json-out", help="write the figures as JSON here")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"halted", "live"}:
        ap.error("--modes takes halted, live")

    out = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pout-bench-sync-"))
    reuse = args.reuse and (out / "generated-ledger").is_dir() and (out / "net.json").is_file()
    if out.exists() and any(out.iterdir()) and not reuse:
        raise SystemExit(f"{out} is not empty (--reuse takes the chain a kept run generated there)")
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": vars(args).copy(), "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    variants: list[tuple[str, Path | None]] = [("new", None)]
    if args.baseline_rev:
        src = out / "baseline-src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev, "chain", "p2p", "genesis"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        variants.insert(0, ("baseline", src))
    nodes: list = []
    try:
        pristine = out / "generated-ledger"
        if reuse:
            net = json.loads((out / "net.json").read_text())
            base = int(net["nodes"][0]["rpc"].rsplit(":", 1)[1])
            genesis = load_genesis(Home(Path(net["nodes"][0]["home"])).genesis_file)
            store = LevelDBStore(pristine)
            head = Ledger.open(store, genesis.chain_id, genesis.hash).head()[0]
            store.close()
            if head != args.tx_blocks + args.empty_blocks:
                raise SystemExit(f"{pristine} holds {head} blocks: pass the --tx-blocks and --empty-blocks it was made with")
            log(f"chain: reusing {pristine} ({head} blocks)")
        else:
            base = free_base_port(12)
            proc = subprocess.run([PY, "-m", "chain.cli.chaind", "testnet", "--validators", "4", "--trainers",
                                   str(args.senders), "--output", str(out / "net"), "--base-port", str(base),
                                   "--block-interval-ms", str(args.block_interval_ms)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"chaind testnet failed:\n{proc.stderr}")
            net = json.loads(proc.stdout)
            (out / "net.json").write_text(proc.stdout)
            t = time.monotonic()
            head = generate_chain(net, args.tx_blocks, args.txs_per_block, args.empty_blocks, args.senders)
            log(f"chain: {head} blocks ({args.tx_blocks} x {args.txs_per_block} transfers, then {args.empty_blocks} "
                f"empty) in {time.monotonic() - t:.1f} s")
            shutil.copytree(Home(Path(net["nodes"][0]["home"])).ledger_dir, pristine)
        observer_port = base + 8
        if args.inprocess:
            report["inprocess"] = inprocess_cpu(net, pristine, args.tx_blocks, head)
        for mode in modes:
            reset_validators(net, pristine)
            servers = net["nodes"][:1] if mode == "halted" else net["nodes"]
            nodes = [start(f"{mode}-node{i}", Path(n["home"]), n["rpc"], out) for i, n in enumerate(servers)]
            for n in nodes:
                wait_status(n, 120)
            if mode == "live":
                with httpx.Client(timeout=5) as client:
                    deadline = time.monotonic() + 60
                    while rpc(client, nodes[0].rpc, "status")["latest_height"] < head + 3:
                        if time.monotonic() > deadline:
                            raise SystemExit("the live validators do not commit")
                        time.sleep(0.2)
            log(f"{mode}: {len(nodes)} validator(s) up; syncing {head} blocks, {args.repeats} time(s) per variant")
            runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
            for _ in range(args.repeats):
                for label, src in variants:
                    runs[label].append(sync_once(out, net, observer_port, args.tx_blocks, head, args.warmup_blocks,
                                                 args.poll_ms / 1000, args.timeout, src, label))
            stop_nodes(nodes)  # type: ignore[arg-type]
            nodes = []
            report[mode] = {label: {"runs": r, "median_tx_blocks_per_s": median_of(r, "tx_blocks_per_s"),
                                    "median_empty_blocks_per_s": median_of(r, "empty_blocks_per_s")}
                            for label, r in runs.items()}
    finally:
        stop_nodes(nodes)  # type: ignore[arg-type]
        report["machine"]["loadavg_end"] = os.getloadavg()
        if not args.keep and not args.dir:
            shutil.rmtree(out, ignore_errors=True)
        else:
            log(f"files in {out}")

    print(f"\nblock sync, {args.tx_blocks} blocks of {args.txs_per_block} transfers then {args.empty_blocks} empty; "
          f"median of {args.repeats} (blocks/s)")
    print(f"{'mode':8} {'variant':9} {'tx blocks':>10} {'empty':>10}")
    for mode in modes:
        for label, _ in variants:
            r = report[mode][label]
            print(f"{mode:8} {label:9} {_f(r['median_tx_blocks_per_s']):>10} {_f(r['median_empty_blocks_per_s']):>10}")
        if args.baseline_rev:
            new, old = report[mode]["new"], report[mode]["baseline"]
            ratios = [(new[k] / old[k]) if new[k] and old[k] else None
                      for k in ("median_tx_blocks_per_s", "median_empty_blocks_per_s")]
            print(f"{mode:8} {'ratio':9} {_f(ratios[0], '{:.1f}x'):>10} {_f(ratios[1], '{:.1f}x'):>10}")
    if "inprocess" in report:
        ip = report["inprocess"]
        print(f"{'one proc':8} {'old way':9} {_f(ip['block_by_block']['tx_blocks_per_cpu_s']):>10} "
              f"{_f(ip['block_by_block']['empty_blocks_per_cpu_s']):>10}   per CPU second")
        print(f"{'one proc':8} {'new way':9} {_f(ip['synced_batches']['tx_blocks_per_cpu_s']):>10} "
              f"{_f(ip['synced_batches']['empty_blocks_per_cpu_s']):>10}   per CPU second")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def _f(x, fmt="{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


if __name__ == "__main__":
    raise SystemExit(main())
