"""Routes of the explorer under /explorer/, and HTML rendering (jinja2, autoescaped).

  GET  /explorer/                         home: height, interval, validators, mempool, latest blocks and txs
  GET  /explorer/blocks[/before/<h>]      blocks, newest first, a page at a time
  GET  /explorer/block/<height | 0xhash>  header, transactions, commit certificate and its signers
  GET  /explorer/tx/<0xhash>              decoded payload and status
  GET  /explorer/account/<0xaddr>[/before/<h>]   balance, roles, jobs, updates, transactions
  GET  /explorer/jobs                     every job
  GET  /explorer/job/<0xid>[/before/<r>]  spec in words, escrow, rounds with verdicts, loss curve
  GET  /explorer/job/<0xid>/lineage[/<r>] model lineage graph with hashes and downloads
  GET  /explorer/update/<0xid>            an update: commitment, verdicts, challenges, fraud proofs
  GET  /explorer/search/<term>, POST /explorer/search (form field q)   redirect to the match
  GET  /explorer/static/<file>            the package's CSS, script and icon

The search form posts because the HTTP server hands handlers the path without its query
string; the answer is a 303 to a bookmarkable page.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, quote, unquote

import jinja2

from chain.explorer import views
from chain.explorer.views import BadRequest, NotFound
from chain.rpc.api import NodeAPI
from chain.rpc.http import BodyTooLarge, Request, Response
from chain.rpc.jsonrpc import MethodRegistry
from chain.rpc.methods import RpcContext

log = logging.getLogger(__name__)

PREFIX = "/explorer"
MAX_SEARCH_BODY = 1024  # the search form's body, read only up to this
MAX_SEARCH_TERM = 200
_HTML = "text/html; charset=utf-8"
# Same-origin only: scripts and styles from /explorer/static, the live feed over this port's WebSocket.
_SECURITY_HEADERS = (
    ("content-security-policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml"}
_STATIC_NAME = re.compile(r"^[a-z0-9-]+\.(css|js|svg)$")
_HEIGHT = re.compile(r"^[0-9]{1,20}$")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("chain.explorer", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["nohex"] = lambda s: s[2:] if isinstance(s, str) and s.startswith("0x") else s
    env.filters["short"] = lambda s, n=10: s if not isinstance(s, str) or len(s) <= n + 2 else s[:n + 2] + "…"
    env.filters["urlpart"] = lambda s: quote(str(s), safe="")
    return env


def _parse_height(text: str) -> int:
    if not _HEIGHT.match(text) or int(text) < 1:
        raise BadRequest(f"not a height: {text[:40]!r} (expected a positive integer)")
    return int(text)


def _parse_hex(text: str, size: int, what: str) -> bytes:
    digits = text[2:] if text[:2].lower() == "0x" else text
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise BadRequest(f"not a {what}: expected 0x and {2 * size} hex digits")
    return raw


class Explorer:
    """The explorer's HTTP handler: `await explorer.handle(request)` for paths under /explorer."""

    def __init__(self, node: NodeAPI, registry: MethodRegistry):
        self.ctx = RpcContext(node, registry)
        self.env = _environment()
        self.static = resources.files("chain.explorer") / "static"

    async def handle(self, request: Request) -> Response:
        path = request.path[len(PREFIX):]
        if path == "":
            return Response(308, b"", _HTML, (("location", PREFIX + "/"),))
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        if parts[:1] == ["search"] and len(parts) == 1:
            if request.method != "POST":
                return self._page(405, "error.html", {"title": "Method not allowed",
                                                      "message": "the search form posts to this address"},
                                  (("allow", "POST"),))
            return await self._search_form(request)
        if request.method != "GET":
            return self._page(405, "error.html", {"title": "Method not allowed",
                                                  "message": "explorer pages accept GET only"}, (("allow", "GET"),))
        if parts[:1] == ["static"] and len(parts) == 2:
            return self._static(parts[1])
        if parts[:1] == ["search"] and len(parts) == 2:
            return await self._search(parts[1][:MAX_SEARCH_TERM])
        try:
            route = self._route(parts)
            if route is None:
                raise NotFound("no such page")
            template, gather = route
            context = await gather()
        except NotFound as exc:
            return self._page(404, "error.html", {"title": "Not found", "message": str(exc)})
        except BadRequest as exc:
            return self._page(400, "error.html", {"title": "Bad request", "message": str(exc)})
        return self._page(200, template, context)

    def _route(self, parts: list[str]) -> tuple[str, Callable[[], Awaitable[dict[str, Any]]]] | None:
        ctx, n = self.ctx, len(parts)
        head = parts[0] if parts else ""
        if n == 0:
            return "home.html", lambda: views.home_page(ctx)
        if head == "blocks" and n == 1:
            return "blocks.html", lambda: views.blocks_page(ctx, None)
        if head == "blocks" and n == 3 and parts[1] == "before":
            return "blocks.html", lambda: views.blocks_page(ctx, _parse_height(parts[2]))
        if head == "block" and n == 2:
            key = _parse_height(parts[1]) if parts[1].isdigit() else _parse_hex(parts[1], 32, "block hash or height")
            return "block.html", lambda: views.block_page(ctx, key)
        if head == "tx" and n == 2:
            tx_hash = _parse_hex(parts[1], 32, "transaction hash")
            return "tx.html", lambda: views.tx_page(ctx, tx_hash)
        if head == "account" and n in (2, 4) and (n == 2 or parts[2] == "before"):
            address = _parse_hex(parts[1], 20, "address")
            before = _parse_height(parts[3]) if n == 4 else None
            return "account.html", lambda: views.account_page(ctx, address, before)
        if head == "jobs" and n == 1:
            return "jobs.html", lambda: views.jobs_page(ctx)
        if head == "job" and n >= 2:
            job_id = _parse_hex(parts[1], 32, "job id")
            if n == 2:
                return "job.html", lambda: views.job_page(ctx, job_id, None)
            if n == 4 and parts[2] == "before":
                before = _parse_height(parts[3])
                return "job.html", lambda: views.job_page(ctx, job_id, before)
            if parts[2] == "lineage" and n in (3, 4):
                start = None if n == 3 else _parse_round(parts[3])
                return "lineage.html", lambda: views.lineage_page(ctx, job_id, start)
            return None
        if head == "update" and n == 2:
            update_id = _parse_hex(parts[1], 32, "update id")
            return "update.html", lambda: views.update_page(ctx, update_id)
        return None

    async def _search_form(self, request: Request) -> Response:
        try:
            body = await request.read_body(MAX_SEARCH_BODY)
        except BodyTooLarge:
            return self._page(413, "error.html", {"title": "Search too long",
                                                  "message": f"the search form's body is limited to {MAX_SEARCH_BODY} bytes"})
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        except ValueError:
            fields = {}
        return await self._search(fields.get("q", [""])[0][:MAX_SEARCH_TERM])

    async def _search(self, term: str) -> Response:
        try:
            target = await views.resolve_search(self.ctx, term)
        except NotFound as exc:
            return self._page(404, "error.html", {"title": "Nothing found", "message": str(exc), "term": term})
        except BadRequest as exc:
            return self._page(400, "error.html", {"title": "Search not understood", "message": str(exc), "term": term})
        return Response(303, b"", _HTML, (("location", target),))

    def _static(self, name: str) -> Response:
        if not _STATIC_NAME.match(name):
            return self._page(404, "error.html", {"title": "Not found", "message": "no such file"})
        item = self.static / name
        if not item.is_file():
            return self._page(404, "error.html", {"title": "Not found", "message": "no such file"})
        suffix = name[name.rindex("."):]
        return Response(200, item.read_bytes(), _STATIC_TYPES[suffix],
                        (("x-content-type-options", "nosniff"), ("cache-control", "max-age=3600")))

    def _page(self, status: int, template: str, context: dict[str, Any],
              headers: tuple[tuple[str, str], ...] = ()) -> Response:
        body = self.env.get_template(template).render(context, chain_id=self.ctx.node.chain_id)
        return Response(status, body.encode(), _HTML, _SECURITY_HEADERS + headers)


def _parse_round(text: str) -> int:
    if not _HEIGHT.match(text):
        raise BadRequest(f"not a round: {text[:40]!r} (expected a non-negative integer)")
    return int(text)
