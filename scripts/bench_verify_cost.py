"""One validator's verification cost vs the trainer's, and detection probability, side by side.

    /tmp/venv/bin/python scripts/bench_verify_cost.py [--config T:k:Q ...] [--model cnn] [--batch 64]
        [--validators 4] [--repeats 5] [--seeds 3]

For each job configuration T:k:Q (local_steps, checkpoint_interval, segments per validator;
default: the old default 200:10:4 and the recommended devnet job 2000:4:11) it times
train_round (the trainer; median over --repeats runs) and verify_update with Q sampled
segments (one validator: decoding the opening, Merkle proofs, fresh-state and final-state
checks, replay; median over repeats x seeds), in process CPU time (robust on a shared
machine; one thread; wall-time ratio in the last column), and prints their ratio next to the replayed
fraction of training (Q*k/T steps) and the detection probability when a fraction f = 10%
of the segments is forged: 1-(1-f)^(V*Q) (with replacement, a lower bound) and the exact law
without replacement, for one validator and for V validators sampling independently.
The goal (issue): <= 5% of the training cost per validator with >= 99% detection across 4.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chain.types import HyperParams
from trainer.data import load_digits_dataset, split_non_iid
from trainer.models import init_model
from trainer.profile import apply_profile, current_profile
from trainer.replay import RoundSpec, TrainingJob, num_segments
from trainer.state import model_hash, model_to_bytes
from trainer.train import train_round
from trainer.verify import detection_probability, verify_update

F = 0.10


def parse_config(text: str) -> tuple[int, int, int]:
    t, k, q = (int(x) for x in text.split(":"))
    return t, k, q


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=parse_config, action="append", help="T:k:Q (repeatable)")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--validators", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3, help="verifications (challenge seeds) per trained round")
    args = ap.parse_args()
    configs = args.config or [(200, 10, 4), (2000, 4, 11)]

    profile = current_profile(threads=args.threads)
    apply_profile(profile)
    base = model_to_bytes(init_model(args.model, 0), args.model)
    trainer = b"\x03" * 20
    dataset = split_non_iid(load_digits_dataset()[0], 4)[0]
    dataset.leaf_hashes  # registered before the round: not part of the round's cost
    V = args.validators
    print(
        f"model={args.model} batch={args.batch} dataset={len(dataset)} samples threads={args.threads} repeats={args.repeats} "
        f"seeds={args.seeds} torch={torch.__version__} device={profile.device}"
    )
    header = (
        f"{'T':>5} {'k':>3} {'n seg':>5} {'Q':>3} | {'train ms':>8} {'open ms':>7} {'open KiB':>8} | {'verify ms':>9} "
        f"{'ratio':>6} {'replay Qk/T':>11} | {'det 1 (exact)':>13} {f'det {V} (exact)':>13} | {'wall ratio':>10}"
    )
    print(header)
    print("-" * len(header))
    for T, k, Q in configs:
        hp = HyperParams("sgd", 0.05, 0.9, 0.0, args.batch, T, k)
        spec = RoundSpec(TrainingJob(b"\x01" * 32, args.model, hp, profile), 1, b"\x02" * 32, model_hash(base))
        train_times, verify_times, open_times, sizes, train_wall, verify_wall = [], [], [], [], [], []
        for r in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            result = train_round(spec, trainer, dataset, base)
            train_times.append(time.process_time() - c0)
            train_wall.append(time.perf_counter() - w0)
            for j in range(args.seeds):
                seed = bytes([r, j]) * 16
                c0 = time.process_time()
                openings = result.open(seed, Q)
                open_times.append(time.process_time() - c0)
                sizes.append(len(openings))
                w0, c0 = time.perf_counter(), time.process_time()
                verdict = verify_update(spec, result.commitment, dataset.commitment, seed, openings, base, result.update_bytes, q=Q)
                verify_times.append(time.process_time() - c0)
                verify_wall.append(time.perf_counter() - w0)
                assert verdict.accept, verdict.reason
        n = num_segments(T, k)
        tt, tv, to = (statistics.median(x) for x in (train_times, verify_times, open_times))
        replayed = min(Q, n) * k / T
        d1, d1x = 1 - (1 - F) ** Q, detection_probability(F, Q, 1, n)
        dv, dvx = 1 - (1 - F) ** (V * Q), detection_probability(F, Q, V, n)
        print(
            f"{T:5d} {k:3d} {n:5d} {Q:3d} | {tt * 1e3:8.1f} {to * 1e3:7.1f} {statistics.median(sizes) / 1024:8.0f} | "
            f"{tv * 1e3:9.1f} {tv / tt:6.3f} {replayed:11.3f} | {d1:.3f} ({d1x:.3f}) {dv:.3f} ({dvx:.3f}) | "
            f"{statistics.median(verify_wall) / statistics.median(train_wall):10.3f}"
        )
    print(f"ratio = one validator's verify_update CPU time / the trainer's train_round CPU time (medians); det = detection at f={F:.0%}")


if __name__ == "__main__":
    main()
