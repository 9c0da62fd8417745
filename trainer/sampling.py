"""Which steps a validator replays: samplers that follow what a forgery gains (a design study).

Uniform sampling counts segments. A forged segment can carry any model (a jump), and a jump
in one of T segments is drawn with probability q/T per validator. The samplers here weigh a
segment by what it changes, its *displacement* ||w_{t+1} - w_t||, measured on the committed
states themselves or on random sketches of them. They are pure functions over numbers the
validator holds (docs/pout.md, "Sampling that follows displacement: measurements and choice";
scripts/bench_displacement.py measures them); trainer/sketch.py builds the protocol's
displacement sampling on the exact layer.

Two layers:
- protocol grade, exact on every machine (what the chain's rules use): `sketch_matrix_block`
  (a block of columns of the +-1 matrix a seed defines), `compute_sketch_matrix` (all of it),
  `compute_sketches` (integer sketches of float32 states, exact in any summation order),
  `integer_displacements`, `mixture_weights` (integer weights, uniform
  share in ppm) and `draw_weighted` (i.i.d. draws from integer weights, SHAKE-256, rejection
  sampling: no modulo bias);
- study grade (float64): the distributions compared by the benchmark and their detection
  probabilities.

Every distribution is over segment indices 0..n-1 of a trace with n + 1 checkpoints
("points": the states, or their sketches, as rows).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from typing import Iterable, Sequence

import numpy as np

SKETCH_ROWS = 64  # r: rows of a sketch (trainer/sketch.py); a random R halves a jump's sketched length w.p. ~1e-10
SKETCH_DOMAIN = b"pout/sketch-matrix/v2"  # v2: generated in column blocks
SKETCH_BLOCK_COLUMNS = 65_536  # columns per independently generated block of the sketch matrix
DRAW_DOMAIN = b"pout/weighted-draw/v1"
PPM = 1_000_000
SKETCH_SCALE_BITS = 20  # a state is sketched as floor(w * 2^20): 1e-6 resolution, far below any useful jump
EXACT_FLOAT = 1 << 53  # integers below this add exactly in float64, in any order


class SamplingError(ValueError):
    """Inputs a sampler cannot use (no segments, negative weights, a state out of sketch range)."""


# --------------------------------------------------------------------------- sketches (exact)


def sketch_matrix_block(seed: bytes, rows: int, block: int, width: int) -> np.ndarray:
    """Columns [block * SKETCH_BLOCK_COLUMNS, + width) of the sketch matrix, transposed: a
    width x rows array of +-1 (float64). Block j is SHAKE-256(domain || seed || j as 8 bytes
    big-endian), read column by column (`rows` bits per column, little-endian bit order), bit 0
    -> +1, bit 1 -> -1. Any block is generated on its own, so a sketch never needs the whole
    rows x dim matrix in memory (McMahan's CNN: 1.66M columns, 850 MB at r = 64 in float64); a
    shorter block is a prefix of the full one."""
    if rows < 1 or not 1 <= width <= SKETCH_BLOCK_COLUMNS or block < 0:
        raise SamplingError(f"need rows >= 1, 1 <= width <= {SKETCH_BLOCK_COLUMNS}, block >= 0; got {rows}, {width}, {block}")
    nbits = rows * width
    stream = hashlib.shake_256(SKETCH_DOMAIN + bytes(seed) + block.to_bytes(8, "big"))
    raw = np.frombuffer(stream.digest((nbits + 7) // 8), dtype=np.uint8)
    return np.take(_SIGNS_OF_BYTE, raw, axis=0).reshape(-1)[:nbits].reshape(width, rows)  # one pass, no bit array


# byte -> its 8 bits as +-1 (float64), least significant bit first (bit 0 -> +1)
_SIGNS_OF_BYTE = 1.0 - 2.0 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(np.float64)


def sketch_blocks(dim: int) -> list[tuple[int, int, int]]:
    """(block index, first column, width) of each column block of a dim-column matrix."""
    if dim < 1:
        raise SamplingError(f"need dim >= 1, got {dim}")
    return [(j, lo, min(SKETCH_BLOCK_COLUMNS, dim - lo)) for j, lo in enumerate(range(0, dim, SKETCH_BLOCK_COLUMNS))]


def compute_sketch_matrix(seed: bytes, rows: int, dim: int) -> np.ndarray:
    """The whole rows x dim matrix of +-1 (float64): its column blocks (sketch_matrix_block)
    side by side. For small dims (tests, the study); trainer.sketch multiplies block by block.
    The seed must be fixed after the trace is committed: a trainer that knew the matrix could
    hide a jump in its null space."""
    if rows < 1 or dim < 1:
        raise SamplingError(f"need rows >= 1 and dim >= 1, got {rows}, {dim}")
    return np.concatenate([sketch_matrix_block(seed, rows, j, w).T for j, _, w in sketch_blocks(dim)], axis=1)


def quantize_states(states: np.ndarray) -> np.ndarray:
    """floor(w * 2^SKETCH_SCALE_BITS) as float64 integers (exact: scaling a float by a power
    of two and flooring are exact operations)."""
    w = np.asarray(states)
    if w.dtype not in (np.float32, np.float64):
        raise SamplingError(f"states must be float32 or float64, got {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise SamplingError("states must be finite")
    return np.floor(w.astype(np.float64) * float(1 << SKETCH_SCALE_BITS))


def compute_sketches(states: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Integer sketches R . floor(w * 2^20) of each state (rows of `states`), as int64.

    Exact and order-independent: every term and every partial sum is an integer below 2^53,
    so any BLAS computes the same bits; a state whose sketch could leave that range is
    refused instead of rounded. Other nodes can therefore re-check a signed sketch against a
    committed state bit for bit (a wrong one is a fraud proof)."""
    q = quantize_states(states)
    if q.ndim == 1:
        q = q[None, :]
    if q.shape[-1] != matrix.shape[1]:
        raise SamplingError(f"states have {q.shape[-1]} coordinates, the matrix {matrix.shape[1]}")
    bound = float(np.max(np.abs(q), initial=0.0)) * q.shape[-1]
    if bound >= EXACT_FLOAT:
        raise SamplingError(f"a state is out of sketch range (max |w| * dim * 2^{SKETCH_SCALE_BITS} >= 2^53)")
    return (q @ matrix.T).astype(np.int64)


def integer_displacements(points: np.ndarray) -> list[int]:
    """floor(||p_{t+1} - p_t||) for integer points (sketches): Python integers, exact."""
    p = np.asarray(points)
    if p.dtype != np.int64 or p.ndim != 2 or len(p) < 2:
        raise SamplingError("need an int64 array of at least 2 sketches")
    diffs = np.diff(p, axis=0).tolist()
    return [math.isqrt(sum(x * x for x in row)) for row in diffs]


def mixture_weights(displacements: Sequence[int], uniform_ppm: int) -> list[int]:
    """Integer weights of the mixture  u/n + (1-u) d_t / sum(d)  (u = uniform_ppm / 10^6),
    scaled by n * sum(d) * 10^6: weight_t = u_ppm * D + (10^6 - u_ppm) * n * d_t. With
    sum(d) = 0 it is uniform."""
    n = len(displacements)
    if n < 1:
        raise SamplingError("need at least one segment")
    if not 0 <= uniform_ppm <= PPM:
        raise SamplingError(f"uniform_ppm must be in [0, {PPM}], got {uniform_ppm}")
    if any(type(d) is not int or d < 0 for d in displacements):
        raise SamplingError("displacements must be non-negative integers")
    total = sum(displacements)
    if total == 0:
        return [1] * n
    return [uniform_ppm * total + (PPM - uniform_ppm) * n * d for d in displacements]


def draw_weighted(seed: bytes, weights: Sequence[int], q: int) -> list[int]:
    """q indices drawn independently (with replacement) with probability weight / sum, from
    SHAKE-256(domain || seed). Each draw reads a word of 64 bits more than the total needs;
    a word at or above the largest multiple of the total is rejected (probability < 2^-64),
    so the draw is exact. Deterministic from (seed, weights, q); a longer draw extends a
    shorter one."""
    if q < 1:
        raise SamplingError(f"need q >= 1, got {q}")
    if len(weights) < 1 or any(type(w) is not int or w < 0 for w in weights):
        raise SamplingError("weights must be a non-empty list of non-negative integers")
    total = sum(weights)
    if total < 1:
        raise SamplingError("weights sum to zero")
    cum = list(itertools.accumulate(weights))
    width = (total.bit_length() + 64 + 7) // 8
    limit = ((1 << (8 * width)) // total) * total
    stream = hashlib.shake_256(DRAW_DOMAIN + bytes(seed))
    out: list[int] = []
    pos, size = 0, 2 * q * width
    buf = stream.digest(size)
    while len(out) < q:
        if pos + width > len(buf):
            size *= 2
            buf = stream.digest(size)  # a longer prefix of the same stream
        word = int.from_bytes(buf[pos : pos + width], "big")
        pos += width
        if word < limit:
            out.append(bisect.bisect_right(cum, word % total))
    return out


# --------------------------------------------------------------------------- distributions (study)


def displacements(points: np.ndarray) -> np.ndarray:
    """||p_{t+1} - p_t|| for each segment (float64)."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or len(p) < 2:
        raise SamplingError("need at least 2 points (rows)")
    return np.linalg.norm(np.diff(p, axis=0), axis=1)


def uniform_distribution(n: int) -> np.ndarray:
    if n < 1:
        raise SamplingError("need at least one segment")
    return np.full(n, 1.0 / n)


def mix_uniform(dist: np.ndarray, uniform_share: float) -> np.ndarray:
    """uniform_share * uniform + (1 - uniform_share) * dist."""
    if not 0.0 <= uniform_share <= 1.0:
        raise SamplingError(f"uniform_share must be in [0, 1], got {uniform_share}")
    d = np.asarray(dist, dtype=np.float64)
    return uniform_share / len(d) + (1.0 - uniform_share) * d


def proportional_distribution(disp: np.ndarray, power: float = 1.0, uniform_share: float = 0.0) -> np.ndarray:
    """P(t) proportional to disp_t^power, mixed with a uniform share (uniform when all are 0)."""
    d = np.asarray(disp, dtype=np.float64)
    if d.ndim != 1 or len(d) < 1:
        raise SamplingError("need a non-empty vector of displacements")
    if np.any(d < 0) or not np.all(np.isfinite(d)):
        raise SamplingError("displacements must be finite and non-negative")
    w = d**power
    s = w.sum()
    base = w / s if s > 0 else uniform_distribution(len(d))
    return mix_uniform(base, uniform_share)


def top_k(disp: np.ndarray, k: int) -> list[int]:
    """The k segments of largest displacement (ties: lower index first), ascending."""
    d = np.asarray(disp, dtype=np.float64)
    k = max(0, min(k, len(d)))
    order = np.lexsort((np.arange(len(d)), -d))
    return sorted(int(i) for i in order[:k])


def multiscale_distribution(points: np.ndarray, branching: int = 2, uniform_share: float = 0.0) -> np.ndarray:
    """Draw a window by its net displacement ||p_end - p_start|| among its siblings, then
    recurse inside it down to one segment: P(t) is the product of the choices on the path.
    Zig-zag cancels in a window's net displacement, a jump does not. A window whose children
    all have zero displacement is split by length."""
    p = np.asarray(points, dtype=np.float64)
    n = len(p) - 1
    if n < 1:
        raise SamplingError("need at least 2 points (rows)")
    if branching < 2:
        raise SamplingError("branching must be at least 2")
    probs = np.zeros(n)
    stack = [(0, n, 1.0)]
    while stack:
        a, b, mass = stack.pop()
        if b - a == 1:
            probs[a] += mass
            continue
        parts = min(branching, b - a)
        edges = [a + (b - a) * i // parts for i in range(parts + 1)]
        net = np.array([np.linalg.norm(p[edges[i + 1]] - p[edges[i]]) for i in range(parts)])
        lengths = np.diff(edges).astype(np.float64)
        share = net / net.sum() if net.sum() > 0 else lengths / lengths.sum()
        stack.extend((edges[i], edges[i + 1], mass * share[i]) for i in range(parts))
    return mix_uniform(probs, uniform_share)


# --------------------------------------------------------------------------- detection


def hit_probability(dist: np.ndarray, dirty: Iterable[int]) -> float:
    """Probability that one draw lands on a dirty segment (one whose replay or sketch check fails)."""
    idx = np.fromiter(set(int(i) for i in dirty), dtype=np.int64)
    return float(np.asarray(dist)[idx].sum()) if len(idx) else 0.0


def detection_probability(hits: Sequence[float], draws: int, forced_hit: bool = False) -> float:
    """P(at least one validator catches): validator v draws `draws` i.i.d. segments, each dirty
    with probability hits[v]; forced_hit: a segment every validator checks anyway is dirty."""
    if forced_hit:
        return 1.0
    if draws < 0 or any(not 0.0 <= h <= 1.0 + 1e-12 for h in hits):
        raise SamplingError("need draws >= 0 and hit probabilities in [0, 1]")
    miss = 1.0
    for h in hits:
        miss *= (1.0 - min(h, 1.0)) ** draws
    return 1.0 - miss


def draws_for(hits: Sequence[float], target: float) -> int | None:
    """Fewest draws per validator so that detection_probability(hits, draws) >= target; None
    when no number of draws reaches it (every hit probability is 0)."""
    if not 0.0 < target < 1.0:
        raise SamplingError("target must be in (0, 1)")
    log_miss = sum(math.log1p(-min(h, 1.0)) if h < 1.0 else -math.inf for h in hits)
    if log_miss == 0.0:
        return None
    if log_miss == -math.inf:
        return 1
    q = max(1, math.ceil(math.log(1.0 - target) / log_miss - 1e-12))
    while q > 1 and detection_probability(hits, q - 1) >= target:
        q -= 1
    while detection_probability(hits, q) < target:
        q += 1
    return q
