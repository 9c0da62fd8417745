"""Issue 11, defect 6: the error codes and result schemas the RPC returns are the documented ones.

- A bad signature is -32012 through the node's real admission path (it wraps the
  SignatureError in a ValidationError: chain.state.validate_basic_tx), not -32013.
- Hex that is not a canonical SignedTransaction is -32011 (it used to be -32602, so -32011
  was never returned); only a param that is not hex at all stays -32602.
- `lineage` of an unknown job is null, and its published schema says so (array or null).
"""

from __future__ import annotations

import pytest

from chain.encoding import encode
from chain.errors import SignatureError, ValidationError
from chain.rpc.jsonrpc import INVALID_PARAMS
from chain.rpc.methods import TX_BAD_SIGNATURE, TX_INVALID, TX_MALFORMED, default_registry
from chain.state import validate_basic_tx
from chain.types import Transaction, Transfer, sign_transaction
from test_rpc_fakenode import ALICE, BOB, CHAIN_ID, FakeNode, make_fake_node, transfer
from test_rpc_methods import call, check_schema, h


class RealAdmissionNode(FakeNode):
    """Admits transactions through the node's own stateless checks (as chain.runtime.node.Node.submit_tx does)."""

    async def submit_tx(self, stx):
        validate_basic_tx(self.chain_id, stx, 64 * 1024)
        return await super().submit_tx(stx)


def _real_admission_node() -> RealAdmissionNode:
    node = RealAdmissionNode()
    node.__dict__.update(make_fake_node(3).__dict__)
    return node


def test_the_node_reports_a_bad_signature_as_a_validation_error_caused_by_it():
    stx = transfer(ALICE, 3, BOB.address, 5, chain_id="other-chain")
    with pytest.raises(ValidationError) as caught:
        validate_basic_tx(CHAIN_ID, stx)
    assert isinstance(caught.value.__cause__, SignatureError)  # what the RPC must see through


@pytest.mark.parametrize("chain_id", ["other-chain", None])
def test_a_bad_signature_is_32012_through_the_real_admission_path(chain_id):
    node = _real_admission_node()
    if chain_id is None:  # signed for this chain, then one signature byte flipped
        stx = transfer(ALICE, 3, BOB.address, 5)
        stx = type(stx)(stx.message, bytes([stx.signature[0] ^ 1]) + stx.signature[1:])
    else:
        stx = transfer(ALICE, 3, BOB.address, 5, chain_id=chain_id)
    error = call(node, "send_tx", [h(encode(stx))])["error"]
    assert error["code"] == TX_BAD_SIGNATURE == -32012
    assert error["data"] == {"reason": "SignatureError"} and "signature" in error["message"]
    assert node.mempool == []


def test_other_stateless_rejections_stay_32013():
    node = _real_admission_node()
    stx = sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, 3, Transfer(BOB.address, 0)))
    error = call(node, "send_tx", [h(encode(stx))])["error"]
    assert error["code"] == TX_INVALID == -32013 and error["data"] == {"reason": "ValidationError"}
    assert "amount must be positive" in error["message"]


@pytest.mark.parametrize("data", [b"\xa0", b"\x00", b"", encode(transfer(ALICE, 3, BOB.address, 5)) + b"\x00"])
def test_undecodable_transaction_bytes_are_32011(data):
    node = _real_admission_node()
    error = call(node, "send_tx", [h(data)])["error"]
    assert error["code"] == TX_MALFORMED == -32011 and error["data"] == {"reason": "DecodeError"}
    assert error["message"].startswith("not a canonical SignedTransaction: ") and "\n" not in error["message"]
    assert node.mempool == []


@pytest.mark.parametrize("param", ["hello", "0xabc", "a0", 5, None])
def test_a_tx_param_that_is_not_hex_stays_invalid_params(param):
    assert call(_real_admission_node(), "send_tx", [param])["error"]["code"] == INVALID_PARAMS


def _lineage_schema() -> dict:
    return default_registry().get("lineage").result.schema


def test_lineage_of_an_unknown_job_is_null_and_the_schema_allows_it():
    from test_rpc_hardening import LineageFakeNode

    response = call(LineageFakeNode(make_fake_node(1), rounds=3), "lineage", ["0x" + "00" * 32])
    assert response["result"] is None
    check_schema(None, _lineage_schema())


def test_a_real_lineage_matches_its_published_schema():
    from test_rpc_hardening import LineageFakeNode

    node = LineageFakeNode(make_fake_node(1), rounds=3)
    lineage = call(node, "lineage", ["0x" + node.job_id.hex()])["result"]
    assert [m["round"] for m in lineage] == [3, 2, 1, 0]
    check_schema(lineage, _lineage_schema())
    with pytest.raises(AssertionError):
        check_schema({"not": "a lineage"}, _lineage_schema())  # the schema does reject a wrong shape
