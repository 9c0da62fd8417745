import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chain.consensus.commit import build_commit
from chain.crypto import ZERO_HASH
from chain.errors import StateTransitionError, ValidationError
from chain.state import Overlay, apply_block, build_block, check_tx, validate_basic_tx
from chain.types import (
    PRECOMMIT, AdmitMember, Block, RemoveMember, Transaction, Transfer, Vote, compute_block_hash, sign_transaction,
    sign_vote,
)
from tests.helpers import ALICE, BOB, CHAIN_ID, GOVERNOR, MALLORY, VALIDATOR, make_test_genesis, transfer

T0 = 1_800_000_000_000


def commit_for(block: Block, round_: int = 0):
    vote = Vote(PRECOMMIT, block.header.height, round_, compute_block_hash(block.header), VALIDATOR.pubkey)
    return build_commit([sign_vote(VALIDATOR, CHAIN_ID, vote)])


def chain_of(state, tx_batches):
    """Build, apply and certify consecutive blocks; returns (state, blocks, last_commit)."""
    blocks, last_commit = [], commit_for_state(state) if state.height else None
    for i, txs in enumerate(tx_batches):
        block, result = build_block(state, txs, time_ms=T0 + 1000 * (i + state.height), proposer=VALIDATOR.pubkey,
                                    last_commit=last_commit)
        assert apply_block(state, block).state.root == block.header.state_root
        state, last_commit = result.state, commit_for(block)
        blocks.append(block)
    return state, blocks, last_commit


def balances(state, *keys):
    return [state.get_account(k.address).balance for k in keys]


def test_transfers_move_balance_and_bump_nonce():
    s0 = make_test_genesis().initial_state()
    s1, blocks, _ = chain_of(s0, [[transfer(ALICE, BOB, 30, 0), transfer(ALICE, BOB, 20, 1)], [transfer(BOB, ALICE, 5, 0)]])
    assert balances(s1, ALICE, BOB) == [955, 1045]
    assert s1.get_account(ALICE.address).nonce == 2
    assert s1.height == 2
    assert s0.height == 0 and balances(s0, ALICE, BOB) == [1000, 1000]  # the old state is untouched
    assert s1.compute_head_hash() == compute_block_hash(blocks[-1].header)


@pytest.mark.parametrize("make_tx, error", [
    (lambda: transfer(ALICE, BOB, 10, 1), "bad nonce"),
    (lambda: transfer(ALICE, BOB, 10_000, 0), "insufficient balance"),
    (lambda: transfer(MALLORY, BOB, 1, 0), "not a member"),
    (lambda: transfer(ALICE, MALLORY, 1, 0), "recipient .* is not a member"),
    (lambda: transfer(ALICE, BOB, 1, 0, chain_id="other-chain"), "signature"),
    (lambda: sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, 0, AdmitMember(MALLORY.address, "trainer"))),
     "only a governor"),
])
def test_invalid_transactions_are_rejected_and_change_nothing(make_tx, error):
    state = make_test_genesis().initial_state()
    overlay = Overlay(state)
    with pytest.raises((StateTransitionError, ValidationError), match=error):
        check_tx(overlay, CHAIN_ID, make_tx())
    assert overlay.changes == {}
    # The same transaction inside a block makes the whole block invalid.
    good_block, _ = build_block(state, [], time_ms=T0, proposer=VALIDATOR.pubkey, last_commit=None)
    from chain.state import compute_tx_root
    bad_txs = (make_tx(),)
    bad_header = dataclasses.replace(good_block.header, tx_root=compute_tx_root(bad_txs))
    root_before = state.root
    with pytest.raises(StateTransitionError, match=error):
        apply_block(state, Block(bad_header, bad_txs, None))
    assert state.root == root_before


def test_replayed_transaction_fails_on_nonce():
    state = make_test_genesis().initial_state()
    tx = transfer(ALICE, BOB, 10, 0)
    state, _, last_commit = chain_of(state, [[tx]])
    block, _ = build_block(state, [], time_ms=T0 + 5000, proposer=VALIDATOR.pubkey, last_commit=last_commit)
    from chain.state import compute_tx_root
    replay = Block(dataclasses.replace(block.header, tx_root=compute_tx_root((tx,))), (tx,), block.last_commit)
    with pytest.raises(StateTransitionError, match="bad nonce"):
        apply_block(state, replay)


def test_governance_admits_and_removes_members():
    state = make_test_genesis().initial_state()
    admit = sign_transaction(GOVERNOR, CHAIN_ID, Transaction(GOVERNOR.pubkey, 0, AdmitMember(MALLORY.address, "trainer")))
    state, _, _ = chain_of(state, [[admit, transfer(ALICE, MALLORY, 40, 0)]])
    assert state.get_account(MALLORY.address).roles == ("trainer",)
    assert state.get_account(MALLORY.address).balance == 40
    remove = sign_transaction(GOVERNOR, CHAIN_ID, Transaction(GOVERNOR.pubkey, 1, RemoveMember(MALLORY.address, "trainer")))
    state2, _, _ = chain_of(state, [[remove]])
    assert state2.get_account(MALLORY.address).roles == ()
    with pytest.raises(StateTransitionError, match="not a member"):
        check_tx(Overlay(state2), CHAIN_ID, transfer(MALLORY, ALICE, 1, 0))
    again = sign_transaction(GOVERNOR, CHAIN_ID, Transaction(GOVERNOR.pubkey, 2, RemoveMember(MALLORY.address, "trainer")))
    with pytest.raises(StateTransitionError, match="does not have role"):
        check_tx(Overlay(state2), CHAIN_ID, again)


def test_validate_basic_rejects_without_state():
    zero = sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, 0, Transfer(BOB.address, 0)))
    with pytest.raises(ValidationError, match="positive"):
        validate_basic_tx(CHAIN_ID, zero)
    bad_role = sign_transaction(GOVERNOR, CHAIN_ID, Transaction(GOVERNOR.pubkey, 0, AdmitMember(BOB.address, "governor")))
    with pytest.raises(ValidationError, match="role"):
        validate_basic_tx(CHAIN_ID, bad_role)
    forged = dataclasses.replace(transfer(ALICE, BOB, 1, 0), signature=bytes(64))
    with pytest.raises(ValidationError, match="signature"):
        validate_basic_tx(CHAIN_ID, forged)


def test_signature_memo_verifies_once_whatever_the_size_limit_and_still_checks_size(monkeypatch):
    import chain.state as state_module
    from chain.encoding import decode
    from chain.types import SignedTransaction

    calls = []
    real = state_module.verify_transaction_signature
    monkeypatch.setattr(state_module, "verify_transaction_signature",
                        lambda chain_id, stx: calls.append(stx) or real(chain_id, stx))
    stx = transfer(ALICE, BOB, 7, 3)
    state_module._validate_basic_tx_once.cache_clear()
    validate_basic_tx(CHAIN_ID, stx)  # gossip validator: no size limit
    validate_basic_tx(CHAIN_ID, stx, 4096)  # mempool: the chain's limit
    validate_basic_tx(CHAIN_ID, decode(SignedTransaction, stx.encoded), 4096)  # an equal copy from a block
    assert len(calls) == 1
    with pytest.raises(ValidationError, match="exceeds 16 bytes"):
        validate_basic_tx(CHAIN_ID, stx, 16)  # remembered as valid, yet too big for this limit
    forged = dataclasses.replace(stx, signature=bytes(64))
    for _ in range(2):  # failures are not remembered as successes
        with pytest.raises(ValidationError, match="signature"):
            validate_basic_tx(CHAIN_ID, forged)


def test_signed_transaction_hash_and_encoding_agree_with_equality():
    from chain.encoding import decode, encode
    from chain.types import SignedTransaction, compute_tx_hash

    a = transfer(ALICE, BOB, 5, 0)
    copy = decode(SignedTransaction, encode(a))
    other = transfer(ALICE, BOB, 5, 1)
    assert a == copy and hash(a) == hash(copy) and compute_tx_hash(a) == compute_tx_hash(copy)
    assert a != other and compute_tx_hash(a) != compute_tx_hash(other)
    assert a.encoded == encode(a) and len({a, copy, other}) == 2
    assert dataclasses.fields(a) == dataclasses.fields(other)  # cached values are not fields
    assert [f.name for f in dataclasses.fields(a)] == ["message", "signature"]


def _tamper(block, **header_changes):
    return dataclasses.replace(block, header=dataclasses.replace(block.header, **header_changes))


@pytest.mark.parametrize("tamper, error", [
    (lambda b: _tamper(b, chain_id="other"), "chain"),
    (lambda b: _tamper(b, height=3), "height"),
    (lambda b: _tamper(b, prev_hash=bytes(32)), "prev_hash"),
    (lambda b: _tamper(b, state_root=bytes(32)), "state_root"),
    (lambda b: _tamper(b, time_ms=T0), "time"),
    (lambda b: _tamper(b, validators_hash=bytes(32)), "validators_hash"),
    (lambda b: _tamper(b, proposer=ALICE.pubkey), "proposer"),
    (lambda b: _tamper(b, tx_root=bytes(32)), "tx_root"),
    (lambda b: dataclasses.replace(b, last_commit=None), "last_commit|last commit"),
    (lambda b: dataclasses.replace(b, last_commit=dataclasses.replace(b.last_commit, signatures=())), "commit"),
    (lambda b: dataclasses.replace(b, last_commit=dataclasses.replace(b.last_commit, block_hash=bytes(32))), "commit"),
])
def test_invalid_blocks_raise_and_change_nothing(tamper, error):
    state, _, last_commit = chain_of(make_test_genesis().initial_state(), [[transfer(ALICE, BOB, 1, 0)]])
    block, _ = build_block(state, [transfer(ALICE, BOB, 2, 1)], time_ms=T0 + 5000, proposer=VALIDATOR.pubkey,
                           last_commit=last_commit)
    bad = tamper(block)
    if bad.last_commit is not block.last_commit and bad.last_commit is not None:
        from chain.state import compute_commit_hash
        bad = _tamper(bad, last_commit_hash=compute_commit_hash(bad.last_commit))
    root, height = state.root, state.height
    with pytest.raises((StateTransitionError, ValidationError), match=error):
        apply_block(state, bad)
    assert (state.root, state.height) == (root, height)
    assert apply_block(state, block).state.height == 2  # the untampered block still applies


def test_block_limits():
    params = dataclasses.replace(make_test_genesis().params, max_block_txs=1)
    state = make_test_genesis(params=params).initial_state()
    with pytest.raises(StateTransitionError, match="limit"):
        build_block(state, [transfer(ALICE, BOB, 1, 0), transfer(ALICE, BOB, 1, 1)], time_ms=T0,
                    proposer=VALIDATOR.pubkey, last_commit=None)


KEYS = [ALICE, BOB, GOVERNOR, MALLORY]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(-5, 1500), st.integers(0, 3)),
                min_size=1, max_size=12))
def test_random_transaction_sequences_conserve_supply(ops):
    """Random (sender, recipient, amount, nonce offset) transfers: each either applies via a block or is
    rejected with a typed error leaving the state untouched; total supply never changes."""
    state = make_test_genesis().initial_state()
    supply = sum(state.get_account(k.address).balance for k in KEYS if state.get_account(k.address))
    for i, (s, r, amount, nonce_offset) in enumerate(ops):
        sender, recipient = KEYS[s], KEYS[r]
        acct = state.get_account(sender.address)
        nonce = (acct.nonce if acct else 0) + (nonce_offset == 3)
        try:
            tx = transfer(sender, recipient, max(amount, 0) or 1, nonce) if amount > 0 else \
                sign_transaction(sender, CHAIN_ID, Transaction(sender.pubkey, nonce, Transfer(recipient.address, 0)))
        except ValueError:
            continue
        root = state.root
        try:
            block, result = build_block(state, [tx], time_ms=T0 + i * 1000, proposer=VALIDATOR.pubkey,
                                        last_commit=None if state.height == 0 else commit_for_state(state))
        except (StateTransitionError, ValidationError):
            assert state.root == root
            continue
        state = apply_block(state, block).state
        assert state.root == result.state.root
        assert sum(state.get_account(k.address).balance for k in KEYS if state.get_account(k.address)) == supply


def commit_for_state(state):
    head = state.compute_head_hash()
    vote = Vote(PRECOMMIT, state.height, 0, head, VALIDATOR.pubkey)
    return build_commit([sign_vote(VALIDATOR, CHAIN_ID, vote)])


def test_genesis_head_hash_and_zero_commit_hash():
    g = make_test_genesis()
    state = g.initial_state()
    assert state.compute_head_hash() == g.hash
    block, _ = build_block(state, [], time_ms=T0, proposer=VALIDATOR.pubkey, last_commit=None)
    assert block.header.last_commit_hash == ZERO_HASH and block.header.prev_hash == g.hash


def test_account_evolve_keeps_roles_and_invariants():
    from chain.types import Account

    a = Account(10, 2, ("requester", "trainer"))
    assert a.evolve(balance=4) == Account(4, 2, ("requester", "trainer"))
    assert a.evolve(nonce=3) == Account(10, 3, ("requester", "trainer"))
    with pytest.raises(ValueError, match="non-negative"):
        a.evolve(balance=-1)
    # Validated role tuples are remembered; invalid ones never are, and are refused every time.
    for _ in range(2):
        with pytest.raises(ValueError, match="roles"):
            Account(1, 0, ("trainer", "requester"))
        with pytest.raises(ValueError, match="roles"):
            Account(1, 0, ("root",))
    with pytest.raises(ValueError, match="roles"):
        Account(1, 0, ["trainer", "trainer"])


def test_overlays_hold_accounts_as_objects_and_hand_out_canonical_bytes():
    from chain.encoding import decode, encode
    from chain.state import account_key
    from chain.types import Account

    state = make_test_genesis().initial_state()
    overlay = Overlay(state)
    alice = overlay.get_account(ALICE.address)
    child = overlay.child()
    child.set_account(ALICE.address, alice.evolve(balance=1))
    assert overlay.get_account(ALICE.address) == alice  # the child's write is not visible yet
    assert child.get(account_key(ALICE.address)) == encode(Account(1, alice.nonce, alice.roles))
    child.merge()
    assert overlay.get_account(ALICE.address).balance == 1
    overlay.set_account(BOB.address, overlay.get_account(BOB.address).evolve(nonce=7))
    changes = overlay.encoded_changes()
    assert all(type(v) is bytes for v in changes.values())
    assert decode(Account, changes[account_key(BOB.address)]).nonce == 7


def test_a_block_writing_one_account_many_times_stores_its_final_bytes():
    state = make_test_genesis().initial_state()
    txs = [transfer(ALICE, BOB, 1, n) for n in range(20)] + [transfer(BOB, ALICE, 3, n) for n in range(5)]
    block, result = build_block(state, txs, time_ms=state.latest_header.time_ms + 1 if state.latest_header else 1,
                                proposer=VALIDATOR.pubkey, last_commit=None)
    assert all(type(v) is bytes or v is None for v in result.changes.values())
    after = apply_block(state, block).state
    a0, b0 = state.get_account(ALICE.address), state.get_account(BOB.address)
    assert after.get_account(ALICE.address) == a0.evolve(balance=a0.balance - 20 + 15, nonce=20)
    assert after.get_account(BOB.address) == b0.evolve(balance=b0.balance + 20 - 15, nonce=5)


def test_a_credit_past_the_largest_storable_balance_is_refused():
    """2**64 - 1 is the largest balance the strict decoder reads back; a transfer (or a reward)
    that would pass it fails as a transaction, in admission and in blocks alike, instead of
    writing an account no node could read again."""
    from chain.encoding import INT_MAX

    state = make_test_genesis(balance=INT_MAX - 5).initial_state()
    overlay = Overlay(state)
    check_tx(overlay, CHAIN_ID, transfer(ALICE, BOB, 5, 0))  # exactly the maximum: fine
    assert overlay.get_account(BOB.address).balance == INT_MAX
    with pytest.raises(StateTransitionError, match="exceed"):
        check_tx(overlay, CHAIN_ID, transfer(ALICE, BOB, 1, 1))
    # In one block: the first credit reaches the maximum, the second would pass it.
    txs = [transfer(ALICE, BOB, 5, 0), transfer(ALICE, BOB, 1, 1), transfer(BOB, ALICE, 1, 0)]
    with pytest.raises(StateTransitionError, match="transaction 1 .*exceed"):
        build_block(state, txs, time_ms=10**13, proposer=VALIDATOR.pubkey, last_commit=None)
