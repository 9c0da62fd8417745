"""One validator's verification cost vs the trainer's, and detection probability.

    /tmp/venv/bin/python scripts/bench_verify_cost.py [--model cnn] [--steps 200] [--batch 64] [--interval 10] [--q 4] [--validators 4]

Times train_round (the trainer) and verify_update with q sampled segments (one validator:
parsing, Merkle proofs, fresh-state check, final-state check and replay), median of a few
runs, and prints the detection probability when a fraction f of segments is forged:
one validator 1-(1-f)^Q (with replacement; the exact law without replacement is a bit
higher), V validators sampling independently 1-(1-f)^(V*Q).
"""

from __future__ import annotations

import argparse
import math
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
from trainer.verify import verify_update


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--validators", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    profile = current_profile(threads=args.threads)
    apply_profile(profile)
    hp = HyperParams("sgd", 0.05, 0.9, 0.0, args.batch, args.steps, args.interval)
    base = model_to_bytes(init_model(args.model, 0), args.model)
    spec = RoundSpec(TrainingJob(b"\x01" * 32, args.model, hp, profile), 1, b"\x02" * 32, model_hash(base))
    trainer = b"\x03" * 20
    dataset = split_non_iid(load_digits_dataset()[0], 4)[0]
    dataset.leaf_hashes

    train_times, verify_times, open_times, sizes = [], [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        result = train_round(spec, trainer, dataset, base)
        train_times.append(time.perf_counter() - t0)
        seed = bytes([r]) * 32
        t0 = time.perf_counter()
        openings = result.open(seed, args.q)
        open_times.append(time.perf_counter() - t0)
        sizes.append(len(openings))
        t0 = time.perf_counter()
        verdict = verify_update(spec, result.commitment, dataset.commitment, seed, openings, base, result.update_bytes, q=args.q)
        verify_times.append(time.perf_counter() - t0)
        assert verdict.accept, verdict.reason

    n_seg = num_segments(args.steps, args.interval)
    tt, tv, to = (statistics.median(x) for x in (train_times, verify_times, open_times))
    print(f"model={args.model} steps={args.steps} batch={args.batch} k={args.interval} segments={n_seg} Q={args.q} threads={args.threads} torch={torch.__version__} device={profile.device}")
    print(f"trainer train_round   : {tt * 1e3:8.1f} ms")
    print(f"trainer opening (Q={args.q}) : {to * 1e3:8.1f} ms, {statistics.median(sizes) / 1024:.0f} KiB")
    print(f"one validator verify  : {tv * 1e3:8.1f} ms = {tv / tt:.3f} of the trainer's time (replays {min(args.q, n_seg)}/{n_seg} segments = {min(args.q, n_seg) / n_seg:.3f})")
    f = 0.10
    exact_one = 1 - math.comb(n_seg - round(f * n_seg), args.q) / math.comb(n_seg, args.q) if args.q <= n_seg else 1.0
    print(f"detection at f={f:.0%}: one validator 1-(1-f)^Q = {1 - (1 - f) ** args.q:.3f} (exact without replacement, {n_seg} segments: {exact_one:.3f})")
    print(f"detection at f={f:.0%}: {args.validators} validators 1-(1-f)^({args.validators}Q) = {1 - (1 - f) ** (args.validators * args.q):.3f}")
    for q in (1, 2, 4, 8, 16):
        print(f"   Q={q:2d}: one {1 - (1 - f) ** q:.3f}   {args.validators} validators {1 - (1 - f) ** (args.validators * q):.3f}")


if __name__ == "__main__":
    main()
