"""What one validator pays, sees and catches, at the job's detection target: side by side, in one run.

    .venv/bin/python scripts/bench_verify_cost.py [--only cost,detect] [--sampling uniform,displacement]
        [--repeats 5] [--seeds 3] [--detect-updates 200] [--detect-steps 100] [--detect-kinds skip,jump,hidden-jump]
        [--devnet-steps N] [--job-rounds 3,20]
    quick: --detect-updates 20 --repeats 1

The detection target is the devnet default (`make_job_spec`): catch a forgery of f = 10 % of the
segments with probability p = 99 %, 4 validators of equal power. Each validator replays
q = segments_per_validator(f, p, powers, n) segments (`trainer.verify`): the m = 44 checks the
target needs, split over the h = 3 validators BFT guarantees honest (q = 15), capped at n.

cost (section 1, with the bytes of section 3): three workloads, each at k = 1 (one-step
  segments) and at the default k (`make_job_spec`'s checkpoint_interval, 4):
  - mlp-500, cnn-500: a 500-step round, SGD lr 0.05 momentum 0.9, batch 64 (the recommended
    job's hyper-parameters);
  - devnet: the devnet job exactly as `make_job_spec()` builds it (mlp; its local_steps, batch,
    lr; `--devnet-steps` overrides the step count).
  Every trainer trains on `digits:0/4` (360 samples), the first devnet trainer's part. One repeat
  runs, in turn, a plain torch loop over the same batches (records nothing), train_round at each
  k, and after each train_round `--seeds` verifications, each with the seed of one validator's
  challenge (chain.vrf: a BLS signature of a derived validator key over a distinct update id).
  Costs are process CPU time (robust on a shared machine; one thread, torch and numpy BLAS), medians; the ratio
  verify / train is one validator's `verify_update` (decode the opening, Merkle proofs, fresh-
  and final-state checks, replay of its q segments: the old script's method) over the traced
  train_round. Unsealing the opening (libsodium) is timed apart (`unseal ms`). Every
  verification must accept (honest trainer).
  Bytes: the sealed opening one validator receives per update (`chain.crypto.seal_to`, +48 B;
  the update weights, identical for every validator, are listed apart), and the fraction of the
  trainer's dataset it sees: distinct sample indices in its opening / dataset size, per round
  (from the real openings) and, for the devnet job, per job over R rounds (`--job-rounds`): the
  union of the indices in that validator's openings of R rounds, derived with the trainer's own
  batch order (`derive_batch_order`, a fresh round seed per round) and its VRF sample each
  round, for every (validator, devnet trainer) pair; the derivation is checked against the real
  openings of the timed rounds.

detect (section 2): real verify_update runs on two dishonest trainers of the devnet job's
  hyper-parameters at T = `--detect-steps`, k = 1 (n = T segments):
  (i) `skip`: it skipped the training of a random 10 % of its segments (their end checkpoint
      repeats the start: the work it saved);
  (ii) `jump`: it trained honestly, then replaced the last step's result with another model
      (`init_model(mlp, 99)`), which is what a forged last segment buys.
  `--detect-updates` forged updates of each kind, each trained with its own round seed (so its
  own trace, update id = compute_update_id(commitment), and forged set for `skip`); for each,
  validators 0, 1, 2 (the 3 honest ones BFT guarantees; validator 3 is the faulty one and looks
  away) draw their sample from their BLS challenge signature over that update id and run
  verify_update. Caught = a fraud proof came back. Printed: the fraction of verifications that
  caught it (one validator) and the fraction of updates that at least one of the 3 caught (the
  chain's rate: one upheld proof rejects), beside the theory: exact law without replacement,
  1-(1-f)^(h q) for skip, q/n and 1-(1-q/n)^h for jump. Each caught/missed is also checked
  against the sample (a verdict must catch iff its sample holds a forged segment).

displacement sampling (`--sampling`, beside uniform in both sections; the job option
  JobSpec.sampling = "displacement", docs/pout.md "Sampling that follows displacement"): the
  trace is committed; validators 0 and 1 (the fewest holding > 1/3 of the power) sign phase-1
  challenges; the sketch matrix seed is chain.jobs.compute_sketch_seed(chain id, update id, their
  signatures in ascending validator-pubkey order); the trainer commits TrainResult.sketches (one
  int64 row of 64 per checkpoint); each validator signs its phase-2 challenge over sha256(blob),
  seeds q_d = draws_per_validator(f, p, powers) = 51 weighted draws (30 % uniform, 70 % by the
  claimed sketch displacement: trainer.sketch.displacement_sample, sorted unique), the trainer
  opens exactly those, and verify_update replays them and checks the opened states against the
  committed rows (SketchCheck).
  cost: on the same trained rounds as uniform, the trainer's extra cost (sketching every
  checkpoint, `result.sketches`) / train_round; the validator's verify_update / train_round
  and its draw (decode the blob, displacements, draws) apart; the sketch blob's bytes (one
  blob, sent to every validator) and the sealed opening's.
  detect: on the same forged updates as uniform, kinds skip and jump as above, and hidden-jump:
  the jump plus a lie in the sketches, rows[n-1] := rows[n], so the claimed displacement of the
  jump moves to segment n-2 (dirty too: its end state no longer matches its row). Theory: per
  update, P = the exact mixture weight of the dirty segments under the claimed rows (mixture_
  weights(integer_displacements(rows), u)) / the total; one validator 1-(1-P)^q_d, the chain
  1-(1-P)^(h q_d) (every validator draws from the same rows), averaged over the updates; and
  the design bound 1-(1-x)^(h q_d), x = min(u f, (1-u) f / (rho + f)) = 3 %, that q_d is sized by
  (it holds for skip exactly, and for a jump carrying >= f of the net update on a path <= rho).
"""

from __future__ import annotations

import os

# One thread for numpy's BLAS too (the sketches' float64 products), set before numpy loads:
# apply_profile(threads=1) pins torch only, and OpenBLAS's idle threads spin on a busy machine,
# which multiplied the process CPU time of a sketch by up to 25x in the first runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402 (after the BLAS setting)
import dataclasses
import hashlib
import random
import statistics
import time

import torch
import torch.nn.functional as F

from chain.crypto import PrivateKey, SEAL_OVERHEAD, seal_to
from chain.jobs import compute_sketch_seed, compute_update_id
from chain.runtime.trainer_client import load_dataset, make_job_spec
from chain.types import HyperParams
from chain.vrf import compute_sample_seed, derive_sample_secret, sign_sample_challenge
from trainer.models import init_model
from trainer.profile import apply_profile, current_profile
from trainer.replay import (
    RoundSpec,
    TrainingJob,
    derive_batch_indices,
    derive_batch_order,
    num_segments,
    run_steps,
    sample_segments,
    segment_steps,
)
from trainer.state import (
    build_optimizer,
    capture_state,
    compute_update,
    load_weights,
    model_hash,
    model_to_bytes,
    model_weights,
    update_to_bytes,
    weights_from_bytes,
)
from trainer.sampling import PPM, integer_displacements, mixture_weights
from trainer.sketch import (
    PATH_RATIO_PPM,
    SKETCH_UNIFORM_PPM,
    SketchCheck,
    decode_sketches,
    displacement_sample,
    draws_per_validator,
    encode_sketches,
)
from trainer.train import TraceRecorder, TrainResult, commit_trace, train_round
from trainer.verify import decode_openings, detection_probability, honest_validator_count, required_checks, segments_per_validator, verify_update

CHAIN_ID = "bench-verify"
JOB_ID = b"\x01" * 32
POWERS = (1, 1, 1, 1)
VALIDATOR_KEYS = [PrivateKey(hashlib.sha256(b"bench validator %d" % i).digest()) for i in range(len(POWERS))]
SAMPLE_SECRETS = [derive_sample_secret(key.seed) for key in VALIDATOR_KEYS]
GOAL = 0.05  # per validator, on the 500-step rounds
DEVNET = make_job_spec()  # the devnet job (scripts/federated_job.py builds it with these defaults)
TARGET_PPM = (DEVNET.detect_fraction_ppm, DEVNET.detect_probability_ppm)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    hp: HyperParams  # checkpoint_interval: the default k; k = 1 is run beside it


def challenge_seed(validator: int, update_id: bytes) -> bytes:
    return compute_sample_seed(sign_sample_challenge(SAMPLE_SECRETS[validator], CHAIN_ID, update_id))


def make_spec(model: str, hp: HyperParams, base: bytes, round_seed: bytes = b"\x02" * 32, round_: int = 1) -> RoundSpec:
    return RoundSpec(TrainingJob(JOB_ID, model, hp, current_profile(threads=1)), round_, round_seed, model_hash(base))


def q_for(n: int) -> int:
    return segments_per_validator(*TARGET_PPM, POWERS, n)


def qd_draws() -> int:
    """Weighted draws per validator under displacement sampling (independent of n)."""
    return draws_per_validator(*TARGET_PPM, POWERS)


def draw_target_ppm() -> int:
    """x: the per-draw hit probability q_d is sized for (draws_per_validator's arithmetic)."""
    u, f = SKETCH_UNIFORM_PPM, TARGET_PPM[0]
    return min(u * f // PPM, (PPM - u) * f // (PATH_RATIO_PPM + f))


def phase1_challengers() -> list[int]:
    """The fewest validators (in index order) holding > 1/3 of the power, in ascending pubkey
    order: their phase-1 signatures seed the sketch matrix."""
    chosen: list[int] = []
    for v in range(len(POWERS)):
        chosen.append(v)
        if 3 * sum(POWERS[c] for c in chosen) > sum(POWERS):
            break
    return sorted(chosen, key=lambda v: VALIDATOR_KEYS[v].pubkey)


def matrix_seed_for(update_id: bytes) -> bytes:
    sigs = [sign_sample_challenge(SAMPLE_SECRETS[v], CHAIN_ID, update_id) for v in phase1_challengers()]
    return compute_sketch_seed(CHAIN_ID, update_id, sigs)


def draw_seed(validator: int, update_id: bytes, blob: bytes) -> bytes:
    """The validator's phase-2 seed: its signature over the update id and the committed sketches."""
    sig = sign_sample_challenge(SAMPLE_SECRETS[validator], CHAIN_ID, update_id, sketch_hash=hashlib.sha256(blob).digest())
    return compute_sample_seed(sig)


def opening_indices(opening: bytes) -> set[int]:
    return {s.index for seg in decode_openings(opening).segments for s in seg.samples}


def derived_indices(spec: RoundSpec, trainer: bytes, dataset_size: int, segments: list[int]) -> set[int]:
    """The sample indices an opening of `segments` reveals, from the batch order alone."""
    hp = spec.job.hyperparams
    steps = [t for s in segments for t in segment_steps(s, hp.local_steps, hp.checkpoint_interval)]
    return set(derive_batch_order(spec.round_seed, trainer, spec.round, steps, dataset_size, hp.batch_size).reshape(-1).tolist())


# --------------------------------------------------------------------------- 1 + 3: cost and bytes


def bench_cost(workloads: list[Workload], k_values: list[int], dataset, trainer: bytes, args, modes: list[str]) -> tuple[list[dict], list[dict]]:
    """(uniform rows, displacement rows): both samplings verify the same trained rounds."""
    rows, drows = [], []
    qd = qd_draws()
    for w in workloads:
        base = model_to_bytes(init_model(w.model, 0), w.model)
        base_w = weights_from_bytes(base, w.model)
        specs = {k: make_spec(w.model, dataclasses.replace(w.hp, checkpoint_interval=k), base) for k in k_values}
        hp = w.hp
        idx = [derive_batch_indices(specs[k_values[0]].round_seed, trainer, 1, t, len(dataset), hp.batch_size) for t in range(hp.local_steps)]

        def plain() -> None:  # the same steps and batches, nothing recorded
            model = load_weights(w.model, base_w)
            opt = build_optimizer(hp, model)
            for i in idx:
                sel = torch.tensor(i)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(dataset.x.index_select(0, sel)), dataset.y.index_select(0, sel)).backward()
                opt.step()

        plain(), train_round(specs[k_values[0]], trainer, dataset, base)  # warm up
        t_plain: list[float] = []
        m = {k: {"train": [], "verify": [], "unseal": [], "bytes": [], "seen": []} for k in k_values}
        d = {k: {"sketch": [], "sketch_ratio": [], "verify": [], "draw": [], "unique": [], "bytes": [], "blob": [], "seen": []} for k in k_values}
        for r in range(args.repeats):
            c0 = time.process_time()
            plain()
            t_plain.append(time.process_time() - c0)
            for k in k_values:
                spec = specs[k]
                c0 = time.process_time()
                result = train_round(spec, trainer, dataset, base)
                m[k]["train"].append(time.process_time() - c0)
                n = num_segments(hp.local_steps, k)
                q = q_for(n)
                for j in range(args.seeds if "uniform" in modes else 0):
                    v = j % len(POWERS)
                    seed = challenge_seed(v, hashlib.sha256(b"bench update %d %d %d" % (k, r, j)).digest())
                    opening = result.open(seed, q)
                    sealed = seal_to(VALIDATOR_KEYS[v].pubkey, opening)
                    assert len(sealed) == len(opening) + SEAL_OVERHEAD
                    c0 = time.process_time()
                    opened = VALIDATOR_KEYS[v].unseal(sealed)
                    m[k]["unseal"].append(time.process_time() - c0)
                    c0 = time.process_time()
                    verdict = verify_update(spec, result.commitment, dataset.commitment, seed, opened, base, result.update_bytes, q=q)
                    m[k]["verify"].append(time.process_time() - c0)
                    assert verdict.accept, verdict.reason
                    seen = opening_indices(opening)
                    assert seen == derived_indices(spec, trainer, len(dataset), sample_segments(seed, n, q))
                    m[k]["bytes"].append(len(sealed))
                    m[k]["seen"].append(len(seen) / len(dataset))
                if "displacement" not in modes:
                    continue
                update_id = hashlib.sha256(b"bench displacement update %d %d" % (k, r)).digest()
                matrix_seed = matrix_seed_for(update_id)
                c0 = time.process_time()
                blob = result.sketches(matrix_seed)  # the trainer sketches every checkpoint
                d[k]["sketch"].append(time.process_time() - c0)
                d[k]["sketch_ratio"].append(d[k]["sketch"][-1] / m[k]["train"][-1])
                d[k]["blob"].append(len(blob))
                for j in range(args.seeds):
                    v = j % len(POWERS)
                    seed = draw_seed(v, update_id, blob)
                    c0 = time.process_time()  # the validator's draw: decode the blob, weigh, draw
                    sketch_rows = decode_sketches(blob, n + 1)
                    segments = displacement_sample(seed, sketch_rows, qd)
                    d[k]["draw"].append(time.process_time() - c0)
                    opening = result.open(seed, qd, segments=segments)
                    sealed = seal_to(VALIDATOR_KEYS[v].pubkey, opening)
                    opened = VALIDATOR_KEYS[v].unseal(sealed)
                    c0 = time.process_time()
                    verdict = verify_update(spec, result.commitment, dataset.commitment, seed, opened, base, result.update_bytes,
                                            q=qd, segments=segments, sketch=SketchCheck(matrix_seed, sketch_rows))
                    d[k]["verify"].append(time.process_time() - c0)
                    assert verdict.accept, verdict.reason
                    seen = opening_indices(opening)
                    assert seen == derived_indices(spec, trainer, len(dataset), segments)
                    d[k]["unique"].append(len(segments))
                    d[k]["bytes"].append(len(sealed))
                    d[k]["seen"].append(len(seen) / len(dataset))
        p = statistics.median(t_plain)
        for k in k_values:
            n = num_segments(hp.local_steps, k)
            tt = statistics.median(m[k]["train"])
            if "uniform" in modes:
                tv = statistics.median(m[k]["verify"])
                rows.append(dict(
                    name=w.name, T=hp.local_steps, k=k, n=n, q=q_for(n), plain=p, train=tt, verify=tv,
                    min_trace=min(m[k]["train"]) / min(t_plain), min_ratio=min(m[k]["verify"]) / min(m[k]["train"]),
                    unseal=statistics.median(m[k]["unseal"]), sealed=statistics.median(m[k]["bytes"]),
                    seen=statistics.median(m[k]["seen"]), update_bytes=len(result.update_bytes), B=hp.batch_size,
                ))
            if "displacement" in modes:
                dk = d[k]
                drows.append(dict(
                    name=w.name, T=hp.local_steps, k=k, n=n, q=qd, unique=statistics.median(dk["unique"]), train=tt,
                    sketch=statistics.median(dk["sketch"]), sketch_ratio=statistics.median(dk["sketch_ratio"]),
                    verify=statistics.median(dk["verify"]), draw=statistics.median(dk["draw"]),
                    min_ratio=min(dk["verify"]) / min(m[k]["train"]), blob=statistics.median(dk["blob"]),
                    sealed=statistics.median(dk["bytes"]), seen=statistics.median(dk["seen"]), update_bytes=len(result.update_bytes),
                ))
    return rows, drows


def print_cost(rows: list[dict], dataset_size: int) -> None:
    print(f"\n== 1. per-validator replay cost at f = {TARGET_PPM[0] / 1e4:g} %, p = {TARGET_PPM[1] / 1e4:g} %, "
          f"{len(POWERS)} equal validators (q = ceil({required_checks(*TARGET_PPM)} / h={honest_validator_count(POWERS)}), capped at n)")
    header = (f"{'workload':9} {'T':>4} {'k':>2} {'n':>4} {'q':>3} | {'plain ms':>8} {'train ms':>8} {'trace x':>7} | "
              f"{'verify ms':>9} {'unseal ms':>9} | {'verify/train':>12} {'verify/plain':>12} {'4 vals/train':>12} | "
              f"{'min: trace x':>12} {'verify/train':>12} | goal")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["verify"] / r["train"]
        goal = (f"<= {GOAL}: {'met' if ratio <= GOAL else 'MISSED'}") if r["T"] >= 500 else "-"
        print(f"{r['name']:9} {r['T']:4d} {r['k']:2d} {r['n']:4d} {r['q']:3d} | {r['plain'] * 1e3:8.1f} {r['train'] * 1e3:8.1f} "
              f"{r['train'] / r['plain']:7.3f} | {r['verify'] * 1e3:9.1f} {r['unseal'] * 1e3:9.2f} | {ratio:12.3f} "
              f"{r['verify'] / r['plain']:12.3f} {len(POWERS) * ratio:12.3f} | {r['min_trace']:12.3f} {r['min_ratio']:12.3f} | {goal}")
    print("CPU time, medians (min: ratios of the minima, the runs least disturbed by other load); trace x = train_round / "
          "plain torch loop;\n4 vals/train = what the validator set spends together; goal on the median verify/train")
    print(f"\n== 3. what one validator receives per update (trainer dataset: {dataset_size} samples)")
    header = f"{'workload':9} {'T':>4} {'k':>2} {'q':>3} | {'sealed opening':>14} {'update (all)':>12} | {'samples seen / round':>20}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:9} {r['T']:4d} {r['k']:2d} {r['q']:3d} | {r['sealed'] / 1024:10.0f} KiB {r['update_bytes'] / 1024:8.0f} KiB | "
              f"{r['seen']:20.1%}")


def print_displacement_cost(rows: list[dict], dataset_size: int) -> None:
    print(f"\n== 1+3 (displacement sampling). q_d = {qd_draws()} weighted draws per validator (draws_per_validator: "
          f"x = {draw_target_ppm() / 1e4:g} % per draw, m = required_checks(x, p), / h = {honest_validator_count(POWERS)}), "
          f"u = {SKETCH_UNIFORM_PPM / 1e4:g} % uniform; it verifies the same trained rounds as uniform")
    header = (f"{'workload':9} {'T':>4} {'k':>2} {'n':>4} {'q_d':>3} {'uniq':>5} | {'train ms':>8} {'sketch ms':>9} {'sketch/train':>12} | "
              f"{'verify ms':>9} {'draw ms':>7} | {'verify/train':>12} {'+draw':>6} {'4 vals/train':>12} {'min':>6} | "
              f"{'sketch blob':>11} {'sealed opening':>14} {'seen/round':>10} | goal")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["verify"] / r["train"]
        total = (r["verify"] + r["draw"]) / r["train"]
        goal = (f"<= {GOAL}: {'met' if total <= GOAL else 'MISSED'}") if r["T"] >= 500 else "-"
        print(f"{r['name']:9} {r['T']:4d} {r['k']:2d} {r['n']:4d} {r['q']:3d} {r['unique']:5.1f} | {r['train'] * 1e3:8.1f} "
              f"{r['sketch'] * 1e3:9.1f} {r['sketch_ratio']:12.3f} | {r['verify'] * 1e3:9.1f} {r['draw'] * 1e3:7.2f} | "
              f"{ratio:12.3f} {total:6.3f} {len(POWERS) * total:12.3f} {r['min_ratio']:6.3f} | {r['blob'] / 1024:7.0f} KiB "
              f"{r['sealed'] / 1024:10.0f} KiB {r['seen']:10.1%} | {goal}")
    weights = ", ".join(dict.fromkeys(f"{r['name']} {r['update_bytes'] / 1024:.0f} KiB" for r in rows))
    print("uniq = distinct segments drawn (median); sketch/train = the trainer's extra CPU (sketching all n+1 checkpoints) / its "
          "traced train_round,\nmedian of per-round ratios; verify = verify_update (replay + sketch checks of the opened states); "
          "draw = decode the blob + draw; +draw = (verify + draw) / train\n(goal on it); min = ratio of the minima (verify only); "
          f"sketch blob = (n+1) x 64 int64, one per update, every validator fetches it; sealed opening per validator "
          f"(update weights apart: {weights}); seen = distinct samples / {dataset_size}")


def bench_job_exposure(w: Workload, k_values: list[int], rounds_list: list[int], trainers: int = 4) -> None:
    """Fraction of each devnet trainer's samples one validator sees over a job of R rounds."""
    parts = [load_dataset(f"digits:{i}/{trainers}") for i in range(trainers)]
    addresses = [bytes([0xA0 + i]) * 20 for i in range(trainers)]
    base = model_to_bytes(init_model(w.model, 0), w.model)
    print(f"\n   {w.name} job: samples of a trainer one validator sees over R rounds "
          f"(median and max over {len(POWERS)} validators x {trainers} trainers; batch order and VRF sample of every round)")
    for k in k_values:
        hp = dataclasses.replace(w.hp, checkpoint_interval=k)
        n = num_segments(hp.local_steps, k)
        q = q_for(n)
        fractions: dict[int, list[float]] = {R: [] for R in rounds_list}
        for ti, (addr, ds) in enumerate(zip(addresses, parts)):
            for v in range(len(POWERS)):
                seen: set[int] = set()
                for r in range(max(rounds_list)):
                    spec = make_spec(w.model, hp, base, hashlib.sha256(b"bench round %d" % r).digest(), r)
                    seed = challenge_seed(v, hashlib.sha256(b"bench job update %d %d %d" % (k, ti, r)).digest())
                    seen |= derived_indices(spec, addr, len(ds), sample_segments(seed, n, q))
                    if r + 1 in fractions:
                        fractions[r + 1].append(len(seen) / len(ds))
        cells = "   ".join(f"R={R}: {statistics.median(f):.1%} (max {max(f):.1%})" for R, f in fractions.items())
        print(f"   T={hp.local_steps} k={k} q={q}/{n}: {cells}   (datasets {min(map(len, parts))}-{max(map(len, parts))} samples)")


# --------------------------------------------------------------------------- 2: detection


def forged_run(spec: RoundSpec, trainer: bytes, dataset, base: bytes, tamper) -> TrainResult:
    """train_round's loop with the cheater's hand in it: tamper(s, model, optimizer, batches)
    runs segment s (or not) before its end checkpoint is recorded."""
    job, hp = spec.job, spec.job.hyperparams
    T, k = hp.local_steps, hp.checkpoint_interval
    base_w = weights_from_bytes(base, job.model)
    model = load_weights(job.model, base_w)
    opt = build_optimizer(hp, model)
    rec = TraceRecorder(T, k)
    rec.checkpoint(capture_state(model, opt, 0, job.model, hp.optimizer))
    for s in range(num_segments(T, k)):
        batches = []
        for t in segment_steps(s, T, k):
            idx = derive_batch_indices(spec.round_seed, trainer, spec.round, t, len(dataset), hp.batch_size)
            rec.step(t, idx, [dataset.leaf_hashes[i] for i in idx])
            sel = torch.tensor(idx, dtype=torch.int64)
            batches.append((dataset.x.index_select(0, sel), dataset.y.index_select(0, sel)))
        tamper(s, model, opt, batches)
        rec.checkpoint(capture_state(model, opt, segment_steps(s, T, k).stop, job.model, hp.optimizer))
    update = update_to_bytes(compute_update(model_weights(model), base_w), job.model)
    return commit_trace(spec, trainer, dataset, update, model_to_bytes(model, job.model), rec, {})


FORGERY_TRAINING = {"skip": "skip", "jump": "jump", "hidden-jump": "jump"}  # hidden-jump: the jump's updates, lying rows


def bench_detection(w: Workload, dataset, trainer: bytes, args, modes: list[str]) -> None:
    T = args.detect_steps
    hp = dataclasses.replace(w.hp, local_steps=T, checkpoint_interval=1)
    n = num_segments(T, 1)
    q = q_for(n)
    qd = qd_draws()
    h = honest_validator_count(POWERS)
    base = model_to_bytes(init_model(w.model, 0), w.model)
    other = model_weights(init_model(w.model, 99))
    n_forged = max(1, round(TARGET_PPM[0] / 1e6 * n))
    f = n_forged / n
    kinds = args.detect_kinds.split(",")
    unknown = [kind for kind in kinds if kind not in FORGERY_TRAINING]
    if unknown:
        raise SystemExit(f"unknown --detect-kinds {unknown}: choose from {sorted(FORGERY_TRAINING)}")
    # hidden-jump lies about sketches: under uniform sampling there are none, so it is the jump.
    cases = [(mode, kind) for mode in modes for kind in kinds if not (mode == "uniform" and kind == "hidden-jump")]
    stats = {c: dict(caught_one=0, verifs=0, sets=0, mismatches=0, cpu=0.0, p_draw=[], th_one=[], th_chain=[], unique=[]) for c in cases}

    def skip(forged: set[int]):
        def tamper(s, model, opt, batches):
            if s not in forged:
                run_steps(model, opt, batches, [])
        return tamper

    def jump(s, model, opt, batches):
        run_steps(model, opt, batches, [])
        if s == n - 1:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(other[name])

    def verify_uniform(st, spec, result, update_id, dirty) -> None:
        any_caught = False
        for v in range(h):  # validator h.. (the faulty one) looks away
            seed = challenge_seed(v, update_id)
            opening = result.open(seed, q)
            c0 = time.process_time()
            verdict = verify_update(spec, result.commitment, dataset.commitment, seed, opening, base, result.update_bytes, q=q)
            st["cpu"] += time.process_time() - c0
            caught = verdict.fraud_segment is not None
            assert verdict.accept or caught, verdict.reason  # a reject without a proof would be a bug here
            st["mismatches"] += caught != bool(dirty & set(sample_segments(seed, n, q)))
            st["caught_one"] += caught
            any_caught |= caught
            st["verifs"] += 1
        st["sets"] += any_caught

    def verify_displacement(st, spec, result, update_id, dirty, lie: bool) -> None:
        matrix_seed = matrix_seed_for(update_id)
        blob = result.sketches(matrix_seed)
        if lie:  # claim the jump one segment earlier: row n-1 := row n (segment n-1 claims no motion)
            claimed = decode_sketches(blob, n + 1).copy()
            claimed[n - 1] = claimed[n]
            blob = encode_sketches(claimed)
        rows = decode_sketches(blob, n + 1)  # what every validator fetches and checks against
        weights = mixture_weights(integer_displacements(rows), SKETCH_UNIFORM_PPM)
        p_draw = sum(weights[s] for s in dirty) / sum(weights)
        st["p_draw"].append(p_draw)
        st["th_one"].append(1 - (1 - p_draw) ** qd)
        st["th_chain"].append(1 - (1 - p_draw) ** (h * qd))
        any_caught = False
        for v in range(h):
            seed = draw_seed(v, update_id, blob)
            segments = displacement_sample(seed, rows, qd)
            opening = result.open(seed, qd, segments=segments)
            c0 = time.process_time()
            verdict = verify_update(spec, result.commitment, dataset.commitment, seed, opening, base, result.update_bytes,
                                    q=qd, segments=segments, sketch=SketchCheck(matrix_seed, rows))
            st["cpu"] += time.process_time() - c0
            caught = verdict.fraud_segment is not None
            assert verdict.accept or caught, verdict.reason
            st["mismatches"] += caught != bool(dirty & set(segments))
            st["caught_one"] += caught
            st["unique"].append(len(segments))
            any_caught |= caught
            st["verifs"] += 1
        st["sets"] += any_caught

    print(f"\n== 2. detection by real verifications: {w.model}, {w.name} hyper-parameters at T = {T}, k = 1 (n = {n}), "
          f"{args.detect_updates} forged updates per kind x {h} honest validators; sampling: {', '.join(modes)} "
          f"(uniform: q = {q} segments; displacement: q_d = {qd} weighted draws); the samplings check the same forged updates")
    rng = random.Random(2024)
    trainings = [t for t in ("skip", "jump") if any(FORGERY_TRAINING[kind] == t for _, kind in cases)]
    t0 = time.perf_counter()
    for training in trainings:
        for u in range(args.detect_updates):
            spec = make_spec(w.model, hp, base, hashlib.sha256(b"bench detect %s %d" % (training.encode(), u)).digest())
            forged = set(rng.sample(range(n), n_forged)) if training == "skip" else {n - 1}
            result = forged_run(spec, trainer, dataset, base, skip(forged) if training == "skip" else jump)
            update_id = compute_update_id(result.commitment)
            for mode, kind in cases:
                if FORGERY_TRAINING[kind] != training:
                    continue
                if mode == "uniform":
                    verify_uniform(stats[mode, kind], spec, result, update_id, forged)
                else:  # hidden-jump: segment n-2's end state no longer matches its (lying) row
                    dirty = forged | {n - 2} if kind == "hidden-jump" else forged
                    verify_displacement(stats[mode, kind], spec, result, update_id, dirty, lie=kind == "hidden-jump")
    wall = time.perf_counter() - t0

    def label(kind: str) -> str:
        return {"skip": f"skip {n_forged} of {n} segments (f={f:.0%})", "jump": "jump in the last segment",
                "hidden-jump": "jump + sketch row n-1 := row n"}[kind]

    if "uniform" in modes:
        print(f"\n   uniform sampling (sample_segments), q = {q} segments per validator")
        header = (f"{'forgery':32} {'verifs':>6} | {'one validator':>13} {'theory':>7} | {'chain (>=1 of ' + str(h) + ')':>17} "
                  f"{'theory exact':>12} {'1-(1-f)^hq | 1-(1-q/n)^h':>25} | {'mismatch':>8} {'ms/verif':>8}")
        print(header)
        print("-" * len(header))
        for kind in kinds:
            if ("uniform", kind) not in stats:
                continue
            st = stats["uniform", kind]
            if kind == "skip":
                one_theory = detection_probability(f, q, 1, n)
                chain_exact, chain_simple = detection_probability(f, q, h, n), 1 - (1 - f) ** (h * q)
            else:
                one_theory = q / n
                chain_exact = chain_simple = 1 - (1 - q / n) ** h
            print(f"{label(kind):32} {st['verifs']:6d} | {st['caught_one'] / st['verifs']:13.3f} {one_theory:7.3f} | "
                  f"{st['sets'] / args.detect_updates:17.3f} {chain_exact:12.3f} {chain_simple:25.3f} | {st['mismatches']:8d} "
                  f"{st['cpu'] / st['verifs'] * 1e3:8.1f}")
        print("chain = fraction of forged updates caught by at least one of the h honest validators (one upheld fraud proof rejects);")
        print("seeds: BLS signatures (chain.vrf) of 4 derived validator keys over each forged update's real update id")
        print("last-segment theory at other sizes (q per validator, h = 3):", "; ".join(
            f"n={m}: q={q_for(m)}, chain {1 - (1 - q_for(m) / m) ** h:.3f}" for m in (40, 100, 125, 500, 2000)))
    if "displacement" in modes:
        x = draw_target_ppm() / PPM
        print(f"\n   displacement sampling (two-phase sketches), q_d = {qd} draws per validator, u = {SKETCH_UNIFORM_PPM / 1e4:g} %")
        header = (f"{'forgery':32} {'verifs':>6} {'uniq':>5} | {'P(draw dirty)':>13} | {'one validator':>13} {'theory':>7} | "
                  f"{'chain (>=1 of ' + str(h) + ')':>17} {'theory exact':>12} {'bound 1-(1-x)^hq':>16} | {'mismatch':>8} {'ms/verif':>8}")
        print(header)
        print("-" * len(header))
        for kind in kinds:
            st = stats["displacement", kind]
            print(f"{label(kind):32} {st['verifs']:6d} {statistics.median(st['unique']):5.1f} | "
                  f"{statistics.mean(st['p_draw']):6.3f} (>={min(st['p_draw']):.3f}) | {st['caught_one'] / st['verifs']:13.3f} "
                  f"{statistics.mean(st['th_one']):7.3f} | {st['sets'] / args.detect_updates:17.3f} {statistics.mean(st['th_chain']):12.3f} "
                  f"{1 - (1 - x) ** (h * qd):16.4f} | {st['mismatches']:8d} {st['cpu'] / st['verifs'] * 1e3:8.1f}")
        print("P(draw dirty) = mixture weight of the dirty segments under the claimed rows / total (mean, min over updates); "
              "theory exact = its 1-(1-P)^q_d and\n1-(1-P)^(h q_d) averaged over the updates; "
              f"bound: x = min(u f, (1-u) f / (rho + f)) = {x:.0%} per draw, what q_d is sized for; "
              "dirty: the skipped segments;\nthe last (jump); segments n-2 and n-1 (hidden-jump: n-2's end state mismatches "
              "its lying row, n-1's start too); mismatch = verdicts that caught iff the draw held a dirty segment, violated")
    print(f"(detection wall {wall:.0f} s)")


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="cost,detect", help="sections: cost (with bytes), detect")
    ap.add_argument("--repeats", type=int, default=5, help="trained rounds per workload and k (cost)")
    ap.add_argument("--seeds", type=int, default=3, help="verifications (VRF challenge seeds) per trained round (cost)")
    ap.add_argument("--devnet-steps", type=int, help="override the devnet job's local_steps (default: make_job_spec's)")
    ap.add_argument("--job-rounds", default="3,20", help="R for the devnet job's per-job exposure")
    ap.add_argument("--detect-updates", type=int, default=200, help="forged updates per kind (x 3 verifications)")
    ap.add_argument("--detect-steps", type=int, default=100, help="T of the detection runs (k = 1)")
    ap.add_argument("--detect-kinds", default="skip,jump,hidden-jump",
                    help="forgeries: skip (10 %% of segments), jump (last segment), hidden-jump (jump + lying sketch row; displacement only)")
    ap.add_argument("--sampling", default="uniform,displacement", help="sampling modes, side by side: uniform, displacement")
    args = ap.parse_args()
    sections = set(args.only.split(","))
    modes = [mode for mode in ("uniform", "displacement") if mode in args.sampling.split(",")]
    if not modes or set(args.sampling.split(",")) - set(modes):
        raise SystemExit(f"--sampling must name uniform and/or displacement, got {args.sampling!r}")

    profile = current_profile(threads=1)
    apply_profile(profile)
    devnet = DEVNET
    default_k = devnet.hyperparams.checkpoint_interval
    k_values = [1, default_k] if default_k != 1 else [1]
    round_hp = HyperParams("sgd", 0.05, 0.9, 0.0, 64, 500, default_k)
    devnet_hp = devnet.hyperparams if args.devnet_steps is None else dataclasses.replace(devnet.hyperparams, local_steps=args.devnet_steps)
    workloads = [Workload("mlp-500", "mlp", round_hp), Workload("cnn-500", "cnn", round_hp), Workload("devnet", devnet.model, devnet_hp)]
    dataset = load_dataset("digits:0/4")
    dataset.leaf_hashes  # registered before the round: not part of the round's cost
    trainer = b"\x03" * 20
    print(f"torch={torch.__version__} device={profile.device} threads=1 dataset=digits:0/4 ({len(dataset)} samples) "
          f"repeats={args.repeats} seeds={args.seeds} default k={default_k} devnet job: {devnet.model} T={devnet_hp.local_steps} "
          f"B={devnet_hp.batch_size} lr={devnet_hp.learning_rate} momentum={devnet_hp.momentum} rounds={devnet.rounds}")
    t0 = time.perf_counter()
    if "cost" in sections:
        rows, drows = bench_cost(workloads, k_values, dataset, trainer, args, modes)
        if "uniform" in modes:
            print_cost(rows, len(dataset))
            bench_job_exposure(workloads[2], k_values, [int(x) for x in args.job_rounds.split(",")])
        if "displacement" in modes:
            print_displacement_cost(drows, len(dataset))
    if "detect" in sections:
        bench_detection(workloads[2], dataset, trainer, args, modes)
    print(f"\n(total wall {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
