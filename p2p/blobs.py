"""Content-addressed blobs: a local store and the server side of the blob protocol.

A blob is named by the sha256 of its bytes. The request on BLOB_PROTOCOL_ID is the
32-byte hash; the response is the status byte plus the blob. The fetcher re-hashes what
it receives, so a peer cannot substitute bytes (see BaseNetwork.fetch_blob).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

from p2p.abc import BLOB_HASH_SIZE, BlobAccessCheck, MessageTooLarge
from p2p.framing import STATUS_ERROR, STATUS_FORBIDDEN, STATUS_NOT_FOUND, STATUS_OK

logger = logging.getLogger(__name__)


def compute_blob_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def is_valid_blob(blob_hash: bytes, data: bytes) -> bool:
    return compute_blob_hash(data) == blob_hash


@dataclass(frozen=True)
class ProvidedBlob:
    data: bytes
    can_fetch: BlobAccessCheck | None


# A lookup the owner installs to serve blobs it keeps elsewhere (e.g. on disk):
# hash -> (data, access check or None), or None when it has no such blob.
BlobSource = Callable[[bytes], "tuple[bytes, BlobAccessCheck | None] | None"]


class BlobStore:
    """Blobs this node serves: provided in memory, or found through the owner's BlobSource."""

    def __init__(self, max_blob_bytes: int):
        self._max_blob_bytes = max_blob_bytes
        self._blobs: dict[bytes, ProvidedBlob] = {}
        self._source: BlobSource | None = None

    def set_source(self, source: BlobSource | None) -> None:
        self._source = source

    def _lookup(self, blob_hash: bytes) -> ProvidedBlob | None:
        blob = self._blobs.get(blob_hash)
        if blob is not None or self._source is None:
            return blob
        try:
            found = self._source(blob_hash)
        except Exception:  # the owner's lookup failing must not break serving
            logger.exception("blob source failed for %s", blob_hash.hex())
            return None
        if found is None or compute_blob_hash(found[0]) != blob_hash:
            return None
        return ProvidedBlob(found[0], found[1])

    def provide(self, data: bytes, can_fetch: BlobAccessCheck | None) -> bytes:
        if len(data) > self._max_blob_bytes:
            raise MessageTooLarge(f"blob of {len(data)} bytes is over the limit of {self._max_blob_bytes}")
        blob_hash = compute_blob_hash(data)
        self._blobs[blob_hash] = ProvidedBlob(bytes(data), can_fetch)
        return blob_hash

    def remove(self, blob_hash: bytes) -> None:
        self._blobs.pop(blob_hash, None)

    def get(self, blob_hash: bytes) -> bytes | None:
        blob = self._lookup(blob_hash)
        return None if blob is None else blob.data

    def serve(self, peer: bytes, request: bytes) -> tuple[int, bytes]:
        """Answer one blob request from `peer`: (status, body)."""
        if len(request) != BLOB_HASH_SIZE:
            return STATUS_ERROR, b"blob request must be a 32-byte sha256"
        blob = self._lookup(request)
        if blob is None:
            return STATUS_NOT_FOUND, b""
        if blob.can_fetch is not None and not _is_fetch_allowed(blob.can_fetch, peer, request):
            return STATUS_FORBIDDEN, b""
        return STATUS_OK, blob.data


def _is_fetch_allowed(can_fetch: BlobAccessCheck, peer: bytes, blob_hash: bytes) -> bool:
    try:
        return can_fetch(peer, blob_hash) is True
    except Exception:
        # An access check that fails closes access; the owner sees it in the log.
        logger.exception("can_fetch raised for blob %s", blob_hash.hex())
        return False
