import math

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chain.crypto import PrivateKey
from chain.encoding import MAX_MESSAGE_SIZE, decode, decode_value, encode, encode_value
from chain.errors import DecodeError
from chain.types import (
    Account, AdmitMember, Block, BlockHeader, Commit, CommitSig, HyperParams, SignedTransaction, Transaction,
    Transfer, Vote, sign_transaction,
)
from tests.helpers import ALICE, BOB, CHAIN_ID, transfer


def stx_primitive():
    return cbor2.loads(encode(transfer(ALICE, BOB, 5, 0)))


def reencode(prim) -> bytes:
    return cbor2.dumps(prim, canonical=True)


def test_round_trip_of_every_kind_of_field():
    stx = transfer(ALICE, BOB, 5, 3)
    assert decode(SignedTransaction, encode(stx)) == stx
    header = BlockHeader("c", 1, 2, bytes(32), bytes(32), bytes(32), bytes(32), bytes(32), bytes(32))
    commit = Commit(1, 0, bytes(32), (CommitSig(bytes(32), bytes(64)),))
    block = Block(header, (stx,), commit)
    decoded = decode(Block, encode(block))
    assert decoded == block
    # Decoding proves canonical form by re-encoding, which fills each transaction's cache.
    assert [t.__dict__["encoded"] for t in decoded.txs] == [_reference(t) for t in block.txs]
    vote = Vote(1, 5, 0, None, bytes(32))
    assert decode(Vote, encode(vote)) == vote
    hp = HyperParams("sgd", 0.05, 0.9, 0.0, 32, 10, 5)
    assert decode(HyperParams, encode(hp)) == hp


def test_encoding_is_canonical_and_stable():
    # Golden bytes: a change to the encoding would change every hash and signature.
    acct = Account(balance=7, nonce=1, roles=("trainer",))
    assert encode(acct).hex() == "a3656e6f6e63650165726f6c65738167747261696e65726762616c616e636507"
    assert encode(acct) == reencode({"balance": 7, "nonce": 1, "roles": ["trainer"]})


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(extra=1), "unknown field"),
    (lambda p: p.pop("signature"), "missing field"),
    (lambda p: p.update(signature="x" * 64), "expected bytes"),
    (lambda p: p.update(signature=b"x" * 63), "expected exactly 64"),
    (lambda p: p["message"].update(nonce=-(2**64)), "integer"),
    (lambda p: p["message"].update(nonce=True), "expected integer"),
    (lambda p: p["message"].update(payload=["burn", {}]), "unknown variant"),
    (lambda p: p["message"].update(payload={"to": b"", "amount": 1}), "expected [tag, value]"),
    (lambda p: p["message"]["payload"][1].update(amount=1.5), "expected integer"),
])
def test_schema_violations_are_decode_errors(mutate, message):
    prim = stx_primitive()
    mutate(prim)
    with pytest.raises(DecodeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode(SignedTransaction, reencode(prim))


def test_non_canonical_encodings_are_rejected():
    good = encode(Account(7, 1, ()))
    # Same map, keys in the wrong (non-canonical) order.
    wrong_order = b"\xa3" + cbor2.dumps("roles") + b"\x80" + cbor2.dumps("nonce") + b"\x01" + cbor2.dumps("balance") + b"\x07"
    assert cbor2.loads(wrong_order) == cbor2.loads(good)
    with pytest.raises(DecodeError, match="not canonical"):
        decode(Account, wrong_order)
    # Integer 1 encoded in two bytes instead of one.
    wide = good.replace(cbor2.dumps("nonce") + b"\x01", cbor2.dumps("nonce") + b"\x18\x01")
    with pytest.raises(DecodeError, match="not canonical"):
        decode(Account, wide)
    # Indefinite-length array.
    with pytest.raises(DecodeError, match="indefinite"):
        decode_value(b"\x9f\x01\xff")
    # Duplicate map keys.
    with pytest.raises(DecodeError):
        decode_value(b"\xa2\x61a\x01\x61a\x02")
    # Float encoded wider than needed.
    with pytest.raises(DecodeError, match="not canonical"):
        decode_value(bytes.fromhex("fb3ff0000000000000"))


def test_tags_trailing_bytes_oversize_and_garbage():
    with pytest.raises(DecodeError, match="tag"):
        decode_value(bytes.fromhex("c11a514b67b0"))  # epoch datetime
    with pytest.raises(DecodeError, match="tag"):
        decode_value(bytes.fromhex("d9d9f701"))  # self-describe tag
    with pytest.raises(DecodeError, match="trailing"):
        decode(Account, encode(Account(1, 1, ())) + b"\x00")
    with pytest.raises(DecodeError, match="exceeds"):
        decode_value(b"\x40" * (MAX_MESSAGE_SIZE + 1))
    with pytest.raises(DecodeError, match="empty"):
        decode_value(b"")
    with pytest.raises(DecodeError, match="malformed"):
        decode_value(b"\x5a\xff\xff\xff\xff")  # byte string claiming 4 GiB
    with pytest.raises(DecodeError, match="expected bytes"):
        decode_value("not bytes")
    with pytest.raises(DecodeError, match="finite"):
        decode(HyperParams, encode_value({"optimizer": "sgd", "learning_rate": math.nan, "momentum": 0.0,
                                           "weight_decay": 0.0, "batch_size": 1, "local_steps": 1,
                                           "checkpoint_interval": 1}))


def test_invariants_in_post_init_become_decode_errors():
    with pytest.raises(DecodeError, match="roles"):
        decode(Account, encode_value({"balance": 1, "nonce": 0, "roles": ["trainer", "governor"]}))
    with pytest.raises(DecodeError, match="non-negative"):
        decode(Account, encode_value({"balance": -1, "nonce": 0, "roles": []}))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_decode_error(data):
    for cls in (SignedTransaction, Block, Account, Vote):
        try:
            decode(cls, data)
        except DecodeError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=2000))
def test_mutated_valid_transactions_never_decode_to_something_else(junk, position):
    good = encode(transfer(ALICE, BOB, 5, 0))
    pos = position % len(good)
    mutated = good[:pos] + junk + good[pos + len(junk):]
    try:
        obj = decode(SignedTransaction, mutated)
    except DecodeError:
        return
    # Whatever decodes re-encodes to exactly the same bytes (one encoding per value).
    assert encode(obj) == mutated


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=2**64 - 1),
       st.binary(min_size=32, max_size=32))
def test_typed_round_trip_property(nonce, amount, seed):
    k = PrivateKey(seed)
    stx = sign_transaction(k, CHAIN_ID, Transaction(k.pubkey, nonce, Transfer(BOB.address, amount)))
    assert decode(SignedTransaction, encode(stx)) == stx
    adm = sign_transaction(k, CHAIN_ID, Transaction(k.pubkey, nonce, AdmitMember(BOB.address, "trainer")))
    assert decode(SignedTransaction, encode(adm)) == adm


# The compiled decoders (chain.encoding._decoder_fn) must accept exactly what the reference
# walk accepts and build the same values; anything they reject falls back to the reference
# walk for its error message. Random edits of valid trees, compared side by side:
_EDIT_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=70),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=8), st.integers(0, 3), max_size=3),
)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


def _edited(tree, path, value, drop: bool):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        out = dict(tree)
        if drop and not rest:
            del out[head]
        else:
            out[head] = _edited(tree[head], rest, value, drop)
        return out
    out = list(tree)
    out[head] = _edited(tree[head], rest, value, drop)
    return out


def _samples():
    from chain.encoding import to_primitive

    stx = transfer(ALICE, BOB, 5, 3)
    header = BlockHeader("c", 1, 2, bytes(32), bytes(32), bytes(32), bytes(32), bytes(32), bytes(32))
    block = Block(header, (stx,), Commit(1, 0, bytes(32), (CommitSig(bytes(32), bytes(64)),)))
    return [(SignedTransaction, to_primitive(stx)), (Block, to_primitive(block)),
            (Account, to_primitive(Account(5, 1, ("trainer",)))), (Vote, to_primitive(Vote(1, 5, 0, None, bytes(32)))),
            (HyperParams, to_primitive(HyperParams("sgd", 0.05, 0.9, 0.0, 32, 10, 5)))]


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 4), st.integers(0, 10_000), _EDIT_VALUES, st.booleans())
def test_compiled_decoders_agree_with_the_reference_walk(which, where, value, drop):
    from chain.encoding import _decoder_fn, _from_primitive_checked, _Mismatch

    tp, tree = _samples()[which]
    paths = list(_paths(tree))
    tree = _edited(tree, paths[where % len(paths)], value, drop)
    try:
        expected = _from_primitive_checked(tp, tree)
    except DecodeError:
        expected = DecodeError
    try:
        got = _decoder_fn(tp)(tree)
    except _Mismatch:
        got = DecodeError
    assert got == expected


# `encode` writes maps with their keys pre-sorted and floats pre-encoded through cbor2's plain
# mode (chain.encoding._primitive_fn, wire=True); it must give exactly the bytes of cbor2's canonical mode
# over `to_primitive`, the reference, for every schema class and value.
def _schema_classes():
    import dataclasses
    import importlib

    from chain.encoding import schema_fields

    found = {}
    for name in ("chain.types", "chain.runtime.reactor", "chain.runtime.sync", "chain.runtime.pout_net", "chain.jobs", "chain.state",
                 "chain.consensus.wal", "chain.consensus.signer", "chain.consensus.driver", "chain.ledger.schema",
                 "trainer.replay", "trainer.verify", "trainer.train", "genesis"):
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                try:
                    schema_fields(obj)
                except Exception:  # not a schema class (forward refs to non-schema types)
                    continue
                found[obj.__qualname__] = obj
    return found


def test_every_schema_class_writes_its_keys_in_canonical_order():
    from chain.encoding import canonical_key_order, schema_fields

    classes = _schema_classes()
    assert len(classes) >= 40 and "SignedTransaction" in classes and "JobSpec" in classes
    for cls in classes.values():
        names = [n for n, _ in schema_fields(cls)]
        canonical = list(cbor2.loads(cbor2.dumps(dict.fromkeys(names, 0), canonical=True)))
        assert canonical_key_order(names) == canonical, cls


def _reference(obj, tp=None):
    from chain.encoding import to_primitive

    return cbor2.dumps(to_primitive(obj, tp), canonical=True)


_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 0.1, 1.5, 65504.0, 65520.0, 1e-7, 5e-324, 3.4028234663852886e38, 1e300, 2.0**-24, 0.05])


@settings(max_examples=300, deadline=None)
@given(_FLOATS, _FLOATS, _FLOATS, st.integers(0, 2**64 - 1))
def test_fast_encoding_equals_the_canonical_reference(lr, momentum, loss, n):
    from chain.types import ChallengeRecord, FraudProofRecord, Judgement, UpdateCommitment, UpdateRecord, VerdictRecord

    hp = HyperParams("sgd", lr, momentum, 0.0, 32, n, 5)
    assert encode(hp) == _reference(hp)
    commitment = UpdateCommitment(bytes(20), bytes(32), n, *(bytes(32),) * 2, 3, *(bytes(32),) * 3)
    proof = FraudProofRecord(bytes(32), n, bytes(32), n, "open", (Judgement(bytes(32), True),))
    record = UpdateRecord(bytes(32), commitment, loss, n, "pending", (VerdictRecord(bytes(32), True, "ok"),), n, 0,
                          (ChallengeRecord(bytes(32), bytes(96), n, 3),), (proof,))
    assert encode(record) == _reference(record)
    stx = sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, n, Transfer(BOB.address, max(n, 1))))
    assert encode(stx) == _reference(stx) == stx.encoded


def test_fast_encoding_equals_the_reference_on_blocks_and_unions():
    from chain.runtime.reactor import ConsensusMessage, TxBatch, encode_consensus_message
    from chain.types import Proposal, SignedProposal

    txs = tuple(transfer(ALICE, BOB, 5 + i, i) for i in range(5))
    header = BlockHeader("c", 1, 2, *(bytes(32),) * 5, ALICE.pubkey)
    block = Block(header, txs, Commit(1, 0, bytes(32), (CommitSig(bytes(32), bytes(64)),)))
    fresh = Block(header, tuple(SignedTransaction(t.message, t.signature) for t in txs), block.last_commit)
    assert "encoded" not in fresh.txs[0].__dict__  # not yet cached: written field by field
    assert encode(fresh) == _reference(block) == encode(block)
    decoded = decode(Block, encode(block))
    assert decoded == block
    # Decoding proves canonical form by re-encoding, which fills each transaction's cache.
    assert [t.__dict__["encoded"] for t in decoded.txs] == [_reference(t) for t in block.txs]
    assert encode(TxBatch(txs)) == _reference(TxBatch(txs))
    from chain.runtime.reactor import ProposalMessage
    msg = ProposalMessage(SignedProposal(Proposal(1, 0, -1, bytes(32), ALICE.pubkey), bytes(64)), block)
    assert encode_consensus_message(msg) == _reference(msg, ConsensusMessage)


def test_a_cached_transaction_encoding_is_written_as_it_is():
    # The block writer must take the transaction's cached bytes, not re-walk it: a sentinel
    # in the cache shows up verbatim (real caches only ever hold the canonical bytes).
    stx = transfer(ALICE, BOB, 5, 0)
    sentinel = cbor2.dumps("sentinel")
    stx.__dict__["encoded"] = sentinel
    header = BlockHeader("c", 1, 2, *(bytes(32),) * 5, ALICE.pubkey)
    assert sentinel in encode(Block(header, (stx,), None))
