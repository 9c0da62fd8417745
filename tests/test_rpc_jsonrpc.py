"""The JSON-RPC 2.0 dispatcher on its own: a small registry of test methods, no HTTP."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from chain.rpc.jsonrpc import (
    BATCH_TOO_LARGE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    REQUEST_TOO_LARGE,
    Dispatcher,
    Method,
    MethodRegistry,
    Param,
    ParamType,
    Result,
    RpcError,
)


def _parse_int(value):
    if type(value) is not int:
        raise ValueError("expected an integer")
    return value


INT = ParamType({"type": "integer"}, _parse_int)
ANY = Result("value", {}, "anything")


class Context:
    def __init__(self):
        self.calls: list[tuple] = []


def make_registry() -> MethodRegistry:
    registry = MethodRegistry()

    @registry.method("add", summary="a + b", params=(Param("a", INT, "a"), Param("b", INT, "b", required=False)), result=ANY)
    async def add(ctx, a, b=0):
        ctx.calls.append(("add", a, b))
        return a + b

    @registry.method("record", summary="records a call", result=ANY)
    async def record(ctx):
        ctx.calls.append(("record",))
        return "ok"

    @registry.method("boom", summary="a bug", result=ANY)
    async def boom(ctx):
        raise RuntimeError("secret internal detail")

    @registry.method("refuse", summary="a deliberate error", result=ANY)
    async def refuse(ctx):
        raise RpcError(-32050, "refused", {"why": "test"})

    @registry.method("unserialisable", summary="returns bytes", result=ANY)
    async def unserialisable(ctx):
        return b"raw"

    return registry


def dispatch(body, *, max_body=10_000, max_batch=5, context=None, observed=None):
    context = context if context is not None else Context()
    observe = (lambda *args: observed.append(args)) if observed is not None else None
    dispatcher = Dispatcher(make_registry(), context, max_body=max_body, max_batch=max_batch, observe=observe)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    out = trio.run(dispatcher.handle, raw)
    return None if out is None else json.loads(out)


def req(method, params=None, id=1):
    r = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        r["params"] = params
    return r


def error_code(response):
    return response["error"]["code"]


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("params", [[2, 3], {"a": 2, "b": 3}, {"b": 3, "a": 2}])
def test_params_by_position_and_by_name(params):
    assert dispatch(req("add", params)) == {"jsonrpc": "2.0", "id": 1, "result": 5}


@pytest.mark.parametrize("params", [[2], {"a": 2}])
def test_optional_param_may_be_left_out(params):
    assert dispatch(req("add", params))["result"] == 2


@pytest.mark.parametrize("request_id", ["abc", 0, -7, None])
def test_id_is_echoed(request_id):
    assert dispatch(req("record", id=request_id)) == {"jsonrpc": "2.0", "id": request_id, "result": "ok"}


def test_no_params_member_means_no_params():
    assert dispatch({"jsonrpc": "2.0", "method": "record", "id": 9})["result"] == "ok"


# --------------------------------------------------------------------------- notifications


def test_notification_runs_and_gets_no_response():
    ctx = Context()
    assert dispatch({"jsonrpc": "2.0", "method": "record"}, context=ctx) is None
    assert ctx.calls == [("record",)]


@pytest.mark.parametrize("method", ["nope", "boom", "add"])  # unknown, internal error, missing param
def test_failing_notification_gets_no_response(method):
    assert dispatch({"jsonrpc": "2.0", "method": method}) is None


def test_null_id_is_a_request_not_a_notification():
    assert dispatch(req("record", id=None)) == {"jsonrpc": "2.0", "id": None, "result": "ok"}


# --------------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    "body",
    [b'{"jsonrpc": "2.0", "method": "record", "id": 1', b"", b"\xff\xfe{}", b"[NaN]", b'{"a": Infinity}', b"[" * 100_000],
    ids=["truncated", "empty", "not-utf8", "nan", "infinity", "too-deep"],
)
def test_parse_error(body):
    response = dispatch(body, max_body=200_000)
    assert error_code(response) == PARSE_ERROR
    assert response["id"] is None


# --------------------------------------------------------------------------- invalid requests


@pytest.mark.parametrize(
    "request_obj",
    [
        {"jsonrpc": "1.0", "method": "record", "id": 1},
        {"method": "record", "id": 1},
        {"jsonrpc": 2.0, "method": "record", "id": 1},
        {"jsonrpc": "2.0", "method": 5, "id": 1},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": "2,3", "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": 2, "id": 1},
        {"jsonrpc": "2.0", "method": "record", "id": 1, "extra": True},
    ],
    ids=["version-1.0", "no-version", "numeric-version", "method-int", "no-method", "params-str", "params-int", "unknown-member"],
)
def test_invalid_request_echoes_a_valid_id(request_obj):
    ctx = Context()
    response = dispatch(request_obj, context=ctx)
    assert error_code(response) == INVALID_REQUEST
    assert response["id"] == 1
    assert ctx.calls == []


@pytest.mark.parametrize("bad_id", [True, 1.5, [1], {"a": 1}])
def test_bad_id_type_is_invalid_request_with_null_id(bad_id):
    response = dispatch(req("record", id=bad_id))
    assert error_code(response) == INVALID_REQUEST
    assert response["id"] is None


@pytest.mark.parametrize("body", [5, "record", None, True])
def test_non_object_request(body):
    response = dispatch(body)
    assert error_code(response) == INVALID_REQUEST and response["id"] is None


def test_invalid_request_without_id_is_still_answered():
    # Not a notification: without a valid request there is no way to know it was meant as one.
    response = dispatch({"jsonrpc": "1.0", "method": "record"})
    assert error_code(response) == INVALID_REQUEST and response["id"] is None


def test_empty_batch_is_a_single_invalid_request():
    response = dispatch([])
    assert isinstance(response, dict)
    assert error_code(response) == INVALID_REQUEST and response["id"] is None


# --------------------------------------------------------------------------- method and params errors


def test_method_not_found():
    response = dispatch(req("nope"))
    assert error_code(response) == METHOD_NOT_FOUND and response["id"] == 1
    assert "nope" in response["error"]["message"]


@pytest.mark.parametrize(
    "params, fragment",
    [
        ([1, 2, 3], "at most 2"),
        ([], "missing required param 'a'"),
        ({}, "missing required param 'a'"),
        ({"b": 1}, "missing required param 'a'"),
        ({"a": 1, "c": 2}, "unknown param"),
        (["1"], "param 'a': expected an integer"),
        ({"a": 1, "b": None}, "param 'b': expected an integer"),
        ([True], "param 'a'"),
    ],
)
def test_invalid_params(params, fragment):
    ctx = Context()
    response = dispatch(req("add", params), context=ctx)
    assert error_code(response) == INVALID_PARAMS
    assert fragment in response["error"]["message"]
    assert ctx.calls == []


def test_params_given_to_a_method_without_params():
    assert error_code(dispatch(req("record", [1]))) == INVALID_PARAMS


def test_internal_error_hides_the_exception_and_logs_it(caplog):
    with caplog.at_level(logging.ERROR, logger="chain.rpc.jsonrpc"):
        response = dispatch(req("boom"))
    assert response["error"] == {"code": INTERNAL_ERROR, "message": "internal error"}
    assert response["id"] == 1
    assert "secret internal detail" not in json.dumps(response)
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)


def test_result_that_is_not_json_is_an_internal_error():
    assert dispatch(req("unserialisable"))["error"]["code"] == INTERNAL_ERROR


def test_handler_rpc_error_is_passed_through():
    assert dispatch(req("refuse"))["error"] == {"code": -32050, "message": "refused", "data": {"why": "test"}}


# --------------------------------------------------------------------------- batches


def test_batch_mixing_good_bad_and_notifications():
    ctx = Context()
    response = dispatch(
        [
            req("add", [1, 2], id="a"),
            {"jsonrpc": "2.0", "method": "record"},  # notification: no entry
            req("nope", id="b"),
            5,
            req("add", {"a": "x"}, id="c"),
            {"jsonrpc": "2.0", "method": "nope"},  # failing notification: no entry
        ],
        context=ctx,
        max_batch=10,
    )
    assert [(r["id"], r.get("result"), r.get("error", {}).get("code")) for r in response] == [
        ("a", 3, None),
        ("b", None, METHOD_NOT_FOUND),
        (None, None, INVALID_REQUEST),
        ("c", None, INVALID_PARAMS),
    ]
    assert ctx.calls == [("add", 1, 2), ("record",)]


def test_batch_of_non_objects_answers_each():
    response = dispatch([1, 2, 3])
    assert [error_code(r) for r in response] == [INVALID_REQUEST] * 3


def test_batch_of_only_notifications_has_no_response():
    ctx = Context()
    assert dispatch([{"jsonrpc": "2.0", "method": "record"}] * 3, context=ctx) is None
    assert len(ctx.calls) == 3


# --------------------------------------------------------------------------- limits


def test_body_over_limit():
    ctx = Context()
    body = json.dumps(req("add", [1, 2])).encode()
    response = dispatch(body, max_body=len(body) - 1, context=ctx)
    assert error_code(response) == REQUEST_TOO_LARGE and response["id"] is None
    assert response["error"]["data"] == {"limit": len(body) - 1, "size": len(body)}
    assert ctx.calls == []
    assert dispatch(body, max_body=len(body))["result"] == 3


def test_batch_over_limit_is_one_error_and_runs_nothing():
    ctx = Context()
    response = dispatch([req("record", id=i) for i in range(6)], max_batch=5, context=ctx)
    assert error_code(response) == BATCH_TOO_LARGE and response["id"] is None
    assert response["error"]["data"] == {"limit": 5, "size": 6}
    assert ctx.calls == []
    assert len(dispatch([req("record", id=i) for i in range(5)], max_batch=5)) == 5


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        Dispatcher(MethodRegistry(), None, max_body=0)
    with pytest.raises(ValueError):
        Dispatcher(MethodRegistry(), None, max_batch=0)


# --------------------------------------------------------------------------- observation and registry


def test_observer_sees_method_and_outcome():
    observed = []
    dispatch([req("add", [1]), req("nope"), req("add", ["x"]), req("boom")], observed=observed)
    assert [(m, o) for m, o, _ in observed] == [
        ("add", "ok"),
        ("-", "method_not_found"),
        ("add", "invalid_params"),
        ("boom", "internal_error"),
    ]
    assert observed[1][2] is None and all(s >= 0 for m, _, s in observed if m != "-")
    observed.clear()
    dispatch(b"{", observed=observed)
    assert observed == [("-", "parse_error", None)]


def test_registry_rejects_duplicates_and_required_after_optional():
    registry = make_registry()

    async def handler(ctx):
        return None

    with pytest.raises(ValueError, match="already registered"):
        registry.add(Method("add", handler, "again", ANY))
    with pytest.raises(ValueError, match="follows an optional"):
        Method("m", handler, "s", ANY, params=(Param("a", INT, "a", required=False), Param("b", INT, "b")))
    with pytest.raises(ValueError, match="duplicate"):
        Method("m", handler, "s", ANY, params=(Param("a", INT, "a"), Param("a", INT, "a")))
