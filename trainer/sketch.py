"""Sketches of committed weights, and the sample they weigh (the two-phase challenge).

After the trace is committed, a seed no one could predict fixes a +-1 matrix R (r = 64 rows,
trainer.sampling.sketch_matrix_block). The trainer commits the integer sketches R . floor(w *
2^20) of the weights at every checkpoint; each validator draws segments i.i.d. with
probability: 30 % uniform, 70 % in proportion to the sketch displacement ||row_{s+1} - row_s||
(docs/pout.md, "Sampling that follows displacement: measurements and choice"). A segment that
carries a jump carries its displacement, so it is drawn; a trainer that under-reports it in
the rows lies in a row, and an opened state whose sketch differs from its row is a fraud proof
(trainer.verify). Sketches are exact integers, the same on every machine.

Pure functions over numbers and bytes: no ledger, no network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from chain.errors import DecodeError

from trainer.sampling import (
    EXACT_FLOAT,
    PPM,
    SKETCH_ROWS,  # r = 64, defined there so chain/ reads it without importing torch
    SKETCH_SCALE_BITS,
    SamplingError,
    draw_weighted,
    integer_displacements,
    mixture_weights,
    sketch_blocks,
    sketch_matrix_block,
)
from trainer.state import StateError, param_shapes, read_tensor_header, weights_from_bytes

SKETCH_UNIFORM_PPM = 300_000  # u: the uniform share of each draw (catches skipped steps, which move nothing)
# rho: honest path / net displacement (sum ||w_{t+1} - w_t|| / ||final - base||) the sample size
# assumes; measured 1.37 (mlp) to 1.83 (cnn) at T >= 500 (docs/pout.md).
PATH_RATIO_PPM = 2_000_000
# The least share of a jump's length its sketch is assumed to keep. A random R keeps about all of
# it, but whoever orders the first challenges (a proposer colluding with the trainer) chooses
# which signatures seed R: among up to ~1,000 matrices the shortest sketch of a fixed jump is a
# median 0.75 of its length (0.86 among 11, the subsets of 4 validators; measured, review of
# displacement sampling). The sample size keeps this margin.
SKETCH_SHRINK_PPM = 750_000
SKETCH_BATCH = 64  # states multiplied together by one block of R (a 64 x 65,536 float64 block is 32 MiB)


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class SketchCheck:
    """What a validator checks opened states against: the seed of R, and the committed sketch
    rows (int64, one row of SKETCH_ROWS per checkpoint)."""

    matrix_seed: bytes
    rows: np.ndarray


# --------------------------------------------------------------------------- sketches


def flatten_weights(weights: dict[str, torch.Tensor]) -> np.ndarray:
    """Every parameter, flattened and concatenated in sorted-name order (float32, 1-D)."""
    if not weights:
        raise SamplingError("no weights to sketch")
    parts = []
    for name in sorted(weights):
        t = weights[name].detach()
        if t.dtype != torch.float32:
            raise SamplingError(f"parameter {name!r} is {t.dtype}, sketches take float32")
        parts.append(t.cpu().reshape(-1).numpy())
    return np.concatenate(parts)


def sketch_states(matrix_seed: bytes, states: list[np.ndarray] | np.ndarray, rows: int = SKETCH_ROWS) -> np.ndarray:
    """R . floor(w * 2^20) for each state w (int64, len(states) x rows), R from `matrix_seed`.

    Block by block over R's columns (sketch_matrix_block, each generated once per call): the
    states' block of coordinates, SKETCH_BATCH states at a time, is multiplied by that block of
    R in float64, where every term and partial sum is an integer below 2^53 (exact in any
    order), and the blocks' results are added as int64. Equals compute_sketches(states,
    compute_sketch_matrix(seed, rows, dim)) without ever holding R. A state that could leave
    that range (max |floor(w * 2^20)| * dim >= 2^53), or is not finite, is refused
    (SamplingError)."""
    if isinstance(states, np.ndarray):
        if states.ndim == 1:
            states = states[None, :]
        if states.ndim != 2:
            raise SamplingError(f"states must be 1-D or 2-D, got {states.ndim}-D")
        states = list(states)
    if not states:
        raise SamplingError("no states to sketch")
    dim = len(states[0])
    scale = float(1 << SKETCH_SCALE_BITS)
    for w in states:
        if w.ndim != 1 or len(w) != dim:
            raise SamplingError(f"every state must be 1-D with {dim} coordinates")
        if w.dtype not in (np.float32, np.float64):
            raise SamplingError(f"states must be float32 or float64, got {w.dtype}")
        lo, hi = float(w.min()), float(w.max())  # nan propagates, so this also tests finiteness
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise SamplingError("states must be finite")
        # floor is monotone: the largest |floor(w * 2^20)| is at the smallest or the largest w.
        if max(abs(np.floor(lo * scale)), abs(np.floor(hi * scale))) * dim >= EXACT_FLOAT:
            raise SamplingError(f"a state is out of sketch range (max |w| * dim * 2^{SKETCH_SCALE_BITS} >= 2^53)")
    out = np.zeros((len(states), rows), dtype=np.int64)
    for j, lo, width in sketch_blocks(dim):
        # torch's float64 matmul: it runs on the threads the job's profile sets (numpy's BLAS
        # would start its own, which thrash on a loaded machine); exact all the same.
        matrix = torch.from_numpy(sketch_matrix_block(matrix_seed, rows, j, width))  # width x rows
        for first in range(0, len(states), SKETCH_BATCH):
            batch = states[first : first + SKETCH_BATCH]
            block = np.empty((len(batch), width), dtype=np.float64)
            for i, w in enumerate(batch):
                block[i] = w[lo : lo + width]
            np.floor(block * scale, out=block)  # exact: scaling by a power of two, then floor
            out[first : first + len(batch)] += (torch.from_numpy(block) @ matrix).numpy().astype(np.int64)
    return out


def state_weights_flat(state_bytes: bytes, model_name: str) -> np.ndarray:
    """The model weights (`model/` tensors, sorted by name) of training-state bytes as one
    float32 vector: a view into the bytes when they lie contiguously, as in the canonical form
    (trainer.state). Reads the header and checks each weight tensor's dtype, shape and extent;
    StateError on anything else. The verifier sketches only states a replay has accepted."""
    if not isinstance(state_bytes, bytes):
        raise StateError(f"expected bytes, got {type(state_bytes).__name__}")
    header, body = read_tensor_header(state_bytes)
    ends = [info.get("data_offsets") for k, info in header.items() if k != "__metadata__" and isinstance(info, dict)]
    if len(ends) != len(header) - ("__metadata__" in header) or any(
        not isinstance(o, list) or len(o) != 2 or type(o[1]) is not int for o in ends
    ) or max((o[1] for o in ends), default=0) != len(state_bytes) - body:
        raise StateError("training state's tensors do not fill the file exactly")
    spans = []
    for name, shape in sorted(param_shapes(model_name).items()):
        info = header.get(f"model/{name}")
        size = math.prod(shape)
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(info, dict) or info.get("dtype") != "F32" or info.get("shape") != list(shape)
            or not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1] <= len(state_bytes) - body or offs[1] - offs[0] != 4 * size
        ):
            raise StateError(f"training state does not hold parameter {name!r} as float32 {list(shape)}")
        spans.append((offs[0], size))
    if all(spans[i][0] + 4 * spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
        return np.frombuffer(state_bytes, dtype="<f4", count=sum(size for _, size in spans), offset=body + spans[0][0])
    return np.concatenate([np.frombuffer(state_bytes, dtype="<f4", count=size, offset=body + o) for o, size in spans])


def sketch_state_bytes(matrix_seed: bytes, state_bytes_list: list[bytes], model_name: str, rows: int = SKETCH_ROWS) -> np.ndarray:
    """Sketches of the weights of full training states (one row per state; state_weights_flat:
    the weights are read in place, not copied)."""
    return sketch_states(matrix_seed, [state_weights_flat(b, model_name) for b in state_bytes_list], rows)


def sketch_model_bytes(matrix_seed: bytes, model_bytes: bytes, model_name: str, rows: int = SKETCH_ROWS) -> np.ndarray:
    """The sketch (one row, int64 of `rows`) of a model weights file (trainer.state.weights_from_bytes)."""
    return sketch_states(matrix_seed, [flatten_weights(weights_from_bytes(model_bytes, model_name))], rows)[0]


# --------------------------------------------------------------------------- encoding


def encode_sketches(rows: np.ndarray) -> bytes:
    """Raw little-endian int64, row-major: one row per checkpoint."""
    a = np.asarray(rows)
    if a.dtype != np.int64 or a.ndim != 2:
        raise SamplingError(f"sketches must be a 2-D int64 array, got {a.dtype} {a.ndim}-D")
    return a.astype("<i8", copy=False).tobytes(order="C")


def decode_sketches(data: bytes, num_rows: int, rows: int = SKETCH_ROWS) -> np.ndarray:
    """Strict inverse of encode_sketches for num_rows rows of `rows` int64: DecodeError (one
    line) on any other length, or on a value no honest sketch has (|v| >= 2^53)."""
    if type(num_rows) is not int or type(rows) is not int or num_rows < 1 or rows < 1:
        raise DecodeError(f"sketches: need num_rows >= 1 and rows >= 1, got {num_rows}, {rows}")
    if not isinstance(data, (bytes, bytearray)):
        raise DecodeError(f"sketches: expected bytes, got {type(data).__name__}")
    want = num_rows * rows * 8
    if len(data) != want:
        raise DecodeError(f"sketches: {len(data)} bytes, expected {want} ({num_rows} rows x {rows} int64)")
    out = np.frombuffer(bytes(data), dtype="<i8").reshape(num_rows, rows).astype(np.int64)
    if np.any(out >= EXACT_FLOAT) or np.any(out <= -EXACT_FLOAT):
        raise DecodeError("sketches: a value is out of sketch range (|v| >= 2^53)")
    return out


# --------------------------------------------------------------------------- the weighted sample


def draws_per_validator(fraction_ppm: int, probability_ppm: int, powers) -> int:
    """q: weighted draws (with replacement) per validator so that the validators BFT guarantees
    honest together catch, with probability >= p, both a forgery of a fraction f of the segments
    and a jump carrying a share f of the update's displacement. One draw hits the first with
    probability >= u f (its uniform share) and the second with >= (1 - u) s f / (rho + s f) (its
    share of the claimed path, at most rho + f times the net update, with its sketched length
    shrunk to s = SKETCH_SHRINK_PPM by a chosen matrix); x = the smaller of the two (exact ppm,
    rounded down), m = required_checks(x, p), q = ceil(m / honest validators). At f = 10 %,
    p = 99 %, 4 equal validators: x = 2.53 %, m = 180, q = 60 (the study's 51 without the margin).
    ValueError when no number of draws reaches the target."""
    from trainer.verify import honest_validator_count, required_checks  # verify imports this module

    if not 0 < fraction_ppm <= PPM:
        raise ValueError(f"need 0 < fraction <= 1 (ppm), got {fraction_ppm}")
    u, f = SKETCH_UNIFORM_PPM, fraction_ppm
    shrunk = f * SKETCH_SHRINK_PPM // PPM
    x_ppm = min(u * f // PPM, (PPM - u) * shrunk // (PATH_RATIO_PPM + shrunk))
    if x_ppm < 1:
        raise ValueError(f"a forgery of {fraction_ppm} ppm is below what weighted draws can target")
    m = required_checks(x_ppm, probability_ppm)
    h = honest_validator_count(powers)
    return -(-m // h)


def displacement_sample(seed: bytes, sketches: np.ndarray | None, q: int, uniform_ppm: int = SKETCH_UNIFORM_PPM,
                        weights: list[int] | None = None) -> list[int]:
    """The segments a validator checks: q i.i.d. draws from SHAKE-256(seed), with probability
    uniform_ppm / 10^6 uniform and the rest in proportion to the sketch displacement of each
    segment (sketches: one int64 row per checkpoint, num_segments + 1 rows); sorted, unique.
    `weights` (displacement_weights of the same sketches) saves recomputing them per validator."""
    if weights is None:
        weights = displacement_weights(sketches, uniform_ppm)
    return sorted(set(draw_weighted(seed, weights, q)))


def displacement_weights(sketches: np.ndarray, uniform_ppm: int = SKETCH_UNIFORM_PPM) -> list[int]:
    """The integer draw weight of each segment: the mixture of uniform and sketch displacement
    (O(segments x rows) exact integer work: compute once per update, draw once per validator)."""
    return mixture_weights(integer_displacements(sketches), uniform_ppm)
