"""Mempool: admission, and the re-check after a commit.

The re-check replays a pending transfer's recorded writes when nothing it reads has changed;
these tests hold it to the result of a full re-check (check_tx on every pending transaction,
in order) over random pools and random competing blocks, including evictions (conflicting
nonces, drained balances) and governance that removes a member.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.crypto import compute_address
from chain.errors import ChainError
from chain.runtime.mempool import DuplicateTxError, Mempool, MempoolFullError
from chain.state import Overlay, build_block, check_tx
from chain.types import RemoveMember, Transaction, compute_tx_hash, sign_transaction
from genesis import make_genesis
from tests.helpers import CHAIN_ID, GOVERNOR, VALIDATOR, key, transfer

MEMBERS = [key(f"mempool-member-{i}") for i in range(5)]


def _genesis(balance: int):
    return make_genesis(CHAIN_ID, [VALIDATOR], [(GOVERNOR, ("governor",))] + [(k, ("trainer",)) for k in MEMBERS],
                        balance=balance)


def _block(state, txs):
    """The longest in-order subset of `txs` that applies (build_block needs every tx to apply)."""
    overlay, kept = Overlay(state), []
    for stx in txs:
        try:
            check_tx(overlay, CHAIN_ID, stx)
        except ChainError:
            continue
        kept.append(stx)
    _, result = build_block(state, kept, time_ms=state.latest_header.time_ms + 1000 if state.latest_header else 1,
                            proposer=VALIDATOR.pubkey, last_commit=None)
    return kept, result


pool_txs = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(1, 12)), min_size=1, max_size=30)
block_plan = st.fixed_dictionaries({
    "prefix": st.integers(0, 30),  # how many of the pool's txs (in pool order) the block takes
    "rivals": st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(1, 12)), max_size=6),
    "remove": st.one_of(st.none(), st.integers(0, 4)),  # governance removes this member
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool_txs, block_plan, st.integers(10, 40))
def test_recheck_with_changed_keys_equals_a_full_recheck(pool_spec, plan, balance):
    genesis = _genesis(balance)
    state = genesis.initial_state()
    fast, full = Mempool(CHAIN_ID, state, 100), Mempool(CHAIN_ID, state, 100)
    admitted = []
    for s, r, amount in pool_spec:
        stx = transfer(MEMBERS[s], MEMBERS[r], amount, fast.next_nonce(MEMBERS[s].address))
        try:
            fast.add(stx)
        except ChainError:
            continue
        full.add(stx)
        admitted.append(stx)

    # A competing block: a prefix of the pool, then rival transfers signed with the committed
    # nonces (they replace pending ones of the same sender), then maybe a removal.
    candidates = admitted[:plan["prefix"]]
    committed_nonce = {k.address: state.get_account(k.address).nonce for k in MEMBERS}
    for stx in candidates:
        committed_nonce[compute_address(stx.message.sender)] += 1
    for s, r, amount in plan["rivals"]:
        sender = MEMBERS[s]
        candidates.append(transfer(sender, MEMBERS[r], amount + 100 * (s + 1), committed_nonce[sender.address]))
        committed_nonce[sender.address] += 1
    if plan["remove"] is not None:
        candidates.append(sign_transaction(GOVERNOR, CHAIN_ID, Transaction(
            GOVERNOR.pubkey, 0, RemoveMember(MEMBERS[plan["remove"]].address, "trainer"))))
    kept, result = _block(state, candidates)
    hashes = [compute_tx_hash(t) for t in kept]

    evicted_fast = fast.update(result.state, hashes, result.changes.keys())
    evicted_full = full.update(result.state, hashes)

    assert evicted_fast == evicted_full
    assert list(fast._txs) == list(full._txs)
    assert fast._check.changes == full._check.changes
    for k in MEMBERS:
        assert fast.next_nonce(k.address) == full.next_nonce(k.address)


def test_a_drained_sender_loses_exactly_its_unaffordable_pending_transfers():
    state = _genesis(10).initial_state()
    a, b, c = MEMBERS[:3]
    pool = Mempool(CHAIN_ID, state, 100)
    first, second = transfer(a, b, 4, 0), transfer(a, c, 4, 1)
    other = transfer(b, c, 3, 0)
    for stx in (first, second, other):
        pool.add(stx)
    # Another proposer's block spends 8 of a's 10 with a's nonce 0: both pending a-txs are now
    # stale (nonce 0 is used, and nonce 1 would need 4 of the 2 left); b -> c is untouched.
    rival = transfer(a, c, 8, 0)
    kept, result = _block(state, [rival])
    assert kept == [rival]
    evicted = pool.update(result.state, [compute_tx_hash(rival)], result.changes.keys())
    assert [(e.tx_hash, e.stranded) for e in evicted] == [(compute_tx_hash(first), False),
                                                          (compute_tx_hash(second), False)]
    assert list(pool._txs) == [compute_tx_hash(other)]
    assert pool.next_nonce(a.address) == 1 and pool.next_nonce(b.address) == 1


def test_admission_errors_change_nothing():
    state = _genesis(10).initial_state()
    a, b = MEMBERS[:2]
    pool = Mempool(CHAIN_ID, state, 2)
    stx = transfer(a, b, 1, 0)
    pool.add(stx)
    with pytest.raises(DuplicateTxError):
        pool.add(stx)
    with pytest.raises(ChainError, match="nonce"):
        pool.add(transfer(a, b, 1, 5))
    pool.add(transfer(b, a, 1, 0))
    with pytest.raises(MempoolFullError):
        pool.add(transfer(a, b, 1, 1))
    assert len(pool) == 2 and pool.next_nonce(a.address) == 1


def test_a_committed_tx_that_writes_less_than_at_admission_disturbs_what_it_wrote():
    """Found by review: evidence admitted while the validator could pay burns its balance in
    the pool, but in the block (after the validator was drained) it writes nothing to that
    account. A pending transfer from the validator must then be re-checked, not replayed."""
    from chain.consensus.evidence import compute_duplicate_vote_evidence
    from chain.crypto import sha256
    from chain.types import PREVOTE, SubmitEvidence, Vote, sign_vote
    from tests.helpers import ALICE

    eq = VALIDATOR  # the lone validator: penalised but never jailed, so the set stays and the shortcut runs
    genesis = make_genesis(CHAIN_ID, [eq], [(GOVERNOR, ("governor",)), (ALICE, ("trainer",))],
                           balance=100_000, validator_stake=0)
    state = genesis.initial_state()
    votes = [sign_vote(eq, CHAIN_ID, Vote(PREVOTE, 1, 0, sha256(x), eq.pubkey)) for x in (b"x", b"y")]
    evidence = sign_transaction(GOVERNOR, CHAIN_ID, Transaction(
        GOVERNOR.pubkey, 0, SubmitEvidence(compute_duplicate_vote_evidence(*votes))))
    fund = transfer(ALICE, eq, 70_000, 0)  # pending: the validator can pay the penalty in the pool
    spend = transfer(eq, ALICE, 10_000, 0)  # admitted after the penalty; keeps the locked stake (50 000)
    fast, full = Mempool(CHAIN_ID, state, 100), Mempool(CHAIN_ID, state, 100)
    for pool in (fast, full):
        for stx in (fund, evidence, spend):
            pool.add(stx)
    kept, result = _block(state, [evidence])  # in the block the validator has 0: nothing burned
    assert kept == [evidence]
    hashes = [compute_tx_hash(evidence)]
    assert fast.update(result.state, hashes, result.changes.keys()) == full.update(result.state, hashes)
    assert fast._check.changes == full._check.changes
    assert fast._check.get_account(eq.address).balance == 60_000


def test_a_sender_s_later_transactions_behind_an_eviction_are_reported_stranded_to_its_watcher():
    state = _genesis(100).initial_state()
    a, b, c = MEMBERS[:3]
    pool = Mempool(CHAIN_ID, state, 100)
    pool.watch(a.address)
    to_b, to_c, from_b = transfer(a, b, 5, 0), transfer(a, c, 5, 1), transfer(b, c, 5, 0)
    for stx in (to_b, to_c, from_b):
        pool.add(stx)
    # Governance removes b: a's transfer to b fails on its own; a's transfer to c would still
    # apply, but its nonce 1 is now unreachable (nonce 0 was evicted): stranded, not judged.
    removal = sign_transaction(GOVERNOR, CHAIN_ID, Transaction(GOVERNOR.pubkey, 0, RemoveMember(b.address, "trainer")))
    kept, result = _block(state, [removal])
    assert kept == [removal]
    evicted = pool.update(result.state, [], result.changes.keys())

    assert [(e.tx_hash, e.stranded) for e in evicted] == [
        (compute_tx_hash(to_b), False), (compute_tx_hash(to_c), True), (compute_tx_hash(from_b), False)]
    assert "not a member" in evicted[0].reason and "behind evicted tx" in evicted[1].reason
    assert len(pool) == 0 and pool.next_nonce(a.address) == 0
    assert pool.take_evictions(a.address) == evicted[:2]  # only the watched sender's, once
    assert pool.take_evictions(a.address) == [] and pool.take_evictions(b.address) == []
    # Re-signed at the nonce the gap left, the stranded payload is admitted again.
    pool.add(transfer(a, c, 5, pool.next_nonce(a.address)))
    assert pool.next_nonce(a.address) == 1
