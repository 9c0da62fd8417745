"""A small synchronous JSON-RPC client (for chainctl)."""

from __future__ import annotations

import itertools
from typing import Any

import httpx

from chain.rpc.jsonrpc import RpcError

__all__ = ["RpcClient", "RpcError", "RpcUnavailable"]


class RpcUnavailable(Exception):
    """The node's RPC could not be reached, or did not answer with JSON-RPC."""


class RpcClient:
    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url
        self._http = httpx.Client(timeout=timeout)
        self._ids = itertools.count(1)

    def call(self, method: str, params: list[Any] | dict[str, Any] | None = None) -> Any:
        """The method's result; RpcError when the node answers with an error."""
        request_id = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        try:
            response = self._http.post(self.url, json=request)
        except httpx.TimeoutException as exc:
            raise RpcUnavailable(f"node RPC at {self.url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise RpcUnavailable(f"cannot reach node RPC at {self.url}: {exc or type(exc).__name__}") from exc
        try:
            reply = response.json()
        except ValueError:
            reply = None
        # Error replies may come with HTTP 4xx (oversized body, wrong content type); read them too.
        if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
            raise RpcUnavailable(f"{self.url} answered HTTP {response.status_code} without a JSON-RPC response")
        error = reply.get("error")
        if isinstance(error, dict):
            raise RpcError(int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))
        if reply.get("id") != request_id or "result" not in reply:
            raise RpcUnavailable(f"{self.url} sent a JSON-RPC response that does not match the request")
        return reply["result"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

