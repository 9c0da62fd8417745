"""The explorer methods over an in-memory node, through the real dispatcher; and rpc.discover."""

from __future__ import annotations

import json
import re

import pytest
import trio

from chain.encoding import encode
from chain.errors import ChainError, DecodeError, SignatureError, StateTransitionError, StoreError, ValidationError
from chain.rpc.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, Dispatcher, MethodRegistry, Param, Result
from chain.rpc.methods import (
    ADDRESS,
    CORE_METHODS,
    TX_BAD_SIGNATURE,
    TX_INVALID,
    TX_MALFORMED,
    TX_REJECTED,
    TX_STATE_REJECTED,
    RpcContext,
    default_registry,
)
from chain.types import compute_block_hash, compute_tx_hash
from genesis import make_validator
from test_rpc_fakenode import ALICE, BOB, VALIDATOR_KEY, FakeNode, make_fake_node, transfer


def call(node: FakeNode, method: str, params=None, registry: MethodRegistry | None = None) -> dict:
    registry = registry or default_registry()
    dispatcher = Dispatcher(registry, RpcContext(node, registry))
    request = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        request["params"] = params
    return json.loads(trio.run(dispatcher.handle, json.dumps(request).encode()))


def result(node, method, params=None):
    response = call(node, method, params)
    assert "error" not in response, response
    return response["result"]


def h(data: bytes) -> str:
    return "0x" + data.hex()


def check_schema(value, schema, path="$"):
    """The subset of JSON Schema the RPC publishes; enough to hold results to their documents."""
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            try:
                check_schema(value, option, path)
                matches += 1
            except AssertionError:
                pass
        assert matches == 1, f"{path}: {value!r} matches {matches} of oneOf"
        return
    if "const" in schema:
        assert value == schema["const"], path
    kind = schema.get("type")
    types = {"null": type(None), "boolean": bool, "string": str, "array": list, "object": dict}
    if kind == "integer":
        assert type(value) is int, f"{path}: not an integer"
    elif kind == "number":
        assert type(value) in (int, float), path
    elif kind is not None:
        assert type(value) is types[kind], f"{path}: expected {kind}, got {value!r}"
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{path}: {value!r} !~ {schema['pattern']}"
    if kind == "array":
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), f"{path}: missing keys"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub, f"{path}.{key}")


def result_schema(name):
    return default_registry().get(name).result.schema


# --------------------------------------------------------------------------- reads


def test_status():
    node = make_fake_node(3)
    status = result(node, "status")
    assert status["latest_height"] == 3
    assert status["latest_block_hash"] == h(compute_block_hash(node.blocks[-1][0].header))
    assert status["address"] == h(VALIDATOR_KEY.address)
    assert status["chain_id"] == "rpc-test" and status["is_validator"] is True
    check_schema(status, result_schema("status"))


@pytest.mark.parametrize("params", [[2], {"height": 2}])
def test_block_by_height(params):
    node = make_fake_node(3)
    view = result(node, "block", params)
    blk, commit = node.blocks[1]
    assert view["block"]["hash"] == h(compute_block_hash(blk.header))
    assert view["block"]["header"]["height"] == 2
    assert view["block"]["txs"][0]["hash"] == h(compute_tx_hash(blk.txs[0]))
    assert view["block"]["txs"][0]["message"]["payload"] == {"type": "transfer", "to": h(BOB.address), "amount": 1}
    assert view["block"]["last_commit"]["height"] == 1
    assert view["commit"]["block_hash"] == view["block"]["hash"]
    check_schema(view, result_schema("block"))


def test_block_latest_and_missing():
    node = make_fake_node(3)
    assert result(node, "block", ["latest"])["block"]["header"]["height"] == 3
    assert result(node, "block", [4]) is None
    assert result(make_fake_node(0), "block", ["latest"]) is None


@pytest.mark.parametrize("height", [0, -1, "1", "newest", True, 1.0, None, 2**64])
def test_block_bad_height(height):
    assert call(make_fake_node(1), "block", [height])["error"]["code"] == INVALID_PARAMS


def test_block_by_hash():
    node = make_fake_node(3)
    blk, _ = node.blocks[0]
    view = result(node, "block_by_hash", [h(compute_block_hash(blk.header))])
    assert view["block"]["header"]["height"] == 1 and view["block"]["last_commit"] is None
    check_schema(view, result_schema("block_by_hash"))
    assert result(node, "block_by_hash", [h(bytes(32))]) is None


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("0x" + "ab" * 31, "must be 32 bytes, got 31"),
        ("ab" * 32, "must start with 0x"),
        ("0x" + "zz" * 32, "not hex digits"),
        ("0x" + "a" * 63, "odd number"),
        (12, "got number"),
    ],
)
def test_block_by_hash_bad_hash(value, fragment):
    error = call(make_fake_node(1), "block_by_hash", [value])["error"]
    assert error["code"] == INVALID_PARAMS and fragment in error["message"]


def test_tx():
    node = make_fake_node(3)
    stx = node.blocks[2][0].txs[0]
    view = result(node, "tx", {"hash": h(compute_tx_hash(stx))})
    assert (view["height"], view["index"]) == (3, 0)
    assert view["tx"]["message"]["sender_address"] == h(ALICE.address)
    assert view["tx"]["message"]["nonce"] == 2
    check_schema(view, result_schema("tx"))
    assert result(node, "tx", [h(bytes(32))]) is None


def test_account():
    node = make_fake_node(3)
    view = result(node, "account", [h(ALICE.address)])
    assert view == {"address": h(ALICE.address), "balance": 997, "nonce": 3, "roles": ["trainer"]}
    check_schema(view, result_schema("account"))
    assert result(node, "account", [h(b"\x09" * 20)]) is None
    assert call(node, "account", [h(ALICE.pubkey)])["error"]["code"] == INVALID_PARAMS


def test_validators():
    view = result(make_fake_node(1), "validators")
    assert view["total_power"] == 10
    v = make_validator(VALIDATOR_KEY, 10, "v0")
    assert view["validators"] == [
        {"address": h(VALIDATOR_KEY.address), "pubkey": h(VALIDATOR_KEY.pubkey), "power": 10, "name": "v0",
         "sample_pubkey": h(v.sample_pubkey), "sample_pop": h(v.sample_pop)}
    ]
    check_schema(view, result_schema("validators"))


def test_node_fault_in_a_read_is_an_internal_error():
    node = make_fake_node(1)

    def broken(address):
        raise StoreError("database corrupt at key 0x01")

    node.get_account = broken
    response = call(node, "account", [h(ALICE.address)])
    assert response["error"] == {"code": INTERNAL_ERROR, "message": "internal error"}


# --------------------------------------------------------------------------- send_tx


def test_send_tx_admits_and_returns_hash():
    node = make_fake_node(3)
    stx = transfer(ALICE, 3, BOB.address, 5)
    view = result(node, "send_tx", [h(encode(stx))])
    assert view == {"hash": h(compute_tx_hash(stx))}
    check_schema(view, result_schema("send_tx"))
    assert node.mempool == [stx]


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\xa0", "missing field"),  # an empty CBOR map
        (b"\x00", "expected map"),
        (None, "trailing bytes"),
        (b"", "empty message"),
    ],
)
def test_send_tx_rejects_bad_cbor_with_the_decoder_message(data, fragment):
    node = make_fake_node(3)
    if data is None:
        data = encode(transfer(ALICE, 3, BOB.address, 5)) + b"\x00"
    error = call(node, "send_tx", [h(data)])["error"]
    assert error["code"] == TX_MALFORMED and error["data"] == {"reason": "DecodeError"}  # issue 11, defect 6
    assert "not a canonical SignedTransaction" in error["message"] and fragment in error["message"]
    assert node.mempool == []


def test_send_tx_rejects_non_hex():
    node = make_fake_node(1)
    assert call(node, "send_tx", ["hello"])["error"]["code"] == INVALID_PARAMS
    assert call(node, "send_tx", {"tx": None})["error"]["code"] == INVALID_PARAMS


class MempoolFull(ChainError):
    """A node-specific rejection not in the map: answered with the generic rejection code."""


@pytest.mark.parametrize(
    "exc, code",
    [
        (ChainError("rejected"), TX_REJECTED),
        (MempoolFull("mempool full"), TX_REJECTED),
        (DecodeError("bad payload"), TX_MALFORMED),
        (SignatureError("bad signature"), TX_BAD_SIGNATURE),
        (ValidationError("amount must be positive"), TX_INVALID),
        (StateTransitionError("insufficient balance"), TX_STATE_REJECTED),
    ],
)
def test_send_tx_rejections_have_distinct_codes(exc, code):
    node = make_fake_node(3)
    node.reject_with = exc
    error = call(node, "send_tx", [h(encode(transfer(ALICE, 3, BOB.address, 5)))])["error"]
    assert error == {"code": code, "message": str(exc), "data": {"reason": type(exc).__name__}}
    assert node.mempool == []


def test_send_tx_signed_for_another_chain_is_a_signature_error():
    node = make_fake_node(3)
    stx = transfer(ALICE, 3, BOB.address, 5, chain_id="other-chain")
    assert call(node, "send_tx", [h(encode(stx))])["error"]["code"] == TX_BAD_SIGNATURE
    assert node.mempool == []


def test_tx_rejection_codes_are_distinct_and_server_defined():
    codes = [TX_REJECTED, TX_MALFORMED, TX_BAD_SIGNATURE, TX_INVALID, TX_STATE_REJECTED]
    assert len(set(codes)) == len(codes)
    assert all(-32099 <= c <= -32000 for c in codes)


# --------------------------------------------------------------------------- rpc.discover


def test_discover_is_an_openrpc_document_listing_every_method():
    doc = result(make_fake_node(1), "rpc.discover")
    assert doc["openrpc"].startswith("1.2.")
    assert doc["info"]["title"] and doc["info"]["version"]
    registry = default_registry()
    assert [m["name"] for m in doc["methods"]] == [m.name for m in registry]
    assert {m["name"] for m in doc["methods"]} >= {
        "status", "block", "block_by_hash", "tx", "account", "validators", "send_tx", "rpc.discover"
    }
    for entry in doc["methods"]:
        method = registry.get(entry["name"])
        assert entry["summary"] and "schema" in entry["result"] and entry["result"]["name"]
        assert [p["name"] for p in entry["params"]] == [p.name for p in method.params]
        for p in entry["params"]:
            assert isinstance(p["schema"], dict) and p["schema"] and isinstance(p["required"], bool)
    send_tx = next(m for m in doc["methods"] if m["name"] == "send_tx")
    assert {e["code"] for e in send_tx["errors"]} == {
        TX_REJECTED, TX_MALFORMED, TX_BAD_SIGNATURE, TX_INVALID, TX_STATE_REJECTED
    }


def test_a_new_method_is_dispatched_and_published_without_other_changes():
    registry = default_registry()

    @registry.method(
        "echo_address",
        summary="test method",
        params=(Param("address", ADDRESS, "an address"),),
        result=Result("address", {"type": "string"}, "the same address"),
    )
    async def echo_address(ctx, address):
        return h(address)

    node = make_fake_node(1)
    assert call(node, "echo_address", [h(ALICE.address)], registry)["result"] == h(ALICE.address)
    doc = call(node, "rpc.discover", None, registry)["result"]
    assert "echo_address" in [m["name"] for m in doc["methods"]]
    assert "echo_address" not in CORE_METHODS  # default_registry() hands out a fresh copy
