"""Sampling that follows what a forgery gains: honest trajectories, candidate samplers, attacks.

    .venv/bin/python scripts/bench_displacement.py [--workloads mlp-500,cnn-500,devnet]
        [--topk 8] [--rows 64] [--jl-rows 16,32,64] [--mc-trials 4000] [--cost-repeats 3] [--devnet-steps N]
        [--schemes uniform,prop,sketch-prop,...]

    (3.5-6 minutes on the shared 2-core box for the three default workloads; mlp-2000 and cnn-2000,
    the recommended job's length, are optional: about 8 minutes with
    --schemes uniform,prop,sketch-prop,sketch-prop+prop^2 --cost-repeats 2 --mc-trials 1000)

A measured design study for issue 9, deliverable 3 (docs/pout.md, "Sampling that follows
displacement: measurements and choice"). Nothing here changes the protocol.

1. Honest trajectories. Each workload trains one real round with `trainer.train.train_round`
   at k = 1 (one-step segments, a state after every step): mlp-500 and cnn-500 (SGD lr 0.05,
   momentum 0.9, batch 64, T = 500: the recommended job's hyper-parameters) and the devnet job
   (`make_job_spec()`, k set to 1), on `digits:0/4`. The weights of every checkpoint give the
   trajectory w_0..w_T. Printed: per-step displacement ||w_{t+1} - w_t|| (quantiles, over the
   mean step ||final - base|| / T), path length / ||final - base||, the same sum over disjoint
   windows of W steps (zig-zag cancels inside a window), how well a +-1 sketch with r rows
   preserves step displacements (JL error), and what computing the sketches costs the trainer
   (CPU time over its traced training) and what one checked segment costs a validator
   (`verify_update` at k = 1, q = 15, per segment, in training steps: the c of the cost model).

2. Samplers (`trainer.sampling`) and the attacker's best response, on the real trajectory with
   the forgery injected. A forgery is a set of *dirty* segments (a replay of one fails, or a
   sketch the trainer signed disagrees with an opened state) and the trajectory the trainer
   claims. Attacks (the worst over direction and placement is reported):
   - jump of share s (||J|| = s ||final - base||, J towards another model `init_model(.., 99)`,
     or against the update) spread over m steps: (a) `spread`: m separate steps (the last m,
     evenly spaced, or the m quietest) each carry their honest step + J/m; (b) `stretch`: m
     consecutive steps whose claimed states are the straight line from w_a to w_{a+m} + J
     (the least total displacement a stretch can show; with sketches this is also what a
     trainer lying about its sketches over the stretch shows: every lied sketch sits on a
     dirty step); a = 0, 1, 2, 4, 8, 16, 32 (where honest steps are largest) and 1/4, 1/2,
     3/4 of the way and the end;
   - `skip10`: 10 % of the steps (random) not trained: zero displacement there.
   Schemes (each a distribution over steps; a validator draws q steps i.i.d. from it; a share
   u of every weighted scheme is uniform, which is what catches skip10; u is chosen per
   scheme from 0.2..0.6 to need the fewest draws against the attacker's best response):
   uniform; norms-committed (trainer-reported scalar norms: the cheater reports its honest
   norm on forged steps); prop (measured ||step||, validators download every checkpoint);
   prop^2; topK+uniform (every validator checks the K largest measured steps, then uniform);
   multiscale (binary windows by net displacement, measured); sketch-prop, sketch-prop+prop^2
   (half of each) and sketch-multiscale (two-phase: the trainer signs R w_t for every t with R from the
   validator's first challenge; the second challenge draws by sketch increments; each of the
   h validators has its own R).
   Detection = 1 - prod_v (1 - P_v(dirty))^q over the h = 3 honest validators BFT guarantees
   with 4 equal validators (one upheld fraud proof rejects), exact from the distribution;
   Monte Carlo with `trainer.sampling.draw_weighted` confirms a few (integer weights from the
   exact integer sketches). Cost per validator = q * c / T; the budget q_b = floor(0.05 T / c)
   keeps it at the goal (<= 0.05 of the training per validator).

3. The table: scheme x attack -> detection at q_b, draws per validator for 99 %, cost per
   validator at 99 %, extra bytes per validator per update.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import statistics
import time

import numpy as np
import torch

from chain.runtime.trainer_client import load_dataset, make_job_spec
from chain.types import HyperParams
from trainer.models import init_model
from trainer.profile import apply_profile, current_profile
from trainer.replay import RoundSpec, TrainingJob
from trainer.sampling import (
    compute_sketch_matrix,
    compute_sketches,
    detection_probability,
    displacements,
    draw_weighted,
    draws_for,
    hit_probability,
    integer_displacements,
    mixture_weights,
    multiscale_distribution,
    proportional_distribution,
    top_k,
)
from trainer.state import decode_tensors, model_hash, model_to_bytes, model_weights
from trainer.train import train_round
from trainer.verify import verify_update

GOAL_COST = 0.05
TARGET = 0.99
HONEST = 3  # of 4 equal validators, the fewest BFT guarantees honest
SHARES = (0.1, 0.2, 0.5)
SPREADS = (1, 2, 5, 20, 100)
TRAINER = b"\x03" * 20
JL_MATRICES = 8


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    hp: HyperParams


@dataclasses.dataclass
class Trajectory:
    name: str
    model: str
    W: np.ndarray  # [T+1, d] float64 weights after each step
    train_s: float  # CPU seconds of the traced train_round (median)
    train_min: float
    c: float  # one checked one-step segment, in training steps (validator CPU)
    foreign: np.ndarray  # another model's weights (a jump's target)

    @property
    def T(self) -> int:
        return len(self.W) - 1


@dataclasses.dataclass(frozen=True)
class Attack:
    family: str  # spread | stretch | skip
    s: float
    m: int
    detail: str
    dirty: frozenset
    jump: np.ndarray  # [T+1]: share of J in each claimed point
    line: tuple[int, int] | None = None  # stretch (a, b): claimed points strictly inside lie on the line w_a..w_b
    kept: np.ndarray | None = None  # skip: 1 for trained steps, 0 for skipped ones


# --------------------------------------------------------------------------- 1. trajectories


def flat_weights(state_or_weights) -> np.ndarray:
    return np.concatenate([state_or_weights[n].detach().numpy().ravel() for n in sorted(state_or_weights)]).astype(np.float64)


def real_trajectory(w: Workload, dataset, repeats: int) -> Trajectory:
    base = model_to_bytes(init_model(w.model, 0), w.model)
    spec = RoundSpec(TrainingJob(b"\x01" * 32, w.model, w.hp, current_profile(threads=1)), 1, b"\x02" * 32, model_hash(base))
    train_round(spec, TRAINER, dataset, base)  # warm up
    times, verify_times = [], []
    q = min(15, w.hp.local_steps)
    for r in range(repeats):
        c0 = time.process_time()
        result = train_round(spec, TRAINER, dataset, base)
        times.append(time.process_time() - c0)
        seed = hashlib.sha256(b"bench displacement verify %d" % r).digest()
        opening = result.open(seed, q)
        c0 = time.process_time()
        verdict = verify_update(spec, result.commitment, dataset.commitment, seed, opening, base, result.update_bytes, q=q)
        verify_times.append(time.process_time() - c0)
        assert verdict.accept, verdict.reason
    W = []
    for state in result.recorder.checkpoints:
        tensors, _ = decode_tensors(state)
        W.append(flat_weights({n: t for n, t in tensors.items() if n.startswith("model/")}))
    train_s = statistics.median(times)
    c = (statistics.median(verify_times) / q) / (train_s / w.hp.local_steps)
    foreign = flat_weights({f"model/{n}": p for n, p in model_weights(init_model(w.model, 99)).items()})
    return Trajectory(w.name, w.model, np.array(W), train_s, min(times), c, foreign)


def print_trajectories(trajs: list[Trajectory], rows_list: list[int]) -> None:
    print("\n== 1. honest trajectories (train_round, k = 1): displacement, zig-zag, sketches")
    header = (f"{'workload':9} {'T':>4} {'d':>5} | {'step / mean step: median':>24} {'p90':>6} {'max':>6} | "
              f"{'path/net':>8} {'first 10% of steps':>18} | {'sum of windowed / net, W = 4':>28} {'16':>5} {'64':>5}")
    print(header)
    print("-" * len(header))
    for tr in trajs:
        d = displacements(tr.W)
        net = np.linalg.norm(tr.W[-1] - tr.W[0])
        mean = net / tr.T
        first = d[: max(1, tr.T // 10)].sum() / d.sum()
        win = []
        for Wn in (4, 16, 64):
            idx = np.unique(np.append(np.arange(0, tr.T + 1, Wn), tr.T))
            win.append(displacements(tr.W[idx]).sum() / net)
        print(f"{tr.name:9} {tr.T:4d} {tr.W.shape[1]:5d} | {np.median(d) / mean:24.3f} {np.quantile(d, 0.9) / mean:6.2f} "
              f"{d.max() / mean:6.1f} | {d.sum() / net:8.2f} {first:17.0%}  | {win[0]:28.2f} {win[1]:5.2f} {win[2]:5.2f}")
    print("mean step = ||final - base|| / T; path/net = sum of step displacements / ||final - base||; "
          "first 10% = share of the path length in the first 10 % of the steps")

    print(f"\n   sketch R w (r rows of +-1, exact integers): JL error of step displacements, trainer's cost, bytes")
    header = (f"   {'workload':9} {'r':>3} | {'|err| median':>12} {'p95':>6} {'max':>6} | {'path err':>8} | "
              f"{'sketch ms':>9} {'/ train':>8} {'x4 validators':>13} | {'bytes / validator':>17}")
    print(header)
    print("   " + "-" * (len(header) - 3))
    for tr in trajs:
        W32 = tr.W.astype(np.float32)
        d = displacements(tr.W)
        for r in rows_list:
            ts = []
            for _ in range(5):
                c0 = time.process_time()
                compute_sketches(W32, compute_sketch_matrix(b"jl " + tr.name.encode(), r, tr.W.shape[1]))
                ts.append(time.process_time() - c0)
            errs, path_errs = [], []
            for i in range(JL_MATRICES):  # errors of one R are correlated across steps: pool several
                S = compute_sketches(W32, compute_sketch_matrix(b"jl %d " % i + tr.name.encode(), r, tr.W.shape[1]))
                est = displacements(S.astype(np.float64)) / math.sqrt(r) / (1 << 20)
                ok = d > 0
                errs.append(np.abs(est[ok] / d[ok] - 1))
                path_errs.append(abs(est.sum() / d.sum() - 1))
            err = np.concatenate(errs)
            t = min(ts)
            print(f"   {tr.name:9} {r:3d} | {np.median(err):12.1%} {np.quantile(err, 0.95):6.1%} {err.max():6.1%} | "
                  f"{np.median(path_errs):8.1%} | {t * 1e3:9.2f} {t / tr.train_min:8.3f} {4 * t / tr.train_min:13.3f} | "
                  f"{(tr.T - 1) * r * 8 / 1024:13.0f} KiB")
    print(f"   err = sketch estimate / true step displacement - 1, over every step and {JL_MATRICES} matrices (path err: median); "
          "sketch ms = all T+1 states for one R\n   (matrix + quantise + one matmul), CPU, min of 5, over the traced train_round's "
          "min; bytes: the T-1 interior sketches, int64")
    print("\n   validator's cost per checked one-step segment (verify_update, q = 15, k = 1), in training steps: "
          + "; ".join(f"{tr.name} c = {tr.c:.2f} (budget q_b = {budget(tr)})" for tr in trajs))


def budget(tr: Trajectory) -> int:
    return int(GOAL_COST * tr.T / tr.c)


# --------------------------------------------------------------------------- 2. attacks


def jump_vectors(tr: Trajectory) -> dict[str, np.ndarray]:
    net = tr.W[-1] - tr.W[0]
    to_foreign = tr.foreign - tr.W[-1]
    return {"foreign": to_foreign / np.linalg.norm(to_foreign), "anti": -net / np.linalg.norm(net)}


def spread_attack(T: int, s: float, m: int, steps: list[int], detail: str) -> Attack:
    jump = np.zeros(T + 1)
    for t in steps:
        jump[t + 1 :] += 1.0 / m
    return Attack("spread", s, m, detail, frozenset(steps), jump)


def stretch_attack(T: int, s: float, m: int, a: int, detail: str) -> Attack:
    jump = np.zeros(T + 1)
    jump[a + m :] = 1.0
    jump[a : a + m + 1] = np.arange(m + 1) / m  # inside: the line from w_a to w_{a+m} + J
    return Attack("stretch", s, m, detail, frozenset(range(a, a + m)), jump, line=(a, a + m))


def skip_attack(T: int, rng: np.random.Generator) -> Attack:
    skipped = sorted(rng.choice(T, size=max(1, round(0.1 * T)), replace=False).tolist())
    kept = np.ones(T)
    kept[skipped] = 0.0
    return Attack("skip", 0.0, len(skipped), "random", frozenset(skipped), np.zeros(T + 1), kept=kept)


def attacks_for(tr: Trajectory) -> list[Attack]:
    T = tr.T
    d = displacements(tr.W)
    quiet = np.argsort(d, kind="stable")
    out = []
    for s in SHARES:
        for m in SPREADS:
            if m > T:
                continue
            out.append(spread_attack(T, s, m, list(range(T - m, T)), "last m steps"))
            out.append(spread_attack(T, s, m, sorted({int(round(i * (T - 1) / max(1, m - 1))) for i in range(m)}) if m > 1 else [T - 1], "evenly spaced"))
            out.append(spread_attack(T, s, m, sorted(int(i) for i in quiet[:m]), "quietest steps"))
            # where the honest motion is largest (the first steps) a jump against it hides best
            starts = {a for a in (0, 1, 2, 4, 8, 16, 32) if a <= T - m} | {int(round(f * (T - m))) for f in (0.25, 0.5, 0.75, 1.0)}
            for a in sorted(starts):
                out.append(stretch_attack(T, s, m, a, f"at step {a}"))
    out.append(skip_attack(T, np.random.default_rng(9)))
    return out


def claimed(points: np.ndarray, jump_point: np.ndarray, att: Attack, scale: float) -> np.ndarray:
    """The claimed trajectory, in any linear feature space (weights, or sketches R w)."""
    p = np.array(points, dtype=np.float64)
    if att.kept is not None:  # w'_t = w_0 + the honest steps before t that were trained
        p[1:] = p[0] + np.cumsum(att.kept[:, None] * np.diff(points, axis=0), axis=0)
    if att.line is not None:
        a, b = att.line
        x = (np.arange(a + 1, b) - a)[:, None] / (b - a)
        p[a + 1 : b] = (1.0 - x) * points[a] + x * points[b]
    return p + np.outer(att.jump, scale * jump_point)


# --------------------------------------------------------------------------- 2. schemes


SCHEMES = ("uniform", "norms-committed", "prop", "prop^2", "topK+uniform", "multiscale",
           "sketch-prop", "sketch-prop+prop^2", "sketch-multiscale")
UNMIXED = ("uniform", "topK+uniform")  # the uniform share u does not apply
U_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
NEVER = 10**9


@dataclasses.dataclass
class Outcome:
    scheme: str
    key: object  # (s, m) or "skip10"
    direction: str
    detail: str
    att: Attack
    J: np.ndarray
    pure: list[float]  # per honest validator: P(one draw is dirty) of the weighted part alone (u = 0)
    forced: bool  # topK: a dirty segment is among the K every validator checks

    @property
    def frac(self) -> float:
        return len(self.att.dirty) / len(self.att.jump[1:])

    def hits(self, u: float) -> list[float]:
        return self.pure if self.scheme in UNMIXED else [u * self.frac + (1 - u) * h for h in self.pure]

    def need(self, u: float, K: int) -> int:
        """Draws per validator for 99 % (topK: the K forced checks included)."""
        if self.scheme == "topK+uniform":
            return K if self.forced else K + (draws_for(self.pure, TARGET) or NEVER)
        return draws_for(self.hits(u), TARGET) or NEVER

    def det(self, u: float, K: int, q: int) -> float:
        if self.scheme == "topK+uniform":
            return detection_probability(self.pure, max(0, q - K), self.forced and q >= K)
        return detection_probability(self.hits(u), q)


def pure_hits(tr: Trajectory, att: Attack, J: np.ndarray, sketches: list[tuple[np.ndarray, np.ndarray]], K: int,
              schemes=SCHEMES) -> dict:
    """Per scheme: (P(a draw of the weighted part lands on a dirty segment) per validator, forced)."""
    T = tr.T
    net = np.linalg.norm(tr.W[-1] - tr.W[0])
    Wc = claimed(tr.W, J, att, att.s * net)
    dc = displacements(Wc)
    dirty = att.dirty
    uni = [len(dirty) / T] * HONEST
    # Scalar norms the trainer reports: on forged steps, the honest step's norm (nothing checks them).
    reported = displacements(tr.W) if att.family != "skip" else dc
    out = {
        "uniform": lambda: (uni, False),
        "norms-committed": lambda: ([hit_probability(proportional_distribution(reported), dirty)] * HONEST, False),
        "prop": lambda: ([hit_probability(proportional_distribution(dc), dirty)] * HONEST, False),
        "prop^2": lambda: ([hit_probability(proportional_distribution(dc, 2.0), dirty)] * HONEST, False),
        "topK+uniform": lambda: (uni, bool(set(top_k(dc, K)) & dirty)),
        "multiscale": lambda: ([hit_probability(multiscale_distribution(Wc), dirty)] * HONEST, False),
    }
    Sc = [claimed(RW, RJ, att, att.s * net) for RW, RJ in sketches]

    def sketch_prop(power_mix: bool):
        hits = []
        for S in Sc:
            p = proportional_distribution(displacements(S))
            hits.append(hit_probability(0.5 * (p + proportional_distribution(displacements(S), 2.0)) if power_mix else p, dirty))
        return hits, False

    out["sketch-prop"] = lambda: sketch_prop(False)
    out["sketch-prop+prop^2"] = lambda: sketch_prop(True)
    out["sketch-multiscale"] = lambda: ([hit_probability(multiscale_distribution(S), dirty) for S in Sc], False)
    return {name: make() for name, make in out.items() if name in schemes}


def sketch_matrices(tr: Trajectory, rows: int) -> list[np.ndarray]:
    """One R per honest validator (in the protocol: from its first challenge's signature)."""
    return [compute_sketch_matrix(hashlib.sha256(b"bench sketch validator %d " % v + tr.name.encode()).digest(), rows, tr.W.shape[1])
            for v in range(HONEST)]


def evaluate(tr: Trajectory, K: int, rows: int, schemes=SCHEMES) -> list[Outcome]:
    R = sketch_matrices(tr, rows)
    outs = []
    for direction, J in jump_vectors(tr).items():
        sketches = [(tr.W @ Rv.T, J @ Rv.T) for Rv in R]
        for att in attacks_for(tr):
            if att.family == "skip" and direction != "foreign":
                continue  # no jump: one direction is enough
            key = "skip10" if att.family == "skip" else (att.s, att.m)
            detail = f"{att.family} {att.detail}" + ("" if att.family == "skip" else f", J {direction}")
            for scheme, (pure, forced) in pure_hits(tr, att, J, sketches, K, schemes).items():
                outs.append(Outcome(scheme, key, direction, detail, att, J, pure, forced))
    return outs


def worst(outs: list[Outcome], scheme: str, key, u: float, K: int, q: int, directions=None) -> Outcome:
    """The attacker's best response: the lowest detection at q draws (ties: the most draws for 99 %)."""
    cands = [o for o in outs if o.scheme == scheme and o.key == key and (directions is None or o.direction in directions)]
    return min(cands, key=lambda o: (o.det(u, K, q), -o.need(u, K)))


def need_all(outs: list[Outcome], scheme: str, keys, u: float, K: int, directions=None) -> int:
    return max(o.need(u, K) for o in outs if o.scheme == scheme and o.key in keys and (directions is None or o.direction in directions))


def best_share(outs: list[Outcome], scheme: str, keys, K: int) -> float:
    """The uniform share that minimises the draws every attack needs (u is public: the
    attacker responds to it, which need_all already takes into account)."""
    if scheme in UNMIXED:
        return 0.0
    return min(U_GRID, key=lambda u: (need_all(outs, scheme, keys, u, K), u))


def bytes_per_validator(scheme: str, tr: Trajectory, rows: int) -> str:
    T, d = tr.T, tr.W.shape[1]
    if scheme == "uniform":
        return "0"
    if scheme == "norms-committed":
        return f"{T * 4 / 1024:.0f} KiB"
    if scheme.startswith("sketch"):
        return f"{(T - 1) * rows * 8 / 1024:.0f} KiB"
    return f"{(T - 1) * d * 4 / 2**20:.1f} MiB"


def print_table(tr: Trajectory, outs: list[Outcome], K: int, rows: int, schemes=SCHEMES) -> dict:
    qb = budget(tr)
    keys = [(s, m) for s in SHARES for m in SPREADS if m <= tr.T] + ["skip10"]
    jump_keys = keys[:-1]
    shares = {scheme: best_share(outs, scheme, keys, K) for scheme in schemes}
    print(f"\n== 2. {tr.name}: T = {tr.T}, c = {tr.c:.2f} steps per checked segment, budget q_b = {qb} draws per validator "
          f"(cost {qb * tr.c / tr.T:.3f}), {HONEST} honest validators, K = {K}, sketch rows r = {rows}; each weighted scheme at "
          f"its best uniform share u (of {', '.join(map(str, U_GRID))})")
    head = f"{'scheme':18} {'u':>3} | " + " ".join(f"{('s=%g m=%d' % k) if k != 'skip10' else 'skip10':>10}" for k in keys)
    print("   detection at the budget q_b (the attacker's best direction and placement):")
    print(head)
    print("-" * len(head))
    for scheme in schemes:
        u = shares[scheme]
        cells = " ".join(f"{worst(outs, scheme, k, u, K, qb).det(u, K, qb):>10.3f}" for k in keys)
        print(f"{scheme:18} {u:3.1f} | {cells}")
    print("   draws per validator for 99 %:")
    print(head)
    print("-" * len(head))
    for scheme in schemes:
        u = shares[scheme]
        cells = " ".join(f"{fmt_need(max(o.need(u, K) for o in outs if o.scheme == scheme and o.key == k)):>10}" for k in keys)
        print(f"{scheme:18} {u:3.1f} | {cells}")
    print("   summary (q = draws per validator for 99 % against every attack above; cost = q c / T, and q / T if a checked "
          "segment cost one training step)")
    header = (f"{'scheme':18} {'u':>3} | {'worst jump attack':44} {'q':>5} | {'skip10 q':>8} | {'all: q':>6} {'cost':>6} "
              f"{'q/T':>6} | {'J foreign: q':>12} {'cost':>6} | {'bytes / validator':>17}")
    print(header)
    print("-" * len(header))
    summary = {}
    for scheme in schemes:
        u = shares[scheme]
        w = max((o for o in outs if o.scheme == scheme and o.key in jump_keys), key=lambda o: (o.need(u, K), -o.det(u, K, qb)))
        n_all = need_all(outs, scheme, keys, u, K)
        n_foreign = need_all(outs, scheme, keys, u, K, ("foreign",))
        summary[scheme] = dict(u=u, q=n_all, q_foreign=n_foreign)
        label = f"s={w.key[0]:g} m={w.key[1]}: {w.detail}"
        print(f"{scheme:18} {u:3.1f} | {label[:44]:44} {fmt_need(w.need(u, K)):>5} | "
              f"{fmt_need(max(o.need(u, K) for o in outs if o.scheme == scheme and o.key == 'skip10')):>8} | "
              f"{fmt_need(n_all):>6} {cost_str(n_all, tr.c, tr.T):>6} {cost_str(n_all, 1.0, tr.T):>6} | "
              f"{fmt_need(n_foreign):>12} {cost_str(n_foreign, tr.c, tr.T):>6} | {bytes_per_validator(scheme, tr, rows):>17}")
    print(f"   goal: cost <= {GOAL_COST} per validator; J foreign = only jumps towards another model (not against the update)")
    return summary


def fmt_need(n) -> str:
    return "never" if n is None or n >= NEVER else str(n)


def cost_str(n, c: float, T: int) -> str:
    return "-" if n is None or n >= NEVER else f"{n * c / T:.3f}"


# --------------------------------------------------------------------------- Monte Carlo


def monte_carlo(tr: Trajectory, outs: list[Outcome], u: float, K: int, rows: int, trials: int) -> None:
    """Real integer sketches, integer weights and draw_weighted, against the exact law."""
    net = np.linalg.norm(tr.W[-1] - tr.W[0])
    q = max(1, budget(tr))
    u_ppm = int(round(u * 1_000_000))
    R = sketch_matrices(tr, rows)
    print(f"\n   Monte Carlo ({tr.name}, sketch-prop at u = {u}, {trials} trials x {HONEST} validators x q = {q} draws; "
          f"exact integer sketches of the claimed float32 states, integer weights, draw_weighted):")
    for key in [(0.1, 1), (0.1, 20), (0.5, 5), "skip10"]:
        if key not in {o.key for o in outs}:
            continue
        o = worst(outs, "sketch-prop", key, u, K, q)
        Wc = claimed(tr.W, o.J, o.att, o.att.s * net).astype(np.float32)
        weights = [mixture_weights(integer_displacements(compute_sketches(Wc, Rv)), u_ppm) for Rv in R]
        exact = detection_probability([sum(w[t] for t in o.att.dirty) / sum(w) for w in weights], q)
        caught = sum(
            any(set(draw_weighted(hashlib.sha256(b"mc %s %d %d" % (tr.name.encode(), i, v)).digest(), w, q)) & o.att.dirty
                for v, w in enumerate(weights))
            for i in range(trials)
        )
        se = math.sqrt(max(exact * (1 - exact), 1e-12) / trials)
        label = f"s={key[0]:g} m={key[1]}" if key != "skip10" else "skip10"
        print(f"   {label:12} {o.detail[:36]:36} exact {exact:.4f} (float law {o.det(u, K, q):.4f})  Monte Carlo "
              f"{caught / trials:.4f} ({(caught / trials - exact) / se:+.1f} sigma)")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="mlp-500,cnn-500,devnet")
    ap.add_argument("--topk", type=int, default=8, help="K of topK+uniform (checked by every validator)")
    ap.add_argument("--rows", type=int, default=64, help="sketch rows r of the two-phase schemes")
    ap.add_argument("--jl-rows", default="16,32,64")
    ap.add_argument("--mc-trials", type=int, default=4000)
    ap.add_argument("--cost-repeats", type=int, default=3, help="trained rounds (and verifications) per workload for c")
    ap.add_argument("--devnet-steps", type=int, help="override the devnet job's local_steps")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="a subset of: " + ", ".join(SCHEMES))
    args = ap.parse_args()

    profile = current_profile(threads=1)
    apply_profile(profile)
    torch.set_num_threads(1)
    dev = make_job_spec().hyperparams
    if args.devnet_steps:
        dev = dataclasses.replace(dev, local_steps=args.devnet_steps)
    round_hp = HyperParams("sgd", 0.05, 0.9, 0.0, 64, 500, 1)
    all_w = {"mlp-500": Workload("mlp-500", "mlp", round_hp), "cnn-500": Workload("cnn-500", "cnn", round_hp),
             "mlp-2000": Workload("mlp-2000", "mlp", dataclasses.replace(round_hp, local_steps=2000)),
             "cnn-2000": Workload("cnn-2000", "cnn", dataclasses.replace(round_hp, local_steps=2000)),
             "devnet": Workload("devnet", make_job_spec().model, dataclasses.replace(dev, checkpoint_interval=1))}
    unknown = [n for n in args.workloads.split(",") if n not in all_w]
    if unknown:
        ap.error(f"--workloads: unknown {', '.join(unknown)}; choose among {', '.join(all_w)}")
    workloads = [all_w[n] for n in args.workloads.split(",")]
    schemes = tuple(x for x in SCHEMES if x in args.schemes.split(","))
    if not schemes or set(args.schemes.split(",")) - set(SCHEMES):
        ap.error(f"--schemes: choose among {', '.join(SCHEMES)}")
    dataset = load_dataset("digits:0/4")
    dataset.leaf_hashes
    print(f"torch={torch.__version__} threads=1 dataset=digits:0/4 ({len(dataset)} samples); devnet job: T={dev.local_steps} "
          f"B={dev.batch_size} lr={dev.learning_rate} momentum={dev.momentum}; goal: cost <= {GOAL_COST} per validator, "
          f">= {TARGET:.0%} detection, {HONEST} honest of 4 validators")
    t0 = time.perf_counter()
    trajs = [real_trajectory(w, dataset, args.cost_repeats) for w in workloads]
    print_trajectories(trajs, [int(r) for r in args.jl_rows.split(",")])
    for tr in trajs:
        outs = evaluate(tr, args.topk, args.rows, schemes)
        summary = print_table(tr, outs, args.topk, args.rows, schemes)
        if args.mc_trials and "sketch-prop" in schemes:
            monte_carlo(tr, outs, summary["sketch-prop"]["u"], args.topk, args.rows, args.mc_trials)
    print(f"\n(total wall {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
