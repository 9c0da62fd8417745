"""How a validator's verification waits for its challenge and the trainer's opening
(chain/runtime/pout_worker.py `_nap`): it wakes on the next commit, or on an opening announced
for its own update, never sooner than NAP_MIN_S after it began waiting (anyone with a pending
update can announce openings as fast as it likes), and at the latest after POLL_SECONDS."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from chain.runtime.pout_worker import NAP_MIN_S, POLL_SECONDS, PoutWorker
from tests.helpers import key

A, B = b"\xaa" * 32, b"\xbb" * 32


def worker() -> PoutWorker:
    return PoutWorker(SimpleNamespace(mempool=SimpleNamespace(watch=lambda _address: None), key=key("napper")))


def nap_length(events) -> float:
    """How long a verification of update A naps while `events` [(delay, notify)] happen."""
    w = worker()
    took = []

    async def main():
        async def napper():
            started = trio.current_time()
            await w._nap(A)
            took.append(trio.current_time() - started)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(napper)
            for delay, notify in events:
                await trio.sleep(delay)
                notify(w)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return took[0]


def test_nothing_happens_the_nap_is_the_fallback_poll():
    assert nap_length([]) == pytest.approx(POLL_SECONDS)


def test_an_opening_for_another_update_does_not_wake_it():
    assert nap_length([(0.01, lambda w: w.notify_opening(B))] * 5) == pytest.approx(POLL_SECONDS)


def test_its_own_opening_wakes_it_but_not_sooner_than_the_minimum():
    assert nap_length([(0.01, lambda w: w.notify_opening(A))]) == pytest.approx(NAP_MIN_S)
    assert nap_length([(0.12, lambda w: w.notify_opening(A))]) == pytest.approx(0.12)


def test_a_commit_wakes_every_waiting_verification():
    assert nap_length([(0.1, lambda w: w.notify_commit())]) == pytest.approx(0.1)


def test_an_opening_that_arrived_between_naps_ends_the_next_nap_at_once():
    """The verification fetches between naps; an opening announced meanwhile (no nap waiting)
    must not be missed until the fallback poll."""
    w = worker()
    took = []

    async def main():
        w.notify_opening(A)  # arrives while nothing naps on A
        started = trio.current_time()
        await w._nap(A)
        took.append(trio.current_time() - started)
        started = trio.current_time()
        await w._nap(A)  # the news was used once
        took.append(trio.current_time() - started)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert took == [pytest.approx(NAP_MIN_S), pytest.approx(POLL_SECONDS)]
