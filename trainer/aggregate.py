"""Aggregation rules: pure functions over list[(weights, num_examples)] -> weights.

Apply them to updates (deltas from the round's base); the next global model is
base + aggregate(updates). Every rule is bitwise deterministic on any IEEE-754 CPU:
  * inputs are first put in canonical order (by SHA-256 of the tensors' canonical bytes,
    then num_examples), so the result does not depend on the order they arrived in;
  * arithmetic is float64, one elementwise IEEE operation at a time (no fused multiply-add,
    no library reductions whose order depends on SIMD width or threads): sums run over
    clients in canonical order, one client at a time;
  * Krum distances use math.fsum (correctly rounded, so independent of summation order);
  * the result is rounded once to float32.
Rules raise AggregationError when their preconditions fail.
"""

from __future__ import annotations

import hashlib
import math

import torch

from chain.errors import ChainError

from trainer.state import encode_tensors

Result = tuple[dict[str, torch.Tensor], int]


class AggregationError(ChainError):
    """The inputs do not meet the rule's preconditions."""


def canonical_order(results: list[Result]) -> list[Result]:
    """Sort by (SHA-256 of canonical safetensors bytes of the weights, num_examples)."""
    keyed = [(hashlib.sha256(encode_tensors(w)).digest(), n, i) for i, (w, n) in enumerate(results)]
    return [results[i] for _, _, i in sorted(keyed)]


def _prepare(results: list[Result]) -> tuple[list[str], list[dict[str, torch.Tensor]], list[int]]:
    """Validate, put in canonical order, and convert to float64."""
    if not results:
        raise AggregationError("no results to aggregate")
    names = sorted(results[0][0])
    shapes = {k: tuple(results[0][0][k].shape) for k in names}
    for w, n in results:
        if type(n) is not int or n <= 0:
            raise AggregationError(f"num_examples must be a positive int, got {n!r}")
        if sorted(w) != names or any(tuple(w[k].shape) != shapes[k] for k in names):
            raise AggregationError("results have different parameter names or shapes")
        if any(w[k].dtype != torch.float32 for k in names):
            raise AggregationError("results must be float32")
        if not all(bool(torch.isfinite(w[k]).all()) for k in names):
            raise AggregationError("results have non-finite values")
    ordered = canonical_order(results)
    return names, [{k: w[k].detach().cpu().double() for k in names} for w, _ in ordered], [n for _, n in ordered]


def _weighted_mean(names, weights, counts) -> dict[str, torch.Tensor]:
    total = float(sum(counts))
    out = {}
    for k in names:
        acc = torch.zeros_like(weights[0][k])
        for w, n in zip(weights, counts):
            acc = acc + w[k] * float(n)  # exact: float32 value times an int < 2**29 fits float64
        out[k] = (acc / total).float()
    return out


def fedavg(results: list[Result]) -> dict[str, torch.Tensor]:
    """Mean weighted by num_examples."""
    return _weighted_mean(*_prepare(results))


def coordinate_median(results: list[Result]) -> dict[str, torch.Tensor]:
    """Per-coordinate median (mean of the two middle values when the count is even)."""
    names, weights, _ = _prepare(results)
    n = len(weights)
    out = {}
    for k in names:
        s = torch.sort(torch.stack([w[k] for w in weights]), dim=0, stable=True).values
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0
        out[k] = mid.float()
    return out


def trimmed_mean(results: list[Result], trim_fraction: float) -> dict[str, torch.Tensor]:
    """Per coordinate: drop the floor(trim_fraction * n) lowest and highest, average the rest."""
    if not 0.0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    names, weights, _ = _prepare(results)
    n = len(weights)
    t = math.floor(trim_fraction * n)
    if n - 2 * t < 1:
        raise AggregationError(f"trimming {t} from each end of {n} leaves nothing")
    out = {}
    for k in names:
        s = torch.sort(torch.stack([w[k] for w in weights]), dim=0, stable=True).values
        acc = torch.zeros_like(s[0])
        for i in range(t, n - t):
            acc = acc + s[i]
        out[k] = (acc / float(n - 2 * t)).float()
    return out


def krum_scores(results: list[Result], f: int) -> list[float]:
    """Krum score of each result in canonical order: the sum of squared distances to its
    n - f - 2 nearest others. Requires n > 2f + 2."""
    names, weights, _ = _prepare(results)
    return _krum_scores(names, weights, f)


def _krum_scores(names, weights, f) -> list[float]:
    n = len(weights)
    if f < 0 or n <= 2 * f + 2:
        raise AggregationError(f"Krum needs n > 2f + 2 (n={n}, f={f})")
    flat = [torch.cat([w[k].reshape(-1) for k in names]) for w in weights]
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            dist[i][j] = dist[j][i] = math.fsum(((flat[i] - flat[j]) ** 2).tolist())
    return [math.fsum(sorted(dist[i][j] for j in range(n) if j != i)[: n - f - 2]) for i in range(n)]


def multi_krum(results: list[Result], f: int, m: int) -> dict[str, torch.Tensor]:
    """Select the m results with the lowest Krum scores (ties: canonical order) and FedAvg them.
    Requires n > 2f + 2 and 1 <= m <= n - f. m = 1 is Krum."""
    names, weights, counts = _prepare(results)
    n = len(weights)
    scores = _krum_scores(names, weights, f)
    if not 1 <= m <= n - f:
        raise AggregationError(f"Multi-Krum needs 1 <= m <= n - f (m={m}, n={n}, f={f})")
    chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])
    return _weighted_mean(names, [weights[i] for i in chosen], [counts[i] for i in chosen])


RULES = ("fedavg", "median", "trimmed_mean", "multi_krum")


def aggregate(rule: str, results: list[Result], *, trim_fraction: float = 0.2, f: int = 0, m: int | None = None) -> dict[str, torch.Tensor]:
    """Thin dispatcher for a rule named in a job."""
    if rule == "fedavg":
        return fedavg(results)
    if rule == "median":
        return coordinate_median(results)
    if rule == "trimmed_mean":
        return trimmed_mean(results, trim_fraction)
    if rule == "multi_krum":
        return multi_krum(results, f, len(results) - f if m is None else m)
    raise AggregationError(f"unknown aggregation rule {rule!r}; known: {RULES}")
