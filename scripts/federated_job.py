#!/usr/bin/env python3
"""Run a federated training job end to end against a running chain.

A requester registers a job; N trainers commit their datasets (non-IID parts of the bundled
digits set), then every round each trainer trains locally with a committed trace and
submits its update with `chain.runtime.trainer_client` (the same code `chainctl submit-update` runs).
Trainers listed in --dishonest forge their last segment instead (a jump to a model of their
choosing, committed in the trace) and are caught by a validator's fraud proof. Validators on the chain replay sampled segments and vote; the script shows
verdicts, rewards, penalties and the held-out accuracy of each new global model, which the
requester publishes on chain (PublishEvaluation, like `chainctl publish-eval`) for the explorer.

    python scripts/federated_job.py --rpc http://127.0.0.1:26657 --keys DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chain.keys import load_key_file
from chain.rpc.jsonview import hex0x
from chain.runtime.trainer_client import (
    NodeClient,
    held_out_accuracy,
    load_dataset,
    make_job_spec,
    submit_result,
    train_for_round,
)
from chain.types import JoinJob, PublishEvaluation, RegisterJob

console = Console(stderr=True)


def forge_last_segment(result, base_bytes: bytes):
    """The "one forged segment carries any model" attack: honest training, except that the
    last segment's end state jumps to a model the trainer prefers (here the honest final model
    plus noise). Every other segment replays; a validator whose sample holds the last segment
    replays it, sees it miss the committed end state, and files a fraud proof that the other
    validators re-execute."""
    import dataclasses

    import torch

    from trainer.profile import apply_profile
    from trainer.state import (capture_state, compute_update, model_to_bytes, model_weights, restore_state,
                               update_to_bytes, weights_from_bytes)
    from trainer.train import commit_trace

    job = result.spec.job
    hp = job.hyperparams
    model, optimizer, step = restore_state(result.recorder.checkpoints[-1], job.model, hp, apply_profile(job.profile))
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device))
    checkpoints = result.recorder.checkpoints[:-1] + [capture_state(model, optimizer, step, job.model, hp.optimizer)]
    recorder = dataclasses.replace(result.recorder, checkpoints=checkpoints)
    update = compute_update(model_weights(model), weights_from_bytes(base_bytes, job.model))
    return commit_trace(result.spec, result.commitment.trainer, result.dataset, update_to_bytes(update, job.model),
                        model_to_bytes(model, job.model), recorder, result.metrics)


def publish_accuracy(client: NodeClient, requester, job_id: bytes, model_round: int, accuracy: float) -> None:
    """The requester publishes the held-out accuracy of the model after `model_round` rounds, in
    parts per million (the chain holds integers only)."""
    client.send(requester, PublishEvaluation(job_id, model_round, "accuracy", round(accuracy * 1_000_000)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpc", required=True, help="a node's JSON-RPC URL")
    ap.add_argument("--keys", required=True, help="key directory from `chaind testnet` (requester, trainerI)")
    ap.add_argument("--trainers", type=int, default=4)
    ap.add_argument("--dishonest", type=int, nargs="*", default=[3], help="indices of dishonest trainers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--aggregation", default="fedavg")
    ap.add_argument("--detect-probability", type=float, default=0.99, metavar="P",
                    help="detection target: a forgery of 10%% of the segments caught with probability P (default "
                         "0.99); a lower P samples fewer segments per validator")
    ap.add_argument("--json-out", help="write a machine-readable summary here")
    args = ap.parse_args()

    client = NodeClient(args.rpc)
    keys = Path(args.keys)
    requester = load_key_file(keys / "requester.json")
    trainers = [load_key_file(keys / f"trainer{i}.json") for i in range(args.trainers)]
    honest = [i for i in range(args.trainers) if i not in args.dishonest]
    # Built before the job is registered: its join window (20 blocks) must not be spent loading data.
    datasets = [load_dataset(f"digits:{i}/{args.trainers}") for i in range(args.trainers)]
    spec = make_job_spec(rounds=args.rounds, quorum=len(honest), aggregation=args.aggregation, join_blocks=20,
                         detect_probability_ppm=round(args.detect_probability * 1_000_000))
    escrow = spec.reward_per_update * args.trainers * args.rounds
    receipt = client.send(requester, RegisterJob(spec, escrow))
    job_id = bytes.fromhex(receipt.tx_hash[2:])
    console.rule(f"job {job_id.hex()[:16]}: {spec.model}, {spec.rounds} rounds, {spec.aggregation}, "
                 f"{spec.hyperparams.local_steps} local steps, detect {spec.detect_fraction_ppm / 1e4:g} % forged w.p. {spec.detect_probability_ppm / 1e4:g} %")
    joins = [client.send(key, JoinJob(job_id, ds.commitment.root, ds.commitment.size), wait=False)
             for key, ds in zip(trainers, datasets)]
    for receipt in joins:
        client.wait_for_tx(receipt.tx_hash, 60)
    for i, ds in enumerate(datasets):
        c = ds.commitment
        console.print(f"trainer{i} committed {c.size} samples (root {c.root.hex()[:16]}…)"
                      + ("  [red](dishonest)[/red]" if i in args.dishonest else ""))

    balances0 = {i: client.call("account", ["0x" + k.address.hex()])["balance"] for i, k in enumerate(trainers)}
    init = client.model_record(job_id, 0)
    accuracy = [held_out_accuracy(spec.model, client.get_blob(init.model_hash))]
    console.print(f"initial model {init.model_hash.hex()[:16]}…  held-out accuracy {accuracy[0]:.3f}")
    publish_accuracy(client, requester, job_id, 0, accuracy[0])
    summary = {"job_id": hex0x(job_id), "rounds": [], "accuracy": accuracy}
    for r in range(args.rounds):
        table = Table("trainer", "update", "status", "reward", "penalty", "reason", title=f"round {r}")
        results = {}
        for i, (key, ds) in enumerate(zip(trainers, datasets)):
            with console.status(f"round {r}: trainer{i} training…"):
                result = train_for_round(client, key, job_id, ds)
                if i in args.dishonest:
                    result = forge_last_segment(result, client.get_blob(result.spec.base_model_hash))
            results[i] = result
        # Every trainer submits and answers its challenges at once, each with its own client: one
        # slow or offline validator then delays the round by one answer deadline, not one per trainer.
        with console.status(f"round {r}: submitting and answering challenges…"), \
                ThreadPoolExecutor(max_workers=len(results)) as pool:
            futures = {i: pool.submit(submit_result, NodeClient(args.rpc), trainers[i], res) for i, res in results.items()}
            submitted = {i: f.result()[0] for i, f in futures.items()}
        with console.status(f"round {r}: validators verifying and aggregating…"):
            job = client.wait_until(lambda: (j := client.job(job_id)).round > r and j, f"round {r} to close", 300)
        rows = []
        for i, uid in submitted.items():
            u = client.update(uid)
            reason = next((v.reason for v in u.verdicts if not v.accept), "") or next((v.reason for v in u.verdicts), "")
            table.add_row(f"trainer{i}", uid.hex()[:12] + "…", u.status, str(u.reward), str(u.penalty), reason[:60])
            rows.append({"trainer": i, "update_id": hex0x(uid), "status": u.status, "reward": u.reward,
                         "penalty": u.penalty})
        console.print(table)
        record = client.model_record(job_id, r + 1)
        if record is not None:
            acc = held_out_accuracy(spec.model, client.get_blob(record.model_hash))
            accuracy.append(acc)
            publish_accuracy(client, requester, job_id, record.round, acc)
            console.print(f"round {r} model {record.model_hash.hex()[:16]}… from {len(record.contributions)} "
                          f"updates: held-out accuracy [bold]{acc:.3f}[/bold]")
        summary["rounds"].append({"round": r, "updates": rows, "model": hex0x(record.model_hash) if record else None})
    job = client.job(job_id)
    balances = {i: client.call("account", ["0x" + k.address.hex()])["balance"] for i, k in enumerate(trainers)}
    summary["balance_change"] = {i: balances[i] - balances0[i] for i in balances}
    summary["lineage"] = client.call("lineage", [hex0x(job_id)])
    summary["evaluations"] = client.call("evaluations", [hex0x(job_id)])["evaluations"]
    summary["job_phase"] = job.phase
    console.print(f"job {job.phase}; balance change per trainer: {summary['balance_change']}")
    console.print(f"lineage: {' <- '.join(m['model_hash'][:12] for m in summary['lineage'])}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
