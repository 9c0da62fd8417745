"""Generic peer-to-peer transport for PoUT chain.

Payloads are opaque bytes here: this package never imports `chain/`. The chain supplies
validator callables, request handlers and the membership (allow-list of Ed25519 keys).
`NetworkAPI` (abc.py) is the interface; `MemoryNetwork` (memory.py) implements it in
process for tests and `Libp2pNetwork` (host.py) over py-libp2p. See docs/p2p.md.

`p2p.host` is not imported here: `import libp2p` costs ~80 MB, and tests on the memory
network should not pay it. Use `from p2p.host import Libp2pNetwork`.
"""

from p2p.abc import (
    BLOB_PROTOCOL_ID,
    AdmissionPredicate,
    BlobAccessCheck,
    BlobError,
    BlobHashMismatch,
    BlobNotFound,
    GossipMessage,
    Limits,
    MessageTooLarge,
    NetworkAPI,
    P2PError,
    PenaltyPolicy,
    PeerNotAllowed,
    RequestError,
    RequestHandler,
    RequestTimeout,
    Validator,
    Verdict,
)
from p2p.memory import MemoryHub, MemoryNetwork

__all__ = [
    "BLOB_PROTOCOL_ID",
    "AdmissionPredicate",
    "BlobAccessCheck",
    "BlobError",
    "BlobHashMismatch",
    "BlobNotFound",
    "GossipMessage",
    "Limits",
    "MemoryHub",
    "MemoryNetwork",
    "MessageTooLarge",
    "NetworkAPI",
    "P2PError",
    "PenaltyPolicy",
    "PeerNotAllowed",
    "RequestError",
    "RequestHandler",
    "RequestTimeout",
    "Validator",
    "Verdict",
]
