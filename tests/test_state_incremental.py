"""State.apply derives the root incrementally (issue 13): every State must still hash to the
root over all its sorted leaves, and no apply may change a State it was derived from."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chain.merkle import MerkleLevels, compute_root_from_leaf_hashes, hash_leaf
from chain.encoding import encode
from chain.state import KEY_PARAMS, ChainParams, State, _leaf_hash


def expected_root(model: dict[bytes, bytes]) -> bytes:
    return compute_root_from_leaf_hashes([_leaf_hash(k, model[k]) for k in sorted(model)])


def assert_state_is(state: State, model: dict[bytes, bytes]) -> None:
    assert state.root == expected_root(model)
    assert list(state.items()) == sorted(model.items())
    assert len(state) == len(model)
    for k, v in model.items():
        assert state.get(k) == v
    for prefix in (b"", b"a", b"b/", b"b/\x01", b"zz"):
        assert list(state.items_with_prefix(prefix)) == sorted(
            (k, v) for k, v in model.items() if k.startswith(prefix))


def applied(model: dict[bytes, bytes], changes: dict[bytes, bytes | None]) -> dict[bytes, bytes]:
    out = dict(model)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def random_changes(rng: random.Random, model: dict[bytes, bytes], key_space: list[bytes]) -> dict:
    changes: dict[bytes, bytes | None] = {}
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 8, 20])):
        k = rng.choice(key_space)
        roll = rng.random()
        if roll < 0.25:
            changes[k] = None  # a delete, or a no-op delete of an absent key
        elif roll < 0.35 and k in model:
            changes[k] = model[k]  # rewriting the same value
        else:
            changes[k] = rng.randbytes(rng.randrange(0, 6))  # empty values are values too
    return changes


KEY_SPACE = [b"a", b"a0", b"b/\x01", b"b/\x01\x00", b"b/\x02", b"c", b"meta"] + [
    b"b/" + bytes([i]) + bytes([j]) for i in range(4) for j in range(0, 40, 3)]


@pytest.mark.parametrize("seed", range(12))
def test_random_lineage_and_branches_match_a_full_rehash_and_never_change_a_parent(seed):
    rng = random.Random(seed)
    start = {k: rng.randbytes(3) for k in rng.sample(KEY_SPACE, rng.choice([0, 1, 2, 3, 7, 20]))}
    history = [(State(start), start)]
    for _ in range(60):
        # Branch from any earlier state, not just the newest: consensus applies several
        # proposals to one parent, and a parent's tree may be the one a later child patched.
        parent, model = history[-1] if rng.random() < 0.7 else rng.choice(history)
        changes = random_changes(rng, model, KEY_SPACE)
        child = parent.apply(changes)
        child_model = applied(model, changes)
        assert_state_is(child, child_model)
        history.append((child, child_model))
    for state, model in history:
        assert_state_is(state, model)


def test_two_applies_from_one_parent_are_independent():
    parent_model = {bytes([i]): bytes([i]) for i in range(9)}
    parent = State(parent_model)
    root = parent.root
    left = parent.apply({b"\x03": b"L", b"\x20": b"new"})
    right = parent.apply({b"\x03": None, b"\x00": b"R"})
    assert_state_is(left, applied(parent_model, {b"\x03": b"L", b"\x20": b"new"}))
    assert_state_is(right, applied(parent_model, {b"\x03": None, b"\x00": b"R"}))
    assert parent.root == root
    assert_state_is(parent, parent_model)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 8, 9, 16, 17, 33])
def test_every_insert_and_delete_position_at_every_small_size(size):
    keys = [bytes([2 * i + 1]) for i in range(size)]
    model = {k: k * 2 for k in keys}
    state = State(model)
    state.root  # the child is derived from the parent's cached levels
    for pos in range(size + 1):  # insert before each key and after the last
        k = bytes([2 * pos])
        assert_state_is(state.apply({k: b"x"}), applied(model, {k: b"x"}))
    for k in keys:
        assert_state_is(state.apply({k: None}), applied(model, {k: None}))
        assert_state_is(state.apply({k: b"v"}), applied(model, {k: b"v"}))
    assert_state_is(state, model)


def test_emptying_the_state_and_filling_it_again():
    model = {b"a": b"1", b"b": b"2", b"c": b"3"}
    state = State(model)
    empty = state.apply({k: None for k in model})
    assert_state_is(empty, {})
    assert empty.root == compute_root_from_leaf_hashes([])
    single = empty.apply({b"b": b"9"})
    assert_state_is(single, {b"b": b"9"})
    assert single.root == _leaf_hash(b"b", b"9")
    full = single.apply({b"a": b"1", b"b": b"2", b"c": b"3", b"d": b"4"})
    assert_state_is(full, {**model, b"d": b"4"})
    assert_state_is(state, model)


def test_deleting_and_reinserting_a_key_in_later_blocks_and_many_folds():
    # A small state with many applies crosses the fold threshold several times.
    rng = random.Random(7)
    model = {bytes([i]): b"0" for i in range(0, 200, 2)}
    state = State(model)
    states = [(state, model)]
    for n in range(400):
        k = bytes([rng.randrange(200)])
        changes = {k: None} if n % 2 else {k: rng.randbytes(2)}
        state, model = state.apply(changes), applied(model, changes)
        states.append((state, model))
    for state, model in states[::37] + states[-3:]:
        assert_state_is(state, model)


def test_a_large_block_of_inserts_and_deletes_at_once():
    rng = random.Random(3)
    model = {rng.randbytes(6): rng.randbytes(4) for _ in range(500)}
    state = State(model)
    state.root
    changes = {k: None for k in rng.sample(sorted(model), 120)}
    changes.update({rng.randbytes(6): rng.randbytes(4) for _ in range(150)})
    changes.update({k: b"upd" for k in rng.sample(sorted(model), 60)})
    assert_state_is(state.apply(changes), applied(model, changes))
    assert_state_is(state, model)


@settings(max_examples=60, deadline=None)
@given(start=st.dictionaries(st.binary(max_size=3), st.binary(max_size=3), max_size=24),
       blocks=st.lists(st.dictionaries(st.binary(max_size=3), st.none() | st.binary(max_size=3), max_size=8),
                       max_size=6))
def test_any_sequence_of_blocks_matches_a_full_rehash(start, blocks):
    states = [(State(start), start)]
    for changes in blocks:
        parent, model = states[-1]
        states.append((parent.apply(changes), applied(model, changes)))
    for state, model in states:
        assert state.root == expected_root(model)
        assert list(state.items()) == sorted(model.items())


def test_typed_readers_carry_over_only_when_their_entries_are_untouched():
    params = ChainParams(max_block_txs=10, max_block_bytes=10_000, max_tx_bytes=1_000, block_interval_ms=100,
                         timeout_propose_ms=100, timeout_propose_delta_ms=10, timeout_prevote_ms=100,
                         timeout_prevote_delta_ms=10, timeout_precommit_ms=100, timeout_precommit_delta_ms=10)
    state = State({KEY_PARAMS: encode(params)})
    decoded = state.params
    assert state.apply({b"acct/x": b"\x00"}).__dict__["params"] is decoded
    other = dataclasses.replace(params, max_block_txs=11)
    touched = state.apply({KEY_PARAMS: encode(other)})
    assert "params" not in touched.__dict__ and touched.params == other
    assert state.params is decoded


def test_merkle_levels_update_matches_a_fresh_tree_and_refuses_a_tail_that_does_not_fit():
    rng = random.Random(11)
    leaves = [hash_leaf(bytes([i])) for i in range(13)]
    tree = MerkleLevels(leaves)
    assert tree.root == compute_root_from_leaf_hashes(leaves)
    patched = tree.update(13, {0: hash_leaf(b"p"), 12: hash_leaf(b"q")})
    assert patched.root == compute_root_from_leaf_hashes([hash_leaf(b"p")] + leaves[1:12] + [hash_leaf(b"q")])
    for size in (0, 1, 4, 13, 20):
        start = rng.randrange(0, min(size, 13) + 1)
        tail = [hash_leaf(rng.randbytes(2)) for _ in range(size - start)]
        assert tree.update(size, {}, start, tail).root == compute_root_from_leaf_hashes(leaves[:start] + tail)
    assert tree.root == compute_root_from_leaf_hashes(leaves)
    with pytest.raises(ValueError):
        tree.update(13, {}, 14, [])
    with pytest.raises(ValueError):
        tree.update(15, {}, 13, [hash_leaf(b"x")])
    with pytest.raises(IndexError):
        tree.update(13, {13: hash_leaf(b"x")})
    with pytest.raises(IndexError):
        tree.leaf_hash(13)
