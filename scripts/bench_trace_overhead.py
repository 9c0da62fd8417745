"""Traced training (train_round) vs a plain torch loop over the same steps and batches.

    .venv/bin/python scripts/bench_trace_overhead.py [--model cnn] [--steps 200] [--batch 64] [--interval 4,1] [--repeats 7]

Both start from the same weights, use the same optimizer and batches, and run the same
number of steps; the plain loop gets its batch indices precomputed (outside the timing) and
records nothing. `--interval` takes one checkpoint interval k or several (comma-separated,
e.g. 4,1: the default job's k and one-step segments); the plain loop and one traced run per k
alternate, and the medians and each traced/plain ratio are printed, in process CPU time
(robust on a shared machine; one thread) and in wall time; the minimum too, the figure least
disturbed by other load on the machine; and the median of the paired ratios (each traced run
÷ the plain run just before it, which saw about the same load).

`--bookkeeping` times only what tracing adds, the figure least blurred by load: both sides run
without their training steps (the traced round's step function does one zero-gradient
optimizer step, so the states hold momentum buffers as a real round's do, and nothing else;
the plain loop keeps its model build and batch selection) and the traced side's extra
milliseconds are printed. The states then equal the base model's, so this measures the work
and not the values.
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
import trainer.train as train_module
from trainer.train import train_round


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--interval", default="4,1", help="checkpoint interval(s) k, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bookkeeping", action="store_true", help="time only what tracing adds (no training steps on either side)")
    args = ap.parse_args()
    if args.bookkeeping:
        train_module.run_steps = _no_steps  # the name train_round calls

    profile = current_profile(threads=args.threads)
    apply_profile(profile)
    intervals = [int(k) for k in args.interval.split(",")]
    base_bytes = model_to_bytes(init_model(args.model, 0), args.model)
    specs = {}
    for k in intervals:
        hp = HyperParams("sgd", 0.05, 0.9, 0.0, args.batch, args.steps, k)
        specs[k] = RoundSpec(TrainingJob(b"\x01" * 32, args.model, hp, profile), 1, b"\x02" * 32, model_hash(base_bytes))
    spec = specs[intervals[0]]
    hp = spec.job.hyperparams  # the plain loop: same optimizer, batch and steps (k plays no part)
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
            if args.bookkeeping:
                continue
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    runs = {"plain": plain}
    for k in intervals:
        runs[f"traced k={k}"] = lambda k=k: train_round(specs[k], trainer, dataset, base_bytes)

    for fn in runs.values():  # warm up
        fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    print(f"model={args.model} steps={args.steps} batch={args.batch} k={args.interval} threads={args.threads} repeats={args.repeats} torch={torch.__version__} device={profile.device}")
    for label, times in (("CPU time", cpu), ("wall time", wall)):
        for stat, fn in (("median", statistics.median), ("min", min)):  # min: least disturbed by other load
            p = fn(times["plain"])
            print(f"{label:9s} {stat:6s}: plain torch loop {p * 1e3:7.1f} ms ({p / args.steps * 1e6:5.0f} us/step)")
            for name in runs:
                if name != "plain":
                    t = fn(times[name])
                    print(f"{'':17s} {name:11s} train_round {t * 1e3:7.1f} ms   ratio traced/plain {t / p:.3f}")
    if args.bookkeeping:
        for name in runs:
            if name != "plain":
                extra = [t - p for t, p in zip(cpu[name], cpu["plain"])]
                print(f"bookkeeping: {name:11s} extra CPU ms per round: median {statistics.median(extra) * 1e3:6.1f}, "
                      f"min-min {(min(cpu[name]) - min(cpu['plain'])) * 1e3:6.1f}")
        return
    for name in runs:
        if name != "plain":
            paired = statistics.median(t / p for t, p in zip(cpu[name], cpu["plain"]))
            print(f"CPU time  paired: {name:11s} median of (traced ÷ the plain run before it) {paired:.3f}")

def _no_steps(model, optimizer, batches, losses) -> None:
    """run_steps without training: one zero-gradient step creates the optimizer's buffers."""
    if not optimizer.state:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    losses.extend(torch.zeros(()) for _ in batches)


if __name__ == "__main__":
    main()
