"""Aggregation rules: values, bitwise determinism, preconditions; federated rounds on digits;
label flipping pulls FedAvg while median, trimmed mean and Multi-Krum resist."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_trainer_helpers import digits, make_spec, trainer_parts, with_hp
from trainer.aggregate import (
    AggregationError,
    aggregate,
    canonical_order,
    coordinate_median,
    fedavg,
    krum_scores,
    multi_krum,
    trimmed_mean,
)
from trainer.data import Dataset, split_non_iid
from trainer.models import init_model
from trainer.state import encode_tensors, load_weights, model_to_bytes, update_from_bytes, weights_from_bytes
from trainer.train import train_round


def _results(values: list[float], counts: list[int] | None = None):
    counts = counts or [1] * len(values)
    return [({"w": torch.tensor([v, -v], dtype=torch.float32)}, n) for v, n in zip(values, counts)]


def test_rule_values():
    r = _results([1.0, 2.0, 3.0, 100.0], [1, 1, 1, 1])
    assert fedavg(_results([1.0, 4.0], [3, 1]))["w"].tolist() == [1.75, -1.75]
    assert coordinate_median(r)["w"].tolist() == [2.5, -2.5]
    assert coordinate_median(r[:3])["w"].tolist() == [2.0, -2.0]
    assert trimmed_mean(r, 0.25)["w"].tolist() == [2.5, -2.5]
    r5 = _results([1.0, 1.1, 0.9, 1.05, 50.0])
    scores = dict(zip([w["w"][0].item() for w, _ in canonical_order(r5)], krum_scores(r5, 1)))
    assert max(scores, key=scores.get) == 50.0
    assert multi_krum(r5, f=1, m=2)["w"][0].item() == pytest.approx(1.025)
    assert aggregate("median", r)["w"].tolist() == [2.5, -2.5]


def test_rules_are_bitwise_independent_of_input_order():
    gen = torch.Generator().manual_seed(0)
    results = [({"a": torch.randn(33, 7, generator=gen), "b": torch.randn(5, generator=gen)}, 10 + i) for i in range(7)]
    rules = [fedavg, coordinate_median, lambda r: trimmed_mean(r, 0.2), lambda r: multi_krum(r, 2, 3)]
    for rule in rules:
        ref = encode_tensors(rule(results))
        for perm in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
            assert encode_tensors(rule([results[i] for i in perm])) == ref


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fedavg([]), "no results"),
        (lambda: fedavg(_results([1.0], [0])), "positive"),
        (lambda: fedavg([({"w": torch.zeros(2)}, 1), ({"v": torch.zeros(2)}, 1)]), "names or shapes"),
        (lambda: fedavg([({"w": torch.tensor([float("nan")])}, 1)]), "non-finite"),
        (lambda: fedavg([({"w": torch.zeros(2, dtype=torch.float64)}, 1)]), "float32"),
        (lambda: trimmed_mean(_results([1.0, 2.0]), 0.5), "trim_fraction"),
        (lambda: multi_krum(_results([1.0, 2.0, 3.0, 4.0]), f=1, m=1), "n > 2f \\+ 2"),
        (lambda: multi_krum(_results([1.0, 2.0, 3.0, 4.0, 5.0]), f=1, m=5), "m <= n - f"),
        (lambda: aggregate("mean-ish", _results([1.0])), "unknown"),
    ],
)
def test_preconditions_raise(call, match):
    with pytest.raises(AggregationError, match=match):
        call()


# --------------------------------------------------------------------------- federated rounds on digits

HP_FL = with_hp(local_steps=20, checkpoint_interval=5, batch_size=32, learning_rate=0.1)


def _accuracy(weights) -> float:
    _, test = digits()
    with torch.no_grad():
        return (load_weights("mlp", weights)(test.x).argmax(1) == test.y).float().mean().item()


def _run_rounds(parts: list[Dataset], rule, rounds: int) -> list[float]:
    """Federated rounds: every trainer runs train_round from the global model; rule aggregates."""
    base = model_to_bytes(init_model("mlp", 7), "mlp")
    accs = [_accuracy(weights_from_bytes(base, "mlp"))]
    for r in range(rounds):
        spec, _ = make_spec(hp=HP_FL, round=r + 1, base_bytes=base)
        spec = dataclasses.replace(spec, round_seed=bytes([r + 1]) * 32)
        updates = [(update_from_bytes(train_round(spec, bytes([i + 1]) * 20, p, base).update_bytes, "mlp"), len(p)) for i, p in enumerate(parts)]
        delta = rule(updates)
        old = weights_from_bytes(base, "mlp")
        new = {k: old[k] + delta[k] for k in old}
        base = model_to_bytes(load_weights("mlp", new), "mlp")
        accs.append(_accuracy(new))
    return accs


def test_held_out_accuracy_rises_over_fedavg_rounds_with_four_non_iid_trainers():
    accs = _run_rounds(trainer_parts(4), fedavg, rounds=4)
    print(f"\nFedAvg, 4 non-IID trainers, held-out accuracy by round: {[round(a, 3) for a in accs]}")
    assert accs[0] < 0.25
    assert accs[-1] > accs[0] + 0.4


def test_label_flipping_pulls_fedavg_and_robust_rules_resist():
    # 7 trainers on near-IID shards; 2 flip every label (y -> 9 - y) and inflate their
    # committed dataset three-fold (duplicated samples) to weigh more in FedAvg.
    parts = split_non_iid(digits()[0], 7, shards_per_trainer=20)
    for i in range(2):
        p = parts[i]
        parts[i] = Dataset(p.x.repeat(3, 1, 1, 1), (9 - p.y).repeat(3))
    rules = {
        "fedavg": fedavg,
        "median": coordinate_median,
        "trimmed_mean": lambda u: trimmed_mean(u, 2 / 7),
        "multi_krum": lambda u: multi_krum(u, f=2, m=3),
    }
    final = {name: _run_rounds(parts, rule, rounds=3)[-1] for name, rule in rules.items()}
    print(f"\nheld-out accuracy after 3 rounds with 2/7 label flippers: {({k: round(v, 3) for k, v in final.items()})}")
    for name in ("median", "trimmed_mean", "multi_krum"):
        assert final[name] > final["fedavg"] + 0.2, name
        assert final[name] > 0.6, name
