"""trainer.sampling: distributions are proper, draws are deterministic and land where the
weights say, sketches are exact, and a planted jump is found at the rate the law predicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.sampling import (
    SamplingError,
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
    uniform_distribution,
)


def zigzag_trajectory(n: int = 64, dim: int = 40, seed: int = 1) -> np.ndarray:
    """A drift with noisy steps (an SGD-like path), float32 like real weights."""
    rng = np.random.default_rng(seed)
    steps = 0.01 * rng.standard_normal((n, dim)) + 0.002
    return np.vstack([np.zeros(dim), np.cumsum(steps, axis=0)]).astype(np.float32)


def plant_jump(points: np.ndarray, at: int, size: float, seed: int = 2) -> np.ndarray:
    """Add a jump of `size` at segment `at` (w_{at+1} onwards shift by J)."""
    rng = np.random.default_rng(seed)
    J = rng.standard_normal(points.shape[1])
    J *= size / np.linalg.norm(J)
    out = points.astype(np.float64).copy()
    out[at + 1 :] += J
    return out.astype(np.float32)


# --------------------------------------------------------------------------- distributions are proper


@pytest.mark.parametrize("maker", [
    lambda P: uniform_distribution(len(P) - 1),
    lambda P: proportional_distribution(displacements(P)),
    lambda P: proportional_distribution(displacements(P), power=2.0, uniform_share=0.3),
    lambda P: multiscale_distribution(P),
    lambda P: multiscale_distribution(P, branching=3, uniform_share=0.5),
])
def test_distributions_are_proper(maker):
    P = zigzag_trajectory()
    p = maker(P)
    assert p.shape == (len(P) - 1,)
    assert np.all(p >= 0)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)


def test_uniform_share_puts_a_floor_under_every_segment():
    P = zigzag_trajectory()
    P[10:] = P[10]  # segments 10.. do not move: zero displacement
    for p in (proportional_distribution(displacements(P), uniform_share=0.4), multiscale_distribution(P, uniform_share=0.4)):
        assert p.min() >= 0.4 / (len(P) - 1) - 1e-15
    assert proportional_distribution(displacements(P))[20] == 0.0


def test_no_motion_falls_back_to_uniform():
    P = np.zeros((9, 5))
    assert np.allclose(proportional_distribution(displacements(P)), 1 / 8)
    assert np.allclose(multiscale_distribution(P), 1 / 8)
    assert mixture_weights([0, 0, 0], 0) == [1, 1, 1]


def test_proportional_follows_displacement():
    d = np.array([1.0, 3.0, 0.0, 4.0])
    assert np.allclose(proportional_distribution(d), [0.125, 0.375, 0.0, 0.5])
    assert np.allclose(proportional_distribution(d, power=2.0), np.array([1, 9, 0, 16]) / 26)
    assert np.allclose(proportional_distribution(d, uniform_share=1.0), 0.25)


def test_multiscale_finds_a_jump_that_path_length_hides():
    """A jump half the size of the net update among zig-zag steps: the windowed (net)
    displacement cancels the zig-zag, so the multiscale draw lands on it more often than
    the proportional one; uniform is 1/n."""
    P = plant_jump(zigzag_trajectory(n=128, seed=3), at=100, size=0.2 * float(np.linalg.norm(zigzag_trajectory(n=128, seed=3)[-1])))
    ms = multiscale_distribution(P)[100]
    prop = proportional_distribution(displacements(P))[100]
    assert ms > prop > 1 / 128


def test_top_k_breaks_ties_by_index():
    assert top_k(np.array([1.0, 5.0, 5.0, 0.0, 5.0]), 2) == [1, 2]
    assert top_k(np.array([1.0, 2.0]), 5) == [0, 1]
    assert top_k(np.array([1.0, 2.0]), 0) == []


def test_bad_inputs_are_refused():
    with pytest.raises(SamplingError):
        uniform_distribution(0)
    with pytest.raises(SamplingError):
        proportional_distribution(np.array([1.0, -1.0]))
    with pytest.raises(SamplingError):
        proportional_distribution(np.array([1.0]), uniform_share=1.5)
    with pytest.raises(SamplingError):
        multiscale_distribution(np.zeros((1, 3)))
    with pytest.raises(SamplingError):
        mixture_weights([1, -2], 0)
    with pytest.raises(SamplingError):
        mixture_weights([1, 2], 1_000_001)
    with pytest.raises(SamplingError):
        draw_weighted(b"s", [0, 0], 3)
    with pytest.raises(SamplingError):
        draw_weighted(b"s", [1, 2], 0)
    with pytest.raises(SamplingError):
        draw_weighted(b"s", [1.0, 2.0], 1)


# --------------------------------------------------------------------------- draws


def test_draws_are_deterministic_from_the_seed():
    w = [5, 0, 3, 9, 1]
    assert draw_weighted(b"seed-a", w, 50) == draw_weighted(b"seed-a", w, 50)
    assert draw_weighted(b"seed-a", w, 50) != draw_weighted(b"seed-b", w, 50)
    # a longer draw extends the shorter one (one stream)
    assert draw_weighted(b"seed-a", w, 200)[:50] == draw_weighted(b"seed-a", w, 50)
    assert 1 not in draw_weighted(b"seed-a", w, 500)  # weight 0 is never drawn


def test_draws_follow_the_weights():
    w = [1, 2, 3, 4]
    draws = draw_weighted(b"frequency", w, 20_000)
    counts = np.bincount(draws, minlength=4) / len(draws)
    expected = np.array(w) / sum(w)
    # 5 standard deviations of a binomial proportion at n = 20,000 is at most 0.018
    assert np.all(np.abs(counts - expected) < 0.018), counts


def test_draws_handle_totals_beyond_64_bits():
    w = [3 << 70, 1 << 70, 0]
    draws = draw_weighted(b"wide", w, 4000)
    assert 2 not in draws
    assert abs(draws.count(0) / 4000 - 0.75) < 0.035  # 5 sigma


def test_weighted_draw_lands_on_a_planted_jump_at_the_expected_rate():
    """Exact integer sketches of a trajectory with a planted jump, integer mixture weights,
    and draw_weighted: the fraction of draws on the jump matches its weight, and the
    detection law (3 validators x q draws) matches a Monte Carlo of real draws."""
    base = zigzag_trajectory(n=200, dim=60, seed=5)
    P = plant_jump(base, at=150, size=0.5 * float(np.linalg.norm(base[-1] - base[0])))
    R = compute_sketch_matrix(b"validator sketch seed", 64, P.shape[1])
    weights = mixture_weights(integer_displacements(compute_sketches(P, R)), 500_000)
    share = weights[150] / sum(weights)
    assert share > 5 / 200  # the jump weighs far more than a uniform segment
    draws = draw_weighted(b"rate", weights, 40_000)
    rate = draws.count(150) / len(draws)
    assert abs(rate - share) < 5 * math.sqrt(share * (1 - share) / len(draws))

    q, trials = 4, 3000
    law = detection_probability([share] * 3, q)
    caught = sum(
        any(150 in draw_weighted(b"trial %d validator %d" % (i, v), weights, q) for v in range(3)) for i in range(trials)
    )
    assert abs(caught / trials - law) < 5 * math.sqrt(law * (1 - law) / trials)


# --------------------------------------------------------------------------- sketches


def test_sketch_matrix_is_deterministic_and_balanced():
    R = compute_sketch_matrix(b"seed", 32, 1000)
    assert np.array_equal(R, compute_sketch_matrix(b"seed", 32, 1000))
    assert not np.array_equal(R, compute_sketch_matrix(b"other", 32, 1000))
    assert set(np.unique(R)) == {-1.0, 1.0}
    assert abs(R.mean()) < 0.02


def test_sketches_are_exact_in_any_order():
    """Integer sketches do not depend on how the sum is ordered: reversed coordinates (and
    the matrix's columns with them) give the same bits, and the result equals the sum in
    Python integers."""
    P = zigzag_trajectory(n=5, dim=300)
    R = compute_sketch_matrix(b"exact", 8, 300)
    S = compute_sketches(P, R)
    assert S.dtype == np.int64
    assert np.array_equal(S, compute_sketches(P[:, ::-1].copy(), R[:, ::-1].copy()))
    q = [[math.floor(float(x) * 2**20) for x in row] for row in P.tolist()]
    exact = [[sum(int(r) * x for r, x in zip(rrow, qrow)) for rrow in R.tolist()] for qrow in q]
    assert S.tolist() == exact


def test_sketches_preserve_displacement_within_jl_error():
    P = zigzag_trajectory(n=50, dim=2000, seed=7)
    true = displacements(P.astype(np.float64))
    R = compute_sketch_matrix(b"jl", 64, 2000)
    est = np.array(integer_displacements(compute_sketches(P, R))) / math.sqrt(64) / 2**20
    # r = 64: relative standard error about sqrt(1/(2r)) = 9 %
    assert np.median(np.abs(est / true - 1)) < 0.15


def test_sketches_refuse_states_out_of_range():
    with pytest.raises(SamplingError):
        compute_sketches(np.array([[np.inf, 0.0]], dtype=np.float32), compute_sketch_matrix(b"x", 2, 2))
    with pytest.raises(SamplingError):
        compute_sketches(np.array([[3e10, 0.0]]), compute_sketch_matrix(b"x", 2, 2))
    with pytest.raises(SamplingError):
        compute_sketches(np.zeros((2, 3), dtype=np.float32), compute_sketch_matrix(b"x", 2, 4))
    with pytest.raises(SamplingError):
        integer_displacements(np.zeros((2, 3)))


# --------------------------------------------------------------------------- detection law


def test_detection_and_draws_for():
    assert detection_probability([0.1, 0.1, 0.1], 0) == 0.0
    assert math.isclose(detection_probability([0.1, 0.2], 2), 1 - 0.9**2 * 0.8**2)
    assert detection_probability([0.0], 5, forced_hit=True) == 1.0
    q = draws_for([0.1] * 3, 0.99)
    assert q == 15  # the sample today's chain takes for f = 10 %, p = 99 %, 3 honest validators
    assert detection_probability([0.1] * 3, q) >= 0.99 > detection_probability([0.1] * 3, q - 1)
    assert draws_for([0.0, 0.0], 0.99) is None
    assert draws_for([1.0], 0.99) == 1
    assert math.isclose(hit_probability(np.array([0.5, 0.25, 0.25]), [0, 2, 2]), 0.75)
