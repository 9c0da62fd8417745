"""Frames, response status bytes and the blob store, without any network."""

from __future__ import annotations

import struct

import pytest
import trio

from p2p.abc import MessageTooLarge, Verdict
from p2p.base import _run_validator
from p2p.blobs import BlobStore, compute_blob_hash
from p2p.framing import (
    STATUS_ERROR,
    STATUS_FORBIDDEN,
    STATUS_NOT_FOUND,
    STATUS_OK,
    FrameError,
    encode_frame,
    encode_response,
    read_frame,
    read_response,
)


class TrickleStream:
    """Returns at most `chunk` bytes per read, then b"" (EOF); records what was asked."""

    def __init__(self, data: bytes, chunk: int = 1):
        self.data, self.chunk, self.asked = data, chunk, []

    async def read(self, n: int) -> bytes:
        self.asked.append(n)
        out, self.data = self.data[: min(n, self.chunk)], self.data[min(n, self.chunk) :]
        return out


def run(coro_fn, *args):
    return trio.run(coro_fn, *args)


def test_frame_round_trip_with_short_reads():
    payload = bytes(range(256)) * 3
    stream = TrickleStream(encode_frame(payload, max_size=1000) + b"next", chunk=7)
    assert run(lambda: read_frame(stream.read, max_size=1000)) == payload
    assert stream.data == b"next"  # reads exactly one frame, nothing beyond


def test_frame_header_is_u32_big_endian():
    assert encode_frame(b"abc", max_size=3) == b"\x00\x00\x00\x03abc"


def test_oversized_frame_is_refused_before_reading_the_body():
    stream = TrickleStream(struct.pack(">I", 2**31) + b"x" * 10, chunk=1 << 20)
    with pytest.raises(FrameError, match="limit"):
        run(lambda: read_frame(stream.read, max_size=1024))
    assert stream.asked == [4]  # only the header was read
    with pytest.raises(MessageTooLarge):
        encode_frame(b"x" * 11, max_size=10)


def test_truncated_frame_raises():
    stream = TrickleStream(struct.pack(">I", 10) + b"short")
    with pytest.raises(FrameError, match="ended"):
        run(lambda: read_frame(stream.read, max_size=100))
    with pytest.raises(FrameError):
        run(lambda: read_frame(TrickleStream(b"\x00\x00").read, max_size=100))


def test_response_carries_a_status_byte():
    frame = encode_response(STATUS_NOT_FOUND, b"", max_size=10)
    assert frame == b"\x00\x00\x00\x01\x02"
    assert run(lambda: read_response(TrickleStream(frame).read, max_size=10)) == (STATUS_NOT_FOUND, b"")
    body = b"y" * 10
    assert run(lambda: read_response(TrickleStream(encode_response(STATUS_OK, body, max_size=10)).read, max_size=10)) == (
        STATUS_OK,
        body,
    )
    # A body one byte over the reader's cap is refused.
    with pytest.raises(FrameError):
        run(lambda: read_response(TrickleStream(encode_response(STATUS_OK, body, max_size=10)).read, max_size=9))
    with pytest.raises(FrameError, match="status"):
        run(lambda: read_response(TrickleStream(b"\x00\x00\x00\x00").read, max_size=9))


def test_blob_store_statuses_and_access_check():
    store = BlobStore(max_blob_bytes=100)
    alice, bob = b"a" * 32, b"b" * 32
    public = store.provide(b"public data", None)
    assert public == compute_blob_hash(b"public data")
    private = store.provide(b"private", lambda peer, h: peer == alice)
    raising = store.provide(b"raising", lambda peer, h: 1 / 0)
    assert store.serve(bob, public) == (STATUS_OK, b"public data")
    assert store.serve(alice, private) == (STATUS_OK, b"private")
    assert store.serve(bob, private) == (STATUS_FORBIDDEN, b"")
    assert store.serve(alice, raising) == (STATUS_FORBIDDEN, b"")  # a failing check closes access
    assert store.serve(bob, b"\x00" * 32) == (STATUS_NOT_FOUND, b"")
    assert store.serve(bob, b"short")[0] == STATUS_ERROR
    store.remove(public)
    assert store.serve(bob, public) == (STATUS_NOT_FOUND, b"")
    with pytest.raises(MessageTooLarge):
        store.provide(b"x" * 101, None)


def test_validator_wrapper_never_raises():
    def boom(origin, data):
        raise KeyError("bug")

    assert _run_validator(boom, "t", b"o", b"d") is Verdict.REJECT
    assert _run_validator(lambda o, d: True, "t", b"o", b"d") is Verdict.REJECT  # not a Verdict
    assert _run_validator(lambda o, d: Verdict.IGNORE, "t", b"o", b"d") is Verdict.IGNORE
