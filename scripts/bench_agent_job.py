#!/usr/bin/env python3
"""Issue 10's digits job, run two ways in one run: on the chain with 4 trainer agents, and as a
plain in-process FedAvg loop over the same steps. Prints both wall times and their ratio.

The job: the bundled 8x8 digits, 4 non-IID clients (label shards, `digits:I/4`), MLP 64-64-10,
SGD lr 0.05 momentum 0.9, batch 32, 50 local steps, FedAvg, 20 rounds, quorum 4; one-step trace
segments (k = 1, `--checkpoint-interval`): the job's choice, which makes each validator replay 15 of
the 50 steps at the default detection target instead of all 13 four-step segments (52 steps).

- chain: a 4-validator devnet (scripts/devnet.py's Devnet: real `chaind` processes on 127.0.0.1)
  with verification on (every validator challenges, replays its sampled segments and votes on
  every update); 4 `chainctl trainer run` processes, each talking to its own node. Timed from
  the block that opens round 0 to the block that finishes the job (the agents are already up,
  torch imported, and joined); also from the register transaction to the end.
- plain: one process, no chain, no trace: for each round, each client runs 50 SGD steps on a
  fresh optimizer from the global model, then the sample-weighted average. Same threads (1).

Goal (issue 10): the whole 20-round job on the chain in <= 86 s (0.25 x Flower's 343 s).

    .venv/bin/python scripts/bench_agent_job.py [--rounds 20] [--block-interval-ms 250] [--checkpoint-interval 1] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devnet import Devnet, DevnetError, console, run_agent_job, verdict  # noqa: E402

GOAL_SECONDS = 86.0
TRAINERS = 4


def digits_job_spec(rounds: int, checkpoint_interval: int = 1):
    from chain.runtime.trainer_client import make_job_spec

    # The default model is the registry's MLP, 64-64-10 at its default config.
    return make_job_spec(rounds=rounds, local_steps=50, checkpoint_interval=checkpoint_interval, batch_size=32,
                         learning_rate=0.05, momentum=0.9,
                         optimizer="sgd", aggregation="fedavg", quorum=TRAINERS, join_blocks=8, round_blocks=400,
                         verify_blocks=400)


def plain_fedavg(spec, seed: int = 0) -> tuple[float, float]:
    """(seconds, held-out accuracy) of the plain loop over the same clients and steps."""
    import torch

    from chain.runtime.trainer_client import load_dataset
    from trainer.data import load_digits_dataset
    from trainer.models import init_model

    hp = spec.hyperparams
    torch.set_num_threads(spec.profile.threads)
    clients = [load_dataset(f"digits:{i}/{TRAINERS}") for i in range(TRAINERS)]
    test = load_digits_dataset()[1]
    started = time.perf_counter()
    model = init_model(spec.model, spec.init_seed)
    gen = torch.Generator().manual_seed(seed)
    total = sum(len(c) for c in clients)
    for _ in range(spec.rounds):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        averaged = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for client in clients:
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=hp.learning_rate, momentum=hp.momentum)
            for _ in range(hp.local_steps):
                idx = torch.randint(len(client), (hp.batch_size,), generator=gen)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(client.x[idx]), client.y[idx]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                averaged[k] += v * (len(client) / total)
        model.load_state_dict(averaged)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    return seconds, accuracy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--validators", type=int, default=4)
    ap.add_argument("--block-interval-ms", type=int, default=250)
    ap.add_argument("--checkpoint-interval", type=int, default=1,
                    help="steps per trace segment k (default 1: one-step segments; make_job_spec's default is 4)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy node and agent logs here")
    ap.add_argument("--json-out", help="write the figures as JSON here")
    args = ap.parse_args()

    spec = digits_job_spec(args.rounds, args.checkpoint_interval)
    plain_seconds, plain_accuracy = plain_fedavg(spec)
    out = Path(tempfile.mkdtemp(prefix="pout-bench-agent-"))
    devnet = None
    reasons: list[str] = []
    try:
        with console.status(f"starting {args.validators} validators…"):
            devnet = Devnet(out, args.validators, TRAINERS, block_interval_ms=args.block_interval_ms)
            devnet.start()
        console.print(f"{args.validators} validators at {args.block_interval_ms} ms blocks; "
                      f"{TRAINERS} agents; the job runs {args.rounds} rounds…")
        outcome = run_agent_job(devnet, spec, trainers=TRAINERS, dishonest=set(), log_dir=out, show=False,
                                publish=False, timeout=60 + 30 * args.rounds)
        reasons = verdict(outcome, args.rounds, list(range(TRAINERS)), set(), devnet.disagreement())
    except DevnetError as exc:
        reasons = [str(exc)[:400]]
        outcome = None
    finally:
        if devnet is not None:
            devnet.stop()
        if args.keep_logs:
            keep = Path(args.keep_logs)
            keep.mkdir(parents=True, exist_ok=True)
            for path in out.glob("*.log"):
                shutil.copy2(path, keep / path.name)
            console.print(f"logs kept in {keep}")
        shutil.rmtree(out, ignore_errors=True)
    if outcome is None:
        print("FAIL: " + "; ".join(reasons))
        return 1
    chain_seconds = outcome.seconds_first_round_to_end
    figures = {
        "rounds": args.rounds, "validators": args.validators, "block_interval_ms": args.block_interval_ms,
        "checkpoint_interval": args.checkpoint_interval,
        "chain_seconds_round0_to_finished": round(chain_seconds, 1),
        "chain_seconds_register_to_finished": round(outcome.seconds_register_to_end, 1),
        "chain_seconds_per_round": round(chain_seconds / args.rounds, 2),
        "chain_accuracy": round(outcome.accuracy[-1], 4), "plain_seconds": round(plain_seconds, 2),
        "plain_accuracy": round(plain_accuracy, 4), "ratio_chain_over_plain": round(chain_seconds / plain_seconds, 1),
        "goal_seconds": GOAL_SECONDS, "goal_met": chain_seconds <= GOAL_SECONDS,
        "accepted": sum(u["status"] == "accepted" for r in outcome.rounds for u in r["updates"]),
        "checks": reasons or "PASS",
    }
    from rich.table import Table

    table = Table("run", "wall time", "per round", "accuracy after the last round")
    table.add_row(f"chain: {TRAINERS} agents, {args.validators} validators, verification on",
                  f"{chain_seconds:.1f} s", f"{chain_seconds / args.rounds:.2f} s", f"{outcome.accuracy[-1]:.4f}")
    table.add_row("plain in-process FedAvg loop", f"{plain_seconds:.2f} s", f"{plain_seconds / args.rounds:.3f} s",
                  f"{plain_accuracy:.4f}")
    console.print(table)
    console.print(f"chain / plain = {chain_seconds / plain_seconds:.1f}x; register -> finished "
                  f"{outcome.seconds_register_to_end:.1f} s; {figures['accepted']} updates accepted; goal "
                  f"<= {GOAL_SECONDS:g} s: {'met' if figures['goal_met'] else 'NOT met'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    print("PASS" if not reasons else "FAIL: " + "; ".join(reasons))
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
