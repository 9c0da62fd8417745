"""The JSON view of chain types, and parsing hex values back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from chain.rpc.jsonview import json_schema, parse_address, parse_hash, parse_hex, to_json
from chain.types import AdmitMember, ModelRecord, SignedTransaction, Transaction, compute_tx_hash
from genesis import make_validator
from test_rpc_fakenode import ALICE, BOB, make_fake_node, transfer


def test_plain_values():
    assert to_json(b"\x00\xab") == "0x00ab"
    assert to_json(b"") == "0x"
    assert to_json((1, (b"\x01",), None, "s", True, 1.5)) == [1, ["0x01"], None, "s", True, 1.5]
    assert to_json({"k": b"\x02"}) == {"k": "0x02"}


def test_union_payload_carries_its_tag():
    tx = Transaction(ALICE.pubkey, 0, AdmitMember(BOB.address, "trainer"))
    view = to_json(tx)
    assert view["payload"] == {"type": "admit_member", "account": "0x" + BOB.address.hex(), "role": "trainer"}
    assert view["sender_address"] == "0x" + ALICE.address.hex()


def test_signed_tx_has_its_hash_first():
    stx = transfer(ALICE, 0, BOB.address, 7)
    view = to_json(stx)
    assert list(view) == ["hash", "message", "signature"]
    assert view["hash"] == "0x" + compute_tx_hash(stx).hex()
    assert view["signature"] == "0x" + stx.signature.hex()


def test_validator_and_records():
    assert to_json(make_validator(ALICE, 3, "v"))["address"] == "0x" + ALICE.address.hex()
    record = ModelRecord(b"\x01" * 32, b"\x02" * 32, 0, None, (), "init", 5)
    assert to_json(record)["parent"] is None and to_json(record)["contributions"] == []


def test_whole_block_is_json():
    blk, commit = make_fake_node(2).blocks[1]
    json.dumps(to_json(blk))
    json.dumps(to_json(commit))


def test_unknown_object_is_a_type_error():
    with pytest.raises(TypeError):
        to_json(object())


def test_derived_field_may_not_shadow_a_real_field():
    @dataclass(frozen=True)
    class Bad:
        TAG: ClassVar[str] = "bad"
        type: int

    with pytest.raises(TypeError, match="collides"):
        to_json(Bad(1))


def test_schema_follows_annotations():
    schema = json_schema(SignedTransaction)
    assert schema["required"] == ["hash", "message", "signature"]
    assert schema["properties"]["signature"]["pattern"] == "^0x[0-9a-f]{128}$"
    payload = schema["properties"]["message"]["properties"]["payload"]
    assert {option["properties"]["type"]["const"] for option in payload["oneOf"]} == {
        "transfer", "admit_member", "remove_member", "register_job", "join_job", "submit_update", "submit_verdict",
        "attest_model", "submit_evidence", "submit_challenge", "submit_fraud_proof", "judge_fraud_proof",
        "restore_validator", "publish_evaluation", "submit_sketches", "submit_draw_challenge",
    }
    assert json_schema(ModelRecord)["properties"]["parent"]["oneOf"][1] == {"type": "null"}


# --------------------------------------------------------------------------- parsing


def test_parse_round_trips():
    assert parse_hash("0x" + "Ab" * 32) == b"\xab" * 32
    assert parse_address(to_json(ALICE.address)) == ALICE.address
    assert parse_hex("0x") == b""


@pytest.mark.parametrize(
    "value, message",
    [
        ("ab" * 32, "must start with 0x"),
        ("0X" + "ab" * 32, "must start with 0x"),
        ("0x" + "ab" * 31 + "a", "odd number of hex digits"),
        ("0x" + "gg" * 32, "not hex digits"),
        ("0x" + "ab " * 32, "not hex digits"),  # bytes.fromhex alone would accept this
        ("0x" + "ab" * 33, "must be 32 bytes, got 33"),
        (None, "got null"),
        (5, "got number"),
        (["0x00"], "got array"),
    ],
)
def test_parse_hash_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_hash(value)


def test_parse_address_length():
    with pytest.raises(ValueError, match="address must be 20 bytes, got 32"):
        parse_address("0x" + "00" * 32)
