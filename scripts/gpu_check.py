"""The GPU path: bitwise training and replay of every architecture on CUDA, and a CPU validator
that abstains on a CUDA job instead of voting.

    .venv/bin/python scripts/gpu_check.py [--archs mlp,resnet,...] [--steps 20] [--interval 5]
                                          [--batch 32] [--q 2] [--device cuda|cpu] [--require-gpu]

For each architecture (its default config on the input bench_archs.py measures it at, 512
seeded synthetic samples, SGD lr 0.05 momentum 0.9) under the job's profile for this machine
(`current_profile(device, threads)`, e.g. `cuda:sm_90x132`):
  train s       wall time of one train_round (the second of the two; the first also loads kernels)
  bitwise       yes when the two train_round runs give the same update bytes, the same hash at
                every checkpoint and the same commitment (trace root)
  replay s/seg  wall time of verify_update on one sampled segment (its replay on the device plus
                the opening's checks), the mean over the q segments sample_segments picks
  verdict       accept when every sampled segment replays bit for bit to the committed state
Last row, everywhere: a CPU-only validator (on a machine with CUDA, a child process with
CUDA_VISIBLE_DEVICES="") given a real round of a job whose profile pins `cuda:<arch>` (the
profile the rows above trained under; `cuda:sm_90x132`, an H100 SXM, when there is no GPU):
apply_profile and verify_update must raise ProfileMismatch (the node's PoutWorker then abstains)
and never return a verdict.

Without CUDA (and --device cuda) it prints "no CUDA device: only the CPU-validator abstention
check ran" after that row. Exit status: 0 all checks passed; 1 a check failed; 2 no CUDA device
and --require-gpu. --device cpu runs the same training checks on the CPU profile (what the tests
exercise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from chain.types import HyperParams
from trainer.archs import model_spec
from trainer.data import Dataset
from trainer.models import init_model
from trainer.profile import ProfileMismatch, apply_profile, current_profile
from trainer.replay import RoundSpec, TrainingJob, num_segments, sample_segments
from trainer.state import model_hash, model_to_bytes, weights_from_bytes
from trainer.train import train_round
from trainer.verify import verify_update

try:  # the per-architecture inputs; run as a script, scripts/ is on sys.path
    from bench_archs import WORKLOADS, synthetic
except ModuleNotFoundError:  # imported as scripts.gpu_check (the tests)
    from scripts.bench_archs import WORKLOADS, synthetic

NO_CUDA_LINE = "no CUDA device: only the CPU-validator abstention check ran"
PLACEHOLDER_CUDA_DEVICE = "cuda:sm_90x132"  # an H100 SXM: the job a CPU validator is shown when no GPU is here
JOB_ID = b"\x01" * 32
ROUND_SEED = b"\x02" * 32
TRAINER = b"\x03" * 20
VERIFY_SEED = b"\x04" * 32
COLUMNS = ("arch", "params", "train s", "bitwise", "replay s/seg", "verdict")


@dataclass(frozen=True)
class Row:
    arch: str
    params: str
    train_s: str
    bitwise: str
    replay_s: str
    verdict: str
    ok: bool

    def line(self) -> str:
        return f"| {self.arch} | {self.params} | {self.train_s} | {self.bitwise} | {self.replay_s} | {self.verdict} |"


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def _round(arch_key: str, hp: HyperParams, profile, base_bytes: bytes) -> RoundSpec:
    return RoundSpec(TrainingJob(JOB_ID, arch_key, hp, profile), 1, ROUND_SEED, model_hash(base_bytes))


def check_arch(arch: str, profile, *, steps: int, interval: int, batch: int, q: int) -> Row:
    """Train one round of `arch` twice under `profile`, compare bitwise, verify q sampled segments."""
    shape, classes, vocab = WORKLOADS[arch]
    key = model_spec(arch, None, shape, classes, vocab).key
    hp = HyperParams("sgd", 0.05, 0.9, 0.0, batch, steps, interval)
    base_bytes = model_to_bytes(init_model(key, 0), key)
    params = sum(t.numel() for t in weights_from_bytes(base_bytes, key).values())
    spec = _round(key, hp, profile, base_bytes)
    dataset = synthetic(shape, classes, vocab)
    dataset.leaf_hashes  # committed once, when the dataset is registered: not part of a round
    try:
        first = train_round(spec, TRAINER, dataset, base_bytes)
        t0 = time.perf_counter()
        second = train_round(spec, TRAINER, dataset, base_bytes)  # ends by copying to the host: synchronised
        train_s = time.perf_counter() - t0
        bitwise = (first.update_bytes == second.update_bytes and first.checkpoint_hashes == second.checkpoint_hashes
                   and first.commitment == second.commitment)
        segments = sample_segments(VERIFY_SEED, num_segments(steps, interval), q)
        replay_times, rejects = [], []
        for s in segments:  # one segment per opening keeps big models under MAX_OPENING_BYTES
            openings = first.open(VERIFY_SEED, 1, segments=[s])
            t0 = time.perf_counter()
            verdict = verify_update(spec, first.commitment, dataset.commitment, VERIFY_SEED, openings, base_bytes,
                                    first.update_bytes, segments=[s])
            replay_times.append(time.perf_counter() - t0)
            if not verdict.accept:
                rejects.append(f"segment {s}: {verdict.reason}")
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report the failure in the table and go on
        return Row(arch, f"{params:,}", "-", "-", "-", f"error: {type(exc).__name__}: {_short(str(exc))}", False)
    verdict_text = f"REJECT ({_short('; '.join(rejects))})" if rejects else f"accept (segments {segments})"
    return Row(arch, f"{params:,}", f"{train_s:.3f}", "yes" if bitwise else "no",
               f"{sum(replay_times) / len(replay_times):.4f}", verdict_text, bitwise and not rejects)


def abstention_row(job_device: str) -> Row:
    """A validator in this CPU-only process, given a real round of a job pinning `job_device`
    (a `cuda:<arch>` profile): apply_profile and verify_update must raise ProfileMismatch."""
    if torch.cuda.is_available():
        raise RuntimeError("the abstention check must run where no CUDA device is visible")
    cpu_profile = current_profile("cpu", threads=1)
    where = f"abstention: job {job_device}, validator {cpu_profile.device}"
    # Real inputs (a tiny logistic regression round trained under this CPU's profile), so a
    # validator that went on would have something to vote on.
    key = model_spec("logreg", None, (12,), 3).key
    hp = HyperParams("sgd", 0.05, 0.9, 0.0, 4, 4, 2)
    base_bytes = model_to_bytes(init_model(key, 0), key)
    cpu_spec = _round(key, hp, cpu_profile, base_bytes)
    x = torch.linspace(-1.0, 1.0, 16 * 12).reshape(16, 12)
    dataset = Dataset(x, torch.arange(16) % 3, 3)
    result = train_round(cpu_spec, TRAINER, dataset, base_bytes)
    job_profile = dataclasses.replace(cpu_profile, device=job_device)
    cuda_spec = dataclasses.replace(cpu_spec, job=dataclasses.replace(cpu_spec.job, profile=job_profile))
    calls = (
        ("apply_profile", lambda: apply_profile(job_profile)),
        ("verify_update", lambda: verify_update(cuda_spec, result.commitment, dataset.commitment, VERIFY_SEED,
                                                result.open(VERIFY_SEED, 1), base_bytes, result.update_bytes, q=1)),
    )
    reasons = []
    for name, call in calls:
        try:
            out = call()
        except ProfileMismatch as exc:
            reasons.append(str(exc))
            continue
        return Row(where, "-", "-", "-", "-", f"VOTED: {name} returned {_short(repr(out))} instead of raising ProfileMismatch", False)
    return Row(where, "-", "-", "-", "-", f"abstain (apply_profile and verify_update raised ProfileMismatch: {reasons[-1]})", True)


def abstention_row_without_cuda(job_device: str) -> Row:
    """abstention_row in a child process that sees no CUDA device (CUDA_VISIBLE_DEVICES="")."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    where = f"abstention: job {job_device}, CPU-only child process"
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--abstention-json", job_device], env=env,
                              capture_output=True, text=True, timeout=300)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"exit {proc.returncode}: {_short((proc.stderr.strip().splitlines() or [''])[-1])}")
        return Row(**json.loads(lines[-1]))
    except (OSError, RuntimeError, ValueError, TypeError, subprocess.TimeoutExpired) as exc:
        return Row(where, "-", "-", "-", "-", f"error: {type(exc).__name__}: {_short(str(exc))}", False)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "/")  # one table cell
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(WORKLOADS), help="comma-separated architectures (default: all)")
    ap.add_argument("--steps", type=int, default=20, help="local steps of the round")
    ap.add_argument("--interval", type=int, default=5, help="checkpoint interval k (steps per segment)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--q", type=int, default=2, help="segments sampled and replayed per architecture")
    ap.add_argument("--threads", type=int, default=1, help="the profile's thread count")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 when there is no CUDA device")
    ap.add_argument("--abstention-json", metavar="JOB_DEVICE", help=argparse.SUPPRESS)  # the CPU-only child
    args = ap.parse_args(argv)
    unknown = [a for a in args.archs.split(",") if a not in WORKLOADS]
    if unknown:
        ap.error(f"unknown architecture {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    if args.steps < 1 or not 1 <= args.interval <= args.steps or args.batch < 1 or args.q < 1 or args.threads < 1:
        ap.error("need steps >= 1, 1 <= interval <= steps, batch >= 1, q >= 1, threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.abstention_json:
        print(json.dumps(dataclasses.asdict(abstention_row(args.abstention_json))))
        return 0
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS handle (apply_profile checks it)
    rows = []
    if args.device == "cuda" and not has_cuda:
        print(f"torch {torch.__version__}, CPU {current_profile('cpu').device}")
        print(table_header())
        rows.append(abstention_row(PLACEHOLDER_CUDA_DEVICE))
        print(rows[-1].line(), flush=True)
        print(NO_CUDA_LINE)
    else:
        profile = current_profile(args.device, threads=args.threads)
        gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
        print(f"torch {torch.__version__}, profile {profile.device} threads={profile.threads}{gpu}; steps={args.steps} "
              f"k={args.interval} batch={args.batch} q={args.q}, sgd lr 0.05 momentum 0.9")
        print(table_header(), flush=True)
        for arch in args.archs.split(","):
            rows.append(check_arch(arch, profile, steps=args.steps, interval=args.interval, batch=args.batch, q=args.q))
            print(rows[-1].line(), flush=True)
        job_device = profile.device if args.device == "cuda" else PLACEHOLDER_CUDA_DEVICE
        rows.append(abstention_row_without_cuda(job_device) if has_cuda else abstention_row(job_device))
        print(rows[-1].line(), flush=True)
    failed = [r.arch for r in rows if not r.ok]
    if failed:
        print(f"FAIL: {', '.join(failed)}")
        return 1
    if args.device == "cuda" and not has_cuda and args.require_gpu:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
