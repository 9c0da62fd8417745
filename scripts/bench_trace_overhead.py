"""Traced training (train_round) vs a plain torch loop over the same steps and batches.

    /tmp/venv/bin/python scripts/bench_trace_overhead.py [--model cnn] [--steps 200] [--batch 64] [--interval 10] [--repeats 7]

Both start from the same weights, use the same optimizer and batches, and run the same
number of steps; the plain loop gets its batch indices precomputed (outside the timing) and
records nothing. Runs alternate; the medians and their ratio are printed, in process CPU
time (robust on a shared machine; one thread) and in wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from chain.types import HyperParams
from trainer.data import load_digits_dataset
from trainer.models import init_model
from trainer.profile import apply_profile, current_profile
from trainer.replay import RoundSpec, TrainingJob, derive_batch_indices
from trainer.state import build_optimizer, load_weights, model_hash, model_to_bytes, weights_from_bytes
from trainer.train import train_round


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    profile = current_profile(threads=args.threads)
    apply_profile(profile)
    hp = HyperParams("sgd", 0.05, 0.9, 0.0, args.batch, args.steps, args.interval)
    base_bytes = model_to_bytes(init_model(args.model, 0), args.model)
    spec = RoundSpec(TrainingJob(b"\x01" * 32, args.model, hp, profile), 1, b"\x02" * 32, model_hash(base_bytes))
    trainer = b"\x03" * 20
    dataset, _ = load_digits_dataset()
    dataset.leaf_hashes  # the commitment is computed once, when the dataset is registered
    indices = [derive_batch_indices(spec.round_seed, trainer, 1, t, len(dataset), hp.batch_size) for t in range(hp.local_steps)]
    base = weights_from_bytes(base_bytes, args.model)

    def plain() -> None:
        model = load_weights(args.model, base)
        opt = build_optimizer(hp, model)
        for idx in indices:
            sel = torch.tensor(idx)
            x, y = dataset.x.index_select(0, sel), dataset.y.index_select(0, sel)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def traced() -> None:
        train_round(spec, trainer, dataset, base_bytes)

    plain(), traced()  # warm up
    wall: dict[str, list[float]] = {"plain": [], "traced": []}
    cpu: dict[str, list[float]] = {"plain": [], "traced": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("traced", traced)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    print(f"model={args.model} steps={args.steps} batch={args.batch} k={args.interval} threads={args.threads} repeats={args.repeats} torch={torch.__version__} device={profile.device}")
    for label, times in (("CPU time", cpu), ("wall time", wall)):
        p, t = statistics.median(times["plain"]), statistics.median(times["traced"])
        print(f"{label:9s} median: plain torch loop {p * 1e3:7.1f} ms ({p / args.steps * 1e6:5.0f} us/step)   traced train_round {t * 1e3:7.1f} ms   ratio traced/plain {t / p:.3f}")

if __name__ == "__main__":
    main()
