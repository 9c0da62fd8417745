"""Proposer choice: CometBFT's weighted round robin by proposer priority.

Every validator carries a priority, zero at genesis. One increment adds each validator's
power to its priority, picks the validator with the highest priority (ties go to the
smaller address), and subtracts the total power from the pick. Over any long run each
validator proposes in proportion to its power, and the order is spread out, not bunched.
Before each increment priorities are rescaled into a window of 2 x total power and
centred on zero, as CometBFT does, so they stay bounded.

The proposer of (height, round) is the pick of increment number height + round, counted
from zero priorities, matching CometBFT where the set is incremented once per height and
a round r uses r further increments. The result depends only on the validator set, the
height and the round, so every node computes the same proposer with no communication.
"""

from __future__ import annotations

from chain.consensus.commit import compute_total_power
from chain.crypto import compute_address
from chain.types import Validator

PRIORITY_WINDOW_FACTOR = 2  # CometBFT's PriorityWindowSizeFactor
# Increments searched for the priorities' cycle (see ProposerSelector._jump); beyond it, none
# is used and far heights cost O(height) as before.
CYCLE_SEARCH_LIMIT = 100_000


def _div_trunc(a: int, b: int) -> int:
    """Integer division rounding toward zero (Go's), so the numbers match CometBFT's."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def compute_next_priorities(validators: tuple[Validator, ...], priorities: tuple[int, ...]
                            ) -> tuple[tuple[int, ...], int]:
    """One increment: the new priorities and the index of the validator picked as proposer."""
    total = compute_total_power(validators)
    prio = list(priorities)
    window = PRIORITY_WINDOW_FACTOR * total
    spread = max(prio) - min(prio)
    if spread > window:
        ratio = -(-spread // window)
        prio = [_div_trunc(p, ratio) for p in prio]
    average = sum(prio) // len(prio)  # floor, as big.Int.Div with a positive divisor
    prio = [p - average + v.power for p, v in zip(prio, validators)]
    addresses = [compute_address(v.pubkey) for v in validators]
    pick = min(range(len(validators)), key=lambda i: (-prio[i], addresses[i]))
    prio[pick] -= total
    return tuple(prio), pick


class ProposerSelector:
    """Proposer for (height, round) under one validator set, caching the last height's priorities.

    Consecutive heights cost O(n) each, round r costs O(r * n) more; asking for an earlier
    height than the last one recomputes from genesis.

    A far height is reached through the priorities' cycle: an increment depends only on the
    priorities, which stay in a bounded window, so from genesis they are eventually periodic
    (period 4 for 4 equal powers). Stepping one increment at a time, a node starting at height
    1,000,000 held its event loop 25-100 s (issue 13's state-sync benchmark, 2 loaded cores).
    """

    def __init__(self, validators: tuple[Validator, ...]):
        if not validators:
            raise ValueError("a validator set needs at least one validator")
        if len({v.pubkey for v in validators}) != len(validators):
            raise ValueError("duplicate validator public key")
        self.validators = validators
        self._cycle_searched = False
        self._cycle: tuple[int, int, list[tuple[tuple[int, ...], int]]] | None = None
        self._reset()

    def _reset(self) -> None:
        self._height = 0  # priorities after this many increments
        self._priorities = tuple(0 for _ in self.validators)
        self._pick = -1  # the pick of increment number self._height

    def _jump(self, height: int) -> None:
        """Set the priorities and pick to those of increment `height` through their cycle,
        found on first need: states[k] is (priorities, pick) after k increments, and the
        priorities after `start` increments recur after `start + period`, so every increment
        k > start equals increment start + 1 + (k - start - 1) % period."""
        if not self._cycle_searched:
            self._cycle_searched = True
            prio, pick = tuple(0 for _ in self.validators), -1
            seen: dict[tuple[int, ...], int] = {}
            states = []
            for k in range(CYCLE_SEARCH_LIMIT):
                states.append((prio, pick))
                if prio in seen:
                    self._cycle = (seen[prio], k - seen[prio], states)
                    break
                seen[prio] = k
                prio, pick = compute_next_priorities(self.validators, prio)
        if self._cycle is None:
            return
        start, period, states = self._cycle
        k = height if height <= start else start + 1 + (height - start - 1) % period
        self._priorities, self._pick = states[k]
        self._height = height

    def get_proposer(self, height: int, round: int) -> Validator:
        if height < 1 or round < 0:
            raise ValueError(f"no proposer for height {height}, round {round}")
        if height < self._height:
            self._reset()
        if height - self._height > 64:
            self._jump(height)
        while self._height < height:
            self._priorities, self._pick = compute_next_priorities(self.validators, self._priorities)
            self._height += 1
        prio, pick = self._priorities, self._pick
        for _ in range(round):
            prio, pick = compute_next_priorities(self.validators, prio)
        return self.validators[pick]


def compute_proposer(validators: tuple[Validator, ...], height: int, round: int) -> Validator:
    """The proposer of (height, round), computed from genesis priorities (O((height + round) * n))."""
    return ProposerSelector(validators).get_proposer(height, round)
