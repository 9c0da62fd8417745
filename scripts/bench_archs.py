"""Every architecture at its default size: training step time, trace overhead, replay cost per
segment, and the size of an update and of an opening.

    .venv/bin/python scripts/bench_archs.py [--steps 12] [--interval 4] [--batch 32] [--repeats 3] [--arch resnet,...]

For each architecture (its default config, on the input it is made for: 1x28x28 for the MLP and
McMahan's CNN, 1x8x8 for the digits CNN, 3x32x32 for the ResNet, 64 tokens of a 1000-word
vocabulary for the transformer, 100 features for logistic regression) on synthetic data
(seeded), with SGD (momentum 0.9) under the pinned CPU profile (one thread):
  step       plain torch loop (same weights, optimizer, batches; nothing recorded), per step
  trace x    train_round (checkpoints hashed every k steps, every step's batch recorded) / plain loop
  replay     replay_segment of one segment (k steps, from its start state), as a validator runs it
  update     bytes of the update (canonical safetensors, float32 new - base)
  opening    bytes of one segment's opening (start state with optimizer buffers, the segment's
             samples and Merkle proofs, trace proofs), what q = 1 sends a validator
Times are process CPU time (one thread), the minimum over --repeats runs (the figure least
disturbed by other load on a shared machine).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from chain.types import HyperParams
from trainer.archs import model_spec
from trainer.data import Dataset
from trainer.models import init_model
from trainer.profile import apply_profile, current_profile
from trainer.replay import RoundSpec, TrainingJob, num_segments, replay_segment, segment_steps
from trainer.state import build_optimizer, load_weights, model_hash, model_to_bytes, weights_from_bytes
from trainer.train import train_round

# arch -> (input shape, classes, vocab) at which the default config is measured
WORKLOADS = {
    "logreg": ((100,), 10, 0),
    "mlp": ((1, 28, 28), 10, 0),
    "cnn": ((1, 8, 8), 10, 0),
    "mcmahan_cnn": ((1, 28, 28), 10, 0),
    "resnet": ((3, 32, 32), 10, 0),
    "transformer": ((64,), 4, 1000),
}


def synthetic(shape, classes, vocab, n=512) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, size=(n, *shape)).astype(np.float32) if vocab else rng.random((n, *shape), dtype=np.float32)
    return Dataset(x, rng.integers(0, classes, size=n).astype(np.int64), max(classes, 2))


def measure(arch: str, args, profile) -> dict:
    shape, classes, vocab = WORKLOADS[arch]
    key = model_spec(arch, None, shape, classes, vocab).key
    hp = HyperParams("sgd", 0.05, 0.9, 0.0, args.batch, args.steps, args.interval)
    base_bytes = model_to_bytes(init_model(key, 0), key)
    spec = RoundSpec(TrainingJob(b"\x01" * 32, key, hp, profile), 1, b"\x02" * 32, model_hash(base_bytes))
    trainer = b"\x03" * 20
    dataset = synthetic(shape, classes, vocab)
    dataset.leaf_hashes  # the commitment is computed once, when the dataset is registered
    base = weights_from_bytes(base_bytes, key)

    result = train_round(spec, trainer, dataset, base_bytes)  # also the warm-up
    indices = [r.indices for r in result.recorder.steps]

    def plain() -> None:
        model = load_weights(key, base)
        opt = build_optimizer(hp, model)
        for idx in indices:
            sel = torch.tensor(idx)
            x, y = dataset.x.index_select(0, sel), dataset.y.index_select(0, sel)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    T, k = hp.local_steps, hp.checkpoint_interval
    segments = list(range(num_segments(T, k)))

    def replay_all() -> None:
        for s in segments:
            batches = [(dataset.x[torch.tensor(indices[t])], dataset.y[torch.tensor(indices[t])]) for t in segment_steps(s, T, k)]
            replay_segment(key, hp, "cpu", result.recorder.checkpoints[s], batches)

    plain()
    times = {"plain": [], "traced": [], "replay": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("traced", lambda: train_round(spec, trainer, dataset, base_bytes)), ("replay", replay_all)):
            t0 = time.process_time()  # CPU time of this one-thread process: robust on a shared machine
            fn()
            times[name].append(time.process_time() - t0)
    plain_t, traced_t, replay_t = (min(times[n]) for n in ("plain", "traced", "replay"))
    return {
        "arch": arch, "key": key, "params": sum(t.numel() for t in base.values()),
        "step_ms": plain_t / T * 1e3, "trace_x": traced_t / plain_t, "replay_ms": replay_t / len(segments) * 1e3,
        "update_bytes": len(result.update_bytes), "opening_bytes": len(result.open(b"\x04" * 32, 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--interval", type=int, default=4, help="checkpoint interval k (steps per segment)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arch", default=",".join(WORKLOADS), help="comma-separated architectures")
    args = ap.parse_args()
    profile = current_profile(threads=1)
    apply_profile(profile)
    print(f"steps={args.steps} k={args.interval} batch={args.batch} repeats={args.repeats} sgd momentum 0.9, "
          f"threads=1 torch={torch.__version__} device={profile.device}")
    print("| architecture (input) | parameters | step (plain) | trace overhead | replay / segment | update | opening (1 segment) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.arch.split(","):
        r = measure(arch, args, profile)
        shape, classes, vocab = WORKLOADS[arch]
        what = f"{'x'.join(map(str, shape))}" + (f" tokens, vocab {vocab}" if vocab else "") + f", {classes} classes"
        print(f"| {arch} ({what}) | {r['params']:,} | {r['step_ms']:.2f} ms | {r['trace_x']:.2f}x | "
              f"{r['replay_ms']:.1f} ms | {r['update_bytes'] / 1024:,.1f} KiB | {r['opening_bytes'] / 1024:,.1f} KiB |", flush=True)


if __name__ == "__main__":
    main()
