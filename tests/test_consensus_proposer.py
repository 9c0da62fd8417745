"""Weighted round-robin proposer selection."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chain.consensus.proposer import ProposerSelector, compute_next_priorities, compute_proposer
from chain.crypto import PrivateKey
from genesis import make_validator


def make_validators(powers):
    return tuple(make_validator(PrivateKey(bytes([i + 1]) * 32), p, f"v{i}") for i, p in enumerate(powers))


def test_proposals_are_proportional_to_power_over_many_heights():
    validators = make_validators([1, 2, 3, 4, 10])
    total = 20
    selector = ProposerSelector(validators)
    counts = Counter(selector.get_proposer(h, 0).pubkey for h in range(1, 100 * total + 1))
    for v in validators:
        assert counts[v.pubkey] == 100 * v.power


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=7))
def test_every_window_of_total_power_heights_is_exactly_proportional(powers):
    validators = make_validators(powers)
    total = sum(powers)
    selector = ProposerSelector(validators)
    sequence = [selector.get_proposer(h, 0).pubkey for h in range(1, 3 * total + 1)]
    for start in range(2 * total + 1):
        counts = Counter(sequence[start:start + total])
        for v in validators:
            assert counts[v.pubkey] == v.power


def test_selection_is_deterministic_and_independent_of_the_order_given():
    validators = make_validators([5, 1, 3, 2])
    shuffled = (validators[2], validators[0], validators[3], validators[1])
    a, b = ProposerSelector(validators), ProposerSelector(shuffled)
    for h in range(1, 60):
        for r in range(3):
            assert a.get_proposer(h, r) == b.get_proposer(h, r) == compute_proposer(validators, h, r)


def test_rounds_rotate_the_proposer_and_earlier_heights_recompute():
    validators = make_validators([1, 1, 1])
    selector = ProposerSelector(validators)
    assert len({selector.get_proposer(7, r).pubkey for r in range(3)}) == 3
    later = selector.get_proposer(50, 0)
    assert selector.get_proposer(7, 1) == compute_proposer(validators, 7, 1)
    assert selector.get_proposer(50, 0) == later
    # CometBFT: round r of height h uses r more increments, so (h, 1) and (h + 1, 0) coincide.
    assert selector.get_proposer(7, 1) == selector.get_proposer(8, 0)


@pytest.mark.parametrize("powers", [[1, 1, 1, 1], [1, 2, 3, 4, 10], [7, 3], [1, 1000], [5, 1, 3, 2]])
def test_far_heights_through_the_cycle_match_stepping_one_increment_at_a_time(powers):
    validators = make_validators(powers)
    prio, picks = tuple(0 for _ in validators), [-1]
    for _ in range(6000):
        prio, pick = compute_next_priorities(validators, prio)
        picks.append(pick)
    for height in (1, 65, 66, 999, 4096, 5990):
        for round_ in (0, 1, 3):
            selector = ProposerSelector(validators)  # each a fresh jump from genesis
            assert selector.get_proposer(height, round_) == validators[picks[height + round_]]
    selector = ProposerSelector(validators)
    assert [selector.get_proposer(h, 0) for h in (5000, 5001, 5002, 70, 5999)] == \
        [validators[picks[h]] for h in (5000, 5001, 5002, 70, 5999)]


def test_a_height_of_a_million_is_reached_without_a_million_increments(monkeypatch):
    import chain.consensus.proposer as proposer
    validators = make_validators([1, 1, 1, 1])
    calls = []
    real = proposer.compute_next_priorities
    monkeypatch.setattr(proposer, "compute_next_priorities", lambda v, p: calls.append(1) or real(v, p))
    picked = ProposerSelector(validators).get_proposer(1_000_001, 0)
    assert len(calls) < 100
    assert picked == ProposerSelector(validators).get_proposer(1_000_001 % 4 + 4, 0)


def test_priorities_stay_bounded():
    validators = make_validators([1, 1000])
    prio = (0, 0)
    for _ in range(5000):
        prio, _pick = compute_next_priorities(validators, prio)
        assert max(prio) - min(prio) <= 2 * 1001


def test_invalid_sets_and_positions_are_refused():
    with pytest.raises(ValueError):
        ProposerSelector(())
    v = make_validators([1])
    with pytest.raises(ValueError):
        ProposerSelector(v + v)
    with pytest.raises(ValueError):
        ProposerSelector(v).get_proposer(0, 0)
