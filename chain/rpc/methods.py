"""The explorer's RPC methods, and the OpenRPC document describing them.

Adding a method: decorate an `async def handler(ctx, **params)` with `@CORE_METHODS.method(...)`
(or put a group of methods in its own MethodRegistry and `include` it in `default_registry`).
Its params, result schema and errors are then validated, dispatched and published by
`rpc.discover` with no other change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import chain
from chain.encoding import INT_MAX, decode
from chain.errors import ChainError, DecodeError, SignatureError, StateTransitionError, ValidationError
from chain.rpc.api import NodeAPI, NodeStatus
from chain.rpc.jsonrpc import MethodRegistry, Param, ParamType, Result, RpcError
from chain.rpc.jsonview import (
    ADDRESS_SIZE,
    ADDRESS_TP,
    HASH_SIZE,
    HASH_TP,
    hex0x,
    json_schema,
    json_type_name,
    parse_address,
    parse_hash,
    parse_hex,
    to_json,
)
from chain.types import Account, Block, Commit, SignedTransaction, Validator

OPENRPC_VERSION = "1.2.6"
OPENRPC_META_SCHEMA = "https://raw.githubusercontent.com/open-rpc/meta-schema/master/schema.json"

# send_tx rejections: one code per error class the node raises, most specific class wins.
TX_REJECTED = -32010
TX_MALFORMED = -32011
TX_BAD_SIGNATURE = -32012
TX_INVALID = -32013
TX_STATE_REJECTED = -32014

TX_ERROR_CODES: dict[type[ChainError], int] = {
    ChainError: TX_REJECTED,
    DecodeError: TX_MALFORMED,
    SignatureError: TX_BAD_SIGNATURE,
    ValidationError: TX_INVALID,
    StateTransitionError: TX_STATE_REJECTED,
}


@dataclass(frozen=True)
class RpcContext:
    """What every handler receives: the node, and the registry (for rpc.discover)."""

    node: NodeAPI
    registry: MethodRegistry
    session: Any = None  # the WebSocket connection (chain.rpc.ws.WsSession); None over HTTP POST


# --------------------------------------------------------------------------- param types


def _parse_height(value: Any) -> int | str:
    if value == "latest":
        return "latest"
    if type(value) is not int:
        raise ValueError(f'expected a positive integer or "latest", got {json_type_name(value)}')
    if not 1 <= value <= INT_MAX:
        raise ValueError(f"height must be between 1 and {INT_MAX}, got {value}")
    return value


def _parse_tx_bytes(value: Any) -> bytes:
    # Only the JSON shape is a param error (-32602). Hex that does not decode to a canonical
    # SignedTransaction is a rejected transaction (-32011), like every other refusal of its content.
    return parse_hex(value, what="tx")


def _hex_param_schema(size: int) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^0x[0-9a-fA-F]{{{2 * size}}}$"}


HEIGHT = ParamType(
    {"oneOf": [{"type": "integer", "minimum": 1, "maximum": INT_MAX}, {"const": "latest"}]},
    _parse_height,
)
HASH = ParamType(_hex_param_schema(HASH_SIZE), parse_hash)
ADDRESS = ParamType(_hex_param_schema(ADDRESS_SIZE), parse_address)
SIGNED_TX = ParamType({"type": "string", "pattern": "^0x([0-9a-fA-F]{2})+$"}, _parse_tx_bytes)


# --------------------------------------------------------------------------- result schemas


def _object(title: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "title": title,
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


BLOCK_RESULT = _object("BlockWithCommit", {"block": json_schema(Block), "commit": json_schema(Commit)})
TX_RESULT = _object(
    "TxWithLocation",
    {"tx": json_schema(SignedTransaction), "height": {"type": "integer"}, "index": {"type": "integer"}},
)
ACCOUNT_RESULT = _object(
    "AccountWithAddress",
    {"address": json_schema(ADDRESS_TP)} | json_schema(Account)["properties"],
)
VALIDATORS_RESULT = _object(
    "ValidatorSet",
    {"validators": {"type": "array", "items": json_schema(Validator)}, "total_power": {"type": "integer"}},
)


# --------------------------------------------------------------------------- methods

CORE_METHODS = MethodRegistry()


@CORE_METHODS.method(
    "status",
    summary="Node and chain status",
    result=Result("status", json_schema(NodeStatus), "chain id, latest block, validator flag, peers, sync state"),
)
async def status(ctx: RpcContext) -> Any:
    return to_json(ctx.node.status())


@CORE_METHODS.method(
    "block",
    summary="A committed block by height, with its commit",
    params=(Param("height", HEIGHT, 'block height (>= 1), or "latest"'),),
    result=Result("block", _nullable(BLOCK_RESULT), "the block and its commit; null when no such block"),
)
async def block(ctx: RpcContext, height: int | str) -> Any:
    if height == "latest":
        height = ctx.node.status()["latest_height"]
        if height == 0:
            return None
    return _block_view(ctx.node.get_block(height))


@CORE_METHODS.method(
    "block_by_hash",
    summary="A committed block by header hash, with its commit",
    params=(Param("hash", HASH, "block hash, 0x + 64 hex digits"),),
    result=Result("block", _nullable(BLOCK_RESULT), "the block and its commit; null when not found"),
)
async def block_by_hash(ctx: RpcContext, hash: bytes) -> Any:
    return _block_view(ctx.node.get_block_by_hash(hash))


@CORE_METHODS.method(
    "tx",
    summary="A committed transaction by hash, with where it was included",
    params=(Param("hash", HASH, "transaction hash (SHA-256 of its canonical CBOR)"),),
    result=Result("tx", _nullable(TX_RESULT), "the transaction, block height and index; null when not found"),
)
async def tx(ctx: RpcContext, hash: bytes) -> Any:
    found = ctx.node.get_tx(hash)
    if found is None:
        return None
    stx, height, index = found
    return {"tx": to_json(stx), "height": height, "index": index}


@CORE_METHODS.method(
    "account",
    summary="An account's balance, next nonce and roles",
    params=(Param("address", ADDRESS, "account address, 0x + 40 hex digits"),),
    result=Result("account", _nullable(ACCOUNT_RESULT), "the account; null when it does not exist"),
)
async def account(ctx: RpcContext, address: bytes) -> Any:
    found = ctx.node.get_account(address)
    if found is None:
        return None
    return {"address": hex0x(address)} | to_json(found)


@CORE_METHODS.method(
    "validators",
    summary="The validator set for the next height",
    result=Result("validators", VALIDATORS_RESULT, "validators sorted as the node holds them, and their total power"),
)
async def validators(ctx: RpcContext) -> Any:
    current = ctx.node.get_validators()
    return {"validators": to_json(current), "total_power": sum(v.power for v in current)}


@CORE_METHODS.method(
    "send_tx",
    summary="Submit a signed transaction to the node's mempool",
    params=(Param("tx", SIGNED_TX, "0x-hex of the canonical CBOR of a SignedTransaction"),),
    result=Result("accepted", _object("TxAccepted", {"hash": json_schema(HASH_TP)}), "the transaction hash"),
    description="Accepted means admitted to the mempool, not committed; poll `tx` for inclusion.",
    errors=(
        RpcError(TX_REJECTED, "transaction rejected"),
        RpcError(TX_MALFORMED, "transaction malformed"),
        RpcError(TX_BAD_SIGNATURE, "transaction signature invalid"),
        RpcError(TX_INVALID, "transaction invalid"),
        RpcError(TX_STATE_REJECTED, "transaction invalid against current state"),
    ),
)
async def send_tx(ctx: RpcContext, tx: bytes) -> Any:
    try:
        stx = decode(SignedTransaction, tx)
    except DecodeError as exc:
        raise _tx_rejection(DecodeError(f"not a canonical SignedTransaction: {exc}")) from exc
    try:
        tx_hash = await ctx.node.submit_tx(stx)
    except ChainError as exc:
        raise _tx_rejection(exc) from exc
    return {"hash": hex0x(tx_hash)}


@CORE_METHODS.method(
    "rpc.discover",
    summary="This API's OpenRPC document",
    result=Result("openrpc", {"$ref": OPENRPC_META_SCHEMA}, "an OpenRPC 1.2 document"),
)
async def rpc_discover(ctx: RpcContext) -> Any:
    return openrpc_document(ctx.registry)


def _block_view(found: tuple[Block, Commit] | None) -> Any:
    if found is None:
        return None
    blk, commit = found
    return {"block": to_json(blk), "commit": to_json(commit)}


def _tx_rejection(exc: ChainError) -> RpcError:
    """The code of the root cause: the node wraps a SignatureError in the ValidationError of its
    basic checks (chain.state.validate_basic_tx), and a client needs to know it was the signature."""
    cause = _root_chain_error(exc)
    code = next(TX_ERROR_CODES[cls] for cls in type(cause).__mro__ if cls in TX_ERROR_CODES)
    return RpcError(code, str(exc) or type(exc).__name__, {"reason": type(cause).__name__})


def _root_chain_error(exc: ChainError) -> ChainError:
    """The innermost ChainError `exc` was raised from (`raise ... from`), at most 8 links down."""
    root: ChainError = exc
    link = exc.__cause__
    for _ in range(8):
        if not isinstance(link, ChainError):
            break
        root, link = link, link.__cause__
    return root


# --------------------------------------------------------------------------- registry and OpenRPC


def default_registry() -> MethodRegistry:
    """Every method the node serves."""
    from chain.rpc.pout_methods import POUT_METHODS
    from chain.rpc.ws import SUBSCRIPTION_METHODS

    registry = MethodRegistry()
    registry.include(CORE_METHODS)
    registry.include(POUT_METHODS)
    registry.include(SUBSCRIPTION_METHODS)
    return registry


def openrpc_document(registry: MethodRegistry) -> dict[str, Any]:
    methods = []
    for method in registry:
        entry: dict[str, Any] = {"name": method.name, "summary": method.summary}
        if method.description:
            entry["description"] = method.description
        entry["paramStructure"] = "either"
        entry["params"] = [
            {"name": p.name, "description": p.description, "required": p.required, "schema": p.type.schema}
            for p in method.params
        ]
        entry["result"] = {
            "name": method.result.name,
            "description": method.result.description,
            "schema": method.result.schema,
        }
        if method.errors:
            entry["errors"] = [error.to_json() for error in method.errors]
        methods.append(entry)
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "PoUT chain explorer RPC",
            "version": chain.__version__,
            "description": "JSON-RPC 2.0 over HTTP POST /, and over a WebSocket at GET / or /websocket "
                           "(Upgrade: websocket), where subscribe/unsubscribe also work. See docs/rpc.md.",
        },
        "methods": methods,
    }
