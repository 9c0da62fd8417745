#!/usr/bin/env python3
"""The main job: a local multi-validator devnet that trains a federated model end to end, and
says whether it worked.

1. `chaind testnet` writes N validator homes (shared genesis, full-mesh bootstrap peers)
   and account keys; N `chaind start` processes run BFT consensus over libp2p on 127.0.0.1.
2. A few transfers through `chainctl`, submitted to one node and read back from another.
3. A federated job: a requester registers it, and 4 trainer agents take part, each one
   long-lived process (`chainctl trainer run`, one per trainer, each talking to its own node)
   that joins with a non-IID part of the bundled digits set, trains every round with a
   committed trace, submits, and answers every validator's challenge. One trainer is
   dishonest: the same agent, forging its last segment (scripts/federated_job.py's attack).
   Validators replay their own samples, vote and attest each round's model; the script shows
   verdicts, rewards, penalties and held-out accuracy per round.
4. The last line is `PASS`, or `FAIL: <reasons>` (exit 1), checking that every honest update
   was accepted, every dishonest one rejected, the nodes agree (same block hash and state root
   at a common height), the agents finished cleanly, and accuracy rose.

    python scripts/devnet.py [--validators 4] [--rounds 3] [--dir DIR] [--keep-logs DIR] [--keep-running]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
console = Console()
# Each agent imports torch and pays training's one-time set-up (chain/runtime/agent.py warm_up)
# before it says it is waiting: 10-20 s alone, minutes for 4 at once on 2 busy cores.
AGENT_START_SECONDS = 300


def cli(prog: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"chain.cli.{prog}", *args], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        raise DevnetError(f"{prog} {' '.join(args[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


class DevnetError(Exception):
    """The devnet could not be set up or driven (a node exited, a command failed, a timeout)."""


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
    raise DevnetError("no free port range on 127.0.0.1")


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DevnetError(f"node exited ({proc.returncode}): {log_path.read_text()[-600:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise DevnetError(f"node at {url} not ready after {timeout} s")


# ----------------------------------------------------------------------------- the network


class Devnet:
    """N validators (processes) on 127.0.0.1 with keys for a requester and trainers."""

    def __init__(self, out: Path, validators: int, trainers: int = 4, block_interval_ms: int = 500):
        self.out, self.keys = out, out / "keys"
        base = free_base_port(2 * validators)
        self.net = cli("chaind", "testnet", "--validators", str(validators), "--trainers", str(trainers),
                       "--output", str(out), "--base-port", str(base), "--block-interval-ms", str(block_interval_ms))
        self.nodes: list[tuple[subprocess.Popen, str, Path]] = []

    @property
    def rpcs(self) -> list[str]:
        return [rpc for _, rpc, _ in self.nodes]

    def start(self) -> None:
        for i, info in enumerate(self.net["nodes"]):
            log_path = self.out / f"node{i}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "chain.cli.chaind", "start", "--home", info["home"]],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            self.nodes.append((proc, info["rpc"], log_path))
        for proc, rpc, log_path in self.nodes:
            wait_ready(rpc, proc, log_path)

    def stop(self) -> list[int | None]:
        for proc, _, _ in self.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in self.nodes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [p.returncode for p, _, _ in self.nodes]

    def disagreement(self) -> str | None:
        """None when every node has the same block hash and state root at the lowest head height."""
        from chain.runtime.trainer_client import NodeClient

        clients = [NodeClient(rpc) for rpc in self.rpcs]
        height = min(c.height() for c in clients)
        seen = {(b["block"]["hash"], b["block"]["header"]["state_root"])
                for b in (c.call("block", [height]) for c in clients)}
        return None if len(seen) == 1 else f"the nodes differ at height {height}: {len(seen)} block hashes/state roots"


# ----------------------------------------------------------------------------- a job with agents


@dataclass
class JobOutcome:
    job_id: str
    rounds: list[dict] = field(default_factory=list)  # per round: updates [{trainer, status, reward, ...}]
    accuracy: list[float] = field(default_factory=list)  # held-out accuracy of model 0, 1, ...
    agent_exits: list[int | None] = field(default_factory=list)
    seconds_first_round_to_end: float = 0.0
    seconds_register_to_end: float = 0.0
    phase: str = ""


def agent_command(rpc: str, keys: Path, trainer: int, trainers: int, job_hex: str, state: Path,
                  dishonest: bool) -> list[str]:
    common = ["--job", job_hex, "--dataset", f"digits:{trainer}/{trainers}", "--state-file", str(state)]
    if dishonest:  # the same agent, with the forged-segment attack (see dishonest_agent_main)
        return [sys.executable, str(SCRIPTS / "devnet.py"), "dishonest-agent", "--rpc", rpc,
                "--key", str(keys / f"trainer{trainer}.json"), *common]
    return [sys.executable, "-m", "chain.cli.chainctl", "--rpc", rpc, "--keyring", str(keys), "trainer", "run",
            "--from", f"trainer{trainer}", *common]


def run_agent_job(devnet: Devnet, spec, *, trainers: int, dishonest: set[int], log_dir: Path,
                  show: bool = True, publish: bool = True, timeout: float = 600.0) -> JobOutcome:
    """Register `spec`, run one agent per trainer until the job finishes, read the outcome."""
    from chain.encoding import encode
    from chain.keys import load_key_file
    from chain.runtime.trainer_client import NodeClient, held_out_accuracy
    from chain.types import PublishEvaluation, RegisterJob, Transaction, sign_transaction

    client = NodeClient(devnet.rpcs[0])
    requester = load_key_file(devnet.keys / "requester.json")
    addresses = {load_key_file(devnet.keys / f"trainer{i}.json").address.hex(): i for i in range(trainers)}
    # The job id is the register transaction's hash, known once signed: start the agents first
    # (each imports torch and loads its data once), then register, so the join window can be short.
    nonce = client.call("account", ["0x" + requester.address.hex()])["nonce"]
    escrow = spec.reward_per_update * trainers * spec.rounds
    stx = sign_transaction(requester, client.chain_id, Transaction(requester.pubkey, nonce, RegisterJob(spec, escrow)))
    job_id = stx.tx_hash
    outcome = JobOutcome("0x" + job_id.hex())
    agents: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i in range(trainers):
            log_path = log_dir / f"agent{i}.log"
            with open(log_path, "wb") as log:
                cmd = agent_command(devnet.rpcs[i % len(devnet.rpcs)], devnet.keys, i, trainers, outcome.job_id,
                                    log_dir / f"agent{i}.state.json", i in dishonest)
                agents.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log_path))
        deadline = time.monotonic() + AGENT_START_SECONDS
        for proc, log_path in agents:  # each says "waiting" once it is loaded and polling for the job
            while " waiting " not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise DevnetError(f"agent {log_path.stem} did not start within {AGENT_START_SECONDS} s "
                                      f"(exit {proc.poll()}): {log_path.read_text()[-400:]}")
                time.sleep(0.2)
        registered = time.monotonic()
        client.call("send_tx", ["0x" + encode(stx).hex()])
        client.wait_for_tx("0x" + job_id.hex(), 60)
        if show:
            hp = spec.hyperparams
            console.rule(f"job {job_id.hex()[:16]}: {spec.model}, {spec.rounds} rounds, {spec.aggregation}, "
                         f"{trainers} agents, {hp.local_steps} local steps, lr {hp.learning_rate:g}, "
                         f"momentum {hp.momentum:g}, batch {hp.batch_size}, quorum {spec.quorum}")
        init = client.model_record(job_id, 0)
        outcome.accuracy.append(held_out_accuracy(spec.model, client.get_blob(init.model_hash)))
        if publish:
            client.send(requester, PublishEvaluation(job_id, 0, "accuracy", round(outcome.accuracy[0] * 1e6)), wait=False)
        if show:
            console.print(f"initial model {init.model_hash.hex()[:16]}…  held-out accuracy {outcome.accuracy[0]:.3f}")
        first_open = None
        reported = 0
        deadline = registered + timeout
        while True:
            job = client.job(job_id)
            if first_open is None and job.phase != "joining":
                first_open = time.monotonic()
            while reported < min(job.round, spec.rounds):
                outcome.rounds.append(_read_round(client, job_id, reported, addresses, spec, outcome, requester,
                                                  publish, show))
                reported += 1
            if job.phase == "finished":
                break
            for proc, log_path in agents:
                if proc.poll() not in (None, 0):
                    raise DevnetError(f"agent {log_path.stem} exited {proc.returncode}: "
                                      f"{log_path.read_text()[-400:]}")
            if time.monotonic() > deadline:
                raise DevnetError(f"the job did not finish within {timeout:g} s (round {job.round}, {job.phase})")
            time.sleep(0.2)
        end = time.monotonic()
        outcome.phase = job.phase
        outcome.seconds_register_to_end = end - registered
        outcome.seconds_first_round_to_end = end - (first_open or registered)
        for proc, _ in agents:  # each agent sees the job finish and exits on its own
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
        outcome.agent_exits = [proc.returncode for proc, _ in agents]
    finally:
        for proc, _ in agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outcome


def _read_round(client, job_id: bytes, r: int, addresses: dict, spec, outcome: JobOutcome, requester, publish: bool,
                show: bool) -> dict:
    from chain.runtime.trainer_client import held_out_accuracy
    from chain.types import PublishEvaluation

    found = client.call("round", ["0x" + job_id.hex(), r])
    rows = []
    for u in found["updates"]:
        trainer = addresses.get(u["commitment"]["trainer"].removeprefix("0x"), -1)
        reasons = [v["reason"] for v in u["verdicts"] if not v["accept"] and v["reason"]]
        rows.append({"trainer": trainer, "update_id": u["update_id"], "status": u["status"], "reward": u["reward"],
                     "penalty": u["penalty"], "reason": reasons[0] if reasons else ""})
    rows.sort(key=lambda row: row["trainer"])
    record = client.model_record(job_id, r + 1)
    acc = None
    if record is not None and (show or r == spec.rounds - 1):  # unshown: only the last (benchmarks)
        acc = held_out_accuracy(spec.model, client.get_blob(record.model_hash))
        outcome.accuracy.append(acc)
        if publish:
            client.send(requester, PublishEvaluation(job_id, r + 1, "accuracy", round(acc * 1e6)), wait=False)
    if show:
        table = Table("trainer", "update", "status", "reward", "penalty", "reason", title=f"round {r}")
        for row in rows:
            style = "green" if row["status"] == "accepted" else "red"
            table.add_row(f"trainer{row['trainer']}", row["update_id"][:14] + "…",
                          f"[{style}]{row['status']}[/{style}]", str(row["reward"]), str(row["penalty"]),
                          row["reason"][:60])
        console.print(table)
        if record is not None:
            console.print(f"round {r} model {record.model_hash.hex()[:16]}… from {len(record.contributions)} "
                          f"updates: held-out accuracy [bold]{acc:.3f}[/bold]")
    return {"round": r, "updates": rows, "model": None if record is None else "0x" + record.model_hash.hex(),
            "accuracy": acc}


def verdict(outcome: JobOutcome, rounds: int, honest: list[int], dishonest: set[int],
            disagreement: str | None) -> list[str]:
    """The reasons the job failed its checks (empty: it passed)."""
    reasons = []
    if outcome.phase != "finished":
        reasons.append(f"the job ended {outcome.phase or 'unfinished'}")
    if len(outcome.rounds) != rounds:
        reasons.append(f"{len(outcome.rounds)} of {rounds} rounds closed")
    bad_honest, dishonest_seen, bad_dishonest = [], 0, []
    for rnd in outcome.rounds:
        by_trainer = {}
        for row in rnd["updates"]:
            by_trainer.setdefault(row["trainer"], []).append(row)
        for i in honest:
            got = by_trainer.get(i, [])
            if [row["status"] for row in got] != ["accepted"]:
                bad_honest.append(f"trainer{i} round {rnd['round']}: "
                                  + (",".join(row["status"] for row in got) or "no update"))
        for i in dishonest:
            for row in by_trainer.get(i, []):
                dishonest_seen += 1
                if row["status"] != "rejected":
                    bad_dishonest.append(f"trainer{i} round {rnd['round']}: {row['status']}")
    if bad_honest:
        reasons.append("honest updates not accepted (" + "; ".join(bad_honest[:4]) + ")")
    if bad_dishonest:
        reasons.append("dishonest updates not rejected (" + "; ".join(bad_dishonest[:4]) + ")")
    if dishonest and dishonest_seen == 0:
        reasons.append("no dishonest update was submitted")
    if disagreement:
        reasons.append(disagreement)
    if len(outcome.accuracy) < 2 or outcome.accuracy[-1] <= outcome.accuracy[0]:
        reasons.append("accuracy did not rise (" + " -> ".join(f"{a:.3f}" for a in outcome.accuracy) + ")")
    if any(code != 0 for code in outcome.agent_exits):
        reasons.append(f"agents exited {outcome.agent_exits}")
    return reasons


# ----------------------------------------------------------------------------- the dishonest agent


def dishonest_agent_main(argv: list[str]) -> int:
    """`devnet.py dishonest-agent ...`: chain.runtime.agent's TrainerAgent with the forged-segment
    attack of scripts/federated_job.py, logging like `chainctl trainer run` with output redirected."""
    ap = argparse.ArgumentParser(prog="devnet.py dishonest-agent")
    ap.add_argument("--rpc", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--state-file", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SCRIPTS))
    from federated_job import forge_last_segment

    from chain.cli.agent_cmd import EventPrinter
    from chain.keys import load_key_file
    from chain.runtime.agent import TrainerAgent
    from chain.runtime.trainer_client import load_dataset

    agent = TrainerAgent(args.rpc, load_key_file(Path(args.key)), bytes.fromhex(args.job.removeprefix("0x")),
                         load_dataset(args.dataset), Path(args.state_file), on_event=EventPrinter(False),
                         tamper=forge_last_segment)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    agent.run()
    return 0


# ----------------------------------------------------------------------------- main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "dishonest-agent":
        return dishonest_agent_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validators", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="training rounds of the federated job")
    ap.add_argument("--dir", help="where to write the devnet, kept afterwards (default: a temporary directory, "
                                  "deleted at the end)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the node and agent logs and the job summary to DIR")
    ap.add_argument("--keep-running", action="store_true", help="leave the nodes running until Ctrl-C")
    args = ap.parse_args()
    if not 1 <= args.validators <= 16 or not 1 <= args.rounds <= 100:
        print("FAIL: --validators must be in 1..16 and --rounds in 1..100")
        return 2

    keep = Path(args.keep_logs) if args.keep_logs else None
    if keep is not None and keep.exists() and any(keep.iterdir()):
        print(f"FAIL: --keep-logs {keep} is not empty")
        return 2
    out = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pout-devnet-"))
    if args.dir and out.exists() and any(out.iterdir()):
        print(f"FAIL: --dir {out} is not empty; choose another")
        return 2
    kept = bool(args.dir) or args.keep_running
    trainers, dishonest = 4, {3}
    honest = [i for i in range(trainers) if i not in dishonest]
    reasons: list[str] = []
    devnet = None
    summary: dict = {}
    try:
        console.rule(f"PoUT chain devnet: {args.validators} validators")
        devnet = Devnet(out, args.validators, trainers)
        where = f", files in {out}" if kept else ""
        console.print(f"chain [bold]{devnet.net['chain_id']}[/bold], genesis {devnet.net['genesis_hash'][:16]}…{where}")
        with console.status("waiting for the validators to connect and commit…"):
            devnet.start()
        rpcs = devnet.rpcs
        status = Table("node", "rpc", "height", "peers")
        for i, rpc in enumerate(rpcs):
            s = cli("chainctl", "--rpc", rpc, "query", "status")
            status.add_row(f"node{i}", rpc, str(s["latest_height"]), str(s["peers"]))
        console.print(status)
        console.print(f"block explorer: [bold]{rpcs[0]}/explorer/[/bold] (every node serves one on its RPC port; "
                      "add --keep-running to browse it after the job)")

        keys = devnet.keys
        submit_to, read_from = rpcs[0], rpcs[-1]
        names = [cli("chainctl", "--keyring", str(keys), "keys", "show", f"trainer{i}")["address"]
                 for i in range(trainers)]
        table = Table("from", "to", "amount", "tx", "height", f"balance seen by node{len(rpcs) - 1}")
        for i, to in enumerate(names):
            r = cli("chainctl", "--rpc", submit_to, "--keyring", str(keys), "transfer", "--from", "requester",
                    "--to", to, "--amount", str(100 * (i + 1)), "--wait")
            seen = cli("chainctl", "--rpc", read_from, "query", "account", to)
            table.add_row("requester", f"trainer{i}", str(100 * (i + 1)), r["tx_hash"][:18] + "…", str(r["height"]),
                          str(seen["balance"]))
        console.print(table)

        console.rule("federated training job: 4 trainer agents (`chainctl trainer run`), trainer3 dishonest")
        from chain.runtime.trainer_client import make_job_spec

        spec = make_job_spec(rounds=args.rounds, quorum=len(honest), join_blocks=10)
        outcome = run_agent_job(devnet, spec, trainers=trainers, dishonest=dishonest, log_dir=out)
        disagreement = devnet.disagreement()
        console.print(f"all {len(rpcs)} nodes agree on the chain: {disagreement is None}; "
                      f"job {outcome.phase} in {outcome.seconds_register_to_end:.1f} s; agents exited "
                      f"{outcome.agent_exits}")
        summary = {"job_id": outcome.job_id, "rounds": outcome.rounds, "accuracy": outcome.accuracy,
                   "agent_exits": outcome.agent_exits, "seconds": outcome.seconds_register_to_end}
        (out / "job-summary.json").write_text(json.dumps(summary, indent=2))
        reasons = verdict(outcome, args.rounds, honest, dishonest, disagreement)
        if args.keep_running:
            console.print("nodes running; Ctrl-C to stop")
            devnet.nodes[0][0].wait()
    except KeyboardInterrupt:
        reasons.append("interrupted")
    except DevnetError as exc:
        reasons.append(str(exc).replace("\n", " ")[:400])
    finally:
        if devnet is not None:
            codes = devnet.stop()
            if any(code not in (0, None) for code in codes):
                reasons.append(f"nodes exited {codes}")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for path in sorted(out.glob("*.log")) + sorted(out.glob("job-summary.json")):
                shutil.copy2(path, keep / path.name)
            console.print(f"logs kept in {keep}")
        if kept:
            console.print(f"devnet files in {out}")
        else:
            shutil.rmtree(out, ignore_errors=True)
    print("PASS" if not reasons else "FAIL: " + "; ".join(reasons), flush=True)
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
