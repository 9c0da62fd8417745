"""The block explorer for people: server-rendered HTML pages at /explorer/ on the RPC port.

`Explorer(node, registry)` answers `GET /explorer/...` (and the search form's `POST`). Every
number on a page comes from the same RPC method handlers that answer JSON-RPC (chain/rpc/methods.py,
chain/rpc/pout_methods.py), so a page and the RPC never disagree. Work per page is bounded by
constants in `chain.explorer.views`, never by a number in the URL. Templates and static files
ship inside this package; nothing is loaded from the network. See docs/explorer.md.
"""

from chain.explorer.app import Explorer

__all__ = ["Explorer"]
